"""CrossPoint's part-segmentation DGCNN (``DGCNN_partseg``, METHOD.md §1.2), with its parameter names, so
its state dicts load strictly.

- :class:`DGCNNSeg` is the encoder (``--model dgcnn_seg`` in CrossPoint's pretraining): a spatial
  transformer (``transform_net``), three EdgeConv stages of two convolutions each (64, 64, 64), concat 192
  → ``conv6`` (192→``emb_dims``) → global max: the ``emb_dims``-d feature (1024), and ``inv_head``
  (Linear 1024→1024, BN, ReLU, Linear 1024→256). It can be pretrained in CrossMoCo
  (``model.point_encoder=dgcnn_seg``) and evaluated like any encoder (``forward_features``).
- :class:`PartSegmenter` is the fine-tuning model: that encoder plus the segmentation head (category one-hot
  16 → ``conv7`` 64; global feature ‖ category, repeated over points ‖ the three stage outputs, 1280 →
  ``conv8`` 256 → dropout → ``conv9`` 256 → dropout → ``conv10`` 128 → ``conv11`` parts, no bias). Its
  state dict is CrossPoint's fine-tuned ``DGCNN_partseg`` layout (the encoder's keys at the top level).

Every EdgeConv stage applies two convolutions to each edge before the max, so the edges are materialised
(the reference formulation); the kNN graph is the fast one.
"""

from __future__ import annotations

import torch
from torch import nn

from crossmoco_ray.nn.edgeconv import graph_feature_reference
from crossmoco_ray.nn.graph import knn
from crossmoco_ray.nn.precision import at_least_fp32, fp32_maths

SLOPE = 0.2
NUM_CATEGORIES = 16  # ShapeNetPart
NUM_PARTS = 50


def _block(conv: nn.Module, bn: nn.Module) -> nn.Sequential:
    return nn.Sequential(conv, bn, nn.LeakyReLU(negative_slope=SLOPE))


def _edges(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` [B, C, N] → edge features [B, 2C, N, k] on the kNN graph of ``x``."""
    idx = knn(x.transpose(1, 2).contiguous(), k, ordered=False)
    return graph_feature_reference(x, idx)


class TransformNet(nn.Module):
    """The 3×3 spatial transformer of DGCNN's segmentation model, initialised to the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(64), nn.BatchNorm2d(128)
        self.conv1 = _block(nn.Conv2d(6, 64, 1, bias=False), self.bn1)
        self.conv2 = _block(nn.Conv2d(64, 128, 1, bias=False), self.bn2)
        self.conv3 = _block(nn.Conv1d(128, 1024, 1, bias=False), nn.BatchNorm1d(1024))
        self.linear1 = nn.Linear(1024, 512, bias=False)
        self.bn3 = nn.BatchNorm1d(512)  # the original re-binds bn3 after conv3 took the 1024-wide one
        self.linear2 = nn.Linear(512, 256, bias=False)
        self.bn4 = nn.BatchNorm1d(256)
        self.transform = nn.Linear(256, 9)
        nn.init.zeros_(self.transform.weight)
        with torch.no_grad():
            self.transform.bias.copy_(torch.eye(3).flatten())

    def forward(self, edges: torch.Tensor) -> torch.Tensor:
        """Edge features [B, 6, N, k] → transforms [B, 3, 3]."""
        x = self.conv2(self.conv1(edges)).max(dim=-1).values
        x = self.conv3(x).max(dim=-1).values
        x = nn.functional.leaky_relu(self.bn3(self.linear1(x)), SLOPE)
        x = nn.functional.leaky_relu(self.bn4(self.linear2(x)), SLOPE)
        return self.transform(x).view(-1, 3, 3)


class DGCNNSeg(nn.Module):
    """The encoder of ``DGCNN_partseg``: points ``[B, N, 3]`` → (projection, ``emb_dims``-d feature)."""

    def __init__(
        self, k: int = 40, emb_dims: int = 1024, proj_dim: int = 256, head_hidden: int = 1024
    ) -> None:
        super().__init__()
        self.k, self.emb_dims, self.feature_dim = k, emb_dims, emb_dims
        self.transform_net = TransformNet()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(64), nn.BatchNorm2d(64), nn.BatchNorm2d(64)
        self.bn4, self.bn5, self.bn6 = nn.BatchNorm2d(64), nn.BatchNorm2d(64), nn.BatchNorm1d(emb_dims)
        self.conv1 = _block(nn.Conv2d(6, 64, 1, bias=False), self.bn1)
        self.conv2 = _block(nn.Conv2d(64, 64, 1, bias=False), self.bn2)
        self.conv3 = _block(nn.Conv2d(128, 64, 1, bias=False), self.bn3)
        self.conv4 = _block(nn.Conv2d(64, 64, 1, bias=False), self.bn4)
        self.conv5 = _block(nn.Conv2d(128, 64, 1, bias=False), self.bn5)
        self.conv6 = _block(nn.Conv1d(192, emb_dims, 1, bias=False), self.bn6)
        self.inv_head = nn.Sequential(
            nn.Linear(emb_dims, head_hidden), nn.BatchNorm1d(head_hidden), nn.ReLU(inplace=True),
            nn.Linear(head_hidden, proj_dim),
        )  # fmt: skip

    def stages(self, points: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Global feature [B, emb_dims] and the three per-point stage outputs [B, 64, N]."""
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"DGCNNSeg expects points [B, N, 3], got {tuple(points.shape)}")
        x = points.transpose(1, 2)  # [B, 3, N]
        t = self.transform_net(_edges(x, self.k))
        # (xᵀ t)ᵀ: each point row times t, as the original; in fp32 under autocast too, since these
        # coordinates choose conv1's neighbours and are its edge features
        with fp32_maths(x.device.type):
            x = at_least_fp32(x)
            x = torch.bmm(t.to(x.dtype).transpose(1, 2), x)
        x1 = self.conv2(self.conv1(_edges(x, self.k))).max(dim=-1).values
        x2 = self.conv4(self.conv3(_edges(x1, self.k))).max(dim=-1).values
        x3 = self.conv5(_edges(x2, self.k)).max(dim=-1).values
        feat = self.conv6(torch.cat((x1, x2, x3), dim=1)).max(dim=-1).values
        return feat, [x1, x2, x3]

    def forward_features(self, points: torch.Tensor) -> torch.Tensor:
        """The ``emb_dims``-d max-pooled feature (what CrossPoint's SVM monitor reads for ``dgcnn_seg``)."""
        return self.stages(points)[0]

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.forward_features(points)
        return self.inv_head(feat), feat


class PartSegmenter(nn.Module):
    """``DGCNN_partseg`` for fine-tuning: points [B, N, 3] and categories [B] → part logits [B, parts, N].

    The encoder's parameters sit at the top level (``transform_net.*``, ``conv1``–``conv6``, ``bn1``–``bn6``),
    as in CrossPoint's model; the projection head is not part of it (a pretrained file's is ignored).
    """

    def __init__(
        self, encoder: DGCNNSeg, num_parts: int = NUM_PARTS, num_categories: int = NUM_CATEGORIES,
        dropout: float = 0.5,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_categories = num_categories
        self.k, self.emb_dims = encoder.k, encoder.emb_dims
        for name, module in encoder.named_children():
            if name != "inv_head":
                self.add_module(name, module)
        self.bn7, self.bn8, self.bn9, self.bn10 = (
            nn.BatchNorm1d(64), nn.BatchNorm1d(256), nn.BatchNorm1d(256), nn.BatchNorm1d(128)
        )  # fmt: skip
        self.conv7 = _block(nn.Conv1d(num_categories, 64, 1, bias=False), self.bn7)
        self.conv8 = _block(nn.Conv1d(encoder.emb_dims + 64 + 192, 256, 1, bias=False), self.bn8)
        self.dp1 = nn.Dropout(dropout)
        self.conv9 = _block(nn.Conv1d(256, 256, 1, bias=False), self.bn9)
        self.dp2 = nn.Dropout(dropout)
        self.conv10 = _block(nn.Conv1d(256, 128, 1, bias=False), self.bn10)
        self.conv11 = nn.Conv1d(128, num_parts, 1, bias=False)

    def forward(self, points: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        feat, (x1, x2, x3) = DGCNNSeg.stages(self, points)  # type: ignore[arg-type]
        N = points.shape[1]
        onehot = nn.functional.one_hot(category.long(), self.num_categories).to(feat.dtype)
        g = torch.cat((feat, self.conv7(onehot[:, :, None])[:, :, 0]), dim=1)  # [B, emb + 64]
        x = torch.cat((g[:, :, None].expand(-1, -1, N), x1, x2, x3), dim=1)
        x = self.dp1(self.conv8(x))
        x = self.dp2(self.conv9(x))
        out: torch.Tensor = self.conv11(self.conv10(x))
        return out
