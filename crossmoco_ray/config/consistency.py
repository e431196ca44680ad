"""The cross-field checks of a :class:`~crossmoco_ray.config.schema.Config`: inconsistencies between sections
(batch vs workers, queue length vs global batch, ...), each reported with its fix before anything is built.

:class:`~crossmoco_ray.config.schema.Config` runs them in its validator.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from crossmoco_ray.bounded import short_repr

if TYPE_CHECKING:
    from crossmoco_ray.config.schema import Config


MAX_LISTED_WORKERS = 1024  # the largest worker count a message suggests


def _multiples_near(value: int, step: int) -> tuple[list[int], list[int]]:
    """(the multiples of ``step`` just below and above ``value``, round ones: multiples of lcm(step, 100))."""
    lo = (value // step) * step
    nearest = [m for m in (lo, lo + step) if m > 0]
    round_step = math.lcm(step, 100)
    rlo = (value // round_step) * round_step
    round_ = [m for m in (rlo, rlo + round_step) if m > 0 and m not in nearest]
    return nearest, round_


def gpu_problems(t: Any) -> list[str]:
    """GPUs per worker that a GPU run cannot use: ``t`` is a ``train`` section (pretraining's or
    fine-tuning's) with ``use_gpu``, ``gpus_per_worker`` and ``num_workers``.

    A worker is one DDP process on one GPU. A fraction lets Ray put two workers of the run on one GPU,
    where NCCL stops with "Duplicate GPU detected"; more than one reserves GPUs nothing uses.
    """
    if not t.use_gpu or t.gpus_per_worker == 1:
        return []
    g = t.gpus_per_worker
    if g > 1:
        more = math.ceil(g) * t.num_workers
        return [
            f"train.gpus_per_worker={g:g} reserves {g:g} GPUs per worker, but a worker trains on one GPU "
            "(one DDP process each): set train.gpus_per_worker=1 and use more workers for more GPUs "
            f"(e.g. train.num_workers={more})"
        ]
    if g == 0:
        return [
            "train.use_gpu=true with train.gpus_per_worker=0 gives the workers no GPU: set "
            "train.gpus_per_worker=1 (or train.use_gpu=false to train on CPUs)"
        ]
    if t.num_workers > 1:
        return [
            f"train.gpus_per_worker={g:g} lets Ray place two of this run's {t.num_workers} workers on one "
            'GPU, and NCCL stops with "Duplicate GPU detected": set train.gpus_per_worker=1. (A fraction '
            "only works for runs of one worker sharing a GPU, e.g. Tune trials with train.num_workers=1.)"
        ]
    return []


def cross_field_problems(cfg: Config) -> list[str]:
    """Every cross-field inconsistency of ``cfg``, each with its fix."""
    problems: list[str] = []
    t, o, m, d = cfg.train, cfg.objective, cfg.model, cfg.data
    if (t.batch_size is None) == (t.batch_size_per_worker is None):
        problems.append(
            "set exactly one of train.batch_size (the global batch over all workers) and "
            "train.batch_size_per_worker (the batch of one worker, e.g. 20 per GPU); got "
            f"batch_size={t.batch_size}, batch_size_per_worker={t.batch_size_per_worker}: "
            "set the other to null"
        )
        return problems
    if t.min_workers is not None and t.min_workers > t.num_workers:
        problems.append(
            f"train.min_workers={t.min_workers} is above train.num_workers={t.num_workers}: give the elastic "
            f"range as train.num_workers=[{t.num_workers},{t.min_workers}] (min first)"
        )
        return problems
    if cfg.elastic and t.batch_size is not None:
        problems.append(
            f"train.num_workers=[{t.min_workers}, {t.num_workers}] (elastic) keeps each worker's batch and "
            f"lets the global batch follow the workers, but train.batch_size={t.batch_size} fixes the global "
            "batch: give the batch per worker instead, e.g. train.batch_size=null "
            f"train.batch_size_per_worker={max(2, t.batch_size // t.num_workers)}"
        )
        return problems
    if t.batch_size is not None and t.batch_size % t.num_workers:
        # worker counts that split the batch (up to a bound: a batch of 10**12 must not take 10**12 steps)
        divisors = [w for w in range(1, min(t.batch_size, MAX_LISTED_WORKERS) + 1) if t.batch_size % w == 0]
        nearest_batches = _multiples_near(t.batch_size, t.num_workers)[0]
        problems.append(
            f"train.batch_size={t.batch_size} (the global batch) does not split evenly over "
            f"train.num_workers={t.num_workers}; use num_workers in {divisors}, a batch_size that is a "
            f"multiple of {t.num_workers} (e.g. {' or '.join(map(str, nearest_batches))}), or give the batch "
            f"per worker instead (e.g. train.batch_size_per_worker={max(2, t.batch_size // t.num_workers)})"
        )
        return problems
    per_worker, global_batch = cfg.per_worker_batch, cfg.global_batch
    batch_key = "train.batch_size" if t.batch_size is not None else "train.batch_size_per_worker"
    if per_worker < 2:
        problems.append(
            f"each worker would get {per_worker} sample(s) per step "
            f"({batch_key}={t.batch_size or per_worker} over {t.num_workers} workers); "
            "BatchNorm and in-batch negatives need at least 2: raise "
            f"{batch_key} to {2 * t.num_workers if t.batch_size is not None else 2} or more"
        )
    if cfg.elastic and o.queue_length < global_batch:
        problems.append(
            f"objective.queue_length={o.queue_length} is shorter than the largest global batch "
            f"{global_batch} ({per_worker} per worker x {t.num_workers} workers): one step's keys would "
            f"overwrite each other; use objective.queue_length={global_batch} or more"
        )
    elif not cfg.elastic and o.queue_length % global_batch:
        nearest, round_ = _multiples_near(o.queue_length, global_batch)
        fix = " or ".join(map(str, nearest)) + (
            f" (round: {' or '.join(map(str, round_))})" if round_ else ""
        )
        origin = (
            f"train.batch_size={global_batch}"
            if t.batch_size is not None
            else f"{per_worker} per worker (train.batch_size_per_worker) x {t.num_workers} workers"
        )
        problems.append(
            f"objective.queue_length={o.queue_length} is not a multiple of the global batch {global_batch} "
            f"({origin}): a fixed-size run keeps CrossMoCo's queue of whole batches (only an elastic "
            f"run's batches wrap around its end); use objective.queue_length={fix}"
        )
    if m.point_encoder in ("dgcnn", "dgcnn_seg") and m.k >= d.num_points:
        problems.append(
            f"model.k={m.k} neighbours needs more points than data.num_points={d.num_points}; "
            f"lower model.k below {d.num_points} or raise data.num_points"
        )
    pa = d.point_augment
    if pa.scale_low > pa.scale_high:
        problems.append(
            f"data.point_augment.scale_low={pa.scale_low} is above scale_high={pa.scale_high}; swap them"
        )
    if cfg.tracking.register_model and not cfg.tracking.log_model:
        name = short_repr(cfg.tracking.register_model, 80)
        problems.append(
            f"tracking.register_model={name} needs the model logged: set "
            "tracking.log_model=true (or drop tracking.register_model)"
        )
    problems += gpu_problems(t)
    if "GPU" in t.worker_resources:  # Ray refuses it without use_gpu; with it, gpus_per_worker wins
        problems.append(
            f"train.worker_resources.GPU={t.worker_resources['GPU']:g}: GPUs are set by train.use_gpu=true "
            "and train.gpus_per_worker; drop GPU from train.worker_resources"
        )
    if m.sync_bn and not t.use_gpu:
        problems.append("model.sync_bn=true needs CUDA (torch's SyncBatchNorm); set train.use_gpu=true")
    if cfg.optim.warmup_epochs >= t.epochs:
        problems.append(
            f"optim.warmup_epochs={cfg.optim.warmup_epochs} leaves no epoch after warm-up "
            f"(train.epochs={t.epochs}); use fewer warm-up epochs"
        )
    return problems
