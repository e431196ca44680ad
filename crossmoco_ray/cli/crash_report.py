"""Crash reports: where the traceback of an unexpected exception (a bug) is kept, so that the user sees
one line naming the file instead of a traceback (:func:`crossmoco_ray.cli.main.main`).

The file is created new (``mkstemp``: mode 0600, never an existing file or a link) in a directory only
this user can use; a traceback can show paths and values of the user's run.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
import traceback
from pathlib import Path

from crossmoco_ray import __version__
from crossmoco_ray.bounded import clip, first_line


def exception_line(err: BaseException) -> str:
    """``TypeName: the first line of its message``, bounded (an exception's message may hold anything)."""
    try:
        message = first_line(str(err)) or "(no message)"
    except Exception:  # an exception whose str fails
        message = "(no readable message)"
    return f"{type(err).__name__}: {message}"


MAX_TRACEBACK_CHARS = 1 << 20


def crash_dir() -> Path:
    """A directory only this user can use for crash reports: ``$TMPDIR/crossmoco-<uid>`` (mode 0700),
    or a fresh private one where that name is taken by something else (another user's, a link)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    folder = Path(tempfile.gettempdir()) / f"crossmoco-{uid if uid is not None else 'user'}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(folder)
        private = stat.S_ISDIR(info.st_mode) and not info.st_mode & 0o077
        if private and (uid is None or info.st_uid == uid):
            return folder
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="crossmoco-"))


def save_traceback(err: BaseException, command: str) -> Path | None:
    """Write ``err``'s traceback to a new file (mode 0600) in :func:`crash_dir`; its path, or None when
    nothing could be written."""
    try:
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        header = f"{command} (crossmoco-ray {__version__}, Python {sys.version.split()[0]})\n\n"
        fd, name = tempfile.mkstemp(prefix="crash-", suffix=".txt", dir=crash_dir())
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
            f.write(header + clip(text, MAX_TRACEBACK_CHARS))
        return Path(name)
    except Exception:
        return None
