"""Distributed maths proven on CPU: 2 gloo processes (torch.multiprocessing, no Ray) against one process.

One spawn runs every check (process start-up dominates the cost); each test asserts one property.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from crossmoco_ray.nn import MemoryQueue, batch_shuffle, batch_unshuffle, nt_xent
from crossmoco_ray.pretrain.step import train_step
from crossmoco_ray.runs.ddp import wrap_ddp
from tests.helpers import run_gloo_ranks, tiny_batch, tiny_crossmoco

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

WORLD = 2
LOCAL = 3  # per-rank batch of the queue / loss checks
QUEUE_STEPS = 5  # 5 × 6 keys > 24 slots: the queue wraps
RESIZED_STEPS = 3  # steps of 2 ranks after the one-worker stretch
MODEL_LOCAL = 2  # per-rank batch of the whole-model check
MODEL_STEPS = 3


def rank_keys(step: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + r)
    return torch.randn(LOCAL, 4, generator=g), torch.randn(LOCAL, 4, generator=g)


def global_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    shape = (WORLD * LOCAL, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(
        shape, generator=g, dtype=torch.float64
    )


def model_batches() -> list[dict[str, torch.Tensor]]:
    return [tiny_batch(WORLD * MODEL_LOCAL, seed=s, dtype=torch.float64) for s in range(MODEL_STEPS)]


def make_model() -> torch.nn.Module:
    # eval mode: BatchNorm uses running statistics, so a sample's output does not depend on which
    # worker's sub-batch it sits in and the distributed run must equal one process on the global batch
    torch.manual_seed(0)
    return tiny_crossmoco(queue_length=WORLD * MODEL_LOCAL * 4, shuffle_bn=True).double().eval()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)


def one_worker_stretch() -> MemoryQueue:
    """What an elastic run leaves after 2 steps at 2 workers and 2 at 1 (5 keys each): pointer 22."""
    torch.manual_seed(0)
    queue = MemoryQueue(length=24, dim=4, names=("point", "image"))
    for step in range(2):
        keys = [rank_keys(step, r) for r in range(WORLD)]
        queue.enqueue(torch.cat([k[0] for k in keys]), torch.cat([k[1] for k in keys]))
    for step in range(2):
        g = torch.Generator().manual_seed(500 + step)
        queue.enqueue(torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g))
    return queue


def _worker(r: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD)
    results: dict[str, Any] = {}

    # 1. queue: every rank enqueues its own keys; the gathered rows land in rank order
    torch.manual_seed(0)
    queue = MemoryQueue(length=24, dim=4, names=("point", "image"))
    for step in range(QUEUE_STEPS):
        queue.enqueue(*rank_keys(step, r))
    results["queue"] = queue.state_dict()

    # 1b. after a resize: the state a one-worker stretch left (not at a batch boundary of this size);
    # both ranks go on from it with global batches of 6 that wrap around the end of the ring
    resized = MemoryQueue(length=24, dim=4, names=("point", "image"))
    resized.load_state_dict(torch.load(Path(out_dir) / "resized.pt"))
    for step in range(RESIZED_STEPS):
        resized.enqueue(*rank_keys(100 + step, r))
    results["resized"] = resized.state_dict()

    # 2. NT-Xent with global negatives: loss and gradients of this rank's slice
    z0_all, z1_all = global_embeddings()
    z0 = z0_all[r * LOCAL : (r + 1) * LOCAL].clone().requires_grad_()
    z1 = z1_all[r * LOCAL : (r + 1) * LOCAL].clone().requires_grad_()
    loss = nt_xent(z0, z1, 0.1, gather_distributed=True)
    loss.backward()
    results["nt_xent"] = (loss.detach(), z0.grad, z1.grad)

    # 3. shuffle-BN: a permutation of the global batch, undone by the unshuffle
    x = torch.arange(r * 4, r * 4 + 4, dtype=torch.float64).unsqueeze(1)
    shuffled, idx_unshuffle = batch_shuffle(x)
    results["shuffle"] = (shuffled, batch_unshuffle(shuffled * 10, idx_unshuffle), idx_unshuffle)

    # 4. the whole model under DDP (queues not broadcast), a few optimisation steps
    model = make_model()
    ddp = wrap_ddp(model, torch.device("cpu"), WORLD)  # as the workers wrap it: bucket views, no re-sync
    opt = make_optimizer(model)
    losses = []
    for batch in model_batches():
        local = {k: v[r * MODEL_LOCAL : (r + 1) * MODEL_LOCAL] for k, v in batch.items()}
        out = train_step(ddp, local, opt, momentum=0.9)
        losses.append({k: out[k] for k in ("loss", "loss_point", "loss_image", "loss_cross")})
    results["model"] = (losses, model.state_dict())

    torch.save(results, Path(out_dir) / f"rank{r}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dist")
    torch.save(one_worker_stretch().state_dict(), out / "resized.pt")
    return run_gloo_ranks(_worker, WORLD, out)


def test_queues_are_bitwise_equal_across_ranks(ranks: list[dict[str, Any]]) -> None:
    a, b = ranks[0]["queue"], ranks[1]["queue"]
    assert torch.equal(a["keys"], b["keys"])
    assert int(a["ptr"]) == int(b["ptr"]) == (QUEUE_STEPS * WORLD * LOCAL) % 24


def test_queues_equal_one_process_fed_the_concatenated_keys(ranks: list[dict[str, Any]]) -> None:
    torch.manual_seed(0)
    single = MemoryQueue(length=24, dim=4, names=("point", "image"))
    for step in range(QUEUE_STEPS):
        keys = [rank_keys(step, r) for r in range(WORLD)]
        single.enqueue(torch.cat([k[0] for k in keys]), torch.cat([k[1] for k in keys]))
    assert torch.equal(ranks[0]["queue"]["keys"], single.keys)
    assert int(ranks[0]["queue"]["ptr"]) == int(single.ptr)


def test_after_a_resize_queues_stay_identical_and_equal_one_process(ranks: list[dict[str, Any]]) -> None:
    """2 workers → 1 → 2 (an elastic run): from the one-worker stretch's state (pointer 22 of 24), both
    ranks write the gathered batches of 6 around the end of the ring, bitwise alike and as one process."""
    a, b = ranks[0]["resized"], ranks[1]["resized"]
    assert torch.equal(a["keys"], b["keys"])
    single = one_worker_stretch()
    assert int(single.ptr) == 22
    for step in range(RESIZED_STEPS):
        keys = [rank_keys(100 + step, r) for r in range(WORLD)]
        single.enqueue(torch.cat([k[0] for k in keys]), torch.cat([k[1] for k in keys]))
    assert torch.equal(a["keys"], single.keys)
    assert int(a["ptr"]) == int(b["ptr"]) == (22 + RESIZED_STEPS * WORLD * LOCAL) % 24


def test_cross_modal_loss_with_global_negatives_equals_one_process(ranks: list[dict[str, Any]]) -> None:
    z0_all, z1_all = global_embeddings()
    z0, z1 = z0_all.clone().requires_grad_(), z1_all.clone().requires_grad_()
    loss = nt_xent(z0, z1, 0.1)
    loss.backward()
    # DDP averages over ranks: the mean of the rank losses and (rank gradient / world) are the targets
    mean_loss = sum(float(r["nt_xent"][0]) for r in ranks) / WORLD
    assert mean_loss == pytest.approx(float(loss.detach()), rel=1e-12)
    for r, res in enumerate(ranks):
        rows = slice(r * LOCAL, (r + 1) * LOCAL)
        torch.testing.assert_close(res["nt_xent"][1] / WORLD, z0.grad[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res["nt_xent"][2] / WORLD, z1.grad[rows], rtol=1e-10, atol=1e-12)


def test_shuffle_bn_permutes_the_global_batch_and_unshuffle_restores_order(
    ranks: list[dict[str, Any]],
) -> None:
    shuffled = torch.cat([r["shuffle"][0] for r in ranks]).flatten()
    assert sorted(shuffled.tolist()) == list(range(8))  # a permutation of the global batch
    assert torch.equal(ranks[0]["shuffle"][2], ranks[1]["shuffle"][2])  # one permutation, rank 0's
    for r, res in enumerate(ranks):
        expected = torch.arange(r * 4, r * 4 + 4, dtype=torch.float64).unsqueeze(1) * 10
        assert torch.equal(res["shuffle"][1], expected)


def test_ddp_crossmoco_equals_one_process_on_the_global_batch(ranks: list[dict[str, Any]]) -> None:
    model = make_model()
    opt = make_optimizer(model)
    single_losses = [train_step(model, batch, opt, momentum=0.9) for batch in model_batches()]
    for step, single in enumerate(single_losses):
        for name in ("loss", "loss_point", "loss_image", "loss_cross"):
            mean = sum(float(r["model"][0][step][name]) for r in ranks) / WORLD
            assert mean == pytest.approx(float(single[name]), rel=1e-9), (step, name)
    state0, state1 = ranks[0]["model"][1], ranks[1]["model"][1]
    for name, value in model.state_dict().items():
        if "running_" in name or "num_batches" in name:
            continue  # eval mode: untouched
        assert torch.equal(state0[name], state1[name]), name  # momentum update kept the ranks identical
        torch.testing.assert_close(state0[name], value, rtol=1e-9, atol=1e-11, msg=name)
