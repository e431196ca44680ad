"""Assembling and fitting the ``TorchTrainer`` of a run (Ray Train V2), whatever the job: scaling, storage,
failures, checkpoint retention, datasets, what each worker is told, and what a failed fit tells the user.

A run is ``RunConfig(storage_path, name)``: relaunching the same name resumes from its latest checkpoint,
and ``FailureConfig(max_failures)`` restarts a failed worker group from it. Ray keeps the latest checkpoint
plus the best ``keep_checkpoints`` by :data:`~crossmoco_ray.runs.worker.CHECKPOINT_PRIORITY` (epochs done;
a mid-epoch checkpoint scores -1, so it goes as soon as a newer one exists).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from crossmoco_ray.runs.resources import fewest_workers, worker_env, worker_request
from crossmoco_ray.runs.worker import CHECKPOINT_PRIORITY, WorkerSpec
from crossmoco_ray.tracking import Tracker


@dataclass
class Launch:
    """What a job hands the launcher: its worker function and spec, and how the run is operated."""

    name: str
    storage: str
    worker: Callable[[dict[str, Any]], dict[str, Any]]
    spec: WorkerSpec
    train: Any  # the config's train section: num_workers, use_gpu, max_failures, keep_checkpoints, ...
    datasets: dict[str, Any] | None = None
    dataset_config: Any = None
    callbacks: list[Any] = field(default_factory=list)
    deterministic: bool = False


def build_trainer(launch: Launch) -> Any:
    """The ``TorchTrainer`` of ``launch``."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = launch.train
    low = fewest_workers(t)  # pretraining's elastic range (train.num_workers=[min, max]): its minimum
    elastic: dict[str, Any] = {}
    if low < t.num_workers:  # Train V2's elastic scaling (its own type, not V1's stub)
        elastic = {"elastic_resize_monitor_interval_s": t.elastic_resize_interval_s}
    scaling = ScalingConfig(
        num_workers=(low, t.num_workers) if elastic else t.num_workers,  # type: ignore[arg-type]
        use_gpu=t.use_gpu,
        resources_per_worker=worker_request(t),  # what check_resources counted
        placement_strategy=getattr(t, "placement_strategy", "PACK"),
        **elastic,
    )
    run_config = RunConfig(
        name=launch.name,
        storage_path=launch.storage,
        failure_config=FailureConfig(max_failures=t.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=t.keep_checkpoints,
            checkpoint_score_attribute=CHECKPOINT_PRIORITY,
            checkpoint_score_order="max",
        ),
        callbacks=launch.callbacks,
        logging_config=LoggingConfig(log_level="WARNING"),
        worker_runtime_env={"env_vars": worker_env(launch.deterministic)},  # type: ignore[call-arg]
    )
    kwargs: dict[str, Any] = {}
    if launch.datasets is not None:
        kwargs["datasets"] = launch.datasets
    if launch.dataset_config is not None:
        kwargs["dataset_config"] = launch.dataset_config
    return TorchTrainer(
        launch.worker,  # type: ignore[arg-type]
        train_loop_config={"spec": launch.spec},
        scaling_config=scaling,
        run_config=run_config,
        **kwargs,
    )


def fit(trainer: Any, tracker: Tracker, run_dir: str, what: str, log: Callable[[str], None]) -> Any | None:
    """``trainer.fit()``; a failed fit (the worker's error, after ``max_failures`` restarts) closes the MLflow
    run as failed and tells the user that the checkpoints stay and how to resume (→ ``None``)."""
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as err:
        tracker.end("FAILED")
        log(
            f"{what} failed: {err}\n"
            f"Checkpoints so far stay in {run_dir}; relaunch the same command to resume."
        )
        return None
