"""PointNet point encoder (the ``WangYueFt/dgcnn`` PointNet the CrossPoint authors point to, METHOD.md §1.3).

Conv1d 3→64→64→64→128→``emb_dims`` (no bias, BN, ReLU), global max-pool → ``emb_dims`` feature. CrossPoint
never published its PointNet head; this one follows its ``DGCNN_partseg`` head for a 1024-d feature
(``Linear(1024→1024) → BN → ReLU → Linear(1024→256)``).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from crossmoco_ray.nn.heads import point_head


class PointNet(nn.Module):
    """PointNet encoder: points ``[B, N, 3]`` → (projection ``[B, proj_dim]``, feature ``[B, emb_dims]``)."""

    def __init__(self, emb_dims: int = 1024, proj_dim: int = 256, head_hidden: int = 1024) -> None:
        super().__init__()
        self.emb_dims = emb_dims
        self.feature_dim = emb_dims
        widths = (3, 64, 64, 64, 128, emb_dims)
        for i, (c_in, c_out) in enumerate(itertools.pairwise(widths), start=1):
            setattr(self, f"conv{i}", nn.Conv1d(c_in, c_out, 1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm1d(c_out))
        self.inv_head = point_head(self.feature_dim, head_hidden, proj_dim)

    def forward_features(self, points: torch.Tensor) -> torch.Tensor:
        """Max-pooled feature ``[B, emb_dims]`` of ``[B, N, 3]``."""
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"PointNet expects points [B, N, 3], got {tuple(points.shape)}")
        x = points.transpose(1, 2)
        for i in range(1, 6):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return x.max(dim=-1).values

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.forward_features(points)
        return self.inv_head(feat), feat
