"""MemoryQueue: MoCo's queues of negative keys, several queues sharing one pointer.

- Length and dimension are required; the queues start as random unit vectors (as MoCo), one row per key.
- Persistent: the keys and the pointer are buffers, so they are in ``state_dict`` and a resumed run
  continues with the same negatives.
- Gathered: :meth:`enqueue` all-gathers the keys of every worker (no gradient) before writing them, so
  every worker writes the same rows and the queues stay identical without being broadcast.
- One pointer for all queues (CrossMoCo's point and image queues advance together). It lives on the
  queue's device and is never read back to the host: the rows are written with an index computed there,
  so an enqueue does not wait for the GPU.
- Any global batch: a batch that reaches the end of the ring wraps around to its start (row
  ``(ptr + i) mod length``), so the global batch may change between steps (an elastic run that lost or
  gained workers) and need not divide the length. Where it divides the length and does not change (the
  paper's recipe: ``objective.queue_length`` a multiple of the global batch) no batch wraps and the rows
  written are exactly the contiguous ``ptr … ptr + batch − 1`` of MoCo's ring. A batch longer than the
  queue keeps its newest ``length`` keys (what writing them in order would leave).
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
        length: keys per queue (``K``); any global batch works (the paper's recipe: a multiple of it).
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
        rows_in = stacked.view(batch, len(self.names), self.dim).transpose(0, 1)
        first = 0
        if batch > self.length:  # only the newest ``length`` keys survive a write of them in order
            first = batch - self.length
            rows_in = rows_in[:, first:]
        # ptr … ptr + n − 1 around the ring, computed on the device (no host read of the pointer)
        offsets = torch.arange(first, batch, device=self.ptr.device)
        rows = (self.ptr + offsets).remainder_(self.length)
        self.keys.index_copy_(1, rows, rows_in)
        self.ptr.add_(batch).remainder_(self.length)

    def checksum(self) -> float:
        """A cheap fingerprint of the queue contents and pointer (for cross-worker checks in logs)."""
        weights = torch.arange(1, self.keys.numel() + 1, dtype=torch.float64, device=self.keys.device)
        return float((self.keys.double().flatten() * weights).sum() + int(self.ptr))

    def extra_repr(self) -> str:
        return f"names={self.names}, length={self.length}, dim={self.dim}"
