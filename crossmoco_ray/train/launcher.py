"""``crossmoco pretrain``: everything before and after the Ray Train workers.

Before: resolve the run (name, storage, data), check the config against the data and the cluster (so a bad
config fails before any worker starts, with the fix), join or start Ray, prepare the built-in dataset once,
open or resume the MLflow run. Then a ``TorchTrainer`` (Train V2) runs :func:`train_loop_per_worker`.
After: the final SVM on the validation and test splits (pretrained vs random init), the exported backbone,
MLflow artifacts and a summary that says where everything is.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, config_hash, flatten, to_yaml
from ..data.augment import ImageAugment, PointAugment
from ..data.pipeline import (
    PipelineOptions,
    bound_streaming_memory,
    expected_distinct_labels,
    make_dataset,
    window_rows,
)
from ..data.readers import SyntheticSource
from ..data.render import RenderSpec
from ..data.shards import PrepareOptions, fingerprint, prepare, read_manifest
from ..tracking import Tracker, default_tracking_uri
from .loop import train_loop_per_worker

RUN_FILE = "crossmoco_run.json"
DEFAULT_STORAGE = "crossmoco_runs"
# Quiet, offline, and fast on small machines; set before Ray starts so every process inherits them.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    "RAY_DEDUP_LOGS": "0",
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).resolve().parents[1] / "ray_data_logging.yaml"),
}


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


def default_name(cfg: Config) -> str:
    """Stable per configuration: relaunching the same config resumes; changing it starts a new run."""
    return cfg.tracking.run_name or f"crossmoco-{config_hash(cfg)[:8]}"


def resolve_storage(storage: str | None) -> str:
    storage = storage or os.environ.get("CROSSMOCO_STORAGE") or DEFAULT_STORAGE
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def builtin_dataset(cfg: Config, storage: str, log: Callable[[str], None]) -> str:
    """Prepare the built-in synthetic set once under ``<storage>/_builtin`` (cached by its options)."""
    d = cfg.data
    points = max(d.num_points, cfg.eval.num_points)
    spec = RenderSpec(
        azimuths=tuple(d.render.azimuths),
        elevations=tuple(d.render.elevations),
        size=d.render.size,
        point_size=d.render.point_size,
        mode=d.render.mode,
    )
    opts = PrepareOptions(val_fraction=d.val_fraction, seed=0, render=spec)
    source = SyntheticSource({"train": d.synthetic_train, "test": d.synthetic_test}, points, seed=0)
    # Cached by prepare's fingerprint (the generator's version, sizes, every prepare option), so a changed
    # option or a newer generator never meets shards it would have to overwrite.
    digest = fingerprint(source, opts)[:8]
    sizes = f"{d.synthetic_train}-{d.synthetic_test}-{points}-{spec.size}"
    root = f"{storage}/_builtin/synthetic-{sizes}-{digest}"
    log(f"built-in dataset: {root}")
    prepare(source, root, opts, log=log)
    return root


def pipeline_options(
    cfg: Config, epoch_offset: int = 0, manifest: dict[str, Any] | None = None
) -> PipelineOptions:
    d = cfg.data
    window = (
        window_rows(d.shuffle_window_mb, manifest, "train") if manifest else PipelineOptions.shuffle_window
    )
    return PipelineOptions(
        num_points=d.num_points,
        image_size=d.image_size,
        views=d.views_per_sample,
        point_augment=PointAugment(**d.point_augment.model_dump()),
        image_augment=ImageAugment(**d.image_augment.model_dump(exclude={"normalize"})),
        read_batch=d.read_batch,
        seed=cfg.train.seed if cfg.train.deterministic else None,
        epoch_offset=epoch_offset,
        object_store_mb=d.object_store_mb,
        shuffle_window=window,
    )


def absolute(spec: str | None) -> str | None:
    """A user's path as an absolute one, resolved here on the driver (Ray Train workers run in their own
    working directory, so ``data/mn40`` would not be found there); URIs and ``None`` pass through."""
    if spec is None or "://" in spec or spec == "synthetic":
        return spec
    return str(Path(spec).expanduser().resolve())


def iid_batch_classes(cfg: Config, manifest: dict[str, Any]) -> float:
    """Distinct labels an i.i.d. worker batch of the train split would hold (what ``batch_classes`` is
    compared with); 0 for unlabelled data."""
    per_class = manifest["counts"].get("train", {}).get("per_class", {})
    counts = [n for name, n in per_class.items() if name != "-1"]
    return expected_distinct_labels(counts, cfg.per_worker_batch) if counts else 0.0


def check_data(cfg: Config, root: str, manifest: dict[str, Any]) -> int:
    """Config vs. prepared data, before anything starts; returns the steps per epoch."""
    problems = []
    if "train" not in manifest["counts"]:
        problems.append(f"{root} has no train split (has {sorted(manifest['counts'])})")
    if cfg.data.num_points > manifest["num_points"]:
        problems.append(
            f"data.num_points={cfg.data.num_points} but the shards hold {manifest['num_points']} points per "
            f"cloud; set data.num_points={manifest['num_points']} (or prepare with more points)"
        )
    views = manifest.get("views_per_object") or 0
    if cfg.data.views_per_sample > views:
        problems.append(
            f"data.views_per_sample={cfg.data.views_per_sample} but the shards have {views} views"
        )
    if problems:
        raise ConfigError("\n".join(problems))
    world, batch = cfg.train.num_workers, cfg.per_worker_batch
    rows = manifest["counts"]["train"]["total"]
    steps = (rows // world) // batch
    if steps == 0:
        raise ConfigError(
            f"{rows} training objects give no full step of {cfg.train.batch_size} (train.batch_size) over "
            f"{world} workers; lower train.batch_size or use more data"
        )
    return steps


def check_eval_data(spec: str, up_axis: str) -> None:
    """``eval.data`` must open and hold a labelled train split, before any worker starts."""
    from ..data.readers import open_source
    from ..data.shards import MANIFEST, resolve

    fs, root = resolve(spec)
    if fs.get_file_info(f"{root}/{MANIFEST}").type.name != "NotFound":
        splits = sorted(read_manifest(spec)["counts"])
    else:
        splits = open_source(spec, up_axis=up_axis).splits()  # type: ignore[arg-type]
    if "train" not in splits:
        raise ConfigError(
            f"eval.data={spec} has no train split (has {splits}); the monitor fits on train and scores on "
            "val (carved from train when there is none)"
        )


def check_resources(
    cfg: Config, resources: dict[str, float], local: bool, log: Callable[[str], None]
) -> None:
    """Workers plus the CPUs kept for Ray Data must fit, or the run would wait (or hang) forever."""
    t = cfg.train
    cpus_needed = t.num_workers * t.cpus_per_worker + t.data_cpus
    gpus_needed = t.num_workers * t.gpus_per_worker if t.use_gpu else 0.0
    problems = []
    if resources.get("CPU", 0.0) + 1e-9 < cpus_needed:
        problems.append(
            f"{t.num_workers} workers × {t.cpus_per_worker} CPU + {t.data_cpus} CPU for Ray Data = "
            f"{cpus_needed:g} CPUs, the cluster has {resources.get('CPU', 0):g}: lower train.cpus_per_worker "
            "(fractions work, e.g. 0.5), train.num_workers or train.data_cpus"
        )
    if gpus_needed > resources.get("GPU", 0.0) + 1e-9:
        problems.append(
            f"{t.num_workers} workers × {t.gpus_per_worker} GPU = {gpus_needed:g} GPUs, the cluster has "
            f"{resources.get('GPU', 0):g}: lower train.num_workers or set train.use_gpu=false"
        )
    if problems:
        if local:
            raise ConfigError("\n".join(problems))
        for p in problems:  # an autoscaling cluster may still add nodes
            log(f"warning: {p} (waiting for the autoscaler)")


def init_ray(cfg: Config, address: str | None, log: Callable[[str], None], extra_cpus: float = 0.0) -> bool:
    """Join a cluster (``address``, ``RAY_ADDRESS``, ``ray job submit``) or start a local Ray (→ True)."""
    import ray

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log(f"joining the Ray cluster at {address}")
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return False
    t = cfg.train
    needed = t.num_workers * t.cpus_per_worker + t.data_cpus + extra_cpus
    cpus = max(os.cpu_count() or 1, int(needed + 0.999))
    log(f"starting a local Ray with {cpus} CPUs")
    # The dashboard (on loopback) gives the State API that Ray Train's placement-group cleanup needs.
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
    )
    return True


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _read_json(uri: str) -> dict[str, Any] | None:
    from ..data.shards import resolve

    fs, path = resolve(uri)
    if fs.get_file_info(path).type.name == "NotFound":
        return None
    with fs.open_input_stream(path) as f:
        data: dict[str, Any] = json.loads(f.read().decode())
        return data


def _write_json(uri: str, data: dict[str, Any]) -> None:
    from ..data.shards import resolve

    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(data, indent=1).encode())


def latest_epoch(run_dir: str) -> int:
    """Epochs completed by the latest checkpoint of a previous launch (0 if none)."""
    from ..data.shards import resolve

    fs, path = resolve(run_dir)
    if fs.get_file_info(path).type.name == "NotFound":
        return 0
    try:
        from ray.train import Result

        result = Result.from_path(run_dir)
        return int((result.metrics or {}).get("epoch", 0))
    except Exception:
        return 0


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
    storage = resolve_storage(storage)
    root = cfg.data.source or builtin_dataset(cfg, storage, log)
    manifest = read_manifest(root)
    steps = check_data(cfg, root, manifest)
    if cfg.eval.data is not None:
        check_eval_data(cfg.eval.data, cfg.eval.up_axis)
    run = Run(cfg, name or default_name(cfg), storage, root, manifest, steps)
    if cfg.tracking.enabled:
        run.tracking_uri = default_tracking_uri(storage, cfg.tracking.tracking_uri)
    return run


def start_tracking(
    run: Run, preset: str | None, parent_id: str | None = None, extra_tags: dict[str, str] | None = None
) -> Tracker:
    """Create the MLflow run (nested under ``parent_id`` if given), or resume the one a previous launch of
    this run name used."""
    tracker = Tracker(run.tracking_uri)
    previous = _read_json(f"{run.run_dir}/{RUN_FILE}") or {}
    cfg = run.cfg
    tags = {
        "git_commit": git_commit(),
        "world_size": str(cfg.train.num_workers),
        "global_batch": str(cfg.train.batch_size),
        "config_hash": config_hash(cfg),
        "preset": preset or "",
        "data": run.data_root,
        "ray_run": run.run_dir,
        **(extra_tags or {}),
    }
    run.mlflow_run_id = tracker.start(
        cfg.tracking.experiment,
        run.name,
        flatten(cfg),
        tags,
        resume_id=previous.get("mlflow_run_id"),
        parent_id=parent_id,
    )
    _write_json(
        f"{run.run_dir}/{RUN_FILE}",
        {
            "mlflow_run_id": run.mlflow_run_id,
            "tracking_uri": run.tracking_uri,
            "config_hash": config_hash(cfg),
            "data": run.data_root,
        },
    )
    return tracker


def build_trainer(run: Run, callbacks: list[Any] | None = None) -> Any:
    """The ``TorchTrainer`` of a resolved run (Train V2)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, t = run.cfg, run.cfg.train
    offset = latest_epoch(run.run_dir) if t.deterministic else 0
    dataset = make_dataset(run.data_root, "train", pipeline_options(cfg, offset, run.manifest))
    options = bound_streaming_memory(dataset.context, cfg.data.object_store_mb)
    options.preserve_order = t.deterministic
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    monitor = monitor_spec(run)
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "steps_per_epoch": run.steps_per_epoch,
        "run_dir": run.run_dir,
        "run_name": run.name,
        "tracking_uri": run.tracking_uri,
        "mlflow_run_id": run.mlflow_run_id,
        "monitor": monitor,
        "iid_batch_classes": iid_batch_classes(cfg, run.manifest),
    }
    return TorchTrainer(
        train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker=resources,
            placement_strategy=t.placement_strategy,
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=run.storage,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                checkpoint_score_attribute="val_svm_clean" if monitor else None,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks or [],
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {k: os.environ.get(k, v) for k, v in RAY_ENV.items()}},  # type: ignore[call-arg]
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options={"train": options}),
    )


def monitor_spec(run: Run) -> dict[str, Any] | None:
    """What the rank-0 monitor reads: ``eval.data`` if set (any labelled source or shards; a 'val' split
    is carved from its train split when it has none), else the pretraining shards' val split."""
    cfg = run.cfg
    e = cfg.eval
    if e.data is None and "val" not in run.manifest["counts"]:
        return None
    return {
        "root": e.data or run.data_root,
        "up_axis": e.up_axis,
        "num_points": e.num_points if e.data else min(e.num_points, run.manifest["num_points"]),
        "max_samples": e.monitor_samples,
        "val_fraction": e.val_fraction,
        "C": e.svm_c,
        "knn_k": e.knn_k,
        "crosspoint": e.monitor_crosspoint,
        "normalize": cfg.data.point_augment.normalize,
    }


def write_resolved_config(run: Run) -> None:
    from ..data.shards import resolve

    fs, path = resolve(f"{run.run_dir}/config.yaml")
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(to_yaml(run.cfg).encode())
