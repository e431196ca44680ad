"""The fine-tuning job (``crossmoco finetune cls`` and ``partseg``) in a Ray Train worker: what it plugs
into the worker skeleton (:mod:`crossmoco_ray.runs.worker`: restore, steps, checkpoints, callbacks), and
nothing else.

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

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossmoco_ray.checkpoints.state import STATE_FILE, load_torch_file
from crossmoco_ray.config.finetune import FinetuneConfig
from crossmoco_ray.data.pipeline.augment import rotation_about_y
from crossmoco_ray.finetune.model import PointClassifier, accuracies, classifier_head, smoothed_cross_entropy
from crossmoco_ray.nn import build_point_encoder, load_checked
from crossmoco_ray.nn.normalize import normalize_clouds
from crossmoco_ray.nn.precision import configure_kernels, resolve_precision
from crossmoco_ray.runs import worker as skeleton
from crossmoco_ray.runs.ddp import gather_objects, keeps_bucket_views, wrap_ddp
from crossmoco_ray.runs.worker import Context, RayTrainSession, WorkerSpec, run_worker

FORMAT = "crossmoco-ray/finetune-cls"
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
class FinetuneSpec(WorkerSpec):
    """What every fine-tuning worker is told: the config, the task, and object-store references to the data
    arrays and the encoder's weights (zero-copy on each node)."""

    cfg: FinetuneConfig | None = None
    task: str = "cls"
    data: Any = None  # ray.ObjectRef of {"train"/"val"/"test": arrays, "num_classes", "part_counts"}
    encoder: Any = None  # ray.ObjectRef of {"name", "kwargs", "state"}
    encoder_meta: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    part_counts: list[int] | None = None
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.cfg is not None:  # the samples of a step follow from the config, whoever builds the spec
            self.per_worker_batch = self.cfg.per_worker_batch
            self.workers = self.cfg.train.num_workers


class FinetuneJob:
    """The fine-tuning job's plug-ins for the worker skeleton."""

    def __init__(
        self, spec: FinetuneSpec, ctx: Context, data: dict[str, Any], encoder: dict[str, Any]
    ) -> None:
        assert spec.cfg is not None
        cfg = self.cfg = spec.cfg
        self.spec, self.task = spec, spec.task
        configure_kernels(tf32=cfg.train.tf32, deterministic=False)  # batches are seeded; kernels may vary
        torch.manual_seed(cfg.train.seed)  # the same head on every worker
        self.num_classes = int(data["num_classes"])  # classes, or parts
        if self.task == "partseg":
            if cfg.train.freeze_backbone:
                raise ValueError("train.freeze_backbone is for classification (a linear probe)")
            model = build_segmenter(encoder, cfg, self.num_classes, len(data["part_counts"]))
        else:
            model = build_classifier(encoder, cfg, self.num_classes)
        self.model = model.to(ctx.device)
        self.optimizer = build_optimizer(cfg, self.model)
        self.net = wrap_ddp(self.model, ctx.device, ctx.world)
        self.precision, why = resolve_precision(cfg.train.precision, ctx.device)
        if why:
            ctx.say(f"warning: {why}")
        self.train: tuple[np.ndarray, ...] = data["train"]  # (points, labels) or (points, categories, parts)
        self.eval_sets = {k: v for k, v in data.items() if k in ("val", "test")}
        self.pending: list[torch.Tensor] = []  # losses on the device, read once per window
        self.losses: list[float] = []  # the epoch's losses, read
        self.window_start = 0
        self.t0 = time.perf_counter()

    # checkpoints
    def restore(self, ctx: Context, directory: Path) -> int:
        state = load_torch_file(directory / STATE_FILE)  # one named error for a damaged file
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{directory} is not a fine-tuning checkpoint of this run")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    def write(self, ctx: Context, directory: Path, rngs: list[dict[str, Any]], epochs_done: int) -> None:
        state = {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": ctx.step,
            "epoch": ctx.step // ctx.steps_per_epoch,
            "config": self.cfg.model_dump(mode="json"),
            "encoder": dict(self.spec.encoder_meta),
            "class_names": self.spec.class_names,
            "task": self.task,
            "normalize": self.spec.normalize,
        }
        torch.save(state, directory / STATE_FILE)

    def after_restore(self, ctx: Context) -> None:
        pass

    # steps
    def start_epoch(self, ctx: Context, epoch: int, skip: int) -> Iterator[Any]:
        self.losses, self.pending, self.window_start = [], [], 0
        self.t0 = time.perf_counter()
        return iter(range(skip, ctx.steps_per_epoch))  # a batch is a pure function of (epoch, step)

    def step(self, ctx: Context, epoch: int, batch: Any, wait: float) -> None:
        self.pending.append(train_step(self, ctx, epoch, int(batch)))

    def _read(self) -> None:
        """The pending losses as numbers: one read from the device."""
        if self.pending:
            self.losses += torch.stack(self.pending).tolist()
            self.pending = []

    def take_window(self, ctx: Context) -> dict[str, float]:
        self._read()
        window = self.losses[self.window_start :]
        self.window_start = len(self.losses)
        rate = len(self.losses) * self.cfg.train.batch_size / max(time.perf_counter() - self.t0, 1e-9)
        return {"loss": float(np.mean(window)) if window else math.nan, "clouds_per_s": rate}

    def losses_finite(self, ctx: Context) -> bool:
        self._read()
        return all(math.isfinite(v) for v in self.losses)

    def log_window(self, ctx: Context, epoch: int, window: dict[str, float]) -> None:
        t, spe = self.cfg.train, ctx.steps_per_epoch
        step_in_epoch = ctx.step - epoch * spe
        print(
            f"epoch {epoch + 1}/{t.epochs} step {step_in_epoch}/{spe}: loss {window['loss']:.4f}  "
            f"{window['clouds_per_s']:.1f} clouds/s",
            flush=True,
        )
        ctx.tracker.log_metrics({"loss": window["loss"]}, ctx.step)

    def checkpoint_metrics(self, ctx: Context, epoch: int) -> dict[str, Any]:
        return {}

    # end of epoch
    def end_epoch(self, ctx: Context, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        self._read()
        seconds = time.perf_counter() - self.t0
        summary: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": ctx.step,
            "train_loss": float(np.mean(self.losses)) if self.losses else math.nan,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": seconds,
            "attempt_start_step": ctx.attempt_start_step,
        }
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            for split, arrays in self.eval_sets.items():
                summary |= {f"{split}_{k}": v for k, v in evaluate(self, ctx, arrays).items()}
        if ctx.rank == 0:
            ctx.history["epochs"].append(summary)
            evals = "  ".join(
                f"{s} "
                + " ".join(f"{METRIC_NAMES[m]} {100 * summary[f'{s}_{m}']:.2f}%" for m in METRICS[self.task])
                for s in ("val", "test")
                if f"{s}_{METRICS[self.task][0]}" in summary
            )
            print(
                f"epoch {epoch + 1}/{cfg.train.epochs}: loss {summary['train_loss']:.4f}  "
                f"lr {summary['lr']:.4g}  {seconds:.0f} s  {evals}",
                flush=True,
            )
            ctx.tracker.log_metrics(
                {k: v for k, v in summary.items() if k not in ("epoch", "step")}, ctx.step
            )
        return summary


def _autocast(job: FinetuneJob, device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.precision == "bf16")


def train_step(w: FinetuneJob, ctx: Context, epoch: int, step_in_epoch: int) -> torch.Tensor:
    """One step; returns its loss, detached, on the device (not read back: the loop reads losses once per
    log window)."""
    cfg = w.cfg
    pw = cfg.per_worker_batch
    rows = global_batch_indices(len(w.train[1]), cfg.train.batch_size, cfg.train.seed, epoch, step_in_epoch)
    rows = np.sort(rows[ctx.rank * pw : (ctx.rank + 1) * pw])
    rng = _seed(cfg.train.seed, epoch, step_in_epoch, ctx.rank)
    x, order = augment_batch(w.train[0][rows], cfg, w.spec.normalize, rng)
    x = x.to(ctx.device)
    y = torch.from_numpy(w.train[1][rows]).to(ctx.device)
    torch.manual_seed(int(rng.integers(2**62)))  # dropout
    lr = lr_at(cfg, ctx.step, ctx.total_steps, ctx.steps_per_epoch)
    for group in w.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    w.net.train()
    w.optimizer.zero_grad(set_to_none=not keeps_bucket_views(w.net))
    with _autocast(w, ctx.device):
        if w.task == "partseg":  # per-point logits [b, parts, n] against the sampled points' parts
            picked = np.take_along_axis(w.train[2][rows], order, axis=1).astype(np.int64)
            parts = torch.from_numpy(picked).to(ctx.device)
            logits = w.net(x, y).transpose(1, 2).reshape(-1, w.num_classes)
            y = parts.reshape(-1)
        else:
            logits = w.net(x)
    loss = smoothed_cross_entropy(logits, y, cfg.optim.label_smoothing)
    loss.backward()
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(w.model.parameters(), cfg.optim.grad_clip)
    w.optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate(w: FinetuneJob, ctx: Context, split: tuple[np.ndarray, ...]) -> dict[str, float]:
    """Over the whole split, each worker predicting its slice (collective): OA and mAcc, or instance and
    class mIoU (on the first ``data.num_points`` points of each shape)."""
    from crossmoco_ray.finetune.partseg import PartScheme, miou, shape_ious

    points, labels = split[0], split[1]
    n = w.cfg.data.num_points
    model = w.model.eval()
    mine = np.arange(ctx.rank, len(labels), ctx.world)
    scores = []  # per shape: the predicted class, or the shape's mean IoU
    for start in range(0, len(mine), w.cfg.train.test_batch_size):
        idx = mine[start : start + w.cfg.train.test_batch_size]
        x = torch.from_numpy(points[idx, :n]).to(ctx.device)
        if w.spec.normalize:
            x = normalize_clouds(x.double()).float()
        with _autocast(w, ctx.device):
            if w.task == "partseg":
                pred = model(x, torch.from_numpy(labels[idx]).to(ctx.device)).argmax(dim=1).cpu().numpy()
                scheme = PartScheme(tuple(map(str, w.spec.class_names)), tuple(w.spec.part_counts or []))
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


def finetune_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of every fine-tuning Ray Train worker (``cls`` and ``partseg``)."""
    import ray

    spec: FinetuneSpec = config["spec"]
    assert spec.cfg is not None
    t = spec.cfg.train
    ctx = skeleton.start(
        spec,
        RayTrainSession(),
        epochs=t.epochs,
        log_every=t.log_every,
        checkpoint_every=t.checkpoint_every_steps,
    )
    return run_worker(ctx, FinetuneJob(spec, ctx, ray.get(spec.data), ray.get(spec.encoder)))
