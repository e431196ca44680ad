"""One CrossMoCo optimisation step, pure PyTorch.

The same function runs in the Ray Train worker loop, in a local debug run and in ``bench/step.py``:
forward (momentum update, keys, losses, enqueue of the gathered keys), backward, optional gradient
clipping, optimizer step. bf16 autocast and channels-last image tensors are options, on CUDA and on CPU
(bf16 where the device supports it: :func:`~crossmoco_ray.nn.precision.resolve_precision`); the kNN
distances, BatchNorm statistics, losses and queues stay fp32.

On a GPU the step never waits for the device: nothing in it reads a value back to the host
(``tests/pretrain/test_gpu_path.py`` traces it on fake CUDA tensors and fails on any such read). Whether the
loss stayed finite is the caller's to check, from the returned tensors, where it reads them anyway (the
training loop: once per log window and before every checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from crossmoco_ray.nn.image import ImageEncoder
from crossmoco_ray.runs.ddp import keeps_bucket_views

Precision = Literal["fp32", "bf16"]


def to_device_batch(
    batch: Mapping[str, torch.Tensor], device: torch.device, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(points1, points2, views) on ``device``.

    ``images`` is the pipeline's uint8 ``[B, V, H, W, 3]``, split into V views ``[B, H, W, 3]`` that stay
    uint8 (the image encoders convert them: :func:`~crossmoco_ray.nn.image.images_to_tensor`), or a float
    ``[B, V, 3, H, W]``, split into ``[B, 3, H, W]`` views (channels-last if asked).
    """
    points1 = batch["points1"].to(device, non_blocking=True)
    points2 = batch["points2"].to(device, non_blocking=True)
    images = batch["images"].to(device, non_blocking=True)
    views = list(images.unbind(1))
    if channels_last and images.is_floating_point():
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
        batch: ``points1`` / ``points2`` ``[B, N, 3]`` and ``images`` (uint8 ``[B, V, H, W, 3]`` from the
            pipeline, normalised by the image encoders, or float ``[B, V, 3, H, W]``).
        momentum: key-encoder momentum for this step.
        precision: ``"bf16"`` runs the forward under bf16 autocast (resolve it with
            :func:`~crossmoco_ray.nn.precision.resolve_precision` first: this function does as told).
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
        channels_last: channels-last float image tensors (uint8 views follow the encoders' weights).
    Returns:
        The model's named losses and diagnostics, detached (plus ``grad_norm`` when clipping), on the
        model's device: reading them is the caller's synchronisation.
    """
    device = next(model.parameters()).device
    points1, points2, views = to_device_batch(batch, device, channels_last)
    use_bf16 = precision == "bf16"
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        out = model(points1, points2, views, momentum=momentum)
    optimizer.zero_grad(set_to_none=not keeps_bucket_views(model))
    out["loss"].backward()
    if grad_clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return {name: value.detach() for name, value in out.items()}
