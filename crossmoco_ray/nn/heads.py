"""The paper's projection heads (METHOD.md §1.5).

Heads sit inside each encoder under the name ``inv_head`` with CrossPoint's layer indices (0 = Linear,
1 = BatchNorm1d, 2 = ReLU, 3 = Linear), so released checkpoints load without renaming. No
L2-normalisation here: the losses normalise.
"""

from __future__ import annotations

from torch import nn


def point_head(in_dim: int, hidden_dim: int = 1024, out_dim: int = 256) -> nn.Sequential:
    """DGCNN head: ``Linear(in→hidden, bias) → BN1d → ReLU → Linear(hidden→out, bias)``."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def image_head(in_dim: int, hidden_dim: int = 512, out_dim: int = 256) -> nn.Sequential:
    """ResNet head: ``Linear(in→hidden, no bias) → BN1d → ReLU → Linear(hidden→out, no bias)``."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
    )
