"""``crossmoco finetune cls | partseg`` on the driver: data and encoder checked and loaded before any
worker starts, then Ray Train (DDP, checkpoints, restarts, relaunch = resume), MLflow, and a report at
the end.

A run is ``<storage>/<name>``; relaunching the same name continues it from its newest checkpoint (Ray
Train's snapshot or ``progress.json``, as pretraining), mid-epoch included, in the same MLflow run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crossmoco_ray import storage
from crossmoco_ray.checkpoints.encoders import LoadedEncoder, load_point_encoder, random_encoder
from crossmoco_ray.checkpoints.resume import HISTORY_FILE
from crossmoco_ray.config.finetune import FinetuneConfig
from crossmoco_ray.errors import ConfigError, DataError
from crossmoco_ray.evaluate.features import EvalSplit, load_split
from crossmoco_ray.finetune.worker import METRIC_NAMES, METRICS, FinetuneSpec, finetune_loop
from crossmoco_ray.runs.identity import absolute, open_tracking, resolve_storage
from crossmoco_ray.runs.launcher import Launch, build_trainer, fit
from crossmoco_ray.runs.resources import check_resources, init_ray
from crossmoco_ray.runs.worker import StepCallback
from crossmoco_ray.tracking import default_tracking_uri
from crossmoco_ray.version import code_version

RUN_FILE = "finetune_run.json"
REPORT_FILE = "report.json"
DEFAULT_K = {"cls": 20, "partseg": 40}  # DGCNN's recipes (and CrossPoint's part segmentation)


def load_encoder(cfg: FinetuneConfig, checkpoint: str | None, task: str = "cls") -> LoadedEncoder:
    """The encoder to fine-tune: ``checkpoint`` (any format :func:`load_point_encoder` reads) or random
    init (``model.point_encoder``, ``model.k``, ``model.emb_dims``; seeded by ``train.seed``). Part
    segmentation takes a ``dgcnn_seg`` encoder (a random one whatever ``model.point_encoder`` says)."""
    m = cfg.model
    k = m.k or DEFAULT_K[task]
    if checkpoint is None:
        arch = "dgcnn_seg" if task == "partseg" else m.point_encoder
        kwargs: dict[str, Any] = {"emb_dims": m.emb_dims}
        if arch in ("dgcnn", "dgcnn_seg"):
            kwargs["k"] = k
        return random_encoder(arch, cfg.train.seed, **kwargs)
    loaded = load_point_encoder(checkpoint, k=k)
    if task == "partseg" and loaded.name != "dgcnn_seg":
        raise ValueError(
            f"{checkpoint} holds a {loaded.name} encoder; part segmentation fine-tunes CrossPoint's "
            "DGCNN_partseg: pretrain with model.point_encoder=dgcnn_seg (or start from random init)"
        )
    if m.k is not None and "k" in loaded.kwargs and loaded.kwargs["k"] != m.k:
        loaded.kwargs = {**loaded.kwargs, "k": m.k}  # the same weights on another graph size
    return loaded


def encoder_payload(loaded: LoadedEncoder) -> dict[str, Any]:
    """What the workers build the encoder from (plain tensors: no pickled modules)."""
    kwargs = dict(loaded.kwargs)
    if "edgeconv" in kwargs:
        kwargs["edgeconv"] = "fast"
    state = None if loaded.source == "random-init" else loaded.encoder.state_dict()
    return {"name": loaded.name, "kwargs": kwargs, "state": state}


def _carve(split: EvalSplit, fraction: float, seed: int) -> tuple[EvalSplit, EvalSplit]:
    """A seeded validation split of ``fraction`` of ``split`` (the rest stays for training)."""
    perm = np.random.default_rng(seed).permutation(len(split.labels))
    n_val = max(1, round(fraction * len(perm)))
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return (
        EvalSplit(split.points[train], split.labels[train], split.class_names, "train"),
        EvalSplit(split.points[val], split.labels[val], split.class_names, "val"),
    )


def load_data(
    cfg: FinetuneConfig, data: str, up_axis: Any = "y", variant: str | None = None, test_split: str = "test"
) -> dict[str, EvalSplit]:
    """The train split (and a carved val split) and the test split, checked against the config."""
    train = load_split(data, "train", up_axis=up_axis, variant=variant)
    test = load_split(data, test_split, up_axis=up_axis, variant=variant)
    for split in (train, test):
        if split.points.shape[1] < cfg.data.num_points:
            raise ConfigError(
                f"{data}: the {split.name} clouds have {split.points.shape[1]} points, data.num_points is "
                f"{cfg.data.num_points}: set data.num_points={split.points.shape[1]} or less"
            )
    classes = len(train.class_names)
    if int(test.labels.max()) >= classes or int(train.labels.max()) >= classes:
        raise DataError(data, f"labels go beyond the {classes} class names")
    out = {"train": train, "test": test}
    if cfg.data.val_fraction > 0:
        out["train"], out["val"] = _carve(train, cfg.data.val_fraction, 0)
    if len(out["train"].labels) < cfg.train.batch_size:
        raise ConfigError(
            f"{len(out['train'].labels)} training clouds, fewer than one batch: lower train.batch_size"
        )
    return out


def default_run_name(cfg: FinetuneConfig, data: str, checkpoint: str | None, task: str = "cls") -> str:
    ident = json.dumps(
        {"cfg": cfg.model_dump(mode="json"), "data": data, "init": checkpoint or "random"}, sort_keys=True
    )
    return f"finetune-{task}-{hashlib.sha256(ident.encode()).hexdigest()[:8]}"


def _flat(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def summarize(history: dict[str, Any], task: str = "cls") -> dict[str, Any]:
    """The report's numbers from the per-epoch history: the last epoch's test scores (the honest ones),
    the epoch chosen by validation (when there is a val split), and the best test epoch (what the papers
    report: a choice on the test set), plus the first evaluated epoch. Scores: OA and mAcc (cls),
    instance and class mIoU (partseg)."""
    a, b = METRICS[task]
    epochs = [e for e in history.get("epochs", []) if f"test_{a}" in e]
    if not epochs:
        return {}

    def scores(e: dict[str, Any]) -> dict[str, Any]:
        return {"epoch": e["epoch"], a: e[f"test_{a}"], b: e[f"test_{b}"]}

    out = {
        "epochs": epochs[-1]["epoch"],
        "final": scores(epochs[-1]),
        "first": scores(epochs[0]),
        "best_test": scores(max(epochs, key=lambda e: e[f"test_{a}"])),
        "curve": [[e["epoch"], e[f"test_{a}"]] for e in epochs],
    }
    with_val = [e for e in epochs if f"val_{a}" in e]
    if with_val:
        out["val_chosen"] = scores(max(with_val, key=lambda e: e[f"val_{a}"]))
    return out


def report_lines(report: dict[str, Any], task: str = "cls") -> list[str]:
    s = report.get("summary", {})
    if not s:
        return ["no epoch was evaluated"]
    a, b = METRICS[task]
    A, B = METRIC_NAMES[a], METRIC_NAMES[b]
    f, first = s["final"], s["first"]
    lines = [
        f"test {A} {100 * f[a]:.2f}%  {B} {100 * f[b]:.2f}%  after epoch {f['epoch']} (the last: no choice "
        "made on the test set)",
        f"after epoch {first['epoch']}: test {A} {100 * first[a]:.2f}%",
    ]
    if "val_chosen" in s:
        v = s["val_chosen"]
        lines.append(f"epoch {v['epoch']} (best on val): test {A} {100 * v[a]:.2f}%  {B} {100 * v[b]:.2f}%")
    best = s["best_test"]
    lines.append(
        f"best test {A} over epochs {100 * best[a]:.2f}% (epoch {best['epoch']}; what the papers report, a "
        "choice made on the test set)"
    )
    return lines


@dataclass
class TaskData:
    """What the workers train and score on: per split the arrays ``(points, labels[, parts])``."""

    arrays: dict[str, tuple[Any, ...]]
    class_names: list[str]  # classes (cls) or categories (partseg)
    num_outputs: int  # classes, or parts
    part_counts: list[int] | None = None

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v[1])}" for k, v in self.arrays.items())
        what = f"{self.num_outputs} parts in " if self.part_counts else ""
        return (
            f"{sizes} clouds, {what}{len(self.class_names)} {'categories' if self.part_counts else 'classes'}"
        )


def cls_data(cfg: FinetuneConfig, data: str, up_axis: Any, variant: str | None) -> TaskData:
    splits = load_data(cfg, data, up_axis, variant)
    names = splits["train"].class_names
    return TaskData({k: (v.points, v.labels) for k, v in splits.items()}, names, len(names))


def partseg_data(
    cfg: FinetuneConfig, data: str, where: str, log: Callable[[str], None]
) -> tuple[str, TaskData]:
    """ShapeNetPart-layout h5 (trainval / test), or ``synthetic``: the built-in part set, written once under
    ``<storage>/_builtin``."""
    from crossmoco_ray.finetune.partseg import load_part_split, part_scheme, write_synthetic_parts

    if data == "synthetic":
        data = f"{where}/_builtin/synthetic-parts-v1"
        log(f"built-in synthetic part set: {data}")
        write_synthetic_parts(data)
    scheme = part_scheme(data)
    splits = {
        "train": load_part_split(data, "trainval", scheme),
        "test": load_part_split(data, "test", scheme),
    }
    for name, split in splits.items():
        if split.points.shape[1] < cfg.data.num_points:
            raise ConfigError(
                f"{data}: the {name} shapes have {split.points.shape[1]} points, data.num_points is "
                f"{cfg.data.num_points}: set data.num_points={split.points.shape[1]} or less"
            )
    if len(splits["train"].category) < cfg.train.batch_size:
        raise ConfigError(f"{len(splits['train'].category)} training shapes, fewer than one batch")
    small = np.uint8 if scheme.num_parts <= 256 else np.int64  # ShapeNetPart's pids: 230 MB → 29 MB
    arrays = {k: (v.points, v.category, v.parts.astype(small)) for k, v in splits.items()}
    return data, TaskData(arrays, list(scheme.categories), scheme.num_parts, list(scheme.part_counts))


def finetune_cls(cfg: FinetuneConfig, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """Fine-tune (or resume fine-tuning) a classifier; returns (exit code, report)."""
    return finetune("cls", cfg, **kwargs)


def finetune_partseg(cfg: FinetuneConfig, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """Fine-tune (or resume fine-tuning) a part segmenter; returns (exit code, report)."""
    return finetune("partseg", cfg, **kwargs)


def finetune(
    task: str,
    cfg: FinetuneConfig,
    *,
    data: str,
    checkpoint: str | None = None,
    name: str | None = None,
    storage_path: str | None = None,
    up_axis: str = "y",
    variant: str | None = None,
    address: str | None = None,
    step_callbacks: Sequence[StepCallback] = (),
    log: Callable[[str], None] = print,
) -> tuple[int, dict[str, Any]]:
    """Fine-tune (or resume) ``task`` ("cls" or "partseg"): data and encoder checked on the driver, then
    Ray Train; returns (exit code, report)."""
    where = resolve_storage(storage_path)
    data_abs = absolute(data) or data
    checkpoint = absolute(checkpoint)
    loaded = load_encoder(cfg, checkpoint, task)
    normalize = loaded.normalize if cfg.data.normalize is None else cfg.data.normalize
    if task == "partseg":
        data_abs, task_data = partseg_data(cfg, data_abs, where, log)
    else:
        task_data = cls_data(cfg, data_abs, up_axis, variant)
    steps_per_epoch = len(task_data.arrays["train"][1]) // cfg.train.batch_size
    name = name or default_run_name(cfg, data_abs, checkpoint, task)
    run_dir = f"{where}/{name}"
    init = f"{loaded.source} {checkpoint}" if checkpoint else f"random init (seed {cfg.train.seed})"
    log(
        f"fine-tuning ({task}) {loaded.name} {loaded.kwargs} from {init}\n"
        f"data {data_abs}: {task_data.describe()}\n"
        f"{cfg.train.num_workers} workers × batch {cfg.per_worker_batch} (global {cfg.train.batch_size}), "
        f"{cfg.train.epochs} epochs × {steps_per_epoch} steps; storage {run_dir}"
    )

    local = init_ray(cfg, address, log)
    import ray

    check_resources(cfg, ray.cluster_resources(), local, log)
    tags = {**code_version(), "task": f"finetune-{task}", "init": checkpoint or "random", "data": data_abs}
    params = _flat(cfg.model_dump(mode="json")) | {"checkpoint": checkpoint or "random-init"}
    tracking_uri = default_tracking_uri(where, cfg.tracking.tracking_uri) if cfg.tracking.enabled else None
    tracker = open_tracking(tracking_uri, run_dir, RUN_FILE, cfg.tracking.experiment, name, params, tags)
    run_id = tracker.run_id
    if run_id:
        log(f"MLflow run {run_id} in {tracker.uri}")

    payload = {**task_data.arrays, "num_classes": task_data.num_outputs, "part_counts": task_data.part_counts}
    spec = FinetuneSpec(
        run_dir=run_dir,
        run_name=name,
        steps_per_epoch=steps_per_epoch,
        tracking_uri=tracker.uri,
        mlflow_run_id=run_id,
        step_callbacks=tuple(step_callbacks),
        cfg=cfg,
        task=task,
        data=ray.put(payload),
        encoder=ray.put(encoder_payload(loaded)),
        encoder_meta={
            "name": loaded.name,
            "kwargs": loaded.kwargs,
            "source": loaded.source,
            "checkpoint": checkpoint,
        },
        class_names=task_data.class_names,
        part_counts=task_data.part_counts,
        normalize=normalize,
    )
    launch = Launch(name=name, storage=where, worker=finetune_loop, spec=spec, train=cfg.train)
    report: dict[str, Any] = {
        "run_dir": run_dir,
        "mlflow_run_id": run_id,
        "init": checkpoint or "random-init",
    }
    result = fit(build_trainer(launch), tracker, run_dir, "fine-tuning", log)
    if result is None:
        return 1, report
    ret = result.return_value or {}
    if ret.get("status") == "nonfinite":
        tracker.end("FAILED")
        log(
            f"stopped: the loss became NaN/Inf in epoch {ret['epoch'] + 1}, by step {ret['step']}: lower "
            "optim.lr or set optim.grad_clip (e.g. 1.0); relaunching the same command resumes from the last "
            "good checkpoint"
        )
        return 3, report
    if result.checkpoint is None:
        tracker.end("FAILED")
        log("fine-tuning produced no checkpoint")
        return 1, report
    with result.checkpoint.as_directory() as ckpt:
        history = storage.read_json(str(Path(ckpt) / HISTORY_FILE)) or {}
    report |= {
        "task": task,
        "summary": summarize(history, task),
        "history": history,
        "checkpoint": result.checkpoint.path,
        "data": data_abs,
        "num_points": cfg.data.num_points,
        "config": cfg.model_dump(mode="json"),
    }
    storage.write_json(f"{run_dir}/{REPORT_FILE}", report)
    for line in report_lines(report, task):
        log(line)
    s = report["summary"]
    if s:
        a, b = METRICS[task]
        finals = {f"final_test_{a}": s["final"][a], f"final_test_{b}": s["final"][b]}
        tracker.log_metrics({**finals, f"best_test_{a}": s["best_test"][a]}, int(s["epochs"]))
    tracker.end("FINISHED")
    log(f"report: {run_dir}/{REPORT_FILE}; checkpoint: {result.checkpoint.path}")
    return 0, report
