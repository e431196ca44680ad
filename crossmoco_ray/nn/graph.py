"""The dynamic k-nearest-neighbour graph of DGCNN: neighbour indices and products over the neighbours.

:func:`knn` finds each point's ``k`` nearest neighbours (itself included) from fp32 distances: on CPU with
the compiled kernel of :mod:`crossmoco_ray.nn.kernels` (scores and selection fused, a few rows at a
time), elsewhere in batch chunks that bound the ``[chunk, N, N]`` score matrix, with ``torch.topk``.
:class:`NeighbourGraph` holds a batch's graph as flat rows and reduces per-point features ``[B·N, O]``
over each row's neighbours (sum, max with its arg-max) or over the rows each point is a neighbour of
(the transposed sum), without ever building the ``[B·N·k, O]`` edge tensor at once: CSR products on
CPU, chunked gathers elsewhere.

Which path runs is decided in one place, :func:`uses_cpu_paths`. The GPU's paths never read a value back
to the host (no ``bincount``, no data-dependent shapes), and their chunk bounds are larger than the CPU
fallback's (a GPU has the memory, and every chunk is a launch): the paper's step (20 clouds of 2,048
points, k = 15) runs each kNN and each gather in one.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from crossmoco_ray.nn import kernels
from crossmoco_ray.nn.precision import fp32_maths

# knn builds a [chunk, N, N] score matrix; chunking the batch bounds that transient to this many floats
# (per device type; "cpu" is the fallback without the compiled kernel).
KNN_MAX_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}
# A chunked neighbour gather builds [rows, k, O]; bound it to this many elements.
GATHER_MAX_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 28}


def max_elements_for(bounds: dict[str, int], device: torch.device) -> int:
    """The bound of ``bounds`` for ``device`` (a device type not listed gets the CPU's)."""
    return bounds.get(device.type, bounds["cpu"])


def uses_cpu_paths(t: torch.Tensor) -> bool:
    """Whether ``t``'s graph work takes the CPU paths (compiled kernels, CSR products, host-side checks);
    elsewhere (CUDA) the gather paths, which never synchronise with the host."""
    return t.device.type == "cpu"


@torch.no_grad()
def knn(
    x: torch.Tensor, k: int, max_elements: int | Literal["auto"] | None = "auto", ordered: bool = True
) -> torch.Tensor:
    """Indices of the ``k`` nearest neighbours of every point (itself included).

    Args:
        x: point features ``[B, N, C]``.
        k: neighbours per point, ``k <= N``.
        max_elements: bound on the ``[chunk, N, N]`` score matrix built at once; ``"auto"``: the device's
            :data:`KNN_MAX_ELEMENTS`; ``None`` builds the whole batch at once (the reference behaviour).
        ordered: nearest first; ``False`` leaves each row's ``k`` in any order (faster; EdgeConv reduces
            over them with order-free sums and maxima).
    Returns:
        ``[B, N, k]`` int64 indices into ``N``.
    """
    B, N, _ = x.shape
    if k > N:
        raise ValueError(f"knn: k={k} neighbours requested but the cloud has only N={N} points")
    if max_elements == "auto":
        max_elements = max_elements_for(KNN_MAX_ELEMENTS, x.device)
    # Distances in IEEE fp32 even under autocast or TF32: bf16 or TF32 distances pick other neighbours.
    with fp32_maths(x.device.type):
        x = x.float()
        if uses_cpu_paths(x) and not torch.compiler.is_compiling() and k <= kernels.max_k():
            # The compiled kernel scores a few rows at a time in cache and selects as it goes: no
            # [chunk, N, N] matrix, whose writing and re-reading costs more than the selection on CPU.
            sq = x.pow(2).sum(-1, keepdim=True)
            lhs = torch.cat((2 * x, torch.ones_like(sq)), dim=-1)
            rhs_t = torch.cat((x, -sq), dim=-1).transpose(1, 2)
            return kernels.knn_direct(lhs, rhs_t, k, ordered)
        chunk = B if max_elements is None else max(1, min(B, max_elements // (N * N)))
        out = []
        # Unbounded: one block and no range() over B, so torch.export keeps the batch size symbolic.
        for start in [0] if max_elements is None else range(0, B, chunk):
            xc = x[start : start + chunk]
            # -||x_i - x_j||² = 2 x_i·x_j - |x_j|² - |x_i|²; the last term is the same along a row, so
            # the row's order is that of [2 x_i, 1]·[x_j, -|x_j|²]: one product, no pass over the scores.
            sq = xc.pow(2).sum(-1, keepdim=True)  # [c, N, 1]
            lhs = torch.cat((2 * xc, torch.ones_like(sq)), dim=-1)
            rhs = torch.cat((xc, -sq), dim=-1)
            score = torch.bmm(lhs, rhs.transpose(1, 2))
            out.append(score.topk(k, dim=-1, sorted=ordered).indices)
    return torch.cat(out) if len(out) > 1 else out[0]


@torch.no_grad()
def knn_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """The straightforward kNN of the original code, for the reference EdgeConv: ``x`` [B, C, N] → [B, N, k].

    The whole ``[B, N, N]`` matrix of negative squared distances at once, then a sorted top-k.
    """
    with fp32_maths(x.device.type):
        x = x.float()
        inner = torch.matmul(x.transpose(2, 1), x)  # [B, N, N]
        sq = x.pow(2).sum(dim=1, keepdim=True)  # [B, 1, N]
        neg_dist = 2 * inner - sq - sq.transpose(2, 1)
        return neg_dist.topk(k, dim=-1).indices


def flat_neighbour_index(idx: torch.Tensor) -> torch.Tensor:
    """``[B, N, k]`` per-cloud indices → ``[B·N·k]`` row indices into a ``[B·N, C]`` view."""
    B, N, _ = idx.shape
    base = torch.arange(B, device=idx.device).view(B, 1, 1) * N
    return (idx + base).reshape(-1)


def _csr(crow: torch.Tensor, cols: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    values = torch.ones(cols.numel(), dtype=dtype, device=cols.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, (rows, rows), check_invariants=False)


class NeighbourGraph:
    """A batch's kNN graph as flat rows ``[B·N]``, each with its ``k`` neighbours ``cols``.

    On CPU, sums (fp32/fp64) are CSR products and maxima (bf16 too) the compiled kernel's, which gives the
    arg-max as one byte per output when a backward follows (without the kernel: the CSR max product);
    elsewhere chunked gathers, whose max keeps its arg-max as one byte per output too.
    """

    def __init__(self, idx: torch.Tensor) -> None:
        B, N, k = idx.shape
        self.k, self.rows = k, B * N
        self.cols = flat_neighbour_index(idx)
        degree = torch.zeros(self.rows, dtype=torch.int64, device=idx.device)
        # index_add_, not bincount: on CUDA bincount reads the largest index back to the host
        self.in_degree = degree.index_add_(0, self.cols, torch.ones_like(self.cols)).unsqueeze(1)  # [B·N, 1]
        self._adj: dict[torch.dtype, torch.Tensor] = {}  # per dtype: the forward runs bf16, sums fp32
        self._adj_t: torch.Tensor | None = None

    def _sparse(self, a: torch.Tensor) -> bool:
        return uses_cpu_paths(a) and a.dtype in (torch.float32, torch.float64)

    def _adjacency(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._adj:
            crow = torch.arange(0, self.cols.numel() + 1, self.k, device=self.cols.device)
            self._adj[dtype] = _csr(crow, self.cols, self.rows, dtype)
        return self._adj[dtype]

    def sum(self, a: torch.Tensor) -> torch.Tensor:
        """``Σ_j a[j]`` over each row's k neighbours ``[B·N, O]``."""
        if self._sparse(a):
            return torch.sparse.mm(self._adjacency(a.dtype), a)
        return self._reduce(a, "sum")[0]

    def sum_t(self, v: torch.Tensor) -> torch.Tensor:
        """``Σ_i v[i]`` over the rows ``i`` that have ``j`` among their neighbours (with multiplicity)."""
        if self._sparse(v):
            if self._adj_t is None or self._adj_t.dtype != v.dtype:
                order = torch.argsort(self.cols, stable=True)
                src = order // self.k  # the row each (sorted) edge comes from
                crow = torch.zeros(self.rows + 1, dtype=torch.int64, device=v.device)
                crow[1:] = torch.cumsum(self.in_degree.squeeze(1), 0)
                self._adj_t = _csr(crow, src, self.rows, v.dtype)
            return torch.sparse.mm(self._adj_t, v)
        rows = torch.arange(self.rows, device=v.device).repeat_interleave(self.k)
        out = torch.zeros_like(v)
        step = max(1, max_elements_for(GATHER_MAX_ELEMENTS, v.device) // max(1, v.shape[1]))
        for start in range(0, rows.numel(), step):
            sl = slice(start, start + step)
            out.index_add_(0, self.cols[sl], v.index_select(0, rows[sl]))
        return out

    def _csr_max(self, a: torch.Tensor) -> bool:
        return uses_cpu_paths(a) and _CSR_MAX_WITH_ARG is not None and _CSR_MAX_BACKWARD is not None

    def _compiled_max(self, a: torch.Tensor) -> bool:
        return uses_cpu_paths(a) and kernels.neighbour_max_supported(a, self.k)

    def max(self, a: torch.Tensor) -> torch.Tensor:
        """``max_j a[j]`` over each row's k neighbours."""
        if self._compiled_max(a):
            return kernels.neighbour_max(a, self.cols, self.k, with_arg=False)[0]
        if self._csr_max(a):
            return torch.sparse.mm(self._adjacency(a.dtype), a, reduce="amax")
        return self._reduce(a, "amax")[0]

    def max_for_backward(self, a: torch.Tensor) -> tuple[torch.Tensor, MaxBackward]:
        """:meth:`max`, and what sends a gradient of the maxima back to the neighbours they came from."""
        if self._compiled_max(a):  # the arg-max comes out as one byte per output, nothing wider on the way
            values, pos = kernels.neighbour_max(a.detach(), self.cols, self.k, with_arg=True)
            assert pos is not None
            return values, MaxBackward(self, pos, compiled=True)
        if self._csr_max(a):
            assert _CSR_MAX_WITH_ARG is not None
            adj = self._adjacency(a.dtype)
            with torch.enable_grad():  # the kernel only records its arg-max for an input that needs grad
                out, arg = _CSR_MAX_WITH_ARG(adj, a.detach().requires_grad_(), "amax")
            if arg.numel() == out.numel():
                # kept as the position among the row's k neighbours: 1 byte instead of an int64 edge index
                first = torch.arange(0, arg.shape[0] * self.k, self.k, device=arg.device).unsqueeze(1)
                return out.detach(), MaxBackward(self, arg.sub_(first).to(self._pos_dtype()), adj=adj)
        values, pos = self._reduce(a, "amax_arg")
        assert pos is not None
        return values, MaxBackward(self, pos)

    def _pos_dtype(self) -> torch.dtype:
        return torch.uint8 if self.k <= 256 else torch.int32

    def _reduce(self, a: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows, k, O = self.rows, self.k, a.shape[1]
        out = torch.empty((rows, O), dtype=a.dtype, device=a.device)
        arg = torch.empty((rows, O), dtype=self._pos_dtype(), device=a.device) if how == "amax_arg" else None
        step = max(1, max_elements_for(GATHER_MAX_ELEMENTS, a.device) // max(1, k * O))  # rows per chunk
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            g = a.index_select(0, self.cols[start * k : stop * k]).view(stop - start, k, O)
            if how == "sum":
                torch.sum(g, dim=1, out=out[start:stop])
            elif arg is None:
                torch.amax(g, dim=1, out=out[start:stop])
            else:
                values, pos = g.max(dim=1)
                out[start:stop] = values
                arg[start:stop] = pos
        return out, arg


class MaxBackward:
    """Sends a gradient of a neighbour max back to the neighbour each max chose (one per row and channel).

    Holds the arg-max only, as the position among the row's ``k`` neighbours (uint8 up to k = 256).
    """

    def __init__(
        self,
        graph: NeighbourGraph,
        arg: torch.Tensor,
        adj: torch.Tensor | None = None,
        compiled: bool = False,
    ) -> None:
        self.graph, self.arg, self.adj, self.compiled = graph, arg, adj, compiled

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        """``d a`` ``[B·N, O]`` from ``d max`` ``[B·N, O]``."""
        g = self.graph
        if (
            self.compiled
            and uses_cpu_paths(grad)
            and kernels.neighbour_max_supported(grad, g.k, backward=True)
        ):
            return kernels.neighbour_max_backward(grad, g.cols, self.arg, g.k)
        if self.adj is not None:
            assert _CSR_MAX_BACKWARD is not None
            first = torch.arange(0, g.rows * g.k, g.k, device=grad.device).unsqueeze(1)
            edge = self.arg.long().add_(first)  # the CSR edge index the kernel's backward reads
            # the gradient keeps its own dtype (fp32 under autocast): the arg-max does not depend on it
            adj = g._adjacency(grad.dtype) if grad.dtype in (torch.float32, torch.float64) else self.adj
            return _CSR_MAX_BACKWARD(adj, grad.to(adj.dtype), grad, "amax", edge, [False, True])[1]
        chosen = g.cols.view(g.rows, g.k).gather(1, self.arg.long())
        return torch.zeros_like(grad).scatter_add_(0, chosen, grad)


# The CSR max-product kernel with its arg-max, and its backward (a scatter), where torch has them.
_CSR_MAX_WITH_ARG = getattr(torch.ops.aten, "_sparse_mm_reduce_impl", None)
_CSR_MAX_BACKWARD = getattr(torch.ops.aten, "_sparse_mm_reduce_impl_backward", None)
