"""The configuration schema: typed sections whose defaults are the CrossMoCo paper recipe (METHOD.md §2.2).
The cross-field checks that run before anything is built, each naming its fix, are in
:mod:`crossmoco_ray.config.consistency`.

Loading (presets, files, dotted overrides) lives in :mod:`crossmoco_ray.config.loading`, unknown-key
suggestions in :mod:`crossmoco_ray.config.keys`, validation with messages that say the fix in
:mod:`crossmoco_ray.config.validation`. This module imports only pydantic.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from crossmoco_ray.bounded import short_repr

DEFAULT_PRESET = "quickstart"  # what the commands run when no preset is named


class Section(BaseModel):
    """A section of a configuration: unknown keys refused, values checked on assignment, no inf/nan."""

    # allow_inf_nan=False: no setting of this project means anything at inf or nan (an infinite lr or
    # temperature trains nothing, and nan passes no bound), in any float of any section, lists included
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


ResourceName = Annotated[str, Field(min_length=1, max_length=200)]
ResourceAmount = Annotated[float, Field(ge=0.0)]


class ModelConfig(Section):
    """Encoders and heads (METHOD.md §1.1–1.5)."""

    point_encoder: Literal["dgcnn", "dgcnn_seg", "pointnet"] = Field(
        "dgcnn", description="dgcnn_seg: CrossPoint's part-segmentation DGCNN (1024-d max-pooled feature)"
    )
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
    image_checkpoint: bool = Field(
        False,
        description="activation checkpointing of the online image trunk: its residual stages are "
        "recomputed in backward (about half the step's activation memory for one more trunk forward)",
    )


class ObjectiveConfig(Section):
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


class PointAugmentConfig(Section):
    """CrossPoint's point augmentation, applied to each of the two point views independently (§1.9)."""

    normalize: bool = Field(True, description="centre and scale to the unit sphere first")
    scale_low: float = Field(0.5, gt=0.0)
    scale_high: float = Field(2.0, gt=0.0)
    rotate: bool = Field(True, description="random rotation about the up (y) axis, U(0, 2π)")
    translate: float = Field(0.5, ge=0.0, description="per-axis offset U(−t, t) × that axis's extent")
    jitter_std: float = Field(0.01, ge=0.0)
    jitter_clip: float = Field(0.05, ge=0.0)
    dropout_max: float = Field(0.875, ge=0.0, lt=1.0, description="input dropout ratio ~ U(0, max)")


class ImageAugmentConfig(Section):
    """CrossPoint's image augmentation (resize, ColorJitter, horizontal flip, ImageNet normalisation)."""

    brightness: float = Field(0.4, ge=0.0)
    contrast: float = Field(0.4, ge=0.0)
    saturation: float = Field(0.4, ge=0.0)
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")
    normalize: bool = Field(True, description="ImageNet mean/std normalisation (in the training step)")


class FreshViewsConfig(Section):
    """Fresh viewpoints (``data.render.viewpoints=fresh``): the ranges each view's camera is drawn from, per
    object and epoch (seeded by seed, epoch and object id under ``train.deterministic``)."""

    azimuth: tuple[float, float] = Field((0.0, 360.0), description="degrees about the up axis [low, high]")
    elevation: tuple[float, float] = Field((0.0, 40.0), description="degrees above the horizon [low, high]")
    zoom: tuple[float, float] = Field(
        (0.9, 1.1), description="object scale in the image [low, high] (the camera's distance; 1 = stored)"
    )
    light_jitter: float = Field(15.0, ge=0.0, le=90.0, description="the light turns by up to this (degrees)")

    @field_validator("azimuth", "elevation", "zoom")
    @classmethod
    def _range(cls, value: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        lo, hi = {"azimuth": (-720.0, 720.0), "elevation": (-90.0, 90.0), "zoom": (0.25, 4.0)}[
            str(info.field_name)
        ]
        if not lo <= value[0] <= value[1] <= hi:
            raise ValueError(f"a range [low, high] with {lo:g} <= low <= high <= {hi:g}, got {list(value)}")
        return value


class RenderConfig(Section):
    """Views rendered for sources without images (prepare time): shaded meshes where the source has them
    (the built-in set, mesh folders), else splats of the points."""

    azimuths: list[float] = Field(
        default_factory=lambda: [0.0, 60.0, 120.0, 180.0, 240.0, 300.0],
        min_length=1,
        description="camera angles about the up axis, degrees (at least one)",
    )
    elevations: list[float] = Field(
        default_factory=lambda: [20.0],
        min_length=1,
        description="camera angles above the horizon, degrees (at least one)",
    )
    size: int = Field(128, ge=8, description="rendered image side (resized to data.image_size when read)")
    point_size: int = Field(2, ge=1)
    mode: Literal["depth", "shaded", "coords"] = Field(
        "depth",
        description="splats: depth: nearer is brighter; shaded: lit by normals estimated from the points",
    )
    points_only: bool = Field(
        False, description="render splats of the points even where the source has meshes (renders A/B)"
    )
    viewpoints: Literal["auto", "stored", "fresh", "fixed"] = Field(
        "auto",
        description="the views a step sees: stored: decoded from the shards' renders; fresh: rendered in "
        "the pipeline from new random viewpoints every epoch (meshes of prepare --store meshes, else splats "
        "of the points); fixed: rendered in the pipeline from the azimuths x elevations grid; auto: stored "
        "where the shards hold renders, else fresh",
    )
    fresh: FreshViewsConfig = FreshViewsConfig()
    num_cpus: float = Field(
        1.0,
        gt=0.0,
        le=256.0,
        description="CPUs per rendering task of the pipeline (viewpoints fresh or fixed)",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources per rendering task, e.g. {cpu_render: 1} to render on the nodes "
        "that advertise it (CPU-only nodes) and not on the GPU nodes",
    )

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if not name.strip() or name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(
                    f"{name!r:.40} is not a custom resource name (CPUs: data.render.num_cpus; no GPU needed)"
                )
            if not 0.0 < amount <= 1e6:
                raise ValueError(f"{name!r:.40}: {amount!r:.20} must be a positive amount (at most 1e6)")
        return value


class DataConfig(Section):
    """What the workers are fed."""

    source: str | None = Field(
        None, description="prepared shards (directory or URI); null = the built-in synthetic set"
    )
    num_points: int = Field(2048, gt=0, description="points per cloud fed to the encoder")
    image_size: int = Field(224, gt=0, description="views are resized to this square size")
    views_per_sample: int = Field(2, ge=2, description="distinct rendered views per object per step")
    synthetic_train: int = Field(2000, gt=0, description="built-in set: training objects")
    synthetic_test: int = Field(500, gt=0, description="built-in set: test objects")
    synthetic_val: int = Field(
        0,
        ge=0,
        description="built-in set: validation objects drawn apart from train (data.val_fraction then carves "
        "none); 0 = carve data.val_fraction of train",
    )
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


class OptimConfig(Section):
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
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="scale optim.lr with the global batch: lr x (global / lr_reference_batch) (linear, Goyal "
        "et al. 2017) or its square root; none = optim.lr as given (the paper's recipe)",
    )
    lr_reference_batch: int = Field(20, gt=0, description="the global batch optim.lr was tuned at")
    min_lr: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0, description="clip the global gradient norm; null = off")


class TrainConfig(Section):
    """How training runs: size, workers, precision, checkpoints."""

    @model_validator(mode="before")
    @classmethod
    def _worker_range(cls, data: Any) -> Any:
        """``num_workers: [min, max]`` → ``min_workers: min``, ``num_workers: max`` (elastic training)."""
        if not isinstance(data, dict) or not isinstance(data.get("num_workers"), (list, tuple)):
            return data
        pair = data["num_workers"]
        if len(pair) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in pair):
            raise ValueError(
                f"train.num_workers={short_repr(list(pair), 60)}: give a number of workers, or a range "
                "[min, max] of two whole numbers for elastic training, e.g. train.num_workers=[4,8]"
            )
        low, high = pair
        if not 0 < low <= high:
            raise ValueError(
                f"train.num_workers=[{low}, {high}]: an elastic range needs 0 < min <= max, e.g. "
                f"train.num_workers=[{max(1, min(low, high))},{max(low, high, 1)}]"
            )
        return {**data, "num_workers": high, "min_workers": low}  # the range wins over a min_workers

    epochs: int = Field(125, gt=0, le=100_000)
    batch_size: int | None = Field(
        None,
        gt=0,
        description="the GLOBAL batch over all workers; set this or batch_size_per_worker, not both",
    )
    batch_size_per_worker: int | None = Field(
        20,
        gt=0,
        description='the batch of ONE worker ("20 per GPU"); global = this x num_workers; set this or '
        "batch_size, not both",
    )
    num_workers: int = Field(
        1,
        gt=0,
        description="Ray Train workers (DDP processes); a range [min, max] trains elastically: as many as "
        "fit, growing and shrinking with the cluster (docs/cluster.md)",
    )
    min_workers: int | None = Field(
        None,
        gt=0,
        description="elastic training: the fewest workers the run goes on with (set by "
        "train.num_workers=[min, max]); null = a fixed size",
    )
    elastic_resize_interval_s: float = Field(
        60.0,
        gt=0.0,
        le=86_400.0,
        description="elastic training: seconds between Ray Train's checks for capacity to grow into (a "
        "resize restarts the workers from the last checkpoint)",
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(
        1.0, ge=0.0, description="with use_gpu: 1 (each worker trains on one GPU; more GPUs = more workers)"
    )
    data_cpus: float = Field(1.0, ge=0.0, description="CPUs kept free for Ray Data tasks")
    worker_resources: dict[ResourceName, ResourceAmount] = Field(
        default_factory=dict,
        description="custom Ray resources each worker also requests, e.g. {trainer_slot: 1} to keep "
        "workers on the nodes that advertise them (`ray start --resources`)",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: autocast on GPUs with native bf16 (compute capability 8.0+; refused on clusters "
        "whose GPUs all emulate it) or CPUs with AVX-512 BF16 or AMX; elsewhere fp32, with a warning. kNN "
        "distances, BatchNorm statistics and losses stay fp32",
    )
    channels_last: bool = Field(True, description="channels-last image tensors (faster on CPU and CUDA)")
    tf32: bool = Field(
        False,
        description="TF32 tensor cores for the encoders' fp32 products and convolutions (Ampere+ GPUs, fp32 "
        "runs); false: IEEE fp32 throughout. kNN distances, BatchNorm statistics and losses are IEEE fp32 "
        "either way",
    )
    seed: int = Field(1, ge=0, le=2**31 - 1, description="seeds every generator of the run (0 … 2**31 - 1)")
    deterministic: bool = Field(
        False,
        description="seed the augmentations and use deterministic kernels only (exact reruns and resumes; "
        "on GPU cuBLAS's fixed workspace and no cuDNN autotuning, somewhat slower)",
    )
    log_every: int = Field(20, gt=0, description="steps between progress reports")
    keep_checkpoints: int = Field(
        2, gt=0, description="epoch-end checkpoints kept (the newest ones), plus the latest checkpoint"
    )
    checkpoint_every_steps: int | None = Field(
        500,
        gt=0,
        description="also checkpoint every this many steps (mid-epoch; a restart resumes at that step); "
        "null = at the end of each epoch only",
    )
    max_failures: int = Field(
        3,
        ge=-1,
        description="worker-group restarts from the last checkpoint (a lost node, a dead worker); "
        "-1 = unlimited, for spot/preemptible fleets",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers on nodes"
    )


# The two ways to give train's batch (global, per worker): a layer of the configuration that sets one unsets
# the other, and a stored configuration that has only one is read that way.
BATCH_KEYS = ("batch_size", "batch_size_per_worker")


# ScanObjectNN's variants (crossmoco_ray/data/sources/variants.py: SCANOBJECTNN_VARIANTS; a test keeps them
# equal).
ScanObjectNNVariant = Literal[
    "obj_bg",
    "obj_only",
    "pb_t25",
    "pb_t25_r",
    "pb_t50_r",
    "pb_t50_rs",
    "pb_t25_nobg",
    "pb_t25_r_nobg",
    "pb_t50_r_nobg",
    "pb_t50_rs_nobg",
]


class EvalConfig(Section):
    """Evaluation protocols (METHOD.md §1.11–1.12) and the in-training monitor."""

    data: str | None = Field(
        None,
        description="labelled data for the monitor and the final evaluation (prepared shards or a source "
        "such as ModelNet40's h5); null = the pretraining data's val/test splits",
    )
    up_axis: Literal["x", "y", "z"] = Field("y", description="up axis of eval.data when it is a raw source")
    variant: ScanObjectNNVariant | None = Field(
        None,
        description="ScanObjectNN variant of eval.data when it is the official h5 release (obj_bg, obj_only, "
        "pb_t50_rs, ...); a directory holding several fails without it, listing them",
    )
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


class TuneConfig(Section):
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
    max_concurrent_trials: int | None = Field(
        None,
        gt=0,
        description="trials at once; null = all, each starting when its workers fit (on a cluster the "
        "waiting ones are demand an autoscaler adds nodes for; a local Ray runs what it holds)",
    )


class TrackingConfig(Section):
    """MLflow tracking."""

    enabled: bool = True
    experiment: str = "crossmoco"
    run_name: str | None = None
    tracking_uri: str | None = Field(
        None, description="null: MLFLOW_TRACKING_URI, else sqlite under the run's storage path"
    )
    log_model: bool = Field(
        True,
        description="log the exported backbone as an MLflow model (torch.export; seconds to minutes for "
        "large encoders); its files are logged as artifacts either way",
    )
    register_model: str | None = Field(
        None,
        description="registered-model name: the run's logged encoder model becomes a new version of it "
        "(needs tracking.log_model)",
    )


class Config(Section):
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
        from crossmoco_ray.config.consistency import (
            cross_field_problems,  # it needs Config's type: imported when used
        )

        problems = cross_field_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def global_batch(self) -> int:
        """Objects per optimizer step over all workers (what the queue length must be a multiple of)."""
        t = self.train
        if t.batch_size_per_worker is not None:
            return t.batch_size_per_worker * t.num_workers
        assert t.batch_size is not None  # one of the two is set (checked)
        return t.batch_size

    def global_batch_at(self, workers: int) -> int:
        """The global batch with ``workers`` workers (an elastic run keeps the batch per worker)."""
        return self.per_worker_batch * workers

    @property
    def per_worker_batch(self) -> int:
        return self.global_batch // self.train.num_workers

    @property
    def elastic(self) -> bool:
        """Whether the run trains elastically (``train.num_workers=[min, max]`` with min < max)."""
        t = self.train
        return t.min_workers is not None and t.min_workers < t.num_workers

    @property
    def base_lr(self) -> float:
        """``optim.lr``, scaled with the global batch when ``optim.lr_scaling`` asks for it."""
        return self.base_lr_at(self.global_batch)

    def base_lr_at(self, global_batch: int) -> float:
        """``optim.lr`` scaled for ``global_batch`` (an elastic run's current one)."""
        o = self.optim
        ratio = global_batch / o.lr_reference_batch
        return o.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[o.lr_scaling]
