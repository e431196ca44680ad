"""Where a restarted run picks up: checkpoint names, Ray's registered checkpoint vs ``progress.json``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crossmoco_ray.checkpoints.resume import (
    PROGRESS_FILE,
    ResumePoint,
    checkpoint_name,
    resume_point,
    step_of,
    write_progress,
)
from crossmoco_ray.checkpoints.state import STATE_FILE, restore

SPE = 10  # steps per epoch


def _checkpoint(run_dir: Path, name: str) -> None:
    (run_dir / name).mkdir(parents=True)
    (run_dir / name / STATE_FILE).write_bytes(b"state")


def test_names_say_where_in_the_run_a_checkpoint_is() -> None:
    assert checkpoint_name(30, SPE) == "epoch_0003"
    assert checkpoint_name(34, SPE) == "step_00000034"
    assert step_of("epoch_0003", SPE) == 30
    assert step_of("/runs/x/step_00000034/", SPE) == 34
    assert step_of("checkpoint_2026-12-03", SPE) is None
    point = ResumePoint("x/step_00000034", 34)
    assert (point.epoch(SPE), point.skip(SPE)) == (3, 4)  # the fourth epoch, 4 batches already trained on


def test_a_fresh_run_starts_at_step_zero(tmp_path: Path) -> None:
    assert resume_point(str(tmp_path / "run"), SPE, None) == ResumePoint(None, 0)


def test_an_uploaded_but_unregistered_checkpoint_is_not_lost(tmp_path: Path) -> None:
    """A worker that dies right after its report can leave the newest checkpoint unregistered by Ray."""
    run = tmp_path / "run"
    _checkpoint(run, "epoch_0002")
    _checkpoint(run, "step_00000025")
    write_progress(str(run), "step_00000025", 25, 2)
    point = resume_point(str(run), SPE, registered=str(run / "epoch_0002"))
    assert point == ResumePoint(f"{run}/step_00000025", 25)


def test_the_registered_checkpoint_wins_when_newer_or_when_progress_names_a_missing_one(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    _checkpoint(run, "epoch_0003")
    write_progress(str(run), "step_00000025", 25, 2)  # its directory was deleted (or never completed)
    assert resume_point(str(run), SPE, registered=str(run / "epoch_0003")) == ResumePoint(
        f"{run}/epoch_0003", 30
    )
    (run / PROGRESS_FILE).unlink()
    assert resume_point(str(run), SPE, registered=None) == ResumePoint(None, 0)


def test_every_rank_gets_its_own_rng_state_back() -> None:
    """Each rank restores the RNG state it saved (not rank 0's); another world size gets fresh seeds."""
    from crossmoco_ray.architecture import build_model
    from crossmoco_ray.checkpoints.state import build_state, rng_state
    from crossmoco_ray.config.loading import load_config
    from crossmoco_ray.pretrain.optim import build_optimizer

    cfg = load_config(
        "quickstart",
        overrides=["model.emb_dims=32", "model.image_encoder=resnet18", "objective.queue_length=64"],
    )
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    states, next_draws = [], []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        states.append(rng_state())
        next_draws.append(torch.rand(3))
    state = build_state(model, optimizer, cfg, epoch=1, step=5, lr=1e-3, rng_per_rank=states)
    for rank in range(2):
        torch.manual_seed(0)
        assert restore(model, optimizer, state, rank=rank, world_size=2) is True
        assert torch.equal(torch.rand(3), next_draws[rank]), rank
    assert restore(model, optimizer, state, rank=1, world_size=3) is False  # resumed on another world size


class FakeGpuRng:
    """torch.cuda's RNG calls for a worker that sees ``visible`` GPUs, each with its own state."""

    def __init__(self, visible: int) -> None:
        self.states = {i: torch.full((16,), 100 + i, dtype=torch.uint8) for i in range(visible)}
        self.set_calls: list[tuple[int, int]] = []  # (device index, first byte of the state set)

    def index(self, device: object) -> int:
        i = torch.device(device).index if device is not None else 0  # type: ignore[arg-type]
        if i is None or i not in self.states:
            raise IndexError(f"no GPU {device} here ({len(self.states)} visible)")
        return i

    def get_rng_state(self, device: object = "cuda") -> torch.Tensor:
        return self.states[self.index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device: object = "cuda") -> None:
        self.set_calls.append((self.index(device), int(state[0])))

    def all_states(self) -> list[torch.Tensor]:
        return [s.clone() for s in self.states.values()]

    def set_all(self, states: list[torch.Tensor]) -> None:
        for i, state in enumerate(states):
            self.set_rng_state(state, torch.device("cuda", i))


def test_a_checkpoint_written_on_an_8_gpu_node_resumes_on_a_1_gpu_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray gives a node's workers the same CUDA_VISIBLE_DEVICES: on an 8-GPU node each worker sees 8 GPUs
    and trains on one. Each saves its own GPU's generator only, and restores it onto the GPU it trains on
    after a restart, whatever that node shows (a spot loss onto a smaller node: 1 GPU, index 0)."""
    from crossmoco_ray.architecture import build_model
    from crossmoco_ray.checkpoints.state import build_state, rng_state
    from crossmoco_ray.config.loading import load_config
    from crossmoco_ray.pretrain.optim import build_optimizer

    cfg = load_config(
        "quickstart",
        overrides=["model.emb_dims=32", "model.image_encoder=resnet18", "objective.queue_length=64"],
    )
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    big = FakeGpuRng(visible=8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", big.get_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", big.all_states)
    states = [rng_state(torch.device("cuda", rank)) for rank in range(8)]  # rank r trains on GPU r
    assert [int(s["cuda"][0]) for s in states] == [100 + r for r in range(8)]
    state = build_state(model, optimizer, cfg, epoch=1, step=5, lr=1e-3, rng_per_rank=states)

    small = FakeGpuRng(visible=1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", small.set_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", small.set_all)
    for rank in range(8):  # each restarted worker alone on a 1-GPU node
        assert restore(model, optimizer, state, rank=rank, world_size=8, device=torch.device("cuda", 0))
    assert small.set_calls == [(0, 100 + rank) for rank in range(8)]  # its own state, onto its own GPU

    # a version-1 checkpoint (every visible GPU's state) restores there without IndexError; its GPU
    # generator keeps its seeding, and restore says the RNG was not restored whole
    old = {**state, "version": 1, "rng_per_rank": [{**s, "cuda": big.all_states()} for s in states]}
    small.set_calls.clear()
    assert not restore(model, optimizer, old, rank=3, world_size=8, device=torch.device("cuda", 0))
    assert small.set_calls == []
    # a CPU worker resuming a GPU run restores the CPU generator only
    assert restore(model, optimizer, state, rank=2, world_size=8, device=torch.device("cpu"))
    assert small.set_calls == []


def test_checkpoints_of_version_1_still_read_and_unknown_versions_are_named(tmp_path: Path) -> None:
    from crossmoco_ray.checkpoints.state import FORMAT, VERSION, read_checkpoint

    assert VERSION == 2
    for version in (1, 2):
        torch.save({"format": FORMAT, "version": version}, tmp_path / STATE_FILE)
        assert read_checkpoint(tmp_path)["version"] == version
    torch.save({"format": FORMAT, "version": 3}, tmp_path / STATE_FILE)
    with pytest.raises(ValueError, match="checkpoint version 3, this crossmoco-ray reads"):
        read_checkpoint(tmp_path)
