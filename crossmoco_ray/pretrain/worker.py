"""The pretraining job in a Ray Train worker: what it plugs into the worker skeleton
(:mod:`crossmoco_ray.runs.worker`), and nothing else.

- **build** (:meth:`PretrainJob.build`): the CrossMoCo model from the resolved config, identically
  initialised on every worker, then per-worker seeds; optimizer, DDP, the precision the device supports;
  on rank 0 a copy of the random-init point encoder for the monitor's baseline;
- **restore / write**: the checkpoint format of :mod:`crossmoco_ray.checkpoints.state` (model with queues
  and pointer, optimizer, *this rank's* RNG state, the config);
- **after restore**: the monitor's random-init baseline (rank 0, once per run, kept in the history);
- **step**: the epoch's learning rate (per step with ``cosine_smooth``), the key encoders' momentum, one
  :func:`~crossmoco_ray.pretrain.step.train_step`; its scalars summed on the device by
  :class:`~crossmoco_ray.pretrain.console.EpochMeter` and read once per log window;
- **end of epoch**: the monitor (rank 0: clean SVM, kNN, CrossPoint SVM with gains over random init), the
  epoch's line, queue checksums of every rank (they must agree).

DDP wraps the whole CrossMoCo module but never re-sends buffers after construction: the queues stay
identical because every worker enqueues the same gathered keys.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from crossmoco_ray.architecture import build_model
from crossmoco_ray.checkpoints.state import build_state, read_checkpoint, unwrap, write_checkpoint
from crossmoco_ray.checkpoints.state import restore as restore_state
from crossmoco_ray.config.schema import Config
from crossmoco_ray.data.pipeline.batches import iter_train_batches
from crossmoco_ray.evaluate.monitor import Monitor, MonitorSpec
from crossmoco_ray.nn import convert_sync_batchnorm
from crossmoco_ray.nn.precision import configure_kernels, cpu_description, resolve_precision
from crossmoco_ray.pretrain.console import (
    LOSS_KEYS,
    MONITOR_KEYS,
    EpochMeter,
    baseline_line,
    chance_levels,
    epoch_line,
    health_warnings,
    monitor_line,
    progress_line,
)
from crossmoco_ray.pretrain.optim import build_optimizer, lr_at, momentum_at
from crossmoco_ray.pretrain.step import Precision, prepare_model, train_step
from crossmoco_ray.runs.ddp import gather_objects, wrap_ddp
from crossmoco_ray.runs.worker import Context, RayTrainSession, WorkerSpec, run_worker, start


@dataclass
class PretrainSpec(WorkerSpec):
    """What every pretraining worker is told (typed: the config object itself, not a dict of it)."""

    cfg: Config | None = None
    monitor: MonitorSpec | None = None  # rank 0 measures the encoder with it (None: no monitor)
    iid_batch_classes: float = 0.0  # classes an i.i.d. batch holds (the batch-mix health check)

    def __post_init__(self) -> None:
        if self.cfg is not None:  # the samples of a step follow from the config, whoever builds the spec
            self.per_worker_batch = self.cfg.per_worker_batch
            self.workers = self.cfg.train.num_workers


class PretrainJob:
    """The pretraining job's plug-ins for the worker skeleton."""

    def __init__(self, spec: PretrainSpec, ctx: Context) -> None:
        assert spec.cfg is not None
        cfg = self.cfg = spec.cfg
        self.spec = spec
        t = cfg.train
        configure_kernels(tf32=t.tf32, deterministic=t.deterministic)
        torch.manual_seed(t.seed)  # identical initialisation on every worker
        model = build_model(cfg)
        self.initial_point = copy.deepcopy(model.point_q) if ctx.rank == 0 and spec.monitor else None
        if cfg.model.sync_bn:
            model.point_q = convert_sync_batchnorm(model.point_q)
            model.image_q = convert_sync_batchnorm(model.image_q)
        prepare_model(model, ctx.device, t.channels_last)
        self.model = model
        self.optimizer = build_optimizer(cfg, model)
        torch.manual_seed(t.seed + ctx.rank)  # then per-worker randomness
        self.net = wrap_ddp(model, ctx.device, ctx.world)
        # the cross-modal negatives come from all workers (global) or this worker's batch (local)
        o = cfg.objective
        self.peak_lr = cfg.base_lr_at(ctx.global_batch)  # the global batch of this world size
        cross_batch = ctx.global_batch if o.cross_negatives == "global" else cfg.per_worker_batch
        self.chance = chance_levels(
            o.queue_length, cross_batch, (o.weight_point, o.weight_image, o.weight_cross)
        )
        self.precision: Precision = _precision(t.precision, ctx.device, ctx.rank)
        self.monitor: Monitor | None = None
        self.last_monitor = {k: math.nan for k in MONITOR_KEYS}
        self.meter = EpochMeter(ctx.global_batch)
        self.lr = lr_at(cfg, 0, peak=self.peak_lr)
        self.momentum = cfg.objective.momentum
        self.node_id = _node_id()
        ctx.history.setdefault("steps", [])
        self.shard: Any = None
        self.epoch_summary: dict[str, float] = {}

    # checkpoints
    def restore(self, ctx: Context, directory: Path) -> int:
        state = read_checkpoint(directory)
        own_rng = restore_state(
            self.model, self.optimizer, state, ctx.rank, ctx.world, ctx.device, resizes=ctx.resizes
        )
        if not own_rng and ctx.resized_from is not None:
            ctx.say(
                f"RNG: {ctx.resized_from} workers' states do not map onto {ctx.world}: each rank's stream "
                f"is derived from (seed, rank, {ctx.world} workers, resize {ctx.resizes}), reproducible "
                "given the same sequence of sizes"
            )
        elif not own_rng:
            ctx.say(
                "warning: the checkpoint's RNG states do not fit this run (another number of workers, or an "
                "older checkpoint without each GPU's own state): fresh RNG, so the resume is not bit-exact"
            )
        return int(state["step"])

    def write(self, ctx: Context, directory: Path, rngs: list[dict[str, Any]], epochs_done: int) -> None:
        state = build_state(
            self.net,
            self.optimizer,
            self.cfg,
            epoch=epochs_done,
            step=ctx.step,
            lr=self.optimizer.param_groups[0]["lr"],
            mlflow_run_id=ctx.tracker.run_id,
            run_name=self.spec.run_name,
            metrics=self.epoch_summary,
            rng_per_rank=rngs,
        )
        write_checkpoint(directory, state, self.cfg)

    def after_restore(self, ctx: Context) -> None:
        if ctx.resized_from is not None:  # every rank's queues, as restored (they must agree)
            checksums = gather_objects(unwrap(self.model).queue.checksum())
            ctx.history.setdefault("resizes", []).append(
                {
                    "step": ctx.step,
                    "samples": ctx.samples,
                    "from": ctx.resized_from,
                    "to": ctx.world,
                    "queue_checksums": checksums,
                }
            )
        for past in ctx.history["epochs"]:
            self.last_monitor.update({k: past[k] for k in self.last_monitor if k in past})
        self._measure_baseline(ctx)

    def _measure_baseline(self, ctx: Context) -> None:
        """Rank 0: the monitor's random-init baseline, once per run (kept in the history), measured anew
        only when a resumed run's monitor reads other data."""
        if self.initial_point is None or self.spec.monitor is None:
            return
        spec = self.spec.monitor
        self.monitor = Monitor.from_spec(spec)
        self.monitor.device = str(ctx.device)
        h = ctx.history
        if h.get("baseline") and h.get("baseline_spec") == asdict(spec):
            self.monitor.baseline = h["baseline"]
            # per-object results (the gains' paired standard errors); absent in histories of older runs
            self.monitor.baseline_correct = _per_object(h.get("baseline_correct"))
        else:
            ctx.say(f"monitor: {self.monitor.source}; measuring the random-init baseline ...")
            h["baseline"] = self.monitor.set_baseline(self.initial_point)
            h["baseline_correct"] = self.monitor.baseline_correct
            h["baseline_spec"] = asdict(spec)
            ctx.say(baseline_line(h["baseline"]))
            metrics = {**h["baseline"], **self.chance, "iid_batch_classes": self.spec.iid_batch_classes}
            ctx.tracker.log_metrics(metrics, ctx.step)
        self.initial_point = None

    # steps
    def _set_lr(self, lr: float) -> None:
        self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def start_epoch(self, ctx: Context, epoch: int, skip: int) -> Iterator[Any]:
        if self.shard is None:
            import ray.train

            self.shard = ray.train.get_dataset_shard("train")
        self._set_lr(lr_at(self.cfg, epoch, peak=self.peak_lr))
        pin = ctx.device.type == "cuda"
        batches = iter(iter_train_batches(self.shard, self.cfg.per_worker_batch, pin_memory=pin))
        if skip:
            ctx.say(f"epoch {epoch + 1}: skipping the {skip} batches trained on before the restart")
            for _ in range(skip):
                next(batches, None)
        self.meter = EpochMeter(ctx.global_batch)  # started after the skip: skipping is not throughput
        return batches

    def step(self, ctx: Context, epoch: int, batch: Any, wait: float) -> None:
        cfg = self.cfg
        self.momentum = momentum_at(cfg, *ctx.schedule_position())  # counted in samples
        if cfg.optim.schedule == "cosine_smooth":  # the epoch's samples done, in this size's steps
            self._set_lr(lr_at(cfg, epoch, ctx.epoch_step / max(ctx.steps_per_epoch, 1), peak=self.peak_lr))
        out = train_step(
            self.net,
            batch,
            self.optimizer,
            self.momentum,
            precision=self.precision,
            grad_clip=cfg.optim.grad_clip,
            channels_last=cfg.train.channels_last,
        )
        self.meter.add(out, wait, batch.get("label"))

    def take_window(self, ctx: Context) -> dict[str, float]:
        return self.meter.take_window()

    def losses_finite(self, ctx: Context) -> bool:
        return self.meter.loss_finite()

    def log_window(self, ctx: Context, epoch: int, window: dict[str, float]) -> None:
        t = self.cfg.train
        line = progress_line(
            epoch, t.epochs, ctx.epoch_step, ctx.steps_per_epoch, window, self.lr, self.momentum, self.chance
        )
        print(line, flush=True)
        extra = {"lr": self.lr, "momentum": self.momentum, "samples": ctx.samples, "world_size": ctx.world}
        ctx.tracker.log_metrics({**window, **extra}, ctx.step)
        ctx.history["steps"].append(
            {
                "step": ctx.step,
                "lr": self.lr,
                "samples": ctx.samples,
                "world_size": ctx.world,
                **{k: window[k] for k in LOSS_KEYS},
            }
        )

    def checkpoint_metrics(self, ctx: Context, epoch: int) -> dict[str, Any]:
        self.epoch_summary = {}  # a mid-epoch checkpoint holds no epoch's summary
        return {"lr": self.lr, "momentum": self.momentum, **self.last_monitor}

    # end of epoch
    def end_epoch(self, ctx: Context, epoch: int) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        summary = self.meter.epoch_summary()
        lines = health_warnings(summary, self.spec.iid_batch_classes)
        if self.monitor is not None and ((epoch + 1) % cfg.eval.eval_every == 0 or epoch + 1 == t.epochs):
            summary.update(self.monitor(unwrap(self.model).point_q))
            self.last_monitor.update({k: summary[k] for k in self.last_monitor if k in summary})
            collapse = self.monitor.collapse_warning(summary)
            if collapse:
                lines.append(collapse)
        checksum = unwrap(self.model).queue.checksum()
        metrics = {
            **summary,
            "epoch": epoch + 1,
            "step": ctx.step,
            "samples": ctx.samples,
            "lr": self.optimizer.param_groups[0]["lr"],
            "momentum": momentum_at(cfg, *ctx.schedule_position()),
            **self.last_monitor,
            "queue_checksum": checksum,
            "queue_checksums": gather_objects(checksum),
            "rank": ctx.rank,
            "world_size": ctx.world,
            "node_id": self.node_id,
            "node_ids": gather_objects(self.node_id),
            "attempt_start_step": ctx.attempt_start_step,
        }
        self.epoch_summary = summary
        if ctx.rank == 0:
            ctx.history["epochs"].append(
                {
                    k: v
                    for k, v in metrics.items()
                    if isinstance(v, (int, float, list)) and (k not in MONITOR_KEYS or k in summary)
                }
            )
            print(epoch_line(epoch, t.epochs, summary, self.spec.iid_batch_classes), flush=True)
            if any(k in summary for k in MONITOR_KEYS):
                print(monitor_line(summary, ctx.history.get("baseline", {})), flush=True)
            for line in lines:
                print(line, flush=True)
            monitor_values = {k: v for k, v in summary.items() if k.startswith(("val_", "gain_"))}
            ctx.tracker.log_metrics(
                {f"epoch_{k}": v for k, v in summary.items() if k not in monitor_values} | monitor_values,
                ctx.step,
            )
        return metrics


def _precision(requested: str, device: torch.device, rank: int) -> Precision:
    used, why = resolve_precision(requested, device)
    if why:
        print(f"warning (rank {rank}): {why}", flush=True)
    elif used == "bf16" and rank == 0:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
        print(f"bf16 autocast on {where}; kNN distances, BatchNorm statistics and losses in fp32", flush=True)
    return used


def _node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else "local"


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of every pretraining Ray Train worker (``TorchTrainer(train_loop_per_worker=...)``)."""
    spec: PretrainSpec = config["spec"]
    assert spec.cfg is not None
    t = spec.cfg.train
    ctx = start(
        spec,
        RayTrainSession(),
        epochs=t.epochs,
        log_every=t.log_every,
        checkpoint_every=t.checkpoint_every_steps,
    )
    ctx.history = {"steps": [], "epochs": []}
    return run_worker(ctx, PretrainJob(spec, ctx))


def _per_object(value: object) -> dict[str, list[int]]:
    """A history's per-object baseline results, kept only where they have the form the monitor wrote (a
    checkpoint's history is read from storage: anything else gives gains without a standard error)."""
    if not isinstance(value, dict):
        return {}
    return {
        k: v
        for k, v in value.items()
        if isinstance(k, str)
        and isinstance(v, list)
        and all(x in (0, 1) and not isinstance(x, float) for x in v)
    }
