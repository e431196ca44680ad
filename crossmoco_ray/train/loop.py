"""The Ray Train worker loop: one process per worker, everything built from the resolved config.

Before the first epoch, rank 0 measures the monitor on the run's own encoder before any step (the
random-init baseline, once per run; kept in the history so a resume does not redo it). Per epoch: set the
learning rate (cosine, optional warm-up), stream this worker's shard of the Ray Data pipeline, run
:func:`train_step` (momentum from its schedule, bf16 autocast on CUDA when asked, a NaN/Inf guard), log
every ``train.log_every`` steps (rank 0: a console line and MLflow metrics: each loss against its chance
level, InfoNCE top-1s, alignment/uniformity, spreads, ``batch_classes``), then, at the end of the epoch,
the monitor (rank 0: clean SVM, kNN and CrossPoint SVM on validation data, with their gains over random
init) and a checkpoint that rank 0 writes and every rank reports.

DDP wraps the whole CrossMoCo module but never re-sends buffers after construction: the queues stay
identical because every worker enqueues the same gathered keys, not because DDP copies them each step.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..config import Config, validate
from ..data.pipeline import iter_train_batches
from ..nn import convert_sync_batchnorm
from ..tracking import Tracker
from .builders import build_model, build_optimizer, lr_at, momentum_at
from .checkpoint import build_state, read_checkpoint, restore, unwrap, write_checkpoint
from .step import prepare_model, train_step

HISTORY_FILE = "history.json"
FAULT_MARKER = ".fault_injected"
LOSS_KEYS = ("loss", "loss_point", "loss_image", "loss_cross")
# the monitor's numbers; Ray Train's reports carry the last measured ones through epochs without a monitor
# (so Tune always sees its metric), MLflow and the history hold only the epochs that measured them
MONITOR_KEYS = tuple(
    f"{prefix}{key}" for prefix in ("", "gain_") for key in ("val_svm_clean", "val_knn", "val_svm_crosspoint")
)
BATCH_MIX_WARNING = 0.6  # warn when batches hold fewer than this share of an i.i.d. batch's classes


def chance_levels(
    queue_length: int, cross_batch: int, weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> dict[str, float]:
    """Each loss at chance: InfoNCE over ``1 + K`` candidates, NT-Xent over ``2N − 1`` (N: the objects
    whose embeddings are the cross-modal candidates); the total with the objective's weights."""
    info_nce = math.log(1 + queue_length)
    nt_xent = math.log(2 * cross_batch - 1)
    w_point, w_image, w_cross = weights
    return {
        "chance_loss_point": info_nce,
        "chance_loss_image": info_nce,
        "chance_loss_cross": nt_xent,
        "chance_loss": (w_point + w_image) * info_nce + w_cross * nt_xent,
    }


def ddp_kwargs() -> dict[str, bool]:
    """Sync buffers at construction only, not per forward (torch ≥ 2.14: ``forward_sync_buffers``)."""
    params = inspect.signature(DistributedDataParallel).parameters
    return (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    )


def _gather_floats(value: float, device: torch.device) -> list[float]:
    """``value`` from every worker, in rank order (collective: every worker calls it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    t = torch.tensor([value], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(x.item()) for x in out]


def _quiet_worker_logs() -> None:
    """Keep the console to our progress lines: Ray Train 2.60 logs every report at INFO under a logger
    named after its file (so ``LoggingConfig`` does not reach it), and DDP warns on every step that
    mkldnn's 1×1-convolution gradients are laid out differently from its buckets (a copy, not an error).
    """
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def _gather_objects(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _maybe_inject_fault(cfg: Config, rank: int, world: int, step: int, run_dir: str) -> None:
    """Testing aid: the last rank's process dies at ``train.fault_at_step``, once per run."""
    if cfg.train.fault_at_step is None or step != cfg.train.fault_at_step or rank != world - 1:
        return
    marker = Path(run_dir) / FAULT_MARKER
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"worker {rank} killed at step {step}\n")
    print(f"[fault injection] killing worker {rank} at step {step}", flush=True)
    os._exit(1)


class EpochMeter:
    """Means of every scalar the step returns (losses, top-1s, diagnostics) plus ``batch_classes``,
    throughput and time spent waiting for data, for a window and for the epoch."""

    def __init__(self, global_batch: int) -> None:
        self.global_batch = global_batch
        self.epoch: dict[str, float] = defaultdict(float)
        self.window: dict[str, float] = defaultdict(float)
        self.epoch_steps = self.window_steps = 0
        self.epoch_wait = self.window_wait = 0.0
        self.epoch_start = self.window_start = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], wait: float, batch_classes: float) -> None:
        values = {k: float(v) for k, v in out.items() if v.numel() == 1 and k != "nonfinite"}
        values["batch_classes"] = batch_classes
        for key, value in values.items():
            self.epoch[key] += value
            self.window[key] += value
        self.epoch_steps += 1
        self.window_steps += 1
        self.epoch_wait += wait
        self.window_wait += wait

    @staticmethod
    def _summary(
        sums: dict[str, float], steps: int, wait: float, seconds: float, batch: int
    ) -> dict[str, float]:
        out = {k: v / max(steps, 1) for k, v in sums.items()}
        out["samples_per_s"] = steps * batch / max(seconds, 1e-9)
        out["data_wait"] = wait / max(seconds, 1e-9)
        return out

    def take_window(self) -> dict[str, float]:
        now = time.perf_counter()
        out = self._summary(
            self.window, self.window_steps, self.window_wait, now - self.window_start, self.global_batch
        )
        self.window, self.window_steps, self.window_wait, self.window_start = defaultdict(float), 0, 0.0, now
        return out

    def epoch_summary(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.epoch_start
        out = self._summary(self.epoch, self.epoch_steps, self.epoch_wait, seconds, self.global_batch)
        out["epoch_seconds"] = seconds
        return out


def _build_monitor(spec: dict[str, Any], device: torch.device) -> Any:
    from ..evaluate.monitor import Monitor

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
    )
    monitor.device = str(device)
    return monitor


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of every Ray Train worker (``TorchTrainer(train_loop_per_worker=...)``)."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    _quiet_worker_logs()
    cfg = validate(config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    t = cfg.train
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    torch.manual_seed(t.seed)  # identical initialisation on every worker
    model = build_model(cfg)
    # The random-init baseline of the monitor: this run's own point encoder before any step.
    initial_point = copy.deepcopy(model.point_q) if rank == 0 and config.get("monitor") else None
    if cfg.model.sync_bn:
        model.point_q = convert_sync_batchnorm(model.point_q)
        model.image_q = convert_sync_batchnorm(model.image_q)
    prepare_model(model, device, t.channels_last)
    optimizer = build_optimizer(cfg, model)
    torch.manual_seed(t.seed + rank)  # then per-worker randomness

    start_epoch, step = 0, 0
    history: dict[str, Any] = {"steps": [], "epochs": []}
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = read_checkpoint(d)
            restore(model, optimizer, state)
            if (Path(d) / HISTORY_FILE).is_file():
                history = json.loads((Path(d) / HISTORY_FILE).read_text())
        start_epoch, step = int(state["epoch"]), int(state["step"])
        if rank == 0:
            print(f"resumed from the checkpoint of epoch {start_epoch} (step {step})", flush=True)
    attempt_start_step = step

    net: torch.nn.Module = model
    if world > 1:
        device_ids = [device] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs())  # type: ignore[arg-type]

    tracker = Tracker(config.get("tracking_uri"), config.get("mlflow_run_id")) if rank == 0 else Tracker(None)
    # the cross-modal negatives come from all workers (global) or this worker's batch (local)
    cross_batch = cfg.train.batch_size if cfg.objective.cross_negatives == "global" else cfg.per_worker_batch
    o = cfg.objective
    chance = chance_levels(o.queue_length, cross_batch, (o.weight_point, o.weight_image, o.weight_cross))
    iid_classes = float(config.get("iid_batch_classes") or 0.0)
    monitor = None
    if initial_point is not None:
        monitor = _build_monitor(config["monitor"], device)
        if history.get("baseline") and history.get("baseline_spec") == config["monitor"]:
            monitor.baseline = history["baseline"]
        else:  # a new run, or a resume whose monitor reads other data: the same random init, measured anew
            print(f"monitor: {monitor.source}; measuring the random-init baseline ...", flush=True)
            history["baseline"] = monitor.set_baseline(initial_point)
            history["baseline_spec"] = config["monitor"]
            print(_baseline_line(history["baseline"]), flush=True)
            tracker.log_metrics({**history["baseline"], **chance, "iid_batch_classes": iid_classes}, step)
        initial_point = None

    shard = ray.train.get_dataset_shard("train")
    steps_per_epoch, total_steps = int(config["steps_per_epoch"]), int(config["steps_per_epoch"]) * t.epochs
    last_monitor: dict[str, float] = {key: float("nan") for key in MONITOR_KEYS}
    for past in history["epochs"]:
        last_monitor.update({k: past[k] for k in last_monitor if k in past})
    node_id = ray.get_runtime_context().get_node_id()

    for epoch in range(start_epoch, t.epochs):
        lr = lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        meter = EpochMeter(cfg.train.batch_size)
        momentum = momentum_at(cfg, step, total_steps)
        batches = iter(iter_train_batches(shard, cfg.per_worker_batch))
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            wait = time.perf_counter() - t0
            _maybe_inject_fault(cfg, rank, world, step, config["run_dir"])
            momentum = momentum_at(cfg, step, total_steps)
            if cfg.optim.schedule == "cosine_smooth":
                lr = lr_at(cfg, epoch, (step - epoch * steps_per_epoch) / max(steps_per_epoch, 1))
                for group in optimizer.param_groups:
                    group["lr"] = lr
            out = train_step(
                net,
                batch,
                optimizer,
                momentum,
                precision=t.precision,
                grad_clip=cfg.optim.grad_clip,
                channels_last=t.channels_last,
                normalize_images=cfg.data.image_augment.normalize,
                check_finite=True,
            )
            if "nonfinite" in out:
                bad = {k: float(out[k]) for k in LOSS_KEYS}
                ray.train.report({"epoch": epoch, "step": step, "nonfinite": 1.0, **bad})
                return {"status": "nonfinite", "epoch": epoch, "step": step, **bad}
            step += 1
            meter.add(out, wait, float(len(torch.unique(batch["label"]))) if "label" in batch else math.nan)
            if step % t.log_every == 0:
                window = meter.take_window()
                if rank == 0:
                    print(
                        _progress_line(epoch, t.epochs, step, steps_per_epoch, window, lr, momentum, chance),
                        flush=True,
                    )
                    tracker.log_metrics({**window, "lr": lr, "momentum": momentum}, step)
                    history["steps"].append({"step": step, "lr": lr, **{k: window[k] for k in LOSS_KEYS}})

        summary = meter.epoch_summary()
        warnings_ = _health_warnings(summary, iid_classes)
        if monitor is not None and ((epoch + 1) % cfg.eval.eval_every == 0 or epoch + 1 == t.epochs):
            summary.update(monitor(unwrap(model).point_q))
            last_monitor.update({k: summary[k] for k in last_monitor if k in summary})
            collapse = monitor.collapse_warning(summary)
            if collapse:
                warnings_.append(collapse)
        checksum = unwrap(model).queue.checksum()
        checksums = _gather_floats(checksum, device)
        node_ids = _gather_objects(node_id)
        metrics = {
            **summary,
            "epoch": epoch + 1,
            "step": step,
            "lr": lr,
            "momentum": momentum,
            **last_monitor,
            "queue_checksum": checksum,
            "queue_checksums": checksums,
            "rank": rank,
            "world_size": world,
            "node_id": node_id,
            "node_ids": node_ids,
            "attempt_start_step": attempt_start_step,
        }
        if rank == 0:
            history["epochs"].append(
                {
                    k: v
                    for k, v in metrics.items()
                    if isinstance(v, (int, float, list)) and (k not in MONITOR_KEYS or k in summary)
                }
            )
            print(_epoch_line(epoch, t.epochs, summary, iid_classes), flush=True)
            if any(k in summary for k in MONITOR_KEYS):
                print(_monitor_line(summary, history.get("baseline", {})), flush=True)
            for line in warnings_:
                print(line, flush=True)
            monitor_values = {k: v for k, v in summary.items() if k.startswith(("val_", "gain_"))}
            tracker.log_metrics(
                {f"epoch_{k}": v for k, v in summary.items() if k not in monitor_values} | monitor_values,
                step,
            )
            tmp = Path(tempfile.mkdtemp(prefix="crossmoco-ckpt-"))
            state = build_state(
                net,
                optimizer,
                cfg,
                epoch=epoch + 1,
                step=step,
                lr=lr,
                mlflow_run_id=tracker.run_id,
                run_name=config.get("run_name"),
                metrics=summary,
            )
            write_checkpoint(tmp / "ckpt", state, cfg)
            (tmp / "ckpt" / HISTORY_FILE).write_text(json.dumps(history))
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(tmp / "ckpt"),
                checkpoint_dir_name=f"epoch_{epoch + 1:04d}",
            )
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            ray.train.report(metrics)
    return {"status": "finished", "epoch": t.epochs, "step": step}


def _health_warnings(summary: dict[str, float], iid_classes: float) -> list[str]:
    """Warnings a user should see at the end of an epoch: unmixed batches, collapsing projections."""
    out = []
    classes = summary.get("batch_classes", math.nan)
    if iid_classes >= 2 and classes == classes and classes < BATCH_MIX_WARNING * iid_classes:
        out.append(
            f"warning: a worker batch held {classes:.1f} classes on average where an i.i.d. batch holds "
            f"{iid_classes:.1f}: the training data is not class-mixed (BatchNorm then normalises the class "
            "away and in-batch negatives share it). Re-run `crossmoco prepare` (it writes rows in random "
            "order) or raise data.shuffle_window_mb."
        )
    spread = summary.get("point_proj_spread", math.nan)
    if spread == spread and spread < 0.1:
        out.append(
            f"warning: the point projections are collapsing (unit-vector spread {spread:.3f}, ~1 when "
            "healthy): lower optim.lr or raise objective.temperature"
        )
    return out


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


def _progress_line(
    epoch: int,
    epochs: int,
    step: int,
    steps_per_epoch: int,
    w: dict[str, float],
    lr: float,
    m: float,
    chance: dict[str, float],
) -> str:
    in_epoch = step - epoch * steps_per_epoch
    return (
        f"epoch {epoch + 1}/{epochs} step {in_epoch}/{steps_per_epoch} | loss {w['loss']:.3f} "
        f"(point {w['loss_point']:.3f}/{chance['chance_loss_point']:.2f} "
        f"image {w['loss_image']:.3f}/{chance['chance_loss_image']:.2f} "
        f"cross {w['loss_cross']:.3f}/{chance['chance_loss_cross']:.2f} of chance) | "
        f"top-1 point {100 * w['point_top1']:.0f}% image {100 * w['image_top1']:.0f}% "
        f"cross {100 * w.get('cross_top1', math.nan):.0f}% | "
        f"classes/batch {w.get('batch_classes', math.nan):.1f} | "
        f"lr {lr:.2e} m {m:.4f} | {w['samples_per_s']:.1f} samples/s | data wait {100 * w['data_wait']:.0f}%"
    )


def _epoch_line(epoch: int, epochs: int, s: dict[str, float], iid_classes: float) -> str:
    iid = f" (i.i.d. {iid_classes:.1f})" if iid_classes else ""
    return (
        f"== epoch {epoch + 1}/{epochs} done in {s['epoch_seconds']:.0f}s | loss {s['loss']:.3f} | "
        f"top-1 point {100 * s['point_top1']:.0f}% image {100 * s['image_top1']:.0f}% "
        f"cross {100 * s.get('cross_top1', math.nan):.0f}% | align/uniform point "
        f"{s.get('point_align', math.nan):.2f}/{s.get('point_uniform', math.nan):.2f} | "
        f"classes/batch {s.get('batch_classes', math.nan):.1f}{iid} | "
        f"{s['samples_per_s']:.1f} samples/s | data wait {100 * s['data_wait']:.0f}%"
    )


def _monitor_line(s: dict[str, float], base: dict[str, float]) -> str:
    parts = []
    for key, name in (
        ("val_svm_clean", "clean SVM"),
        ("val_knn", "kNN"),
        ("val_svm_crosspoint", "CrossPoint SVM"),
    ):
        if key not in s:
            continue
        random = base.get(f"random_{key}", math.nan)
        gain = s[key] - random
        parts.append(f"{name} {_pct(s[key])} (random init {_pct(random)}, {100 * gain:+.1f})")
    rank, base_rank = s.get("val_feature_rank", math.nan), base.get("random_val_feature_rank", math.nan)
    return "   val: " + " | ".join(parts) + f" | feature rank {rank:.0f} (random init {base_rank:.0f})"


def _baseline_line(base: dict[str, float]) -> str:
    return (
        f"monitor, random init: clean SVM {_pct(base.get('random_val_svm_clean', math.nan))} | "
        f"kNN {_pct(base.get('random_val_knn', math.nan))} | "
        f"CrossPoint SVM {_pct(base.get('random_val_svm_crosspoint', math.nan))} "
        f"({base.get('random_monitor_seconds', math.nan):.0f}s)"
    )
