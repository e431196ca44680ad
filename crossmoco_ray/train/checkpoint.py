"""Checkpoints that resume exactly: model (encoders, heads, queues, pointer), optimizer, schedule position,
RNG states, resolved config, MLflow run id. Pure torch; loaded with ``weights_only=True``.

Layout of a checkpoint directory::

    state.pt      the dict below (torch.save)
    config.yaml   the resolved configuration, for people

``state.pt``: ``format``, ``version``, ``model`` (the CrossMoCo state dict, DDP prefix stripped),
``optimizer``, ``scheduler`` (``{"lr": …}``: the schedule is a function of the epoch), ``epoch`` (epochs
completed), ``step`` (optimizer steps done: mid-epoch when ``step`` is not a multiple of the steps per
epoch), ``rng`` (torch CPU and CUDA of rank 0), ``rng_per_rank`` (the same for every rank, in rank order),
``config`` (a plain dict), ``mlflow_run_id``, ``run_name``, ``metrics``, ``queue_checksum``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..config import Config, to_yaml
from ..nn import CrossMoCo

FORMAT = "crossmoco-ray/checkpoint"
VERSION = 1
STATE_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    """The torch RNGs (CPU and CUDA) this process draws from during training.

    The model's own randomness is torch's (shuffle-BN permutations); the data pipeline seeds its own
    generators per epoch, so numpy's and Python's global RNGs carry nothing a resume needs.
    """
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model: torch.nn.Module) -> CrossMoCo:
    """The CrossMoCo module inside a DDP wrapper (or the module itself)."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, CrossMoCo):
        raise TypeError(f"expected a CrossMoCo model, got {type(inner).__name__}")
    return inner


def build_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    *,
    epoch: int,
    step: int,
    lr: float,
    mlflow_run_id: str | None = None,
    run_name: str | None = None,
    metrics: dict[str, float] | None = None,
    rng_per_rank: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything a resume needs; ``rng_per_rank``: every worker's :func:`rng_state` (default: this one)."""
    module = unwrap(model)
    rngs = rng_per_rank or [rng_state()]
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"lr": lr},
        "epoch": epoch,
        "step": step,
        "rng": rngs[0],
        "rng_per_rank": rngs,
        "config": cfg.model_dump(mode="json"),
        "mlflow_run_id": mlflow_run_id,
        "run_name": run_name,
        "metrics": dict(metrics or {}),
        "queue_checksum": module.queue.checksum(),
    }


def write_checkpoint(directory: str | Path, state: dict[str, Any], cfg: Config) -> Path:
    """Write ``state.pt`` + ``config.yaml`` into a temporary sibling of ``directory``, then move it in."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        torch.save(state, tmp / STATE_FILE)
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory


def read_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The state dict of a checkpoint directory (or of its ``state.pt``), checked for its format."""
    path = Path(directory)
    file = path / STATE_FILE if path.is_dir() else path
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{file} is not a crossmoco-ray checkpoint")
    if state.get("version") != VERSION:
        version = state.get("version")
        raise ValueError(f"{file}: checkpoint version {version}, this crossmoco-ray reads {VERSION}")
    return state


def restore(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
) -> bool:
    """Load model (queues and pointer included), optimizer and this rank's RNG state from a checkpoint
    state. Returns whether the RNG state was this rank's own: a run resumed on another number of workers
    gets fresh per-rank seeds instead (``seed + rank`` mixed with the step), so it is not bit-exact."""
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    rngs = state.get("rng_per_rank") or [state["rng"]]
    if len(rngs) == world_size:
        set_rng_state(rngs[rank])
        return True
    seed = int(state["config"]["train"]["seed"])
    torch.manual_seed(seed * 1_000_003 + rank * 7919 + int(state["step"]))
    return False
