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
directory chain that nobody else may change, matching the SHA-256 recorded beside it
when it was built (``.so.sha256``). A bad file in a safe cache is rebuilt in place; a cache others can write
to is left alone and the library is built in a private temporary directory (one warning naming the path
and the reason, either way). Those checks are in :mod:`crossmoco_ray.nn.trusted_files`.
Without a compiler, if the build fails or if the library lacks a kernel, the graph falls back to
``torch.topk`` and CSR products with one warning per process (same results, slower);
``CROSSMOCO_KNN=torch`` forces the fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
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
from crossmoco_ray.nn.trusted_files import Untrusted, digest_path, dir_problem, verify_recorded

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
                record = digest_path(out)
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


_MAX_LIBRARY_BYTES = 64 << 20


def open_library(so: Path) -> ctypes.CDLL:
    """Load ``so`` if it and the SHA-256 recorded beside it at build time pass
    :func:`~crossmoco_ray.nn.trusted_files.verify_recorded`; raises :class:`Untrusted` otherwise.

    ``so`` lies in a directory that passed :func:`~crossmoco_ray.nn.trusted_files.dir_problem`, so once
    checked only its owner can change it, and it is loaded by its path. (Not through the checked descriptor,
    ``/proc/self/fd/N``: the dynamic loader knows libraries by name and would hand back an earlier one opened
    under the same number.)
    """
    verify_recorded(so, _MAX_LIBRARY_BYTES)
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
