"""A point encoder with a classifier head, and the loss and metrics of classification fine-tuning.

The head is DGCNN's classifier (``Linear(F→512, no bias) → BN → LeakyReLU(0.2) → Dropout → Linear(512→256)
→ BN → LeakyReLU(0.2) → Dropout → Linear(256→classes)``) or one linear layer (the linear probe). The
encoder is any of :data:`crossmoco_ray.nn.POINT_ENCODERS`, its projection head (``inv_head``) unused:
classification reads the pooled backbone feature, the one the SVM reads.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SLOPE = 0.2


def classifier_head(in_dim: int, num_classes: int, kind: str = "mlp", dropout: float = 0.5) -> nn.Module:
    """DGCNN's classifier (``mlp``) or one linear layer (``linear``)."""
    if kind == "linear":
        return nn.Linear(in_dim, num_classes)
    if kind != "mlp":
        raise ValueError(f"head must be 'mlp' or 'linear', got {kind!r}")
    return nn.Sequential(
        nn.Linear(in_dim, 512, bias=False),
        nn.BatchNorm1d(512),
        nn.LeakyReLU(SLOPE),
        nn.Dropout(dropout),
        nn.Linear(512, 256),
        nn.BatchNorm1d(256),
        nn.LeakyReLU(SLOPE),
        nn.Dropout(dropout),
        nn.Linear(256, num_classes),
    )


class PointClassifier(nn.Module):
    """``points [B, N, 3]`` → logits ``[B, classes]``: the encoder's pooled feature, then the head.

    With ``frozen``, the encoder stays in eval mode (running BatchNorm statistics) and gets no gradient,
    whatever mode the classifier is put in.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, frozen: bool = False) -> None:
        super().__init__()
        if hasattr(encoder, "inv_head"):  # the projection head: pretraining's, unused here (and by DDP)
            encoder.inv_head = nn.Identity()
        self.encoder, self.head, self.frozen = encoder, head, frozen
        if frozen:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> PointClassifier:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                feat = self.encoder.forward_features(points)  # type: ignore[operator]
        else:
            feat = self.encoder.forward_features(points)  # type: ignore[operator]
        out: torch.Tensor = self.head(feat.float())
        return out


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """DGCNN's ``cal_loss``: cross-entropy against ``(1 − ε)`` on the label and ``ε / (C − 1)`` on every
    other class (not torch's ``label_smoothing``, which puts ``ε / C`` on every class, the label included)."""
    logp = F.log_softmax(logits.float(), dim=1)
    if eps == 0:
        return F.nll_loss(logp, labels)
    C = logits.shape[1]
    target = torch.full_like(logp, eps / (C - 1))
    target.scatter_(1, labels[:, None], 1.0 - eps)
    return -(target * logp).sum(dim=1).mean()


def accuracies(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, float]:
    """Overall accuracy and mean class accuracy (over the classes present in ``labels``)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    if len(labels) == 0:
        return float("nan"), float("nan")
    oa = float((pred == labels).mean())
    per = [float((pred[labels == c] == c).mean()) for c in range(num_classes) if (labels == c).any()]
    return oa, float(np.mean(per))
