"""Contrastive losses (METHOD.md §1.6, §2.4, §3.1).

- :func:`info_nce`: MoCo's InfoNCE against a queue of negatives, logits ``N×(1+K)`` with the positive
  at column 0.
- :func:`nt_xent`: CrossPoint's symmetric NT-Xent (lightly 1.1.21 semantics): each of the ``2N``
  embeddings is an anchor with one positive and ``2N−2`` negatives; optionally the negatives come from
  every worker through a gradient-carrying gather.

Both compute their logits and losses in fp32 (IEEE products) whatever the autocast around them: at
``K = 4000`` and ``T = 0.1`` bf16 logits are off by about 0.01, as much as many of the margins they rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crossmoco_ray.nn.distributed import gather_with_grad, rank
from crossmoco_ray.nn.precision import at_least_fp32, fp32_maths


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of queries against their keys and a queue of negatives.

    Args:
        q: queries ``[N, C]``, L2-normalised (gradient flows here).
        k: positive keys ``[N, C]``, normalised, no gradient.
        queue: negatives ``[K, C]``, normalised, no gradient.
        temperature: ``T``.
    Returns:
        (mean cross-entropy, logits ``[N, 1+K]`` already divided by ``T``), in fp32 (fp64 for fp64 inputs).
    """
    with fp32_maths(q.device.type):
        dtype = at_least_fp32(q).dtype
        q, k, queue = q.to(dtype), k.to(dtype), queue.to(dtype)
        # positive logits: N×1
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        # negative logits: N×K
        l_neg = torch.einsum("nc,kc->nk", q, queue)
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels), logits


def nt_xent(
    z0: torch.Tensor, z1: torch.Tensor, temperature: float, gather_distributed: bool = False
) -> torch.Tensor:
    """Symmetric NT-Xent between paired embeddings ``z0[i] ↔ z1[i]`` (normalised here).

    With ``gather_distributed`` the candidates are the embeddings of **all** workers (``2·N_global − 2``
    negatives per anchor, gradients flowing back to their owners); this worker's anchors are its own
    ``2n`` rows, and the mean over workers equals the single-process loss on the global batch.
    """
    with fp32_maths(z0.device.type):
        return _nt_xent(at_least_fp32(z0), at_least_fp32(z1), temperature, gather_distributed)


def _nt_xent(
    z0: torch.Tensor, z1: torch.Tensor, temperature: float, gather_distributed: bool
) -> torch.Tensor:
    z0 = F.normalize(z0, dim=1)
    z1 = F.normalize(z1.to(z0.dtype), dim=1)
    n = z0.shape[0]
    if gather_distributed:
        z0_all, z1_all = gather_with_grad(z0), gather_with_grad(z1)
        offset = rank() * n if z0_all.shape[0] != n else 0
    else:
        z0_all, z1_all, offset = z0, z1, 0
    n_all = z0_all.shape[0]
    anchors = torch.cat([z0, z1])  # 2n × C
    candidates = torch.cat([z0_all, z1_all])  # 2N × C
    logits = anchors @ candidates.t() / temperature  # 2n × 2N
    own = torch.arange(n, device=z0.device) + offset
    self_cols = torch.cat([own, own + n_all])  # an anchor is not its own negative
    pos_cols = torch.cat([own + n_all, own])
    rows = torch.arange(2 * n, device=z0.device)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[rows, self_cols] = True
    logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, pos_cols)
