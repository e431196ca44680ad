"""Small models and batches shared by tests."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from crossmoco_ray.nn import DGCNN, CrossMoCo, ImageEncoder
from crossmoco_ray.runs.worker import StepInfo


def tiny_crossmoco(queue_length: int = 16, dim: int = 8, **kwargs: object) -> CrossMoCo:
    """A CrossMoCo with the real encoder classes at toy widths (DGCNN k=4, ResNet-18, 16-px views)."""
    point = DGCNN(k=4, emb_dims=16, head_hidden=16, proj_dim=dim)
    image = ImageEncoder("resnet18", proj_dim=dim, head_hidden=16)
    return CrossMoCo(point, image, queue_length=queue_length, dim=dim, **kwargs)  # type: ignore[arg-type]


def tiny_batch(
    n: int,
    views: int = 2,
    points: int = 24,
    size: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "points1": torch.randn(n, points, 3, generator=g, dtype=dtype),
        "points2": torch.randn(n, points, 3, generator=g, dtype=dtype),
        "images": torch.randn(n, views, 3, size, size, generator=g, dtype=dtype),
    }


@dataclass(frozen=True)
class KillAtStep:
    """A step callback (:data:`crossmoco_ray.runs.worker.StepCallback`) by which the last worker's process
    dies after ``step`` (and its checkpoint, if it has one), once per run: a marker in the run's directory
    remembers it, so the restarted group goes on."""

    step: int

    def __call__(self, info: StepInfo) -> None:
        if info.step != self.step or info.rank != info.world_size - 1:
            return
        marker = Path(info.run_dir) / ".fault_injected"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"worker {info.rank} killed after step {info.step}\n")
        print(f"[fault injection] killing worker {info.rank} after step {info.step}", flush=True)
        os._exit(1)


@dataclass(frozen=True)
class RaiseAtStep:
    """A step callback that raises after ``step`` on every rank: an error inside the workers."""

    step: int

    def __call__(self, info: StepInfo) -> None:
        if info.step == self.step:
            raise RuntimeError(f"the callback refuses step {info.step}")


@dataclass
class LocalSession:
    """Ray Train's part, in this process: rank 0 of 1 on the CPU; reported checkpoints land in the run."""

    run_dir: Path
    registered: str | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)

    def context(self) -> tuple[int, int, torch.device]:
        return 0, 1, torch.device("cpu")

    def registered_checkpoint(self) -> str | None:
        return self.registered

    def report(
        self, metrics: dict[str, Any], checkpoint: Path | None = None, name: str | None = None
    ) -> None:
        self.reports.append(dict(metrics))
        if checkpoint is not None:
            assert name is not None
            shutil.copytree(checkpoint, self.run_dir / name)
            self.registered = str(self.run_dir / name)


def run_gloo_ranks(
    worker: Callable[[int, str, str], None], world: int, out: Path, timeout: float = 240
) -> list[Any]:
    """Spawn ``world`` processes running ``worker(rank, init_file, out_dir)`` (which joins a gloo group
    through the init file and saves its results as ``out_dir/rank{r}.pt``); their results, in rank order.
    Processes still running after ``timeout`` seconds are killed and the test fails."""
    ctx = mp.start_processes(
        worker, args=(str(out / "init"), str(out)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world}-process gloo group did not finish in {timeout:.0f} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@dataclass(frozen=True)
class PaceBelow:
    """A step callback that slows every step of a worker group smaller than ``world`` workers by
    ``seconds``: a run on a shrunken cluster lasts until the cluster has grown back (elastic tests)."""

    world: int
    seconds: float

    def __call__(self, info: StepInfo) -> None:
        if info.world_size < self.world:
            time.sleep(self.seconds)
