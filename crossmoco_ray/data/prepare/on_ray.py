"""``prepare --ray``: prepare's per-sample work (read, check, resample, render) as a Ray Data pipeline.

The source's :meth:`~.source.Source.tasks` (files, row ranges of an h5 file, ranges of the built-in set)
become the rows of a dataset; ``map_batches`` runs :func:`.per_sample.process` on the samples of a few tasks
per Ray task, on every CPU of the cluster, and sends each processed sample back pickled. The driver
consumes them **in order** (``preserve_order``) and does what depends on the samples before: duplicate ids,
one point count, the validation carve, the seeded bucket shuffle and the Parquet writer. So the shards,
manifest and bad-input report are byte-for-byte those of the local path for the same seed; only the
expensive part moves. Memory stays bounded: Ray Data streams with backpressure, and the driver holds
one block of processed samples at a time on top of the shuffle's bucket.

Where a sample fails is not where it is reported: a :class:`~.types.DataError` travels back with the
sample (pickled intact), and the driver fails or skips it (``--skip-bad``) exactly as the local path does;
any other exception inside a task reaches the driver as Ray's error with the task's traceback.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from crossmoco_ray.data.sources.base import Source

if TYPE_CHECKING:
    from crossmoco_ray.data.prepare.options import PrepareOptions
    from crossmoco_ray.data.prepare.per_sample import Processed

TASKS_PER_BATCH = 8  # source tasks per Ray task, at most (fewer when a split has few tasks per CPU)


def start_ray(cpus: int | None, log: Callable[[str], None] = print) -> None:
    """Join the cluster of ``RAY_ADDRESS`` (or the running Ray), or start a private local Ray with ``cpus``
    CPUs (:func:`crossmoco_ray.ray_session.join_or_start`: loopback only, token authentication)."""
    from crossmoco_ray.ray_session import join_or_start

    join_or_start(None, cpus, log, dashboard=False)


def _process_tasks(
    batch: dict[str, np.ndarray],
    source: Source,
    split: str,
    opts: PrepareOptions,
    class_names: list[str] | None,
    hint: str,
) -> dict[str, np.ndarray]:
    """The ``map_batches`` function: pickled tasks in, pickled :class:`~.per_sample.Processed` samples out."""
    from crossmoco_ray.data.prepare.per_sample import process

    out = [
        pickle.dumps(process(item, opts, class_names, hint))
        for blob in batch["task"]
        for item in source.read_task(split, pickle.loads(blob))
    ]
    return {"processed": np.array(out, dtype=object)}


def processed_on_ray(
    source: Source, split: str, opts: PrepareOptions, class_names: list[str] | None, hint: str
) -> Iterator[Processed]:
    """:func:`.per_sample.process` over every task of ``split``, on Ray Data, yielded in the source's
    order."""
    import ray
    from ray.data import DataContext

    tasks = source.tasks(split)
    if not tasks:
        return
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_batch = max(1, min(TASKS_PER_BATCH, math.ceil(len(tasks) / (4 * cpus))))
    ctx = DataContext.get_current()
    before = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    rows = [{"task": pickle.dumps(t)} for t in tasks]
    ds: Any = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / per_batch))
    ds = ds.map_batches(
        _process_tasks,
        fn_kwargs={"source": source, "split": split, "opts": opts, "class_names": class_names, "hint": hint},
        batch_size=per_batch,
        batch_format="numpy",
        num_cpus=1,
    )
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for blob in batch["processed"]:
                yield pickle.loads(blob)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = before
