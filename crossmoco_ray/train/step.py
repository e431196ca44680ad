"""One CrossMoCo optimisation step, pure PyTorch.

The same function runs in the Ray Train worker loop, in a local debug run and in ``bench/step.py``:
forward (momentum update, keys, losses, enqueue of the gathered keys), backward, optional gradient
clipping, optimizer step. bf16 autocast and channels-last image tensors are options, on CUDA and on CPU
(bf16 where the device supports it: :func:`~crossmoco_ray.nn.runtime.resolve_precision`); the kNN
distances, BatchNorm statistics, losses and queues stay fp32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from ..nn.image import ImageEncoder

Precision = Literal["fp32", "bf16"]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def images_to_tensor(images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``ToTensor`` + ``Normalize``: uint8 ``[..., H, W, 3]`` → float32 ``[..., 3, H, W]`` (ImageNet stats).

    Float input is taken as already converted and returned unchanged.
    """
    if images.is_floating_point():
        return images
    x = images.movedim(-1, -3).float().div_(255.0)
    if normalize:
        shape = (3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(shape)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(shape)
        x = x.sub_(mean).div_(std)
    return x


def to_device_batch(
    batch: Mapping[str, torch.Tensor],
    device: torch.device,
    channels_last: bool = False,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(points1, points2, views) on ``device``.

    ``images`` is the pipeline's uint8 ``[B, V, H, W, 3]`` (converted and normalised here, on the device)
    or a float ``[B, V, 3, H, W]``; it is split into V view tensors ``[B, 3, H, W]``.
    """
    points1 = batch["points1"].to(device, non_blocking=True)
    points2 = batch["points2"].to(device, non_blocking=True)
    images = images_to_tensor(batch["images"].to(device, non_blocking=True), normalize)
    views = list(images.unbind(1))
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return points1, points2, views


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    """Move ``model`` to ``device``; optionally make its image encoders' conv weights channels-last.

    Only the image encoders: the DGCNN's 1×1 convolutions run as matrix products on point-major rows.
    """
    model = model.to(device)
    if channels_last:
        for module in model.modules():
            if isinstance(module, ImageEncoder):
                module.to(memory_format=torch.channels_last)
    return model


def _all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every worker (one scalar all-reduce; every worker decides alike)."""
    flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def train_step(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    momentum: float,
    *,
    precision: Precision = "fp32",
    grad_clip: float | None = None,
    channels_last: bool = False,
    normalize_images: bool = True,
    check_finite: bool = False,
) -> dict[str, torch.Tensor]:
    """Run one step of ``model`` (a :class:`~crossmoco_ray.nn.CrossMoCo`, possibly DDP-wrapped).

    Args:
        batch: ``points1`` / ``points2`` ``[B, N, 3]`` and ``images`` (uint8 ``[B, V, H, W, 3]`` from the
            pipeline, or float ``[B, V, 3, H, W]``).
        momentum: key-encoder momentum for this step.
        precision: ``"bf16"`` runs the forward under bf16 autocast (resolve it with
            :func:`~crossmoco_ray.nn.runtime.resolve_precision` first: this function does as told).
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
        channels_last: channels-last image tensors.
        normalize_images: ImageNet normalisation of uint8 images.
        check_finite: before backward, check (on every worker at once) that the loss is finite; if any is
            not, skip backward and the update and return ``nonfinite`` = 1, leaving the weights untouched.
    Returns:
        The model's named losses and diagnostics, detached (plus ``grad_norm`` when clipping).
    """
    device = next(model.parameters()).device
    points1, points2, views = to_device_batch(batch, device, channels_last, normalize_images)
    use_bf16 = precision == "bf16"
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        out = model(points1, points2, views, momentum=momentum)
    optimizer.zero_grad(set_to_none=True)
    if check_finite and not _all_finite(out["loss"]):
        return {**{name: value.detach() for name, value in out.items()}, "nonfinite": torch.ones(())}
    out["loss"].backward()
    if grad_clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return {name: value.detach() for name, value in out.items()}
