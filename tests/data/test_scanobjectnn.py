"""ScanObjectNN's variants in its official file names: a directory that mixes them is an error that lists
them, and ``variant`` picks exactly one (small h5 files written under the release's names and folders)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from crossmoco_ray.data.sources.formats import detect_format, open_source
from crossmoco_ray.data.sources.hdf5 import scanobjectnn_variant
from crossmoco_ray.data.sources.variants import SCANOBJECTNN_VARIANTS
from crossmoco_ray.errors import DataError

STEMS = {"obj": "objectdataset", "pb_t50_rs": "objectdataset_augmentedrot_scale75"}


def write(path: Path, rows: int, fill: float) -> None:
    """One file as the release stores it: ``data`` [N, 2048, 3] float32, ``label`` [N] (1-D), ``mask``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(rows)
    with h5py.File(path, "w") as f:
        f["data"] = (rng.standard_normal((rows, 64, 3)) * 0.1 + fill).astype(np.float32)
        f["label"] = (np.arange(rows) % 15).astype(np.int64)
        f["mask"] = np.zeros((rows, 64), np.int64)


@pytest.fixture
def h5_files(tmp_path: Path) -> Path:
    """``h5_files/main_split{,_nobg}/`` with OBJ_BG / OBJ_ONLY and PB_T50_RS, each its own row counts."""
    root = tmp_path / "h5_files"
    for folder, offset in (("main_split", 0.0), ("main_split_nobg", 10.0)):
        write(root / folder / "training_objectdataset.h5", 6, offset + 1)
        write(root / folder / "test_objectdataset.h5", 3, offset + 1)
        write(root / folder / "training_objectdataset_augmentedrot_scale75.h5", 8, offset + 2)
        write(root / folder / "test_objectdataset_augmentedrot_scale75.h5", 4, offset + 2)
    return root


def first_point(src, split: str) -> float:  # type: ignore[no-untyped-def]
    item = next(iter(src.samples(split)))
    assert not isinstance(item, DataError)
    return float(item.points.mean())


def test_variant_names_follow_the_release() -> None:
    assert scanobjectnn_variant(Path("main_split/training_objectdataset.h5")) == "obj_bg"
    assert scanobjectnn_variant(Path("main_split_nobg/test_objectdataset.h5")) == "obj_only"
    assert scanobjectnn_variant(Path("main_split/test_objectdataset_augmentedrot_scale75.h5")) == "pb_t50_rs"
    assert scanobjectnn_variant(Path("main_split_nobg/test_objectdataset_augmentedrot_scale75.h5")) == (
        "pb_t50_rs_nobg"
    )
    assert scanobjectnn_variant(Path("main_split/train.h5")) is None  # CrossPoint's renamed copy
    assert {"obj_bg", "obj_only", "pb_t50_rs"} <= set(SCANOBJECTNN_VARIANTS)


def test_a_directory_of_two_variants_fails_with_the_list(h5_files: Path) -> None:
    with pytest.raises(DataError) as err:
        open_source(str(h5_files / "main_split"))
    msg = str(err.value)
    assert "obj_bg: test_objectdataset.h5, training_objectdataset.h5" in msg  # each variant's files, sorted
    pb = "objectdataset_augmentedrot_scale75.h5"
    assert f"pb_t50_rs: test_{pb}, training_{pb}" in msg
    assert "--variant (obj_bg | pb_t50_rs)" in msg


@pytest.mark.parametrize(
    ("folder", "variant", "train", "test", "level"),
    [
        ("main_split", "obj_bg", 6, 3, 1.0),
        ("main_split", "pb_t50_rs", 8, 4, 2.0),
        ("main_split_nobg", "obj_only", 6, 3, 11.0),
        ("main_split_nobg", "pb_t50_rs_nobg", 8, 4, 12.0),
        ("", "obj_only", 6, 3, 11.0),  # h5_files/ itself: the variant picks the folder
        ("", "pb_t50_rs", 8, 4, 2.0),
    ],
)
def test_variant_picks_exactly_one(
    h5_files: Path, folder: str, variant: str, train: int, test: int, level: float
) -> None:
    spec = str(h5_files / folder) if folder else str(h5_files)
    assert detect_format(spec) == "scanobjectnn"
    src = open_source(spec, variant=variant)
    assert src.count("train") == train
    assert src.count("test") == test
    assert first_point(src, "train") == pytest.approx(level, abs=0.1)
    assert src.class_names() is not None
    assert len(src.class_names() or []) == 15
    assert src.identity()["variant"] == variant


def test_the_wrong_folder_for_a_variant_says_where_it_is(h5_files: Path) -> None:
    with pytest.raises(
        DataError, match=r"no files of ScanObjectNN variant obj_only here .* main_split_nobg/"
    ):
        open_source(str(h5_files / "main_split"), variant="obj_only")
    with pytest.raises(DataError, match=r"holds main_split/ .* and main_split_nobg/"):
        open_source(str(h5_files))


def test_unknown_variant_and_non_h5_sources(h5_files: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"unknown ScanObjectNN variant 'pb_t50'; choose one of obj_bg, obj_only"
    ):
        open_source(str(h5_files / "main_split"), variant="pb_t50")
    with pytest.raises(ValueError, match=r"--variant picks a ScanObjectNN variant among h5 files"):
        open_source("synthetic", variant="obj_bg")


def test_crosspoint_renamed_files_need_no_variant(tmp_path: Path) -> None:
    write(tmp_path / "main_split" / "train.h5", 5, 1.0)
    write(tmp_path / "main_split" / "test.h5", 2, 1.0)
    src = open_source(str(tmp_path / "main_split"))
    assert (src.count("train"), src.count("test")) == (5, 2)
    assert "variant" not in src.identity()


def test_the_schema_knows_the_same_variants() -> None:
    from typing import get_args

    from crossmoco_ray.config.schema import ScanObjectNNVariant

    assert get_args(ScanObjectNNVariant) == SCANOBJECTNN_VARIANTS


def test_prepare_and_eval_take_the_variant(h5_files: Path, tmp_path: Path, capsys) -> None:
    """`crossmoco prepare` on main_split/: without --variant, the listing and exit 2; with it, that variant's
    rows. `crossmoco eval svm` reads the same variant (random-init encoder, tiny sizes)."""
    import json

    from crossmoco_ray.cli.main import main

    split = str(h5_files / "main_split")
    assert main(["prepare", split, "--out", str(tmp_path / "mixed"), "--render-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "holds several ScanObjectNN variants" in err
    assert "--variant (obj_bg | pb_t50_rs)" in err
    out = tmp_path / "pb"
    assert main(["prepare", split, "--variant", "pb_t50_rs", "--out", str(out), "--render-size", "16"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s: c["total"] for s, c in manifest["counts"].items()} == {"train": 8, "test": 4}
    code = main(
        ["eval", "svm", "--data", split, "--variant", "obj_bg", "--num-points", "64", "--k", "4",
         "--emb-dims", "16", "--protocol", "crosspoint", "--no-plots", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    assert "random-init" in capsys.readouterr().out


def test_eval_knn_reads_a_variant_and_reports_both_encoders(h5_files: Path, tmp_path: Path, capsys) -> None:
    import json

    from crossmoco_ray.cli.main import main

    args = ["eval", "knn", "--data", str(h5_files), "--variant", "pb_t50_rs", "--num-points", "64",
            "--k", "4", "--emb-dims", "16", "--knn-k", "1,3", "--device", "cpu",
            "--out", str(tmp_path / "knn")]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| random-init | 1 |" in table
    assert "| random-init | 3 |" in table
    report = json.loads((tmp_path / "knn" / "report.json").read_text())
    assert report["command"] == "knn"
    assert report["data"]["variant"] == "pb_t50_rs"
    r = report["results"]["random-init"]["k=1"]
    assert 0.0 <= r["overall_acc"] <= 1.0
    assert 0.0 <= r["mean_class_acc"] <= 1.0
