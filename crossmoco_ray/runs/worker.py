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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from crossmoco_ray import storage
from crossmoco_ray.checkpoints.resume import (
    HISTORY_FILE,
    checkpoint_name,
    resume_point,
    write_progress,
)
from crossmoco_ray.checkpoints.state import rng_state
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

    @property
    def step_in_epoch(self) -> int:
        return self.step - self.epoch * self.steps_per_epoch


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
    steps_per_epoch: int
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    step_callbacks: Sequence[StepCallback] = ()


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
    """One worker's place in the run, shared by the skeleton and the job."""

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

    @property
    def steps_per_epoch(self) -> int:
        return self.spec.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

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
    """Phase 2: the newest complete checkpoint, if any."""
    spe = ctx.steps_per_epoch
    point = resume_point(ctx.spec.run_dir, spe, ctx.session.registered_checkpoint())
    if point.checkpoint is not None:
        with tempfile.TemporaryDirectory(prefix="crossmoco-restore-") as tmp:
            local = Path(point.checkpoint)
            if "://" in point.checkpoint or not local.is_dir():
                local = storage.copy_to_local(point.checkpoint, tmp)
            ctx.step = job.restore(ctx, local)
            ctx.history = storage.read_json(str(local / HISTORY_FILE)) or ctx.history
        where = f"epoch {ctx.step // spe + 1} after {ctx.step % spe} steps"
        ctx.say(f"resumed from {point.checkpoint}: {where} (step {ctx.step} overall)")
    ctx.attempt_start_step = ctx.step
    job.after_restore(ctx)


def save(ctx: Context, job: Job, epochs_done: int, metrics: dict[str, Any]) -> None:
    """A checkpoint (collective): every rank's RNG state to rank 0, which writes it; every rank reports."""
    rngs = gather_objects(rng_state(ctx.device))
    name = checkpoint_name(ctx.step, ctx.steps_per_epoch)
    if ctx.rank != 0:
        ctx.session.report(metrics)
        return
    tmp = Path(tempfile.mkdtemp(prefix="crossmoco-ckpt-"))
    try:
        directory = tmp / "ckpt"
        directory.mkdir()
        job.write(ctx, directory, rngs, epochs_done)
        (directory / HISTORY_FILE).write_text(json.dumps(ctx.history))
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
    batches = job.start_epoch(ctx, epoch, skip)
    stop_asked = False
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        job.step(ctx, epoch, batch, time.perf_counter() - t0)
        ctx.step += 1
        every = ctx.checkpoint_every
        # (an epoch's end has its own checkpoint)
        checkpoint_now = every is not None and ctx.step % every == 0 and ctx.step % spe != 0
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
        info = StepInfo(epoch, ctx.step, spe, ctx.rank, ctx.world, ctx.spec.run_dir, window, ctx.tracker)
        for callback in ctx.spec.step_callbacks:
            stop_asked = bool(callback(info)) or stop_asked
        if window is not None and ctx.spec.step_callbacks and not all_ranks(not stop_asked, ctx.device):
            if ctx.step % spe == 0:  # the epoch's last step: its evaluation and checkpoint come first
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
        "attempt_start_step": ctx.attempt_start_step,
        CHECKPOINT_PRIORITY: -1,
    }


def run_worker(ctx: Context, job: Job) -> dict[str, Any]:
    """Phases 2-4 for a started worker and its job; → the run's outcome (the worker's return value)."""
    restore(ctx, job)
    spe = ctx.steps_per_epoch
    first = ctx.step // spe
    for epoch in range(first, ctx.epochs):
        stopped = run_epoch(ctx, job, epoch, ctx.step % spe if epoch == first else 0)
        if stopped is not None:
            return stopped
        metrics = job.end_epoch(ctx, epoch)
        metrics |= {"epoch": epoch + 1, "step": ctx.step, "attempt_start_step": ctx.attempt_start_step}
        save(ctx, job, epoch + 1, {**metrics, CHECKPOINT_PRIORITY: epoch + 1})
        if ctx.stop_after_epoch:
            return _stop(ctx, epoch, "stopped", {})
    return {"status": "finished", "epoch": ctx.epochs, "step": ctx.step}
