"""Where a restarted run picks up: checkpoint names, Ray's registered checkpoint vs ``progress.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossmoco_ray.checkpoints.resume import (
    POSITION_FILE,
    PROGRESS_FILE,
    Position,
    ResumePoint,
    epoch_checkpoint_name,
    resume_point,
    step_checkpoint_name,
    step_of,
    write_progress,
)
from crossmoco_ray.checkpoints.state import STATE_FILE, restore
from crossmoco_ray.errors import ResumeError
from tests.helpers import tiny_crossmoco

SPE = 10  # steps per epoch


def _checkpoint(run_dir: Path, name: str) -> None:
    (run_dir / name).mkdir(parents=True)
    (run_dir / name / STATE_FILE).write_bytes(b"state")


def test_names_say_where_in_the_run_a_checkpoint_is() -> None:
    assert epoch_checkpoint_name(3) == "epoch_0003"
    assert step_checkpoint_name(34) == "step_00000034"
    assert step_of("epoch_0003", SPE) == 30
    assert step_of("/runs/x/step_00000034/", SPE) == 34
    assert step_of("checkpoint_2026-12-03", SPE) is None
    point = ResumePoint("x/step_00000034", 34)
    assert point.epoch(SPE) == 3  # the fourth epoch (an older checkpoint: from its name)


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


def _position(run_dir: Path, name: str, **fields: object) -> None:
    record = {"step": 0, "epoch": 0, "epoch_samples": 0, "samples": 0, "world": 2, "resizes": 0, **fields}
    (run_dir / name / POSITION_FILE).write_text(json.dumps(record))


def test_an_elastic_runs_newest_checkpoint_is_found_by_the_steps_its_position_holds(tmp_path: Path) -> None:
    """At another world size an epoch is another number of steps: epoch_0002 of a run that shrank holds
    step 40, not 2 × 10 — newer than step_00000038, which its name alone would make look older."""
    run = tmp_path / "run"
    _checkpoint(run, "epoch_0002")
    _position(run, "epoch_0002", step=40, epoch=2, samples=480, world=1, resizes=1)
    _checkpoint(run, "step_00000038")
    _position(run, "step_00000038", step=38, epoch=1, epoch_samples=200, samples=460)
    write_progress(str(run), "step_00000038", 38, 1)
    point = resume_point(str(run), SPE, registered=str(run / "epoch_0002"))
    assert point == ResumePoint(f"{run}/epoch_0002", 40)
    assert point.position is not None
    assert (point.epoch(SPE), point.position.world, point.position.resizes) == (2, 1, 1)


def test_a_fixed_runs_position_follows_from_its_steps() -> None:
    assert Position.of_fixed_run(34, SPE, 8) == Position(34, 3, 32, 272)


def test_progress_naming_a_checkpoint_outside_the_run_is_ignored(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _checkpoint(tmp_path, "other/step_00000099")
    _checkpoint(run, "epoch_0001")
    write_progress(str(run), "../other/step_00000099", 99, 9)
    assert resume_point(str(run), SPE, registered=str(run / "epoch_0001")) == ResumePoint(
        f"{run}/epoch_0001", 10
    )


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2]", "not an object"),
        ('{"step": 1}', "not a checkpoint position"),
        ('{"step": -1, "epoch": 0, "epoch_samples": 0, "samples": 0, "world": 1, "resizes": 0}', "step=-1"),
        (
            '{"step": true, "epoch": 0, "epoch_samples": 0, "samples": 0, "world": 1, "resizes": 0}',
            "step=True",
        ),
        ('{"step": 1, "epoch": 0, "epoch_samples": 0, "samples": 0, "world": 0, "resizes": 0}', "impossible"),
        ('{"step": 1, "epoch": 0, "epoch_samples": 9, "samples": 0, "world": 1, "resizes": 0}', "impossible"),
        (
            '{"step": 1, "epoch": 900, "epoch_samples": 0, "samples": 0, "world": 1, "resizes": 0}',
            "impossible",
        ),
        ('{"step": 1.5, "epoch": 0, "epoch_samples": 0, "samples": 0, "world": 1, "resizes": 0}', "step=1.5"),
        ('{"step": "' + "9" * 5000 + '"}', "more than the 4096 bytes"),
        ("{" * 3000, "position.json"),
    ],
)
def test_a_damaged_position_is_a_named_error(tmp_path: Path, content: str, match: str) -> None:
    run = tmp_path / "run"
    _checkpoint(run, "epoch_0001")
    (run / "epoch_0001" / POSITION_FILE).write_text(content)
    with pytest.raises(ResumeError, match=match) as err:
        resume_point(str(run), SPE, registered=str(run / "epoch_0001"))
    assert len(str(err.value)) < 600


def test_resumed_at_another_size_each_rank_gets_a_stream_of_seed_rank_size_and_resize() -> None:
    from crossmoco_ray.checkpoints.state import derived_seed

    seeds = {derived_seed(1, r, w, n) for r in range(4) for w in range(1, 5) for n in range(3)}
    assert len(seeds) == 4 * 4 * 3
    assert derived_seed(1, 0, 2, 1) == derived_seed(1, 0, 2, 1)
    model = tiny_crossmoco()
    state = {
        "model": model.state_dict(),
        "rng_per_rank": [{"torch": torch.get_rng_state(), "cuda": None}] * 2,
        "config": {"train": {"seed": 7}},
        "step": 5,
    }
    assert restore(model, None, state, rank=0, world_size=1, resizes=1) is False
    drawn = torch.rand(3)
    torch.manual_seed(derived_seed(7, 0, 1, 1))
    assert torch.equal(drawn, torch.rand(3))
