"""The training input pipeline: prepared shards → two point views and two rendered views per object.

    read_parquet (local or s3:// / gs:// …)  →  map_batches(make_batch)  →  streaming_split per worker
                                                 │ decode the two chosen PNGs, resize
                                                 │ pick 2 distinct views, subsample points   (random)
                                                 └ augment points ×2 and images (uint8)    (random)

Deterministic work (reading, PNG decoding) and random work live in one map task so that only the two
chosen views are decoded; nothing random is cached, since Ray Data re-executes the pipeline every
epoch. Randomness is fresh every epoch; with a seed it is reproducible: it is derived from
``(seed, epoch, first id of the batch)``, where the epoch is Ray Data's execution index plus
``epoch_offset`` (set by a resumed run).

:func:`iter_local_batches` runs the same ``make_batch`` without Ray (debugging, notebooks, the
DataLoader baseline of the benchmark).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .augment import ImageAugment, PointAugment, augment_images, augment_points
from .render import decode_png
from .shards import read_manifest, resolve
from .types import DataError

BLOCK_BYTES = 4 * 1024**2


@dataclass(frozen=True)
class PipelineOptions:
    """What one training sample looks like and how it is augmented."""

    num_points: int = 2048
    image_size: int = 224
    views: int = 2
    point_augment: PointAugment = field(default_factory=PointAugment)
    image_augment: ImageAugment = field(default_factory=ImageAugment)
    read_batch: int = 64
    seed: int | None = None
    epoch_offset: int = 0
    object_store_mb: int = 1024


def batch_rng(opts: PipelineOptions, ids: Any, epoch: int) -> np.random.Generator:
    """Fresh entropy without a seed; else a generator fixed by (seed, epoch, the batch's first id)."""
    if opts.seed is None:
        return np.random.default_rng()
    first = ids[0] if len(ids) else ""
    first = first.decode() if isinstance(first, bytes) else str(first)
    return np.random.default_rng([opts.seed, epoch, zlib.crc32(first.encode())])


def make_batch(batch: dict[str, Any], opts: PipelineOptions, epoch: int = 0) -> dict[str, np.ndarray]:
    """Rows of shards (``id``, ``label``, ``points`` [B, P, 3], ``views``) → a training batch.

    Returns ``points1``/``points2`` [B, N, 3] float32, ``images`` [B, V, H, W, 3] uint8 (augmented, not yet
    normalised) and ``label`` [B] int64, rows in a random order.
    """
    rng = batch_rng(opts, batch["id"], epoch)
    B = len(batch["id"])
    order = rng.permutation(B)  # shuffle rows inside the batch (files are shuffled at read time)
    points = np.asarray(batch["points"], dtype=np.float32)[order]
    if points.shape[1] > opts.num_points:  # a fresh random subset each epoch
        keep = np.argsort(rng.random(points.shape[:2]), axis=1)[:, : opts.num_points]
        points = np.take_along_axis(points, keep[..., None], axis=1)
    images = np.empty((B, opts.views, opts.image_size, opts.image_size, 3), dtype=np.uint8)
    for row, src in enumerate(order):
        views = batch["views"][src]
        chosen = rng.choice(len(views), size=opts.views, replace=False)  # distinct views
        for v, idx in enumerate(chosen):
            try:
                images[row, v] = decode_png(bytes(views[idx]), size=opts.image_size)
            except ValueError as err:
                raise DataError(str(batch["id"][src]), f"view {idx} does not decode: {err}") from err
    flat = augment_images(images.reshape(-1, opts.image_size, opts.image_size, 3), rng, opts.image_augment)
    return {
        "points1": augment_points(points, rng, opts.point_augment),
        "points2": augment_points(points, rng, opts.point_augment),
        "images": flat.reshape(B, opts.views, opts.image_size, opts.image_size, 3),
        "label": np.asarray(batch["label"], dtype=np.int64)[order],
    }


def _ray_make_batch(batch: dict[str, Any], opts: PipelineOptions) -> dict[str, np.ndarray]:
    from ray.data import DataContext

    # Ray Data counts executions of a dataset; every epoch (every iteration of a split) is one.
    epoch = opts.epoch_offset + int(getattr(DataContext.get_current(), "_execution_idx", 0))
    return make_batch(batch, opts, epoch)


def split_files(root: str, split: str, opts: PipelineOptions) -> tuple[Any, list[str], dict[str, Any]]:
    """(filesystem, shard paths of ``split``, manifest), checking that the shards fit ``opts``."""
    manifest = read_manifest(root)
    if opts.num_points > manifest["num_points"]:
        raise DataError(
            root,
            f"the shards hold {manifest['num_points']} points per cloud but {opts.num_points} are asked for; "
            f"set data.num_points={manifest['num_points']} or lower",
        )
    if manifest["views_per_object"] is not None and opts.views > manifest["views_per_object"]:
        raise DataError(
            root, f"{opts.views} views per sample asked, the shards have {manifest['views_per_object']}"
        )
    fs, base = resolve(root)
    paths = [f"{base}/{f['path']}" for f in manifest["files"] if f["split"] == split]
    if not paths:
        splits = sorted({f["split"] for f in manifest["files"]})
        raise DataError(root, f"no {split!r} shards; the dataset has {splits}")
    return fs, paths, manifest


def make_dataset(root: str, split: str, opts: PipelineOptions, shuffle: bool = True) -> Any:
    """A Ray ``Dataset`` of training batches from the prepared shards of ``split`` under ``root``."""
    import ray.data
    from ray.data import FileShuffleConfig

    fs, paths, _ = split_files(root, split, opts)
    file_shuffle: Any = None
    if shuffle:
        file_shuffle = "files" if opts.seed is None else FileShuffleConfig(seed=opts.seed)
    ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=file_shuffle)
    ds = ds.map_batches(
        partial(_ray_make_batch, opts=opts),
        batch_format="numpy",
        batch_size=opts.read_batch,
        zero_copy_batch=True,
    )
    bound_streaming_memory(ds.context, opts.object_store_mb)
    return ds


def bound_streaming_memory(ctx: Any, object_store_mb: int) -> Any:
    """Keep an epoch's memory independent of the dataset size (measured in bench/RESULTS.md).

    Without a limit, reading (fast) runs ahead of decoding (slow) until half the object store is full and
    then spills to disk; blocks of a few MiB instead of whole shard files keep the window fine-grained.
    Returns the execution options, for ``ray.train.DataConfig(execution_options=...)``.
    """
    from ray.data import ExecutionResources

    ctx.target_max_block_size = min(ctx.target_max_block_size or BLOCK_BYTES, BLOCK_BYTES)
    options = ctx.execution_options
    options.resource_limits = options.resource_limits.min(
        ExecutionResources.for_limits(object_store_memory=object_store_mb * 1024**2)
    )
    return options


def iter_train_batches(shard: Any, batch_size: int, prefetch_batches: int = 2) -> Iterator[dict[str, Any]]:
    """A worker's torch batches: ``get_dataset_shard("train")`` (or a Dataset) → dicts of tensors.

    ``drop_last`` keeps every worker's batch the same size (a queue length that is a multiple of the global
    batch stays one); tensors land on the worker's device (``device="auto"``).
    """
    it: Iterator[dict[str, Any]] = shard.iter_torch_batches(
        batch_size=batch_size, drop_last=True, prefetch_batches=prefetch_batches
    )
    return it


def iter_local_batches(
    root: str, split: str, opts: PipelineOptions, batch_size: int, epoch: int = 0, shuffle: bool = True
) -> Iterator[dict[str, np.ndarray]]:
    """The same batches without Ray: row groups read with pyarrow, ``make_batch``, re-batched (drop_last)."""
    fs, paths, _ = split_files(root, split, opts)
    rng = np.random.default_rng(None if opts.seed is None else [opts.seed, epoch, 7])
    if shuffle:
        paths = [paths[i] for i in rng.permutation(len(paths))]
    pending: list[dict[str, np.ndarray]] = []
    rows = 0
    for path in paths:
        with fs.open_input_file(path) as f:
            reader = pq.ParquetFile(f)
            for batch in reader.iter_batches(
                batch_size=opts.read_batch, columns=["id", "label", "points", "views"]
            ):
                cols = {
                    "id": batch.column("id").to_pylist(),
                    "label": batch.column("label").to_numpy(),
                    "points": batch.column("points").to_numpy_ndarray(),
                    "views": batch.column("views").to_pylist(),
                }
                pending.append(make_batch(cols, opts, epoch))
                rows += len(cols["id"])
                while rows >= batch_size:
                    merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
                    yield {k: v[:batch_size] for k, v in merged.items()}
                    rest = {k: v[batch_size:] for k, v in merged.items()}
                    rows -= batch_size
                    pending = [rest] if rows else []
