"""A pretraining run resolved on the driver, before Ray starts: its name (stable per configuration), the
data it reads (the built-in set prepared once), the config checked against that data, and its MLflow run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from crossmoco_ray import storage
from crossmoco_ray.config.schema import Config
from crossmoco_ray.config.serialized import config_hash, flatten, to_yaml
from crossmoco_ray.data.prepare.options import PrepareOptions, fingerprint
from crossmoco_ray.data.prepare.prepare import prepare
from crossmoco_ray.data.render.splat import RenderSpec
from crossmoco_ray.data.shards.manifest import read_manifest
from crossmoco_ray.data.sources.formats import SyntheticSource
from crossmoco_ray.pretrain.data_checks import check_data, check_eval_data
from crossmoco_ray.runs.identity import absolute, open_tracking, resolve_storage
from crossmoco_ray.tracking import Tracker, default_tracking_uri
from crossmoco_ray.version import code_version

RUN_FILE = "crossmoco_run.json"


@dataclass
class Run:
    """A resolved pretraining run: where it lives and what it reads."""

    cfg: Config
    name: str
    storage: str
    data_root: str
    manifest: dict[str, Any]
    steps_per_epoch: int
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> str:
        return f"{self.storage}/{self.name}"


# How a run is operated, not what it trains: changing these and relaunching resumes the same run.
OPERATIONAL_KEYS = (
    "tracking.",
    "tune.",
    "train.max_failures",
    "train.min_workers",  # a fixed run relaunched elastic on a shrunken fleet goes on (docs/cluster.md)
    "train.elastic_resize_interval_s",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.log_every",
    "train.channels_last",
    "model.image_checkpoint",  # the same function and gradient, recomputed: runs resume across it
    "train.placement_strategy",
    "train.cpus_per_worker",
    "train.gpus_per_worker",
    "train.data_cpus",
    "train.worker_resources",
    "data.object_store_mb",
)


def default_name(cfg: Config) -> str:
    """Stable per configuration: relaunching the same config resumes (also after changing only how it runs:
    failures, checkpoint interval, resources, tracking); changing what it trains starts a new run."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    return f"crossmoco-{config_hash(cfg, exclude=OPERATIONAL_KEYS)[:8]}"


def render_spec(cfg: Config) -> RenderSpec:
    """The render of ``data.render``: the fixed viewpoints' grid, the image size and the look of splats."""
    r = cfg.data.render
    return RenderSpec(
        azimuths=tuple(r.azimuths),
        elevations=tuple(r.elevations),
        size=r.size,
        point_size=r.point_size,
        mode=r.mode,
        points_only=r.points_only,
    )


def builtin_dataset(cfg: Config, root_storage: str, log: Callable[[str], None]) -> str:
    """Prepare the built-in synthetic set once under ``<storage>/_builtin`` (cached by its options)."""
    d = cfg.data
    points = max(d.num_points, cfg.eval.num_points)
    spec = render_spec(cfg)
    # data.synthetic_val > 0: a validation split of its own (class-balanced like the others, and as large as
    # asked: the final gains' standard errors shrink with its size); 0: data.val_fraction carved from train
    counts = {"train": d.synthetic_train, "val": d.synthetic_val, "test": d.synthetic_test}
    if not d.synthetic_val:
        del counts["val"]
    # Renders and meshes both: stored views by default (data.render.viewpoints=auto), fresh viewpoints of the
    # meshes rendered in the pipeline with data.render.viewpoints=fresh, from the same shards.
    opts = PrepareOptions(
        val_fraction=0.0 if d.synthetic_val else d.val_fraction, seed=0, render=spec, store="both"
    )
    source = SyntheticSource(counts, points, seed=0)
    # Cached by prepare's fingerprint (the generator's version, sizes, every prepare option), so a changed
    # option or a newer generator never meets shards it would have to overwrite.
    digest = fingerprint(source, opts)[:8]
    val = f"-val{d.synthetic_val}" if d.synthetic_val else ""
    sizes = f"{d.synthetic_train}{val}-{d.synthetic_test}-{points}-{spec.size}"
    root = f"{root_storage}/_builtin/synthetic-{sizes}-{digest}"
    log(f"built-in dataset: {root}")
    prepare(source, root, opts, log=log)
    return root


def resolve_run(
    cfg: Config,
    *,
    name: str | None = None,
    storage: str | None = None,
    data: str | None = None,
    log: Callable[[str], None] = print,
) -> Run:
    """Everything a launch needs that does not need Ray: checked config, data, steps, tracking."""
    data = absolute(data if data is not None else cfg.data.source)
    cfg = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"source": data}),
            "eval": cfg.eval.model_copy(update={"data": absolute(cfg.eval.data)}),
        }
    )
    where = resolve_storage(storage)
    root = cfg.data.source or builtin_dataset(cfg, where, log)
    manifest = read_manifest(root)
    steps = check_data(cfg, root, manifest)
    if cfg.eval.data is not None:
        check_eval_data(cfg.eval.data, cfg.eval.up_axis, cfg.eval.variant)
    run = Run(cfg, name or default_name(cfg), where, root, manifest, steps)
    if cfg.tracking.enabled:
        run.tracking_uri = default_tracking_uri(where, cfg.tracking.tracking_uri)
    return run


def start_tracking(
    run: Run, preset: str | None, parent_id: str | None = None, extra_tags: dict[str, str] | None = None
) -> Tracker:
    """Create the MLflow run (nested under ``parent_id`` if given), or resume the one a previous launch of
    this run name used (:func:`crossmoco_ray.runs.identity.open_tracking`)."""
    cfg = run.cfg
    tags = {
        **code_version(),
        "world_size": str(cfg.train.num_workers),
        "global_batch": str(cfg.global_batch),
        "per_worker_batch": str(cfg.per_worker_batch),
        "config_hash": config_hash(cfg),
        "preset": preset or "",
        "data": run.data_root,
        "ray_run": run.run_dir,
        **(extra_tags or {}),
    }
    tracker = open_tracking(
        run.tracking_uri,
        run.run_dir,
        RUN_FILE,
        cfg.tracking.experiment,
        run.name,
        flatten(cfg),
        tags,
        parent_id=parent_id,
        record={"config_hash": config_hash(cfg), "data": run.data_root},
    )
    run.mlflow_run_id = tracker.run_id
    return tracker


def write_resolved_config(run: Run) -> None:
    storage.write_text(f"{run.run_dir}/config.yaml", to_yaml(run.cfg))
