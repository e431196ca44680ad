"""``prepare``'s work directory ``<out>/.incomplete-<id>/``: whose it is; cleaning up after dead runs.

A run writes everything into its work directory and moves the finished files into ``<out>`` at the end
(:mod:`.shards`); the directory is removed however the run ends: an error, Ctrl-C, or SIGTERM (``kill``,
Slurm, Kubernetes), which :func:`terminate_as_exit` turns into the same clean-up and exit status 143.
A run killed harder (SIGKILL, a lost node) leaves it behind, so the next ``prepare`` into the same
``<out>`` removes the work directories of runs that are gone (:func:`remove_stale`), never a live one's:

- each work directory holds ``owner.json``: the host name and pid of its run and a heartbeat time the run
  refreshes every few minutes;
- a directory of this host is stale when its pid is no longer alive; of another host (a shared
  filesystem, a bucket) when its heartbeat is older than :data:`STALE_SECONDS`; without an owner file (an
  older crossmoco-ray, or a run killed before it wrote one) when it was last changed that long ago.

Removal never follows a symbolic link: a link named like a work directory is left alone, and links inside
one are removed as links.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow.fs as pafs

from crossmoco_ray.data.shards.manifest import is_symlink, join_uri, read_regular

WORK_PREFIX = ".incomplete-"
OWNER = "owner.json"
STALE_SECONDS = 6 * 3600  # another host's run is gone after this long without a heartbeat
HEARTBEAT_SECONDS = 300
MAX_OWNER_BYTES = 4096
MAX_PID = 1 << 22  # Linux's largest pid_max (/proc/sys/kernel/pid_max); a larger pid is no process


class WorkDir:
    """A new work directory under ``root`` (``out`` as the user gave it, for messages), owned by this run."""

    def __init__(self, fs: pafs.FileSystem, root: str, out: str) -> None:
        name = f"{WORK_PREFIX}{uuid.uuid4().hex[:8]}"
        self.fs, self.path, self.uri = fs, f"{root}/{name}", join_uri(out, name)
        fs.create_dir(self.path, recursive=True)
        self._last = 0.0
        self.beat(force=True)

    def beat(self, force: bool = False) -> None:
        """Refresh the owner file (at most every :data:`HEARTBEAT_SECONDS` unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last < HEARTBEAT_SECONDS:
            return
        self._last = now
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        with self.fs.open_output_stream(f"{self.path}/{OWNER}") as f:
            f.write(json.dumps(owner).encode())

    def remove(self) -> None:
        if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            remove_tree(self.fs, self.path)


def remove_tree(fs: pafs.FileSystem, path: str) -> None:
    """Delete the directory ``path`` and what is in it, without following symbolic links."""
    if isinstance(fs, pafs.LocalFileSystem):
        shutil.rmtree(path)  # refuses a link itself; unlinks links inside without following them
    else:
        fs.delete_dir(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def _owner(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The owner file's host, pid and heartbeat; None when it is missing or malformed (an unknown owner:
    the age rule of :func:`stale_reason`). Read only when it is a regular file (not a link, not a FIFO,
    whose read would wait forever), at most :data:`MAX_OWNER_BYTES`."""
    try:
        data = read_regular(fs, f"{path}/{OWNER}", MAX_OWNER_BYTES, OWNER)
        owner = None if data is None or len(data) > MAX_OWNER_BYTES else json.loads(data.decode())
    except (OSError, ValueError, RecursionError):  # DataError (not a regular file) is a ValueError
        return None
    if not isinstance(owner, dict):
        return None
    host, pid, heartbeat = owner.get("host"), owner.get("pid"), owner.get("heartbeat")
    if not (isinstance(host, str) and type(pid) is int and 0 < pid <= MAX_PID):
        return None
    if type(heartbeat) not in (int, float) or not isinstance(heartbeat, (int, float)):
        return None
    try:
        beat = float(heartbeat)
    except OverflowError:
        return None
    if not math.isfinite(beat):
        return None
    return {"host": host, "pid": pid, "heartbeat": beat}


def stale_reason(fs: pafs.FileSystem, info: pafs.FileInfo, now: float | None = None) -> str | None:
    """Why the work directory ``info`` belongs to a run that is gone (None: it may be alive)."""
    now = time.time() if now is None else now
    owner = _owner(fs, info.path)
    if owner is not None:
        if owner["host"] == socket.gethostname():
            return None if _alive(owner["pid"]) else f"its run, pid {owner['pid']} on this host, has ended"
        age = now - owner["heartbeat"]
        if age > STALE_SECONDS:
            return f"no heartbeat from its run on {owner['host'][:80]} for {age / 3600:.0f} hours"
        return None
    if info.mtime is None:
        return None
    age = now - info.mtime.timestamp()
    return f"no owner, untouched for {age / 3600:.0f} hours" if age > STALE_SECONDS else None


def remove_stale(fs: pafs.FileSystem, root: str, out: str, log: Callable[[str], None]) -> None:
    """Remove the work directories under ``root`` whose runs are gone (module docstring)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return
    for info in infos:
        if not info.base_name.startswith(WORK_PREFIX) or info.type != pafs.FileType.Directory:
            continue
        if is_symlink(fs, info.path):
            continue
        reason = stale_reason(fs, info)
        if reason is not None:
            remove_tree(fs, info.path)
            log(f"removed the stale work directory {join_uri(out, info.base_name)} ({reason})")


def _exit_on_term(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """(Re)install the SIGTERM handler of :func:`terminate_as_exit` (``ray.init`` replaces it with one that
    exits with status 15); only the main thread can."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_term)


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """While inside, SIGTERM raises ``SystemExit(143)``: clean-up code runs as for Ctrl-C, and the process
    exits with the status a shell reports for SIGTERM. The handler before is restored after. Only the main
    thread can set handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
