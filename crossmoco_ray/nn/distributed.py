"""Distributed helpers that degrade to no-ops in one process.

The same CrossMoCo code runs in a notebook, in one Ray worker and in 64: every helper here checks
whether a process group is initialised and, if not, returns its input unchanged.

- ``concat_all_gather``: keys from every worker, **no gradient** (MoCo's helper; used before enqueue).
- ``gather_with_grad``: embeddings from every worker **with** gradient, for global in-batch negatives
  in NT-Xent (backward sums the gradient contributions of all workers and keeps this worker's slice).
- ``batch_shuffle`` / ``batch_unshuffle``: MoCo's DDP shuffle-BN for the key encoders, so a key's
  BatchNorm statistics come from a different sub-batch than its query's.
- ``convert_sync_batchnorm``: SyncBN that keeps modules registered under two names shared (CrossPoint's
  DGCNN registers each BatchNorm twice; torch's converter would split them into two layers).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """True when a default process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes in the default group, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [n, ...] from every rank in rank order → [world·n, ...]; no gradient.

    Every rank must pass the same shape (``drop_last=True`` batches guarantee it).
    """
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces (sums) the incoming gradient and returns this rank's slice.

    Each rank's loss depends on every rank's embeddings, so the gradient w.r.t. this rank's slice is
    the sum of the contributions from every rank's loss; DDP then divides by the world size, which
    makes the update equal to the single-process gradient of the mean loss over the global batch.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.n = tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = rank() * ctx.n
        return grad[start : start + ctx.n]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [n, ...] from every rank → [world·n, ...], keeping the gradient path."""
    if not is_distributed():
        return tensor
    out: torch.Tensor = _GatherWithGrad.apply(tensor)
    return out


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle a batch across all ranks (MoCo's ``_batch_shuffle_ddp``).

    Returns this rank's slice of the shuffled global batch and the index that undoes the shuffle.
    In one process it returns ``x`` unchanged: permuting a batch on one device leaves ordinary
    BatchNorm statistics unchanged, so a single-process shuffle would only cost time.
    """
    if not is_distributed():
        return x, torch.arange(x.shape[0], device=x.device)
    x_all = concat_all_gather(x)
    n_all = x_all.shape[0]
    idx_shuffle = torch.randperm(n_all, device=x.device)
    dist.broadcast(idx_shuffle, src=0)  # every rank uses rank 0's permutation
    idx_unshuffle = torch.argsort(idx_shuffle)
    local = idx_shuffle.view(world_size(), -1)[rank()]
    return x_all[local], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo :func:`batch_shuffle` on the outputs ``x`` [n, ...] of the shuffled slice."""
    if not is_distributed():
        return x[idx_unshuffle]
    x_all = concat_all_gather(x)
    local = idx_unshuffle.view(world_size(), -1)[rank()]
    return x_all[local]


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm*d`` by ``SyncBatchNorm``, keeping shared modules shared.

    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` converts each *name* separately, so a BatchNorm
    registered twice (``bn1`` and ``conv1.1`` in CrossPoint's DGCNN) would become two layers with
    separate parameters. SyncBN needs CUDA (torch refuses CPU tensors); it is an option for GPU runs.
    """
    converted: dict[int, nn.Module] = {}

    def convert(m: nn.Module) -> nn.Module:
        if id(m) in converted:
            return converted[id(m)]
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            new = nn.SyncBatchNorm.convert_sync_batchnorm(m)
        else:
            new = m
            for name, child in list(m.named_children()):
                setattr(m, name, convert(child))
        converted[id(m)] = new
        return new

    return convert(module)
