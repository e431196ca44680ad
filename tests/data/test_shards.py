"""prepare → shards → manifest round trip; re-runs; atomic replacement; one test per class of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from crossmoco_ray.data.prepare.options import PrepareOptions
from crossmoco_ray.data.prepare.prepare import prepare
from crossmoco_ray.data.render.splat import RenderSpec, decode_png
from crossmoco_ray.data.shards.manifest import read_manifest
from crossmoco_ray.data.shards.verify import verify_shards
from crossmoco_ray.data.sources.formats import (
    FolderSource,
    H5Source,
    ShapeNetRenderSource,
    SyntheticSource,
    open_source,
)
from crossmoco_ray.errors import DataError
from tests.data import fixtures

SMALL = RenderSpec(azimuths=(0.0, 120.0, 240.0), size=24)


def opts(**kw: object) -> PrepareOptions:
    base: dict[str, object] = {"render": SMALL, "row_group_rows": 8, "rows_per_shard": 16}
    return PrepareOptions(**{**base, **kw})  # type: ignore[arg-type]


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
    with pytest.raises(DataError, match=r"train-00000\.parquet: 7 bytes, the manifest says \d+ \(truncated"):
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


# ---- rows in a seeded random order, whatever the source order (real datasets are class-sorted) ----


def class_sorted_h5(folder: Path, classes: int = 40, per_class: int = 15, points: int = 32) -> Path:
    """A ModelNet40-like train.h5 stored class by class (as the real one is), and a small test.h5."""
    folder.mkdir(parents=True, exist_ok=True)
    n = classes * per_class
    with h5py.File(folder / "train.h5", "w") as f:
        f["data"] = fixtures.clouds(n, points, 5)
        f["label"] = np.repeat(np.arange(classes), per_class).reshape(n, 1).astype(np.int64)
    with h5py.File(folder / "test.h5", "w") as f:
        f["data"] = fixtures.clouds(classes, points, 6)
        f["label"] = np.arange(classes).reshape(classes, 1).astype(np.int64)
    (folder / "shape_names.txt").write_text("\n".join(f"c{c}" for c in range(classes)) + "\n")
    return folder


def labels_in_file_order(root: Path, split: str) -> np.ndarray:
    manifest = read_manifest(str(root))
    return np.concatenate(
        [
            pq.read_table(root / f["path"]).column("label").to_numpy()
            for f in manifest["files"]
            if f["split"] == split
        ]
    )


def adjacent_equal(labels: np.ndarray) -> float:
    return float((labels[1:] == labels[:-1]).mean())


def test_class_sorted_source_is_written_mixed_and_reproducibly(tmp_path: Path) -> None:
    src = H5Source(class_sorted_h5(tmp_path / "mn"))
    assert adjacent_equal(np.array([s.label for s in src.samples("train")])) > 0.9  # the source: sorted
    manifest = prepare(src, str(tmp_path / "a"), opts(val_fraction=0.1, bucket_rows=50, rows_per_shard=64))
    train = labels_in_file_order(tmp_path / "a", "train")
    assert adjacent_equal(train) < 0.1  # i.i.d. order: 1/40
    assert manifest["order"] == {"shuffled": True, "seed": 0}
    assert sorted(train.tolist()) == sorted(
        lab for lab, n in enumerate(np.bincount(train, minlength=40)) for _ in range(n)
    )
    assert len(train) + manifest["counts"]["val"]["total"] == 600  # nothing lost or repeated
    ids = read_rows(tmp_path / "a", "train")["id"]
    assert len(set(ids)) == len(ids)
    # the same seed writes the same order; another seed another one
    prepare(src, str(tmp_path / "b"), opts(val_fraction=0.1, bucket_rows=50, rows_per_shard=64))
    assert read_rows(tmp_path / "b", "train")["id"] == ids
    prepare(src, str(tmp_path / "c"), opts(val_fraction=0.1, bucket_rows=50, rows_per_shard=64, seed=1))
    assert read_rows(tmp_path / "c", "train")["id"] != ids
    # points travel with their ids through the buckets
    by_id = {s.id: s.points for s in src.samples("train")}  # type: ignore[union-attr]
    for sid, pts in zip(ids, read_rows(tmp_path / "a", "train")["points"], strict=True):
        np.testing.assert_array_equal(pts, by_id[sid])


def test_no_shuffle_keeps_the_source_order(tmp_path: Path) -> None:
    src = H5Source(class_sorted_h5(tmp_path / "mn", classes=5, per_class=6))
    prepare(src, str(tmp_path / "out"), opts(shuffle=False))
    np.testing.assert_array_equal(labels_in_file_order(tmp_path / "out", "train"), np.repeat(np.arange(5), 6))


# ---- prepare's bad-input holes: each names the problem and counts what --skip-bad skipped ----


def test_skip_bad_survives_a_corrupt_h5_file_and_counts_its_loss(tmp_path: Path) -> None:
    root = fixtures.modelnet_h5(tmp_path / "mn", n_train=20, n_test=6)
    (root / "train_extra.h5").write_bytes((root / "train.h5").read_bytes()[:300])  # truncated: won't open
    src = H5Source(root)
    assert src.count("train") == 20  # counting no longer opens files outside the error handling
    manifest = prepare(src, str(tmp_path / "out"), opts(skip_bad=True))
    assert manifest["counts"]["train"]["total"] == 20
    report = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert [Path(r["source"]).name for r in report] == ["train_extra.h5"]
    assert "truncated or corrupt" in report[0]["problem"]
    with pytest.raises(DataError, match=r"train_extra\.h5: cannot open HDF5 file"):
        prepare(H5Source(root), str(tmp_path / "strict"), opts())


def test_a_file_without_labels_counts_all_its_rows_as_skipped(tmp_path: Path) -> None:
    root = fixtures.modelnet_h5(tmp_path / "mn", n_train=12, n_test=6)
    with h5py.File(root / "train_nolabel.h5", "w") as f:
        f["data"] = fixtures.clouds(9, 64, 7)
    manifest = prepare(H5Source(root), str(tmp_path / "out"), opts(skip_bad=True))
    assert manifest["skipped"] == 9
    report = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert report[0]["rows"] == 9
    assert "no 'label' dataset" in report[0]["problem"]
    assert "all 9 rows skipped" in report[0]["problem"]


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (np.tile(np.array([[0.3, -1.0, 2.0]], np.float32), (64, 1)), "all points are .*equal"),
        (np.outer(np.linspace(-1, 1, 64), [1.0, 2.0, -0.5]).astype(np.float32), "all points lie on one line"),
        (np.tile(np.array([[1000.0, 5.0, -7.0]], np.float32), (64, 1)), "all points are .*equal"),
    ],
    ids=["point", "line", "point-far-from-origin"],
)
def test_degenerate_clouds_are_rejected(tmp_path: Path, points: np.ndarray, message: str) -> None:
    root = bad_folder(tmp_path, "flat.npy", points)
    with pytest.raises(DataError, match=rf"flat\.npy.*: degenerate cloud: {message}"):
        prepare(FolderSource(root), str(tmp_path / "out"), opts())
    manifest = prepare(FolderSource(root), str(tmp_path / "skip"), opts(skip_bad=True))
    assert manifest["skipped"] == 1
    assert manifest["counts"]["train"]["total"] == 5


def test_a_planar_cloud_is_not_degenerate(tmp_path: Path) -> None:
    plane = fixtures.clouds(1, 64, 8)[0] * np.array([1.0, 0.0, 1.0], np.float32)  # a flat object is fine
    manifest = prepare(FolderSource(bad_folder(tmp_path, "sheet.npy", plane)), str(tmp_path / "o"), opts())
    assert manifest["counts"]["train"]["total"] == 6


def h5_with_labels(folder: Path, labels: list[float], dtype: str = "int64") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "train.h5", "w") as f:
        f["data"] = fixtures.clouds(len(labels), 32, 9)
        f["label"] = np.asarray(labels, dtype=dtype).reshape(-1, 1)
    return folder  # no shape_names.txt


@pytest.mark.parametrize(
    ("bad", "dtype", "message"),
    [
        (-3, "int64", r"\[index 4\]: label -3 is negative"),
        (-1, "int64", r"\[index 4\]: label -1 is negative.*-1 marks unlabelled"),
        (99, "int64", r"\[index 4\]: label 99 outside 0\.\.3; without .*shape_names\.txt the class count"),
        (2.5, "float32", r"\[index 4\]: label 2\.5 is not an integer"),
        (float("nan"), "float32", r"\[index 4\]: label nan is not an integer"),
    ],
    ids=["negative", "minus-one", "stray-99", "float", "nan"],
)
def test_labels_without_shape_names_are_checked(tmp_path: Path, bad: float, dtype: str, message: str) -> None:
    labels = [0, 1, 2, 0, bad, 1, 2, 0]
    root = h5_with_labels(tmp_path / "h5", labels, dtype)
    with pytest.raises(DataError, match=rf"train\.h5 {message}"):
        prepare(H5Source(root), str(tmp_path / "out"), opts())
    manifest = prepare(H5Source(root), str(tmp_path / "skip"), opts(skip_bad=True))
    assert manifest["skipped"] == 1
    assert manifest["counts"]["train"]["total"] == 7
    if bad == 99:  # the stray label made a 4th class that nothing else uses
        assert manifest["class_names"] == ["0", "1", "2", "3"]
    else:
        assert manifest["class_names"] == ["0", "1", "2"]


def test_integral_float_labels_are_accepted(tmp_path: Path) -> None:
    root = h5_with_labels(tmp_path / "h5", [0.0, 1.0, 2.0, 1.0], "float32")
    manifest = prepare(H5Source(root), str(tmp_path / "out"), opts())
    assert manifest["counts"]["train"]["per_class"] == {"0": 1, "1": 2, "2": 1}


def test_the_first_shuffle_pass_holds_about_bucket_rows_objects(tmp_path: Path) -> None:
    """Pass 1 buffers rows per bucket; with many buckets the buffers together stay near ``bucket_rows``."""
    from crossmoco_ray.data.prepare.shuffle import Buckets

    buckets = Buckets(str(tmp_path), "train", n=64, seed=0, bucket_rows=128)
    points = np.zeros((8, 3), np.float32)
    most = 0
    for i in range(2000):
        buckets.add(f"id{i}", i % 7, points, [])
        most = max(most, sum(len(b) for b in buckets.buffers))
    assert most <= 128
    assert buckets.rows == 2000


def test_the_built_in_sets_fingerprint_follows_its_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards of an older synthetic generator are never taken for the current one."""
    from crossmoco_ray.data.prepare.options import fingerprint
    from crossmoco_ray.data.sources import formats as readers

    src = SyntheticSource({"train": 10, "test": 4}, 64, seed=0)
    before = fingerprint(src, opts())
    monkeypatch.setattr(readers, "GENERATOR_VERSION", readers.GENERATOR_VERSION + 1)
    assert fingerprint(src, opts()) != before
    assert fingerprint(src, opts(bucket_rows=7)) != fingerprint(src, opts())
