"""InfoNCE and NT-Xent equal brute-force computations of their definitions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from crossmoco_ray.nn import info_nce, nt_xent


def test_info_nce_equals_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    n, c, K, T = 5, 8, 12, 0.07
    q = F.normalize(torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(K, c, generator=g, dtype=torch.float64), dim=1)
    loss, logits = info_nce(q, k, queue, T)
    assert logits.shape == (n, 1 + K)
    total = 0.0
    for i in range(n):
        pos = math.exp(float(q[i] @ k[i]) / T)
        negs = sum(math.exp(float(q[i] @ queue[j]) / T) for j in range(K))
        total += -math.log(pos / (pos + negs))
        assert math.isclose(float(logits[i, 0]), float(q[i] @ k[i]) / T, rel_tol=1e-12)
    assert math.isclose(float(loss), total / n, rel_tol=1e-12)


def brute_nt_xent(z0: torch.Tensor, z1: torch.Tensor, T: float) -> float:
    """lightly 1.1.21: every one of the 2N embeddings is an anchor; its positive is its pair, and the
    other 2N−2 embeddings are negatives."""
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pair = (i + n) % n2
        denom = sum(math.exp(float(z[i] @ z[j]) / T) for j in range(n2) if j != i)
        total += -math.log(math.exp(float(z[i] @ z[pair]) / T) / denom)
    return total / n2


def test_nt_xent_equals_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(6, 4, generator=g, dtype=torch.float64) * 3  # un-normalised: the loss normalises
    z1 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    assert math.isclose(float(nt_xent(z0, z1, 0.1)), brute_nt_xent(z0, z1, 0.1), rel_tol=1e-12)
    # symmetric in its arguments, as lightly's NT-Xent
    assert math.isclose(float(nt_xent(z1, z0, 0.1)), float(nt_xent(z0, z1, 0.1)), rel_tol=1e-12)


def test_nt_xent_global_negatives_is_local_in_one_process() -> None:
    g = torch.Generator().manual_seed(2)
    z0, z1 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert torch.equal(nt_xent(z0, z1, 0.2, gather_distributed=True), nt_xent(z0, z1, 0.2))


def test_under_bf16_autocast_logits_and_losses_are_the_fp32_ones() -> None:
    """Autocast around the whole forward (CPU's standing in for CUDA's) must not reach the losses: at
    K = 4000 and T = 0.1, bf16 logits are off by about 0.01 (the docs promise fp32 losses)."""
    g = torch.Generator().manual_seed(5)
    n, c, K, T = 20, 256, 4000, 0.1
    q = F.normalize(torch.randn(n, c, generator=g), dim=1)
    k = F.normalize(torch.randn(n, c, generator=g), dim=1)
    queue = F.normalize(torch.randn(K, c, generator=g), dim=1)
    z0, z1 = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    loss_fp32, logits_fp32 = info_nce(q, k, queue, T)
    cross_fp32 = nt_xent(z0, z1, T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = info_nce(q, k, queue, T)
        cross = nt_xent(z0, z1, T)
        bf16_logits = (q @ queue.t()) / T  # what the einsum gave under autocast before
    assert bf16_logits.dtype == torch.bfloat16  # (autocast is really on here)
    assert logits.dtype == loss.dtype == cross.dtype == torch.float32
    assert torch.equal(logits, logits_fp32)
    assert torch.equal(loss, loss_fp32)
    assert torch.equal(cross, cross_fp32)
    assert float((bf16_logits.float() - logits_fp32[:, 1:]).abs().max()) > 1e-3  # what it avoids
