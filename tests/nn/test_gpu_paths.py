"""The graph code that only a GPU runs, run on CPU: the chunked kNN, the chunked gathers for sums and
maxima, the gathered max's backward, the EdgeConv without the host-side sign check. Each is forced here
(:func:`crossmoco_ray.nn.graph.uses_cpu_paths` says no) with its chunk bounds shrunk so that every chunk
loop runs several times, and must compute what the CPU's compiled paths compute."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crossmoco_ray.nn import DGCNN, edgeconv, graph
from crossmoco_ray.nn.graph import knn


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls[func.name()] += 1
        return func(*args, **(kwargs or {}))


def gpu_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decision takes the GPU's branch; bounds of a few thousand elements, so loops repeat."""
    monkeypatch.setattr(graph, "uses_cpu_paths", lambda t: False)
    monkeypatch.setattr(edgeconv, "uses_cpu_paths", lambda t: False)
    monkeypatch.setitem(graph.KNN_MAX_ELEMENTS, "cpu", 2 * 48 * 48)  # 2 of the 5 clouds per chunk
    monkeypatch.setitem(graph.GATHER_MAX_ELEMENTS, "cpu", 4096)


def forward_backward(model: DGCNN, points: torch.Tensor, bf16: bool = False) -> dict[str, torch.Tensor]:
    x = points.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        z, feat = model(x)
    g = torch.randn(feat.shape, generator=torch.Generator().manual_seed(1), dtype=feat.dtype)
    (feat.float() * g.float()).sum().add(z.float().square().sum()).backward()
    out = {"feat": feat.detach().float(), "z": z.detach().float(), "x.grad": x.grad}
    out |= {f"{n}.grad": p.grad for n, p in model.named_parameters() if p.grad is not None}
    out |= {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    return out


def make(dtype: torch.dtype, mixed_signs: bool = True) -> tuple[DGCNN, torch.Tensor]:
    torch.manual_seed(0)
    model = DGCNN(k=6, emb_dims=32, head_hidden=16, proj_dim=8).to(dtype).train()
    with torch.no_grad():  # mixed-sign BatchNorm scales: the sign branch of the fused max runs on CPU too
        for bn in (model.bn1, model.bn2, model.bn3, model.bn4):
            bn.weight.uniform_(-1.0 if mixed_signs else 0.5, 1.0)
    # (no duplicate points: tied neighbours may be picked differently by the two paths, which moves
    # gradient between identical points; ties on each path are tested in test_edgeconv.py)
    return model, torch.randn(5, 48, 3, dtype=dtype)


@pytest.mark.parametrize("mixed_signs", [True, False], ids=["mixed-signs", "positive"])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=["fp64", "fp32"]
)
def test_the_gpu_branches_compute_what_the_cpu_kernels_compute(
    dtype: torch.dtype, tol: float, mixed_signs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(positive BatchNorm scales: the CPU skips the sign pass after reading them back; the GPU does not
    read, and multiplies by the signs)"""
    model, points = make(dtype, mixed_signs)
    cpu = forward_backward(copy.deepcopy(model), points)
    with monkeypatch.context() as m:
        gpu_paths(m)
        with OpCounter() as ops:
            gpu = forward_backward(copy.deepcopy(model), points)
    assert ops.calls["aten::bmm"] >= 4 * 3  # each layer's kNN in 3 chunks (2 + 2 + 1 clouds)
    assert ops.calls["aten::index_select"] > 4 * 4  # the gathers in several chunks per layer
    assert cpu.keys() == gpu.keys()
    for key, value in cpu.items():
        if key == "inv_head.0.bias.grad":  # feeds a BatchNorm: zero in exact arithmetic, rounding noise here
            assert float(gpu[key].abs().max()) < 1e3 * tol
            continue
        err = float((gpu[key] - value).norm() / value.norm())
        assert err < tol, (key, err)


def test_the_gpu_branches_under_bf16_autocast_stay_within_bf16_rounding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, points = make(torch.float32)
    fp32 = forward_backward(copy.deepcopy(model), points)
    cpu = forward_backward(copy.deepcopy(model), points, bf16=True)
    with monkeypatch.context() as m:
        gpu_paths(m)
        gpu = forward_backward(copy.deepcopy(model), points, bf16=True)
    for key in ("feat", "z", "x.grad", "conv1.0.weight.grad", "bn1.weight.grad", "inv_head.0.weight.grad"):
        err_cpu = float((cpu[key] - fp32[key]).norm() / fp32[key].norm())
        err_gpu = float((gpu[key] - fp32[key]).norm() / fp32[key].norm())
        assert err_gpu < max(3 * err_cpu, 0.02), (key, err_gpu, err_cpu)


def test_the_gpu_branches_in_eval_mode_with_running_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    model, points = make(torch.float64)
    forward_backward(model, points)  # running statistics that are not the initial ones
    model.eval()
    with torch.no_grad():
        cpu = model.forward_features(points)
        with monkeypatch.context() as m:
            gpu_paths(m)
            gpu = model.forward_features(points)
    torch.testing.assert_close(gpu, cpu, rtol=1e-10, atol=1e-12)


def test_the_chunked_knn_finds_the_kernels_neighbours(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    x = torch.randn(5, 48, 7)
    cpu = knn(x, 9, ordered=False)
    monkeypatch.setattr(graph, "uses_cpu_paths", lambda t: False)
    with OpCounter() as ops:
        chunked = knn(x, 9, max_elements=48 * 48, ordered=False)  # one cloud per chunk
    assert ops.calls["aten::bmm"] == 5
    assert torch.equal(chunked.sort(-1).values, cpu.sort(-1).values)
