"""SyncBN (``model.sync_bn``) across 2 gloo processes on CPU, against plain BatchNorm on the global batch.

torch's SyncBatchNorm runs only on GPUs: its forward refuses CPU tensors and its five statistics kernels
(``batch_norm_stats`` ... ``batch_norm_backward_elemt``) have CUDA implementations only. Here each worker
gives those kernels CPU implementations written from their definitions and lets the device checks pass,
so that torch's own SyncBatchNorm (its collectives, its autograd function) runs in our encoders as
converted by :func:`crossmoco_ray.nn.convert_sync_batchnorm`, under DDP as the workers wrap it: channels-
last views, the image trunk's activation checkpointing (whose recompute in backward issues SyncBN's
collectives again) and bf16 autocast. What only a GPU can show (the CUDA kernels, NCCL) is in
bench/gpu_check.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from crossmoco_ray.nn import DGCNN, ImageEncoder, convert_sync_batchnorm
from crossmoco_ray.runs.ddp import all_ranks, wrap_ddp
from tests.helpers import run_gloo_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

WORLD, LOCAL = 2, 3


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _dims(x: torch.Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def _shape(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def register_cpu_sync_bn() -> None:
    """CPU kernels for SyncBatchNorm's statistics ops, as the CUDA ones define them (fp32 statistics for
    bf16 input), and SyncBatchNorm's device check satisfied."""
    lib = torch.library.Library("aten", "IMPL")

    def stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        xf = x.to(_acc(x))
        return xf.mean(_dims(x)), torch.rsqrt(xf.var(_dims(x), unbiased=False) + eps)

    def gather(x, mean, invstd, running_mean, running_var, momentum, eps, counts):  # type: ignore[no-untyped-def]
        counts = counts.to(mean.dtype).view(-1, 1)
        n = counts.sum()
        g_mean = (counts * mean).sum(0) / n
        var = ((invstd.pow(-2) - eps) + (mean - g_mean).square()) * counts
        g_var = var.sum(0) / n
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(g_mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = g_var * n / (n - 1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        return g_mean, torch.rsqrt(g_var + eps)

    def elemt(x, weight, bias, mean, invstd, eps):  # type: ignore[no-untyped-def]
        y = (x.to(mean.dtype) - _shape(mean, x)) * _shape(invstd, x)
        if weight is not None:
            y = y * _shape(weight.to(mean.dtype), x)
        if bias is not None:
            y = y + _shape(bias.to(mean.dtype), x)
        return y.to(x.dtype)

    def backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):  # type: ignore[no-untyped-def]
        dyf, xmu = dy.to(mean.dtype), x.to(mean.dtype) - _shape(mean, x)
        sum_dy, sum_dy_xmu = dyf.sum(_dims(x)), (dyf * xmu).sum(_dims(x))
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None else torch.empty(0)
        grad_bias = sum_dy.to(weight.dtype) if weight is not None else torch.empty(0)
        return sum_dy, sum_dy_xmu, grad_weight, grad_bias

    def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):  # type: ignore[no-untyped-def]
        n = count.sum().to(mean.dtype)
        xmu = x.to(mean.dtype) - _shape(mean, x)
        scale = _shape(invstd, x) * (_shape(weight.to(mean.dtype), x) if weight is not None else 1.0)
        dx = dy.to(mean.dtype) - _shape(sum_dy / n, x) - xmu * _shape(invstd.square() * sum_dy_xmu / n, x)
        return (dx * scale).to(x.dtype)

    for name, fn in (
        ("batch_norm_stats", stats),
        ("batch_norm_gather_stats_with_counts", gather),
        ("batch_norm_elemt", elemt),
        ("batch_norm_backward_reduce", backward_reduce),
        ("batch_norm_backward_elemt", backward_elemt),
    ):
        lib.impl(name, fn, "CPU")
    register_cpu_sync_bn.lib = lib  # type: ignore[attr-defined]  # (kept alive)
    DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None  # DDP's check
    forward = torch.nn.SyncBatchNorm.forward

    def forward_on_cpu(self: torch.nn.SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
        backend = torch._C._get_privateuse1_backend_name  # SyncBatchNorm's check for a GPU accepts it
        torch._C._get_privateuse1_backend_name = lambda: "cpu"
        try:
            return forward(self, x)
        finally:
            torch._C._get_privateuse1_backend_name = backend

    torch.nn.SyncBatchNorm.forward = forward_on_cpu  # type: ignore[method-assign]


class Encoders(torch.nn.Module):
    """The online encoders of a tiny CrossMoCo: a DGCNN and a channels-last ResNet, its trunk checkpointed."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.point = DGCNN(k=4, emb_dims=16, head_hidden=16, proj_dim=8).to(dtype).train()
        self.image = ImageEncoder("resnet18", proj_dim=8, head_hidden=16, checkpoint_trunk=True).to(dtype)
        self.image.train().to(memory_format=torch.channels_last)

    def forward(self, points: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.point(points)[0], self.image(images)[0]


def global_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    points = torch.randn(WORLD * LOCAL, 32, 3, generator=g, dtype=dtype)
    images = torch.randint(0, 256, (WORLD * LOCAL, 32, 32, 3), generator=g, dtype=torch.uint8)
    weights = (
        torch.randn(WORLD * LOCAL, 8, generator=g, dtype=dtype),
        torch.randn(WORLD * LOCAL, 8, generator=g),
    )
    return points, images, weights[0], weights[1].to(dtype)


def loss(net: torch.nn.Module, rows: slice, dtype: torch.dtype, bf16: bool) -> torch.Tensor:
    """Mean over this part of the global batch of fixed projections of both encoders' outputs."""
    points, images, wp, wi = global_batch(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        zp, zi = net(points[rows], images[rows])
    return ((zp.to(dtype) * wp[rows]).sum() + (zi.to(dtype) * wi[rows]).sum()) / (rows.stop - rows.start)


def run_single(dtype: torch.dtype, bf16: bool) -> dict[str, torch.Tensor]:
    model = Encoders(dtype)
    loss(model, slice(0, WORLD * LOCAL), dtype, bf16).backward()
    return state_and_grads(model)


def state_and_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {k: v.detach().clone() for k, v in model.state_dict().items() if "running" in k}
    return out | {k + ".grad": p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _worker(r: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    register_cpu_sync_bn()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD)
    results: dict[str, Any] = {
        "all_ranks": (all_ranks(r == 1, torch.device("cpu")), all_ranks(True, torch.device("cpu")))
    }
    for dtype, bf16 in ((torch.float64, False), (torch.float32, True)):
        model = Encoders(dtype)
        model.point, model.image = convert_sync_batchnorm(model.point), convert_sync_batchnorm(model.image)
        kinds = {type(m).__name__ for m in model.modules()}
        net = wrap_ddp(model, torch.device("cpu"), WORLD)  # as the workers wrap it
        loss(net, slice(r * LOCAL, (r + 1) * LOCAL), dtype, bf16).backward()
        results[str(bf16)] = (state_and_grads(model), kinds)
    torch.save(results, Path(out_dir) / f"rank{r}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("syncbn")
    return run_gloo_ranks(_worker, WORLD, out)


def test_sync_bn_across_two_processes_equals_batchnorm_on_the_global_batch(
    ranks: list[dict[str, Any]],
) -> None:
    single = run_single(torch.float64, bf16=False)
    for rank in ranks:
        got, kinds = rank["False"]
        assert "SyncBatchNorm" in kinds
        assert not kinds & {"BatchNorm1d", "BatchNorm2d"}
        assert got.keys() == single.keys()
        for key, value in single.items():
            torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-11, msg=key)


def test_sync_bn_runs_under_bf16_autocast_within_its_rounding(ranks: list[dict[str, Any]]) -> None:
    """bf16 gradients of so small a model are far from fp32 ones (tens of percent); across 2 processes
    with SyncBN they are as far as one process with BatchNorm gets, not more."""
    fp32 = run_single(torch.float32, bf16=False)
    one_process = run_single(torch.float32, bf16=True)
    got, _ = ranks[0]["True"]
    assert all(torch.isfinite(v).all() for v in got.values())
    for key in (
        "point.conv1.0.weight.grad",
        "image.resnet.conv1.weight.grad",
        "image.inv_head.0.weight.grad",
    ):
        err = float((got[key] - fp32[key]).norm() / fp32[key].norm())
        err_one = float((one_process[key] - fp32[key]).norm() / fp32[key].norm())
        assert err < 2 * err_one + 0.02, (key, err, err_one)


def test_all_ranks_agree_on_a_flag(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["all_ranks"] == ranks[1]["all_ranks"] == (False, True)
