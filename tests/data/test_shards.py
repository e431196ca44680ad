"""prepare → shards → manifest round trip; re-runs; atomic replacement; one test per class of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from crossmoco_ray.data.readers import (
    FolderSource,
    H5Source,
    ShapeNetRenderSource,
    SyntheticSource,
    open_source,
)
from crossmoco_ray.data.render import RenderSpec, decode_png
from crossmoco_ray.data.shards import PrepareOptions, prepare, read_manifest, verify_shards
from crossmoco_ray.data.types import DataError
from tests.data import fixtures

SMALL = RenderSpec(azimuths=(0.0, 120.0, 240.0), size=24)


def opts(**kw: object) -> PrepareOptions:
    return PrepareOptions(render=SMALL, row_group_rows=8, rows_per_shard=16, **kw)  # type: ignore[arg-type]


def read_rows(root: Path, split: str) -> dict[str, list]:
    manifest = read_manifest(str(root))
    tables = [pq.read_table(root / f["path"]) for f in manifest["files"] if f["split"] == split]
    out: dict[str, list] = {col: [] for col in ("id", "label", "views")}
    for t in tables:
        for col in out:
            out[col] += t.column(col).to_pylist()
    points = np.concatenate([t.column("points").combine_chunks().to_numpy_ndarray() for t in tables])
    return {**out, "points": points}  # type: ignore[dict-item]


def test_synthetic_round_trip_with_val_carve_and_preview(tmp_path: Path) -> None:
    src = SyntheticSource({"train": 40, "test": 13}, num_points=48, seed=3)
    manifest = prepare(src, str(tmp_path / "out"), opts(val_fraction=0.25, preview=str(tmp_path / "p.png")))
    assert manifest["schema_version"] == 1
    assert manifest["num_points"] == 48
    assert manifest["views_per_object"] == 3
    counts = {s: c["total"] for s, c in manifest["counts"].items()}
    assert counts["train"] + counts["val"] == 40
    assert 3 <= counts["val"] <= 18
    assert counts["test"] == 13
    assert sum(manifest["counts"]["test"]["per_class"].values()) == 13
    train = read_rows(tmp_path / "out", "train")
    assert all(f["rows"] <= 16 for f in manifest["files"])
    assert len({f["path"] for f in manifest["files"] if f["split"] == "train"}) >= 2  # rotated at 16 rows
    # points equal the source; views decode to the rendered size
    by_id = {s.id: s for s in src.samples("train")}  # type: ignore[union-attr]
    for sid, pts in zip(train["id"], train["points"], strict=True):
        np.testing.assert_array_equal(pts, by_id[sid].points)
    assert decode_png(train["views"][0][0]).shape == (24, 24, 3)
    verify_shards(str(tmp_path / "out"))
    sheet = np.asarray(Image.open(tmp_path / "p.png"))
    assert sheet.shape[0] > 24
    assert sheet.std() > 10  # not blank
    # the carve is a function of (seed, id): the same again
    again = prepare(src, str(tmp_path / "again"), opts(val_fraction=0.25))
    assert again["counts"]["val"] == manifest["counts"]["val"]


def test_rerun_is_a_noop_and_a_different_dataset_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    src = SyntheticSource({"train": 20}, num_points=32)
    first = prepare(src, str(out), opts())
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prepare(src, str(out), opts()) == first
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    bigger = SyntheticSource({"train": 40}, num_points=32)
    with pytest.raises(DataError, match="--overwrite"):
        prepare(bigger, str(out), opts())
    small = prepare(SyntheticSource({"train": 4}, num_points=32), str(out), opts(overwrite=True))
    assert [f["path"] for f in small["files"]] == ["train-00000.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-00000.parquet"]  # stale gone


def test_file_uri_output(tmp_path: Path) -> None:
    prepare(SyntheticSource({"test": 5}, num_points=32), f"file://{tmp_path}/uri", opts())
    assert read_manifest(f"file://{tmp_path}/uri")["counts"]["test"]["total"] == 5


def test_shapenet_render_keeps_its_own_views(tmp_path: Path) -> None:
    src = ShapeNetRenderSource(fixtures.shapenet_render(tmp_path / "snr"))
    manifest = prepare(src, str(tmp_path / "out"), opts())
    assert manifest["rendered"] is False
    assert manifest["views_per_object"] == 3
    rows = read_rows(tmp_path / "out", "train")
    assert decode_png(rows["views"][0][1])[0, 0, 0] == 50  # the second PNG, as written


def test_resampling_makes_mixed_point_counts_one_size(tmp_path: Path) -> None:
    root = fixtures.point_folder(tmp_path / "pf", points=40)
    np.save(root / "table" / "f.npy", fixtures.clouds(1, 100)[0])
    with pytest.raises(DataError, match=r"f\.npy.*100 points where earlier clouds have 40.*--num-points"):
        prepare(FolderSource(root), str(tmp_path / "a"), opts())
    manifest = prepare(FolderSource(root), str(tmp_path / "b"), opts(num_points=64))
    assert manifest["num_points"] == 64


# ---- one test per class of bad input: the error names the file and, inside a file, the index ----


def bad_folder(tmp_path: Path, name: str, points: np.ndarray) -> Path:
    root = fixtures.point_folder(tmp_path / "pf")
    np.save(root / "chair" / name, points)
    return root


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (np.full((64, 3), np.nan, np.float32), "NaN or Inf at point 0"),
        (
            np.concatenate([np.zeros((5, 3)), [[np.inf, 0, 0]], np.zeros((58, 3))]).astype(np.float32),
            "point 5",
        ),
        (np.zeros((0, 3), np.float32), "empty point cloud"),
        (np.zeros((3, 3), np.float32), "only 3 points"),
        (np.zeros((64, 2), np.float32), r"\[N, 3\]"),
    ],
    ids=["nan", "inf", "empty", "too-small", "wrong-shape"],
)
def test_bad_points_are_named(tmp_path: Path, points: np.ndarray, message: str) -> None:
    root = bad_folder(tmp_path, "bad.npy", points)
    with pytest.raises(DataError, match=rf"bad\.npy.*{message}"):
        prepare(FolderSource(root), str(tmp_path / "out"), opts())
    assert not (tmp_path / "out" / "manifest.json").exists()  # nothing half-written is left as a dataset


def test_labels_out_of_range(tmp_path: Path) -> None:
    root = fixtures.modelnet_h5(tmp_path / "mn")
    with h5py.File(root / "test.h5", "r+") as f:
        f["label"][4] = 7  # 3 classes
    with pytest.raises(DataError, match=r"test\.h5 \[index 4\]: label 7 outside 0\.\.2"):
        prepare(H5Source(root), str(tmp_path / "out"), opts())


def test_duplicate_ids(tmp_path: Path) -> None:
    root = fixtures.modelnet_h5(tmp_path / "mn")
    with h5py.File(root / "test.h5", "r+") as f:
        f["name"][3] = b"test_0001"
    with pytest.raises(DataError, match=r"test\.h5 \[index 3\]: duplicate id 'test_0001'"):
        prepare(H5Source(root), str(tmp_path / "out"), opts())


def test_truncated_h5(tmp_path: Path) -> None:
    root = fixtures.modelnet_h5(tmp_path / "mn", n_train=400)
    data = (root / "train.h5").read_bytes()
    (root / "train.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train\.h5.*(truncated|corrupt)"):
        prepare(open_source(str(root), "modelnet40"), str(tmp_path / "out"), opts())


def test_truncated_ply(tmp_path: Path) -> None:
    root = fixtures.point_folder(tmp_path / "pf")
    ply = root / "chair" / "b.ply"
    ply.write_bytes(ply.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"b\.ply.*expected 64"):
        prepare(FolderSource(root), str(tmp_path / "out"), opts())


def test_unreadable_and_missing_images(tmp_path: Path) -> None:
    root = fixtures.shapenet_render(tmp_path / "snr")
    png = root / "ShapeNetRendering" / "03001627" / "model001" / "rendering" / "01.png"
    png.write_bytes(png.read_bytes()[:30])
    with pytest.raises(DataError, match=r"model001\.ply.*view 1 is not a readable image"):
        prepare(ShapeNetRenderSource(root), str(tmp_path / "a"), opts())
    for f in (root / "ShapeNetRendering" / "03001627" / "model001" / "rendering").glob("*.png"):
        f.unlink()
    with pytest.raises(DataError, match=r"model001\.ply: no rendered views"):
        prepare(ShapeNetRenderSource(root), str(tmp_path / "b"), opts())


def test_bad_manifest_and_schema_version(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare(SyntheticSource({"train": 4}, num_points=32), str(out), opts())
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(DataError, match=r"manifest\.json: schema version 99.*re-run `crossmoco prepare`"):
        read_manifest(str(out))
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json: unreadable manifest"):
        read_manifest(str(out))
    (out / "manifest.json").write_text(json.dumps({**manifest, "files": [{"path": "x.parquet"}]}))
    with pytest.raises(DataError, match=r"manifest\.json \[index 0\]: file entry needs"):
        read_manifest(str(out))
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "train-00000.parquet").write_bytes(b"changed")
    with pytest.raises(DataError, match=r"train-00000\.parquet: checksum differs"):
        verify_shards(str(out))
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(str(tmp_path / "elsewhere"))


def test_skip_bad_writes_a_report_and_keeps_the_rest(tmp_path: Path) -> None:
    root = bad_folder(tmp_path, "bad.npy", np.full((64, 3), np.nan, np.float32))
    np.save(root / "table" / "tiny.npy", np.zeros((2, 3), np.float32))
    manifest = prepare(FolderSource(root), str(tmp_path / "out"), opts(skip_bad=True))
    assert manifest["skipped"] == 2
    assert manifest["counts"]["train"]["total"] == 5
    report = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert sorted(Path(r["source"]).name for r in report) == ["bad.npy", "tiny.npy"]
    assert all(r["problem"] for r in report)
