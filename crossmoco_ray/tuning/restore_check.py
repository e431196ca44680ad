"""Before ``tune --resume``: Tune restores a search by unpickling what it stored (``tuner.pkl``, the
experiment state, whose JSON carries cloudpickled objects, the searcher's and callbacks' state, each trial's
``params.pkl`` and ``error.pkl``). Unpickling runs code, so whoever can write the search's directory can
run code as you when you resume it.

A local search is resumed only if nobody else can change those files: the search directory, every file and
directory in it, and the directories above it must belong to you (or root, above it), be no links, and not
be writable by others. Group write is accepted only from a user private group (named after you, no other
members: Debian and Ubuntu give each user one, with umask 002). The Train runs under ``trials/`` are not
descended into: their checkpoints are read as tensors only (``torch.load(weights_only=True)``). Remote
storage (``s3://``, ``gs://``) cannot be checked: one warning says what resuming trusts there.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from crossmoco_ray.errors import ConfigError
from crossmoco_ray.nn.trusted_files import others_can_write

TRAIN_RUNS = "trials"  # the search's Train runs (search.py): checkpoints of tensors, not descended into
MAX_LISTED = 5


def _problem(path: Path, st: os.stat_result, *, owners: tuple[int, ...], sticky_ok: bool) -> str | None:
    """What lets another user change ``path`` (its ``lstat``), or ``None``."""
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return f"{path} is neither a file nor a directory"
    if st.st_uid not in owners:
        return f"{path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()})"
    others = others_can_write(st, path)  # the kernel cache's rule, group write of a user private group aside
    if others and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        return f"{path} is {others}"
    return None


def local_problems(search_dir: Path) -> list[str]:
    """What lets someone other than you change the Tune state of the local search in ``search_dir``
    (at most :data:`MAX_LISTED`, then how many more); empty when it is safe to unpickle."""
    uid = os.geteuid()
    problems: list[str] = []
    try:
        top = os.lstat(search_dir)
    except FileNotFoundError:
        return []  # nothing to restore (the caller says so)
    found = _problem(search_dir, top, owners=(uid,), sticky_ok=False)
    if found:
        problems.append(found)
    for parent in search_dir.resolve().parents:  # others must not be able to move the search away
        found = _problem(parent, os.lstat(parent), owners=(uid, 0), sticky_ok=True)
        if found:
            problems.append(found)
    if not stat.S_ISDIR(top.st_mode):
        return problems
    for root, dirs, files in os.walk(search_dir):
        here = Path(root)
        if here == search_dir and TRAIN_RUNS in dirs:
            dirs.remove(TRAIN_RUNS)
            files = [*files, TRAIN_RUNS]  # the directory itself, not what is in it
        for name in sorted(dirs) + sorted(files):
            path = here / name
            found = _problem(path, os.lstat(path), owners=(uid,), sticky_ok=False)
            if found:
                problems.append(found)
    if len(problems) > MAX_LISTED:
        problems = [*problems[:MAX_LISTED], f"... and {len(problems) - MAX_LISTED} more"]
    return problems


def check_resumable(search_dir: str, log: Callable[[str], None]) -> None:
    """Refuse (:class:`ConfigError`, with the fix) to resume a local search whose pickled Tune state someone
    else could have written; for remote storage, say once what resuming trusts."""
    if "://" in search_dir and not search_dir.startswith("file://"):
        scheme = search_dir.split("://", 1)[0]
        log(
            f"warning: resuming unpickles Tune's state from {search_dir}, which runs code stored there: the "
            f"{scheme} bucket must be writable only by principals you trust"
        )
        return
    local = Path(search_dir.removeprefix("file://"))
    problems = local_problems(local)
    if problems:
        listed = "\n  ".join(problems)
        raise ConfigError(
            f"not resuming the search in {local}: Tune would unpickle (run) state that someone else could "
            f"have written:\n  {listed}\nIf these files are yours and unchanged, make them yours alone "
            f"(e.g. `chmod -R go-w {local}`, and `chown` or move what belongs to another user), or start a "
            "fresh search under another --name"
        )
