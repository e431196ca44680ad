"""Distributed pretraining on real Ray (CPU, fractional CPUs): queues, checkpoints, resume, faults, MLflow.

Each ``fit()`` costs ~20 s on 2 cores, so the tests share runs through module-scoped fixtures.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from crossmoco_ray.checkpoints.resume import HISTORY_FILE
from crossmoco_ray.checkpoints.state import read_checkpoint
from crossmoco_ray.config.loading import load_config
from crossmoco_ray.pretrain.driver import EXIT_FAILED, EXIT_OK, pretrain
from crossmoco_ray.pretrain.resolve import resolve_run
from tests.data import fixtures
from tests.helpers import KillAtStep

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TINY = [
    "model.k=4", "model.emb_dims=32", "model.point_head_hidden=32", "model.proj_dim=16",
    "model.image_encoder=resnet18", "model.image_head_hidden=16",
    "data.num_points=64", "data.image_size=32", "data.synthetic_train=120", "data.synthetic_test=26",
    "data.synthetic_val=0",  # val carved from train (data.val_fraction), not the quickstart's 1600 of its own
    "data.render.size=32", "data.render.azimuths=[0,120,240]", "data.read_batch=16",
    "objective.queue_length=64", "train.batch_size=8", "train.log_every=4",
    "eval.num_points=64", "eval.monitor_samples=40", "eval.final=false",
    "tracking.log_model=false",  # tests/test_mlflow_server.py logs and loads the model through finish()
]  # fmt: skip


def tiny(*overrides: str) -> Any:
    return load_config("quickstart", overrides=[*TINY, *overrides])


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's epoch-end checkpoints, in order."""
    return sorted(p for p in run_dir.glob("epoch_*") if (p / "state.pt").is_file())


FAULT_STEP = 17
CHECKPOINT_EVERY = 4
EPOCHS = 2


@pytest.fixture(scope="module")
def two_workers(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """2 epochs on 2 workers, a checkpoint every 4 steps; the last worker is killed at step 17 (in epoch 2)
    and the group restarts from the checkpoint of step 16, mid-epoch. The run ends as the README's does
    (``eval.final=true``: the final SVMs on val and test, and the gains over random init)."""
    storage = tmp_path_factory.mktemp("runs")
    cfg = tiny(
        f"train.epochs={EPOCHS}", "train.num_workers=2", f"train.checkpoint_every_steps={CHECKPOINT_EVERY}",
        "eval.final=true",
    )  # fmt: skip
    kill = [KillAtStep(FAULT_STEP)]
    lines: list[str] = []
    code, summary = pretrain(cfg, name="two", storage=str(storage), step_callbacks=kill, log=lines.append)
    return {
        "code": code, "summary": summary, "run_dir": storage / "two", "storage": storage, "cfg": cfg,
        "log": lines,
    }  # fmt: skip


def test_two_worker_run_completes_through_a_killed_worker(two_workers: dict[str, Any]) -> None:
    assert two_workers["code"] == EXIT_OK
    metrics = two_workers["summary"]["metrics"]
    assert metrics["epoch"] == EPOCHS
    assert (two_workers["run_dir"] / ".fault_injected").is_file()  # the fault did happen


def test_the_run_ends_with_the_final_svm_and_its_gains_over_random_init(two_workers: dict[str, Any]) -> None:
    """The headline ending (``pretrain.finish`` with ``eval.final=true``): both protocols on val and test for
    the pretrained encoder and its random-init twin, one gain line per split and protocol, the numbers in
    MLflow and in the run's eval/ directory."""
    log = "\n".join(two_workers["log"])
    assert "final linear SVM on" in log
    report = two_workers["summary"]["report"]
    assert set(report["results"]) == {
        f"{e} / {s}" for e in ("pretrained", "random-init") for s in ("val", "test")
    }
    for split in ("val", "test"):
        for protocol in ("clean protocol", "CrossPoint protocol"):
            line = next(ln for ln in two_workers["log"] if ln.startswith(f"{split}, {protocol}: pretrained "))
            assert " vs random init " in line
            # the gain ± its paired SE, and a verdict that calls it only beyond two SEs
            assert re.search(r", gain [+-]\d+\.\d\d ± \d+\.\d\d points; ", line), line
            assert line.endswith(("; above random init", "; below random init", "; within noise (±2 SE)"))
            key = protocol.split()[0].lower()
            assert (
                report["gains"][split][key]["n"] == report["results"][f"pretrained / {split}"][key]["n_test"]
            )
    assert (two_workers["run_dir"] / "eval").is_dir()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{two_workers['storage'] / 'mlflow.db'}")
    metrics = client.get_run(two_workers["summary"]["mlflow_run_id"]).data.metrics
    assert {"final_val_svm_clean", "final_random_test_svm_crosspoint"} <= set(metrics)
    assert {"final_gain_val_svm_clean", "final_gain_val_svm_clean_se"} <= set(metrics)


def test_restart_resumes_mid_epoch_from_the_last_checkpoint(two_workers: dict[str, Any]) -> None:
    """The surviving attempt starts at the last checkpoint before the fault (step 16, inside epoch 2): it
    fails if the restore were skipped (it would start at 0) or only per-epoch checkpoints were kept."""
    metrics = two_workers["summary"]["metrics"]
    steps_per_epoch = metrics["step"] // EPOCHS
    assert FAULT_STEP // steps_per_epoch == 1  # the fault is inside epoch 2
    restart_from = metrics["attempt_start_step"]  # where the surviving attempt started
    assert restart_from == (FAULT_STEP // CHECKPOINT_EVERY) * CHECKPOINT_EVERY == 16
    assert restart_from % steps_per_epoch != 0  # mid-epoch
    history = json.loads((checkpoints(two_workers["run_dir"])[-1] / HISTORY_FILE).read_text())
    epoch2 = history["epochs"][1]
    assert epoch2["attempt_start_step"] == 16
    assert epoch2["step"] == 2 * steps_per_epoch


def test_queues_identical_on_both_workers_at_every_checkpoint(two_workers: dict[str, Any]) -> None:
    last = checkpoints(two_workers["run_dir"])[-1]
    history = json.loads((last / HISTORY_FILE).read_text())
    assert [e["epoch"] for e in history["epochs"]] == list(range(1, EPOCHS + 1))
    for epoch in history["epochs"]:
        a, b = epoch["queue_checksums"]
        assert a == b, epoch["epoch"]
    state = read_checkpoint(last)
    assert state["queue_checksum"] == history["epochs"][-1]["queue_checksums"][0]


def test_checkpoint_holds_everything_exact_resume_needs(two_workers: dict[str, Any]) -> None:
    state = read_checkpoint(checkpoints(two_workers["run_dir"])[-1])
    model = state["model"]
    for prefix in ("point_q.", "point_k.", "image_q.", "image_k.", "point_q.inv_head.", "image_q.inv_head."):
        assert any(k.startswith(prefix) for k in model), prefix
    assert model["queue.keys"].shape == (2, 64, 16)
    assert int(model["queue.ptr"]) == (state["step"] * 8) % 64
    assert state["optimizer"]["state"]  # Adam moments
    assert state["scheduler"]["lr"] > 0
    steps_per_epoch = two_workers["summary"]["metrics"]["step"] // EPOCHS
    assert (state["epoch"], state["step"]) == (EPOCHS, EPOCHS * steps_per_epoch)
    assert state["step"] == two_workers["summary"]["metrics"]["step"]
    rngs = state["rng_per_rank"]  # every rank's own RNG state, in rank order
    assert len(rngs) == 2
    assert not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    assert isinstance(state["rng"]["torch"], torch.Tensor)
    assert state["config"]["objective"]["queue_length"] == 64
    assert state["mlflow_run_id"] == two_workers["summary"]["mlflow_run_id"]
    assert (checkpoints(two_workers["run_dir"])[-1] / "config.yaml").is_file()


def test_mlflow_run_has_params_step_metrics_and_artifacts(two_workers: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{two_workers['storage'] / 'mlflow.db'}")
    run = client.get_run(two_workers["summary"]["mlflow_run_id"])
    assert run.data.params["objective.queue_length"] == "64"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.tags["world_size"] == "2"
    assert run.data.tags["global_batch"] == "8"
    assert len(run.data.tags["config_hash"]) == 12
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) >= 5
    assert all(m.step > 0 for m in losses)
    assert len(client.get_metric_history(run.info.run_id, "val_svm_clean")) >= EPOCHS
    assert len(client.get_metric_history(run.info.run_id, "gain_val_knn")) >= EPOCHS
    assert len(client.get_metric_history(run.info.run_id, "random_val_svm_clean")) == 1  # measured once
    for key in ("batch_classes", "point_align", "point_uniform", "cross_top1", "point_feat_spread"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert client.get_metric_history(run.info.run_id, "chance_loss_point")[0].value == pytest.approx(
        math.log(65)
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves", "export"} <= artifacts
    assert run.info.status == "FINISHED"


def test_a_failed_run_relaunched_by_name_resumes_mid_epoch_in_the_same_mlflow_run(
    ray_session: None, tmp_path: Path
) -> None:
    """Interrupted late in its one epoch with no restarts left (``train.max_failures=0``: the fit fails), then
    relaunched by name: it resumes from the mid-epoch checkpoint, skips the batches it had trained on, and
    continues the same MLflow run. The monitor reads another labelled dataset (``eval.data``, an h5 source
    without a val split, given as a path relative to the driver's working directory), and its random-init
    baseline is measured once per run, not again after the relaunch. (That a resumed run ends bitwise where
    an uninterrupted one does: tests/runs/test_worker.py, and under Ray with a lost node
    tests/runs/test_cluster_ray.py.)"""
    h5 = fixtures.modelnet_h5(tmp_path / "eval_h5", n_train=40, n_test=8, classes=4)
    base = [
        "train.epochs=1", "train.num_workers=1", "train.deterministic=true",
        f"eval.data={os.path.relpath(h5)}", "train.checkpoint_every_steps=3", "train.max_failures=0",
    ]  # fmt: skip
    broken = tiny(*base)
    steps = resolve_run(broken, storage=str(tmp_path), log=lambda m: None).steps_per_epoch
    # dies at the last step but one; with a checkpoint every 3 steps the relaunch resumes mid-epoch
    every = 3
    fault = steps - 2
    resumed_at = (fault // every) * every
    assert resumed_at % steps != 0  # mid-epoch
    kill = [KillAtStep(fault)]
    code, first = pretrain(broken, name="resumed", storage=str(tmp_path), step_callbacks=kill, log=print)
    assert code == EXIT_FAILED
    assert not checkpoints(tmp_path / "resumed")  # no epoch ended
    assert (tmp_path / "resumed" / f"step_{resumed_at:08d}" / "state.pt").is_file()
    code, second = pretrain(broken, name="resumed", storage=str(tmp_path), log=lambda m: None)
    assert code == EXIT_OK
    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # the same MLflow run continues
    assert second["metrics"]["step"] == steps
    history = json.loads((checkpoints(tmp_path / "resumed")[-1] / HISTORY_FILE).read_text())
    # the relaunch restored the mid-epoch checkpoint and went on from there
    assert [e["attempt_start_step"] for e in history["epochs"]] == [resumed_at]
    logged = [s["step"] for s in history["steps"]]
    assert logged == sorted(set(logged))  # no step logged twice
    # the monitor ran on eval.data and measured its baseline once, before the interruption
    assert 0.0 <= history["baseline"]["random_val_svm_clean"] <= 1.0
    assert all(0.0 <= e["val_svm_clean"] <= 1.0 for e in history["epochs"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(client.get_metric_history(second["mlflow_run_id"], "random_val_svm_clean")) == 1
    assert len(client.get_metric_history(second["mlflow_run_id"], "val_svm_clean")) == 1
