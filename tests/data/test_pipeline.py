"""The training pipeline: two distinct views, fresh augmentation per epoch, disjoint equal worker shards."""

from __future__ import annotations

import shutil
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from crossmoco_ray.data.pipeline.augment import ImageAugment, PointAugment
from crossmoco_ray.data.pipeline.batches import (
    PipelineOptions,
    RowGroup,
    epoch_windows,
    expected_distinct_labels,
    iter_local_batches,
    make_batch,
    make_dataset,
)
from crossmoco_ray.data.prepare.options import PrepareOptions
from crossmoco_ray.data.prepare.prepare import prepare
from crossmoco_ray.data.render.splat import RenderSpec
from crossmoco_ray.data.sources.formats import H5Source, ShapeNetRenderSource
from crossmoco_ray.errors import DataError
from tests.data import fixtures

PLAIN_IMAGES = ImageAugment(brightness=0.0, contrast=0.0, saturation=0.0, hflip=0.0)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> str:
    """24 objects with unique labels (so a label identifies a row), 3 rendered views, 64 points."""
    tmp = tmp_path_factory.mktemp("pipe")
    src = H5Source(fixtures.modelnet_h5(tmp / "mn", n_train=24, n_test=4, classes=24))
    out = tmp / "shards"
    prepare(
        src,
        str(out),
        PrepareOptions(render=RenderSpec(azimuths=(0.0, 90.0, 180.0), size=16), row_group_rows=4),
    )
    return str(out)


def test_make_batch_picks_two_distinct_views(tmp_path: Path) -> None:
    root = tmp_path / "shards"
    prepare(
        ShapeNetRenderSource(fixtures.shapenet_render(tmp_path / "snr", objects=6)),
        str(root),
        PrepareOptions(),
    )
    opts = PipelineOptions(num_points=64, image_size=8, image_augment=PLAIN_IMAGES, seed=0)
    seen = set()
    for epoch in range(20):
        for batch in iter_local_batches(str(root), "train", opts, batch_size=3, epoch=epoch):
            assert batch["images"].shape == (3, 2, 8, 8, 3)
            value = batch["images"][:, :, 0, 0, 0].astype(int)  # PNG v holds 40·v + 10
            assert (value[:, 0] != value[:, 1]).all()
            seen |= set(value.ravel().tolist())
    assert seen == {10, 50, 90}


def test_make_batch_shapes_and_point_subsampling(rendered: str) -> None:
    opts = PipelineOptions(num_points=48, image_size=12, views=2)
    batch = next(iter_local_batches(rendered, "train", opts, batch_size=5))
    assert batch["points1"].shape == (5, 48, 3)
    assert batch["points2"].shape == (5, 48, 3)
    assert batch["images"].shape == (5, 2, 12, 12, 3)
    assert batch["images"].dtype == np.uint8
    assert batch["label"].dtype == np.int64
    assert not np.allclose(batch["points1"], batch["points2"])  # two independent augmentations


def test_seeded_batches_repeat_per_epoch_and_change_across_epochs(rendered: str) -> None:
    opts = PipelineOptions(num_points=64, image_size=8, seed=5)

    def first(epoch: int) -> dict[str, np.ndarray]:
        return next(iter_local_batches(rendered, "train", opts, batch_size=4, epoch=epoch))

    a, b, c = first(0), first(0), first(1)
    np.testing.assert_array_equal(a["points1"], b["points1"])
    assert not np.array_equal(a["points1"], c["points1"])
    fresh = PipelineOptions(num_points=64, image_size=8)
    x = next(iter_local_batches(rendered, "train", fresh, batch_size=4, shuffle=False))
    y = next(iter_local_batches(rendered, "train", fresh, batch_size=4, shuffle=False))
    assert not np.array_equal(x["points1"], y["points1"])


def test_drop_last_and_every_row_once_per_epoch(rendered: str) -> None:
    opts = PipelineOptions(num_points=64, image_size=8)
    labels = [b["label"] for b in iter_local_batches(rendered, "train", opts, batch_size=5)]
    assert [len(x) for x in labels] == [5, 5, 5, 5]  # 24 rows: the last 4 are dropped
    assert len(set(np.concatenate(labels).tolist())) == 20


def test_shards_must_hold_enough_points_and_views(rendered: str) -> None:
    with pytest.raises(DataError, match=r"hold 64 points per cloud but 128 .*data\.num_points=64"):
        next(iter_local_batches(rendered, "train", PipelineOptions(num_points=128), batch_size=2))
    with pytest.raises(DataError, match="4 views per sample asked, the shards have 3"):
        next(iter_local_batches(rendered, "train", PipelineOptions(num_points=64, views=4), batch_size=2))
    with pytest.raises(DataError, match="no 'val' shards"):
        next(iter_local_batches(rendered, "val", PipelineOptions(num_points=64), batch_size=2))


def test_make_batch_names_an_undecodable_view() -> None:
    batch = {
        "id": ["obj-7"],
        "label": np.array([0]),
        "points": np.zeros((1, 8, 3), np.float32),
        "views": [[b"not a png", b"nor this"]],
    }
    with pytest.raises(DataError, match="obj-7: view"):
        make_batch(batch, PipelineOptions(num_points=8, image_size=4))


@pytest.mark.timeout(240)
def test_ray_two_workers_get_disjoint_equal_shards_and_fresh_augmentation(
    rendered: str, ray_session: None
) -> None:
    opts = PipelineOptions(num_points=64, image_size=8, read_batch=4, point_augment=PointAugment())
    ds = make_dataset(rendered, "train", opts)
    splits = ds.streaming_split(2, equal=True)

    def epoch() -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = [{}, {}]

        def consume(i: int) -> None:
            for batch in splits[i].iter_batches(batch_size=None):
                for label, pts in zip(batch["label"], batch["points1"], strict=True):
                    results[i][int(label)] = pts

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=200)
        return results

    first, second = epoch(), epoch()
    for run in (first, second):
        assert len(run[0]) == len(run[1]) == 12  # equal length
        assert not set(run[0]) & set(run[1])  # disjoint
        assert set(run[0]) | set(run[1]) == set(range(24))  # they cover the data
    one = {**first[0], **first[1]}
    two = {**second[0], **second[1]}
    assert all(not np.allclose(one[k], two[k]) for k in one)  # every object augmented afresh


@pytest.mark.timeout(240)
def test_ray_read_tasks_check_every_row_group_before_decoding(
    rendered: str, tmp_path: Path, ray_session: None
) -> None:
    """The read tasks (other processes, given the driver's checked footers) refuse a row group whose bytes
    changed since prepare, naming the file; the driver refuses a truncated file before any task runs."""
    root = Path(shutil.copytree(rendered, tmp_path / "shards"))
    shard = sorted(root.glob("train-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01  # inside a row group: the footer is at the end
    shard.write_bytes(bytes(data))
    opts = PipelineOptions(num_points=64, image_size=8, read_batch=4)
    ds = make_dataset(str(root), "train", opts)  # the footers are intact: opening succeeds
    with pytest.raises(Exception, match=rf"{shard.name}: row group \d+ differs from the manifest"):
        for _ in ds.iter_batches(batch_size=None):
            pass
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(DataError, match=rf"{shard.name}: \d+ bytes, the manifest says \d+"):
        make_dataset(str(root), "train", opts)


# ---- class-sorted shards (old shards, a user's own Parquet): the pipeline alone mixes them ----


@pytest.fixture(scope="module")
def class_sorted(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[int]]:
    """40 classes × 40 rows written class by class (prepare --no-shuffle), 16-row row groups."""
    import h5py

    tmp = tmp_path_factory.mktemp("sorted")
    n = 40 * 40
    (tmp / "h5").mkdir()
    with h5py.File(tmp / "h5" / "train.h5", "w") as f:
        f["data"] = fixtures.clouds(n, 16, 11)
        f["label"] = np.repeat(np.arange(40), 40).reshape(n, 1)
    out = tmp / "shards"
    prepare(
        H5Source(tmp / "h5"),
        str(out),
        PrepareOptions(
            render=RenderSpec(azimuths=(0.0, 180.0), size=8),
            row_group_rows=16,
            rows_per_shard=400,
            shuffle=False,
        ),
    )
    return str(out), [40] * 40


# 32 row groups per window, the default's 8192 rows over prepare's 256-row groups (the default window of
# data.shuffle_window_mb=256 holds all of ModelNet40's train split: 8,837 rows of ~28 KiB).
SORTED_OPTS = PipelineOptions(num_points=16, image_size=8, read_batch=64, shuffle_window=512)


def distinct_ratio(label_batches: list[np.ndarray], class_counts: list[int]) -> float:
    iid = expected_distinct_labels(class_counts, len(label_batches[0]))
    return float(np.mean([len(set(b.tolist())) for b in label_batches])) / iid


def test_local_pipeline_mixes_class_sorted_shards(class_sorted: tuple[str, list[int]]) -> None:
    root, counts = class_sorted
    labels = np.concatenate(
        [pq.read_table(p).column("label").to_numpy() for p in sorted(Path(root).glob("train-*.parquet"))]
    )
    assert (labels[1:] == labels[:-1]).mean() > 0.9  # the shards really are class-sorted
    opts = replace(SORTED_OPTS, seed=3)
    epochs = [[b["label"] for b in iter_local_batches(root, "train", opts, 16, epoch=e)] for e in range(3)]
    for batches in epochs:
        assert distinct_ratio(batches, counts) >= 0.8
        assert len(np.unique(np.concatenate(batches))) == 40
    again = [b["label"] for b in iter_local_batches(root, "train", opts, 16, epoch=0)]
    assert all(np.array_equal(a, b) for a, b in zip(again, epochs[0], strict=True))  # seeded: repeatable
    assert not all(np.array_equal(a, b) for a, b in zip(epochs[0], epochs[1], strict=True))  # new each epoch
    in_order = [b["label"] for b in iter_local_batches(root, "train", opts, 16, shuffle=False)]
    assert distinct_ratio(in_order, counts) < 0.3  # what the old pipeline fed the workers


def test_read_windows_are_balanced_and_cover_every_row_group_once() -> None:
    """33 row groups of 256 rows, windows of at most 8 groups: 5 windows of 6–7 groups (not 8, 8, 8, 8 and a
    lone group whose rows could only mix among themselves)."""
    groups = [RowGroup(g // 4, g % 4, 256) for g in range(33)]
    opts = PipelineOptions(shuffle_window=8 * 256, seed=1)
    windows = epoch_windows(groups, opts, epoch=0)
    sizes = sorted(len(w) for w in windows)
    assert sizes == [6, 6, 7, 7, 7]
    assert sorted((g.file, g.index) for w in windows for g in w) == [(g.file, g.index) for g in groups]
    assert epoch_windows(groups, opts, epoch=0) == windows
    assert epoch_windows(groups, opts, epoch=1) != windows


def test_expected_distinct_labels() -> None:
    assert expected_distinct_labels([5, 5], 10) == pytest.approx(2.0)
    assert expected_distinct_labels([100], 16) == pytest.approx(1.0)
    # 40 equal classes, 16 draws without replacement from 1600 rows
    p_absent = np.prod([(1560 - i) / (1600 - i) for i in range(16)])
    assert expected_distinct_labels([40] * 40, 16) == pytest.approx(40 * (1 - p_absent))


@pytest.mark.timeout(240)
def test_ray_worker_batches_from_class_sorted_shards_are_mixed_every_epoch(
    class_sorted: tuple[str, list[int]], ray_session: None
) -> None:
    from crossmoco_ray.data.pipeline.batches import iter_train_batches

    root, counts = class_sorted
    splits = make_dataset(root, "train", SORTED_OPTS).streaming_split(2, equal=True)

    def epoch() -> list[list[np.ndarray]]:
        out: list[list[np.ndarray]] = [[], []]

        def consume(i: int) -> None:
            out[i] = [b["label"].numpy() for b in iter_train_batches(splits[i], 16)]

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=200)
        return out

    first, second = epoch(), epoch()
    for run in (first, second):
        batches = run[0] + run[1]
        assert len(batches) == 2 * (800 // 16)
        assert distinct_ratio(batches, counts) >= 0.8
    assert not np.array_equal(np.concatenate(first[0]), np.concatenate(second[0]))  # a new order each epoch
