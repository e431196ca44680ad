"""``crossmoco pretrain`` with a worker killed mid-run, through the library's step callbacks: the device
check's fault (bench/gpu_check.py, section ``pretrain``).

    python bench/fault_callback.py --at-step 15 pretrain --preset quickstart --storage /tmp/s \\
        --name gpu-check train.checkpoint_every_steps=10 ...

Everything after ``--at-step N`` is a ``crossmoco`` command line, read as ``crossmoco`` reads it
(:func:`crossmoco_ray.cli.main.parse_command`: ``--preset`` ← ``--config`` ← overrides, checked); the run
is :func:`crossmoco_ray.pretrain.driver.pretrain` with :class:`KillAtStep` as a step callback: the last
rank's process exits after step N (after that step's checkpoint, where it has one), once per run, so Ray
Train restarts the group, which resumes from the last checkpoint and finishes. Exits with the run's code.

The callback travels to the Ray workers pickled in their spec. This file is imported by its module name
(``fault_callback``, bench/ on ``sys.path``, which Ray hands to local workers as the driver's script
directory) and registered with Ray's cloudpickle to be pickled by value, so a worker unpickles it even
where bench/ is not on its path (a cluster joined through ``RAY_ADDRESS``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MARKER = ".fault_injected"


class KillAtStep:
    """A step callback (:data:`crossmoco_ray.runs.worker.StepCallback`) by which the last worker's process
    dies after ``step``, once per run: a marker in the run's directory remembers it (as tests/helpers.py's
    ``KillAtStep``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __repr__(self) -> str:
        return f"KillAtStep({self.step})"

    def __call__(self, info: Any) -> None:
        if info.step != self.step or info.rank != info.world_size - 1:
            return
        marker = Path(info.run_dir) / MARKER
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"worker {info.rank} killed after step {info.step}\n")
        print(f"[fault injection] killing worker {info.rank} after step {info.step}", flush=True)
        os._exit(1)


def parse(argv: Sequence[str] | None = None) -> tuple[int, Any]:
    """``--at-step N`` and the ``crossmoco pretrain`` command after it, parsed and its configuration
    resolved and checked (nothing runs): (N, :class:`~crossmoco_ray.cli.main.ParsedCommand`)."""
    from crossmoco_ray.cli.main import parse_command

    parser = argparse.ArgumentParser(prog="fault_callback.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--at-step", type=int, required=True, help="the step after which a worker dies")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="crossmoco pretrain ...")
    args = parser.parse_args(argv)
    if args.at_step < 1:
        parser.error("--at-step must be at least 1")
    cmd = parse_command(args.command)
    if cmd.form != "pretrain" or cmd.config is None:
        parser.error(f"expected a `crossmoco pretrain` command, got `crossmoco {cmd.form}`")
    return args.at_step, cmd


def main(argv: Sequence[str] | None = None) -> int:
    at_step, cmd = parse(argv)
    import ray.cloudpickle

    from crossmoco_ray.pretrain.driver import pretrain

    ray.cloudpickle.register_pickle_by_value(sys.modules[KillAtStep.__module__])
    a = cmd.args
    print(f"fault: step callback {KillAtStep(at_step)!r} (bench/fault_callback.py)", flush=True)
    code, _ = pretrain(
        cmd.config, preset=a.preset, name=a.name, storage=a.storage, data=a.data,
        step_callbacks=[KillAtStep(at_step)],
    )  # fmt: skip
    return code


if __name__ == "__main__":
    # run as a script: use the module imported by its name, not ``__main__`` (what a worker could import)
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import fault_callback

    raise SystemExit(fault_callback.main())
