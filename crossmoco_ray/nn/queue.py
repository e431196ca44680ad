"""MemoryQueue: MoCo's queues of negative keys, several queues sharing one pointer.

- Length and dimension are required; the queues start as random unit vectors (as MoCo), one row per key.
- Persistent: the keys and the pointer are buffers, so they are in ``state_dict`` and a resumed run
  continues with the same negatives.
- Gathered: :meth:`enqueue` all-gathers the keys of every worker (no gradient) before writing them, so
  every worker writes the same rows and the queues stay identical without being broadcast.
- One pointer for all queues (CrossMoCo's point and image queues advance together). It lives on the
  queue's device and is never read back to the host: the rows are written with an index computed there,
  so an enqueue does not wait for the GPU.
- The length must be a multiple of the **global** batch, so a batch never wraps around the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from crossmoco_ray.nn.distributed import concat_all_gather


class MemoryQueue(nn.Module):
    """``len(names)`` queues of ``length`` keys of size ``dim`` with one shared pointer.

    Args:
        length: keys per queue (``K``); a multiple of the global batch.
        dim: key dimension.
        names: one name per queue, e.g. ``("point", "image")``.
    """

    keys: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, length: int, dim: int, names: Sequence[str] = ("keys",)) -> None:
        super().__init__()
        if length <= 0 or dim <= 0:
            raise ValueError(f"MemoryQueue needs a positive length and dim, got length={length}, dim={dim}")
        self.length, self.dim, self.names = int(length), int(dim), tuple(names)
        self.register_buffer("keys", F.normalize(torch.randn(len(self.names), length, dim), dim=-1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def __getitem__(self, name: str) -> torch.Tensor:
        """The ``[length, dim]`` keys of queue ``name`` (a view; clone before the queue changes)."""
        return self.keys[self.names.index(name)]

    @torch.no_grad()
    def enqueue(self, *keys: torch.Tensor) -> None:
        """Gather one ``[n, dim]`` key batch per queue from every worker and write it at the pointer."""
        if len(keys) != len(self.names):
            raise ValueError(f"enqueue expects {len(self.names)} key tensors ({self.names}), got {len(keys)}")
        # One all-gather for all queues: [n, Q·dim] → [n·world, Q·dim]
        stacked = concat_all_gather(torch.cat([k.detach().to(self.keys.dtype) for k in keys], dim=1))
        batch = stacked.shape[0]
        if self.length % batch:
            lo, hi = (self.length // batch) * batch, (self.length // batch + 1) * batch
            raise ValueError(
                f"queue length {self.length} is not a multiple of the global batch {batch} "
                f"(per-worker batch × workers); use {lo or hi} or {hi}"
            )
        rows = self.ptr + torch.arange(batch, device=self.ptr.device)  # ptr … ptr + batch − 1, on the device
        self.keys.index_copy_(1, rows, stacked.view(batch, len(self.names), self.dim).transpose(0, 1))
        self.ptr.add_(batch).remainder_(self.length)

    def checksum(self) -> float:
        """A cheap fingerprint of the queue contents and pointer (for cross-worker checks in logs)."""
        weights = torch.arange(1, self.keys.numel() + 1, dtype=torch.float64, device=self.keys.device)
        return float((self.keys.double().flatten() * weights).sum() + int(self.ptr))

    def extra_repr(self) -> str:
        return f"names={self.names}, length={self.length}, dim={self.dim}"
