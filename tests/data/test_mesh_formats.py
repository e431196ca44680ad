"""GLB / glTF and STL meshes: scenes flattened into world coordinates, textures ignored, and hostile files
(lying headers and counts, buffers outside the folder, non-finite or faceless meshes) named as bad input."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trimesh
from PIL import Image

from crossmoco_ray.data.sources import gltf
from crossmoco_ray.data.sources.mesh import mesh_from_bytes, read_mesh
from crossmoco_ray.errors import DataError

tf = trimesh.transformations


def box_scene() -> tuple[trimesh.Scene, np.ndarray]:
    """Three boxes: one translated, one rotated and scaled, one the child of the rotated one (transforms
    compose); and the world-space vertices of all three, computed here."""
    box = trimesh.creation.box(extents=(1.0, 2.0, 3.0))
    scene = trimesh.Scene()
    moved = tf.translation_matrix([10.0, 0.0, 0.0])
    turned = tf.concatenate_matrices(
        tf.translation_matrix([0.0, 5.0, 0.0]), tf.rotation_matrix(np.pi / 2, [0, 0, 1]), tf.scale_matrix(2.0)
    )
    child = tf.translation_matrix([0.0, 0.0, 1.0])
    scene.add_geometry(box, node_name="moved", geom_name="a", transform=moved)
    scene.add_geometry(box, node_name="turned", geom_name="b", transform=turned)
    scene.add_geometry(box, node_name="child", geom_name="c", parent_node_name="turned", transform=child)
    world = [trimesh.transform_points(box.vertices, m) for m in (moved, turned, turned @ child)]
    return scene, np.concatenate(world)


def same_points(a: np.ndarray, b: np.ndarray) -> bool:
    key = lambda v: np.round(v, 5)[np.lexsort(np.round(v, 5).T)]  # noqa: E731
    return a.shape == b.shape and np.allclose(key(a), key(b), atol=1e-5)


def split_glb(data: bytes) -> tuple[dict[str, Any], bytes]:
    size = struct.unpack_from("<I", data, 12)[0]
    doc = json.loads(data[20 : 20 + size])
    return doc, data[20 + size + 8 :]


def make_glb(doc: dict[str, Any], binary: bytes) -> bytes:
    text = json.dumps(doc).encode()
    text += b" " * (-len(text) % 4)
    binary += b"\0" * (-len(binary) % 4)
    body = (
        struct.pack("<II", len(text), gltf.JSON_CHUNK)
        + text
        + struct.pack("<II", len(binary), gltf.BIN_CHUNK)
    )
    body += binary
    return struct.pack("<III", gltf.GLB_MAGIC, 2, 12 + len(body)) + body


def test_a_glb_scene_is_one_mesh_in_world_coordinates() -> None:
    scene, world = box_scene()
    vertices, faces = mesh_from_bytes(scene.export(file_type="glb"), ".glb", "scene.glb")
    assert same_points(vertices, world)
    assert faces.shape == (36, 3)
    assert vertices[:, 0].max() == pytest.approx(10.5)  # the translated box
    assert vertices[:, 1].max() == pytest.approx(5.0 + 1.0)  # turned 90° about z, scaled 2: x half-extent → y
    assert vertices[:, 2].max() == pytest.approx(2.0 + 3.0)  # the child: its z offset scaled by its parent


def test_gltf_with_external_buffers_reads_from_its_own_folder(tmp_path: Path) -> None:
    scene, world = box_scene()
    for name, data in scene.export(file_type="gltf").items():
        (tmp_path / name).write_bytes(data)
    vertices, _ = read_mesh(tmp_path / "model.gltf")
    assert same_points(vertices, world)


def test_a_textured_glb_reads_as_geometry() -> None:
    box = trimesh.creation.box()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    uv = np.random.default_rng(1).random((len(box.vertices), 2))
    box.visual = trimesh.visual.TextureVisuals(uv=uv, image=image)
    data = box.export(file_type="glb")
    assert b"image/png" in data  # the texture is in the file
    vertices, faces = mesh_from_bytes(data, ".glb", "textured.glb")
    assert same_points(vertices, np.asarray(box.vertices))
    assert len(faces) == 12


@pytest.mark.parametrize("kind", ["stl", "stl_ascii"])
def test_stl_binary_and_ascii(tmp_path: Path, kind: str) -> None:
    box = trimesh.creation.box(extents=(1.0, 2.0, 3.0))
    data = box.export(file_type=kind)
    (tmp_path / "box.stl").write_bytes(data if isinstance(data, bytes) else data.encode())
    vertices, faces = read_mesh(tmp_path / "box.stl")
    assert len(faces) == 12
    assert np.allclose(vertices.max(axis=0), [0.5, 1.0, 1.5])


# ------------------------------------------------------------------------------------------------ hostile


def glb_variant(change: str) -> bytes:
    """A one-box GLB, damaged as ``change`` says."""
    doc, binary = split_glb(trimesh.creation.box().export(file_type="glb"))
    if change == "accessor_count":
        doc["accessors"][0]["count"] = 10**9
    elif change == "bufferless":
        doc["accessors"].append({"componentType": 5126, "type": "MAT4", "count": 10**8})
    elif change == "view_beyond_buffer":
        doc["bufferViews"][0]["byteLength"] = 10**9
    elif change == "buffer_claims":
        doc["buffers"][0]["byteLength"] = 10**9
    elif change == "draco":
        doc["extensionsRequired"] = ["KHR_draco_mesh_compression"]
    elif change == "no_faces":
        for prim in doc["meshes"][0]["primitives"]:
            prim["mode"] = 0  # points
    elif change == "nan":
        positions = doc["accessors"][doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
        view = doc["bufferViews"][positions["bufferView"]]
        start = view.get("byteOffset", 0) + positions.get("byteOffset", 0)
        binary = binary[:start] + np.float32([np.nan] * 3).tobytes() + binary[start + 12 :]
    elif change == "absolute_uri":
        doc["buffers"][0]["uri"] = "/dev/zero"
    elif change == "node_cycle":
        doc["nodes"] += [{"children": [2]}, {"children": [1]}]
    elif change == "two_parents":
        doc["nodes"] += [{"children": [0]}, {"children": [0]}]
    elif change == "child_missing":
        doc["nodes"][0]["children"] = [7]
    elif change.startswith("depth_"):  # the mesh's node below a chain of this many levels in all
        above = int(change.removeprefix("depth_")) - 1
        doc["nodes"] += [{"children": [i + 2 if i + 1 < above else 0]} for i in range(above)]
        doc["scenes"][0]["nodes"] = [1]
    return make_glb(doc, binary)


GOOD = trimesh.creation.box().export(file_type="glb")
HOSTILE_GLB = {
    "truncated": (GOOD[: len(GOOD) // 2], "GLB header declares"),
    "short": (GOOD[:10], "not a GLB file"),
    "chunk_beyond": (GOOD[:12] + struct.pack("<II", 10**9, gltf.JSON_CHUNK) + GOOD[20:], "beyond the file"),
    "not_json": (make_glb({"asset": 1}, b"")[:20] + b"\xff" * 8 + b"", "GLB"),
    "accessor_count": (glb_variant("accessor_count"), "declares 1000000000 items"),
    "bufferless": (glb_variant("bufferless"), "accessors claim"),
    "view_beyond_buffer": (glb_variant("view_beyond_buffer"), "buffer view 0 reaches beyond"),
    "buffer_claims": (glb_variant("buffer_claims"), "declares 1000000000 bytes but holds"),
    "draco": (glb_variant("draco"), "compressed with KHR_draco_mesh_compression"),
    "no_faces": (glb_variant("no_faces"), "empty mesh: no faces"),
    "nan": (glb_variant("nan"), "NaN or infinite"),
    "absolute_uri": (glb_variant("absolute_uri"), "only files in the mesh's own folder"),
    "version_1": (GOOD[:4] + struct.pack("<I", 1) + GOOD[8:], "GLB version 1"),
    "node_cycle": (glb_variant("node_cycle"), "nodes form a cycle"),
    "two_parents": (glb_variant("two_parents"), "node 0 has more than one parent"),
    "child_missing": (glb_variant("child_missing"), "names child 7 of 1 nodes"),
    "too_deep": (glb_variant(f"depth_{gltf.GLTF_DEPTH + 1}"), f"over {gltf.GLTF_DEPTH} levels deep"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_GLB))
def test_hostile_glb_is_named(name: str) -> None:
    data, problem = HOSTILE_GLB[name]
    with pytest.raises(DataError, match=problem) as err:
        mesh_from_bytes(data, ".glb", f"{name}.glb")
    assert f"{name}.glb" in str(err.value)


def test_an_absurd_json_chunk_is_refused_by_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gltf, "GLTF_JSON_BYTES", 64)
    with pytest.raises(DataError, match=r"glTF JSON of .* bytes"):
        mesh_from_bytes(GOOD, ".glb", "big.glb")


def test_a_hierarchy_at_the_depth_bound_reads_and_a_scene_over_the_node_bound_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The library walks the hierarchy for every node (a 65 KB chain of 2,000 nodes took it 22 s): depth and
    node count are bounded before it parses, and a scene at the bound still reads."""
    vertices, faces = mesh_from_bytes(glb_variant(f"depth_{gltf.GLTF_DEPTH}"), ".glb", "deep.glb")
    assert faces.shape == (12, 3)
    assert same_points(vertices, np.asarray(trimesh.creation.box().vertices))
    monkeypatch.setattr(gltf, "GLTF_NODES", 2)
    with pytest.raises(DataError, match=r"wide\.glb: glTF scene of 3 nodes \(over 2\)"):
        mesh_from_bytes(glb_variant("depth_3"), ".glb", "wide.glb")


def test_a_scene_that_instances_too_many_triangles_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    scene, _ = box_scene()
    monkeypatch.setattr(gltf, "MESH_FACES", 30)
    with pytest.raises(DataError, match="places 36 triangles"):
        mesh_from_bytes(scene.export(file_type="glb"), ".glb", "many.glb")


@pytest.mark.parametrize(
    "uri",
    [
        "/dev/zero",
        "../outside.bin",
        "sub/../../outside.bin",
        "%2e%2e/outside.bin",
        "file:///dev/zero",
        "http://example.com/x.bin",
        "..\\outside.bin",
        "link.bin",  # a link inside the folder to a file outside it
    ],
)
def test_gltf_buffers_outside_the_folder_are_never_opened(tmp_path: Path, uri: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    files = trimesh.creation.box().export(file_type="gltf")
    (tmp_path / "outside.bin").write_bytes(files["gltf_buffer_0.bin"])  # what an escape would find
    os.symlink(tmp_path / "outside.bin", folder / "link.bin")
    doc = json.loads(files["model.gltf"])
    doc["buffers"][0]["uri"] = uri
    (folder / "model.gltf").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"own folder|outside the mesh's folder") as err:
        read_mesh(folder / "model.gltf")
    assert "model.gltf" in str(err.value)


def test_gltf_data_uris_and_sub_folders_are_read(tmp_path: Path) -> None:
    import base64

    files = trimesh.creation.box().export(file_type="gltf")
    doc = json.loads(files["model.gltf"])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "b.bin").write_bytes(files["gltf_buffer_0.bin"])
    (tmp_path / "gltf_buffer_1.bin").write_bytes(files["gltf_buffer_1.bin"])
    doc["buffers"][0]["uri"] = "bin/b.bin"
    (tmp_path / "sub.gltf").write_text(json.dumps(doc))
    doc["buffers"][0]["uri"] = "data:application/octet-stream;base64," + base64.b64encode(
        files["gltf_buffer_0.bin"]
    ).decode("ascii")
    (tmp_path / "inline.gltf").write_text(json.dumps(doc))
    for name in ("sub.gltf", "inline.gltf"):
        assert read_mesh(tmp_path / name)[1].shape == (12, 3)
    doc["buffers"][0]["uri"] = "missing.bin"
    (tmp_path / "missing.gltf").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"missing\.bin"):
        read_mesh(tmp_path / "missing.gltf")


def test_binary_stl_whose_header_lies() -> None:
    data = trimesh.creation.box().export(file_type="stl")
    lying = data[:80] + struct.pack("<I", 10**8) + data[84:]
    with pytest.raises(DataError, match="declares 100000000 triangles"):
        mesh_from_bytes(lying, ".stl", "lying.stl")
    with pytest.raises(DataError, match="not an STL file"):
        mesh_from_bytes(b"\x00" * 20, ".stl", "tiny.stl")
