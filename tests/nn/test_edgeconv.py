"""The fast EdgeConv computes the reference EdgeConv's function, gradients and running statistics included."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from crossmoco_ray.nn import kernels
from crossmoco_ray.nn.edgeconv import edge_conv_fast, edge_conv_reference
from crossmoco_ray.nn.graph import NeighbourGraph, knn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def make_block(c_in: int, c_out: int, dtype: torch.dtype) -> nn.Sequential:
    block = nn.Sequential(
        nn.Conv2d(2 * c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)
    ).to(dtype)
    with torch.no_grad():  # mixed-sign BN scales exercise both the max and the min branch
        block[1].weight.uniform_(-1.0, 1.0)
        block[1].bias.uniform_(-0.5, 0.5)
    return block


def run_pair(x: torch.Tensor, idx: torch.Tensor, block: nn.Sequential, train: bool):
    fast_block, ref_block = block, copy.deepcopy(block)
    fast_block.train(train)
    ref_block.train(train)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast = edge_conv_fast(x_fast, idx, fast_block[0], fast_block[1])  # [B, N, O]
    y_ref = edge_conv_reference(x_ref.transpose(1, 2), idx, ref_block).transpose(1, 2)
    g = torch.randn(y_ref.shape, dtype=y_ref.dtype, generator=torch.Generator().manual_seed(0))
    (y_fast * g).sum().backward()
    (y_ref * g).sum().backward()
    return (y_fast, x_fast, fast_block), (y_ref, x_ref, ref_block)


@pytest.mark.parametrize("k", [5, 15, 20])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"]
)
def test_fast_equals_reference(k: int, train: bool, dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(k)
    x = torch.randn(3, 96, 16, dtype=dtype)
    idx = knn(x, k)
    block = make_block(16, 24, dtype)
    (y_f, x_f, b_f), (y_r, x_r, b_r) = run_pair(x, idx, block, train)
    assert rel_err(y_f, y_r) < tol
    assert rel_err(x_f.grad, x_r.grad) < tol
    assert rel_err(b_f[0].weight.grad, b_r[0].weight.grad) < tol
    assert rel_err(b_f[1].weight.grad, b_r[1].weight.grad) < tol
    assert rel_err(b_f[1].bias.grad, b_r[1].bias.grad) < tol
    torch.testing.assert_close(b_f[1].running_mean, b_r[1].running_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(b_f[1].running_var, b_r[1].running_var, rtol=tol, atol=tol)
    assert int(b_f[1].num_batches_tracked) == int(b_r[1].num_batches_tracked)


def test_csr_and_gather_paths_equal_the_compiled_max(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the compiled max (no compiler) the CPU uses CSR products, off CPU gathers: same function and
    gradient on every path."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 8, dtype=torch.float64)
    idx = knn(x, 10)
    block = make_block(8, 12, torch.float64)
    (y_first, x_first, b_first), _ = run_pair(x, idx, copy.deepcopy(block), True)
    monkeypatch.setattr(NeighbourGraph, "_compiled_max", lambda self, a: False)
    (y_csr, x_csr, b_csr), _ = run_pair(x, idx, copy.deepcopy(block), True)
    monkeypatch.setattr(NeighbourGraph, "_sparse", lambda self, a: False)
    monkeypatch.setattr(NeighbourGraph, "_csr_max", lambda self, a: False)
    (y_gather, x_gather, b_gather), _ = run_pair(x, idx, copy.deepcopy(block), True)
    for y, xg, b in ((y_csr, x_csr, b_csr), (y_gather, x_gather, b_gather)):
        assert rel_err(y, y_first) < 1e-12
        assert rel_err(xg.grad, x_first.grad) < 1e-12
        assert rel_err(b[0].weight.grad, b_first[0].weight.grad) < 1e-12


def test_duplicate_points_give_reference_weight_gradients() -> None:
    """CrossPoint's input dropout replaces points by point 0: exact ties in the max must not double-count."""
    torch.manual_seed(1)
    x = torch.randn(2, 64, 3)
    x[:, 20:40] = x[:, :1]  # 21 copies of point 0
    idx = knn(x, 15)
    (y_f, _, b_f), (y_r, _, b_r) = run_pair(x, idx, make_block(3, 32, torch.float32), True)
    assert rel_err(y_f, y_r) < 1e-5
    assert rel_err(b_f[0].weight.grad, b_r[0].weight.grad) < 1e-5
    assert rel_err(b_f[1].weight.grad, b_r[1].weight.grad) < 1e-5


def test_knn_includes_self_and_is_nearest_first() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 50, 3)
    idx = knn(x, 6)
    assert idx.shape == (2, 50, 6)
    assert torch.equal(idx[:, :, 0], torch.arange(50).expand(2, 50))
    d = torch.cdist(x, x)
    brute = d.topk(6, largest=False).indices
    assert torch.equal(idx.sort(-1).values, brute.sort(-1).values)


def test_knn_chunking_does_not_change_neighbours() -> None:
    torch.manual_seed(3)
    x = torch.randn(5, 40, 8)
    assert torch.equal(knn(x, 7, max_elements=None), knn(x, 7, max_elements=40 * 40))


def test_knn_rejects_k_above_points() -> None:
    with pytest.raises(ValueError, match="k=9 neighbours"):
        knn(torch.randn(1, 8, 3), 9)


@pytest.mark.parametrize("path", ["compiled", "csr", "gather"])
def test_neighbour_reductions_equal_brute_force(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sum, transposed sum and max over the neighbours, and the max's backward, against dense loops."""
    if path == "compiled" and not kernels.available():
        pytest.skip("no C compiler here: the neighbour max runs on the CSR product")
    if path != "compiled":
        monkeypatch.setattr(NeighbourGraph, "_compiled_max", lambda self, a: False)
    if path == "gather":
        monkeypatch.setattr(NeighbourGraph, "_sparse", lambda self, a: False)
        monkeypatch.setattr(NeighbourGraph, "_csr_max", lambda self, a: False)
    torch.manual_seed(4)
    x = torch.randn(2, 30, 3, dtype=torch.float64)
    x[:, 10:14] = x[:, :1]  # exact ties in the max
    idx = knn(x, 6)
    graph = NeighbourGraph(idx)
    a = torch.randn(60, 5, dtype=torch.float64)
    a[10:14] = a[0]
    rows = [[int(j) + 30 * b for j in idx[b, i]] for b in range(2) for i in range(30)]
    torch.testing.assert_close(graph.sum(a), torch.stack([a[r].sum(0) for r in rows]))
    transposed = torch.zeros_like(a)
    for i, r in enumerate(rows):
        for j in r:
            transposed[j] += a[i]
    torch.testing.assert_close(graph.sum_t(a), transposed)
    values, send_back = graph.max_for_backward(a)
    torch.testing.assert_close(values, torch.stack([a[r].max(0).values for r in rows]))
    torch.testing.assert_close(graph.max(a), values)
    leaf = a.clone().requires_grad_()
    dense = torch.stack([leaf[r].max(0).values for r in rows])
    grad = torch.randn_like(dense)
    dense.backward(grad)
    da = send_back(grad)
    torch.testing.assert_close(da, leaf.grad)  # each max sends its gradient to one neighbour, ties included


def _edge_conv_run(x, idx, block, fast: bool, bf16: bool):
    block = copy.deepcopy(block).train()
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if fast:
            y = edge_conv_fast(xi, idx, block[0], block[1])
        else:
            y = edge_conv_reference(xi.transpose(1, 2), idx, block).transpose(1, 2)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    (y.float() * g).sum().backward()
    return {
        "y": y.float(), "x.grad": xi.grad, "W.grad": block[0].weight.grad, "gamma.grad": block[1].weight.grad,
        "beta.grad": block[1].bias.grad, "running_var": block[1].running_var,
    }  # fmt: skip


def test_bf16_autocast_is_as_close_to_fp32_as_autocast_on_the_reference() -> None:
    """Under CPU bf16 autocast the fused EdgeConv (statistics in fp32) is within bf16 rounding of fp32:
    no further from it than plain autocast over the straightforward implementation."""
    torch.manual_seed(5)
    x = torch.randn(4, 128, 16)
    idx = knn(x, 10)
    block = make_block(16, 32, torch.float32)
    exact = _edge_conv_run(x, idx, block, fast=False, bf16=False)
    fast = _edge_conv_run(x, idx, block, fast=True, bf16=True)
    ref = _edge_conv_run(x, idx, block, fast=False, bf16=True)
    assert fast["running_var"].dtype == torch.float32
    for name, value in exact.items():
        err_fast, err_ref = rel_err(fast[name], value), rel_err(ref[name], value)
        assert err_fast < 0.1, (name, err_fast)
        assert err_fast <= max(1.5 * err_ref, 1e-2), (name, err_fast, err_ref)


def test_recomputed_products_give_the_same_gradients_and_are_not_kept() -> None:
    """Backward recomputes [a | b] from x, not keeping it: identical results, 2·O values less per point."""
    torch.manual_seed(6)
    x = torch.randn(2, 80, 8)
    idx = knn(x, 10)
    block = make_block(8, 24, torch.float32)
    results = {}
    for recompute in (False, True):
        b = copy.deepcopy(block).train()
        xi = x.clone().requires_grad_()
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor, kept: dict[int, int] = kept) -> torch.Tensor:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = edge_conv_fast(xi, idx, b[0], b[1], recompute_products=recompute)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = (xi.grad, b[0].weight.grad, b[1].weight.grad, b[1].bias.grad)
        results[recompute] = (y, *grads, sum(kept.values()))
    for got, want in zip(results[True][:5], results[False][:5], strict=True):
        assert torch.equal(got, want)
    assert results[False][5] - results[True][5] == 2 * 80 * 2 * 24 * 4  # the [R, 2O] fp32 products
