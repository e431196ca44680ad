"""Checkpoints that resume exactly: model (encoders, heads, queues, pointer), optimizer, schedule position,
RNG states, resolved config, MLflow run id. Pure torch; loaded with ``weights_only=True``.

Layout of a checkpoint directory::

    state.pt      the dict below (torch.save)
    config.yaml   the resolved configuration, for people

``state.pt``: ``format``, ``version``, ``model`` (the CrossMoCo state dict, DDP prefix stripped),
``optimizer``, ``scheduler`` (``{"lr": …}``: the schedule is a function of the epoch), ``epoch`` (epochs
completed), ``step`` (optimizer steps done: mid-epoch when ``step`` is not a multiple of the steps per
epoch), ``rng`` (rank 0's RNG states), ``rng_per_rank`` (every rank's, in rank order: torch's CPU
generator and the generator of the one GPU the rank trains on, :func:`rng_state`), ``config`` (a plain
dict), ``mlflow_run_id``, ``run_name``, ``metrics``, ``queue_checksum``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from crossmoco_ray.bounded import clip, first_line, short_repr
from crossmoco_ray.config.schema import Config
from crossmoco_ray.config.serialized import to_yaml
from crossmoco_ray.nn import CrossMoCo

FORMAT = "crossmoco-ray/checkpoint"
# 2: each rank's RNG holds one GPU generator (its own) or None, not a list of every visible GPU's. Version 1
# reads the same but for that (its GPU states are not restored); earlier code refuses version 2 by name.
VERSION = 2
READABLE = (1, 2)
STATE_FILE = "state.pt"


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The torch RNGs this worker draws from during training: the CPU generator and, on a GPU, the
    generator of its own device (``device``) only.

    Not every GPU the process sees: Ray gives a node's workers the same ``CUDA_VISIBLE_DEVICES``, so a
    worker sees all of its node's GPUs, and a resume may land on a node with fewer of them or on another
    local index. The model's own randomness is torch's (shuffle-BN permutations); the data pipeline seeds
    its own generators per epoch, so numpy's and Python's global RNGs carry nothing a resume needs.
    """
    cuda = torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> bool:
    """Restore :func:`rng_state`'s states, the GPU one onto ``device`` (the worker's own GPU); returns
    whether every generator the worker draws from was restored.

    A CPU worker ignores a GPU state; a GPU worker resuming a CPU run's state, or a state of checkpoint
    version 1 (a list with one state per GPU the writer saw, not knowing which was the rank's), keeps
    its GPU generator's seeding (and ``False`` says so).
    """
    torch.set_rng_state(state["torch"])
    if device is None or device.type != "cuda":
        return True
    cuda = state.get("cuda")
    if not isinstance(cuda, torch.Tensor):
        return False
    torch.cuda.set_rng_state(cuda, device)
    return True


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
    rngs = rng_per_rank or [rng_state(_device_of(module))]
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


def _device_of(module: torch.nn.Module) -> torch.device | None:
    return next((p.device for p in module.parameters()), None)


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


def load_torch_file(file: Path) -> Any:
    """``torch.load(file, weights_only=True)`` on CPU; a file that does not unpickle (truncated, not a
    PyTorch file, objects other than tensors and plain data) is a ``ValueError`` naming it and why, in
    one line. A missing file is a ``FileNotFoundError``."""
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist")
    archive_problem = _archive_problem(file)
    if archive_problem:
        raise ValueError(f"{file}: {archive_problem}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises anything from EOFError to RuntimeError for a damaged file
        reason = first_line(str(err)) or "no message"
        raise ValueError(f"{file}: not a readable PyTorch file ({type(err).__name__}: {reason})") from err


def _archive_problem(file: Path) -> str | None:
    """Why ``file`` must not reach ``torch.load``, or ``None``: it is not a regular file (a FIFO would block
    forever, a device never ends), or it is a zip archive (``torch.save``'s format) with a compressed entry.
    ``torch.save`` stores its entries uncompressed, so what a loader allocates is bounded by the file's
    size; a compressed entry lets a 1 MB file claim a 1 GB tensor, allocated before anything is checked."""
    try:
        st = os.stat(file)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a FIFO, a device or a directory): not a PyTorch file"
    try:
        with zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    return (
                        f"entry {clip(info.filename, 80)} is compressed, which torch.save never writes: "
                        "a crafted file (it could claim any size)"
                    )
                if info.file_size > st.st_size:
                    return f"entry {clip(info.filename, 80)} claims more bytes than the file holds"
    except zipfile.BadZipFile:
        return None  # torch's legacy (pre-1.6) format, or not a PyTorch file: torch.load says which
    except (OSError, ValueError, EOFError) as err:
        return f"unreadable archive ({first_line(str(err)) or type(err).__name__})"
    return None


def checked_state(state: Any, file: Path | str) -> dict[str, Any]:
    """``state`` (what ``state.pt`` unpickled to) when it has the checkpoint's format and a readable
    version; else a ``ValueError`` naming ``file``."""
    fmt = state.get("format") if isinstance(state, dict) else None
    if not isinstance(fmt, str) or fmt != FORMAT:
        raise ValueError(f"{file} is not a crossmoco-ray checkpoint")
    version = state.get("version")
    if type(version) is not int or version not in READABLE:
        raise ValueError(
            f"{file}: checkpoint version {short_repr(version, 40)}, this crossmoco-ray reads {READABLE}"
        )
    return state


def model_and_config(state: dict[str, Any], file: Path | str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint state's ``model`` (state dict) and ``config`` (plain dict), checked to be mappings;
    else a ``ValueError`` naming ``file``."""
    parts = []
    for key in ("model", "config"):
        value = state.get(key)
        if not isinstance(value, dict):
            got = type(value).__name__
            raise ValueError(f"{file}: the checkpoint's {key!r} is a {got}, not a mapping (a damaged file)")
        parts.append(value)
    return parts[0], parts[1]


def read_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The state dict of a checkpoint directory (or of its ``state.pt``), checked for its format; a
    damaged file is a ``ValueError`` naming it."""
    path = Path(directory)
    if path.is_dir() and not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} holds no {STATE_FILE}: not a checkpoint directory")
    file = path / STATE_FILE if path.is_dir() else path
    return checked_state(load_torch_file(file), file)


def restore(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    resizes: int = 0,
) -> bool:
    """Load model (queues and pointer included), optimizer and this rank's RNG states (its GPU's onto
    ``device``) from a checkpoint state. Returns whether the RNG states were restored whole: a run resumed
    on another number of workers gets per-rank streams derived from (seed, rank, world size, ``resizes``:
    the times the run changed size, this one included; :func:`derived_seed`), so a resized run is
    reproducible given the same sequence of sizes; a GPU run from a version-1 checkpoint keeps its GPU
    generator's seeding. Neither is the uninterrupted run's randomness."""
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    rngs = state.get("rng_per_rank") or [state["rng"]]
    if len(rngs) == world_size:
        return set_rng_state(rngs[rank], device)
    seed = int(state["config"]["train"]["seed"])
    torch.manual_seed(derived_seed(seed, rank, world_size, resizes))  # CPU and every GPU's generator
    return False


def derived_seed(seed: int, rank: int, world_size: int, resizes: int) -> int:
    """A rank's seed after a resize: 63 bits of SHA-256 over (seed, rank, world size, resizes), distinct
    for every rank of every size the run went on at."""
    digest = hashlib.sha256(f"crossmoco-rng/{seed}/{rank}/{world_size}/{resizes}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
