"""The CrossMoCo module: named losses, MoCo's order, momentum update, persistence."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from crossmoco_ray.nn import info_nce, nt_xent
from tests.helpers import tiny_batch, tiny_crossmoco


def test_forward_returns_named_losses_and_diagnostics() -> None:
    torch.manual_seed(0)
    model = tiny_crossmoco()
    b = tiny_batch(4)
    out = model(b["points1"], b["points2"], b["images"], momentum=0.99)
    for name in ("loss", "loss_point", "loss_image", "loss_cross"):
        assert out[name].requires_grad, name
    torch.testing.assert_close(out["loss"], out["loss_point"] + out["loss_image"] + out["loss_cross"])
    for name in ("point", "image"):
        assert 0.0 <= float(out[f"{name}_top1"]) <= 1.0
        assert -1.0 <= float(out[f"{name}_pos_sim"]) <= 1.0
        assert not out[f"{name}_neg_sim"].requires_grad
    out["loss"].backward()
    assert all(p.grad is not None for p in model.point_q.parameters())
    assert all(p.grad is not None for p in model.image_q.parameters())
    assert all(not p.requires_grad for p in (*model.point_k.parameters(), *model.image_k.parameters()))


def test_losses_follow_moco_order() -> None:
    """Momentum update first, then keys; logits against the queue *before* this step's keys are added."""
    torch.manual_seed(0)
    model = tiny_crossmoco().eval()  # eval: per-sample BatchNorm, so keys can be recomputed exactly
    b = tiny_batch(4)
    before = copy.deepcopy(model)
    out = model(b["points1"], b["points2"], b["images"], momentum=0.9)

    before.momentum_update(0.9)
    with torch.no_grad():
        k_point = F.normalize(before.point_k(b["points2"])[0], dim=1)
        k_image = F.normalize(before.image_k(b["images"][:, 1])[0], dim=1)
    z_point, z_image = before.point_q(b["points1"])[0], before.image_q(b["images"][:, 0])[0]
    q_point, q_image = F.normalize(z_point, dim=1), F.normalize(z_image, dim=1)
    loss_point, _ = info_nce(q_point, k_point, before.queue["point"], 0.1)
    loss_image, _ = info_nce(q_image, k_image, before.queue["image"], 0.1)
    torch.testing.assert_close(out["loss_point"], loss_point)
    torch.testing.assert_close(out["loss_image"], loss_image)
    torch.testing.assert_close(out["loss_cross"], nt_xent(z_point, z_image, 0.1))
    # the keys went into the queues at the old pointer, and the pointer moved by the batch
    torch.testing.assert_close(model.queue["point"][:4], k_point)
    torch.testing.assert_close(model.queue["image"][:4], k_image)
    assert int(model.queue.ptr) == 4


def test_multi_view_image_key_is_the_mean_of_key_views() -> None:
    torch.manual_seed(0)
    model = tiny_crossmoco().eval()
    b = tiny_batch(4, views=3)
    reference = copy.deepcopy(model)
    model(b["points1"], b["points2"], b["images"], momentum=0.5)
    reference.momentum_update(0.5)
    with torch.no_grad():
        keys = [F.normalize(reference.image_k(b["images"][:, v])[0], dim=1) for v in (1, 2)]
    # mean of unit vectors, not re-normalised (original code)
    torch.testing.assert_close(model.queue["image"][:4], (keys[0] + keys[1]) / 2)


def test_momentum_update_matches_its_formula() -> None:
    torch.manual_seed(0)
    model = tiny_crossmoco()
    with torch.no_grad():
        for p in model.point_q.parameters():
            p.add_(torch.randn_like(p))
    k_old = [p.clone() for p in model.point_k.parameters()]
    model.momentum_update(0.75)
    for p_k, p_old, p_q in zip(model.point_k.parameters(), k_old, model.point_q.parameters(), strict=True):
        torch.testing.assert_close(p_k, 0.75 * p_old + 0.25 * p_q)
    # BatchNorm running statistics are not averaged (parameters only)
    assert torch.equal(model.point_k.bn1.running_mean, torch.zeros(64))


def test_state_dict_round_trip_keeps_queues_and_pointer() -> None:
    torch.manual_seed(0)
    model = tiny_crossmoco()
    b = tiny_batch(4)
    model(b["points1"], b["points2"], b["images"], momentum=0.9)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert "queue.keys" in state
    assert "queue.ptr" in state
    torch.manual_seed(123)  # a different initialisation, overwritten by the load
    restored = tiny_crossmoco()
    restored.load_state_dict(state)
    for (name, a), b_ in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b_), name
    model.eval()
    restored.eval()
    out_a = model(b["points1"], b["points2"], b["images"], momentum=0.9)
    out_b = restored(b["points1"], b["points2"], b["images"], momentum=0.9)
    assert torch.equal(out_a["loss"], out_b["loss"])


def test_needs_two_views() -> None:
    model = tiny_crossmoco()
    b = tiny_batch(4, views=1)
    with pytest.raises(ValueError, match="at least 2 rendered views"):
        model(b["points1"], b["points2"], b["images"], momentum=0.9)
