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

Every checkpoint also holds its :class:`Position` (``position.json``): the optimizer steps, the epoch in
progress and the **samples** of it trained on, the samples of the run, the world size. Progress is counted in
samples because an elastic run (``train.num_workers=[min, max]``) may resume at another world size, where a
step is another number of samples: it skips the batches that hold the samples the checkpoint reached. A
checkpoint without one (an older run's) has its position derived from its name, at the run's fixed size.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from crossmoco_ray import storage
from crossmoco_ray.checkpoints.state import STATE_FILE
from crossmoco_ray.errors import ResumeError

PROGRESS_FILE = "progress.json"
POSITION_FILE = "position.json"  # the checkpoint's place in the run, in steps and samples (Position)
HISTORY_FILE = "history.json"  # a run's logged steps and epochs, beside its state in every checkpoint
_NAME = re.compile(r"^(epoch|step)_(\d+)$")


@dataclass(frozen=True)
class Position:
    """Where a run stands after a step: what a checkpoint holds and a restart goes on from."""

    step: int  # optimizer steps of the run (at whatever world sizes they ran)
    epoch: int  # the epoch in progress (0-based): the one the next step belongs to
    epoch_samples: int  # samples of that epoch trained on (0 at an epoch's start)
    samples: int  # samples trained on in the run (a restart counts again the ones it redoes)
    world: int | None = None  # workers of the steps up to here (None: not recorded, an older checkpoint)
    resizes: int = 0  # times the run went on at another world size before here

    @classmethod
    def of_fixed_run(cls, step: int, steps_per_epoch: int, global_batch: int) -> Position:
        """The position a fixed-size run's step count implies (a checkpoint without ``position.json``)."""
        within = step % steps_per_epoch
        return cls(step, step // steps_per_epoch, within * global_batch, step * global_batch)

    @classmethod
    def parse(cls, data: Any, where: str) -> Position:
        """A position read from a file (checked: whole numbers in range, one object)."""
        names = ("step", "epoch", "epoch_samples", "samples", "world", "resizes")
        if not isinstance(data, dict) or set(data) != set(names):
            raise ResumeError(f"{where}: not a checkpoint position (expected the keys {', '.join(names)})")
        for name in names:
            value = data[name]
            if name == "world" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**53:
                raise ResumeError(f"{where}: {name}={str(value)[:40]} is not a whole number of 0 or more")
        impossible = data["epoch_samples"] > data["samples"] or data["epoch"] > data["step"]
        if data["world"] == 0 or impossible:
            raise ResumeError(f"{where}: an impossible position {data}")
        return cls(**data)


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to restore (``None``: a fresh start), the optimizer steps it holds and its position."""

    checkpoint: str | None
    step: int
    position: Position | None = field(default=None, compare=False)

    def epoch(self, steps_per_epoch: int) -> int:
        """The epoch in progress (0-based): the one the next step belongs to."""
        return self.position.epoch if self.position is not None else self.step // steps_per_epoch


def read_position(checkpoint: str) -> Position | None:
    """The :class:`Position` a checkpoint directory (path or URI) holds, or ``None`` (an older one)."""
    where = f"{checkpoint}/{POSITION_FILE}"
    try:
        data = storage.read_json(where, limit=4096)
    except ValueError as err:
        raise ResumeError(str(err)) from None
    return None if data is None else Position.parse(data, where)


def position_record(position: Position) -> dict[str, Any]:
    """What ``position.json`` holds."""
    return asdict(position)


def epoch_checkpoint_name(epochs_done: int) -> str:
    """The checkpoint written at the end of the ``epochs_done``-th epoch."""
    return f"epoch_{epochs_done:04d}"


def step_checkpoint_name(step: int) -> str:
    """A checkpoint written inside an epoch, after ``step`` optimizer steps of the run."""
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
    """The newest complete checkpoint among Ray's registered one and ``progress.json``'s.

    Newest by optimizer steps, which grow with every step whatever the world size: from the checkpoint's
    ``position.json``, else (an older checkpoint) from its name at ``steps_per_epoch``."""
    names: list[str] = []
    if registered is not None:
        names.append(registered.rstrip("/").rsplit("/", 1)[-1])
    progress = storage.read_json(f"{run_dir}/{PROGRESS_FILE}") or {}
    written = progress.get("checkpoint")
    # a bare name of ours (a crafted "../elsewhere/step_1" would read outside the run)
    if (
        isinstance(written, str)
        and _NAME.fullmatch(written)
        and storage.exists(f"{run_dir}/{written}/{STATE_FILE}")
    ):
        names.append(written)
    candidates: list[tuple[int, str, Position | None]] = []
    for name in names:
        step = step_of(name, steps_per_epoch)
        if step is None:
            continue
        uri = f"{run_dir}/{name}"
        position = read_position(uri)
        candidates.append((position.step if position else step, uri, position))
    if not candidates:
        return ResumePoint(None, 0)
    step, uri, position = max(candidates, key=lambda c: (c[0], c[1]))
    return ResumePoint(uri, step, position)


def write_progress(run_dir: str, name: str, step: int, epoch: int) -> None:
    """Rank 0, after ``ray.train.report`` returned (the checkpoint is uploaded)."""
    storage.write_json(
        f"{run_dir}/{PROGRESS_FILE}",
        {"checkpoint": name, "step": step, "epochs_done": epoch, "time": time.time()},
    )
