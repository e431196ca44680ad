"""Image encoders: torchvision ResNet trunks (``fc`` removed) with the paper's image head (METHOD.md §1.4).

Random initialisation by default, as in CrossPoint and CrossMoCo. ImageNet weights are loaded only from
a local file the user names; nothing is ever downloaded. The wrapper keeps CrossMoCo's key layout
(``resnet.*`` trunk, ``inv_head.*`` head) so its image checkpoints load after prefix stripping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, cast

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

from .compat import load_checked, strip_prefixes
from .heads import image_head

# name → (torchvision constructor, pooled feature width)
IMAGE_TRUNKS: dict[str, tuple[Callable[..., nn.Module], int]] = {
    "resnet18": (torchvision.models.resnet18, 512),
    "resnet34": (torchvision.models.resnet34, 512),
    "resnet50": (torchvision.models.resnet50, 2048),
    "resnet101": (torchvision.models.resnet101, 2048),
    "resnet152": (torchvision.models.resnet152, 2048),
}


class ImageEncoder(nn.Module):
    """ResNet encoder: images ``[B, 3, H, W]`` → (projection ``[B, proj_dim]``, feature ``[B, feat]``).

    Args:
        arch: one of :data:`IMAGE_TRUNKS`.
        proj_dim: projection output (paper: 256).
        head_hidden: projection head hidden width (paper: 512).
        weights: optional path to a torchvision-layout state dict (e.g. ImageNet ResNet-50); ``fc.*`` is
            ignored, every other trunk key must match.
        checkpoint_trunk: in training with gradients, keep only each residual stage's input for backward
            and recompute the stage's activations there (activation checkpointing): most of the trunk's
            activation memory for one more trunk forward. BatchNorm running statistics are updated once,
            as without it; the result is the same function and gradient.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        proj_dim: int = 256,
        head_hidden: int = 512,
        weights: str | Path | None = None,
        checkpoint_trunk: bool = False,
    ) -> None:
        super().__init__()
        self.checkpoint_trunk = checkpoint_trunk
        if arch not in IMAGE_TRUNKS:
            raise ValueError(f"unknown image encoder {arch!r}; choose one of {sorted(IMAGE_TRUNKS)}")
        make, self.feature_dim = IMAGE_TRUNKS[arch]
        self.resnet = make(weights=None)  # random init: torchvision downloads nothing when weights=None
        self.resnet.fc = nn.Identity()
        self.inv_head = image_head(self.feature_dim, head_hidden, proj_dim)
        if weights is not None:
            self.load_trunk_weights(weights)

    def load_trunk_weights(self, path: str | Path) -> None:
        """Load trunk weights from a local file (torchvision layout, optionally prefixed)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"image encoder weights {path} not found; give a local file (nothing is downloaded), "
                "e.g. torchvision's resnet50-0676ba61.pth"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = strip_prefixes(state, ("module.", "resnet."))
        load_checked(self.resnet, state, ignored_unexpected=("fc.",), what=str(path))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if not (self.checkpoint_trunk and self.training and torch.is_grad_enabled()):
            out: torch.Tensor = self.resnet(images)
            return out
        r = cast(torchvision.models.ResNet, self.resnet)
        x = r.maxpool(r.relu(r.bn1(r.conv1(images))))
        for stage in (r.layer1, r.layer2, r.layer3, r.layer4):
            x = checkpoint(stage, x, use_reentrant=False, context_fn=_keep_running_stats(stage))
        return torch.flatten(r.avgpool(x), 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.forward_features(images)
        return self.inv_head(feat), feat


def _keep_running_stats(module: nn.Module) -> Callable[[], tuple[Any, Any]]:
    """``checkpoint``'s ``context_fn``: nothing in the forward, running statistics kept in the recompute."""
    return lambda: (nullcontext(), _running_stats_kept(module))


@contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Leave BatchNorm running statistics as they were across a recomputation of ``module``'s forward."""
    saved = [
        (buf, buf.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
