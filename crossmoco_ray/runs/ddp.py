"""What a Train worker process needs besides the maths: its rank and device, DDP (options, wrapping, gradient
buckets), collectives of Python objects, quiet logs."""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def ddp_kwargs() -> dict[str, bool]:
    """Sync buffers at construction only, not per forward (torch ≥ 2.14: ``forward_sync_buffers``)."""
    params = inspect.signature(DistributedDataParallel).parameters
    return (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    )


def gather_objects(value: Any) -> list[Any]:
    """``value`` from every worker, in rank order (collective: every worker calls it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_ranks(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every worker (collective: every worker calls it, and all get the same
    answer, so they stop or go on together)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def start_worker() -> tuple[int, int, torch.device]:
    """What every Train worker does first: quiet logs, keep freed memory; returns (rank, world, device)."""
    import ray.train
    import ray.train.torch

    from crossmoco_ray.nn.precision import keep_freed_memory

    quiet_worker_logs()
    keep_freed_memory()
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def wrap_ddp(model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """``model`` in DDP when there is more than one worker (buffers synced at construction only; the
    gradients are views into DDP's all-reduce buckets, kept and zeroed in place by the step,
    :func:`~crossmoco_ray.runs.ddp.keeps_bucket_views`: no second copy of them, no copy into the
    buckets)."""
    if world == 1:
        return model
    device_ids = [device] if device.type == "cuda" else None
    kwargs: dict[str, Any] = {"device_ids": device_ids, "gradient_as_bucket_view": True, **ddp_kwargs()}
    return DistributedDataParallel(model, **kwargs)


def quiet_worker_logs() -> None:
    """Keep the console to our progress lines: Ray Train 2.60 logs every report at INFO under a logger
    named after its file (so ``LoggingConfig`` does not reach it), and DDP warns on every step that
    mkldnn's 1×1-convolution gradients are laid out differently from its buckets (a copy, not an error).
    """
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def keeps_bucket_views(model: nn.Module) -> bool:
    """Whether ``model`` is DDP with its gradients as views into its all-reduce buckets: they are then
    zeroed in place, since gradients set to None would be allocated afresh and copied into the buckets
    at every step."""
    return bool(getattr(model, "gradient_as_bucket_view", False))
