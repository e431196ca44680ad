"""The fine-tuning job on the worker skeleton, without Ray: a run that dies mid-epoch resumes from its last
checkpoint and ends bitwise where an uninterrupted run does, and a NaN loss stops it with the last good
checkpoint kept. (Ray's part, several workers and a killed process, is proven once for the shared skeleton
in tests/pretrain/test_pretrain_ray.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from crossmoco_ray.checkpoints.resume import resume_point, step_of
from crossmoco_ray.config.finetune import load_finetune_config
from crossmoco_ray.finetune.driver import cls_data, encoder_payload, load_encoder
from crossmoco_ray.finetune.worker import STATE_FILE, FinetuneJob, FinetuneSpec
from crossmoco_ray.runs.worker import StepInfo, run_worker, start
from tests.finetune.data import class_sorted_shapes_h5
from tests.helpers import LocalSession

TINY = [
    "model.k=8", "model.emb_dims=32", "data.num_points=64", "optim.optimizer=adamw", "optim.lr=0.003",
    "train.batch_size=16", "train.num_workers=1", "train.epochs=3", "train.checkpoint_every_steps=4",
    "train.log_every=2", "train.eval_every=3", "tracking.enabled=false", "data.val_fraction=0",
]  # fmt: skip


class Died(Exception):
    pass


def die_after(step: int) -> Any:
    def callback(info: StepInfo) -> None:
        if info.step == step:
            raise Died(f"after step {step}")

    return callback


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return class_sorted_shapes_h5(tmp_path_factory.mktemp("h5"), n_train=96, n_test=24, points=64)


def finetune(data: Path, run_dir: Path, *overrides: str, callbacks: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    """One fine-tuning worker of the run at ``run_dir`` (a fresh start, or a restart that finds its
    checkpoint through ``progress.json``), run to its end."""
    cfg = load_finetune_config(overrides=[*TINY, *overrides])
    task = cls_data(cfg, str(data), "y", None)
    spe = len(task.arrays["train"][1]) // cfg.train.batch_size
    spec = FinetuneSpec(
        run_dir=str(run_dir), run_name=run_dir.name, steps_per_epoch=spe, step_callbacks=callbacks, cfg=cfg,
        class_names=task.class_names, normalize=True,
    )  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    session = LocalSession(run_dir)
    t = cfg.train
    ctx = start(
        spec, session, epochs=t.epochs, log_every=t.log_every, checkpoint_every=t.checkpoint_every_steps
    )
    payload = {**task.arrays, "num_classes": task.num_outputs, "part_counts": None}
    job = FinetuneJob(spec, ctx, payload, encoder_payload(load_encoder(cfg, None)))
    return run_worker(ctx, job), ctx, session


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted(run_dir.glob("epoch_*"))[-1]
    state: dict[str, torch.Tensor] = torch.load(last / STATE_FILE, weights_only=True)["model"]
    return state


def test_a_run_that_dies_mid_epoch_resumes_and_ends_where_an_uninterrupted_one_does(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, ctx, _ = finetune(data, tmp_path / "straight")
    spe = ctx.steps_per_epoch
    assert out == {"status": "finished", "epoch": 3, "step": 3 * spe}
    die = spe + 5  # in epoch 2, after its checkpoint at a multiple of 4
    with pytest.raises(Died):
        finetune(data, tmp_path / "resumed", callbacks=(die_after(die),))
    point = resume_point(str(tmp_path / "resumed"), spe, None)
    assert point.step == die // 4 * 4
    capsys.readouterr()
    out, ctx, session = finetune(data, tmp_path / "resumed")
    assert "skipping" not in capsys.readouterr().out  # its batches are a function of the step: none read
    assert out["status"] == "finished"
    assert ctx.attempt_start_step == point.step
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    evaluated = session.reports[-1]
    assert 0.0 <= evaluated["test_oa"] <= 1.0  # the last epoch scored the test split


def test_a_nan_loss_stops_fine_tuning_with_the_last_good_checkpoint(data: Path, tmp_path: Path) -> None:
    out, ctx, session = finetune(data, tmp_path / "nan", "optim.optimizer=sgd", "optim.lr=1e30")
    assert out["status"] == "nonfinite"
    assert session.reports[-1]["nonfinite"] == 1.0
    kept = [step_of(p.name, ctx.steps_per_epoch) for p in (tmp_path / "nan").iterdir() if p.is_dir()]
    assert all(step is not None and step < out["step"] for step in kept)  # none written after the NaN
