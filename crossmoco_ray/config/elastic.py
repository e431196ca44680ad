"""What an elastic range (``train.num_workers=[min, max]``) means for a run, in words: the world sizes it may
train at, and at each one the global batch, how the queue takes it and the learning rate.

Printed by ``crossmoco config show`` and at the start of an elastic run, so a user sees what was checked
before any worker starts (the checks themselves: :mod:`crossmoco_ray.config.consistency`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crossmoco_ray.config.schema import Config

MAX_LISTED_SIZES = 12  # world sizes listed one by one; a wider range is summarised


def _sizes(values: list[int]) -> str:
    if len(values) <= MAX_LISTED_SIZES:
        return ", ".join(map(str, values))
    return f"{', '.join(map(str, values[:5]))}, … {', '.join(map(str, values[-3:]))} ({len(values)} sizes)"


def elastic_lines(cfg: Config) -> list[str]:
    """The range ``cfg`` accepted, one statement per line (empty for a fixed-size run)."""
    if not cfg.elastic:
        return []
    t, o = cfg.train, cfg.objective
    assert t.min_workers is not None
    sizes = list(range(t.min_workers, t.num_workers + 1))
    b = cfg.per_worker_batch
    low, high = cfg.global_batch_at(sizes[0]), cfg.global_batch_at(sizes[-1])
    whole = [w for w in sizes if o.queue_length % cfg.global_batch_at(w) == 0]
    wrap = [w for w in sizes if w not in whole]
    lines = [
        f"elastic: {t.min_workers} to {t.num_workers} workers (train.num_workers=[{t.min_workers}, "
        f"{t.num_workers}]): the run starts with as many as the cluster fits, goes on with fewer when nodes "
        f"are lost (down to {t.min_workers}) and grows back when they return (checked every "
        f"{t.elastic_resize_interval_s:g} s, train.elastic_resize_interval_s)",
        f"global batch {low} … {high} ({b} per worker, train.batch_size_per_worker, × the workers of the "
        "moment); progress, the learning-rate and momentum schedules are counted in samples",
    ]
    queue = f"queue objective.queue_length={o.queue_length}: "
    if whole:
        queue += f"a multiple of the global batch at {_sizes(whole)} worker(s)"
    if wrap:
        queue += (", not at " if whole else "not a multiple of the global batch at ") + _sizes(wrap)
    lines.append(
        queue + "; a batch that reaches the end of the ring wraps to its start, so every size works and "
        f"the queue always holds the newest {o.queue_length} keys (checked: every size in the range)"
    )
    if cfg.optim.lr_scaling == "none":
        lines.append(f"learning rate {cfg.base_lr_at(low):g} at every size (optim.lr_scaling=none)")
    else:
        lines.append(
            f"learning rate {cfg.base_lr_at(low):.4g} … {cfg.base_lr_at(high):.4g} (optim.lr_scaling="
            f"{cfg.optim.lr_scaling}: follows the global batch of the moment)"
        )
    every = t.checkpoint_every_steps
    cost = (
        f"the steps since the last checkpoint (train.checkpoint_every_steps={every})"
        if every
        else "the steps since the last epoch's checkpoint (train.checkpoint_every_steps=null)"
    )
    lines.append(f"a resize restarts the workers from the last checkpoint: it costs a restart and {cost}")
    return lines
