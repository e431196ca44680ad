"""Where a (re)started run picks up: the newest complete checkpoint, at an epoch end or mid-epoch.

Checkpoints are named by what they hold: ``epoch_0004`` after the fourth epoch, ``step_00001234`` after step
1234 inside an epoch (``train.checkpoint_every_steps``). Two sources name the newest one:

- Ray Train's registered latest checkpoint (``ray.train.get_checkpoint()`` in a worker, the run's snapshot
  on storage for the driver and the Train controller);
- ``progress.json``, which rank 0 writes after ``ray.train.report`` has uploaded a checkpoint. A worker that
  dies within moments of its report can leave that checkpoint uploaded but unregistered (Ray Train 2.60
  registers it only when the controller polls the report); without this file the restart would redo a
  whole checkpoint interval, or start from step 0.

The newer of the two wins. The same function decides for the workers (which state to restore, how many
batches of the epoch to skip) and for the dataset factory (which data epoch to start at), so they agree.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from crossmoco_ray import storage
from crossmoco_ray.checkpoints.state import STATE_FILE

PROGRESS_FILE = "progress.json"
HISTORY_FILE = "history.json"  # a run's logged steps and epochs, beside its state in every checkpoint
_NAME = re.compile(r"^(epoch|step)_(\d+)$")


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to restore (``None``: a fresh start) and the optimizer steps it holds."""

    checkpoint: str | None
    step: int

    def epoch(self, steps_per_epoch: int) -> int:
        """The epoch in progress (0-based): the one the next step belongs to."""
        return self.step // steps_per_epoch

    def skip(self, steps_per_epoch: int) -> int:
        """Batches of that epoch already trained on (skipped by every worker on resume)."""
        return self.step % steps_per_epoch


def checkpoint_name(step: int, steps_per_epoch: int) -> str:
    """``epoch_NNNN`` at an epoch end, else ``step_NNNNNNNN``."""
    if step % steps_per_epoch == 0:
        return f"epoch_{step // steps_per_epoch:04d}"
    return f"step_{step:08d}"


def step_of(name: str, steps_per_epoch: int) -> int | None:
    """The optimizer steps a checkpoint directory named ``name`` holds (``None``: not one of ours)."""
    match = _NAME.match(name.rstrip("/").rsplit("/", 1)[-1])
    if match is None:
        return None
    kind, number = match.groups()
    return int(number) * (steps_per_epoch if kind == "epoch" else 1)


def registered_checkpoint(run_dir: str) -> str | None:
    """The latest checkpoint Ray Train registered for the run at ``run_dir`` (driver or controller side)."""
    if not storage.exists(run_dir):
        return None
    try:
        from ray.train import Result

        result = Result.from_path(run_dir)
    except Exception:  # no snapshot yet, or one from another Ray version: nothing registered to resume
        return None
    return result.checkpoint.path if result.checkpoint is not None else None


def resume_point(run_dir: str, steps_per_epoch: int, registered: str | None) -> ResumePoint:
    """The newest complete checkpoint among Ray's registered one and ``progress.json``'s."""
    candidates: list[tuple[int, str]] = []
    if registered is not None:
        name = registered.rstrip("/").rsplit("/", 1)[-1]
        step = step_of(name, steps_per_epoch)
        if step is not None:
            candidates.append((step, f"{run_dir}/{name}"))
    progress = storage.read_json(f"{run_dir}/{PROGRESS_FILE}") or {}
    written = progress.get("checkpoint")
    if isinstance(written, str):
        step = step_of(written, steps_per_epoch)
        if step is not None and storage.exists(f"{run_dir}/{written}/{STATE_FILE}"):
            candidates.append((step, f"{run_dir}/{written}"))
    if not candidates:
        return ResumePoint(None, 0)
    step, uri = max(candidates)
    return ResumePoint(uri, step)


def write_progress(run_dir: str, name: str, step: int, epoch: int) -> None:
    """Rank 0, after ``ray.train.report`` returned (the checkpoint is uploaded)."""
    storage.write_json(
        f"{run_dir}/{PROGRESS_FILE}",
        {"checkpoint": name, "step": step, "epochs_done": epoch, "time": time.time()},
    )
