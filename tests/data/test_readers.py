"""Readers on fixtures written in the real formats, and on the real ModelNet40 when it is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossmoco_ray.data.readers import (
    H5Source,
    SyntheticSource,
    detect_format,
    open_source,
    to_y_up,
)
from crossmoco_ray.data.types import DataError, Sample
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
    import crossmoco_ray.data.hdf5 as hdf5

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
