"""The worker skeleton's phases without Ray: restore, the mid-epoch skip, save, callbacks, stops.

A :class:`LocalSession` stands in for Ray Train (one process; a reported checkpoint is copied to
``<run_dir>/<name>`` and registered, as Ray Train's storage does), so the real pretraining and fine-tuning
jobs run through the real skeleton here in seconds; the Ray fits (tests/pretrain, tests/finetune) then only
need to prove what Ray adds (several workers, killed processes, the dataset factory).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from crossmoco_ray.checkpoints.resume import HISTORY_FILE, PROGRESS_FILE, resume_point
from crossmoco_ray.checkpoints.state import read_checkpoint
from crossmoco_ray.config.loading import load_config
from crossmoco_ray.data.pipeline.batches import iter_local_batches
from crossmoco_ray.data.prepare.options import PrepareOptions
from crossmoco_ray.data.prepare.prepare import prepare
from crossmoco_ray.data.render.splat import RenderSpec
from crossmoco_ray.data.shards.manifest import read_manifest
from crossmoco_ray.data.sources.formats import SyntheticSource
from crossmoco_ray.pretrain.launch import pipeline_options
from crossmoco_ray.pretrain.resolve import resolve_run
from crossmoco_ray.pretrain.worker import PretrainJob, PretrainSpec
from crossmoco_ray.runs.worker import Context, StepInfo, WorkerSpec, run_worker, start
from crossmoco_ray.tracking import Tracker
from tests.helpers import LocalSession

TINY = [
    "model.k=4", "model.emb_dims=16", "model.point_head_hidden=16", "model.proj_dim=8",
    "model.image_encoder=resnet18", "model.image_head_hidden=16",
    "data.num_points=32", "data.image_size=16", "data.read_batch=8", "objective.queue_length=16",
    "train.batch_size=4", "train.num_workers=1", "train.epochs=2", "train.log_every=2",
    "train.checkpoint_every_steps=3", "train.deterministic=true", "tracking.enabled=false",
    "eval.num_points=32", "eval.final=false",
]  # fmt: skip


class LocalShard:
    """A worker's dataset shard without Ray: the pipeline's own batches (:func:`iter_local_batches`), one
    data epoch per call of ``iter_torch_batches``, from ``first_epoch`` (as the dataset factory starts a
    resumed run at its epoch)."""

    def __init__(self, root: str, opts: Any, first_epoch: int = 0) -> None:
        self.root, self.opts, self.epoch = root, opts, first_epoch

    def iter_torch_batches(self, batch_size: int, **_: Any) -> Iterator[dict[str, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        for batch in iter_local_batches(self.root, "train", self.opts, batch_size, epoch=epoch):
            yield {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}


class Died(Exception):
    """A worker process dying, as far as this process can tell."""


@dataclass(frozen=True)
class DieAfter:
    step: int

    def __call__(self, info: StepInfo) -> None:
        if info.step == self.step:
            raise Died(f"after step {info.step}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "shards"
    source = SyntheticSource({"train": 30, "test": 6}, num_points=32)
    prepare(
        source, str(root), PrepareOptions(val_fraction=0.2, render=RenderSpec(size=16)), log=lambda _: None
    )
    return root


@pytest.fixture(scope="module")
def mesh_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Meshes and no renders (prepare --store meshes): the pipeline renders fresh viewpoints every epoch."""
    root = tmp_path_factory.mktemp("data") / "meshes"
    source = SyntheticSource({"train": 30, "test": 6}, num_points=32)
    options = PrepareOptions(val_fraction=0.2, render=RenderSpec(size=16), store="meshes")
    prepare(source, str(root), options, log=lambda _: None)
    return root


def pretrain_worker(
    shards: Path, storage: Path, name: str, callbacks: tuple[Any, ...] = (), registered: str | None = None
) -> tuple[Context, PretrainJob, LocalSession]:
    """A pretraining worker of run ``name`` on the skeleton, as ``train_loop_per_worker`` builds it."""
    cfg = load_config("quickstart", overrides=TINY)
    run = resolve_run(cfg, data=str(shards), storage=str(storage), name=name, log=lambda _: None)
    spec = PretrainSpec(
        run_dir=run.run_dir, run_name=name, steps_per_epoch=run.steps_per_epoch, step_callbacks=callbacks,
        cfg=run.cfg,
    )  # fmt: skip
    session = LocalSession(Path(run.run_dir), registered)
    Path(run.run_dir).mkdir(parents=True, exist_ok=True)
    t = run.cfg.train
    ctx = start(
        spec, session, epochs=t.epochs, log_every=t.log_every, checkpoint_every=t.checkpoint_every_steps
    )
    ctx.history = {"steps": [], "epochs": []}
    job = PretrainJob(spec, ctx)
    return ctx, job, session


def run(
    shards: Path, storage: Path, name: str, callbacks: tuple[Any, ...] = (), registered: str | None = None
) -> Any:
    ctx, job, session = pretrain_worker(shards, storage, name, callbacks, registered)
    # the shard starts at the epoch the run resumes at, as the dataset factory decides before the workers do
    point = resume_point(ctx.spec.run_dir, ctx.steps_per_epoch, registered)
    opts = pipeline_options(job.cfg, read_manifest(str(shards)))
    job.shard = LocalShard(str(shards), opts, first_epoch=point.epoch(ctx.steps_per_epoch))
    out = run_worker(ctx, job)
    return out, ctx, job, session


def test_checkpoints_and_a_run_killed_mid_epoch_that_resumes_to_the_same_weights_and_queues(
    mesh_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # On meshes, with views rendered from fresh viewpoints every epoch (auto: the shards hold no renders):
    # the resumed run must render exactly the views the straight run rendered after the skip.
    shards = mesh_shards
    out, ctx, job, session = run(shards, tmp_path, "straight")
    assert job.shard.opts.viewpoints is not None
    assert job.shard.opts.viewpoints.kind == "fresh"
    spe = ctx.steps_per_epoch
    assert out == {"status": "finished", "epoch": 2, "step": 2 * spe}
    assert spe >= 5  # so that a checkpoint (every 3 steps) falls inside epoch 2
    straight = read_checkpoint(tmp_path / "straight" / "epoch_0002")
    # checkpoints named by what they hold, mid-epoch ones scored below every epoch end (what Ray drops)
    names = sorted(p.name for p in (tmp_path / "straight").iterdir() if p.is_dir())
    mid = [f"step_{s:08d}" for s in range(3, 2 * spe, 3) if s % spe]
    assert names == sorted(["epoch_0001", "epoch_0002", *mid])
    priorities = [r["checkpoint_priority"] for r in session.reports if "checkpoint_priority" in r]
    assert sorted(set(priorities)) == [-1, 1, 2]
    assert session.reports[-1]["queue_checksums"] == [session.reports[-1]["queue_checksum"]]

    die = spe + 4  # in epoch 2, one step after its checkpoint at step spe + 3 (or later ones)
    last_ckpt = (die // 3) * 3
    with pytest.raises(Died):
        run(shards, tmp_path, "resumed", (DieAfter(die),))
    progress = json.loads((tmp_path / "resumed" / PROGRESS_FILE).read_text())
    assert progress["step"] == last_ckpt  # written after the checkpoint was reported
    capsys.readouterr()
    # a restart that Ray registered nothing for finds the checkpoint through progress.json
    out, ctx, _, _ = run(shards, tmp_path, "resumed")
    printed = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'resumed'}/step_{last_ckpt:08d}" in printed
    assert f"skipping the {last_ckpt - spe} batches trained on before the restart" in printed
    assert out["status"] == "finished"
    assert ctx.attempt_start_step == last_ckpt
    resumed = read_checkpoint(tmp_path / "resumed" / "epoch_0002")
    for key, value in straight["model"].items():  # queues and pointer included
        assert torch.equal(value, resumed["model"][key]), key
    history = json.loads((tmp_path / "resumed" / "epoch_0002" / HISTORY_FILE).read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]  # the first epoch's record came back
    assert [s["step"] for s in history["steps"]] == list(range(2, 2 * spe + 1, 2))  # no step logged twice


# A job of one scalar parameter: the skeleton's decisions, step by step, with scripted losses.
class ScriptedJob:
    def __init__(self, losses: list[float]) -> None:
        self.losses = losses
        self.weight = torch.zeros(())
        self.pending: list[float] = []
        self.seen: list[int] = []

    def restore(self, ctx: Context, directory: Path) -> int:
        state = torch.load(directory / "state.pt", weights_only=True)
        self.weight = state["weight"]
        return int(state["step"])

    def write(self, ctx: Context, directory: Path, rngs: list[dict[str, Any]], epochs_done: int) -> None:
        torch.save({"weight": self.weight, "step": ctx.step}, directory / "state.pt")

    def after_restore(self, ctx: Context) -> None:
        pass

    def start_epoch(self, ctx: Context, epoch: int, skip: int) -> Iterator[Any]:
        return iter(range(epoch * ctx.steps_per_epoch + skip, (epoch + 1) * ctx.steps_per_epoch))

    def step(self, ctx: Context, epoch: int, batch: Any, wait: float) -> None:
        self.seen.append(batch)
        self.weight = self.weight + 1
        self.pending.append(self.losses[batch])

    def take_window(self, ctx: Context) -> dict[str, float]:
        window, self.pending = self.pending, []
        return {"loss": float(np.mean(window)) if window else math.nan}

    def losses_finite(self, ctx: Context) -> bool:
        return all(math.isfinite(v) for v in self.pending)

    def log_window(self, ctx: Context, epoch: int, window: dict[str, float]) -> None:
        pass

    def checkpoint_metrics(self, ctx: Context, epoch: int) -> dict[str, Any]:
        return {}

    def end_epoch(self, ctx: Context, epoch: int) -> dict[str, Any]:
        ctx.history["epochs"].append({"epoch": epoch + 1})
        return {}


def scripted(
    tmp_path: Path, losses: list[float], callbacks: tuple[Any, ...] = ()
) -> tuple[Any, Context, LocalSession]:
    spec = WorkerSpec(run_dir=str(tmp_path), run_name="s", steps_per_epoch=4, step_callbacks=callbacks)
    session = LocalSession(tmp_path)
    ctx = start(spec, session, epochs=3, log_every=2, checkpoint_every=3)
    assert isinstance(ctx.tracker, Tracker)
    job = ScriptedJob(losses)
    return run_worker(ctx, job), ctx, session


def test_a_nan_loss_stops_the_run_before_any_checkpoint_keeps_it(tmp_path: Path) -> None:
    losses = [1.0] * 12
    losses[6] = math.nan  # step 7: in the window of steps 7-8, after the checkpoint of step 6
    out, _ctx, session = scripted(tmp_path, losses)
    assert out["status"] == "nonfinite"
    assert out["epoch"] == 1
    assert out["step"] == 8
    assert math.isnan(out["loss"])
    assert session.registered == str(tmp_path / "step_00000006")  # the last good state
    assert session.reports[-1]["nonfinite"] == 1.0


def test_a_nan_between_windows_is_caught_before_the_checkpoint(tmp_path: Path) -> None:
    losses = [1.0] * 12
    losses[8] = math.nan  # step 9, the first of epoch 3: a checkpoint is due at 9, the window at 10
    out, _, session = scripted(tmp_path, losses)
    assert out["status"] == "nonfinite"
    assert out["step"] == 9
    assert session.registered == str(tmp_path / "epoch_0002")  # step 8's


def test_a_callback_sees_every_step_and_can_stop_the_run(tmp_path: Path) -> None:
    seen: list[tuple[int, int, bool]] = []

    def watch(info: StepInfo) -> bool:
        seen.append((info.epoch, info.step_in_epoch, info.window is not None))
        return info.step == 5  # asks to stop; agreed at the next log window (step 6)

    out, _ctx, session = scripted(tmp_path, [1.0] * 12, (watch,))
    assert out == {"status": "stopped", "epoch": 1, "step": 6}
    assert seen == [(0, 1, False), (0, 2, True), (0, 3, False), (0, 4, True), (1, 1, False), (1, 2, True)]
    assert session.registered == str(tmp_path / "step_00000006")  # the state it stopped at is kept


def test_a_stop_asked_at_an_epochs_last_step_comes_after_its_evaluation_and_checkpoint(
    tmp_path: Path,
) -> None:
    out, ctx, session = scripted(tmp_path, [1.0] * 12, (lambda info: info.step == 4,))
    assert out == {"status": "stopped", "epoch": 0, "step": 4}
    assert ctx.history["epochs"] == [{"epoch": 1}]  # the epoch's end ran
    assert session.registered == str(tmp_path / "epoch_0001")


def _as_if_written_at(checkpoint: Path, world: int, step: int, epoch_start: int, within: int) -> None:
    """Rewrite a checkpoint's position as if ``world`` workers had trained ``within`` samples into epoch 2."""
    position = {"step": step, "epoch": 1, "epoch_samples": within, "samples": epoch_start + within}
    (checkpoint / "position.json").write_text(json.dumps({**position, "world": world, "resizes": 0}))


def test_a_run_resumed_at_another_world_size_goes_on_at_the_checkpoints_sample(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real job on the skeleton, restarted from a checkpoint whose position says 2 workers trained it
    (an elastic run that lost one): the epoch's batches of this size up to the one holding the checkpoint's
    sample are skipped, the samples counted roll back to that batch's start, the resize is recorded with
    the queues' checksums, and the count of samples stays continuous to the epochs' end."""
    ctx0, _, _ = pretrain_worker(shards, tmp_path, "probe")
    spe, gb = ctx0.steps_per_epoch, ctx0.global_batch  # 1 worker × 4
    last = (spe + 4) // 3 * 3  # the checkpoint inside epoch 2 before the death
    assert spe < last
    with pytest.raises(Died):
        run(shards, tmp_path, "resized", (DieAfter(spe + 4),))
    progress = json.loads((tmp_path / "resized" / PROGRESS_FILE).read_text())
    assert progress["checkpoint"] == f"step_{last:08d}"
    # as if 2 workers of 4 (a global batch of 8) had trained 14 samples into this epoch; 14 is no multiple
    # of this size's batch of 4: the batch holding sample 14 (samples 12-15) is trained again
    _as_if_written_at(
        tmp_path / "resized" / f"step_{last:08d}", world=2, step=last, epoch_start=spe * gb, within=14
    )
    capsys.readouterr()
    out, ctx, _, _ = run(shards, tmp_path, "resized")
    printed = capsys.readouterr().out
    assert "resized: 2 → 1 workers (global batch 4" in printed
    assert "skipping the 3 batches trained on before the restart" in printed
    assert out["status"] == "finished"
    assert ctx.resizes == 1
    assert ctx.resized_from == 2
    final = json.loads((tmp_path / "resized" / "epoch_0002" / "position.json").read_text())
    assert final == {
        "step": last + (spe - 3), "epoch": 2, "epoch_samples": 0, "samples": 2 * spe * gb, "world": 1,
        "resizes": 1,
    }  # fmt: skip
    history = json.loads((tmp_path / "resized" / "epoch_0002" / HISTORY_FILE).read_text())
    (resize,) = history["resizes"]
    assert (resize["from"], resize["to"], resize["samples"]) == (2, 1, spe * gb + 12)
    assert len(resize["queue_checksums"]) == 1
    samples = [s["samples"] for s in history["steps"]]
    assert samples == sorted(samples)
    assert samples[-1] == 2 * spe * gb


def test_the_schedules_count_samples_and_match_steps_at_a_fixed_size() -> None:
    """Momentum and the per-step cosine are functions of the samples done: bit for bit the step formula's
    values at a fixed size, and the same curve at another world size for the same samples."""
    from crossmoco_ray.pretrain.optim import lr_at, momentum_at

    cfg = load_config(
        "quickstart", overrides=["objective.momentum_schedule=cosine", "optim.schedule=cosine_smooth"]
    )
    spec = WorkerSpec(run_dir="x", run_name="x", steps_per_epoch=15, per_worker_batch=6)
    ctx = Context(spec, LocalSession(Path("x")), 0, 2, torch.device("cpu"), Tracker(None), 4, 1, None)
    total = ctx.total_steps
    for step in range(total + 1):
        ctx.epoch, ctx.epoch_samples = divmod(step, 15)
        ctx.epoch_samples *= ctx.global_batch
        assert momentum_at(cfg, *ctx.schedule_position()) == momentum_at(cfg, step, total)
        frac = ctx.epoch_step / ctx.steps_per_epoch
        assert lr_at(cfg, ctx.epoch, frac) == lr_at(cfg, ctx.epoch, (step % 15) / 15)
    elastic = WorkerSpec(run_dir="x", run_name="x", steps_per_epoch=15, per_worker_batch=6, elastic_rows=184)
    one = Context(elastic, LocalSession(Path("x")), 0, 1, torch.device("cpu"), Tracker(None), 4, 1, None)
    two = Context(elastic, LocalSession(Path("x")), 0, 2, torch.device("cpu"), Tracker(None), 4, 1, None)
    assert (one.steps_per_epoch, two.steps_per_epoch) == (30, 15)  # the same 180 samples per epoch
    for c in (one, two):
        c.epoch, c.epoch_samples = 2, 96
    assert momentum_at(cfg, *one.schedule_position()) == pytest.approx(
        momentum_at(cfg, *two.schedule_position()), rel=1e-15
    )
    assert momentum_at(cfg, *one.schedule_position()) != momentum_at(cfg, 0, 120)


def test_a_checkpoint_past_this_sizes_epoch_end_trains_its_last_batch_again(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Grown from a smaller size late in an epoch, the checkpoint's samples can reach past this size's
    epoch (steps × a bigger batch): the epoch's last batch is trained again rather than an epoch of no
    steps (whose end would have nothing to report)."""
    ctx0, _, _ = pretrain_worker(shards, tmp_path, "probe")
    spe, gb = ctx0.steps_per_epoch, ctx0.global_batch
    last = (spe + 4) // 3 * 3
    with pytest.raises(Died):
        run(shards, tmp_path, "late", (DieAfter(spe + 4),))
    # as if a smaller batch had taken the epoch past this size's end
    _as_if_written_at(
        tmp_path / "late" / f"step_{last:08d}", world=3, step=last, epoch_start=spe * gb, within=spe * gb + 2
    )
    capsys.readouterr()
    out, ctx, _, _ = run(shards, tmp_path, "late")
    assert f"skipping the {spe - 1} batches trained on before the restart" in capsys.readouterr().out
    assert out["status"] == "finished"
    assert ctx.samples == 2 * spe * gb
    assert ctx.step == last + 1


def test_a_damaged_position_is_named_before_any_worker_starts(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crossmoco_ray.errors import ResumeError
    from crossmoco_ray.pretrain import driver

    with pytest.raises(Died):
        run(shards, tmp_path, "damaged", (DieAfter(4),))
    progress = json.loads((tmp_path / "damaged" / PROGRESS_FILE).read_text())
    (tmp_path / "damaged" / progress["checkpoint"] / "position.json").write_text('{"step": -3}')

    def no_ray(*_: Any, **__: Any) -> None:
        raise AssertionError("Ray was started for a run that cannot resume")

    monkeypatch.setattr(driver, "init_ray", no_ray)
    cfg = load_config("quickstart", overrides=TINY)
    with pytest.raises(ResumeError, match=r"position\.json"):
        driver.pretrain(cfg, name="damaged", storage=str(tmp_path), data=str(shards), log=lambda _: None)
