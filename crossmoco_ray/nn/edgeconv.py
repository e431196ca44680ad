"""EdgeConv: the k-nearest-neighbour graph and DGCNN's edge convolution, fast and reference.

DGCNN's edge convolution applies a 1×1 convolution ``W = [W_a | W_b]`` to every edge feature
``concat(x_j − x_i, x_i)`` of a point ``i`` and its ``k`` neighbours ``j``, then BatchNorm, LeakyReLU and
a max over the neighbours. Because the convolution is linear,

    W · concat(x_j − x_i, x_i) = W_a·x_j + (W_b − W_a)·x_i = a_j + b_i,

so ``a = W_a·x`` and ``b = (W_b − W_a)·x`` can be computed once **per point** (k times fewer
multiply-adds). The fast path never builds the ``[B, O, N, k]`` edge tensor either:

- BatchNorm's training statistics over all edges follow from per-point sums (``Σ_j a_j`` per point and
  each point's in-degree), in a centred form that stays accurate in fp32;
- LeakyReLU is increasing and BatchNorm is ``s·(e − μ) + β`` per channel, so the max over neighbours of
  the activated edges is the activation of ``|s|·max_j(sign(s)·a_j) + s·(b_i − μ) + β``.

Everything is ordinary autograd over per-point tensors (no hand-written backward), so memory and time
scale with ``B·N·O`` instead of ``B·N·k·2C``. The neighbour sum and max are sparse products on CPU and
gathers elsewhere (:class:`NeighbourGraph`).

``edge_conv_reference`` is the straightforward formulation (materialised ``[B, 2C, N, k]`` edge features,
as in CrossPoint), kept for tests and the benchmark.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# knn builds a [chunk, N, N] distance matrix; chunking the batch bounds that transient to this many floats.
KNN_MAX_ELEMENTS = 1 << 24


@torch.no_grad()
def knn(x: torch.Tensor, k: int, max_elements: int | None = KNN_MAX_ELEMENTS) -> torch.Tensor:
    """Indices of the ``k`` nearest neighbours of every point (itself included).

    Args:
        x: point features ``[B, N, C]``.
        k: neighbours per point, ``k <= N``.
        max_elements: bound on the ``[chunk, N, N]`` distance matrix built at once; ``None`` builds the
            whole batch at once (the reference behaviour).
    Returns:
        ``[B, N, k]`` int64 indices into ``N``, nearest first.
    """
    B, N, _ = x.shape
    if k > N:
        raise ValueError(f"knn: k={k} neighbours requested but the cloud has only N={N} points")
    # Distances in fp32 even under autocast: bf16 distances would pick different neighbours.
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        chunk = B if max_elements is None else max(1, min(B, max_elements // (N * N)))
        out = []
        # Unbounded: one block and no range() over B, so torch.export keeps the batch size symbolic.
        for start in [0] if max_elements is None else range(0, B, chunk):
            xc = x[start : start + chunk]
            # -||x_i - x_j||² = 2 x_i·x_j - |x_i|² - |x_j|²                        [c, N, N]
            neg_dist = torch.bmm(xc, xc.transpose(1, 2)).mul_(2)
            sq = xc.pow(2).sum(-1)  # [c, N]
            neg_dist.sub_(sq.unsqueeze(2)).sub_(sq.unsqueeze(1))
            out.append(neg_dist.topk(k, dim=-1).indices)
    return torch.cat(out) if len(out) > 1 else out[0]


def flat_neighbour_index(idx: torch.Tensor) -> torch.Tensor:
    """``[B, N, k]`` per-cloud indices → ``[B·N·k]`` row indices into a ``[B·N, C]`` view."""
    B, N, _ = idx.shape
    base = torch.arange(B, device=idx.device).view(B, 1, 1) * N
    return (idx + base).reshape(-1)


# --------------------------------------------------------------------------------------------------
# Reference: CrossPoint's formulation, every edge materialised.
# --------------------------------------------------------------------------------------------------


def graph_feature_reference(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Edge features ``concat(x_j − x_i, x_i)``: ``x`` [B, C, N], ``idx`` [B, N, k] → [B, 2C, N, k]."""
    B, C, N = x.shape
    k = idx.shape[-1]
    x_t = x.transpose(2, 1).contiguous()  # [B, N, C]
    x_j = x_t.reshape(B * N, C)[flat_neighbour_index(idx)].view(B, N, k, C)
    x_i = x_t.view(B, N, 1, C).expand(B, N, k, C)
    return torch.cat((x_j - x_i, x_i), dim=3).permute(0, 3, 1, 2).contiguous()


def edge_conv_reference(x: torch.Tensor, idx: torch.Tensor, block: nn.Module) -> torch.Tensor:
    """Reference EdgeConv: ``x`` [B, C, N] → ``block`` (conv, BN, act) per edge → max over k → [B, O, N]."""
    out: torch.Tensor = block(graph_feature_reference(x, idx)).max(dim=-1).values
    return out


# --------------------------------------------------------------------------------------------------
# Fast: per-point convolution; BatchNorm statistics and the max over neighbours from per-point tensors.
# --------------------------------------------------------------------------------------------------


class _GatherMax(torch.autograd.Function):
    """``max_j a[j]`` over each row's neighbours, saving only the arg-max (as uint8) for backward.

    The ``[rows, k, O]`` gathered tensor exists only inside forward. Used where the sparse ``amax``
    product is unavailable (CUDA).
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, cols: torch.Tensor, k: int) -> torch.Tensor:
        rows, O = a.shape[0], a.shape[1]
        values, arg = a.index_select(0, cols).view(rows, k, O).max(dim=1)
        ctx.save_for_backward(cols, arg.to(torch.uint8 if k <= 256 else torch.int32))
        ctx.k = k
        return values

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cols, arg = ctx.saved_tensors
        node = cols.view(-1, ctx.k).gather(1, arg.long())  # row of the chosen neighbour   [rows, O]
        return torch.zeros_like(grad).scatter_add_(0, node, grad), None, None


class NeighbourGraph:
    """A batch's kNN graph as flat rows: neighbour sums and maxima of per-point features ``[B·N, O]``.

    On CPU both are products with a CSR adjacency (``reduce="amax"`` for the max), which never build
    the ``[B·N·k, O]`` edge tensor; elsewhere they gather (the max through :class:`_GatherMax`).
    """

    def __init__(self, idx: torch.Tensor) -> None:
        B, N, k = idx.shape
        self.k, self.rows = k, B * N
        self.cols = flat_neighbour_index(idx)
        self.in_degree = torch.bincount(self.cols, minlength=self.rows).unsqueeze(1)  # [B·N, 1]
        self._csr: dict[torch.dtype, torch.Tensor] = {}

    def _adjacency(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.cols.device.type != "cpu":
            return None
        if dtype not in self._csr:
            crow = torch.arange(0, self.cols.numel() + 1, self.k, device=self.cols.device)
            values = torch.ones(self.cols.numel(), dtype=dtype, device=self.cols.device)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are stable
                warnings.simplefilter("ignore", UserWarning)
                self._csr[dtype] = torch.sparse_csr_tensor(
                    crow, self.cols, values, (self.rows, self.rows), check_invariants=False
                )
        return self._csr[dtype]

    def sum(self, a: torch.Tensor) -> torch.Tensor:
        """``Σ_j a[j]`` over each row's k neighbours."""
        adj = self._adjacency(a.dtype)
        if adj is not None:
            return torch.sparse.mm(adj, a)
        return a.index_select(0, self.cols).view(self.rows, self.k, -1).sum(dim=1)

    def max(self, a: torch.Tensor) -> torch.Tensor:
        """``max_j a[j]`` over each row's k neighbours."""
        adj = self._adjacency(a.dtype)
        if adj is not None:
            return torch.sparse.mm(adj, a, reduce="amax")
        out: torch.Tensor = _GatherMax.apply(a, self.cols, self.k)
        return out


def edge_conv_fast(
    x: torch.Tensor, idx: torch.Tensor, conv: nn.Conv2d, bn: nn.Module, slope: float = 0.2
) -> torch.Tensor:
    """Fast EdgeConv on point-major features: ``x`` [B, N, C], ``idx`` [B, N, k] → [B, N, O].

    Uses the parameters of ``conv`` (a bias-free 1×1 ``Conv2d(2C → O)``) and ``bn``, and computes the
    same function as ``edge_conv_reference`` with ``Sequential(conv, bn, LeakyReLU(slope))``, running
    statistics included. Gradients come from autograd through per-point tensors only.
    """
    B, N, C = x.shape
    k, O = idx.shape[-1], conv.out_channels
    dtype = torch.promote_types(x.dtype, torch.float32)  # statistics in fp32 even under bf16 autocast
    w = conv.weight.reshape(O, 2 * C)
    w_a, w_b = w[:, :C], w[:, C:]
    a = (x @ w_a.t()).reshape(B * N, O).to(dtype)  # acts on x_j   [B·N, O]
    b = (x @ (w_b - w_a).t()).reshape(B * N, O).to(dtype)  # acts on x_i
    graph = NeighbourGraph(idx)
    if type(bn) is not nn.BatchNorm2d or not bn.affine:
        # Other normalisations (SyncBatchNorm on GPU): build the edge tensor, autograd over the edges.
        e = a.index_select(0, graph.cols).view(B, N, k, O) + b.view(B, N, 1, O)
        e = F.leaky_relu(bn(e.permute(0, 3, 1, 2)), slope)  # [B, O, N, k]
        return e.max(dim=-1).values.transpose(1, 2)

    if bn.training or bn.running_mean is None:
        # Statistics over the B·N·k edges e_ij = a_j + b_i without building them: with ā, b̄ the edge
        # means of a_j and b_i, e_ij − μ = (a_j − ā) + (b_i − b̄), and its square sums per point.
        n_edges = B * N * k
        deg = graph.in_degree.to(dtype)
        a_bar, b_bar = (deg * a).sum(0) / n_edges, b.mean(0)
        a_c, b_c = a - a_bar, b - b_bar
        cross = (b_c * (graph.sum(a) - k * a_bar)).sum(0)  # Σ_i (b_i − b̄)·Σ_j (a_j − ā)
        var = ((deg * a_c * a_c).sum(0) + k * (b_c * b_c).sum(0) + 2 * cross) / n_edges
        mean = a_bar + b_bar
        if bn.training and bn.track_running_stats:
            _update_running_stats(bn, mean.detach(), var.detach(), n_edges)
    else:
        assert bn.running_var is not None
        mean, var = bn.running_mean, bn.running_var
    s = bn.weight * torch.rsqrt(var + bn.eps)  # BN(e) = s·(e − μ) + β, per channel
    sign = torch.where(s.detach() >= 0, 1.0, -1.0).to(dtype)
    # LeakyReLU is increasing, so
    #   max_j act(s·(a_j + b_i − μ) + β) = act(|s|·max_j(sign·a_j) + s·(b_i − μ) + β)
    z = s.abs() * graph.max(a * sign) + s * (b - mean) + bn.bias
    return F.leaky_relu(z, slope).view(B, N, O)


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """BatchNorm's running-statistics update (unbiased variance), as ``F.batch_norm`` would do it."""
    assert bn.running_mean is not None
    assert bn.running_var is not None
    assert bn.num_batches_tracked is not None
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
    bn.running_var.mul_(1 - momentum).add_(var * (n / max(n - 1, 1)), alpha=momentum)
