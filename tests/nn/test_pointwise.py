"""DGCNN's fused last block (conv, BatchNorm, LeakyReLU, max ‖ mean pool) equals the modules it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crossmoco_ray.nn.graph import knn, knn_reference
from crossmoco_ray.nn.pointwise import conv_bn_pool


def modules_block(x: torch.Tensor, conv: nn.Conv1d, bn: nn.BatchNorm1d) -> torch.Tensor:
    h = F.leaky_relu(bn(conv(x.transpose(1, 2))), 0.2)  # [B, E, N]
    return torch.cat((h.amax(dim=2), h.mean(dim=2)), dim=1)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_fused_block_equals_modules(momentum: float | None) -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(12, 20, 1, bias=False).double()
    bn = nn.BatchNorm1d(20, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(-1, 1)  # negative scales flip which values the max picks
        bn.bias.uniform_(-0.5, 0.5)
    conv_f, bn_f = copy.deepcopy(conv), copy.deepcopy(bn)
    for _ in range(2):  # twice: the running statistics accumulate alike
        x = torch.randn(3, 40, 12, dtype=torch.float64)
        x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref = modules_block(x_ref, conv, bn.train())
        fast = conv_bn_pool(x_fast, conv_f, bn_f.train(), 0.2, torch.float64)
        assert fast is not None
        torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(ref)
        (ref * g).sum().backward()
        (fast * g).sum().backward()
        torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for a, b in ((conv_f.weight.grad, conv.weight.grad), (bn_f.weight.grad, bn.weight.grad),
                 (bn_f.bias.grad, bn.bias.grad), (bn_f.running_mean, bn.running_mean),
                 (bn_f.running_var, bn.running_var)):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert int(bn_f.num_batches_tracked) == int(bn.num_batches_tracked) == 2


def test_fused_block_takes_its_input_in_parts() -> None:
    """DGCNN passes its four EdgeConv outputs as parts: same output and gradients as their concatenation."""
    torch.manual_seed(1)
    conv, bn = nn.Conv1d(12, 20, 1, bias=False).double(), nn.BatchNorm1d(20).double()
    conv_p, bn_p = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(3, 40, 12, dtype=torch.float64)
    whole = x.clone().requires_grad_()
    parts = [p.clone().requires_grad_() for p in x.split([2, 4, 6], dim=2)]
    want = conv_bn_pool(whole, conv, bn, 0.2, torch.float64)
    got = conv_bn_pool(parts, conv_p, bn_p, 0.2, torch.float64)
    assert want is not None
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    (want * g).sum().backward()
    (got * g).sum().backward()
    assert whole.grad is not None
    torch.testing.assert_close(torch.cat([p.grad for p in parts], dim=2), whole.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(conv_p.weight.grad, conv.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn_p.running_var, bn.running_var, rtol=1e-12, atol=1e-12)


def test_fused_block_applies_only_in_training() -> None:
    conv, bn = nn.Conv1d(4, 6, 1, bias=False), nn.BatchNorm1d(6).eval()
    assert conv_bn_pool(torch.randn(2, 8, 4), conv, bn, 0.2, torch.float32) is None


def test_fast_knn_finds_the_reference_neighbours() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 300, 16)
    fast = knn(x, 12, max_elements=300 * 300, ordered=False)
    ref = knn_reference(x.transpose(1, 2), 12)
    assert torch.equal(fast.sort(-1).values, ref.sort(-1).values)
