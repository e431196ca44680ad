"""Triangle meshes in: reading OFF / OBJ / PLY / STL / GLB / glTF meshes, sampling points on their surface.

Reading uses `trimesh <https://trimesh.org>`_ (a well-kept, numpy-only library): it reads OFF, OBJ, PLY
with faces, STL (binary and ASCII) and glTF 2 (scenes flattened into world coordinates, textures ignored:
:mod:`.gltf`), triangulates polygons, concatenates multi-object OBJ files into one mesh, and copes with
ModelNet's known malformed OFF header (``OFF490 518 0``: the counts glued to the magic word on one line),
which a strict reader rejects. Meshes are read as stored (``process=False``: no vertex merging, no
repair), because nothing downstream needs a clean mesh: the rasteriser ignores windings and skips
degenerate triangles, and sampling never picks a zero-area triangle. What cannot serve is named as bad
input (:class:`DataError`): unreadable files, meshes without faces, non-finite vertices, coordinates beyond
:data:`.source.MAX_COORDINATE` (whose areas overflow), zero total area.

Files may be hostile, so the library gets bytes, not a path: an OBJ's ``mtllib`` (or a texture) naming
another file, say ``/dev/zero``, is never opened; a ``.gltf``'s external buffers are read by this module,
only from the file's own folder (:func:`folder_reader`). Headers that declare counts (OFF, PLY, binary STL,
GLB chunks, glTF accessors) are checked against the file's size first, and files over :data:`MESH_BYTES`
are refused. Callers that hold the bytes (files named by URI) use :func:`mesh_from_bytes`.

Points come from the surface: :func:`surface_points` draws them uniformly by area (seeded per object), with
optional farthest-point sampling from a denser draw (even spacing, as PointNet++'s ModelNet40 resampling).
"""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from crossmoco_ray.bounded import printable
from crossmoco_ray.data.sources.base import MAX_COORDINATE, regular_file
from crossmoco_ray.data.sources.gltf import Sibling, read_gltf
from crossmoco_ray.data.sources.ply_header import check_ply_claims, ply_face_count
from crossmoco_ray.data.synthetic.shapes import sample_mesh
from crossmoco_ray.errors import DataError

MESH_SUFFIXES = (
    ".off",
    ".obj",
    ".stl",
    ".glb",
    ".gltf",
)  # always meshes; a .ply is one when its header declares faces
FPS_OVERSAMPLE = 4  # farthest-point sampling picks n of this many times n area-uniform points
MESH_BYTES = 512 * 1024**2  # mesh files larger than this are refused (text parsing takes several times more)

Mesh = tuple[np.ndarray, np.ndarray]  # vertices [V, 3] float64, faces [F, 3] int64


def is_mesh_file(path: Path) -> bool:
    """Whether ``path`` holds a triangle mesh (OFF, OBJ, or a PLY whose header declares faces)."""
    suffix = path.suffix.lower()
    if suffix in MESH_SUFFIXES:
        return True
    return suffix == ".ply" and ply_face_count(path) > 0


def read_mesh(path: str | Path) -> Mesh:
    """``(vertices [V, 3] float64, faces [F, 3] int64)`` of an OFF, OBJ, PLY, STL, GLB or glTF mesh file.

    The file is read here and the library gets its bytes (:func:`mesh_from_bytes`); a ``.gltf``'s external
    buffers are read only from the file's own folder (:func:`folder_reader`).

    Raises:
        DataError: naming the file: unreadable or unparseable, no faces (an empty mesh), face indices
            out of range, non-finite vertices, or zero surface area.
    """
    source = printable(path)
    try:
        if Path(path).stat().st_size > MESH_BYTES:
            raise DataError(source, f"mesh file over {MESH_BYTES // 1024**2} MiB")
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(source, f"cannot read file ({printable(err.strerror or err)})") from None
    return mesh_from_bytes(data, Path(path).suffix.lower(), source, folder_reader(Path(path).parent, source))


def folder_reader(folder: Path, source: str) -> Sibling:
    """Reads a file of ``folder`` (or below it) by a relative name that :func:`.gltf.safe_relative` passed:
    a regular file whose real path (links followed) stays inside the folder, of at most :data:`MESH_BYTES`."""

    def read(name: str) -> bytes:
        base = os.path.realpath(folder)
        path = os.path.realpath(os.path.join(base, name))
        if not path.startswith(base + os.sep):
            raise DataError(source, f"{printable(name, 80)!r} leads outside the mesh's folder")
        if not regular_file(Path(path)):
            raise DataError(source, f"{printable(name, 80)!r} beside it is missing or not a regular file")
        try:
            if os.path.getsize(path) > MESH_BYTES:
                raise DataError(
                    source, f"{printable(name, 80)!r} beside it is over {MESH_BYTES // 1024**2} MiB"
                )
            return Path(path).read_bytes()
        except OSError as err:
            raise DataError(source, f"cannot read {printable(name, 80)!r} ({printable(err)})") from None

    return read


def mesh_from_bytes(data: bytes, suffix: str, source: str, sibling: Sibling | None = None) -> Mesh:
    """:func:`read_mesh` of a file's bytes: ``suffix`` (``.off``, ``.glb``...) says the format, ``source``
    names it in errors; ``sibling`` reads a ``.gltf``'s external buffers (none: they are refused)."""
    import trimesh  # imported here: only mesh sources need it

    if suffix == ".off":
        check_off_claims(data, source)
    elif suffix == ".ply":
        check_ply_claims(data, source)
    elif suffix == ".stl":
        check_stl_claims(data, source)
    if suffix in (".glb", ".gltf"):
        vertices, faces = read_gltf(data, suffix, source, sibling)
        return check_mesh(vertices, faces, source)
    try:
        # Bytes and no file name: the library has no folder to resolve other files in.
        loaded = trimesh.load(
            io.BytesIO(data), file_type=suffix.lstrip("."), force="mesh", process=False, skip_materials=True
        )
    except Exception as err:  # trimesh raises many types (ValueError, IndexError, KeyError...)
        raise DataError(
            source, f"unreadable mesh: {printable(f'{type(err).__name__}: {err}', 300)}"
        ) from None
    try:
        vertices = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))), dtype=np.float64).reshape(-1, 3)
        faces = np.asarray(getattr(loaded, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
    except (TypeError, ValueError) as err:  # what the library made of a damaged file is not a triangle mesh
        raise DataError(source, f"unreadable mesh: {printable(err, 300)}") from None
    return check_mesh(vertices, faces, source)


def check_stl_claims(data: bytes, source: str) -> None:
    """A binary STL (one that does not start with ``solid``) must hold the 50 bytes per triangle its header's
    count declares; ASCII STL is left to the reader."""
    if data[:5].lower() == b"solid":
        return
    if len(data) < 84:
        raise DataError(source, f"not an STL file ({len(data)} bytes: a binary STL has an 84-byte header)")
    count = struct.unpack_from("<I", data, 80)[0]
    need = 84 + 50 * count
    if need > len(data):
        raise DataError(
            source,
            f"binary STL header declares {count} triangles, which need {need} bytes, but the file has "
            f"{len(data)} (truncated, or a header that lies)",
        )


def check_off_claims(data: bytes, source: str) -> None:
    """Raise a :class:`DataError` when an OFF header's vertex and face counts need more bytes than the file
    holds (a vertex line takes at least 6, ``0 0 0``; a face line at least 2). Headers it cannot parse are
    left to the reader, which names them."""
    head = re.sub(rb"#[^\n]*", b"", data[: 1 << 16]).decode("latin-1")
    found = re.search(r"OFF", head)
    if found is None:
        return
    lines = [line.split() for line in head[found.end() :].splitlines()]
    counts = next((line for line in lines if line), [])
    # ASCII digits only (int() takes '١٢' and '1_0'); what is not a count is left to the reader.
    if len(counts) < 2 or not all(re.fullmatch(r"[+-]?[0-9]+", word) for word in counts[:2]):
        return
    vertices, faces = int(counts[0]), int(counts[1])
    if vertices < 0 or faces < 0:
        raise DataError(source, f"OFF header declares {vertices} vertices and {faces} faces")
    need = 6 * vertices + 2 * faces
    if need > len(data):
        raise DataError(
            source,
            f"OFF header declares {vertices} vertices and {faces} faces, which need at least {need} bytes, "
            f"but the file has {len(data)} (truncated, or a header that lies)",
        )


def check_mesh(vertices: np.ndarray, faces: np.ndarray, source: str) -> Mesh:
    """The mesh if it can be sampled and rendered, else a :class:`DataError` naming ``source``.

    Vertices that no face uses are dropped (faces re-indexed): the renderer frames every vertex, so a stray
    one (NaN, or far away) would fail the render or shrink the object to a dot.
    """
    if len(faces) == 0:
        what = "no vertices either" if len(vertices) == 0 else f"{len(vertices)} vertices"
        raise DataError(source, f"empty mesh: no faces ({what})")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise DataError(source, f"face indices outside 0..{len(vertices) - 1}")
    which = np.unique(faces)
    if len(which) < len(vertices):
        vertices, faces = vertices[which], np.searchsorted(which, faces)
    if not np.isfinite(vertices).all():
        raise DataError(source, "mesh has NaN or infinite vertex coordinates")
    largest = float(np.abs(vertices).max())
    if largest > MAX_COORDINATE:
        raise DataError(
            source,
            f"vertex coordinates reach {largest:.3g}, beyond ±{MAX_COORDINATE:.0e} (their areas and the "
            "normalisation of the points sampled on them overflow)",
        )
    area = float(triangle_areas(vertices, faces).sum())
    if not np.isfinite(area):
        raise DataError(source, "mesh surface area overflows")
    if area <= 0.0:
        raise DataError(source, f"mesh has zero surface area ({len(faces)} degenerate faces)")
    return vertices, faces


def triangle_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``[F]`` area of every triangle."""
    tri = vertices[faces]
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)


def surface_points(mesh: Mesh, n: int, key: str, seed: int, fps: bool = False) -> np.ndarray:
    """``[n, 3]`` float32 points on the mesh surface, uniform by area, seeded by ``(seed, key)``.

    ``fps``: draw ``FPS_OVERSAMPLE × n`` points and keep ``n`` of them by farthest-point sampling, which
    spaces points evenly (no clumps where the uniform draw happened to bunch up).
    """
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    vertices, faces = mesh
    if not fps:
        return sample_mesh(vertices, faces, n, rng).astype(np.float32)
    dense = sample_mesh(vertices, faces, FPS_OVERSAMPLE * n, rng)
    return dense[farthest_points(dense, n, start=int(rng.integers(len(dense))))].astype(np.float32)


def farthest_points(points: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """Indices ``[n]`` of a farthest-point subset of ``points [N, 3]``, beginning at ``start``.

    Each pick is the point farthest from those picked so far; O(N·n) time, O(N) memory.
    """
    if n > len(points):
        raise ValueError(f"cannot pick {n} of {len(points)} points")
    pts = np.asarray(points, dtype=np.float64)
    picked = np.empty(n, dtype=np.int64)
    picked[0] = start
    dist = ((pts - pts[start]) ** 2).sum(axis=1)
    for i in range(1, n):
        picked[i] = int(dist.argmax())
        dist = np.minimum(dist, ((pts - pts[picked[i]]) ** 2).sum(axis=1))
    return picked
