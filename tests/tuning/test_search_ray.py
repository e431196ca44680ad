"""A real search on Ray Tune (CPU, tiny model and data): trials, ASHA, MLflow parent/children, best preset,
resume after an interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from crossmoco_ray.checkpoints.resume import HISTORY_FILE
from crossmoco_ray.config.loading import load_config
from crossmoco_ray.pretrain.resolve import resolve_run
from crossmoco_ray.tuning import parse_space
from crossmoco_ray.tuning.search import tune_search
from tests.data import fixtures
from tests.pretrain.test_pretrain_ray import TINY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SEARCH = [
    *TINY, "data.val_fraction=0.5", "train.epochs=2", "train.num_workers=1", "train.deterministic=true",
    "eval.eval_every=1", "eval.monitor_samples=60", "tune.metric=loss", "tune.mode=min",
    "tune.grace_period=1", "tune.reduction_factor=2", "tune.max_concurrent_trials=1",
]  # fmt: skip
# Sequential trials in grid order. The first sets the rungs; the second is made clearly worse by construction,
# independent of what 2 tiny epochs learn: its point loss is weighted 100×, so its total loss (the metric this
# search ranks by, mode min) is far above the first's. At its first rung it is below the median and ASHA
# stops it. (The monitor's accuracies of two tiny 2-epoch trials are too close to order them reliably.)
SPACE = {
    "objective.momentum": {"one_minus_loguniform": [1.0e-3, 1.0e-2]},
    "objective.temperature": {"loguniform": [0.07, 0.2]},
    "objective.queue_length": {"choice": [64, 128]},
    "objective.weight_point": {"grid": [1.0, 100.0]},
}


@pytest.fixture(scope="module")
def search(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    storage = tmp_path_factory.mktemp("tune")
    # the monitor reads another labelled dataset, named relative to the driver's working directory (trials
    # run in their own directories: the path must be made absolute before it reaches them)
    fixtures.modelnet_h5(storage / "eval_h5", n_train=40, n_test=8, classes=4)
    cwd = os.getcwd()
    os.chdir(storage)
    try:
        cfg = load_config("quickstart", overrides=[*SEARCH, "eval.data=eval_h5"])
        lines: list[str] = []
        code, summary = tune_search(
            cfg, parse_space(SPACE, "test", name="test"), name="s", storage=str(storage), trials=1,
            log=lines.append,
        )  # fmt: skip
    finally:
        os.chdir(cwd)
    return {"code": code, "summary": summary, "storage": storage, "log": "\n".join(lines)}


def _mlflow(summary: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return client, parent, children


def test_search_runs_two_trials_and_asha_stops_the_worse(search: dict[str, Any]) -> None:
    assert search["code"] == 0, search["log"]
    rows = {row["objective.weight_point"]: row for row in search["summary"]["rows"]}
    assert set(rows) == {1.0, 100.0}
    good, bad = rows[1.0], rows[100.0]
    assert good["status"] == "completed", search["log"]
    assert good["epochs"] == 2
    assert bad["status"] == "stopped_early", search["log"]
    assert bad["epochs"] == 1
    assert good["loss"] < bad["loss"]
    # every trial's monitor read eval.data, found through the absolute path stored in the search's state
    state = json.loads((search["storage"] / "s" / "crossmoco_search.json").read_text())
    assert state["base"]["eval"]["data"] == str((search["storage"] / "eval_h5").resolve())


def test_mlflow_holds_a_parent_and_a_child_per_trial(search: dict[str, Any]) -> None:
    client, parent, children = _mlflow(search["summary"])
    assert parent.info.status == "FINISHED"
    assert "space.objective.momentum" in parent.data.params
    assert len(children) == 2
    by_status = {c.data.tags["tune_status"]: c for c in children}
    assert set(by_status) == {"completed", "stopped_early"}
    assert by_status["completed"].info.status == "FINISHED"
    assert by_status["stopped_early"].info.status == "KILLED"
    rows = {r["trial_id"]: r for r in search["summary"]["rows"]}
    for child in children:
        row = rows[child.data.tags["trial_id"]]
        params = child.data.params
        for key in ("objective.momentum", "objective.temperature", "objective.queue_length"):
            assert float(params[key]) == pytest.approx(float(row[key]))
        assert 0.99 <= float(params["objective.momentum"]) <= 0.999
        assert {"val_svm_crosspoint", "val_svm_clean", "val_knn"} <= set(child.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.md", "trials.csv", "best.yaml", "loss_vs_params.png"} <= artifacts


def test_best_preset_loads_and_resolves(search: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The search's best.yaml is a configuration a run starts from: it loads, and resolves against its data
    (the trials already trained on these values)."""
    monkeypatch.chdir(search["storage"])  # best.yaml keeps the user's relative eval.data
    best = Path(search["summary"]["best_config"])
    assert best.is_file()
    assert search["summary"]["best"]["objective.weight_point"] == 1.0
    cfg = load_config(config_file=best, overrides=["train.epochs=1", "tracking.enabled=false"])
    assert cfg.objective.weight_point == 1.0
    assert cfg.objective.momentum == pytest.approx(search["summary"]["best"]["objective.momentum"])
    run = resolve_run(cfg, name="from-best", storage=str(search["storage"]), log=lambda m: None)
    assert run.steps_per_epoch > 0
    assert run.cfg.eval.data is not None
    assert Path(run.cfg.eval.data).is_absolute()  # resolved here, as the workers need it


# The interruption test runs the CLI in its own process (its own local Ray), stops it with SIGINT once the
# first trial has a checkpoint, then resumes the search by name.
def test_interrupted_search_resumes(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({k: v for k, v in SPACE.items() if k != "objective.weight_point"}))
    storage = tmp_path / "runs"
    overrides = [*SEARCH, "train.epochs=2", "tune.scheduler=fifo"]
    cmd = [sys.executable, "-m", "crossmoco_ray.cli", "tune", "--space", str(space), "--trials", "1",
           "--name", "s", "--storage", str(storage), *overrides]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(_short_tmp())}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    trials = storage / "s" / "trials"
    while time.monotonic() < deadline and not list(trials.glob("*/epoch_0001/state.pt")):
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "--resume" in out
    started = {p.parents[1].name for p in trials.glob("*/epoch_0001/state.pt")}
    unfinished = started - {p.parents[1].name for p in trials.glob("*/epoch_0002/state.pt")}
    assert unfinished, out[-3000:]  # a trial was interrupted after a checkpoint and before its end

    resumed = subprocess.run(
        [sys.executable, "-m", "crossmoco_ray.cli", "tune", "--name", "s", "--storage", str(storage),
         "--resume"], env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-4000:]
    assert "resuming search s" in log
    assert len(list(trials.glob("*/epoch_0002/state.pt"))) == 1, log[-3000:]
    summary = (storage / "s" / "summary" / "trials.md").read_text()
    assert summary.count("| completed |") == 1
    # The interrupted trial went on from its checkpoint, not from scratch.
    for trial in unfinished:
        history = json.loads((trials / trial / "epoch_0002" / HISTORY_FILE).read_text())
        assert history["epochs"][-1]["attempt_start_step"] > 0, history["epochs"]


def _short_tmp() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="crt", dir="/tmp"))  # unix socket paths must stay < 108 bytes
