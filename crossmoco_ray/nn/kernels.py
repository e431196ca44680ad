"""Compiled CPU kernels for DGCNN's kNN graph, built at first use from ``_knn.c`` by the system's compiler.

- **kNN** (:func:`knn_direct`): torch's CPU ``topk`` sorts each row's candidates with a scalar
  comparator, and the ``[B, N, N]`` score matrix it needs is written to memory and read back. Here the
  scores of four rows at a time are accumulated in registers and each row's ``k`` selected while it is
  in cache: the maxima of 64 interleaved groups bound the k-th best from below, and only the scores above
  that bound (typically a little over ``k``) enter a small heap.
- **Neighbour max** (:func:`neighbour_max`) with its arg-max as one byte per output, and its backward
  (:func:`neighbour_max_backward`), for the fused EdgeConv: torch's CSR max product records its arg-max
  as int64 and only through autograd.

The C file has no Python or torch headers, so it builds in well under a second with ``cc -O3
-march=native`` and is loaded with :mod:`ctypes`; work is split over ``torch.get_num_threads()`` threads
(ctypes releases the GIL during a call). The library is cached under ``$CROSSMOCO_CACHE`` (default
``~/.cache/crossmoco-ray``) in ``kernels/``, keyed by the source, the compiler and the CPU's model and
flags, so nodes of different CPU types that share a home directory each get their own build. That key can
be computed by anyone, so a cached library is loaded only if no other user could have written it: a regular
file (not a link) of the current user that nobody else may write (a user private group aside), in a
directory chain that nobody else may change (:func:`dir_problem`), matching the SHA-256 recorded beside it
when it was built (``.so.sha256``). A bad file in a safe cache is rebuilt in place; a cache others can write
to is left alone and the library is built in a private temporary directory (one warning naming the path
and the reason, either way).
Without a compiler, if the build fails or if the library lacks a kernel, the graph falls back to
``torch.topk`` and CSR products with one warning per process (same results, slower);
``CROSSMOCO_KNN=torch`` forces the fallback.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import stat
import struct
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch

from crossmoco_ray.nn.precision import cpu_flags, cpu_name

logger = logging.getLogger(__name__)

_SOURCE = "_knn.c"
_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the CDLL or None once tried; "pool": (threads, executor)


def _after_fork() -> None:  # a forked child has none of the parent's pool threads, and maybe a held lock
    global _lock
    _lock = threading.Lock()
    _state.pop("pool", None)


os.register_at_fork(after_in_child=_after_fork)


def _cache_dir() -> Path:
    root = os.environ.get("CROSSMOCO_CACHE")
    if root:
        return Path(root).expanduser() / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "crossmoco-ray" / "kernels"


def _compiler() -> list[str] | None:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if candidate:
            argv = shlex.split(str(candidate))
            if argv and shutil.which(argv[0]):
                return argv
    return None


def _library_name(cc: list[str], src: Path) -> str:
    """``knn-<key>.so``, keyed by the source, the compiler and the CPU's model and flags."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, check=False).stdout
    parts = [src.read_text(), shlex.join(cc), version, cpu_name(), *sorted(cpu_flags())]
    return f"knn-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}.so"


def _digest_path(so: Path) -> Path:
    """Where the SHA-256 of ``so`` is recorded when it is built (``sha256sum`` format)."""
    return so.with_name(so.name + ".sha256")


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _compile(
    cc: list[str], src: Path, out: Path, archs: tuple[list[str], ...] = (["-march=native"], [])
) -> str | None:
    """Build ``out`` with the first of ``archs`` that compiles, and record its SHA-256 beside it; ``None``
    on success, else the complaints.

    ``-march=native`` first (the vector kernels); a compiler that does not know it gets a portable build.
    Both files are written under temporary names, synced and renamed into place, so a reader never sees
    half a file.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    errors = []
    try:
        for arch in archs:
            cmd = [*cc, "-O3", *arch, "-std=c11", "-fPIC", "-shared", "-o", tmp, str(src)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode == 0:
                os.chmod(tmp, 0o755)  # the linker's mode follows the umask, which may let the group write
                with open(tmp, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                    os.fsync(f.fileno())
                os.replace(tmp, out)
                record = _digest_path(out)
                dfd, dtmp = tempfile.mkstemp(suffix=".sha256", dir=out.parent)
                try:
                    with os.fdopen(dfd, "wb") as f:
                        f.write(f"{digest}  {out.name}\n".encode())
                        f.flush()
                        os.fchmod(f.fileno(), 0o644)
                        os.fsync(f.fileno())
                    os.replace(dtmp, record)
                except BaseException:
                    Path(dtmp).unlink(missing_ok=True)
                    raise
                _sync_dir(out.parent)
                return None
            errors.append(f"{shlex.join(cmd)}: {done.stderr.strip()[-500:]}")
    finally:
        Path(tmp).unlink(missing_ok=True)
    return "; ".join(errors)


class Untrusted(Exception):
    """A cached library (or its directory) that another user could have written: never loaded."""


_MAX_LIBRARY_BYTES = 64 << 20


@functools.lru_cache(maxsize=64)
def _private_group(gid: int) -> bool:
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
    if mode & stat.S_IWGRP and not _private_group(st.st_gid):
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


def _read_owned(path: Path, limit: int) -> bytes:
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


def open_library(so: Path) -> ctypes.CDLL:
    """Load ``so`` if it and the SHA-256 recorded beside it at build time pass :func:`_read_owned` and
    agree; raises :class:`Untrusted` otherwise.

    ``so`` lies in a directory that passed :func:`dir_problem`, so once checked only its owner can change
    it, and it is loaded by its path. (Not through the checked descriptor, ``/proc/self/fd/N``: the dynamic
    loader knows libraries by name and would hand back an earlier one opened under the same number.)
    """
    data = _read_owned(so, _MAX_LIBRARY_BYTES)
    record = _digest_path(so)
    recorded = _read_owned(record, 4096).decode(errors="replace").split()
    if not recorded or hashlib.sha256(data).hexdigest() != recorded[0]:
        raise Untrusted(f"its SHA-256 differs from the one recorded in {record.name}")
    return ctypes.CDLL(str(so))


@contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory``: processes building the same library take turns."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock (a concurrent build still installs whole files)
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _untrusted_warning(path: Path, reason: str, action: str) -> None:
    warnings.warn(
        f"crossmoco: not loading the kNN kernels from {path}: {reason}; {action}", RuntimeWarning, 4
    )


def _build_and_load(cc: list[str], src: Path) -> tuple[ctypes.CDLL | None, str, str]:
    """``(library, where it came from, why not)``: the cached build if it can be trusted, else a fresh one.

    The cache is shared by processes (and maybe users), and the key of a library is computable from public
    inputs, so a file there is loaded only if its directory and itself are safe from other users and it
    matches the SHA-256 recorded when it was built. A bad file in a safe cache is rebuilt in place; a cache
    that another user could write to is not used: the library is built in a private temporary directory.
    """
    name = _library_name(cc, src)
    cache = _cache_dir()
    try:
        for missing in reversed([d for d in (cache, *cache.parents) if not d.exists()]):
            missing.mkdir(mode=0o700, exist_ok=True)  # each its user's alone, whatever the umask
        cache = Path(os.path.realpath(cache))  # from here on, no link on the way can be swapped
        problem = dir_problem(cache)
        if problem is None:
            with _dir_lock(cache):
                so = cache / name
                if os.path.lexists(so):
                    try:
                        return open_library(so), str(so), ""
                    except Untrusted as err:
                        _untrusted_warning(so, str(err), "rebuilding it")
                why = _compile(cc, src, so)
                return (open_library(so), str(so), "") if why is None else (None, "", why)
    except OSError as err:  # an unwritable or missing cache
        problem = f"it cannot be used ({err.strerror or err})"
    _untrusted_warning(cache, problem, "building a private copy")
    with tempfile.TemporaryDirectory(prefix="crossmoco-knn-") as private:  # mode 0700, this process's
        so = Path(private) / name
        why = _compile(cc, src, so)
        # loaded, then removed with its directory: the process keeps its mapping
        return (open_library(so), f"{so} (private, removed)", "") if why is None else (None, "", why)


def _load() -> ctypes.CDLL | None:
    if os.environ.get("CROSSMOCO_KNN", "").lower() == "torch":
        return None
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib, where, why = None, "", ""
        try:
            cc = _compiler()
            if cc is None:
                why = "no C compiler found (set CC, or install gcc or clang)"
            else:
                with resources.as_file(resources.files("crossmoco_ray.nn").joinpath(_SOURCE)) as src:
                    lib, where, why = _build_and_load(cc, src)
            if lib is not None:
                _bind(lib)
        except (OSError, Untrusted) as err:  # a library that does not load, or fails its checks
            lib, why = None, str(err)[-500:]
        except AttributeError as err:  # a library without one of the kernels
            lib, why = None, f"{where} lacks a kernel function ({str(err)[-300:]})"
        if lib is not None:
            logger.debug("compiled kNN kernel: %s", where)
        else:
            warnings.warn(
                f"crossmoco: the compiled kNN kernels are unavailable ({why}); the kNN graph uses torch.topk "
                "and CSR products, which are slower on CPU. Results are the same.",
                RuntimeWarning,
                stacklevel=3,
            )
        _state["lib"], _state["why"], _state["where"] = lib, why, where
        return lib


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C functions' signatures (ctypes would otherwise pass 64-bit values as C ints)."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.topk_rows.argtypes = [ptr, i64, i64, ctypes.c_int, i64, i64, ptr]
    lib.topk_rows.restype = ctypes.c_int
    lib.knn_direct.argtypes = [ptr, ptr, i64, i64, i64, ctypes.c_int, i64, i64, ptr]
    lib.knn_direct.restype = ctypes.c_int
    lib.knn_max_k.restype = i64
    for name in ("f32", "f64", "bf16"):
        getattr(lib, f"neighbour_max_{name}").argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, ptr]
        getattr(lib, f"neighbour_max_{name}").restype = None
    for name in ("f32", "f64"):
        fn = getattr(lib, f"neighbour_max_backward_{name}")
        fn.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr]
        fn.restype = None
    return lib


def available() -> bool:
    """Whether the compiled kernels are built and loaded (building them if need be)."""
    return _load() is not None


def status() -> dict[str, str | bool]:
    """What a bug report needs: the compiler, the cache, whether the kernels load (building them if need
    be) and, if not, why."""
    lib = _load()
    cc = _compiler()
    return {
        "compiler": shlex.join(cc) if cc else "none",
        "cache": str(_cache_dir()),
        "loaded": lib is not None,
        "library": str(_state.get("where") or "") if lib is not None else "",
        "why_not": "" if lib is not None else str(_state.get("why") or "CROSSMOCO_KNN=torch"),
    }


def max_k() -> int:
    lib = _load()
    return int(lib.knn_max_k()) if lib is not None else 0


def _run(fn: ctypes._CFuncPtr, total: int, before: tuple, after: tuple, grain: int = 64) -> None:  # type: ignore[name-defined]
    """Call ``fn(*before, begin, end, *after)`` over ranges of ``total`` on the torch thread count."""
    threads = max(1, min(torch.get_num_threads(), total // grain or 1))
    ranges = [(total * t // threads, total * (t + 1) // threads) for t in range(threads)]
    call = lambda r: fn(*before, r[0], r[1], *after)  # noqa: E731
    if threads == 1:
        results = [call(ranges[0])]
    else:
        with _lock:
            have = _state.get("pool")
            if not isinstance(have, tuple) or have[0] != threads:
                if isinstance(have, tuple):
                    have[1].shutdown(wait=False)  # the thread count changed (torch.set_num_threads)
                have = (threads, ThreadPoolExecutor(threads, thread_name_prefix="crossmoco-knn"))
                _state["pool"] = have
        results = list(have[1].map(call, ranges))
    if any(r is not None and r != 0 for r in results):
        raise MemoryError("knn: the compiled kernel could not allocate its row buffer")


def topk_rows(scores: torch.Tensor, k: int, ordered: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``k`` largest in each row of a contiguous fp32 ``[..., n]`` CPU tensor."""
    lib = _load()
    assert lib is not None
    assert scores.dtype == torch.float32
    assert scores.is_contiguous()
    n = scores.shape[-1]
    if out is None:
        out = torch.empty((*scores.shape[:-1], k), dtype=torch.int64)
    assert out.is_contiguous()
    assert out.numel() == scores.numel() // n * k
    _run(lib.topk_rows, scores.numel() // n, (scores.data_ptr(), n, k, int(ordered)), (out.data_ptr(),))
    return out


def knn_direct(lhs: torch.Tensor, rhs_t: torch.Tensor, k: int, ordered: bool) -> torch.Tensor:
    """Top-k of ``lhs[b] @ rhs_t[b]`` row by row without the score matrix: ``[B, N, D]``, ``[B, D, N]``."""
    lib = _load()
    assert lib is not None
    lhs, rhs_t = lhs.float().contiguous(), rhs_t.float().contiguous()
    B, N, D = lhs.shape
    out = torch.empty((B, N, k), dtype=torch.int64)
    _run(lib.knn_direct, B * N, (lhs.data_ptr(), rhs_t.data_ptr(), N, D, k, int(ordered)), (out.data_ptr(),))
    return out


_MAX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
_MAX_BACKWARD = {torch.float32: "f32", torch.float64: "f64"}


def neighbour_max_supported(a: torch.Tensor, k: int, backward: bool = False) -> bool:
    """Whether :func:`neighbour_max` (or its backward, for a gradient like ``a``) runs compiled for ``a``."""
    table = _MAX_BACKWARD if backward else _MAX
    return a.device.type == "cpu" and a.dtype in table and k <= 256 and _load() is not None


def neighbour_max(
    a: torch.Tensor, cols: torch.Tensor, k: int, with_arg: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``max_j a[cols[r·k + j]]`` per row ``r`` and channel, and (``with_arg``) that ``j`` as uint8.

    ``a`` ``[rows, O]`` fp32/fp64/bf16 on CPU (rows may be strided, e.g. a column slice: no copy), ``cols``
    the ``[rows·k]`` int64 neighbour rows.
    """
    lib = _load()
    assert lib is not None
    if a.stride(1) != 1:
        a = a.contiguous()
    cols = cols.contiguous()
    rows, o = a.shape
    out = torch.empty_like(a)
    arg = torch.empty((rows, o), dtype=torch.uint8) if with_arg else None
    fn = getattr(lib, f"neighbour_max_{_MAX[a.dtype]}")
    after = (out.data_ptr(), arg.data_ptr() if arg is not None else None)
    _run(fn, cols.numel() // k, (a.data_ptr(), a.stride(0), cols.data_ptr(), k, o), after)
    return out, arg


def neighbour_max_backward(grad: torch.Tensor, cols: torch.Tensor, arg: torch.Tensor, k: int) -> torch.Tensor:
    """The gradient of :func:`neighbour_max` for ``a``: each ``grad[r, t]`` to the row its max came from."""
    lib = _load()
    assert lib is not None
    grad = grad.contiguous()
    rows, o = grad.shape
    da = torch.zeros_like(grad)
    fn = getattr(lib, f"neighbour_max_backward_{_MAX_BACKWARD[grad.dtype]}")
    # threads split the channels: every row's scatter touches each channel once, so no two threads collide
    before = (grad.data_ptr(), cols.data_ptr(), arg.data_ptr(), k, o, rows)
    _run(fn, o, before, (da.data_ptr(),), grain=16)
    return da
