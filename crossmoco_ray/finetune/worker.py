"""The Ray Train worker loop of ``crossmoco finetune`` (``cls`` and ``partseg``).

Every batch is a pure function of (seed, epoch, step): the epoch's permutation of the training set is
seeded by (seed, epoch), global batch ``s`` is its ``s``-th slice and worker ``r`` takes the ``r``-th part
of it; the points each worker samples and its augmentations and dropout are seeded by (seed, epoch, step,
rank). So two workers see exactly what one process would see in the same global batch, and a restart
(a lost worker, a relaunch) continues at the step of its checkpoint, mid-epoch included, with the batches
an uninterrupted run would have had. The data arrays come from the driver through Ray's object store
(zero-copy numpy on each node), so no worker reads the source itself.

Every ``train.eval_every`` epochs the test split (and the validation split, if one was carved) is scored
by all workers, each a slice, gathered on rank 0: overall accuracy (OA) and mean class accuracy (mAcc),
or for parts the instance and class mIoU (:mod:`.partseg`).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossmoco_ray.checkpoints.resume import checkpoint_name, resume_point, write_progress
from crossmoco_ray.checkpoints.state import load_torch_file
from crossmoco_ray.config.finetune import FinetuneConfig, validate_finetune
from crossmoco_ray.data.pipeline.augment import rotation_about_y
from crossmoco_ray.evaluate.features import normalize_clouds
from crossmoco_ray.finetune.model import PointClassifier, accuracies, classifier_head, smoothed_cross_entropy
from crossmoco_ray.nn import build_point_encoder, load_checked
from crossmoco_ray.nn.precision import configure_kernels, resolve_precision
from crossmoco_ray.pretrain.step import keeps_bucket_views
from crossmoco_ray.runs.ddp import all_ranks, gather_objects, maybe_inject_fault, start_worker, wrap_ddp
from crossmoco_ray.tracking import Tracker

FORMAT = "crossmoco-ray/finetune-cls"
STATE_FILE = "state.pt"  # the name train.resume looks for
HISTORY_FILE = "history.json"
PRIORITY = "checkpoint_priority"
SEG_HEAD_MODULES = ("conv7", "conv8", "conv9", "conv10", "conv11")
METRICS = {"cls": ("oa", "macc"), "partseg": ("ins_miou", "cls_miou")}  # the first one is the headline
METRIC_NAMES = {"oa": "OA", "macc": "mAcc", "ins_miou": "instance mIoU", "cls_miou": "class mIoU"}


def lr_at(cfg: FinetuneConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Per-step cosine from ``optim.lr`` to ``optim.min_lr`` after a linear warm-up (or constant)."""
    o = cfg.optim
    warm = int(o.warmup_epochs * steps_per_epoch)
    if step < warm:
        return o.lr * (step + 1) / warm
    if o.schedule == "constant":
        return o.lr
    frac = (step - warm) / max(1, total - warm)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


def global_batch_indices(n: int, batch: int, seed: int, epoch: int, step: int) -> np.ndarray:
    """The rows of global batch ``step`` of ``epoch`` (drop-last: every batch is full)."""
    perm = _seed(seed, epoch).permutation(n)
    return perm[step * batch : (step + 1) * batch]


def augment_batch(
    points: np.ndarray, cfg: FinetuneConfig, normalize: bool, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    """A training batch ``[b, P, 3]`` → ``[b, num_points, 3]``: a random subset in random order (DGCNN
    shuffles the points), unit sphere, per-axis scale and shift, optional rotation and jitter; and the
    points' indices ``[b, num_points]`` (per-point labels follow them)."""
    d = cfg.data
    b, P, _ = points.shape
    order = np.argsort(rng.random((b, P)), axis=1)[:, : d.num_points]
    picked = torch.from_numpy(np.take_along_axis(points, order[:, :, None], axis=1))
    if normalize:
        picked = normalize_clouds(picked.double())
    x: np.ndarray = picked.float().numpy()
    x = x * rng.uniform(d.scale_low, d.scale_high, size=(b, 1, 3)).astype(np.float32)
    x = x + rng.uniform(-d.shift, d.shift, size=(b, 1, 3)).astype(np.float32)
    if d.rotate:
        R = rotation_about_y(np.asarray(rng.uniform(0.0, 2.0 * np.pi, size=b))).astype(np.float32)
        x = x @ R.transpose(0, 2, 1)
    if d.jitter_std > 0:
        noise = rng.normal(0.0, d.jitter_std, size=x.shape).astype(np.float32)
        x = x + np.clip(noise, -5 * d.jitter_std, 5 * d.jitter_std)
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)), order


def build_encoder(spec: dict[str, Any]) -> torch.nn.Module:
    """The encoder of ``spec``: its weights (strict, but for the unused projection head), or random init."""
    encoder = build_point_encoder(spec["name"], **spec["kwargs"])
    if spec.get("state") is not None:
        heads = [k for k in encoder.state_dict() if k.startswith("inv_head.")]
        load_checked(encoder, spec["state"], allowed_missing=heads, what="the encoder's weights")
    return encoder


def build_segmenter(spec: dict[str, Any], cfg: FinetuneConfig, num_parts: int, num_categories: int) -> Any:
    """``DGCNN_partseg``: the ``dgcnn_seg`` encoder of ``spec`` and a fresh segmentation head."""
    from crossmoco_ray.nn.dgcnn_seg import DGCNNSeg, PartSegmenter

    encoder = build_encoder(spec)
    if not isinstance(encoder, DGCNNSeg):
        raise ValueError(
            "part segmentation fine-tunes a dgcnn_seg encoder (CrossPoint's DGCNN_partseg), not "
            f"{spec['name']}: pretrain with model.point_encoder=dgcnn_seg, or start from random init"
        )
    return PartSegmenter(encoder, num_parts, num_categories, cfg.model.dropout)


def build_classifier(spec: dict[str, Any], cfg: FinetuneConfig, num_classes: int) -> PointClassifier:
    """The encoder of ``spec`` (its weights, or random init) and a fresh head."""
    encoder = build_encoder(spec)
    feat = int(encoder.feature_dim)  # type: ignore[arg-type]
    head = classifier_head(feat, num_classes, cfg.model.head, cfg.model.dropout)
    return PointClassifier(encoder, head, frozen=cfg.train.freeze_backbone)


def build_optimizer(cfg: FinetuneConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Two groups: the head at ``optim.lr`` and the encoder at ``optim.lr × optim.backbone_lr_scale``."""
    o = cfg.optim
    if isinstance(model, PointClassifier):
        head, encoder = list(model.head.parameters()), list(model.encoder.parameters())
    else:  # PartSegmenter: the encoder's modules sit at its top level
        own = {id(p) for name in SEG_HEAD_MODULES for p in getattr(model, name).parameters()}
        head = [p for p in model.parameters() if id(p) in own]
        encoder = [p for p in model.parameters() if id(p) not in own]
    groups = [{"params": head, "lr_scale": 1.0}]
    if not cfg.train.freeze_backbone and o.backbone_lr_scale > 0:
        groups.append({"params": encoder, "lr_scale": o.backbone_lr_scale})
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)


@dataclass
class FinetuneWorker:
    cfg: FinetuneConfig
    config: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # PointClassifier or PartSegmenter
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tracker: Tracker
    train: tuple[np.ndarray, ...]  # (points, labels) or (points, categories, parts)
    eval_sets: dict[str, tuple[np.ndarray, ...]]
    num_classes: int  # classes, or parts
    normalize: bool
    steps_per_epoch: int
    run_dir: str
    task: str = "cls"
    precision: str = "fp32"
    step: int = 0
    attempt_start_step: int = 0  # where this start of the worker group began (0, or a checkpoint's step)
    history: dict[str, Any] = field(default_factory=lambda: {"epochs": []})

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs


def build(config: dict[str, Any]) -> FinetuneWorker:
    import ray

    rank, world, device = start_worker()
    cfg = validate_finetune(config["config"])
    configure_kernels(tf32=cfg.train.tf32, deterministic=False)  # batches are seeded; kernels may vary
    data = ray.get(config["data"])
    torch.manual_seed(cfg.train.seed)  # the same head on every worker
    task = config.get("task", "cls")
    spec = ray.get(config["encoder"])
    if task == "partseg":
        model = build_segmenter(spec, cfg, data["num_classes"], len(data["part_counts"])).to(device)
        if cfg.train.freeze_backbone:
            raise ValueError("train.freeze_backbone is for classification (a linear probe)")
    else:
        model = build_classifier(spec, cfg, data["num_classes"]).to(device)
    optimizer = build_optimizer(cfg, model)
    net = wrap_ddp(model, device, world)
    precision, why = resolve_precision(cfg.train.precision, device)
    if why and rank == 0:
        print(f"warning: {why}", flush=True)
    tracker = Tracker(config.get("tracking_uri"), config.get("mlflow_run_id")) if rank == 0 else Tracker(None)
    return FinetuneWorker(
        cfg=cfg,
        config=config,
        rank=rank,
        world=world,
        device=device,
        model=model,
        net=net,
        optimizer=optimizer,
        tracker=tracker,
        train=data["train"],
        eval_sets={k: v for k, v in data.items() if k in ("val", "test")},
        num_classes=data["num_classes"],
        task=task,
        normalize=bool(config["normalize"]),
        steps_per_epoch=int(config["steps_per_epoch"]),
        run_dir=config["run_dir"],
        precision=precision,
    )


def restore(w: FinetuneWorker) -> None:
    import ray.train

    from crossmoco_ray import storage

    registered = ray.train.get_checkpoint()
    point = resume_point(w.run_dir, w.steps_per_epoch, registered.path if registered else None)
    if point.checkpoint is None:
        return
    with tempfile.TemporaryDirectory(prefix="crossmoco-restore-") as tmp:
        local = Path(point.checkpoint)
        if "://" in point.checkpoint or not local.is_dir():
            local = storage.copy_to_local(point.checkpoint, tmp)
        state = load_torch_file(local / STATE_FILE)  # one named error for a damaged file
        if state.get("format") != FORMAT:
            raise ValueError(f"{point.checkpoint} is not a fine-tuning checkpoint of this run")
        w.model.load_state_dict(state["model"])
        w.optimizer.load_state_dict(state["optimizer"])
        w.history = storage.read_json(str(local / HISTORY_FILE)) or {}
    w.step = w.attempt_start_step = int(state["step"])
    if w.rank == 0:
        spe = w.steps_per_epoch
        print(f"resumed from {point.checkpoint}: epoch {w.step // spe + 1}, step {w.step % spe}", flush=True)


def _autocast(w: FinetuneWorker) -> Any:
    return torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.precision == "bf16")


def train_step(w: FinetuneWorker, epoch: int, step_in_epoch: int) -> torch.Tensor:
    """One step; returns its loss, detached, on the device (not read back: the loop reads losses once per
    log window)."""
    cfg = w.cfg
    pw = cfg.per_worker_batch
    rows = global_batch_indices(len(w.train[1]), cfg.train.batch_size, cfg.train.seed, epoch, step_in_epoch)
    rows = np.sort(rows[w.rank * pw : (w.rank + 1) * pw])
    rng = _seed(cfg.train.seed, epoch, step_in_epoch, w.rank)
    x, order = augment_batch(w.train[0][rows], cfg, w.normalize, rng)
    x = x.to(w.device)
    y = torch.from_numpy(w.train[1][rows]).to(w.device)
    torch.manual_seed(int(rng.integers(2**62)))  # dropout
    lr = lr_at(cfg, w.step, w.total_steps, w.steps_per_epoch)
    for group in w.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    w.net.train()
    w.optimizer.zero_grad(set_to_none=not keeps_bucket_views(w.net))
    with _autocast(w):
        if w.task == "partseg":  # per-point logits [b, parts, n] against the sampled points' parts
            picked = np.take_along_axis(w.train[2][rows], order, axis=1).astype(np.int64)
            parts = torch.from_numpy(picked).to(w.device)
            logits = w.net(x, y).transpose(1, 2).reshape(-1, w.num_classes)
            y = parts.reshape(-1)
        else:
            logits = w.net(x)
    loss = smoothed_cross_entropy(logits, y, cfg.optim.label_smoothing)
    loss.backward()
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(w.model.parameters(), cfg.optim.grad_clip)
    w.optimizer.step()
    w.step += 1
    return loss.detach()


@torch.no_grad()
def evaluate(w: FinetuneWorker, split: tuple[np.ndarray, ...]) -> dict[str, float]:
    """Over the whole split, each worker predicting its slice (collective): OA and mAcc, or instance and
    class mIoU (on the first ``data.num_points`` points of each shape)."""
    from crossmoco_ray.finetune.partseg import PartScheme, miou, shape_ious

    points, labels = split[0], split[1]
    n = w.cfg.data.num_points
    model = w.model.eval()
    mine = np.arange(w.rank, len(labels), w.world)
    scores = []  # per shape: the predicted class, or the shape's mean IoU
    for start in range(0, len(mine), w.cfg.train.test_batch_size):
        idx = mine[start : start + w.cfg.train.test_batch_size]
        x = torch.from_numpy(points[idx, :n]).to(w.device)
        if w.normalize:
            x = normalize_clouds(x.double()).float()
        with _autocast(w):
            if w.task == "partseg":
                pred = model(x, torch.from_numpy(labels[idx]).to(w.device)).argmax(dim=1).cpu().numpy()
                scheme = PartScheme(tuple(map(str, w.config["class_names"])), tuple(w.config["part_counts"]))
                scores.append(shape_ious(pred, split[2][idx, :n], labels[idx], scheme))
            else:
                scores.append(model(x).argmax(dim=1).cpu().numpy())
    mine_scores = np.concatenate(scores) if scores else np.zeros(0)
    gathered = gather_objects((mine, mine_scores))
    order = np.concatenate([g[0] for g in gathered])
    values = np.empty(len(labels), np.float64 if w.task == "partseg" else np.int64)
    values[order] = np.concatenate([g[1] for g in gathered])
    if w.task == "partseg":
        ins, cls = miou(values, labels)
        return {"ins_miou": ins, "cls_miou": cls}
    oa, macc = accuracies(values, labels, w.num_classes)
    return {"oa": oa, "macc": macc}


def save(w: FinetuneWorker, metrics: dict[str, Any]) -> None:
    """A checkpoint (collective: every rank reports; rank 0 writes)."""
    import ray.train
    from ray.train import Checkpoint

    name = checkpoint_name(w.step, w.steps_per_epoch)
    if w.rank != 0:
        ray.train.report(metrics)
        return
    tmp = Path(tempfile.mkdtemp(prefix="crossmoco-ft-ckpt-"))
    try:
        state = {
            "format": FORMAT,
            "model": w.model.state_dict(),
            "optimizer": w.optimizer.state_dict(),
            "step": w.step,
            "epoch": w.step // w.steps_per_epoch,
            "config": w.cfg.model_dump(mode="json"),
            "encoder": {k: v for k, v in w.config["encoder_meta"].items()},
            "class_names": w.config["class_names"],
            "task": w.task,
            "normalize": w.normalize,
        }
        torch.save(state, tmp / STATE_FILE)
        (tmp / HISTORY_FILE).write_text(json.dumps(w.history))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_progress(w.run_dir, name, w.step, w.step // w.steps_per_epoch)


def _read_losses(w: FinetuneWorker, losses: list[torch.Tensor], epoch: int) -> list[float]:
    """The losses as numbers (one read from the device), checked finite on every rank (collective)."""
    values = torch.stack(losses).tolist() if losses else []
    if not all_ranks(all(math.isfinite(v) for v in values), w.device):
        raise FloatingPointError(
            f"the loss became NaN/Inf in epoch {epoch + 1}, by step {w.step}: lower optim.lr or set "
            "optim.grad_clip (e.g. 1.0)"
        )
    return values


def end_epoch(w: FinetuneWorker, epoch: int, losses: list[float], seconds: float) -> None:
    cfg = w.cfg
    summary: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": w.step,
        "train_loss": float(np.mean(losses)) if losses else math.nan,
        "lr": w.optimizer.param_groups[0]["lr"],
        "epoch_seconds": seconds,
        "attempt_start_step": w.attempt_start_step,
    }
    if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
        for split, arrays in w.eval_sets.items():
            summary |= {f"{split}_{k}": v for k, v in evaluate(w, arrays).items()}
    if w.rank == 0:
        w.history["epochs"].append(summary)
        evals = "  ".join(
            f"{s} " + " ".join(f"{METRIC_NAMES[m]} {100 * summary[f'{s}_{m}']:.2f}%" for m in METRICS[w.task])
            for s in ("val", "test")
            if f"{s}_{METRICS[w.task][0]}" in summary
        )
        print(
            f"epoch {epoch + 1}/{cfg.train.epochs}: loss {summary['train_loss']:.4f}  "
            f"lr {summary['lr']:.4g}  {seconds:.0f} s  {evals}",
            flush=True,
        )
        w.tracker.log_metrics({k: v for k, v in summary.items() if k not in ("epoch", "step")}, w.step)
    save(w, {**summary, PRIORITY: epoch + 1})


def finetune_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of every Ray Train worker of ``crossmoco finetune cls``."""
    w = build(config)
    restore(w)
    t, spe = w.cfg.train, w.steps_per_epoch
    for epoch in range(w.step // spe, t.epochs):
        losses: list[float] = []  # read back once per log window, before a checkpoint and at the end
        pending: list[torch.Tensor] = []
        t0 = time.perf_counter()
        for step_in_epoch in range(w.step % spe, spe):
            maybe_inject_fault(w.rank, w.world, w.step, w.run_dir)
            pending.append(train_step(w, epoch, step_in_epoch))
            every = t.checkpoint_every_steps
            checkpoint_now = every is not None and w.step % every == 0 and w.step % spe != 0
            if w.step % t.log_every == 0 or checkpoint_now:
                losses += _read_losses(w, pending, epoch)
                pending = []
            if w.rank == 0 and w.step % t.log_every == 0:
                rate = len(losses) * w.cfg.train.batch_size / (time.perf_counter() - t0)
                print(
                    f"epoch {epoch + 1}/{t.epochs} step {step_in_epoch + 1}/{spe}: loss "
                    f"{np.mean(losses[-t.log_every :]):.4f}  {rate:.1f} clouds/s",
                    flush=True,
                )
                w.tracker.log_metrics({"loss": float(np.mean(losses[-t.log_every :]))}, w.step)
            if checkpoint_now:
                save(w, {"epoch": epoch, "step": w.step, PRIORITY: -1})
        losses += _read_losses(w, pending, epoch)
        end_epoch(w, epoch, losses, time.perf_counter() - t0)
    return {"status": "finished", "step": w.step}
