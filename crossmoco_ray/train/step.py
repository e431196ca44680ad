"""One CrossMoCo optimisation step, pure PyTorch.

The same function runs in the Ray Train worker loop, in a local debug run and in ``bench/step.py``:
forward (momentum update, keys, losses, enqueue of the gathered keys), backward, optional gradient
clipping, optimizer step. bf16 autocast and channels-last image tensors are options for CUDA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "bf16"]


def to_device_batch(
    batch: Mapping[str, torch.Tensor], device: torch.device, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(points1, points2, views) on ``device``; ``images`` [B, V, 3, H, W] split into V view tensors."""
    points1 = batch["points1"].to(device, non_blocking=True)
    points2 = batch["points2"].to(device, non_blocking=True)
    images = batch["images"].to(device, non_blocking=True)
    views = list(images.unbind(1))
    if channels_last and device.type == "cuda":
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return points1, points2, views


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    """Move ``model`` to ``device``; on CUDA optionally convert its conv weights to channels-last."""
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def train_step(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    momentum: float,
    *,
    precision: Precision = "fp32",
    grad_clip: float | None = None,
    channels_last: bool = False,
) -> dict[str, torch.Tensor]:
    """Run one step of ``model`` (a :class:`~crossmoco_ray.nn.CrossMoCo`, possibly DDP-wrapped).

    Args:
        batch: ``points1`` / ``points2`` ``[B, N, 3]`` and ``images`` ``[B, V, 3, H, W]``.
        momentum: key-encoder momentum for this step.
        precision: ``"bf16"`` runs the forward under bf16 autocast (CUDA only; fp32 elsewhere).
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
        channels_last: channels-last image tensors (CUDA only).
    Returns:
        The model's named losses and diagnostics, detached (plus ``grad_norm`` when clipping).
    """
    device = next(model.parameters()).device
    points1, points2, views = to_device_batch(batch, device, channels_last)
    use_bf16 = precision == "bf16" and device.type == "cuda"
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        out = model(points1, points2, views, momentum=momentum)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if grad_clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return {name: value.detach() for name, value in out.items()}
