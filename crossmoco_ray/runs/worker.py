"""The worker skeleton every Ray Train run uses: named phases, with the job plugged in.

Phases, in order (:func:`run_worker`):

1. **start** (:func:`start`): rank, world size and device from the session, MLflow on rank 0; then the job
   is constructed (its model, optimizer, DDP and data: the job's ``__init__``, given the :class:`Context`);
2. **restore**: the newest complete checkpoint (:func:`crossmoco_ray.checkpoints.resume.resume_point`: Ray's
   registered one or a newer one named by ``progress.json``), copied here when it is remote; the job reads
   its state (:meth:`Job.restore`), this skeleton the history; the step to go on from, mid-epoch included;
   then :meth:`Job.after_restore`;
3. **steps**: :meth:`Job.start_epoch`'s batches from the epoch's first untrained one, :meth:`Job.step` on
   each; the log window every ``log_every`` steps (the job's one read from the device,
   :meth:`Job.take_window`: a NaN/Inf loss on any rank stops the run there, before any checkpoint could keep
   it); a checkpoint every ``checkpoint_every_steps``; then the step callbacks (:class:`StepInfo`; a
   callback may ask the run to stop, agreed at the next log window);
4. **end of epoch**: :meth:`Job.end_epoch` (evaluation, the epoch's line) and the epoch's checkpoint.

Every checkpoint is a collective (:func:`save`): all ranks gather their RNG states to rank 0 and report
(Ray Train requires every rank to); rank 0 writes the job's state, ``history.json``, and, once the report
returned (the checkpoint is on storage), ``progress.json``. The session (:class:`TrainSession`) is the
only contact with Ray Train, so the skeleton runs in a plain process too (the tests' pure-torch runs).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from crossmoco_ray import storage
from crossmoco_ray.checkpoints.resume import (
    HISTORY_FILE,
    POSITION_FILE,
    Position,
    epoch_checkpoint_name,
    position_record,
    resume_point,
    step_checkpoint_name,
    write_progress,
)
from crossmoco_ray.checkpoints.state import rng_state
from crossmoco_ray.errors import ResumeError
from crossmoco_ray.runs.ddp import all_ranks, gather_objects
from crossmoco_ray.tracking import Tracker

CHECKPOINT_PRIORITY = "checkpoint_priority"  # epochs done at an epoch end, -1 mid-epoch (what Ray keeps)


@dataclass(frozen=True)
class StepInfo:
    """What a step callback is told after every optimizer step (on every rank).

    ``window`` holds the log window's means (``loss`` and the job's other scalars) on the steps where the
    window was read (every ``train.log_every`` steps), else ``None``: reading the device every step would
    stall a GPU. ``tracker`` logs to the run's MLflow run (on rank 0; a no-op elsewhere)."""

    epoch: int  # 0-based
    step: int  # optimizer steps done in the run
    steps_per_epoch: int
    rank: int
    world_size: int
    run_dir: str
    window: dict[str, float] | None
    tracker: Tracker
    step_in_epoch: int = 0  # steps of this epoch done (at this world size: skipped ones included)
    samples: int = 0  # samples trained on in the run


StepCallback = Callable[[StepInfo], Any]
"""Called on every rank after every step (and after the step's log window and checkpoint, where it has
them); a true return value asks the run to stop (agreed on all ranks at the next log window: the run then
saves a checkpoint — at an epoch's last step, after that epoch's evaluation — and ends with status
``stopped``). Must pickle: it travels to the workers in their spec."""


@dataclass
class WorkerSpec:
    """What every worker is told, whatever the job (the job's own spec extends it)."""

    run_dir: str
    run_name: str
    steps_per_epoch: int  # at the run's fixed size (an elastic run: at its most workers)
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    step_callbacks: Sequence[StepCallback] = ()
    per_worker_batch: int = 1  # samples per worker and step
    workers: int = 0  # the configured workers (an elastic run: its most); 0: not told
    # an elastic run's training rows: its steps per epoch follow the world size of the moment,
    # (rows // world) // per_worker_batch (what Ray Data's equal split and drop_last give each worker)
    elastic_rows: int | None = None


class TrainSession(Protocol):
    """The worker's contact with its trainer: Ray Train's, or a plain process's."""

    def context(self) -> tuple[int, int, torch.device]: ...

    def registered_checkpoint(self) -> str | None: ...

    def report(
        self, metrics: dict[str, Any], checkpoint: Path | None = None, name: str | None = None
    ) -> None: ...


class RayTrainSession:
    """:class:`TrainSession` of a Ray Train worker."""

    def context(self) -> tuple[int, int, torch.device]:
        from crossmoco_ray.runs.ddp import start_worker

        return start_worker()

    def registered_checkpoint(self) -> str | None:
        import ray.train

        registered = ray.train.get_checkpoint()
        return registered.path if registered else None

    def report(
        self, metrics: dict[str, Any], checkpoint: Path | None = None, name: str | None = None
    ) -> None:
        import ray.train
        from ray.train import Checkpoint

        if checkpoint is None:
            ray.train.report(metrics)
        else:
            ray.train.report(
                metrics, checkpoint=Checkpoint.from_directory(checkpoint), checkpoint_dir_name=name
            )


@dataclass
class Context:
    """One worker's place in the run, shared by the skeleton and the job.

    Progress is kept in steps and in samples (:class:`~crossmoco_ray.checkpoints.resume.Position`): the
    epoch in progress, the samples of it trained on, the samples of the run. A step is ``global_batch``
    samples at this world size; an elastic run may have trained its earlier steps at another."""

    spec: WorkerSpec
    session: TrainSession
    rank: int
    world: int
    device: torch.device
    tracker: Tracker
    epochs: int
    log_every: int
    checkpoint_every: int | None
    step: int = 0
    attempt_start_step: int = 0  # where this start of the worker group began (0, or a checkpoint's step)
    history: dict[str, Any] = field(default_factory=lambda: {"epochs": []})
    stop_after_epoch: bool = False  # a callback asked to stop on the epoch's last step
    epoch: int = 0  # the epoch in progress (0-based)
    epoch_samples: int = 0  # samples of it trained on (a multiple of global_batch within one start)
    samples: int = 0  # samples trained on in the run
    resizes: int = 0  # times the run went on at another world size
    resized_from: int | None = None  # the world size of the checkpoint this start restored, if another

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step at this world size."""
        return self.spec.per_worker_batch * self.world

    @property
    def steps_per_epoch(self) -> int:
        rows = self.spec.elastic_rows
        if rows is None:
            return self.spec.steps_per_epoch
        return max(1, (rows // self.world) // self.spec.per_worker_batch)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def epoch_step(self) -> int:
        """Steps of the epoch in progress done (at this world size)."""
        return self.epoch_samples // self.global_batch

    def schedule_position(self) -> tuple[int, int]:
        """(done, length) of the run for the schedules that follow its length (the momentum's), counted in
        samples and expressed in steps of this world size: the epochs done and this epoch's samples, against
        ``epochs`` epochs of this size's steps. Within one start of the group an epoch's samples are whole
        batches of this size, so a fixed-size run gets exactly ``(step, total_steps)``, and a run that
        changed size is where its samples put it on the same curve."""
        return self.epoch * self.steps_per_epoch + self.epoch_step, self.total_steps

    def position(self) -> Position:
        return Position(self.step, self.epoch, self.epoch_samples, self.samples, self.world, self.resizes)

    def say(self, line: str) -> None:
        """A line on the console, from rank 0 only."""
        if self.rank == 0:
            print(line, flush=True)


class Job(Protocol):
    """What a job plugs into the skeleton (pretraining: :mod:`crossmoco_ray.pretrain.worker`, fine-tuning:
    :mod:`crossmoco_ray.finetune.worker`)."""

    def restore(self, ctx: Context, directory: Path) -> int:
        """Load the job's state from a checkpoint directory (copied locally); → the steps it holds."""
        ...

    def write(self, ctx: Context, directory: Path, rngs: list[dict[str, Any]], epochs_done: int) -> None:
        """Rank 0: write the job's state into ``directory`` (``rngs``: every rank's RNG states)."""
        ...

    def after_restore(self, ctx: Context) -> None:
        """Once the step to go on from is known (the monitor's baseline, ...)."""
        ...

    def start_epoch(self, ctx: Context, epoch: int, skip: int) -> Iterator[Any]:
        """The epoch's batches, from the first one not trained on (``skip`` were, before a restart)."""
        ...

    def step(self, ctx: Context, epoch: int, batch: Any, wait: float) -> None:
        """One optimizer step (``wait``: seconds spent waiting for the batch); keeps its scalars on the
        device (read at :meth:`take_window`)."""
        ...

    def take_window(self, ctx: Context) -> dict[str, float]:
        """The means of the log window's scalars (one read from the device; ``loss`` among them), reset."""
        ...

    def losses_finite(self, ctx: Context) -> bool:
        """Whether this rank's losses since the last window are all finite (before a checkpoint)."""
        ...

    def log_window(self, ctx: Context, epoch: int, window: dict[str, float]) -> None:
        """Rank 0: the progress line and the window's metrics."""
        ...

    def checkpoint_metrics(self, ctx: Context, epoch: int) -> dict[str, Any]:
        """What a mid-epoch checkpoint reports besides epoch and step."""
        ...

    def end_epoch(self, ctx: Context, epoch: int) -> dict[str, Any]:
        """Evaluation and the epoch's line (collective where it evaluates on every rank); → its metrics."""
        ...


def start(
    spec: WorkerSpec, session: TrainSession, *, epochs: int, log_every: int, checkpoint_every: int | None
) -> Context:
    """Phase 1: this worker's rank, world and device; MLflow on rank 0."""
    rank, world, device = session.context()
    tracker = Tracker(spec.tracking_uri, spec.mlflow_run_id) if rank == 0 else Tracker(None)
    return Context(spec, session, rank, world, device, tracker, epochs, log_every, checkpoint_every)


def restore(ctx: Context, job: Job) -> None:
    """Phase 2: the newest complete checkpoint, if any, and the position to go on from."""
    # (steps per epoch at the configured size: what a checkpoint without position.json was written at)
    point = resume_point(ctx.spec.run_dir, ctx.spec.steps_per_epoch, ctx.session.registered_checkpoint())
    if point.checkpoint is not None:
        with tempfile.TemporaryDirectory(prefix="crossmoco-restore-") as tmp:
            local = Path(point.checkpoint)
            if "://" in point.checkpoint or not local.is_dir():
                local = storage.copy_to_local(point.checkpoint, tmp)
            position = point.position  # read by resume_point from the same checkpoint
            if position is not None:  # before the job's state: its RNG streams may depend on the resize
                _go_on_from(ctx, position, position.step)
            step = job.restore(ctx, local)
            if position is None:  # an older checkpoint: its step at this (fixed) size
                _go_on_from(ctx, None, step)
            elif step != position.step:
                raise ResumeError(
                    f"{point.checkpoint}: its state holds step {step}, its {POSITION_FILE} step "
                    f"{position.step}"
                )
            ctx.history = storage.read_json(str(local / HISTORY_FILE)) or ctx.history
        where = f"epoch {ctx.epoch + 1} after {ctx.epoch_step} steps"
        ctx.say(f"resumed from {point.checkpoint}: {where} (step {ctx.step} overall)")
    ctx.attempt_start_step = ctx.step
    job.after_restore(ctx)


def _go_on_from(ctx: Context, position: Position | None, step: int) -> None:
    """Set ``ctx`` to go on from a checkpoint's position (``None``: an older checkpoint, at this size).

    At another world size the epoch's first untrained batch of this size is the one holding the sample the
    checkpoint reached: the batches before it are skipped, up to one batch of samples is trained again,
    none is skipped untrained (counted in samples); the samples counted are rolled back to that batch's
    start. A checkpoint whose samples reach this size's epoch end (a smaller epoch in steps × batch) trains
    the epoch's last batch again, so that every epoch has a step."""
    if position is None:  # written at the configured size, before positions were recorded
        world = ctx.spec.workers or ctx.world
        gb = ctx.spec.per_worker_batch * world
        fixed = Position.of_fixed_run(step, ctx.spec.steps_per_epoch, gb)
        position = replace(fixed, world=world if ctx.spec.workers else None)
    if position.epoch > ctx.epochs:
        raise ResumeError(
            f"the checkpoint's position is in epoch {position.epoch + 1}, past this run's {ctx.epochs} epochs"
        )
    ctx.step, ctx.epoch = position.step, position.epoch
    ctx.resizes = position.resizes
    if position.world is not None and position.world != ctx.world:
        ctx.resizes += 1
        ctx.resized_from = position.world
    skip = min(position.epoch_samples // ctx.global_batch, ctx.steps_per_epoch - 1)
    ctx.epoch_samples = skip * ctx.global_batch
    ctx.samples = position.samples - (position.epoch_samples - ctx.epoch_samples)
    if ctx.resized_from is not None:
        ctx.say(
            f"resized: {ctx.resized_from} → {ctx.world} workers (global batch {ctx.global_batch}, "
            f"{ctx.steps_per_epoch} steps per epoch); going on at sample {position.epoch_samples} of epoch "
            f"{ctx.epoch + 1}: {skip} batches of this size skipped, "
            f"{position.epoch_samples - ctx.epoch_samples} samples trained again"
        )


def save(ctx: Context, job: Job, epochs_done: int, metrics: dict[str, Any]) -> None:
    """A checkpoint (collective): every rank's RNG state to rank 0, which writes it; every rank reports.

    At an epoch's end (``ctx.epoch == epochs_done``, none of the next epoch trained) it is ``epoch_NNNN``,
    else ``step_NNNNNNNN``."""
    rngs = gather_objects(rng_state(ctx.device))
    at_end = ctx.epoch_samples == 0 and ctx.epoch == epochs_done
    name = epoch_checkpoint_name(epochs_done) if at_end else step_checkpoint_name(ctx.step)
    if ctx.rank != 0:
        ctx.session.report(metrics)
        return
    tmp = Path(tempfile.mkdtemp(prefix="crossmoco-ckpt-"))
    try:
        directory = tmp / "ckpt"
        directory.mkdir()
        job.write(ctx, directory, rngs, epochs_done)
        (directory / HISTORY_FILE).write_text(json.dumps(ctx.history))
        (directory / POSITION_FILE).write_text(json.dumps(position_record(ctx.position())))
        ctx.session.report(metrics, directory, name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_progress(ctx.spec.run_dir, name, ctx.step, epochs_done)


def _stop(ctx: Context, epoch: int, status: str, window: dict[str, float]) -> dict[str, Any]:
    """The outcome of a run stopped within ``epoch``: reported, and no checkpoint written since the last
    one (a NaN/Inf loss: that one is the last good state)."""
    values = {k: v for k, v in window.items() if isinstance(v, float)}
    ctx.session.report({"epoch": epoch, "step": ctx.step, status: 1.0, **values})
    return {"status": status, "epoch": epoch, "step": ctx.step, **values}


def run_epoch(ctx: Context, job: Job, epoch: int, skip: int) -> dict[str, Any] | None:
    """Phase 3: one epoch of steps; → the outcome if the run stopped (NaN/Inf loss, or a callback)."""
    spe = ctx.steps_per_epoch
    ctx.epoch = epoch
    batches = job.start_epoch(ctx, epoch, skip)
    stop_asked = False
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        job.step(ctx, epoch, batch, time.perf_counter() - t0)
        ctx.step += 1
        ctx.epoch_samples += ctx.global_batch
        ctx.samples += ctx.global_batch
        epoch_end = ctx.epoch_step >= spe
        every = ctx.checkpoint_every
        # (an epoch's end has its own checkpoint)
        checkpoint_now = every is not None and ctx.step % every == 0 and not epoch_end
        window = None
        if ctx.step % ctx.log_every == 0:
            window = job.take_window(ctx)  # the window's one read from the device
            if not all_ranks(math.isfinite(window["loss"]), ctx.device):
                return _stop(ctx, epoch, "nonfinite", window)
            if ctx.rank == 0:
                job.log_window(ctx, epoch, window)
        if checkpoint_now:
            if not all_ranks(job.losses_finite(ctx), ctx.device):  # never a checkpoint of NaN weights
                return _stop(ctx, epoch, "nonfinite", job.take_window(ctx))
            save(ctx, job, epoch, _mid_epoch_metrics(ctx, job, epoch))
        info = StepInfo(
            epoch,
            ctx.step,
            spe,
            ctx.rank,
            ctx.world,
            ctx.spec.run_dir,
            window,
            ctx.tracker,
            ctx.epoch_step,
            ctx.samples,
        )
        for callback in ctx.spec.step_callbacks:
            stop_asked = bool(callback(info)) or stop_asked
        if window is not None and ctx.spec.step_callbacks and not all_ranks(not stop_asked, ctx.device):
            if epoch_end:  # the epoch's last step: its evaluation and checkpoint come first
                ctx.stop_after_epoch = True
                break
            if not checkpoint_now:
                save(ctx, job, epoch, _mid_epoch_metrics(ctx, job, epoch))
            return _stop(ctx, epoch, "stopped", {})
    if not all_ranks(job.losses_finite(ctx), ctx.device):  # before the epoch's evaluation and checkpoint
        return _stop(ctx, epoch, "nonfinite", job.take_window(ctx))
    return None


def _mid_epoch_metrics(ctx: Context, job: Job, epoch: int) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "step": ctx.step,
        **job.checkpoint_metrics(ctx, epoch),
        "samples": ctx.samples,
        "world_size": ctx.world,
        "attempt_start_step": ctx.attempt_start_step,
        CHECKPOINT_PRIORITY: -1,
    }


def run_worker(ctx: Context, job: Job) -> dict[str, Any]:
    """Phases 2-4 for a started worker and its job; → the run's outcome (the worker's return value)."""
    restore(ctx, job)
    first = ctx.epoch
    for epoch in range(first, ctx.epochs):
        if epoch != first:
            ctx.epoch_samples = 0
        stopped = run_epoch(ctx, job, epoch, ctx.epoch_step)
        if stopped is not None:
            return stopped
        metrics = job.end_epoch(ctx, epoch)
        metrics |= {
            "epoch": epoch + 1,
            "step": ctx.step,
            "samples": ctx.samples,
            "attempt_start_step": ctx.attempt_start_step,
        }
        ctx.epoch, ctx.epoch_samples = epoch + 1, 0
        save(ctx, job, epoch + 1, {**metrics, CHECKPOINT_PRIORITY: epoch + 1})
        if ctx.stop_after_epoch:
            return _stop(ctx, epoch, "stopped", {})
    return {"status": "finished", "epoch": ctx.epochs, "step": ctx.step}
