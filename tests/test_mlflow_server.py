"""Against a real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts proxied by the server), started
and stopped here: a run as `crossmoco pretrain` makes it (start_tracking, rank-0 metrics, the real
``finish()``: artifacts, the model, a registered version), read back through the server. No Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from crossmoco_ray.config.loading import load_config
from crossmoco_ray.pretrain.driver import finish
from crossmoco_ray.pretrain.resolve import Run, start_tracking
from crossmoco_ray.version import COMMIT_ENV
from tests.test_tracking import TINY, assert_same_features, tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MLFLOW = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
REGISTERED = "crossmoco-server-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (the CLI and the uvicorn it starts), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the uvicorn child leaves with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    pytest.fail(f"processes of the mlflow server (group {proc.pid}) outlived it")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, Path | str]]:
    if not Path(MLFLOW).exists():
        pytest.skip("the mlflow CLI is not installed")
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    # --serve-artifacts (the default, named for clarity): clients upload and download artifacts through the
    # server, which stores them under --artifacts-destination; clients never need the store's path.
    cmd = [
        MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(url, proc, log)
        yield {"url": url, "artifacts": root / "artifacts"}
    finally:
        stop(proc)


def test_a_pretraining_run_reads_back_through_the_server(
    server: dict[str, Path | str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    url = str(server["url"])
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv(COMMIT_ENV, "feedc0de")  # as cluster/submit.sh sets it for a job

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    cfg = load_config(
        "quickstart",
        overrides=[*TINY, f"tracking.tracking_uri={url}", f"tracking.register_model={REGISTERED}"],
    )
    run = Run(cfg, "server-run", str(tmp_path / "runs"), "unused", {}, 1, tracking_uri=url)
    tracker = start_tracking(run, "quickstart")
    run_id = tracker.run_id
    assert run_id is not None
    assert start_tracking(run, "quickstart").run_id == run_id  # a relaunch resumes it through the server

    # rank 0 logs per-step metrics into the same run by id; the driver then runs the real finish()
    from crossmoco_ray.tracking import Tracker

    worker = Tracker(url, run_id)
    worker.log_metrics({"loss": 1.5, "lr": 1e-3}, step=1)
    worker.log_metrics({"loss": 0.75, "lr": 1e-3}, step=2)
    lines: list[str] = []
    out = finish(run, ckpt, tracker, lines.append)
    tracker.end("FINISHED")
    assert "model_error" not in out, out.get("model_error")
    assert out["model"].registered_uri == f"models:/{REGISTERED}/1"
    assert any(f"models:/{REGISTERED}/1" in line for line in lines)

    client = MlflowClient(tracking_uri=url)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "server-run"
    assert got.data.params["model.k"] == "4"
    assert got.data.tags["git_commit"] == "feedc0de"
    assert got.data.tags["crossmoco_version"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 1.5), (2, 0.75)]

    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "export")
    }
    assert {"config.yaml", "export/backbone.pt", "export/meta.json"} <= artifacts
    meta = json.loads(Path(client.download_artifacts(run_id, "export/meta.json", str(tmp_path))).read_text())
    assert meta["architecture"] == "dgcnn"
    # the server stored them (proxied uploads), not this client
    assert any(p.name == "backbone.pt" for p in Path(server["artifacts"]).rglob("*"))

    experiment = got.info.experiment_id
    models = client.search_logged_models(experiment_ids=[experiment])  # in the run's experiment
    assert [(m.source_run_id, m.status.to_int()) for m in models] == [
        (run_id, LoggedModelStatus.READY.to_int())
    ]
    version = client.get_model_version(REGISTERED, "1")
    assert version.run_id == run_id
    assert version.status == "READY"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # models:/ URIs resolve against the global store
    export = Path(out["export"])
    assert_same_features(mlflow.pytorch.load_model(f"models:/{REGISTERED}/1"), export)
    assert_same_features(mlflow.pytorch.load_model(out["model"].model_uri), export)
