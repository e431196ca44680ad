"""Pretraining's ``TorchTrainer``: the training dataset (a factory Ray Train calls at every start of the
worker group), the monitor's spec, and the typed spec every worker gets, on the launcher of
:mod:`crossmoco_ray.runs.launcher`.

The dataset factory builds the pipeline at the data epoch the run resumes at
(:func:`crossmoco_ray.checkpoints.resume.resume_point`, the same decision the workers make), so a seeded run
sees the same batches after a restart as an uninterrupted run would. With ``train.deterministic`` the split
over workers is made independent of where blocks were computed (no shard locality), so each worker gets the
same rows in every run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from crossmoco_ray.checkpoints.resume import registered_checkpoint, resume_point
from crossmoco_ray.config.schema import Config
from crossmoco_ray.data.pipeline.augment import ImageAugment, PointAugment
from crossmoco_ray.data.pipeline.batches import (
    PipelineOptions,
    bound_streaming_memory,
    make_dataset,
    window_rows,
)
from crossmoco_ray.data.render.viewpoints import Viewpoints
from crossmoco_ray.evaluate.monitor import MonitorSpec
from crossmoco_ray.pretrain.data_checks import (
    iid_batch_classes,
    label_evaluation_note,
    unlabelled,
    viewpoints_kind,
)
from crossmoco_ray.pretrain.resolve import Run, render_spec
from crossmoco_ray.pretrain.worker import PretrainSpec, train_loop_per_worker
from crossmoco_ray.runs.launcher import Launch, build_trainer
from crossmoco_ray.runs.worker import StepCallback


def pipeline_options(cfg: Config, manifest: dict[str, Any] | None = None) -> PipelineOptions:
    """The pipeline's options from the config (the data epoch to start at is set by :func:`train_dataset`)."""
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
        # the epochs' order from the run's seed even when augmentations are not seeded: a restart (at any
        # world size) skips the batches the checkpoint reached in the same order, not in a new draw
        order_seed=cfg.train.seed,
        object_store_mb=d.object_store_mb,
        shuffle_window=window,
        viewpoints=pipeline_viewpoints(cfg, manifest),
        render_cpus=d.render.num_cpus,
        render_resources=tuple(sorted(d.render.resources.items())),
    )


def pipeline_viewpoints(cfg: Config, manifest: dict[str, Any] | None) -> Viewpoints | None:
    """What the pipeline renders (None: it decodes the stored views): the render spec of ``data.render``
    (the grid, size, splat look) with its fresh ranges."""
    kind = viewpoints_kind(cfg, manifest)
    if kind == "stored":
        return None
    f = cfg.data.render.fresh
    return Viewpoints(
        kind="fixed" if kind == "fixed" else "fresh",
        spec=render_spec(cfg),
        azimuth=f.azimuth,
        elevation=f.elevation,
        zoom=f.zoom,
        light_jitter=f.light_jitter,
    )


def train_dataset(root: str, opts: PipelineOptions, run_dir: str, steps_per_epoch: int) -> Any:
    """The training pipeline starting at the data epoch the run resumes at (called by Ray Train at every
    start of the worker group)."""
    from dataclasses import replace

    point = resume_point(run_dir, steps_per_epoch, registered_checkpoint(run_dir))
    return make_dataset(root, "train", replace(opts, epoch_offset=point.epoch(steps_per_epoch)))


def monitor_spec(run: Run) -> MonitorSpec | None:
    """What the rank-0 monitor reads: ``eval.data`` if set (any labelled source or shards; a 'val' split
    is carved from its train split when it has none), else the pretraining shards' val split; none when
    those are unlabelled (an unlabelled val split cannot be scored) or have no val split."""
    cfg = run.cfg
    e = cfg.eval
    if e.data is None and ("val" not in run.manifest["counts"] or unlabelled(run.manifest)):
        return None
    return MonitorSpec(
        root=e.data or run.data_root,
        up_axis=e.up_axis,
        variant=e.variant,
        num_points=e.num_points if e.data else min(e.num_points, run.manifest["num_points"]),
        max_samples=e.monitor_samples,
        val_fraction=e.val_fraction,
        C=e.svm_c,
        knn_k=e.knn_k,
        crosspoint=e.monitor_crosspoint,
        normalize=cfg.data.point_augment.normalize,
    )


def pretrain_trainer(
    run: Run,
    callbacks: list[Any] | None = None,
    step_callbacks: Sequence[StepCallback] = (),
    log: Callable[[str], None] = print,
) -> Any:
    """The ``TorchTrainer`` of a resolved pretraining run (``log``: where a note on what is off goes)."""
    from ray.data import DataContext
    from ray.train import DataConfig

    cfg, t = run.cfg, run.cfg.train
    note = label_evaluation_note(cfg, run.manifest, run.data_root)
    if note:
        log(note)
    opts = pipeline_options(cfg, run.manifest)
    # how the split executes (DataConfig gives these to the dataset the factory builds)
    options = bound_streaming_memory(copy.deepcopy(DataContext.get_current()), opts.object_store_mb)
    options.preserve_order = t.deterministic
    spec = PretrainSpec(
        run_dir=run.run_dir,
        run_name=run.name,
        steps_per_epoch=run.steps_per_epoch,
        elastic_rows=run.manifest["counts"]["train"]["total"] if cfg.elastic else None,
        tracking_uri=run.tracking_uri,
        mlflow_run_id=run.mlflow_run_id,
        step_callbacks=tuple(step_callbacks),
        cfg=cfg,
        monitor=monitor_spec(run),
        iid_batch_classes=iid_batch_classes(cfg, run.manifest),
    )
    factory = partial(train_dataset, run.data_root, opts, run.run_dir, run.steps_per_epoch)
    launch = Launch(
        name=run.name,
        storage=run.storage,
        worker=train_loop_per_worker,
        spec=spec,
        train=t,
        datasets={"train": factory},
        dataset_config=DataConfig(
            datasets_to_split=["train"],
            execution_options={"train": options},
            # block placement depends on timing across nodes; a seeded run must not depend on it
            enable_shard_locality=not t.deterministic,
        ),
        callbacks=list(callbacks or []),
        deterministic=t.deterministic,
    )
    return build_trainer(launch)
