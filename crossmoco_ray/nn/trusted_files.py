"""Files and directories that no other user could have written: the checks before code is loaded from them.

A file is trusted only if it is a regular file (not a link) of the current user that nobody else may write
(:func:`others_can_write`: the mode bits, a POSIX access ACL, group write only from a user private group),
in a directory chain that nobody else may change (:func:`dir_problem`); :func:`verify_recorded` also
requires it to match the SHA-256 recorded beside it when it was written (:func:`digest_path`). The cache of
compiled libraries (:mod:`crossmoco_ray.nn.native`: the kNN kernels, the mesh rasteriser) loads a library
only if it passes them, and ``tune --resume`` checks a search's pickled state with :func:`others_can_write`
before unpickling it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import struct
from pathlib import Path


class Untrusted(Exception):
    """A cached library (or its directory) that another user could have written: never loaded."""


@functools.lru_cache(maxsize=64)
def private_group(gid: int) -> bool:
    """Whether ``gid`` is your user private group (your primary group, named after you, no other members:
    Debian and Ubuntu give each user one, with umask 002), whose write permission is yours alone."""
    try:
        import grp
        import pwd

        user = pwd.getpwuid(os.geteuid())
        group = grp.getgrgid(gid)
        # Nobody else may have it as a primary group either (gr_mem lists only supplementary members).
        shared = any(p.pw_gid == gid and p.pw_uid != user.pw_uid for p in pwd.getpwall())
    except (ImportError, KeyError):
        return False
    if shared or gid != user.pw_gid or group.gr_name != user.pw_name:
        return False
    return set(group.gr_mem) <= {user.pw_name}


# A POSIX access ACL as Linux stores it (system.posix_acl_access): a 4-byte version, then 8-byte entries of
# (tag u16, permissions u16, id u32). Named users and groups are the entries the mode bits do not show.
_ACL_XATTR = "system.posix_acl_access"
_ACL_NAMED = {0x02: "user", 0x08: "group"}
_ACL_WRITE = 0x02


def acl_writers(where: str | Path | int) -> str | None:
    """The first named user or group that an access ACL on ``where`` (a path, not followed if a link, or an
    open file descriptor) lets write, or ``None`` (no ACL, or one the mode bits already describe).

    ``ls -l`` shows such a file as mode 0664 or 0775 (the ACL mask sits in the group bits), which a check
    of the mode bits alone takes for the owner's private group."""
    try:
        if isinstance(where, int):
            blob = os.getxattr(where, _ACL_XATTR)
        else:
            blob = os.getxattr(where, _ACL_XATTR, follow_symlinks=False)
    except (OSError, AttributeError):  # no ACL (ENODATA), no xattr support here or on this platform
        return None
    for offset in range(4, len(blob) - 7, 8):
        tag, perm, ident = struct.unpack_from("<HHI", blob, offset)
        if tag in _ACL_NAMED and perm & _ACL_WRITE:
            return f"{_ACL_NAMED[tag]} {ident}"
    return None


def others_can_write(st: os.stat_result, where: str | Path | int | None = None) -> str | None:
    """Who other than the owner may write the file or directory of ``st``, or ``None``; with ``where``
    (its path or open descriptor) its access ACL is read too."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        return f"writable by others (mode {mode:o})"
    acl = acl_writers(where) if where is not None else None
    if acl:
        return f"writable by {acl} through an ACL (mode {mode:o}; see getfacl)"
    if mode & stat.S_IWGRP and not private_group(st.st_gid):
        return f"writable by group {st.st_gid} (mode {mode:o})"
    return None


def dir_problem(directory: Path) -> str | None:
    """Why another user could replace a file in ``directory`` (a resolved path), or ``None``.

    It and every directory above it must belong to you or root; it must not be writable by others (a group
    of yours alone aside), and neither may those above, unless they have the sticky bit (like ``/tmp``:
    nobody may rename or remove an entry there that is not theirs).
    """
    uid = os.geteuid()
    for path in (directory, *directory.parents):
        st = os.lstat(path)
        if st.st_uid not in (uid, 0):
            return f"{path} belongs to uid {st.st_uid}, not to you (uid {uid}) or root"
        others = others_can_write(st, path)
        if others and (path == directory or not st.st_mode & stat.S_ISVTX):
            return f"{path} is {others}"
    return None


def read_owned(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, a regular file (not a link) that belongs to you and that nobody else may
    write; raises :class:`Untrusted` otherwise. The checks are of the opened file itself."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise Untrusted(f"{path.name} is missing") from None
    except OSError as err:
        if os.path.islink(path):
            raise Untrusted(f"{path.name} is a symbolic link") from None
        raise Untrusted(f"{path.name} cannot be opened ({err.strerror})") from None
    try:
        st = os.fstat(fd)
        uid = os.geteuid()
        if not stat.S_ISREG(st.st_mode):
            raise Untrusted(f"{path.name} is not a regular file")
        if st.st_uid != uid:
            raise Untrusted(f"{path.name} belongs to uid {st.st_uid}, not to you (uid {uid})")
        others = others_can_write(st, fd)
        if others:
            raise Untrusted(f"{path.name} is {others}")
        if st.st_size > limit:
            raise Untrusted(f"{path.name} is larger than {limit} bytes")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def digest_path(so: Path) -> Path:
    """Where the SHA-256 of ``so`` is recorded when it is built (``sha256sum`` format)."""
    return so.with_name(so.name + ".sha256")


def verify_recorded(path: Path, limit: int) -> None:
    """Raises :class:`Untrusted` unless ``path`` (at most ``limit`` bytes) and the SHA-256 recorded beside it
    (:func:`digest_path`) both pass :func:`read_owned` and agree."""
    data = read_owned(path, limit)
    record = digest_path(path)
    recorded = read_owned(record, 4096).decode(errors="replace").split()
    if not recorded or hashlib.sha256(data).hexdigest() != recorded[0]:
        raise Untrusted(f"its SHA-256 differs from the one recorded in {record.name}")
