"""Image encoders: torchvision ResNet trunks (``fc`` removed) with the paper's image head (METHOD.md §1.4).

Random initialisation by default, as in CrossPoint and CrossMoCo. ImageNet weights are loaded only from
a local file the user names; nothing is ever downloaded. The wrapper keeps CrossMoCo's key layout
(``resnet.*`` trunk, ``inv_head.*`` head) so its image checkpoints load after prefix stripping.

The encoder takes the pipeline's uint8 views ``[B, H, W, 3]`` as they are and converts them itself
(``ToTensor`` + ImageNet ``Normalize`` in one pass, channels-last when its weights are): so a view stays
one byte per value until it reaches the encoder that reads it, and shuffle-BN gathers the bytes across
workers, not four times as many floats.
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

from crossmoco_ray.nn.foreign_weights import load_checked, strip_prefixes
from crossmoco_ray.nn.heads import image_head

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def images_to_tensor(
    images: torch.Tensor, normalize: bool = True, channels_last: bool = False
) -> torch.Tensor:
    """``ToTensor`` + ``Normalize``: uint8 ``[..., H, W, 3]`` → float32 ``[..., 3, H, W]`` (ImageNet stats).

    Float input is taken as already converted and returned unchanged. ``channels_last``: the result of a
    4-d batch keeps the pixels' interleaved layout (no transposing copy); else it is NCHW-contiguous.
    """
    scale, shift = input_affine(normalize)
    return _convert(images, scale.to(images.device), shift.to(images.device), channels_last)


def input_affine(normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) ``[3, 1, 1]`` with ``x/255`` normalised ``= x·scale + shift``."""
    mean = torch.tensor(IMAGENET_MEAN if normalize else (0.0, 0.0, 0.0), dtype=torch.float64)
    std = torch.tensor(IMAGENET_STD if normalize else (1.0, 1.0, 1.0), dtype=torch.float64)
    return (1.0 / (255.0 * std)).view(3, 1, 1).float(), (-mean / std).view(3, 1, 1).float()


def _convert(
    images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channels_last: bool
) -> torch.Tensor:
    if images.is_floating_point():
        return images
    x = torch.addcmul(shift, images.movedim(-1, -3), scale)  # one pass from the bytes
    if x.dim() == 4 and channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


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
        normalize_input: ImageNet mean/std normalisation of uint8 input (else ``[0, 1]``); float input is
            taken as converted.
    """

    input_scale: torch.Tensor
    input_shift: torch.Tensor

    def __init__(
        self,
        arch: str = "resnet50",
        proj_dim: int = 256,
        head_hidden: int = 512,
        weights: str | Path | None = None,
        checkpoint_trunk: bool = False,
        normalize_input: bool = True,
    ) -> None:
        super().__init__()
        self.checkpoint_trunk = checkpoint_trunk
        # the uint8 → float conversion, moved with the module (not saved: derived from normalize_input)
        scale, shift = input_affine(normalize_input)
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
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

    def prepare_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` → normalised float ``[B, 3, H, W]`` in the trunk's memory format (float
        input ``[B, 3, H, W]`` passes unchanged)."""
        conv1 = cast(torchvision.models.ResNet, self.resnet).conv1
        channels_last = conv1.weight.is_contiguous(memory_format=torch.channels_last)
        return _convert(images, self.input_scale, self.input_shift, channels_last)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        images = self.prepare_input(images)
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
