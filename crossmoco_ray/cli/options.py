"""Value types and checks of the ``crossmoco`` commands' options: a bad value is refused with the option's
name and the value (shown bounded), as argparse reports a type error ("argument --batch-size: must be a
positive integer, got '-3'"), before anything runs.

The types run when a command line is parsed. The checks that look at the file system (a ``--checkpoint``
that exists, an ``--out`` that is not a file) run when the command starts instead: ``parse_command``
reads no data, and the documented commands name paths that exist only on their authors' machines.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from crossmoco_ray.bounded import short_repr

MAX_SEED = 2**32 - 1  # numpy's and torch's seeds both take it
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")


def _refuse(what: str, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"must be {what}, got {short_repr(text, 60)}")


def positive_int(text: str) -> int:
    """An int ≥ 1 (a batch size, a point count, neighbours, episodes)."""
    try:
        value = int(text)
    except ValueError:
        raise _refuse("a positive integer", text) from None
    if value < 1:
        raise _refuse("a positive integer", text)
    return value


def seed(text: str) -> int:
    """A random seed: an int in [0, 2**32 - 1]."""
    try:
        value = int(text)
    except ValueError:
        raise _refuse(f"an integer from 0 to {MAX_SEED}", text) from None
    if not 0 <= value <= MAX_SEED:
        raise _refuse(f"an integer from 0 to {MAX_SEED}", text)
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (an SVM's C, a temperature)."""
    try:
        value = float(text)
    except ValueError:
        raise _refuse("a positive number", text) from None
    if not (math.isfinite(value) and value > 0):
        raise _refuse("a positive, finite number", text)
    return value


def positive_ints(text: str) -> list[int]:
    """One or more ints ≥ 1, comma-separated (``20,200``)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    what = "one or more positive integers, comma-separated (e.g. 20,200)"
    if not parts or len(parts) > 100:
        raise _refuse(what, text)
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise _refuse(what, text) from None
    if min(values) < 1:
        raise _refuse(what, text)
    return values


def run_name(text: str) -> str:
    """A run or search name: one directory name under the storage path (no ``/``, not ``..``)."""
    if (
        not text.strip()
        or text in (".", "..")
        or any(c in text for c in "/\\")
        or not text.isprintable()
        or len(text) > 200
    ):
        raise _refuse("a name for one directory (no '/', not '..', printable, at most 200 characters)", text)
    return text


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether it is here is checked when the command
    runs: :func:`device_problem`)."""
    if not _DEVICE.fullmatch(text):
        raise _refuse("auto, cpu, cuda, cuda:N or mps", text)
    return text


# --------------------------------------------------------------------------------------------------
# Checks when a command starts: each returns the problem (naming the option and value) or None
# --------------------------------------------------------------------------------------------------


def is_uri(spec: str) -> bool:
    return "://" in spec


def existing_path_problem(option: str, value: str | None) -> str | None:
    """``value`` (a local path; a URI is left to its reader) must exist."""
    if value is None or is_uri(value):
        return None
    if not Path(value).exists():
        return f"{option} {short_repr(value)}: no such file or directory"
    return None


def directory_problem(option: str, value: str | None) -> str | None:
    """``value`` is a directory to write into: it may not exist yet, but must not be a file."""
    if value is None or is_uri(value):
        return None
    path = Path(value)
    if path.exists() and not path.is_dir():
        return f"{option} {short_repr(value)} is a file, not a directory: give a directory to write into"
    for parent in path.parents:  # mkdir would fail on a file on the way
        if parent.exists():
            if not parent.is_dir():
                return f"{option} {short_repr(value)}: {parent} is a file, not a directory"
            break
    return None


def device_problem(option: str, value: str) -> str | None:
    """A ``--device`` that is not on this machine (a CUDA device without CUDA, or past the last GPU)."""
    if value in ("auto", "cpu"):
        return None
    import torch

    if value == "mps":
        return None if torch.backends.mps.is_available() else f"{option} mps: no Apple GPU here; use cpu"

    if not torch.cuda.is_available():
        return f"{option} {value}: no CUDA GPU is available here; use {option} cpu (or auto)"
    index = int(value.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        return f"{option} {value}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
    return None


def refused(prog: str, problems: Iterable[str | None]) -> bool:
    """Print the first of ``problems`` (None: no problem) as ``prog: problem`` on stderr; whether there was
    one (the command then exits 2 before it runs anything)."""
    for problem in problems:
        if problem:
            print(f"{prog}: {problem}", file=sys.stderr)
            return True
    return False
