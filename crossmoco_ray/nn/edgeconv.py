"""DGCNN's edge convolution, fast and reference.

DGCNN's edge convolution applies a 1×1 convolution ``W = [W_a | W_b]`` to every edge feature
``concat(x_j − x_i, x_i)`` of a point ``i`` and its ``k`` neighbours ``j``, then BatchNorm, LeakyReLU and
a max over the neighbours. Because the convolution is linear,

    W · concat(x_j − x_i, x_i) = W_a·x_j + (W_b − W_a)·x_i = a_j + b_i,

so ``a = W_a·x`` and ``b = (W_b − W_a)·x`` are computed once **per point** (k times fewer multiply-adds,
one matrix product for both). The fast path never builds the ``[B, O, N, k]`` edge tensor either:

- BatchNorm's training statistics over all edges follow from per-point sums (``Σ_j a_j`` per point and
  each point's in-degree), in a centred form that stays accurate in fp32;
- LeakyReLU is increasing and BatchNorm is ``s·(e − μ) + β`` per channel, so the max over neighbours of
  the activated edges is the activation of ``|s|·max_j(sign(s)·a_j) + s·(b_i − μ) + β``.

:class:`_FusedEdgeConv` is that layer as one autograd function with its own backward (checked against
autograd through the reference in fp64 by the tests). It keeps for backward only the product ``[a | b]``,
the arg-max of each neighbour max (one byte per output) and the layer's output, which the next layer
holds anyway: a fraction of what autograd through the per-point formula kept, and fewer passes over
memory. Under bf16 autocast the products and the neighbour max run in bf16; the statistics, the
normalisation and everything that feeds them stay fp32 (as do the kNN distances, :mod:`.graph`).

``edge_conv_reference`` is the straightforward formulation (materialised ``[B, 2C, N, k]`` edge features,
as in CrossPoint), kept for tests and the benchmark.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crossmoco_ray.nn.graph import NeighbourGraph, flat_neighbour_index, uses_cpu_paths
from crossmoco_ray.nn.precision import fp32_maths

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
# Fast: per-point products; BatchNorm statistics and the max over neighbours from per-point tensors.
# --------------------------------------------------------------------------------------------------


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the layer's products: autocast's (bf16) for fp32/bf16 inputs under autocast."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(x.dtype, weight.dtype)


def _split_weight(weight: torch.Tensor, c: int) -> torch.Tensor:
    """``[O, 2C(,1,1)]`` conv weight → ``[W_a; W_b − W_a]`` ``[2O, C]``: ``x @ it.T`` gives ``[a | b]``."""
    w = weight.reshape(weight.shape[0], 2 * c)
    return torch.cat((w[:, :c], w[:, c:] - w[:, :c]))


def _edge_statistics(
    a: torch.Tensor, b: torch.Tensor, graph: NeighbourGraph
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance over the edges ``e_ij = a_j + b_i``, and the edge means of a and b.

    With ``ā``, ``b̄`` the edge means of ``a_j`` and ``b_i``, ``e_ij − μ = (a_j − ā) + (b_i − b̄)``, whose
    square sums per point: ``Σ deg·a_c² + k·Σ b_c² + 2·Σ_i b_c,i·Σ_j a_c,j``.
    """
    n_edges = graph.rows * graph.k
    deg = graph.in_degree.to(a.dtype).squeeze(1)  # [R]
    a_bar, b_bar = (deg @ a) / n_edges, b.mean(0)  # deg-weighted sums as products: one pass each
    a_c, b_c = a - a_bar, b - b_bar
    cross = torch.linalg.vecdot(b_c, graph.sum(a_c), dim=0)  # Σ_i b_c,i·Σ_j a_c,j
    var = (deg @ a_c.square() + graph.k * torch.linalg.vector_norm(b_c, dim=0).square() + 2 * cross) / n_edges
    return a_bar + b_bar, var, a_bar, b_bar


class _FusedEdgeConv(torch.autograd.Function):
    """EdgeConv + BatchNorm + LeakyReLU + max over neighbours on flat rows, with a hand-written backward.

    Inputs: ``x`` [R, C], the conv weight, BN's γ and β, the graph, running statistics (``None``: use the
    batch's), eps, the slope, the compute dtype, whether a backward will follow (else no arg-max) and
    whether backward recomputes the per-point products ``[a | b] = x·W_abᵀ`` from ``x`` (which the
    previous layer keeps anyway) instead of keeping them: ``2·O`` values per point less, for one small
    product per layer (the same kernel on the same operands, so the same values).
    Outputs: ``y`` [R, O] (compute dtype) and the statistics used (fp32, no gradient).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        graph: NeighbourGraph,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        eps: float,
        slope: float,
        cdt: torch.dtype,
        need_grad: bool,
        recompute: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        C, O = x.shape[1], weight.shape[0]
        sdt = torch.promote_types(cdt, torch.float32)  # statistics and normalisation
        with torch.autocast(device_type=x.device.type, enabled=False):
            ab = x.to(cdt) @ _split_weight(weight, C).to(cdt).t()  # [R, 2O]
            a, b = ab[:, :O], ab[:, O:]
            b32 = b.to(sdt)
            if running_mean is None:
                with fp32_maths(x.device.type):  # IEEE sums even where TF32 is on
                    mean, var, a_bar, b_bar = _edge_statistics(a.to(sdt), b32, graph)
            else:
                assert running_var is not None
                mean, var = running_mean.to(sdt), running_var.to(sdt)
                a_bar = b_bar = mean.new_zeros(())
            rstd = torch.rsqrt(var + eps)
            s = gamma.to(sdt) * rstd  # BN(e) = s·(e − μ) + β
            # all-positive scales skip a pass over a; the check reads a value back, so only on CPU
            positive = uses_cpu_paths(a) and bool((s >= 0).all())
            sign = torch.where(s >= 0, 1.0, -1.0).to(sdt)
            signed = a if positive else a * sign.to(cdt)
            if need_grad:
                m, ctx.max_backward = graph.max_for_backward(signed)
            else:
                m = graph.max(signed)
            del signed
            # z = |s|·max_j(sign·a_j) + s·b_i + (β − s·μ), in fp32 (same-dtype kernels: mixed ones are slow)
            z = torch.addcmul(beta.to(sdt) - s * mean, m.to(sdt), s.abs())
            z.addcmul_(b32, s)
            del b32
            y = F.leaky_relu(z, slope).to(cdt)  # (the in-place kernel is several times slower on CPU)
        mean, var = mean.clone(), var.clone()  # never the running buffers themselves
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, weight, gamma, None if recompute else ab, y, mean, rstd, s, a_bar, b_bar)
        ctx.graph, ctx.slope, ctx.cdt = graph, slope, cdt
        ctx.batch_stats = running_mean is None
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        x, weight, gamma, ab, y, mean, rstd, s, a_bar, b_bar = ctx.saved_tensors
        graph: NeighbourGraph = ctx.graph
        cdt, sdt = ctx.cdt, s.dtype
        R, C, O, k = x.shape[0], x.shape[1], weight.shape[0], graph.k
        with torch.autocast(device_type=x.device.type, enabled=False):
            if ab is None:  # recomputed as in forward
                ab = x.to(cdt) @ _split_weight(weight, C).to(cdt).t()
            a, b = ab[:, :O].to(sdt, copy=True), ab[:, O:].to(sdt, copy=True)  # centred in place below
            del ab
            # LeakyReLU keeps the sign of z, so its backward can read the output
            dz = torch.ops.aten.leaky_relu_backward(dy, y, ctx.slope, True).to(sdt)
            # sign·max_j(sign·a_j) = a at the chosen neighbour; u is the chosen edge centred: z = s·u + β
            sign = torch.where(s >= 0, 1.0, -1.0).to(sdt)
            u = graph.max(a * sign).mul_(sign).add_(b).sub_(mean)
            ds, dbeta = (dz * u).sum(0), dz.sum(0)
            del u
            du = dz.mul_(s)
            da = ctx.max_backward(du).to(sdt)
            db = du
            if ctx.batch_stats:
                # through μ and σ²: ∂σ²/∂a_j = 2(deg_j·a_c,j + Σ_{i∋j} b_c,i)/n,
                #                   ∂σ²/∂b_i = 2(k·b_c,i + Σ_j a_c,j)/n
                n_edges = R * k
                dmean = -du.sum(0)
                dvar = ds * gamma.to(sdt) * (-0.5) * rstd**3
                deg = graph.in_degree.to(sdt)
                b_c = b.sub_(b_bar)
                a_c = a.sub_(a_bar)
                s_c = graph.sum(a_c)
                coef = 2 * dvar / n_edges
                da.addcmul_(torch.addcmul(dmean / n_edges, a_c, coef), deg).addcmul_(graph.sum_t(b_c), coef)
                db = du.add_(dmean / R).addcmul_(b_c, k * coef).addcmul_(s_c, coef)
            dab = torch.cat((da, db), dim=1).to(cdt)  # [R, 2O]
            w_ab = _split_weight(weight, C)
            dx = (dab @ w_ab.to(cdt)).to(x.dtype) if ctx.needs_input_grad[0] else None
            dweight = None
            if ctx.needs_input_grad[1]:
                dw_ab = (dab.t() @ x.to(cdt)).to(weight.dtype)  # [2O, C]: d[W_a; W_b − W_a]
                dw_a, dw_d = dw_ab[:O], dw_ab[O:]
                dweight = torch.cat((dw_a - dw_d, dw_d), dim=1).view_as(weight)
            dgamma = (ds * rstd).to(gamma.dtype)
        return dx, dweight, dgamma, dbeta.to(gamma.dtype), *([None] * 8)


def edge_conv_fast(
    x: torch.Tensor,
    idx: torch.Tensor,
    conv: nn.Conv2d,
    bn: nn.Module,
    slope: float = 0.2,
    recompute_products: bool = True,
) -> torch.Tensor:
    """Fast EdgeConv on point-major features: ``x`` [B, N, C], ``idx`` [B, N, k] → [B, N, O].

    Uses the parameters of ``conv`` (a bias-free 1×1 ``Conv2d(2C → O)``) and ``bn``, and computes the
    same function as ``edge_conv_reference`` with ``Sequential(conv, bn, LeakyReLU(slope))``, running
    statistics included. Under autocast the output is in the autocast dtype. ``recompute_products``:
    backward recomputes the per-point products from ``x`` rather than keeping them (see
    :class:`_FusedEdgeConv`).
    """
    B, N, C = x.shape
    k, O = idx.shape[-1], conv.out_channels
    graph = NeighbourGraph(idx)
    if type(bn) is not nn.BatchNorm2d or not bn.affine:
        # Other normalisations (SyncBatchNorm on GPU): build the edge tensor, autograd over the edges.
        w = _split_weight(conv.weight, C)
        ab = x.reshape(B * N, C) @ w.t().to(x.dtype)
        a, b = ab[:, :O], ab[:, O:]
        e = a.index_select(0, graph.cols).view(B, N, k, O) + b.reshape(B, N, 1, O)
        e = F.leaky_relu(bn(e.permute(0, 3, 1, 2)), slope)  # [B, O, N, k]
        return e.max(dim=-1).values.transpose(1, 2)
    batch_stats = bn.training or bn.running_mean is None
    y, mean, var = _FusedEdgeConv.apply(
        x.reshape(B * N, C), conv.weight, bn.weight, bn.bias, graph,
        None if batch_stats else bn.running_mean, None if batch_stats else bn.running_var,
        bn.eps, slope, compute_dtype(x, conv.weight),
        torch.is_grad_enabled() and any(t.requires_grad for t in (x, conv.weight, bn.weight, bn.bias)),
        recompute_products,
    )  # fmt: skip
    if bn.training and bn.track_running_stats:
        _update_running_stats(bn, mean.detach(), var.detach(), B * N * k)
    return y.view(B, N, O)


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
