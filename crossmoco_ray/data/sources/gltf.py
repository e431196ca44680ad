"""glTF 2.0 meshes (``.glb``, ``.gltf``; Objaverse's format) as one triangle mesh in world coordinates.

The file is read as a scene and flattened: every node that holds a mesh contributes that mesh's triangles
with the node's full transform applied (its own matrix or translation/rotation/scale, composed with its
parents'), so a scene of several nodes comes out as one mesh where the scene places its parts. Only
geometry is read: textures, materials, vertex colours, cameras and animations are ignored (points and
renders come from the triangles), and primitives that are not triangles (points, lines) are dropped.

Files may be hostile, so what the file claims is checked against what it holds before the library parses
it (:func:`check_gltf`): a GLB's declared length and chunk lengths against the file's size, the JSON
chunk's size (:data:`GLTF_JSON_BYTES`), every buffer's declared length against its bytes, every buffer
view against its buffer, every accessor's count against its buffer view, and the bytes all accessors
would materialise against the buffers' (an accessor without a buffer view is zeros the library allocates).
A ``.gltf``'s external buffers are read only through ``sibling`` (the caller's reader for files in the
mesh's own folder), and only under a plain relative name: no scheme (``file:``, ``http:``), no absolute
path, no ``..``, no backslash; ``data:`` URIs are decoded in memory. Images are never read. Geometry in
compressed extensions (Draco, meshopt) cannot be decoded and is named as such. The node hierarchy must be a
forest of at most :data:`GLTF_NODES` nodes and :data:`GLTF_DEPTH` levels (the library walks the hierarchy for
every node: a crafted 65 KB chain of 2,000 nodes took it 22 s, one of 1,000 nodes 2.7 s).
"""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import numpy as np

from crossmoco_ray.bounded import printable
from crossmoco_ray.errors import DataError

GLTF_JSON_BYTES = 32 * 1024**2  # a glTF's JSON larger than this is refused (real ones: kilobytes to a few MB)
MESH_FACES = 20_000_000  # triangles of a flattened scene, at most (an instanced mesh counts each time)
GLTF_NODES = 65_536  # nodes of a scene, at most (the library resolves each node's transform on its own)
GLTF_DEPTH = 128  # levels of the node hierarchy, at most (each level costs every node below it a walk)
ACCESSOR_SLACK = 4  # accessors may materialise this many times the buffers' bytes (plus 1 MiB), at most
GLB_MAGIC, JSON_CHUNK, BIN_CHUNK = 0x46546C67, 0x4E4F534A, 0x004E4942
COMPRESSED = ("KHR_draco_mesh_compression", "EXT_meshopt_compression", "KHR_meshopt_compression")
COMPONENT_BYTES = {5120: 1, 5121: 1, 5122: 2, 5123: 2, 5125: 4, 5126: 4}
TYPE_SIZES = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT2": 4, "MAT3": 9, "MAT4": 16}
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

Sibling = Callable[[str], bytes]  # the bytes of a file beside the mesh, by a checked relative name


def safe_relative(uri: str) -> str | None:
    """``uri`` as a plain relative path inside the mesh's folder, or ``None`` when it may point elsewhere
    (a scheme, an absolute path, ``..``, a backslash or a NUL, after percent-decoding)."""
    name = unquote(uri)
    if not name or SCHEME.match(name) or name.startswith("/") or "\\" in name or "\x00" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _int(value: Any, what: str, source: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DataError(source, f"glTF {what} is {printable(value, 40)}, not an integer ≥ {low}")
    return value


def _items(doc: dict[str, Any], key: str, source: str) -> list[dict[str, Any]]:
    items = doc.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise DataError(source, f"glTF '{key}' is not a list of objects")
    return items


def _split_glb(data: bytes, source: str) -> tuple[bytes, bytes | None]:
    """The JSON chunk and the binary chunk (or None) of a GLB file, their lengths checked."""
    if len(data) < 20:
        raise DataError(source, f"not a GLB file ({len(data)} bytes)")
    magic, version, length = struct.unpack_from("<III", data, 0)
    if magic != GLB_MAGIC:
        raise DataError(source, "not a GLB file (no glTF magic)")
    if version != 2:
        raise DataError(source, f"GLB version {version}; only glTF 2 is read")
    if length > len(data):
        raise DataError(
            source, f"GLB header declares {length} bytes but the file has {len(data)} (truncated?)"
        )
    chunks: list[tuple[int, bytes]] = []
    pos = 12
    while pos + 8 <= length:
        size, kind = struct.unpack_from("<II", data, pos)
        if pos + 8 + size > length:
            raise DataError(
                source, f"GLB chunk at byte {pos} declares {size} bytes, beyond the file's {length}"
            )
        if kind == JSON_CHUNK and size > GLTF_JSON_BYTES:
            raise DataError(source, f"glTF JSON of {size} bytes (over {GLTF_JSON_BYTES // 1024**2} MiB)")
        chunks.append((kind, data[pos + 8 : pos + 8 + size]))
        pos += 8 + size
    if not chunks or chunks[0][0] != JSON_CHUNK:
        raise DataError(source, "GLB file without its JSON chunk first")
    binary = next((c for k, c in chunks[1:] if k == BIN_CHUNK), None)
    return chunks[0][1], binary


def _document(text: bytes, source: str) -> dict[str, Any]:
    if len(text) > GLTF_JSON_BYTES and not text.lstrip().startswith(b"{"):
        raise DataError(source, "not a glTF file")
    try:
        doc = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DataError(source, f"unreadable glTF JSON: {printable(err, 200)}") from None
    if not isinstance(doc, dict):
        raise DataError(source, "glTF JSON is not an object")
    version = str(doc.get("asset", {}).get("version", "")) if isinstance(doc.get("asset"), dict) else ""
    if not version.startswith("2"):
        raise DataError(source, f"glTF version {printable(version or 'missing', 20)}; only glTF 2 is read")
    required = doc.get("extensionsRequired", [])
    compressed = [e for e in required if e in COMPRESSED] if isinstance(required, list) else []
    if compressed:
        raise DataError(source, f"geometry compressed with {compressed[0]}, which this reader cannot decode")
    return doc


def _buffers(
    doc: dict[str, Any], binary: bytes | None, source: str, sibling: Sibling | None
) -> tuple[list[int], dict[str, bytes]]:
    """Every buffer's usable length, and the external files the library may ask for (by URI)."""
    lengths, files = [], {}
    for i, buf in enumerate(_items(doc, "buffers", source)):
        declared = _int(buf.get("byteLength"), f"buffers[{i}].byteLength", source)
        uri = buf.get("uri")
        if uri is None:
            if i != 0 or binary is None:
                raise DataError(source, f"glTF buffer {i} has no data (no uri, no GLB binary chunk)")
            held = len(binary)
        elif not isinstance(uri, str):
            raise DataError(source, f"glTF buffer {i} has a uri that is not text")
        elif uri.startswith("data:"):
            comma = uri.find("base64,")
            if comma < 0:
                raise DataError(source, f"glTF buffer {i}: a data: URI that is not base64")
            held = (len(uri) - comma - 7) * 3 // 4
        else:
            name = safe_relative(uri)
            if name is None:
                raise DataError(
                    source,
                    f"glTF buffer {i} points at {printable(uri, 80)!r}: only files in the mesh's own folder "
                    "(a plain relative name) or data: URIs are read",
                )
            if sibling is None:
                raise DataError(source, f"glTF buffer {i} is the separate file {printable(name, 80)!r}")
            files[uri] = sibling(name)
            held = len(files[uri])
        if declared > held:
            raise DataError(source, f"glTF buffer {i} declares {declared} bytes but holds {held}")
        lengths.append(declared)
    return lengths, files


def check_gltf(doc: dict[str, Any], lengths: list[int], source: str) -> None:
    """Buffer views inside their buffers, accessors inside their views, and a bound on what all accessors
    materialise, before the library allocates anything."""
    views = _items(doc, "bufferViews", source)
    for i, view in enumerate(views):
        buf = _int(view.get("buffer"), f"bufferViews[{i}].buffer", source)
        start = _int(view.get("byteOffset", 0), f"bufferViews[{i}].byteOffset", source)
        size = _int(view.get("byteLength"), f"bufferViews[{i}].byteLength", source)
        if buf >= len(lengths) or start + size > lengths[buf]:
            raise DataError(source, f"glTF buffer view {i} reaches beyond its buffer")
        if "byteStride" in view:
            _int(view["byteStride"], f"bufferViews[{i}].byteStride", source, low=1)
    total = 0
    for i, acc in enumerate(_items(doc, "accessors", source)):
        count = _int(acc.get("count"), f"accessors[{i}].count", source)
        item = COMPONENT_BYTES.get(acc.get("componentType", -1), 0) * TYPE_SIZES.get(str(acc.get("type")), 0)
        if item == 0:
            raise DataError(source, f"glTF accessor {i} has an unknown component type or type")
        total += count * item
        if "bufferView" not in acc or count == 0:
            continue
        v = _int(acc["bufferView"], f"accessors[{i}].bufferView", source)
        if v >= len(views):
            raise DataError(source, f"glTF accessor {i} names buffer view {v} of {len(views)}")
        stride = views[v].get("byteStride", item)
        need = (
            _int(acc.get("byteOffset", 0), f"accessors[{i}].byteOffset", source) + (count - 1) * stride + item
        )
        if need > views[v]["byteLength"]:
            raise DataError(
                source,
                f"glTF accessor {i} declares {count} items ({need} bytes) in a buffer view of "
                f"{views[v]['byteLength']} bytes",
            )
    check_nodes(doc, source)
    allowed = ACCESSOR_SLACK * sum(lengths) + 1024**2
    if total > allowed:
        raise DataError(
            source,
            f"glTF accessors claim {total} bytes, far more than the {sum(lengths)} bytes of its buffers",
        )


def check_nodes(doc: dict[str, Any], source: str) -> None:
    """The nodes form a forest (every child named once, by one parent, no cycle) at most
    :data:`GLTF_DEPTH` deep, of at most :data:`GLTF_NODES` nodes: the library resolves every node's world
    transform by a walk of the hierarchy, so a 65 KB chain of 2,000 nodes would take it 22 s."""
    nodes = _items(doc, "nodes", source)
    if len(nodes) > GLTF_NODES:
        raise DataError(source, f"glTF scene of {len(nodes)} nodes (over {GLTF_NODES})")
    children: list[list[int]] = []
    parents = [0] * len(nodes)
    for i, node in enumerate(nodes):
        kids = node.get("children", [])
        if not isinstance(kids, list):
            raise DataError(source, f"glTF nodes[{i}].children is not a list")
        kids = [_int(k, f"nodes[{i}].children", source) for k in kids]
        for k in kids:
            if k >= len(nodes):
                raise DataError(source, f"glTF node {i} names child {k} of {len(nodes)} nodes")
            parents[k] += 1
        children.append(kids)
    if any(p > 1 for p in parents):
        raise DataError(source, f"glTF node {parents.index(max(parents))} has more than one parent")
    reached, depth = 0, 0
    level = [i for i, p in enumerate(parents) if p == 0]
    while level:  # a root has no parent and every other node one: a walk from the roots ends
        depth += 1
        if depth > GLTF_DEPTH:
            raise DataError(source, f"glTF node hierarchy over {GLTF_DEPTH} levels deep")
        reached += len(level)
        level = [k for i in level for k in children[i]]
    if reached < len(nodes):
        raise DataError(source, "glTF nodes form a cycle (a node is its own ancestor)")


def read_gltf(
    data: bytes, suffix: str, source: str, sibling: Sibling | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(vertices [V, 3] float64, faces [F, 3] int64)`` of a GLB or glTF file, its scene flattened into
    world coordinates (unchecked: :func:`.mesh.check_mesh` checks them)."""
    import trimesh

    if suffix == ".glb":
        text, binary = _split_glb(data, source)
    else:
        text, binary = data, None
    doc = _document(text, source)
    lengths, files = _buffers(doc, binary, source, sibling)
    check_gltf(doc, lengths, source)
    try:
        scene = trimesh.load(
            io.BytesIO(data),
            file_type=suffix.lstrip("."),
            force="scene",
            process=False,
            skip_materials=True,
            resolver=files,  # only the checked buffers: nothing else can be opened
        )
    except DataError:
        raise
    except Exception as err:  # trimesh raises many types (ValueError, KeyError, AssertionError...)
        raise DataError(
            source, f"unreadable mesh: {printable(f'{type(err).__name__}: {err}', 300)}"
        ) from None
    return flatten(scene, source)


def flatten(scene: Any, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One mesh of every triangle mesh the scene places, each under its node's world transform."""
    import trimesh

    placed, names = [], []
    for node in scene.graph.nodes_geometry:
        transform, name = scene.graph[node]
        geometry = scene.geometry.get(name)
        if isinstance(geometry, trimesh.Trimesh) and len(geometry.faces):
            placed.append((np.asarray(transform, dtype=np.float64), geometry))
            names.append(str(name))
    faces_total = sum(len(g.faces) for _, g in placed)
    if faces_total > MESH_FACES:
        raise DataError(source, f"the scene places {faces_total} triangles (over {MESH_FACES})")
    if not placed:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    vertices, faces, offset = [], [], 0
    for (transform, g), name in zip(placed, names, strict=True):
        v = np.asarray(g.vertices, dtype=np.float64).reshape(-1, 3)
        f = np.asarray(g.faces, dtype=np.int64).reshape(-1, 3)
        if f.min() < 0 or f.max() >= len(v):
            raise DataError(source, f"face indices outside 0..{len(v) - 1} in mesh {printable(name, 60)!r}")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow shows as non-finite: named later
            vertices.append(v @ transform[:3, :3].T + transform[:3, 3])
        faces.append(f + offset)
        offset += len(v)
    return np.concatenate(vertices), np.concatenate(faces)
