"""The configuration: one typed schema, YAML presets, dotted overrides, checks that say the fix.

Resolution order: the schema's defaults (the CrossMoCo paper recipe, METHOD.md §2.2) ← a preset from
``crossmoco_ray/configs/`` ← a user's YAML file ← ``section.key=value`` overrides. Unknown keys are
rejected with the nearest valid name; cross-field checks (queue length vs global batch, batch vs
workers, k vs points, …) run before anything is built and name the fix.

This module imports only pydantic and yaml: it is the top layer of the project.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PRESET = "quickstart"  # what the commands run when no preset is named


class ConfigError(ValueError):
    """A configuration problem; the message says what is wrong and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Encoders and heads (METHOD.md §1.1–1.5)."""

    point_encoder: Literal["dgcnn", "pointnet"] = "dgcnn"
    k: int = Field(15, gt=0, description="DGCNN neighbours per point (the point itself included)")
    emb_dims: int = Field(1024, gt=0, description="last point-encoder conv width; DGCNN feature = 2x this")
    point_head_hidden: int = Field(1024, gt=0)
    image_encoder: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet50"
    image_weights: str | None = Field(
        None, description="local torchvision state dict for the image trunk; null = random init (paper)"
    )
    image_head_hidden: int = Field(512, gt=0)
    proj_dim: int = Field(256, gt=0, description="projection (embedding) dimension of both heads")
    edgeconv: Literal["fast", "reference"] = Field(
        "fast", description="fast: per-point EdgeConv (same function, less time and memory)"
    )
    sync_bn: bool = Field(False, description="SyncBatchNorm in the online encoders (CUDA only)")


class ObjectiveConfig(_Section):
    """The CrossMoCo objective (METHOD.md §2.4)."""

    queue_length: int = Field(4000, gt=0, description="keys per queue K; a multiple of the global batch")
    momentum: float = Field(0.9999, ge=0.0, lt=1.0, description="key-encoder momentum m")
    momentum_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: m rises from `momentum` to 1 over training (BYOL-style)"
    )
    temperature: float = Field(0.1, gt=0.0, description="InfoNCE temperature T")
    cross_temperature: float = Field(0.1, gt=0.0, description="NT-Xent temperature of the cross-modal term")
    weight_point: float = Field(1.0, ge=0.0)
    weight_image: float = Field(1.0, ge=0.0)
    weight_cross: float = Field(1.0, ge=0.0)
    shuffle_bn: bool = Field(True, description="shuffle key batches across workers (no-op on one worker)")
    cross_negatives: Literal["global", "local"] = Field(
        "global", description="global: cross-modal negatives from all workers (= one-process maths)"
    )


class PointAugmentConfig(_Section):
    """CrossPoint's point augmentation, applied to each of the two point views independently (§1.9)."""

    normalize: bool = Field(True, description="centre and scale to the unit sphere first")
    scale_low: float = Field(0.5, gt=0.0)
    scale_high: float = Field(2.0, gt=0.0)
    rotate: bool = Field(True, description="random rotation about the up (y) axis, U(0, 2π)")
    translate: float = Field(0.5, ge=0.0, description="per-axis offset U(−t, t) × that axis's extent")
    jitter_std: float = Field(0.01, ge=0.0)
    jitter_clip: float = Field(0.05, ge=0.0)
    dropout_max: float = Field(0.875, ge=0.0, lt=1.0, description="input dropout ratio ~ U(0, max)")


class ImageAugmentConfig(_Section):
    """CrossPoint's image augmentation (resize, ColorJitter, horizontal flip, ImageNet normalisation)."""

    brightness: float = Field(0.4, ge=0.0)
    contrast: float = Field(0.4, ge=0.0)
    saturation: float = Field(0.4, ge=0.0)
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")
    normalize: bool = Field(True, description="ImageNet mean/std normalisation (in the training step)")


class RenderConfig(_Section):
    """Views rendered from the points for sources without images (prepare time)."""

    azimuths: list[float] = Field(default_factory=lambda: [0.0, 60.0, 120.0, 180.0, 240.0, 300.0])
    elevations: list[float] = Field(default_factory=lambda: [20.0])
    size: int = Field(128, ge=8, description="rendered image side (resized to data.image_size when read)")
    point_size: int = Field(2, ge=1)
    mode: Literal["depth", "coords"] = "depth"


class DataConfig(_Section):
    """What the workers are fed."""

    source: str | None = Field(
        None, description="prepared shards (directory or URI); null = the built-in synthetic set"
    )
    num_points: int = Field(2048, gt=0, description="points per cloud fed to the encoder")
    image_size: int = Field(224, gt=0, description="views are resized to this square size")
    views_per_sample: int = Field(2, ge=2, description="distinct rendered views per object per step")
    synthetic_train: int = Field(2000, gt=0, description="built-in set: training objects")
    synthetic_test: int = Field(500, gt=0, description="built-in set: test objects")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="validation split carved from train")
    read_batch: int = Field(64, gt=0, description="rows per decode/augment task in the Ray Data pipeline")
    shuffle_window_mb: float = Field(
        256.0,
        gt=0.0,
        description="rows mixed together per read task (row groups from anywhere in the split, a new order "
        "every epoch); bounds the read's memory; 256 MiB holds all of ModelNet40's train shards",
    )
    object_store_mb: int = Field(
        1024, gt=0, description="object-store budget of the streaming pipeline (bounds an epoch's memory)"
    )
    point_augment: PointAugmentConfig = PointAugmentConfig()
    image_augment: ImageAugmentConfig = ImageAugmentConfig()
    render: RenderConfig = RenderConfig()


class OptimConfig(_Section):
    """Optimizer and learning-rate schedule."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-6, ge=0.0)
    sgd_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "cosine_smooth", "constant"] = Field(
        "cosine",
        description="cosine: CrossPoint's per-epoch cosine, stepped at each epoch start (the last epoch runs "
        "at min_lr); cosine_smooth: per-step cosine (better for short runs)",
    )
    warmup_epochs: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0, description="clip the global gradient norm; null = off")


class TrainConfig(_Section):
    """How training runs: size, workers, precision, checkpoints."""

    epochs: int = Field(125, gt=0)
    batch_size: int = Field(20, gt=0, description="GLOBAL batch over all workers")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (DDP processes)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    data_cpus: float = Field(1.0, ge=0.0, description="CPUs kept free for Ray Data tasks")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast on CUDA")
    channels_last: bool = Field(False, description="channels-last image tensors on CUDA")
    seed: int = 1
    deterministic: bool = Field(
        False, description="seed the augmentations and use deterministic kernels (exact reruns and resumes)"
    )
    log_every: int = Field(20, gt=0, description="steps between progress reports")
    keep_checkpoints: int = Field(2, gt=0)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers on nodes"
    )
    fault_at_step: int | None = Field(
        None, ge=0, description="testing aid: the last worker's process dies at this step, once per run"
    )


class EvalConfig(_Section):
    """Evaluation protocols (METHOD.md §1.11–1.12) and the in-training monitor."""

    data: str | None = Field(
        None,
        description="labelled data for the monitor and the final evaluation (prepared shards or a source "
        "such as ModelNet40's h5); null = the pretraining data's val/test splits",
    )
    up_axis: Literal["x", "y", "z"] = Field("y", description="up axis of eval.data when it is a raw source")
    val_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="when eval.data has no 'val' split, the monitor carves this much of its train split",
    )
    svm_c: float = Field(
        0.1, gt=0.0, description="C of the CrossPoint-protocol monitor SVM (raw features; CrossPoint: 0.1)"
    )
    knn_k: int = Field(20, gt=0, description="neighbours of the monitor's kNN (cosine, weighted votes)")
    eval_every: int = Field(1, gt=0, description="epochs between monitor runs")
    num_points: int = Field(1024, gt=0, description="points per cloud for SVM features (CrossPoint: 1024)")
    monitor_samples: int = Field(2000, gt=0, description="bound on samples the monitor embeds per split")
    monitor_crosspoint: bool = Field(
        True, description="also run CrossPoint's raw-feature SVM in the monitor (the papers' protocol)"
    )
    final: bool = Field(True, description="after training: SVM on val and test, pretrained vs random init")


class TuneConfig(_Section):
    """Hyperparameter search."""

    num_samples: int = Field(8, gt=0)
    scheduler: Literal["asha", "fifo"] = "asha"
    metric: str = Field(
        "val_svm_clean",
        description="what trials are ranked by: val_svm_clean (clean-protocol SVM on val), val_knn, "
        "val_svm_crosspoint (the papers' raw-feature SVM), gain_val_svm_clean, …",
    )
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, gt=0, description="ASHA: epochs before a trial may be stopped")
    reduction_factor: float = Field(
        2.0, gt=1.0, description="ASHA: keep 1/reduction_factor of trials per rung"
    )
    max_concurrent_trials: int | None = Field(None, gt=0)


class TrackingConfig(_Section):
    """MLflow tracking."""

    enabled: bool = True
    experiment: str = "crossmoco"
    run_name: str | None = None
    tracking_uri: str | None = Field(
        None, description="null: MLFLOW_TRACKING_URI, else sqlite under the run's storage path"
    )


class Config(_Section):
    """The whole configuration. Defaults are CrossMoCo's published recipe."""

    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tune: TuneConfig = TuneConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _cross_field_checks(self) -> Config:
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def per_worker_batch(self) -> int:
        return self.train.batch_size // self.train.num_workers


def _multiples_near(value: int, step: int) -> tuple[list[int], list[int]]:
    """(the multiples of ``step`` just below and above ``value``, round ones: multiples of lcm(step, 100))."""
    lo = (value // step) * step
    nearest = [m for m in (lo, lo + step) if m > 0]
    round_step = math.lcm(step, 100)
    rlo = (value // round_step) * round_step
    round_ = [m for m in (rlo, rlo + round_step) if m > 0 and m not in nearest]
    return nearest, round_


def cross_field_problems(cfg: Config) -> list[str]:
    """Every cross-field inconsistency of ``cfg``, each with its fix."""
    problems: list[str] = []
    t, o, m, d = cfg.train, cfg.objective, cfg.model, cfg.data
    if t.batch_size % t.num_workers:
        divisors = [w for w in range(1, t.batch_size + 1) if t.batch_size % w == 0]
        nearest_batches = _multiples_near(t.batch_size, t.num_workers)[0]
        problems.append(
            f"train.batch_size={t.batch_size} (the global batch) does not split evenly over "
            f"train.num_workers={t.num_workers}; use num_workers in {divisors} or a batch_size that is a "
            f"multiple of {t.num_workers} (e.g. {' or '.join(map(str, nearest_batches))})"
        )
    elif t.batch_size // t.num_workers < 2:
        problems.append(
            f"each worker would get {t.batch_size // t.num_workers} sample(s) per step "
            f"(train.batch_size={t.batch_size} over {t.num_workers} workers); BatchNorm and in-batch "
            f"negatives need at least 2: raise train.batch_size to {2 * t.num_workers} or more"
        )
    if o.queue_length % t.batch_size:
        nearest, round_ = _multiples_near(o.queue_length, t.batch_size)
        fix = " or ".join(map(str, nearest)) + (
            f" (round: {' or '.join(map(str, round_))})" if round_ else ""
        )
        problems.append(
            f"objective.queue_length={o.queue_length} is not a multiple of the global batch "
            f"train.batch_size={t.batch_size}, so a batch of keys would wrap around the queue; use {fix}"
        )
    if m.point_encoder == "dgcnn" and m.k >= d.num_points:
        problems.append(
            f"model.k={m.k} neighbours needs more points than data.num_points={d.num_points}; "
            f"lower model.k below {d.num_points} or raise data.num_points"
        )
    pa = d.point_augment
    if pa.scale_low > pa.scale_high:
        problems.append(
            f"data.point_augment.scale_low={pa.scale_low} is above scale_high={pa.scale_high}; swap them"
        )
    if t.precision == "bf16" and not t.use_gpu:
        problems.append(
            "train.precision=bf16 runs on CUDA only; set train.use_gpu=true or train.precision=fp32"
        )
    if m.sync_bn and not t.use_gpu:
        problems.append("model.sync_bn=true needs CUDA (torch's SyncBatchNorm); set train.use_gpu=true")
    if cfg.optim.warmup_epochs >= t.epochs:
        problems.append(
            f"optim.warmup_epochs={cfg.optim.warmup_epochs} leaves no epoch after warm-up "
            f"(train.epochs={t.epochs}); use fewer warm-up epochs"
        )
    return problems


# --------------------------------------------------------------------------------------------------
# Keys, presets, overrides
# --------------------------------------------------------------------------------------------------


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. ``objective.queue_length``."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += valid_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


# Names people type for a key (paper symbols, other codebases' flags) → the schema's key.
ALIASES = {
    "K": "objective.queue_length",
    "queue_size": "objective.queue_length",
    "m": "objective.momentum",
    "T": "objective.temperature",
    "tau": "objective.temperature",
    "learning_rate": "optim.lr",
    "wd": "optim.weight_decay",
    "num_images": "data.views_per_sample",
    "num_views": "data.views_per_sample",
    "img_model": "model.image_encoder",
    "output_dim": "model.proj_dim",
    "workers": "train.num_workers",
}


def suggest_key(key: str) -> str | None:
    """The valid key nearest to ``key`` (an alias, the full dotted path, then its last part)."""
    keys = valid_keys()
    leaf = key.rsplit(".", 1)[-1]
    if leaf in ALIASES:
        return ALIASES[leaf]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[close[0]] if close else None


def _first_leaf(key: str, value: Any) -> str:
    """``trian`` + ``{"epochs": 3}`` → ``trian.epochs``: suggestions work on full paths."""
    while isinstance(value, Mapping) and value:
        name, value = next(iter(value.items()))
        key = f"{key}.{name}"
    return key


def _check_keys(
    data: Mapping[str, Any], origin: str, model: type[BaseModel] = Config, prefix: str = ""
) -> None:
    for name, value in data.items():
        key = f"{prefix}{name}"
        field = model.model_fields.get(str(name))
        if field is None:
            key = _first_leaf(key, value)
            hint = suggest_key(key)
            raise ConfigError(
                f"unknown config key {key!r} in {origin}"
                + (f"; did you mean {hint!r}?" if hint else "")
                + " (`crossmoco config show` lists every key)"
            )
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{key!r} in {origin} is a section: give it a mapping of keys, not {value!r}"
                )
            _check_keys(value, origin, ann, f"{key}.")


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_names() -> list[str]:
    """Names of the shipped presets (``crossmoco_ray/configs/*.yaml``)."""
    folder = resources.files("crossmoco_ray") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The YAML text of preset ``name``."""
    if name not in preset_names():
        close = difflib.get_close_matches(name, preset_names(), n=1)
        raise ConfigError(
            f"unknown preset {name!r}; choose one of {preset_names()}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
        )
    return (resources.files("crossmoco_ray") / "configs" / f"{name}.yaml").read_text()


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> dict[str, Any]:
    """``"objective.queue_length=8000"`` → ``{"objective": {"queue_length": 8000}}`` (YAML-typed value)."""
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} must look like section.key=value, e.g. objective.queue_length=8000"
        )
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key; use section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {}
    set_dotted(out, key, value)
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``key="a.b"``, creating the sections on the way."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Sequence[str] | Iterable[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve defaults ← ``preset`` ← ``config_file`` ← ``extra`` ← ``overrides`` into a checked Config."""
    data: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    if preset is not None:
        layers.append((f"preset {preset!r}", _read_yaml(preset_text(preset), f"preset {preset!r}")))
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        layers.append((str(path), _read_yaml(path.read_text(), str(path))))
    if extra:
        layers.append(("arguments", dict(extra)))
    for item in overrides:
        layers.append((f"override {item!r}", parse_override(item)))
    for origin, layer in layers:
        _check_keys(layer, origin)
        data = _merge(data, layer)
    return validate(data)


def validate(data: Mapping[str, Any]) -> Config:
    """A checked :class:`Config` from a plain mapping, or a :class:`ConfigError` that says the fix."""
    _check_keys(data, "the configuration")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg} (got {e.get('input')!r})" if loc else msg)
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def to_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML, sections in schema order."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"objective.queue_length": 4000, ...}``: every leaf under its dotted key."""
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(cfg.model_dump(mode="json"), "")
    return out


def config_hash(cfg: Config) -> str:
    """A short stable hash of the resolved configuration (12 hex digits)."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
