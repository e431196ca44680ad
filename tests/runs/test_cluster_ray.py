"""A real multi-node failure on ``ray.cluster_utils.Cluster``: a head and two worker nodes, one training
worker on each. Mid-epoch, one worker node is removed and a fresh one added; the run must complete, redo at
most ``train.checkpoint_every_steps`` steps, keep the queues identical on every rank and, seeded, end with the
same weights and queues as an uninterrupted run on the same cluster.
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(720)]

CHECKPOINT_EVERY = 5

# Its own process: a simulated cluster cannot share the pytest session's Ray instance, and
# ``Cluster.add_node`` must run in the main thread (training runs in a background thread).
SCRIPT = r"""
import json, sys, threading, time
import ray, torch
from ray.cluster_utils import Cluster
from crossmoco_ray.config.loading import load_config
from crossmoco_ray.pretrain.driver import pretrain
from crossmoco_ray.checkpoints.state import read_checkpoint
from crossmoco_ray.checkpoints.resume import HISTORY_FILE
from mlflow.tracking import MlflowClient

storage, overrides, every = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
SLOT = {"trainer_slot": 1}  # only worker nodes advertise it: training workers never land on the head
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
nodes = [cluster.add_node(num_cpus=1, resources=SLOT) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
cfg = load_config("quickstart", overrides=overrides)

def last(name):
    d = sorted(p for p in (__import__("pathlib").Path(storage) / name).glob("epoch_*"))[-1]
    return read_checkpoint(d), json.loads((d / HISTORY_FILE).read_text())

try:
    code, straight = pretrain(cfg, name="straight", storage=storage, log=lambda m: None)
    assert code == 0, "the uninterrupted run failed"
    spe = straight["metrics"]["step"] // cfg.train.epochs

    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.update(zip(("code", "summary"),
                                          pretrain(cfg, name="faulty", storage=storage, log=print))))
    thread.start()
    progress = __import__("pathlib").Path(storage) / "faulty" / "progress.json"
    seen = 0
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive():  # a mid-epoch checkpoint inside epoch 2
        if progress.is_file():
            try:
                seen = json.loads(progress.read_text())["step"]
            except (ValueError, KeyError):
                seen = 0
        if spe < seen < 2 * spe - every:
            break
        time.sleep(0.05)
    time.sleep(0.5)  # a step or two past that checkpoint: work that the restart has to redo
    alive_before = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    cluster.remove_node(nodes[1])  # kills the training worker on it, mid-epoch
    removed_at = seen
    cluster.add_node(num_cpus=1, resources=SLOT)  # a fresh node takes its place
    thread.join(timeout=400)
    assert outcome.get("code") == 0, f"the run did not complete: {outcome}"

    sa, ha = last("straight")
    sb, hb = last("faulty")
    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    steps = [m.step for m in client.get_metric_history(outcome["summary"]["mlflow_run_id"], "loss")]
    print("RESULT " + json.dumps({
        "steps_per_epoch": spe,
        "removed_at_progress_step": removed_at,
        "removed_node": nodes[1].node_id,
        "alive_before": alive_before,
        "epochs": hb["epochs"],
        "straight_epochs": ha["epochs"],
        "same_step": sa["step"] == sb["step"],
        "weights_equal": all(torch.equal(v, sb["model"][k]) for k, v in sa["model"].items()),
        "differing": [k for k, v in sa["model"].items() if not torch.equal(v, sb["model"][k])][:5],
        "queue_checksums": [sa["queue_checksum"], sb["queue_checksum"]],
        "logged_steps": steps,
    }))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.fixture(scope="module")
def node_loss(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    overrides = [
        *TINY, "data.synthetic_train=220", "train.epochs=2", "train.num_workers=2",
        "train.cpus_per_worker=1", "train.data_cpus=1", "train.placement_strategy=SPREAD",
        "train.worker_resources={trainer_slot: 1}", "train.deterministic=true", "train.log_every=1",
        f"train.checkpoint_every_steps={CHECKPOINT_EVERY}", "train.max_failures=2",
        "eval.monitor_samples=20",
    ]  # fmt: skip
    storage = tmp_path_factory.mktemp("runs")
    env_tmp = Path(tempfile.mkdtemp(prefix="crt", dir="/tmp"))  # unix socket paths must stay < 108 bytes
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(storage), json.dumps(overrides), str(CHECKPOINT_EVERY)],
            capture_output=True,
            text=True,
            timeout=700,
            env={**os.environ, "RAY_TMPDIR": str(env_tmp), "RAY_ADDRESS": ""},
        )
    finally:
        shutil.rmtree(env_tmp, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-4000:] + done.stderr[-4000:]
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    result["log"] = done.stdout
    return result


def test_the_run_survives_losing_a_node_mid_epoch(node_loss: dict[str, Any]) -> None:
    spe = node_loss["steps_per_epoch"]
    assert spe < node_loss["removed_at_progress_step"] < 2 * spe  # the node went away inside epoch 2
    epochs = node_loss["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    # one training worker per node, never on the head; the relaunched group is on the surviving node and
    # the fresh one
    assert len(set(epochs[0]["node_ids"])) == 2
    assert node_loss["removed_node"] in epochs[0]["node_ids"]
    assert node_loss["removed_node"] not in epochs[-1]["node_ids"]
    assert len(set(epochs[-1]["node_ids"])) == 2


def test_at_most_checkpoint_every_steps_are_redone(node_loss: dict[str, Any]) -> None:
    restart = node_loss["epochs"][1]["attempt_start_step"]
    assert restart % CHECKPOINT_EVERY == 0
    assert restart >= node_loss["removed_at_progress_step"]  # from the newest checkpoint, mid-epoch
    assert restart % node_loss["steps_per_epoch"] != 0
    logged = node_loss["logged_steps"]  # rank 0 logs every step: a redone step is logged twice
    redone = len(logged) - len(set(logged))
    assert redone <= CHECKPOINT_EVERY, sorted(logged)
    assert len(set(logged)) == node_loss["epochs"][-1]["step"]  # every step was logged, none skipped


def test_queues_are_identical_on_every_rank(node_loss: dict[str, Any]) -> None:
    for epoch in node_loss["epochs"]:
        a, b = epoch["queue_checksums"]
        assert a == b, epoch["epoch"]


def test_seeded_run_ends_exactly_as_an_uninterrupted_one(node_loss: dict[str, Any]) -> None:
    assert node_loss["same_step"]
    assert node_loss["weights_equal"], node_loss["differing"]
    straight, faulty = node_loss["queue_checksums"]
    assert straight == faulty
