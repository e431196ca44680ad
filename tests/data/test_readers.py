"""Readers on fixtures written in the real formats, and on the real ModelNet40 when it is present."""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from crossmoco_ray.bounded import printable
from crossmoco_ray.data.sources.base import Source
from crossmoco_ray.data.sources.folders import points_from_bytes
from crossmoco_ray.data.sources.formats import (
    H5Source,
    SyntheticSource,
    detect_format,
    open_source,
    read_point_file,
    to_y_up,
)
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.errors import DataError
from tests.conftest import MODELNET40
from tests.data import fixtures


def samples(source, split: str) -> list[Sample]:  # type: ignore[no-untyped-def]
    out = []
    for item in source.samples(split):
        if isinstance(item, DataError):
            raise item
        out.append(item)
    return out


def test_modelnet40_h5(tmp_path: Path) -> None:
    root = fixtures.modelnet_h5(tmp_path / "mn")
    assert detect_format(str(root)) == "modelnet40"
    src = open_source(str(root))
    assert src.splits() == ["train", "test"]
    assert src.class_names() == ["class0", "class1", "class2"]
    assert src.count("train") == 12
    train = samples(src, "train")
    assert [s.id for s in train[:2]] == ["train_0000", "train_0001"]
    assert [s.label for s in train[:4]] == [0, 1, 2, 0]
    np.testing.assert_array_equal(train[5].points, fixtures.clouds(12, 64, 0)[5])
    assert train[5].source.endswith("train.h5")
    assert train[5].index == 5
    assert train[5].views is None


def test_up_axis_z_is_rotated_to_y(tmp_path: Path) -> None:
    root = fixtures.modelnet_h5(tmp_path / "mn")
    y_up = samples(H5Source(root, up_axis="y"), "test")[0].points
    z_up = samples(H5Source(root, up_axis="z"), "test")[0].points
    np.testing.assert_array_equal(z_up[:, 1], y_up[:, 2])  # the source's z is now height
    np.testing.assert_allclose(to_y_up(np.array([[0.0, 0.0, 1.0]]), "z"), [[0.0, 1.0, 0.0]])
    np.testing.assert_allclose(to_y_up(np.array([[1.0, 0.0, 0.0]]), "x"), [[0.0, 1.0, 0.0]])
    R = np.stack([to_y_up(e, "z") for e in np.eye(3)])
    assert np.linalg.det(R) == pytest.approx(1.0)  # a rotation, not a mirror


def test_scanobjectnn_h5_has_1d_labels_and_15_classes(tmp_path: Path) -> None:
    root = fixtures.scanobjectnn_h5(tmp_path / "so")
    assert detect_format(str(root)) == "scanobjectnn"
    src = open_source(str(root))
    assert len(src.class_names() or []) == 15
    got = samples(src, "train")
    assert [s.label for s in got[:3]] == [0, 1, 2]
    assert got[3].id == "train-000003"


def test_shapenet_render_layout(tmp_path: Path) -> None:
    root = fixtures.shapenet_render(tmp_path / "snr")
    assert detect_format(str(root)) == "shapenetrender"
    src = open_source(str(root))
    assert src.has_views()
    got = samples(src, "train")
    assert len(got) == 4
    assert got[0].id == "02691156/model000"
    assert len(got[0].views or []) == 3
    assert (got[0].views or [b""])[0][:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_allclose(got[0].points, fixtures.clouds(4, 64, 3)[0], rtol=1e-6)
    assert src.class_names() == ["02691156", "03001627"]


def test_folder_of_point_files(tmp_path: Path) -> None:
    root = fixtures.point_folder(tmp_path / "pf")
    assert detect_format(str(root)) == "folder"
    got = samples(open_source(str(root)), "train")
    assert [s.id for s in got] == ["chair/a", "chair/b", "chair/c", "table/d", "table/e"]
    assert [s.label for s in got] == [0, 0, 0, 1, 1]
    data = fixtures.clouds(5, 64, 4)
    for s, ref in zip(got, data, strict=True):
        np.testing.assert_allclose(s.points, ref, rtol=1e-5, atol=1e-6)  # first 3 columns of the .npy


def test_synthetic_source() -> None:
    src = SyntheticSource({"train": 26, "test": 13}, num_points=32, seed=1)
    assert len(src.class_names() or []) >= 10
    got = samples(src, "test")
    assert len(got) == 13
    assert got[0].points.shape == (32, 3)


def test_missing_source() -> None:
    with pytest.raises(DataError, match="not found"):
        detect_format("/nonexistent/place")


@pytest.mark.skipif(not MODELNET40.is_dir(), reason="../shared/data/modelnet40_1024 is not present")
def test_real_modelnet40_counts_and_first_objects() -> None:
    src = open_source(str(MODELNET40), up_axis="z")
    assert src.format == "modelnet40"
    assert src.count("train") == 9843
    assert src.count("test") == 2468
    names = src.class_names() or []
    assert len(names) == 40
    assert names[0] == "airplane"
    first = next(iter(src.samples("test")))
    assert isinstance(first, Sample)
    assert first.points.shape == (1024, 3)
    assert first.id.startswith(names[first.label or 0])  # ids like b'airplane_0627'


def test_tasks_read_in_order_are_the_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What prepare --ray splits (h5 row ranges, files, built-in ranges) reads back as samples()."""
    import crossmoco_ray.data.sources.hdf5 as hdf5

    monkeypatch.setattr(hdf5, "H5_CHUNK", 5)  # 12 rows: three ranges
    h5 = fixtures.modelnet_h5(tmp_path / "mn", n_train=12)
    (tmp_path / "mn" / "broken_train.h5").write_bytes(b"not hdf5")  # one task that names the file
    mesh_dir = fixtures.mesh_folder(tmp_path / "meshes")
    sources = [
        open_source(str(h5), "modelnet40"),
        open_source(str(mesh_dir), num_points=64),
        open_source("synthetic", synthetic_counts={"train": 37, "test": 3}, num_points=64),
    ]
    assert len(sources[0].tasks("train")) == 4  # the broken file, then rows 0-4, 5-9, 10-11
    for src in sources:
        for split in src.splits():
            whole = list(src.samples(split))
            parts = [s for t in src.tasks(split) for s in src.read_task(split, t)]
            assert [str(s) if isinstance(s, DataError) else s.id for s in whole] == [
                str(s) if isinstance(s, DataError) else s.id for s in parts
            ]
            for a, b in zip(whole, parts, strict=True):
                if not isinstance(a, DataError):
                    assert not isinstance(b, DataError)
                    assert np.array_equal(a.points, b.points)
                    assert a.label == b.label


# ---- HDF5 files that lie, reach outside themselves or hold the wrong things (issue 27) ----


def read_all(src: H5Source, split: str = "train") -> list[Sample | DataError]:
    """What prepare reads of a split: every item of every task."""
    return [item for task in src.tasks(split) for item in src.read_task(split, task)]


def only_errors(items: list[Sample | DataError]) -> list[DataError]:
    errors = [e for e in items if isinstance(e, DataError)]
    assert len(errors) == len(items), "a bad file must give errors, not samples"
    return errors


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "contiguous"])
def test_h5_claiming_rows_it_does_not_store_is_one_error_counting_the_claim(
    tmp_path: Path, chunked: bool
) -> None:
    """A 2 KB file declaring 10^8 rows (never written: HDF5 reads them as zeros) costs one error, not 10^8,
    and reading it allocates almost nothing."""
    import tracemalloc

    claimed = 10**8
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f.create_dataset("data", (claimed, 2048, 3), "f4", chunks=(1, 2048, 3) if chunked else None)
        f.create_dataset("label", (claimed, 1), "i8", chunks=(1024, 1) if chunked else None)
    assert (tmp_path / "train.h5").stat().st_size < 16_000
    src = H5Source(tmp_path)
    tracemalloc.start()
    try:
        # The class count is inferred from the labels (no shape_names.txt): this read the whole 'label'
        # dataset at once, 800 MB of fill values (2.7 GB peak with np.unique, 18 s) before a row was read.
        assert src.class_names() == []
        errors = only_errors(read_all(src))
        assert src.count("train") == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(errors) == 1
    assert errors[0].rows == claimed
    assert errors[0].source.endswith("train.h5")
    assert f"'data' declares {claimed} rows" in errors[0].problem
    assert peak < 4 * 1024**2


def test_h5_cut_short_is_named_whether_or_not_hdf5_opens_it(tmp_path: Path) -> None:
    """A file cut inside 'data': HDF5 refuses it (its end is before the one it declares); with that mark
    patched to the new end, HDF5 opens the file but not the dataset. Either way: errors naming the file,
    and at most the rows it really holds."""
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f["label"] = np.zeros((40, 1), np.int64)
        f["data"] = fixtures.clouds(40, 64, 0)
        cut = f["data"].id.get_offset() + 15 * 64 * 3 * 4 + 100  # 15 whole rows of 'data', then the end
    raw = bytearray((tmp_path / "train.h5").read_bytes()[:cut])
    (tmp_path / "train.h5").write_bytes(raw)
    [err] = only_errors(read_all(H5Source(tmp_path)))
    assert "cannot open HDF5 file (truncated or corrupt?)" in err.problem
    assert err.rows == 1
    assert raw[8] == 0  # superblock version 0: the end-of-file address is the 8 bytes at offset 40
    struct.pack_into("<Q", raw, 40, len(raw))
    (tmp_path / "train.h5").write_bytes(raw)
    items = read_all(H5Source(tmp_path))
    assert all(isinstance(s, DataError) or s.index < 15 for s in items)
    errors = [e for e in items if isinstance(e, DataError)]
    assert errors
    assert all(e.source.endswith("train.h5") for e in errors)
    assert sum(e.rows for e in errors) in (1, 25)  # the rows it held are unknown, or the 25 after row 15


def test_h5_unopenable_counts_one_row_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "train.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    [err] = only_errors(read_all(H5Source(tmp_path)))
    assert err.rows == 1
    assert "cannot open HDF5 file" in err.problem
    assert "how many rows it held is unknown, so it counts as 1 skipped row" in err.problem


def write_other(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["data"] = fixtures.clouds(4, 16, 0)
        f["label"] = np.zeros((4, 1), np.int64)
    return path


@pytest.mark.parametrize("how", ["external-link", "soft-to-external", "external-storage", "virtual"])
def test_h5_never_reads_other_files(tmp_path: Path, how: str) -> None:
    other = write_other(tmp_path / "elsewhere" / "other.h5") if how != "external-storage" else None
    if other is None:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "raw.bin").write_bytes(fixtures.clouds(4, 16, 0).tobytes())
    root = tmp_path / "h5"
    root.mkdir()
    with h5py.File(root / "train.h5", "w") as f:
        f["label"] = np.zeros((4, 1), np.int64)
        if how == "external-link":
            f["data"] = h5py.ExternalLink(str(other), "/data")
        elif how == "soft-to-external":
            f["grp/ext"] = h5py.ExternalLink(str(other), "/data")
            f["data"] = h5py.SoftLink("/grp/ext")
        elif how == "external-storage":
            raw = str(tmp_path / "elsewhere" / "raw.bin")
            f.create_dataset("data", (4, 16, 3), "f4", external=[(raw, 0, 4 * 16 * 3 * 4)])
        else:
            layout = h5py.VirtualLayout((4, 16, 3), "f4")
            layout[:] = h5py.VirtualSource(str(other), "data", shape=(4, 16, 3))
            f.create_virtual_dataset("data", layout)
    [err] = only_errors(read_all(H5Source(root)))
    assert err.source.endswith("train.h5")
    expected = {
        "external-link": "'data' is a link to .*other\\.h5 outside the file",
        "soft-to-external": "'/grp/ext' is a link to .*other\\.h5 outside the file",
        "external-storage": "'data' keeps its rows in external files",
        "virtual": "'data' is a virtual dataset",
    }[how]
    assert re.search(expected, err.problem), err.problem


def test_h5_soft_links_inside_the_file_are_followed(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f["grp/points"] = fixtures.clouds(3, 16, 0)
        f["data"] = h5py.SoftLink("/grp/points")
        f["label"] = np.arange(3)
        f["loop"] = h5py.SoftLink("/loop")
    assert [s.index for s in samples(H5Source(tmp_path), "train")] == [0, 1, 2]


def h5_labelled(folder: Path, label: object, rows: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "train.h5", "w") as f:
        f["data"] = fixtures.clouds(rows, 16, 0)
        if isinstance(label, str) and label == "group":
            f.create_group("label")
        else:
            f["label"] = label
    return folder


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("group", "'label' is a group, not a dataset"),
        (np.int64(3), r"'label' must be \[N\] or \[N, 1\].*got \(\)"),
        (np.array([[0, 1]] * 4), r"'label' must be \[N\] or \[N, 1\].*got \(4, 2\)"),
        (np.array([b"chair"] * 4), "'label' must hold numbers, got dtype \\|S5"),
        (np.array(["chair"] * 4, dtype=h5py.string_dtype()), "'label' must hold numbers"),
        (np.arange(3), "'label' has 3 rows but 'data' has 4"),
    ],
    ids=["group", "scalar", "two-columns", "bytes", "strings", "too-few"],
)
def test_h5_labels_that_are_not_one_index_per_row_are_named(
    tmp_path: Path, label: object, message: str
) -> None:
    [err] = only_errors(read_all(H5Source(h5_labelled(tmp_path, label))))
    assert re.search(message, err.problem), err.problem
    assert err.rows == 4
    assert "all 4 rows skipped" in err.problem


@pytest.mark.parametrize("shape", [(4,), (4, 1)])
def test_h5_labels_as_n_or_n_by_1_are_read(tmp_path: Path, shape: tuple[int, ...]) -> None:
    src = H5Source(h5_labelled(tmp_path, np.array([2, 0, 1, 2]).reshape(shape)))
    assert [s.label for s in samples(src, "train")] == [2, 0, 1, 2]


def test_h5_ids_that_are_not_utf8_are_named_per_row(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f["data"] = fixtures.clouds(3, 16, 0)
        f["label"] = np.zeros(3, np.int64)
        f["name"] = np.array([b"ok_0", b"\xff\xfe", b"ok_2"])
    items = read_all(H5Source(tmp_path))
    assert [s.id for s in items if isinstance(s, Sample)] == ["ok_0", "ok_2"]
    [err] = [e for e in items if isinstance(e, DataError)]
    assert err.index == 1
    assert "is not UTF-8 text" in err.problem
    str(err).encode("utf-8")  # prints on any terminal


def test_h5_data_that_is_not_numbers_is_named(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f["data"] = np.array([[[b"x", b"y", b"z"]]] * 2)
        f["label"] = np.zeros(2, np.int64)
    [err] = only_errors(read_all(H5Source(tmp_path)))
    assert "'data' must hold numbers" in err.problem
    assert err.rows == 2


# ---- file-per-object sources: headers that lie, names that are not text, files that are not files ----


def test_npy_header_claiming_more_than_the_file_holds_is_named(tmp_path: Path) -> None:
    import io
    import tracemalloc

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**10, 3)}
    )
    path = tmp_path / "huge.npy"
    path.write_bytes(header.getvalue() + np.zeros(12, "<f4").tobytes())
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"huge\.npy: \.npy header declares shape \(10000000000, 3\)"):
            read_point_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024**2


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 3), dtype=[("x", "f4")]), "not numbers"),
        (np.zeros((4, 3), dtype="U3"), "not numbers"),
        (np.zeros((4, 3, 1), "f4"), r"points must be \[N, 3\]"),
        (np.zeros(5, "f4"), r"points must be \[N, 3\]"),
    ],
    ids=["structured", "strings", "3-d", "1-d"],
)
def test_npy_that_is_not_a_table_of_numbers_is_named(tmp_path: Path, array: np.ndarray, message: str) -> None:
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=rf"bad\.npy: .*{message}"):
        read_point_file(tmp_path / "bad.npy")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("good.xyz", b"0 0 0 9\n1,2,3,9\n4 5 6 7\n"),
        ("empty.txt", b"  \n"),
        ("words.txt", b"a b c\n"),
        ("two.xyz", b"1 2\n3 4\n"),
        (
            "huge.npy",
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (10000000000, 3), }",
        ),
        ("bad.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': (((\n"),
    ],
    ids=["good", "empty", "words", "two-columns", "npy-claims", "npy-header"],
)
def test_a_point_file_and_its_bytes_read_alike(tmp_path: Path, name: str, data: bytes) -> None:
    """Corpora and lists parse a file's bytes (:func:`points_from_bytes`), class folders its path: the same
    points, the same errors."""
    (tmp_path / name).write_bytes(data)
    try:
        expected: np.ndarray | str = read_point_file(tmp_path / name)
    except DataError as err:
        expected = str(err)
    try:
        got: np.ndarray | str = points_from_bytes(data, Path(name).suffix, printable(tmp_path / name))
    except DataError as err:
        got = str(err)
    if isinstance(expected, str):
        assert got == expected
    else:
        assert isinstance(got, np.ndarray)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
        assert expected.shape == (3, 3)


class _Tasks(Source):
    """A source that only says its tasks and how to read one."""

    def splits(self) -> list[str]:
        return ["train"]

    def tasks(self, split: str) -> list[Any]:
        return [(0, 2), (2, 3)]

    def read_task(self, split: str, task: Any) -> Iterator[Sample | DataError]:
        for i in range(*task):
            yield Sample(f"s{i}", np.zeros((4, 3), np.float32))


class _Nothing(Source):
    def splits(self) -> list[str]:
        return ["train"]


def test_samples_read_every_task_in_order_unless_a_source_streams_them_itself() -> None:
    assert [s.id for s in _Tasks().samples("train") if isinstance(s, Sample)] == ["s0", "s1", "s2"]
    with pytest.raises(NotImplementedError, match="implements samples, or tasks and read_task"):
        list(_Nothing().samples("train"))


def test_names_that_are_not_utf8_are_named_per_file_and_print_safely(tmp_path: Path) -> None:
    root = tmp_path / "pf"
    cloud = fixtures.clouds(1, 32, 0)[0]
    for folder, name in ((b"chair", b"ok.npy"), (b"\xff\xfe", b"x.npy"), (b"chair", b"\xfe.npy")):
        os.makedirs(os.path.join(os.fsencode(root), folder), exist_ok=True)
        np.save(os.fsdecode(os.path.join(os.fsencode(root), folder, name)), cloud)
    src = open_source(str(root))
    assert src.class_names() == ["chair"]  # the undecodable folder is no class
    items = [src.read_task("train", t) for t in src.tasks("train")]
    flat = [i for part in items for i in part]
    assert [s.id for s in flat if isinstance(s, Sample)] == ["chair/ok"]
    errors = [e for e in flat if isinstance(e, DataError)]
    assert len(errors) == 2
    for err in errors:
        assert "not valid UTF-8" in err.problem
        assert err.rows == 1
        str(err).encode("utf-8")  # no lone surrogates: prints on any terminal
    assert any("\\udcff\\udcfe" in e.source for e in errors)


def test_fifos_and_directories_named_like_data_files_are_not_read(tmp_path: Path) -> None:
    """A FIFO named ``x.ply`` would block the reader forever; a directory named ``x.h5`` is no file."""
    root = fixtures.shapenet_render(tmp_path / "snr", objects=2)
    os.mkfifo(root / "ShapeNet" / "02691156" / "fifo.ply")
    (root / "ShapeNet" / "02691156" / "dir.ply").mkdir()
    os.mkfifo(root / "ShapeNetRendering" / "02691156" / "model000" / "rendering" / "99.png")
    src = open_source(str(root))
    assert [s.id for s in samples(src, "train")] == ["02691156/model000", "03001627/model001"]
    assert len(samples(src, "train")[0].views or []) == 3
    h5 = fixtures.modelnet_h5(tmp_path / "h5")
    os.mkfifo(h5 / "fifo_train.h5")
    (h5 / "dir_train.h5").mkdir()
    assert [f.name for f in H5Source(h5).files] == ["test.h5", "train.h5"]
