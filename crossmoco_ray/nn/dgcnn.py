"""DGCNN point encoder with CrossPoint's architecture and parameter names (METHOD.md §1.1, §1.1a).

EdgeConv 64/64/128/256 on dynamic kNN graphs (recomputed on the current features at every layer,
the point itself among its neighbours), concat → 1×1 conv 512→``emb_dims``, global max ‖ avg pool →
``2·emb_dims`` feature (2048 at the paper's 1024), projection head → 256.

Each BatchNorm is registered twice, as ``bnN`` and inside ``convN`` (``convN.1``), exactly as in
CrossPoint, so a released state dict (after prefix stripping) loads with ``strict=True``.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from crossmoco_ray.nn.edgeconv import compute_dtype, edge_conv_fast, edge_conv_reference
from crossmoco_ray.nn.graph import knn, knn_reference
from crossmoco_ray.nn.heads import point_head
from crossmoco_ray.nn.pointwise import conv_bn_pool

EDGE_CHANNELS = (64, 64, 128, 256)
SLOPE = 0.2
# Inference pools the last block a few clouds at a time in one reused buffer of at most this many floats.
POOL_CHUNK_ELEMENTS = 1 << 21


class DGCNN(nn.Module):
    """DGCNN encoder: points ``[B, N, 3]`` → (projection ``[B, proj_dim]``, feature ``[B, 2·emb_dims]``).

    Args:
        k: neighbours per point (paper: 15).
        emb_dims: width of the last 1×1 conv (paper: 1024 → 2048-d feature).
        proj_dim: projection output (paper: 256).
        head_hidden: projection head hidden width (paper: 1024).
        edgeconv: ``"fast"`` (per-point convolution, fused BN/act/max) or ``"reference"`` (every edge
            materialised, as CrossPoint). Same parameters, same function.
        recompute_products: the fast EdgeConvs recompute their per-point products in backward instead
            of keeping them (one small product per layer; about 160 MiB less at the paper's step).
    """

    def __init__(
        self,
        k: int = 15,
        emb_dims: int = 1024,
        proj_dim: int = 256,
        head_hidden: int = 1024,
        edgeconv: Literal["fast", "reference"] = "fast",
        recompute_products: bool = True,
    ) -> None:
        super().__init__()
        if edgeconv not in ("fast", "reference"):
            raise ValueError(f"edgeconv must be 'fast' or 'reference', got {edgeconv!r}")
        self.k, self.emb_dims, self.edgeconv = k, emb_dims, edgeconv
        self.recompute_products = recompute_products
        self.feature_dim = 2 * emb_dims
        self.bn1 = nn.BatchNorm2d(64)
        self.bn2 = nn.BatchNorm2d(64)
        self.bn3 = nn.BatchNorm2d(128)
        self.bn4 = nn.BatchNorm2d(256)
        self.bn5 = nn.BatchNorm1d(emb_dims)
        self.conv1 = self._block(nn.Conv2d(6, 64, 1, bias=False), self.bn1)
        self.conv2 = self._block(nn.Conv2d(128, 64, 1, bias=False), self.bn2)
        self.conv3 = self._block(nn.Conv2d(128, 128, 1, bias=False), self.bn3)
        self.conv4 = self._block(nn.Conv2d(256, 256, 1, bias=False), self.bn4)
        self.conv5 = self._block(nn.Conv1d(512, emb_dims, 1, bias=False), self.bn5)
        self.inv_head = point_head(self.feature_dim, head_hidden, proj_dim)

    @staticmethod
    def _block(conv: nn.Module, bn: nn.Module) -> nn.Sequential:
        return nn.Sequential(conv, bn, nn.LeakyReLU(negative_slope=SLOPE))

    @property
    def edge_blocks(self) -> tuple[nn.Sequential, ...]:
        return (self.conv1, self.conv2, self.conv3, self.conv4)

    def forward_features(self, points: torch.Tensor) -> torch.Tensor:
        """Pooled backbone feature ``[B, 2·emb_dims]`` (the SVM / few-shot feature) of ``[B, N, 3]``."""
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"DGCNN expects points [B, N, 3], got {tuple(points.shape)}")
        if self.edgeconv == "reference":
            return self._features_reference(points)
        x = points
        outs = []
        for block in self.edge_blocks:
            idx = knn(x, self.k, ordered=False)
            x = edge_conv_fast(x, idx, cast(nn.Conv2d, block[0]), block[1], SLOPE, self.recompute_products)
            outs.append(x)
        conv, bn = cast(nn.Conv1d, self.conv5[0]), self.bn5
        # training: one function that keeps little for backward, with the four outputs as its parts
        fused = conv_bn_pool(outs, conv, bn, SLOPE, compute_dtype(x, conv.weight))
        if fused is not None:
            return fused
        x = torch.cat(outs, dim=-1)  # [B, N, 512]
        B, N, C = x.shape
        weight = conv.weight.reshape(self.emb_dims, C)
        if bn.training or not bn.affine or bn.running_mean is None or bn.running_var is None:
            h = self.bn5((x @ weight.t()).reshape(B * N, -1))  # per-point 1×1 conv, BN   [B·N, E]
        else:  # running statistics: BN folded into the conv, one product with a bias
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            weight, bias = weight * scale[:, None], bn.bias - bn.running_mean * scale
            if self._pool_in_chunks(x, weight):
                return self._folded_pool_chunked(x, weight, bias)
            h = F.linear(x.reshape(B * N, C), weight, bias)
        h = F.leaky_relu(h, SLOPE).view(B, N, -1)
        return torch.cat((h.max(dim=1).values, h.mean(dim=1)), dim=1)

    @staticmethod
    def _pool_in_chunks(x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type)
            and x.dtype == weight.dtype
            and not torch.compiler.is_compiling()
        )

    @staticmethod
    def _folded_pool_chunked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Inference: conv5 with BN folded, LeakyReLU and max ‖ mean pooling, a few clouds at a time.

        Each chunk's ``[c·N, E]`` activations go into one reused buffer and are pooled while still in
        cache, instead of a fresh ``[B·N, E]`` tensor written out and read back twice.
        """
        B, N, C = x.shape
        E = weight.shape[0]
        per = max(1, min(B, POOL_CHUNK_ELEMENTS // (N * E)))
        buf = torch.empty(per * N, E, dtype=x.dtype, device=x.device)
        out = torch.empty(B, 2 * E, dtype=x.dtype, device=x.device)
        wt = weight.t()
        for start in range(0, B, per):
            c = min(per, B - start)
            h = torch.addmm(bias, x[start : start + c].reshape(c * N, C), wt, out=buf[: c * N])
            h = F.leaky_relu(h, SLOPE, inplace=True).view(c, N, E)
            torch.amax(h, dim=1, out=out[start : start + c, :E])
            torch.mean(h, dim=1, out=out[start : start + c, E:])
        return out

    def _features_reference(self, points: torch.Tensor) -> torch.Tensor:
        x = points.transpose(1, 2)  # [B, 3, N]
        outs = []
        for block in self.edge_blocks:
            idx = knn_reference(x, self.k)
            x = edge_conv_reference(x, idx, block)  # [B, C_out, N]
            outs.append(x)
        x = self.conv5(torch.cat(outs, dim=1))  # [B, E, N]
        return torch.cat((F.adaptive_max_pool1d(x, 1), F.adaptive_avg_pool1d(x, 1)), dim=1).flatten(1)

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projection ``[B, proj_dim]``, feature ``[B, 2·emb_dims]``)."""
        feat = self.forward_features(points)
        return self.inv_head(feat), feat
