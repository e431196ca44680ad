"""Compiled CPU kernels for DGCNN's kNN graph, built at first use from ``_knn.c`` by the system's compiler.

- **kNN** (:func:`knn_direct`): torch's CPU ``topk`` sorts each row's candidates with a scalar
  comparator, and the ``[B, N, N]`` score matrix it needs is written to memory and read back. Here the
  scores of four rows at a time are accumulated in registers and each row's ``k`` selected while it is
  in cache: the maxima of 64 interleaved groups bound the k-th best from below, and only the scores above
  that bound (typically a little over ``k``) enter a small heap.
- **Neighbour max** (:func:`neighbour_max`) with its arg-max as one byte per output, and its backward
  (:func:`neighbour_max_backward`), for the fused EdgeConv: torch's CSR max product records its arg-max
  as int64 and only through autograd.

The C file has no Python or torch headers; it is built with ``cc -O3 -march=native`` at first use, checked,
cached and loaded by :mod:`crossmoco_ray.nn.native` (the cache under ``$CROSSMOCO_CACHE``, default
``~/.cache/crossmoco-ray``, in ``kernels/``, keyed by the source, the compiler and the CPU; a cached library
is loaded only if no other user could have written it). Work is split over ``torch.get_num_threads()``
threads (ctypes releases the GIL during a call).
Without a compiler, if the build fails or if the library lacks a kernel, the graph falls back to
``torch.topk`` and CSR products with one warning per process (same results, slower);
``CROSSMOCO_KNN=torch`` forces the fallback.
"""

from __future__ import annotations

import ctypes

import torch

from crossmoco_ray.nn.native import NativeLibrary, open_library

__all__ = [
    "available",
    "knn_direct",
    "max_k",
    "neighbour_max",
    "neighbour_max_backward",
    "neighbour_max_supported",
    "open_library",  # checked loading of a cached build, here since before the builder was shared
    "status",
    "topk_rows",
]


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


_LIBRARY = NativeLibrary(
    package="crossmoco_ray.nn",
    source="_knn.c",
    name="knn",
    what="kNN kernels",
    fallback="the kNN graph uses torch.topk and CSR products, which are slower on CPU. Results are the same.",
    bind=_bind,
    force_env="CROSSMOCO_KNN",
    force_value="torch",
)
_state = _LIBRARY.state  # "lib": the CDLL or None once tried, "why", "where"; "pool": (threads, executor)


def _load() -> ctypes.CDLL | None:
    return _LIBRARY.load()


def available() -> bool:
    """Whether the compiled kernels are built and loaded (building them if need be)."""
    return _load() is not None


def status() -> dict[str, str | bool]:
    """What a bug report needs: the compiler, the cache, whether the kernels load (building them if need
    be) and, if not, why."""
    return _LIBRARY.status()


def max_k() -> int:
    lib = _load()
    return int(lib.knn_max_k()) if lib is not None else 0


def _run(fn: ctypes._CFuncPtr, total: int, before: tuple, after: tuple, grain: int = 64) -> None:  # type: ignore[name-defined]
    """Call ``fn(*before, begin, end, *after)`` over ranges of ``total`` on the torch thread count."""
    threads = max(1, min(torch.get_num_threads(), total // grain or 1))
    ranges = [(total * t // threads, total * (t + 1) // threads) for t in range(threads)]
    call = lambda r: fn(*before, r[0], r[1], *after)  # noqa: E731
    pool = _LIBRARY.executor(threads) if threads > 1 else None
    results = list(pool.map(call, ranges)) if pool is not None else [call(ranges[0])]
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
