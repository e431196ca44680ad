"""``prepare --store meshes``: the mesh cell format (and crafted cells), decimation to a budget, the shards
and manifest it writes, and that the default (renders) datasets keep their fingerprints."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import trimesh

from crossmoco_ray.data.prepare.decimate import decimated
from crossmoco_ray.data.prepare.options import PrepareOptions, fingerprint
from crossmoco_ray.data.prepare.prepare import prepare
from crossmoco_ray.data.render.camera import RenderSpec, normalise
from crossmoco_ray.data.render.raster import render_mesh
from crossmoco_ray.data.shards.manifest import read_manifest
from crossmoco_ray.data.shards.meshes import HEADER, MAGIC, MAX_MESH_FACES, decode_mesh, encode_mesh
from crossmoco_ray.data.shards.verify import verify_shards
from crossmoco_ray.data.sources.formats import FolderSource, SyntheticSource
from crossmoco_ray.errors import DataError
from tests.data import fixtures

SMALL = RenderSpec(azimuths=(0.0, 120.0, 240.0), size=24)


def opts(**kw: object) -> PrepareOptions:
    base: dict[str, object] = {"render": SMALL, "row_group_rows": 8, "rows_per_shard": 16}
    return PrepareOptions(**{**base, **kw})  # type: ignore[arg-type]


def test_cell_round_trip_is_normalised_float16_and_renders_alike() -> None:
    sphere = trimesh.creation.icosphere(subdivisions=2)
    verts = sphere.vertices * 7.0 + [3.0, -2.0, 10.0]  # raw units and position: normalised in the cell
    cell = encode_mesh(verts, sphere.faces)
    assert cell[:4] == MAGIC
    assert len(cell) == HEADER.size + len(verts) * 6 + len(sphere.faces) * 3 * 2
    v, f = decode_mesh(cell, "obj")
    assert v.dtype == np.float32
    assert f.dtype == np.int64
    np.testing.assert_array_equal(f, sphere.faces)
    np.testing.assert_allclose(v, normalise(verts), atol=1e-3)
    spec = RenderSpec(size=64)
    a, b = render_mesh(verts, sphere.faces, spec), render_mesh(v, f, spec)
    assert np.mean(np.abs(a.astype(int) - b.astype(int)) > 2) < 0.01  # the same images, within rounding


def test_large_meshes_use_32_bit_indices() -> None:
    grid = trimesh.creation.icosphere(subdivisions=7)  # 163,842 vertices: over 16 bits
    cell = encode_mesh(grid.vertices, grid.faces)
    assert HEADER.unpack_from(cell)[3] == 4
    np.testing.assert_array_equal(decode_mesh(cell, "big")[1], grid.faces)


@pytest.mark.parametrize(
    ("mutate", "says"),
    [
        (lambda c: c[:10], "shorter than its header"),
        (lambda c: b"XXXX" + c[4:], "no CMM1 header"),
        (lambda c: c[:-1], "its counts need"),
        (lambda c: c + b"\0", "its counts need"),
        (lambda c: HEADER.pack(MAGIC, 3, MAX_MESH_FACES + 1, 2) + c[HEADER.size :], "over bounds"),
        (lambda c: HEADER.pack(MAGIC, 3, 1, 3) + c[HEADER.size :], "over bounds"),
        (lambda c: c[:-2] + struct.pack("<H", 3), "beyond its 3 vertices"),
        (lambda c: HEADER.pack(MAGIC, 3, 0, 2) + c[HEADER.size : HEADER.size + 18], "no surface"),
        (lambda c: c[: HEADER.size] + np.full(9, np.nan, "<f2").tobytes() + c[HEADER.size + 18 :], "finite"),
        (
            lambda c: c[: HEADER.size] + np.full(9, 60.0, "<f2").tobytes() + c[HEADER.size + 18 :],
            "normalised",
        ),
    ],
)
def test_crafted_cells_are_named(mutate: object, says: str) -> None:
    cell = encode_mesh(np.eye(3), np.array([[0, 1, 2]]))
    with pytest.raises(DataError, match=says) as err:
        decode_mesh(mutate(cell), "chair_0001")  # type: ignore[operator]
    assert "chair_0001" in str(err.value)


def test_decimation_keeps_meshes_within_budget_and_the_shape() -> None:
    sphere = trimesh.creation.icosphere(subdivisions=5)  # 20,480 faces
    small = (sphere.vertices, sphere.faces[:100])
    kept = decimated(small, 1000)
    assert kept[0] is small[0]
    assert kept[1] is small[1]
    v, f = decimated((sphere.vertices, sphere.faces), 1000)
    assert 900 <= len(f) <= 1000
    assert f.max() < len(v)
    radius = np.linalg.norm(v, axis=1)
    assert radius.min() > 0.95
    assert radius.max() < 1.01


def test_prepare_store_meshes_writes_meshes_and_no_renders(tmp_path: Path) -> None:
    src = SyntheticSource({"train": 24, "test": 6}, num_points=64, seed=1)
    out = tmp_path / "shards"
    manifest = prepare(src, str(out), opts(store="meshes", mesh_faces=200, preview=str(tmp_path / "p.png")))
    assert manifest["meshes"] is True
    assert manifest["store"] == "meshes"
    assert manifest["views_per_object"] == 0
    assert (tmp_path / "p.png").stat().st_size > 0  # the preview renders from the stored meshes
    table = pq.read_table(out / manifest["files"][0]["path"])
    assert table.column("views").to_pylist()[0] == []
    faces = [len(decode_mesh(c, "x")[1]) for c in table.column("mesh").to_pylist()]
    assert 100 < np.median(faces) <= 200  # decimated to the budget where the parts allow
    verify_shards(str(out))
    assert read_manifest(str(out))["meshes"] is True


def test_prepare_store_both_keeps_renders_beside_meshes(tmp_path: Path) -> None:
    root = fixtures.mesh_folder(tmp_path / "meshes")
    manifest = prepare(FolderSource(root), str(tmp_path / "out"), opts(store="both"))
    assert manifest["meshes"] is True
    assert manifest["views_per_object"] == 3
    table = pq.read_table(tmp_path / "out" / manifest["files"][0]["path"])
    assert all(c is not None for c in table.column("mesh").to_pylist())


def test_point_sources_store_no_mesh_column_and_no_renders(tmp_path: Path) -> None:
    root = fixtures.point_folder(tmp_path / "points")
    manifest = prepare(FolderSource(root), str(tmp_path / "out"), opts(store="meshes"))
    assert manifest["meshes"] is False
    assert manifest["views_per_object"] == 0
    assert "mesh" not in pq.read_schema(tmp_path / "out" / manifest["files"][0]["path"]).names


def test_default_store_keeps_earlier_fingerprints() -> None:
    src = SyntheticSource({"train": 4}, num_points=16)
    # The fingerprint of these options before --store existed (re-running prepare stays a no-op).
    assert fingerprint(src, PrepareOptions()) == fingerprint(src, PrepareOptions(store="renders"))
    assert fingerprint(src, PrepareOptions()) != fingerprint(src, PrepareOptions(store="meshes"))
    with pytest.raises(ValueError, match="store"):
        PrepareOptions(store="pngs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mesh_faces"):
        PrepareOptions(mesh_faces=2)


def test_a_crafted_cell_in_a_sealed_dataset_is_named_by_verify_and_by_training(tmp_path: Path) -> None:
    """A dataset whose digests and seal were recomputed after a mesh cell was replaced (a crafted dataset,
    not a damaged one): the digests pass, the cell's own checks name the object."""
    import json

    import pyarrow as pa
    import pyarrow.fs as pafs

    from crossmoco_ray.data.pipeline.batches import PipelineOptions, iter_local_batches
    from crossmoco_ray.data.render.viewpoints import Viewpoints
    from crossmoco_ray.data.shards.integrity import file_digests
    from crossmoco_ray.data.shards.manifest import seal

    root = tmp_path / "shards"
    src = SyntheticSource({"train": 8}, num_points=32, seed=1)
    prepare(src, str(root), opts(store="meshes", shuffle=False, row_group_rows=8, rows_per_shard=8))
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["files"][0]
    path = root / entry["path"]
    table = pq.read_table(path)
    cells = table.column("mesh").to_pylist()
    victim = table.column("id").to_pylist()[3]
    cells[3] = cells[3][:-6] + struct.pack("<3H", 60000, 60000, 60000)  # a face far beyond the vertices
    table = table.set_column(table.schema.get_field_index("mesh"), "mesh", pa.array(cells, pa.binary()))
    pq.write_table(table, path, compression="zstd", row_group_size=8)
    entry.update(file_digests(pafs.LocalFileSystem(), str(path)))
    manifest.pop("manifest_sha256", None)
    (root / "manifest.json").write_text(json.dumps(seal(manifest)))

    with pytest.raises(DataError, match=f"{victim}.*beyond its"):
        verify_shards(str(root))
    o = PipelineOptions(num_points=32, image_size=16, seed=0, viewpoints=Viewpoints(spec=RenderSpec(size=16)))
    with pytest.raises(DataError, match=f"{victim}.*beyond its"):
        list(iter_local_batches(str(root), "train", o, batch_size=4))
