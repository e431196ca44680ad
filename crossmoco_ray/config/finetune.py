"""The fine-tuning configuration: typed sections whose defaults are DGCNN's classification recipe (SGD
0.1 → cosine to 1e-3, momentum 0.9, weight decay 1e-4, label smoothing 0.2, dropout 0.5, random
anisotropic scale and shift, batch 32, 250 epochs); preset ``partseg`` is CrossPoint's part-segmentation
recipe (METHOD.md §1.13).

Loaded like the pretraining config: defaults ← ``--preset`` (``config/finetune_presets/*.yaml``)
← ``--config``
← dotted overrides, unknown keys rejected with the nearest valid name. Imports only pydantic and the
config helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from crossmoco_ray.bounded import short_repr
from crossmoco_ray.config.consistency import gpu_problems
from crossmoco_ray.config.loading import config_layers, merge_layers
from crossmoco_ray.config.schema import Section
from crossmoco_ray.config.validation import validate_as
from crossmoco_ray.errors import ConfigError

DEFAULT_FINETUNE_PRESET = "dgcnn"


class FinetuneModelConfig(Section):
    """The encoder (from ``--checkpoint`` or random init) and the classifier head."""

    point_encoder: Literal["dgcnn", "dgcnn_seg", "pointnet"] = Field(
        "dgcnn", description="architecture of a random-init encoder (a checkpoint carries its own)"
    )
    k: int | None = Field(
        None,
        gt=0,
        description="DGCNN neighbours; null: the checkpoint's own k, or 20 for a random-init encoder or a "
        "CrossPoint .pth (DGCNN's classification recipe)",
    )
    emb_dims: int = Field(1024, gt=0, description="width of a random-init encoder (a checkpoint has its own)")
    head: Literal["mlp", "linear"] = Field(
        "mlp",
        description="mlp: DGCNN's classifier (F→512→256→classes, BN, LeakyReLU 0.2, dropout); linear: one "
        "linear layer (the linear probe of train.freeze_backbone)",
    )
    dropout: float = Field(0.5, ge=0.0, lt=1.0)


class FinetuneOptimConfig(Section):
    """Optimizer, schedule and loss."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0, description="SGD 0.1 (DGCNN: 100 × 1e-3); AdamW: about 1e-3")
    backbone_lr_scale: float = Field(
        1.0, ge=0.0, description="the encoder's lr is optim.lr × this (1 = one lr for all, as the papers)"
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0.0)
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine: per step from optim.lr to optim.min_lr over the run"
    )
    min_lr: float = Field(1e-3, ge=0.0, description="the cosine's floor (DGCNN: 1e-3)")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warm-up from 0, in epochs")
    label_smoothing: float = Field(0.2, ge=0.0, lt=1.0, description="DGCNN's cal_loss: 0.2")
    grad_clip: float | None = Field(None, gt=0.0)


class FinetuneDataConfig(Section):
    """What the workers read and how training clouds are augmented."""

    num_points: int = Field(1024, gt=0, description="points per cloud (train: a random subset each time)")
    val_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="carve a validation split from train (seeded) to choose by; 0 = the test split is "
        "only scored, every epoch (what the papers report is the best of those: a test-set choice)",
    )
    normalize: bool | None = Field(
        None, description="centre and scale clouds to the unit sphere; null: as the encoder's pretraining did"
    )
    scale_low: float = Field(2.0 / 3.0, gt=0.0, description="per-axis random scale U(low, high) (DGCNN)")
    scale_high: float = Field(1.5, gt=0.0)
    shift: float = Field(0.2, ge=0.0, description="per-axis random shift U(-shift, shift) (DGCNN)")
    jitter_std: float = Field(0.0, ge=0.0, description="Gaussian jitter, clipped at 5σ (off in DGCNN)")
    rotate: bool = Field(False, description="random rotation about the up axis (off for aligned sets)")

    @model_validator(mode="after")
    def _scales(self) -> FinetuneDataConfig:
        if self.scale_low > self.scale_high:
            raise ValueError(
                f"data.scale_low ({self.scale_low}) must not exceed data.scale_high ({self.scale_high})"
            )
        return self


class FinetuneTrainConfig(Section):
    """How fine-tuning runs."""

    epochs: int = Field(250, gt=0, le=100_000, description="DGCNN: 250")
    batch_size: int = Field(32, gt=0, description="the GLOBAL batch over all workers")
    test_batch_size: int = Field(32, gt=0)
    num_workers: int = Field(1, gt=0, description="Ray Train workers (DDP processes)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(
        1.0, ge=0.0, description="with use_gpu: 1 (each worker trains on one GPU; more GPUs = more workers)"
    )
    precision: Literal["fp32", "bf16"] = "fp32"
    tf32: bool = Field(
        False, description="TF32 tensor cores for fp32 products and convolutions (Ampere+ GPUs)"
    )
    freeze_backbone: bool = Field(
        False,
        description="keep the encoder frozen (eval mode, running BN statistics) and train the head only: "
        "with model.head=linear, a linear probe by SGD",
    )
    seed: int = Field(1, ge=0, le=2**31 - 1, description="seeds every generator of the run (0 … 2**31 - 1)")
    eval_every: int = Field(1, gt=0, description="epochs between test evaluations (the last always)")
    log_every: int = Field(20, gt=0, description="steps between progress lines")
    checkpoint_every_steps: int | None = Field(
        None, gt=0, description="also checkpoint mid-epoch every this many steps; null = epoch ends only"
    )
    keep_checkpoints: int = Field(2, gt=0)
    max_failures: int = Field(3, ge=-1, description="worker-group restarts from the last checkpoint")


class FinetuneTrackingConfig(Section):
    enabled: bool = True
    experiment: str = "crossmoco-finetune"
    tracking_uri: str | None = Field(
        None, description="null: MLFLOW_TRACKING_URI, else sqlite under the storage path"
    )


class FinetuneConfig(Section):
    """``crossmoco finetune cls``: supervised classification from a pretrained (or random) point encoder."""

    model: FinetuneModelConfig = Field(default_factory=FinetuneModelConfig)
    optim: FinetuneOptimConfig = Field(default_factory=FinetuneOptimConfig)
    data: FinetuneDataConfig = Field(default_factory=FinetuneDataConfig)
    train: FinetuneTrainConfig = Field(default_factory=FinetuneTrainConfig)
    tracking: FinetuneTrackingConfig = Field(default_factory=FinetuneTrackingConfig)

    KEYS_HINT: ClassVar[str] = "`crossmoco finetune cls --show-config` lists every key"

    @model_validator(mode="after")
    def _batch(self) -> FinetuneConfig:
        t = self.train
        if t.batch_size % t.num_workers:
            lo = t.batch_size // t.num_workers * t.num_workers
            raise ValueError(
                f"train.batch_size {t.batch_size} is not a multiple of train.num_workers {t.num_workers}: "
                f"use train.batch_size={max(lo, t.num_workers)} or {lo + t.num_workers}"
            )
        if t.batch_size // t.num_workers < 2 and not t.freeze_backbone:
            raise ValueError(
                "each worker needs at least 2 clouds per batch for BatchNorm: raise train.batch_size to "
                f"{2 * t.num_workers} or more"
            )
        problems = gpu_problems(t)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def per_worker_batch(self) -> int:
        return self.train.batch_size // self.train.num_workers


def finetune_preset_names() -> list[str]:
    folder = resources.files("crossmoco_ray.config") / "finetune_presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _preset(name: str) -> tuple[str, str]:
    if name not in finetune_preset_names():
        raise ConfigError(
            f"unknown fine-tuning preset {short_repr(name)}; choose one of {finetune_preset_names()}"
        )
    return name, (resources.files("crossmoco_ray.config") / "finetune_presets" / f"{name}.yaml").read_text()


def load_finetune_config(
    preset: str | None = DEFAULT_FINETUNE_PRESET,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> FinetuneConfig:
    """defaults ← ``preset`` ← ``config_file`` ← ``overrides``, checked (:class:`ConfigError`: the fix);
    the layered loading of :func:`crossmoco_ray.config.loading.merge_layers`, as pretraining's."""
    layers = config_layers(_preset(preset) if preset is not None else None, config_file, overrides)
    return validate_finetune(merge_layers(FinetuneConfig, layers))


def validate_finetune(data: dict[str, Any]) -> FinetuneConfig:
    return validate_as(FinetuneConfig, data, "fine-tuning configuration")
