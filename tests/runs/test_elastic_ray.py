"""Elastic training on ``ray.cluster_utils.Cluster``: ``train.num_workers=[1, 2]`` on a head and two
worker nodes (one training worker each). Mid-epoch one worker node is removed: the run goes on with one
worker (it does not wait for the capacity to come back); then a node is added and the run grows back to
two. It must
complete with the queues identical on every rank after each resize, every sample position of every epoch
trained (none skipped), none trained twice beyond one checkpoint interval per restart, and a continuous count
of samples seen.

The global batch is 12 at two workers and 6 at one, and the queue of 64 keys is a multiple of neither, so the
queue wraps around its end at both sizes. Ray Train notices a lost node at once but its view of the cluster's
capacity (Ray Data's autoscaling coordinator) refreshes every 20 s: a start at the old size waits for
``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (12 s here, 60 s by default) before the smaller size is tried.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.pretrain.test_pretrain_ray import TINY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EVERY = 4  # train.checkpoint_every_steps
PER_WORKER = 6
EPOCHS = 3
ROWS = 220

SCRIPT = r"""
import json, sys, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from crossmoco_ray.config.loading import load_config
from crossmoco_ray.pretrain.driver import pretrain
from crossmoco_ray.checkpoints.resume import HISTORY_FILE
from mlflow.tracking import MlflowClient
from tests.helpers import PaceBelow

storage, overrides, every = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
SLOT = {"trainer_slot": 1}  # only worker nodes advertise it: training workers never land on the head
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
nodes = [cluster.add_node(num_cpus=1, resources=SLOT) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
cfg = load_config("quickstart", overrides=overrides)
run = Path(storage) / "elastic"
t0 = time.time()
events = []

def position():
    try:
        name = json.loads((run / "progress.json").read_text())["checkpoint"]
        return json.loads((run / name / "position.json").read_text())
    except (OSError, ValueError, KeyError):
        return None

def wait_for(what, test, limit):
    deadline = time.time() + limit
    while time.time() < deadline and thread.is_alive():
        p = position()
        if p is not None and test(p):
            events.append((what, round(time.time() - t0, 1), p))
            return p
        time.sleep(0.1)
    raise SystemExit(f"no {what} within {limit} s: {position()}")

try:
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(zip(("code", "summary"), pretrain(
        cfg, name="elastic", storage=storage, log=print, step_callbacks=[PaceBelow(2, 0.5)]))))
    thread.start()
    # a mid-epoch checkpoint of the first epoch at two workers; then a node goes
    wait_for("checkpoint at 2 workers", lambda p: p["world"] == 2 and p["step"] >= 2 * every, 240)
    cluster.remove_node(nodes[1])
    # the run goes on with one worker (a checkpoint written at that size); then a node comes back
    wait_for("checkpoint at 1 worker", lambda p: p["world"] == 1, 240)
    cluster.add_node(num_cpus=1, resources=SLOT)
    wait_for("checkpoint at 2 workers again", lambda p: p["world"] == 2 and p["resizes"] == 2, 240)
    thread.join(timeout=300)
    assert outcome.get("code") == 0, f"the run did not complete: {outcome}"
    last = sorted(run.glob("epoch_*"))[-1]
    history = json.loads((last / HISTORY_FILE).read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    rid = outcome["summary"]["mlflow_run_id"]
    logged = {k: [(m.timestamp, m.step, m.value) for m in client.get_metric_history(rid, k)]
              for k in ("samples", "world_size")}
    manifest = json.loads(next(Path(storage).glob("_builtin/*/manifest.json")).read_text())
    print("RESULT " + json.dumps({"history": history, "logged": logged, "events": events,
                                  "rows": manifest["counts"]["train"]["total"],
                                  "position": json.loads((last / "position.json").read_text())}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.fixture(scope="module")
def elastic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    overrides = [
        *TINY, f"data.synthetic_train={ROWS}", f"train.epochs={EPOCHS}", "train.batch_size=null",
        f"train.batch_size_per_worker={PER_WORKER}", "train.num_workers=[1,2]",
        "train.elastic_resize_interval_s=3", "train.cpus_per_worker=1", "train.data_cpus=1",
        "train.placement_strategy=SPREAD", "train.worker_resources={trainer_slot: 1}", "train.log_every=1",
        f"train.checkpoint_every_steps={EVERY}", "train.max_failures=6", "eval.monitor_samples=20",
    ]  # fmt: skip
    storage = tmp_path_factory.mktemp("runs")
    env_tmp = Path(tempfile.mkdtemp(prefix="cre", dir="/tmp"))  # unix socket paths must stay < 108 bytes
    env = {
        **os.environ,
        "RAY_TMPDIR": str(env_tmp),
        "RAY_ADDRESS": "",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "12",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")])),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(storage), json.dumps(overrides), str(EVERY)],
            capture_output=True,
            text=True,
            timeout=560,
            env=env,
        )
    finally:
        shutil.rmtree(env_tmp, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-6000:] + done.stderr[-4000:]
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    result["log"] = done.stdout
    return result


def _runs(values: list[int]) -> list[int]:
    """``values`` with consecutive repeats collapsed."""
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


def test_the_run_shrinks_to_one_worker_and_grows_back_to_two(elastic: dict[str, Any]) -> None:
    steps = elastic["history"]["steps"]
    assert _runs([s["world_size"] for s in steps]) == [2, 1, 2], elastic["events"]
    resizes = elastic["history"]["resizes"]
    assert [(r["from"], r["to"]) for r in resizes] == [(2, 1), (1, 2)]
    assert elastic["position"]["resizes"] == 2
    assert "resized: 2 → 1 workers" in elastic["log"]
    assert "resized: 1 → 2 workers" in elastic["log"]


def test_queues_are_identical_on_every_rank_after_each_resize(elastic: dict[str, Any]) -> None:
    for resize in elastic["history"]["resizes"]:
        checksums = resize["queue_checksums"]
        assert len(checksums) == resize["to"]
        assert len(set(checksums)) == 1, resize
    epochs = elastic["history"]["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    for epoch in epochs:
        assert len(set(epoch["queue_checksums"])) == 1, epoch
    assert len(epochs[-1]["queue_checksums"]) == 2


def test_every_sample_position_is_trained_and_the_count_is_continuous(elastic: dict[str, Any]) -> None:
    """The successful chain of steps (the final history) tiles the samples: each step's range
    [samples − global batch, samples) starts where the previous one ended, or, just after a resize, up to
    one batch before it (the batch that holds the checkpoint's sample is trained again)."""
    steps = elastic["history"]["steps"]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    end = 0
    for s in steps:
        batch = PER_WORKER * s["world_size"]
        start = s["samples"] - batch
        assert start <= end, f"samples {end} … {start} skipped at step {s['step']}"
        assert end - start < batch, f"more than a batch trained again at step {s['step']}"
        end = s["samples"]
    # every epoch trained to its end at every size (the train split's rows, less what the split drops)
    rows = elastic["rows"]
    per_epoch = (rows // 2) // PER_WORKER * PER_WORKER * 2
    assert per_epoch == rows // PER_WORKER * PER_WORKER  # the same at one worker: the test's premise
    assert [e["samples"] for e in elastic["history"]["epochs"]] == [
        per_epoch * (i + 1) for i in range(EPOCHS)
    ]
    assert end == EPOCHS * per_epoch


def test_at_most_one_checkpoint_interval_is_trained_twice_per_restart(elastic: dict[str, Any]) -> None:
    """Everything logged (the killed attempts' steps too, in MLflow) against the samples kept."""
    samples = sorted(elastic["logged"]["samples"])  # (time, step, value): in the order they were logged
    worlds = {(t, step): w for t, step, w in elastic["logged"]["world_size"]}
    trained = sum(PER_WORKER * worlds[(t, step)] for t, step, _ in samples)
    restarts = elastic["log"].count("resumed from ")  # rank 0's line at every restart from a checkpoint
    assert restarts >= 2  # the node loss and the growth (a start timing out trains nothing)
    redone = trained - elastic["position"]["samples"]
    biggest = PER_WORKER * 2
    assert 0 <= redone <= restarts * (EVERY * biggest + biggest), (redone, restarts)
