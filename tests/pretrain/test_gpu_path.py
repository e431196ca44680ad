"""The GPU path without a GPU: the training step on fake CUDA tensors (tests/fake_cuda.py), as configured
for a GPU run (fused optimizer, channels-last, bf16 autocast, two ranks through a fake process group).

It proves what a CPU can about the CUDA step: it completes (forward, backward, optimizer step, momentum
update, gathers and enqueue), it never reads a value back to the host or copies from host memory, its
losses and logits are fp32 under bf16 autocast, and none of its ops lacks a deterministic CUDA kernel.
What it cannot show (speed, numerics of the CUDA kernels, NCCL) is measured by bench/gpu_check.py.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import DynamicOutputShapeException

from crossmoco_ray.architecture import build_model
from crossmoco_ray.config.loading import load_config
from crossmoco_ray.pretrain.console import EpochMeter
from crossmoco_ray.pretrain.optim import build_optimizer
from crossmoco_ray.pretrain.step import prepare_model, train_step
from tests.fake_cuda import DeviceWatch, backward, fake_cuda, h100, to_fake_cuda
from tests.helpers import tiny_batch, tiny_crossmoco

CUDA = torch.device("cuda", 0)
PER_RANK = 4
# The loop's named reads of the device, once per log window or checkpoint: nothing else may read.
NAMED_READS = (
    "pretrain/console.py:take_window",
    "pretrain/console.py:loss_finite",
    "pretrain/console.py:epoch_summary",
)
# Ops that torch.use_deterministic_algorithms(True) refuses on CUDA (no deterministic kernel): with
# train.deterministic=true a GPU run would stop at the first one (torch's docs list them).
NO_DETERMINISTIC_CUDA_KERNEL = {
    "aten::_adaptive_avg_pool2d_backward",
    "aten::adaptive_max_pool2d_backward",
    "aten::avg_pool3d_backward",
    "aten::_adaptive_avg_pool3d_backward",
    "aten::fractional_max_pool2d_backward",
    "aten::max_unpool2d",
    "aten::upsample_bilinear2d_backward",
    "aten::upsample_bicubic2d_backward",
    "aten::upsample_linear1d_backward",
    "aten::reflection_pad1d_backward",
    "aten::reflection_pad2d_backward",
    "aten::nll_loss2d_forward",
    "aten::histc",
    "aten::median.dim",
    "aten::kthvalue",
    "aten::grid_sampler_2d_backward",
    "aten::put_",
    "aten::_embedding_bag_backward",
    "aten::ctc_loss",
}


@contextlib.contextmanager
def process_group(world: int) -> Iterator[None]:
    """A fake process group of ``world`` ranks, this process being the last (collectives return at once)."""
    if world == 1:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=world - 1, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def gpu_config(world: int, precision: str) -> Any:
    return load_config(
        "quickstart",
        overrides=[
            "model.k=4", "model.emb_dims=16", "model.point_head_hidden=16", "model.image_encoder=resnet18",
            "model.image_head_hidden=16", "model.proj_dim=8",
            f"objective.queue_length={4 * PER_RANK * world}",
            f"train.num_workers={world}", f"train.batch_size_per_worker={PER_RANK}", "train.batch_size=null",
            "train.use_gpu=true", f"train.precision={precision}", "train.channels_last=true",
            "optim.grad_clip=1.0", "data.num_points=24",
        ],
    )  # fmt: skip


def cuda_batch() -> dict[str, torch.Tensor]:
    batch = {k: v.to(CUDA) for k, v in tiny_batch(PER_RANK).items()}
    batch["images"] = torch.zeros(PER_RANK, 2, 16, 16, 3, dtype=torch.uint8, device=CUDA)  # as the pipeline's
    batch["label"] = torch.zeros(PER_RANK, dtype=torch.int64, device=CUDA)
    return batch


def run_fake_steps(world: int, precision: str, steps: int = 2) -> tuple[DeviceWatch, DeviceWatch, Any]:
    """``steps`` training steps on fake CUDA (watched), then the loop's reads of a window (watched)."""
    cfg = gpu_config(world, precision)
    torch.manual_seed(0)
    model = prepare_model(build_model(cfg), torch.device("cpu"), channels_last=True)
    with process_group(world), fake_cuda() as mode:
        model = to_fake_cuda(model, mode)
        optimizer = build_optimizer(cfg, model)
        batch, meter = cuda_batch(), EpochMeter(cfg.global_batch)
        with h100(), DeviceWatch() as in_steps:
            for _ in range(steps):
                out = train_step(
                    model, batch, optimizer, 0.99, precision=precision, grad_clip=1.0, channels_last=True
                )
                meter.add(out, 0.0, batch["label"])
        with h100(), DeviceWatch() as at_window:
            assert meter.loss_finite()
            meter.take_window()
            meter.epoch_summary()
        return in_steps, at_window, out


@pytest.mark.parametrize(("world", "precision"), [(1, "fp32"), (2, "bf16")])
def test_the_cuda_step_completes_without_reading_from_the_device(world: int, precision: str) -> None:
    in_steps, at_window, out = run_fake_steps(world, precision)
    assert in_steps.reads == [], "the step waits for the GPU here:\n" + "\n".join(in_steps.reads)
    assert in_steps.uploads == [], f"copies from host memory in the step: {in_steps.uploads}"
    assert out["loss"].device == CUDA
    # the whole step ran on the device: momentum update, enqueue, fused optimizer
    for op in ("aten::_foreach_mul_.Scalar", "aten::index_copy_", "aten::_fused_adam_"):
        assert any(name.startswith(op.split(".")[0]) for name in in_steps.ops), op
    if world > 1:  # shuffle-BN, the cross-modal negatives and the queues' keys crossed the ranks
        collectives = {name for name in in_steps.ops if name.startswith("c10d::")}
        assert {"c10d::allgather_", "c10d::broadcast_", "c10d::allreduce_"} <= collectives, collectives
    # the loop reads the device where it says it does, and there only
    assert at_window.reads, "the window's means were never read: the test would not see a read"
    unnamed = [read for read in at_window.reads if not any(f"{name}:" in read for name in NAMED_READS)]
    assert not unnamed, unnamed


def test_under_bf16_autocast_the_encoders_run_bf16_and_the_losses_fp32() -> None:
    in_steps, _, out = run_fake_steps(1, "bf16", steps=1)
    assert "bfloat16" in in_steps.dtypes_of("aten::convolution")  # autocast really ran on CUDA
    assert in_steps.dtypes_of("aten::_log_softmax") == {"float32"}  # every cross-entropy's logits
    assert in_steps.dtypes_of("aten::argmax") == {"float32"}  # the top-1 diagnostics read them too
    for key in ("loss", "loss_point", "loss_image", "loss_cross", "point_top1", "cross_top1"):
        assert out[key].dtype == torch.float32, key


def test_no_op_of_the_cuda_step_lacks_a_deterministic_kernel() -> None:
    """train.deterministic=true turns on torch.use_deterministic_algorithms(True), which stops at any op
    without a deterministic CUDA kernel: the step has none (ResNet's 1×1 average pool is a mean on CUDA)."""
    in_steps, _, _ = run_fake_steps(2, "bf16", steps=1)
    ran = set(in_steps.ops) | {name.split(".")[0] for name in in_steps.ops}
    assert not ran & NO_DETERMINISTIC_CUDA_KERNEL, ran & NO_DETERMINISTIC_CUDA_KERNEL


def test_the_test_backward_equals_torchs_engine() -> None:
    """tests/fake_cuda.backward (no autograd engine) gives the engine's gradients, on a real CPU model."""
    torch.manual_seed(0)
    model = tiny_crossmoco(queue_length=16).double()
    twin = copy.deepcopy(model)
    batch = tiny_batch(4, dtype=torch.float64)
    for net, run in ((model, torch.Tensor.backward), (twin, backward)):
        torch.manual_seed(1)
        run(net(batch["points1"], batch["points2"], batch["images"], momentum=0.9)["loss"])
    pairs = zip(model.named_parameters(), twin.named_parameters(), strict=True)
    checked = 0
    for (name, a), (_, b) in pairs:
        if a.grad is None:
            assert b.grad is None, name
            continue
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)
        checked += 1
    assert checked > 50


def test_a_read_in_the_step_is_found() -> None:
    """The watch is not blind: a step that reads its loss back (as the loop once did) is caught."""
    with fake_cuda():
        loss = torch.randn(3, device=CUDA).sum()
        with h100(), DeviceWatch() as watch:
            float(loss)
            with pytest.raises(DynamicOutputShapeException):  # no size to give: the run stops there
                torch.unique(torch.zeros(4, device=CUDA))
            torch.randn(3).to(CUDA)
    assert len(watch.reads) == 2
    assert len(watch.uploads) == 1
