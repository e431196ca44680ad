"""The training step: one optimisation step that learns, on CPU, without Ray."""

from __future__ import annotations

import copy

import pytest
import torch

from crossmoco_ray.nn import DGCNN, CrossMoCo, ImageEncoder
from crossmoco_ray.pretrain.step import prepare_model, train_step
from tests.helpers import tiny_batch, tiny_crossmoco


def test_step_updates_online_encoders_and_enqueues() -> None:
    torch.manual_seed(0)
    model = tiny_crossmoco(queue_length=16)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    q_before = [p.clone() for p in model.point_q.parameters()]
    k_before = [p.clone() for p in model.point_k.parameters()]
    out = train_step(model, tiny_batch(4), opt, momentum=0.5, grad_clip=1.0)
    assert set(out) >= {"loss", "loss_point", "loss_image", "loss_cross", "grad_norm"}
    assert not out["loss"].requires_grad
    assert any(not torch.equal(a, b) for a, b in zip(q_before, model.point_q.parameters(), strict=True))
    assert int(model.queue.ptr) == 4
    # the key encoder starts as a copy of the online one, so it moves from the second step on
    assert all(torch.equal(a, b) for a, b in zip(k_before, model.point_k.parameters(), strict=True))
    train_step(model, tiny_batch(4, seed=1), opt, momentum=0.5)
    assert any(not torch.equal(a, b) for a, b in zip(k_before, model.point_k.parameters(), strict=True))


def test_repeated_steps_lower_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = tiny_crossmoco(queue_length=16)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = tiny_batch(8)
    losses = [float(train_step(model, batch, opt, momentum=0.9)["loss_cross"]) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_pipelines_uint8_images_train_as_the_same_images_converted_first(channels_last: bool) -> None:
    """The views stay bytes until the image encoders (so shuffle-BN gathers bytes): the step is the same
    as on the float images converted beforehand, losses, updated weights and queues."""
    from crossmoco_ray.nn.image import images_to_tensor

    batch = tiny_batch(4)
    raw = torch.randint(
        0, 256, (4, 2, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    results = []
    for images in (raw, images_to_tensor(raw)):
        torch.manual_seed(0)
        model = prepare_model(tiny_crossmoco(queue_length=16), torch.device("cpu"), channels_last)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        out = train_step(model, {**batch, "images": images}, opt, momentum=0.9, channels_last=channels_last)
        results.append((out, model.state_dict()))
    (out_u8, state_u8), (out_f, state_f) = results
    for key in ("loss", "loss_point", "loss_image", "loss_cross"):
        torch.testing.assert_close(out_u8[key], out_f[key], rtol=1e-5, atol=1e-6)
    for key, value in state_f.items():
        torch.testing.assert_close(state_u8[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_lr_schedules() -> None:
    import math

    from crossmoco_ray.config.loading import load_config
    from crossmoco_ray.pretrain.optim import lr_at, momentum_at

    paper = load_config("paper", overrides=["train.epochs=4"])
    # CrossPoint: CosineAnnealingLR(T_max=4) stepped at each epoch start → epoch e at step e + 1
    assert [round(lr_at(paper, e), 8) for e in range(4)] == [
        round(1e-3 * 0.5 * (1 + math.cos(math.pi * (e + 1) / 4)), 8) for e in range(4)
    ]
    assert lr_at(paper, 3) == 0.0
    smooth = load_config("paper", overrides=["train.epochs=4", "optim.schedule=cosine_smooth"])
    assert lr_at(smooth, 0, 0.0) == 1e-3
    assert lr_at(smooth, 2, 0.0) == 1e-3 * 0.5
    assert lr_at(smooth, 3, 0.99) > 0
    warm = load_config("paper", overrides=["train.epochs=4", "optim.warmup_epochs=2"])
    assert lr_at(warm, 0) == 0.5e-3
    assert lr_at(warm, 1) == 1e-3
    cos_m = load_config("paper", overrides=["objective.momentum_schedule=cosine", "objective.momentum=0.99"])
    assert momentum_at(cos_m, 0, 100) == 0.99
    assert momentum_at(cos_m, 100, 100) == 1.0
    assert momentum_at(paper, 50, 100) == 0.9999


def _losses_and_grads(model: torch.nn.Module, batch: dict, bf16: bool) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(batch["points1"], batch["points2"], batch["images"], momentum=0.99, enqueue=False)
    out["loss"].backward()
    grads = {
        name: torch.cat([p.grad.flatten() for p in getattr(model, name).parameters() if p.grad is not None])
        for name in ("point_q", "image_q")
    }
    return {k: float(out[k].detach()) for k in ("loss", "loss_point", "loss_image", "loss_cross")}, grads


def test_bf16_step_losses_and_gradients_are_close_to_fp32() -> None:
    """One CrossMoCo step under CPU bf16 autocast: losses within a few % of fp32, gradients pointing the same
    way and as long, and the fast DGCNN no further from fp32 than plain autocast over the reference one.

    (bf16 on a freshly initialised network moves single-step gradients visibly: argmax choices in the
    neighbour max and BatchNorm over small batches amplify rounding; hence the comparison with the
    reference under the same autocast.)"""
    torch.manual_seed(0)
    point = DGCNN(k=10, emb_dims=128, head_hidden=128, proj_dim=32)
    model = CrossMoCo(point, ImageEncoder("resnet18", proj_dim=32, head_hidden=64), queue_length=64, dim=32)
    batch = tiny_batch(16, points=256, size=32, seed=3)
    state = copy.deepcopy(model.state_dict())
    runs = {}
    for edgeconv, bf16 in (("fast", False), ("fast", True), ("reference", True)):
        model.point_q.edgeconv = model.point_k.edgeconv = edgeconv
        model.load_state_dict(state)
        runs[edgeconv, bf16] = _losses_and_grads(model.train(), batch, bf16)
    (losses32, grads32), (losses16, grads16) = runs["fast", False], runs["fast", True]
    assert abs(losses16["loss"] - losses32["loss"]) <= 0.03 * losses32["loss"]
    for name, value in losses32.items():
        assert abs(losses16[name] - value) <= 0.12 * abs(value), (name, losses16[name], value)
    for name, g32 in grads32.items():
        cosine = float(torch.nn.functional.cosine_similarity(grads16[name], g32, dim=0))
        ref = float(torch.nn.functional.cosine_similarity(runs["reference", True][1][name], g32, dim=0))
        assert cosine >= min(0.6, ref - 0.1), (name, cosine, ref)
        assert abs(float(grads16[name].norm() / g32.norm()) - 1) < 0.1, name


def test_prepare_model_makes_only_the_image_encoders_channels_last() -> None:
    model = prepare_model(tiny_crossmoco(), torch.device("cpu"), channels_last=True)
    conv = model.image_q.resnet.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not conv.is_contiguous()
    assert model.image_k.resnet.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.point_q.conv1[0].weight.is_contiguous()


def test_a_step_runs_under_deterministic_kernels_only() -> None:
    """train.deterministic=true refuses any op without a deterministic kernel: the CPU step has none (the
    CUDA step's ops are checked in test_gpu_path.py)."""
    from crossmoco_ray.nn.precision import configure_kernels

    torch.manual_seed(0)
    model = tiny_crossmoco(queue_length=16)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = tiny_batch(4)
    batch["images"] = torch.randint(0, 256, (4, 2, 16, 16, 3), dtype=torch.uint8)
    try:
        configure_kernels(tf32=False, deterministic=True)
        out = train_step(model, batch, opt, momentum=0.9, grad_clip=1.0)
    finally:
        configure_kernels(tf32=False, deterministic=False)
    assert torch.isfinite(out["loss"])
