"""The training input pipeline: prepared shards → two point views and two rendered views per object.

    row groups of the shards (local or s3:// / gs:// …), in a new random order every epoch
      → read windows: each task reads ``shuffle_window`` rows' worth of row groups from random places
        and permutes their rows together                                                    (random)
      → map_batches(make_batch)  →  streaming_split per worker
          │ decode the two chosen PNGs, resize — or render two views of the object's mesh (or splats of
          │ its points) from this epoch's viewpoints (data.render.viewpoints, :mod:`.viewpoints`)  (random)
          │ pick 2 distinct views, subsample points                                         (random)
          └ augment points ×2 and images (uint8)                                            (random)

Batches are class-mixed even when the shards are not: real datasets are stored class by class, and shards
written in that order (old shards, a user's own Parquet) hold one class per row group. Shuffling files
alone, or rows inside one map batch, leaves a worker batch with one or two classes; BatchNorm then
normalises the class away and every in-batch negative is a same-class object. Mixing row groups drawn
from anywhere in the split, in a window of constant size, gives near-i.i.d. batches with memory that does
not grow with the dataset (bench/data.py measures both). Ray's global ``random_shuffle`` would
materialise the whole dataset every epoch (and an ``int`` seed repeats its order every epoch).

Deterministic work (reading, PNG decoding) and random work live in one map task so that only the two
chosen views are decoded; nothing random is cached, since Ray Data re-executes the pipeline every
epoch. Randomness is fresh every epoch; with a seed it is reproducible: the row-group order comes from
``(seed, epoch)``, a window's row order from ``(seed, epoch, window)`` and the augmentations from
``(seed, epoch, first id of the batch)`` (rendered views: each object's viewpoints from ``(seed, epoch,
id)``), where the epoch is Ray Data's execution index plus ``epoch_offset`` (set by a resumed run). Without
a seed the order's seed is ``order_seed`` (training sets the run's ``train.seed``, so a restart skips the
batches it trained on in the same order), else drawn once per dataset, so that all read tasks of an epoch
agree on one permutation.

:func:`iter_local_batches` runs the same ``make_batch`` without Ray (debugging, notebooks, the
DataLoader baseline of the benchmark).

Nothing unchecked is trained on (:mod:`.integrity`): the driver opens every shard of the split once (size,
footer digest, rows and point count against the manifest) and hands the checked footers to the read
tasks, which check every row group's bytes against its digest before decoding them; a damaged shard
stops the epoch with a :class:`~.types.DataError` naming the file (bench/verify_cost.py measures the cost).
"""

from __future__ import annotations

import math
import secrets
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from crossmoco_ray.data.pipeline.augment import ImageAugment, PointAugment, augment_images, augment_points
from crossmoco_ray.data.render.splat import decode_png
from crossmoco_ray.data.render.viewpoints import Viewpoints, object_rng, render_object
from crossmoco_ray.data.shards.integrity import ShardFile, open_split, read_row_groups
from crossmoco_ray.data.shards.manifest import read_manifest, stores_meshes
from crossmoco_ray.data.shards.meshes import decode_mesh
from crossmoco_ray.errors import DataError
from crossmoco_ray.storage import resolve

BLOCK_BYTES = 4 * 1024**2
READ_TASKS = 1  # read windows in memory at once (reading is fast; decoding is the work)


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
    shuffle_window: int = 8192  # rows (whole row groups from random places) mixed together per read task
    order_seed: int | None = None  # the row-group order's seed when ``seed`` is None (drawn per dataset)
    # Views rendered in the pipeline (:mod:`.viewpoints`) instead of decoded from the stored ones; what the
    # render stage asks of a node (CPUs per task, custom resources: CPU-only nodes can render for GPU ones).
    viewpoints: Viewpoints | None = None
    render_cpus: float = 1.0
    render_resources: tuple[tuple[str, float], ...] = ()
    meshes: bool = False  # the shards hold a mesh column (set by open_shards from the manifest)

    @property
    def columns(self) -> list[str]:
        """The shard columns the pipeline reads."""
        return [*COLUMNS, "mesh"] if self.meshes and self.viewpoints is not None else COLUMNS


COLUMNS = ["id", "label", "points", "views"]


@dataclass(frozen=True)
class RowGroup:
    """One row group of one shard file: the unit of random access in a Parquet file."""

    file: int  # index into the split's shard files
    index: int
    rows: int


def row_groups(shards: list[ShardFile]) -> list[RowGroup]:
    """Every row group of the opened ``shards`` (from their checked footers)."""
    return [
        RowGroup(f, g, shard.metadata.row_group(g).num_rows)
        for f, shard in enumerate(shards)
        for g in range(shard.metadata.num_row_groups)
    ]


def _order_seed(opts: PipelineOptions) -> int:
    if opts.seed is not None:
        return opts.seed
    if opts.order_seed is None:
        raise ValueError("PipelineOptions.order_seed must be set when seed is None (make_dataset does it)")
    return opts.order_seed


def epoch_windows(groups: list[RowGroup], opts: PipelineOptions, epoch: int) -> list[list[RowGroup]]:
    """This epoch's read windows: the row groups in a random order, cut into windows of at most about
    ``shuffle_window`` rows, balanced (no short last window whose rows could only mix among themselves).
    The same for every caller with the same ``(seed, epoch)``."""
    if not groups:
        return []
    per_group = sum(g.rows for g in groups) / len(groups)
    size = max(1, round(opts.shuffle_window / max(per_group, 1.0)))
    order = np.random.default_rng([_order_seed(opts), epoch, 0x5EED]).permutation(len(groups))
    windows = np.array_split(order, math.ceil(len(groups) / size))
    return [[groups[i] for i in window] for window in windows]


def window_rows(window_mb: float, manifest: dict[str, Any], split: str) -> int:
    """Rows of ``split`` that fit in ``window_mb`` MiB, from the shards' mean bytes per row."""
    files = [f for f in manifest["files"] if f["split"] == split and f.get("bytes")]
    rows = sum(f["rows"] for f in files)
    per_row = sum(f["bytes"] for f in files) / rows if rows else 64 * 1024
    return max(1, int(window_mb * 1024**2 / max(per_row, 1.0)))


def read_window(
    fs: Any, shards: list[ShardFile], window: list[RowGroup], opts: PipelineOptions, epoch: int, slot: int
) -> Iterator[pa.Table]:
    """The rows of ``window``'s row groups (each checked against its digest), permuted together (seeded by
    ``(seed, epoch, slot)``), in slices of ``read_batch`` rows (each slice a copy, so the window is held
    once)."""
    tables = []
    by_file: dict[int, list[int]] = {}
    for g in window:
        by_file.setdefault(g.file, []).append(g.index)
    for f, indices in by_file.items():
        tables.append(read_row_groups(fs, shards[f], indices, opts.columns))
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    order = np.random.default_rng([_order_seed(opts), epoch, slot, 0x0DE]).permutation(table.num_rows)
    for start in range(0, table.num_rows, opts.read_batch):
        yield table.take(pa.array(order[start : start + opts.read_batch]))


def _arrow_columns(table: pa.Table) -> dict[str, Any]:
    """A window's columns as ``make_batch`` takes them."""
    cols = {
        "id": table.column("id").to_pylist(),
        "label": table.column("label").to_numpy(),
        "points": table.column("points").combine_chunks().to_numpy_ndarray(),
        "views": table.column("views").to_pylist(),
    }
    if "mesh" in table.column_names:
        cols["mesh"] = table.column("mesh").to_pylist()
    return cols


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
    order = rng.permutation(B)  # rows arrive mixed from the read windows; this reorders within the batch
    points = np.asarray(batch["points"], dtype=np.float32)[order]
    if points.shape[1] > opts.num_points:  # a fresh random subset each epoch
        keep = np.argsort(rng.random(points.shape[:2]), axis=1)[:, : opts.num_points]
        points = np.take_along_axis(points, keep[..., None], axis=1)
    images = np.empty((B, opts.views, opts.image_size, opts.image_size, 3), dtype=np.uint8)
    for row, src in enumerate(order):
        if opts.viewpoints is not None:
            images[row] = _rendered(batch, int(src), opts, epoch, rng)
            continue
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


def _rendered(
    batch: dict[str, Any], row: int, opts: PipelineOptions, epoch: int, rng: np.random.Generator
) -> np.ndarray:
    """``[views, H, W, 3]``: row ``row``'s views rendered from its viewpoints of this epoch (seeded: drawn
    from ``(seed, epoch, id)``; else from the batch's fresh generator)."""
    assert opts.viewpoints is not None
    sid = batch["id"][row]
    sid = sid.decode() if isinstance(sid, bytes) else str(sid)
    own = object_rng(opts.seed, epoch, sid) if opts.seed is not None else rng
    cell = batch["mesh"][row] if "mesh" in batch else None
    mesh = decode_mesh(bytes(cell), sid) if cell is not None else None
    specs = opts.viewpoints.specs(own, opts.views)
    return render_object(specs, np.asarray(batch["points"][row]), mesh, opts.image_size)


def _data_epoch(opts: PipelineOptions) -> int:
    from ray.data import DataContext

    # Ray Data counts executions of a dataset; every epoch (every iteration of a split) is one.
    return opts.epoch_offset + int(getattr(DataContext.get_current(), "_execution_idx", 0))


def _ray_make_batch(batch: dict[str, Any], opts: PipelineOptions) -> dict[str, np.ndarray]:
    return make_batch(batch, opts, _data_epoch(opts))


def _ray_read_windows(
    batch: dict[str, Any], fs: Any, shards: list[ShardFile], groups: list[RowGroup], opts: PipelineOptions
) -> Iterator[pa.Table]:
    """Read task: the windows whose slots are in ``batch``, each mixed, in slices of ``read_batch`` rows."""
    epoch = _data_epoch(opts)
    windows = epoch_windows(groups, opts, epoch)
    for slot in np.asarray(batch["slot"]).tolist():
        if slot < len(windows):
            yield from read_window(fs, shards, windows[slot], opts, epoch, slot)


def split_files(root: str, split: str, opts: PipelineOptions) -> tuple[Any, list[str], dict[str, Any]]:
    """(filesystem, shard paths of ``split``, manifest), checking that the shards fit ``opts``."""
    manifest = read_manifest(root)
    if opts.num_points > manifest["num_points"]:
        raise DataError(
            root,
            f"the shards hold {manifest['num_points']} points per cloud but {opts.num_points} are asked for; "
            f"set data.num_points={manifest['num_points']} or lower",
        )
    stored = manifest["views_per_object"]
    if opts.viewpoints is None and stored is not None and opts.views > stored:
        hint = "" if stored else ": they were prepared with --store meshes; set data.render.viewpoints=fresh"
        raise DataError(root, f"{opts.views} views per sample asked, the shards have {stored}{hint}")
    if opts.viewpoints is not None and opts.viewpoints.kind == "fixed":
        grid = opts.viewpoints.spec.num_views
        if opts.views > grid:
            raise DataError(root, f"{opts.views} views per sample asked of a fixed grid of {grid} viewpoints")
    fs, base = resolve(root)
    paths = [f"{base}/{f['path']}" for f in manifest["files"] if f["split"] == split]
    if not paths:
        splits = sorted({f["split"] for f in manifest["files"]})
        raise DataError(root, f"no {split!r} shards; the dataset has {splits}")
    return fs, paths, manifest


def open_shards(
    root: str, split: str, opts: PipelineOptions
) -> tuple[Any, list[ShardFile], list[RowGroup], bool]:
    """(filesystem, the opened and checked shard files of ``split``, their row groups, whether they hold
    meshes): what the read tasks need. Every file is checked here, once, before any row is read
    (:func:`.integrity.open_split`)."""
    _, _, manifest = split_files(root, split, opts)
    fs, shards = open_split(root, manifest, split)
    return fs, shards, row_groups(shards), stores_meshes(manifest)


def make_dataset(root: str, split: str, opts: PipelineOptions, shuffle: bool = True) -> Any:
    """A Ray ``Dataset`` of training batches from the prepared shards of ``split`` under ``root``.

    With ``shuffle`` (training), rows are mixed across files and row groups every epoch (module
    docstring); without it, row groups are read in file order.
    """
    import ray.data
    from ray.data import TaskPoolStrategy

    fs, shards, groups, meshes = open_shards(root, split, opts)
    opts = replace(opts, meshes=meshes)
    if opts.seed is None and opts.order_seed is None:
        opts = replace(opts, order_seed=secrets.randbits(62))
    if not shuffle:
        opts = replace(opts, shuffle_window=1)
    windows = len(epoch_windows(groups, opts, 0))  # the count is the same every epoch
    read = _ray_read_windows if shuffle else _ray_read_in_order
    ds: Any = ray.data.from_items([{"slot": i} for i in range(windows)], override_num_blocks=windows)
    # Reading is I/O plus one permutation: it takes no CPU slot (so it never starves decoding on a small
    # machine), and at most READ_TASKS windows are in memory at once. Decoding and augmentation, the
    # real work, is a separate operator that runs on as many CPUs as the cluster gives Ray Data.
    ds = ds.map_batches(
        partial(read, fs=fs, shards=shards, groups=groups, opts=opts),
        batch_format="numpy",
        batch_size=1,
        num_cpus=0,
        compute=TaskPoolStrategy(size=READ_TASKS),
    )
    # With rendering, the stage asks for what data.render.num_cpus / resources say: a custom resource that
    # only CPU nodes advertise sends the rendering there, away from the GPU nodes' CPUs.
    render_args: dict[str, Any] = {}
    if opts.viewpoints is not None:
        render_args["num_cpus"] = opts.render_cpus
        if opts.render_resources:
            render_args["resources"] = dict(opts.render_resources)
    ds = ds.map_batches(
        partial(_ray_make_batch, opts=opts),
        batch_format="numpy",
        batch_size=opts.read_batch,
        zero_copy_batch=True,
        **render_args,
    )
    bound_streaming_memory(ds.context, opts.object_store_mb)
    return ds


def _ray_read_in_order(
    batch: dict[str, Any], fs: Any, shards: list[ShardFile], groups: list[RowGroup], opts: PipelineOptions
) -> Iterator[pa.Table]:
    """Read task without shuffling: row group ``slot`` as stored."""
    for slot in np.asarray(batch["slot"]).tolist():
        g = groups[slot]
        table = read_row_groups(fs, shards[g.file], [g.index], opts.columns)
        for start in range(0, table.num_rows, opts.read_batch):
            yield table.slice(start, opts.read_batch)


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


def iter_train_batches(
    shard: Any, batch_size: int, prefetch_batches: int = 2, pin_memory: bool = False
) -> Iterator[dict[str, Any]]:
    """A worker's torch batches: ``get_dataset_shard("train")`` (or a Dataset) → dicts of tensors.

    ``drop_last`` keeps every worker's batch the same size (a queue length that is a multiple of the global
    batch stays one); tensors land on the worker's device (``device="auto"``). ``pin_memory`` (GPU workers):
    each batch is collated into page-locked memory, so its copy to the GPU runs asynchronously on Ray's
    prefetch thread instead of blocking it.
    """
    it: Iterator[dict[str, Any]] = shard.iter_torch_batches(
        batch_size=batch_size, drop_last=True, prefetch_batches=prefetch_batches, pin_memory=pin_memory
    )
    return it


def iter_local_batches(
    root: str, split: str, opts: PipelineOptions, batch_size: int, epoch: int = 0, shuffle: bool = True
) -> Iterator[dict[str, np.ndarray]]:
    """The same batches without Ray: the same windows, ``make_batch``, re-batched (drop_last)."""
    fs, shards, groups, meshes = open_shards(root, split, opts)
    opts = replace(opts, meshes=meshes)
    if opts.seed is None and opts.order_seed is None:
        opts = replace(opts, order_seed=secrets.randbits(62))
    if shuffle:
        tables: Iterator[pa.Table] = (
            part
            for slot, window in enumerate(epoch_windows(groups, opts, epoch))
            for part in read_window(fs, shards, window, opts, epoch, slot)
        )
    else:
        tables = _in_order(fs, shards, groups, opts.columns)
    pending: list[dict[str, np.ndarray]] = []
    rows = 0
    for table in tables:
        for start in range(0, table.num_rows, opts.read_batch):
            cols = _arrow_columns(table.slice(start, opts.read_batch))
            pending.append(make_batch(cols, opts, epoch))
            rows += len(cols["id"])
            while rows >= batch_size:
                merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
                yield {k: v[:batch_size] for k, v in merged.items()}
                rest = {k: v[batch_size:] for k, v in merged.items()}
                rows -= batch_size
                pending = [rest] if rows else []


def _in_order(
    fs: Any, shards: list[ShardFile], groups: list[RowGroup], columns: list[str]
) -> Iterator[pa.Table]:
    for g in groups:
        yield read_row_groups(fs, shards[g.file], [g.index], columns)


def expected_distinct_labels(class_counts: list[int], batch: int) -> float:
    """Mean number of distinct labels in a batch of ``batch`` rows drawn at random without replacement
    from a split with these per-class counts: ``Σ_c 1 − C(N − n_c, B) / C(N, B)``."""
    total = sum(class_counts)
    if batch <= 0 or total == 0:
        return 0.0
    batch = min(batch, total)

    def log_choose(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    out = 0.0
    for n_c in class_counts:
        if n_c == 0:
            continue
        if total - n_c < batch:
            out += 1.0
        else:
            out += 1.0 - math.exp(log_choose(total - n_c, batch) - log_choose(total, batch))
    return out
