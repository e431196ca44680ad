"""DGCNN's last block in training: per-point 1×1 conv, BatchNorm, LeakyReLU, global max ‖ mean pool.

One autograd function (:class:`_ConvBNPool`) with its own backward, so that what is kept for backward
is the block's input and the conv output ``h`` ``[B·N, E]`` only (E = 1024 in the paper: the widest
per-point tensor of the network). The input may come in parts (DGCNN's four EdgeConv outputs): the
product is then a sum of products with the weight's column blocks, and the parts, which the EdgeConvs
keep anyway, are kept instead of a concatenated copy. The normalised and activated tensors are
recomputed element-wise in backward from ``h`` and the batch statistics; autograd through the modules
would keep two more ``[B·N, E]`` tensors. BatchNorm runs through ATen's own kernels (statistics and
running-statistics update in fp32, also under bf16 autocast). Tests compare it with the modules it
replaces.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _ConvBNPool(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        weight: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        factor: float,
        eps: float,
        slope: float,
        cdt: torch.dtype,
        batch: int,
        need_grad: bool,
        *xs: torch.Tensor,
    ) -> torch.Tensor:
        R = xs[0].shape[0]
        E = weight.shape[0]
        with torch.autocast(device_type=xs[0].device.type, enabled=False):
            w = weight.reshape(E, -1).to(cdt)
            h = torch.empty(0)
            for i, (x, wi) in enumerate(zip(xs, _column_blocks(w, xs), strict=True)):  # [R, E]
                h = x.to(cdt) @ wi.t() if i == 0 else h.addmm_(x.to(cdt), wi.t())
            # ATen's BatchNorm takes bf16 input with fp32 parameters: fp32 statistics, output in h's dtype
            z, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
                h, gamma, beta, running_mean, running_var, True, factor, eps
            )
            y = F.leaky_relu(z, slope).view(batch, R // batch, E)
            del z
            # the arg-max over N only when a backward follows (max with indices is the slower reduction)
            top, arg = y.max(dim=1) if need_grad else (y.amax(dim=1), None)
            out = torch.cat((top, y.mean(dim=1, dtype=save_mean.dtype).to(y.dtype)), dim=1)  # [B, 2E]
        ctx.save_for_backward(weight, gamma, beta, h, save_mean, save_invstd, arg, *xs)
        ctx.eps, ctx.slope, ctx.cdt, ctx.batch = eps, slope, cdt, batch
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, gamma, beta, h, save_mean, save_invstd, arg, *xs = ctx.saved_tensors
        R, E, B, cdt = h.shape[0], weight.shape[0], ctx.batch, ctx.cdt
        with torch.autocast(device_type=h.device.type, enabled=False):
            # BN output, recomputed with the batch statistics (the same kernel, as an affine map)
            var = save_invstd.pow(-2).sub_(ctx.eps)
            z = torch.ops.aten.native_batch_norm(h, gamma, beta, save_mean, var, False, 0.0, ctx.eps)[0]
            dout = dout.to(h.dtype)
            dy = (dout[:, E:] / (R // B)).unsqueeze(1).repeat(1, R // B, 1)  # mean pool   [B, N, E]
            dy.scatter_add_(1, arg.unsqueeze(1), dout[:, :E].unsqueeze(1))  # max pool
            dz = torch.ops.aten.leaky_relu_backward(dy.view(R, E), z, ctx.slope, False)
            del dy, z
            dh, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
                dz, h, gamma, None, None, save_mean, save_invstd, True, ctx.eps, [True, True, True]
            )
            del dz
            dh = dh.to(cdt)
            blocks = _column_blocks(weight.reshape(E, -1), xs)
            needs_x = ctx.needs_input_grad[11:]
            dxs = [
                (dh @ wi.to(cdt)).to(x.dtype) if need else None
                for x, wi, need in zip(xs, blocks, needs_x, strict=True)
            ]
            dweight = None
            if ctx.needs_input_grad[0]:
                dweight = torch.cat([dh.t() @ x.to(cdt) for x in xs], dim=1).to(weight.dtype).view_as(weight)
        return (dweight, dgamma, dbeta, *([None] * 8), *dxs)


def _column_blocks(w: torch.Tensor, xs: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> list[torch.Tensor]:
    """``w`` ``[E, ΣC_i]`` split into the column blocks that multiply each part ``[R, C_i]``."""
    return list(torch.split(w, [x.shape[1] for x in xs], dim=1))


def conv_bn_pool(
    x: torch.Tensor | list[torch.Tensor], conv: nn.Module, bn: nn.Module, slope: float, cdt: torch.dtype
) -> torch.Tensor | None:
    """``cat(max_N, mean_N)`` of ``LeakyReLU(bn(conv(x)))`` for ``x`` [B, N, C] → [B, 2E], or ``None``
    where the fused form does not apply (BatchNorm not in training mode, not a plain affine BatchNorm1d).

    ``x`` may be a list of parts ``[B, N, C_i]`` that concatenate to the conv's input along channels.
    """
    if type(bn) is not nn.BatchNorm1d or not bn.training or not bn.affine:
        return None
    factor = 0.0
    if bn.track_running_stats:
        assert bn.num_batches_tracked is not None
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    parts = x if isinstance(x, list) else [x]
    B, N, _ = parts[0].shape
    flat = [p.reshape(B * N, p.shape[2]) for p in parts]
    need_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (*flat, conv.weight, bn.weight, bn.bias)
    )
    out: torch.Tensor = _ConvBNPool.apply(
        conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
        factor, bn.eps, slope, cdt, B, need_grad, *flat,
    )  # fmt: skip
    return out
