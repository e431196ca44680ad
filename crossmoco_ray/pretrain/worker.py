"""The Ray Train worker loop: one process per worker, everything built from the resolved config.

Named phases, in order:

1. :func:`build`: model, optimizer, DDP, tracker, the monitor (rank 0);
2. :func:`restore`: the newest complete checkpoint (:mod:`crossmoco_ray.checkpoints.resume`): model, queues,
   optimizer, history and *this rank's* RNG state; the step to resume at, mid-epoch included;
3. :func:`measure_baseline`: the monitor on the run's own encoder before any step (rank 0, once per run);
4. :func:`run_epoch`: stream this worker's shard (skipping the batches a mid-epoch checkpoint already
   trained on), :func:`train_step`, progress every ``train.log_every`` steps, a checkpoint every
   ``train.checkpoint_every_steps``. On a GPU the loop waits for the device only at those points: the
   step's scalars are summed on the device and read once per log window, which is also where (with
   every rank agreeing) a NaN/Inf loss stops the run, before any checkpoint could keep it;
5. :func:`end_epoch`: the monitor (rank 0: clean SVM, kNN, CrossPoint SVM with gains over random init) and
   the epoch's checkpoint.

Every checkpoint is a collective: all ranks gather their RNG states to rank 0 and call ``ray.train.report``
(Ray Train requires it); rank 0 writes the checkpoint, and after the report returned (the checkpoint is on
storage), ``progress.json``. DDP wraps the whole CrossMoCo module but never re-sends buffers after
construction: the queues stay identical because every worker enqueues the same gathered keys.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crossmoco_ray import storage
from crossmoco_ray.architecture import build_model, build_optimizer, lr_at, momentum_at
from crossmoco_ray.checkpoints.resume import ResumePoint, checkpoint_name, resume_point, write_progress
from crossmoco_ray.checkpoints.state import build_state, read_checkpoint, rng_state, unwrap, write_checkpoint
from crossmoco_ray.checkpoints.state import restore as restore_state
from crossmoco_ray.config.loading import Config, validate
from crossmoco_ray.data.pipeline.batches import iter_train_batches
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
from crossmoco_ray.pretrain.step import Precision, prepare_model, train_step
from crossmoco_ray.runs.ddp import all_ranks, gather_objects, maybe_inject_fault, start_worker, wrap_ddp
from crossmoco_ray.tracking import Tracker

HISTORY_FILE = "history.json"
CHECKPOINT_PRIORITY = "checkpoint_priority"  # epochs done at an epoch end, -1 mid-epoch (what Ray keeps)


@dataclass
class Worker:
    """One Train worker's state across the phases."""

    cfg: Config
    config: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    model: Any  # CrossMoCo
    net: torch.nn.Module  # DDP-wrapped when world > 1
    optimizer: torch.optim.Optimizer
    tracker: Tracker
    initial_point: torch.nn.Module | None  # the random-init encoder for the monitor's baseline (rank 0)
    steps_per_epoch: int
    run_dir: str
    chance: dict[str, float]
    iid_classes: float
    node_id: str
    precision: Precision = "fp32"  # what the step uses (train.precision, or fp32 where bf16 does not pay off)
    step: int = 0
    attempt_start_step: int = 0
    monitor: Any = None
    history: dict[str, Any] = field(default_factory=lambda: {"steps": [], "epochs": []})
    last_monitor: dict[str, float] = field(default_factory=lambda: {k: math.nan for k in MONITOR_KEYS})

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs


def _build_monitor(spec: dict[str, Any], device: torch.device) -> Any:
    from crossmoco_ray.evaluate.monitor import Monitor

    monitor = Monitor.from_spec(
        spec["root"],
        up_axis=spec.get("up_axis", "y"),
        num_points=spec["num_points"],
        max_samples=spec["max_samples"],
        val_fraction=spec.get("val_fraction", 0.1),
        C=spec["C"],
        knn_k=spec.get("knn_k", 20),
        crosspoint=spec.get("crosspoint", True),
        normalize=spec.get("normalize", True),
        variant=spec.get("variant"),
    )
    monitor.device = str(device)
    return monitor


def build(config: dict[str, Any]) -> Worker:
    """Phase 1: everything from the resolved config, identically initialised on every worker."""
    import ray

    rank, world, device = start_worker()
    cfg = validate(config["config"])
    t = cfg.train
    configure_kernels(tf32=t.tf32, deterministic=t.deterministic)
    torch.manual_seed(t.seed)  # identical initialisation on every worker
    model = build_model(cfg)
    initial_point = copy.deepcopy(model.point_q) if rank == 0 and config.get("monitor") else None
    if cfg.model.sync_bn:
        model.point_q = convert_sync_batchnorm(model.point_q)
        model.image_q = convert_sync_batchnorm(model.image_q)
    prepare_model(model, device, t.channels_last)
    optimizer = build_optimizer(cfg, model)
    torch.manual_seed(t.seed + rank)  # then per-worker randomness
    net = wrap_ddp(model, device, world)
    tracker = Tracker(config.get("tracking_uri"), config.get("mlflow_run_id")) if rank == 0 else Tracker(None)
    # the cross-modal negatives come from all workers (global) or this worker's batch (local)
    o = cfg.objective
    cross_batch = cfg.global_batch if o.cross_negatives == "global" else cfg.per_worker_batch
    return Worker(
        cfg=cfg,
        config=config,
        rank=rank,
        world=world,
        device=device,
        model=model,
        net=net,
        optimizer=optimizer,
        tracker=tracker,
        initial_point=initial_point,
        steps_per_epoch=int(config["steps_per_epoch"]),
        run_dir=config["run_dir"],
        chance=chance_levels(o.queue_length, cross_batch, (o.weight_point, o.weight_image, o.weight_cross)),
        iid_classes=float(config.get("iid_batch_classes") or 0.0),
        node_id=ray.get_runtime_context().get_node_id(),
        precision=_precision(t.precision, device, rank),
    )


def _precision(requested: str, device: torch.device, rank: int) -> Precision:
    used, why = resolve_precision(requested, device)
    if why:
        print(f"warning (rank {rank}): {why}", flush=True)
    elif used == "bf16" and rank == 0:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
        print(f"bf16 autocast on {where}; kNN distances, BatchNorm statistics and losses in fp32", flush=True)
    return used


def restore(w: Worker) -> ResumePoint:
    """Phase 2: the newest complete checkpoint, if any (Ray's registered one or a newer one on storage)."""
    import ray.train

    registered = ray.train.get_checkpoint()
    point = resume_point(w.run_dir, w.steps_per_epoch, registered.path if registered else None)
    if point.checkpoint is not None:
        with tempfile.TemporaryDirectory(prefix="crossmoco-restore-") as tmp:
            local = Path(point.checkpoint)
            if "://" in point.checkpoint or not local.is_dir():
                local = storage.copy_to_local(point.checkpoint, tmp)
            state = read_checkpoint(local)
            own_rng = restore_state(w.model, w.optimizer, state, w.rank, w.world, w.device)
            w.history = storage.read_json(str(local / HISTORY_FILE)) or w.history
        w.step = int(state["step"])
        if w.rank == 0:
            where = f"epoch {point.epoch(w.steps_per_epoch) + 1} after {point.skip(w.steps_per_epoch)} steps"
            print(f"resumed from {point.checkpoint}: {where} (step {w.step} overall)", flush=True)
            if not own_rng:
                print(
                    "warning: the checkpoint's RNG states do not fit this run (another number of workers, or "
                    "an older checkpoint without each GPU's own state): fresh RNG, so the resume is not "
                    "bit-exact",
                    flush=True,
                )
    w.attempt_start_step = w.step
    for past in w.history["epochs"]:
        w.last_monitor.update({k: past[k] for k in w.last_monitor if k in past})
    return point


def measure_baseline(w: Worker) -> None:
    """Phase 3 (rank 0): the monitor's random-init baseline, once per run (kept in the history), measured
    anew only when a resumed run's monitor reads other data."""
    if w.initial_point is None:
        return
    spec = w.config["monitor"]
    w.monitor = _build_monitor(spec, w.device)
    if w.history.get("baseline") and w.history.get("baseline_spec") == spec:
        w.monitor.baseline = w.history["baseline"]
    else:
        print(f"monitor: {w.monitor.source}; measuring the random-init baseline ...", flush=True)
        w.history["baseline"] = w.monitor.set_baseline(w.initial_point)
        w.history["baseline_spec"] = spec
        print(baseline_line(w.history["baseline"]), flush=True)
        metrics = {**w.history["baseline"], **w.chance, "iid_batch_classes": w.iid_classes}
        w.tracker.log_metrics(metrics, w.step)
    w.initial_point = None


def _set_lr(w: Worker, lr: float) -> None:
    for group in w.optimizer.param_groups:
        group["lr"] = lr


def run_epoch(w: Worker, shard: Any, epoch: int, skip: int) -> tuple[EpochMeter, dict[str, Any] | None]:
    """Phase 4: one epoch of steps; returns the meter and, if the loss became NaN/Inf, the outcome."""
    cfg, t, spe = w.cfg, w.cfg.train, w.steps_per_epoch
    lr = lr_at(cfg, epoch)
    _set_lr(w, lr)
    batches = iter(iter_train_batches(shard, cfg.per_worker_batch, pin_memory=w.device.type == "cuda"))
    if skip:
        if w.rank == 0:
            print(f"epoch {epoch + 1}: skipping the {skip} batches trained on before the restart", flush=True)
        for _ in range(skip):
            next(batches, None)
    meter = EpochMeter(cfg.global_batch)  # started after the skip: skipping is not training throughput
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        wait = time.perf_counter() - t0
        maybe_inject_fault(w.rank, w.world, w.step, w.run_dir)
        momentum = momentum_at(cfg, w.step, w.total_steps)
        if cfg.optim.schedule == "cosine_smooth":
            lr = lr_at(cfg, epoch, (w.step - epoch * spe) / max(spe, 1))
            _set_lr(w, lr)
        out = train_step(
            w.net,
            batch,
            w.optimizer,
            momentum,
            precision=w.precision,
            grad_clip=cfg.optim.grad_clip,
            channels_last=t.channels_last,
        )
        w.step += 1
        meter.add(out, wait, batch.get("label"))
        every = t.checkpoint_every_steps
        checkpoint_now = every is not None and w.step % every == 0 and w.step % spe != 0  # epoch ends: own
        if w.step % t.log_every == 0:
            window = meter.take_window()  # the window's one read from the device
            if not all_ranks(math.isfinite(window["loss"]), w.device):
                return meter, _stop_nonfinite(w, epoch, window)
            if w.rank == 0:
                print(progress_line(epoch, t.epochs, w.step, spe, window, lr, momentum, w.chance), flush=True)
                w.tracker.log_metrics({**window, "lr": lr, "momentum": momentum}, w.step)
                w.history["steps"].append({"step": w.step, "lr": lr, **{k: window[k] for k in LOSS_KEYS}})
        if checkpoint_now:
            if not all_ranks(meter.loss_finite(), w.device):  # never a checkpoint of NaN weights
                return meter, _stop_nonfinite(w, epoch, meter.take_window())
            metrics = {"epoch": epoch, "step": w.step, "lr": lr, "momentum": momentum, **w.last_monitor}
            metrics |= {"attempt_start_step": w.attempt_start_step, CHECKPOINT_PRIORITY: -1}
            save(w, epoch, metrics, {})
    if not all_ranks(meter.loss_finite(), w.device):  # before the epoch's monitor and checkpoint
        return meter, _stop_nonfinite(w, epoch, meter.take_window())
    return meter, None


def _stop_nonfinite(w: Worker, epoch: int, window: dict[str, float]) -> dict[str, Any]:
    """The outcome of a run whose loss became NaN/Inf (on some rank) within ``window``: reported, and no
    checkpoint written since, so the last one is the last good state."""
    import ray.train

    bad = {k: window[k] for k in LOSS_KEYS}
    ray.train.report({"epoch": epoch, "step": w.step, "nonfinite": 1.0, **bad})
    return {"status": "nonfinite", "epoch": epoch, "step": w.step, **bad}


def end_epoch(w: Worker, epoch: int, meter: EpochMeter) -> None:
    """Phase 5: the monitor, the epoch's line and MLflow metrics, and its checkpoint."""
    cfg, t = w.cfg, w.cfg.train
    summary = meter.epoch_summary()
    lines = health_warnings(summary, w.iid_classes)
    if w.monitor is not None and ((epoch + 1) % cfg.eval.eval_every == 0 or epoch + 1 == t.epochs):
        summary.update(w.monitor(unwrap(w.model).point_q))
        w.last_monitor.update({k: summary[k] for k in w.last_monitor if k in summary})
        collapse = w.monitor.collapse_warning(summary)
        if collapse:
            lines.append(collapse)
    checksum = unwrap(w.model).queue.checksum()
    lr = w.optimizer.param_groups[0]["lr"]
    metrics = {
        **summary,
        "epoch": epoch + 1,
        "step": w.step,
        "lr": lr,
        "momentum": momentum_at(cfg, w.step, w.total_steps),
        **w.last_monitor,
        "queue_checksum": checksum,
        "queue_checksums": gather_objects(checksum),
        "rank": w.rank,
        "world_size": w.world,
        "node_id": w.node_id,
        "node_ids": gather_objects(w.node_id),
        "attempt_start_step": w.attempt_start_step,
        CHECKPOINT_PRIORITY: epoch + 1,
    }
    if w.rank == 0:
        w.history["epochs"].append(
            {
                k: v
                for k, v in metrics.items()
                if isinstance(v, (int, float, list)) and (k not in MONITOR_KEYS or k in summary)
            }
        )
        print(epoch_line(epoch, t.epochs, summary, w.iid_classes), flush=True)
        if any(k in summary for k in MONITOR_KEYS):
            print(monitor_line(summary, w.history.get("baseline", {})), flush=True)
        for line in lines:
            print(line, flush=True)
        monitor_values = {k: v for k, v in summary.items() if k.startswith(("val_", "gain_"))}
        w.tracker.log_metrics(
            {f"epoch_{k}": v for k, v in summary.items() if k not in monitor_values} | monitor_values,
            w.step,
        )
    save(w, epoch + 1, metrics, summary)


def save(w: Worker, epochs_done: int, metrics: dict[str, Any], summary: dict[str, float]) -> None:
    """A checkpoint (collective): every rank's RNG state to rank 0, which writes it; every rank reports."""
    import ray.train
    from ray.train import Checkpoint

    rngs = gather_objects(rng_state(w.device))
    name = checkpoint_name(w.step, w.steps_per_epoch)
    if w.rank != 0:
        ray.train.report(metrics)
        return
    tmp = Path(tempfile.mkdtemp(prefix="crossmoco-ckpt-"))
    try:
        state = build_state(
            w.net,
            w.optimizer,
            w.cfg,
            epoch=epochs_done,
            step=w.step,
            lr=w.optimizer.param_groups[0]["lr"],
            mlflow_run_id=w.tracker.run_id,
            run_name=w.config.get("run_name"),
            metrics=summary,
            rng_per_rank=rngs,
        )
        write_checkpoint(tmp / "ckpt", state, w.cfg)
        (tmp / "ckpt" / HISTORY_FILE).write_text(json.dumps(w.history))
        ray.train.report(
            metrics, checkpoint=Checkpoint.from_directory(tmp / "ckpt"), checkpoint_dir_name=name
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_progress(w.run_dir, name, w.step, epochs_done)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of every Ray Train worker (``TorchTrainer(train_loop_per_worker=...)``)."""
    import ray.train

    w = build(config)
    point = restore(w)
    measure_baseline(w)
    shard = ray.train.get_dataset_shard("train")
    first = point.epoch(w.steps_per_epoch)
    for epoch in range(first, w.cfg.train.epochs):
        skip = point.skip(w.steps_per_epoch) if epoch == first else 0
        meter, stopped = run_epoch(w, shard, epoch, skip)
        if stopped is not None:
            return stopped
        end_epoch(w, epoch, meter)
    return {"status": "finished", "epoch": w.cfg.train.epochs, "step": w.step}
