"""Real multi-node failures on ``ray.cluster_utils.Cluster``: a head and two worker nodes, one training worker
on each (one cluster, one process, for both scenarios: a cluster's start is paid once).

**A fixed-size run.** Mid-epoch, one worker node is removed and a fresh one added; the run must complete, redo
at most ``train.checkpoint_every_steps`` steps, keep the queues identical on every rank and, seeded, end with
the same weights and queues as an uninterrupted run on the same cluster.

**An elastic run** (``train.num_workers=[1, 2]``). Mid-epoch one worker node is removed: the run goes on with
one worker (it does not wait for the capacity to come back); then a node is added and the run grows back to
two. It must complete with the queues identical on every rank after each resize, every sample position of
every epoch trained (none skipped), none trained twice beyond one checkpoint interval per restart, and a
continuous count of samples seen. The global batch is 12 at two workers and 6 at one, and the queue of 64
keys is a multiple of neither, so the queue wraps around its end at both sizes. Ray Train notices a lost node
at once but its view of the cluster's capacity (Ray Data's autoscaling coordinator) refreshes every 20 s (the
test asks it to refresh after each change); a start at the old size waits for
``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (6 s for this run, 60 s by default; each one a failure) before the
smaller size is tried. One worker's steps are slowed
(``PaceBelow``) so that the run is still going when the node returns; how long it trains at one worker is
set by how soon Ray Train sees the node, not by the pace.
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CHECKPOINT_EVERY = 5
ELASTIC_EVERY = 4  # the elastic run's train.checkpoint_every_steps
PER_WORKER = 6  # its batch per worker
ELASTIC_EPOCHS = 2

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
from tests.helpers import PaceBelow
import os
from pathlib import Path

storage, overrides, every = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
elastic_overrides, elastic_every = json.loads(sys.argv[4]), int(sys.argv[5])
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

# Ray Data's autoscaling coordinator, from which elastic Ray Train reads the cluster's capacity, refreshes
# its view every 20 s; ask it now, as that tick would, so the test waits for the run's handling of the
# change rather than for Ray's clock (docs/cluster.md gives the real latencies).
def refresh_capacity():
    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        ray.get(coordinator.get_reserved_resources.remote("crossmoco-test", recompute=True), timeout=30)
    except Exception as err:  # no coordinator (yet): the run waits for the periodic refresh instead
        print(f"capacity not refreshed: {err}", flush=True)

def wait_for(what, test, limit):
    deadline = time.time() + limit
    while time.time() < deadline and thread.is_alive():
        p = position()
        if p is not None and test(p):
            events.append((what, round(time.time() - t0, 1), p))
            return p
        time.sleep(0.1)
    raise SystemExit(f"no {what} within {limit} s: {position()}")


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
    fresh = cluster.add_node(num_cpus=1, resources=SLOT)  # a fresh node takes its place
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
    }), flush=True)

    # the elastic run, on the same cluster (its nodes: nodes[0] and the fresh one)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "6"  # propagated to this run's controller only
    cfg = load_config("quickstart", overrides=elastic_overrides)
    every = elastic_every
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(zip(("code", "summary"), pretrain(
        cfg, name="elastic", storage=storage, log=print, step_callbacks=[PaceBelow(2, 1.0)]))))
    thread.start()
    # a mid-epoch checkpoint at two workers (Ray's view of the cluster may lag: the run may start with one
    # and grow first); then a node goes
    at_two = wait_for("checkpoint at 2 workers", lambda p: p["world"] == 2 and p["step"] >= every, 240)
    cluster.remove_node(fresh)  # (graceful: the cluster learns at once; a killed raylet is found dead only
    refresh_capacity()  # after its heartbeats are missed, ~30 s)
    # the run goes on with one worker and keeps a checkpoint at that size (a growth before it would discard
    # the one-worker steps: the bigger group restarts from the last checkpoint); then a node comes back
    wait_for("checkpoint at 1 worker", lambda p: p["world"] == 1, 240)
    cluster.add_node(num_cpus=1, resources=SLOT)
    refresh_capacity()
    grown = at_two["resizes"] + 2
    wait_for("checkpoint at 2 workers again", lambda p: p["world"] == 2 and p["resizes"] == grown, 240)
    thread.join(timeout=300)
    assert outcome.get("code") == 0, f"the elastic run did not complete: {outcome}"
    final = sorted(run.glob("epoch_*"))[-1]
    history = json.loads((final / HISTORY_FILE).read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    rid = outcome["summary"]["mlflow_run_id"]
    logged = {k: [(m.timestamp, m.step, m.value) for m in client.get_metric_history(rid, k)]
              for k in ("samples", "world_size")}
    manifest = json.loads(next(Path(storage).glob("_builtin/*/manifest.json")).read_text())
    print("ELASTIC " + json.dumps({"history": history, "logged": logged, "events": events,
                                  "rows": manifest["counts"]["train"]["total"],
                                  "position": json.loads((final / "position.json").read_text())}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both scenarios in one process on one simulated cluster: the fixed-size runs, then the elastic one."""
    overrides = [
        *TINY, "data.synthetic_train=220", "train.epochs=2", "train.num_workers=2",
        "train.cpus_per_worker=1", "train.data_cpus=1", "train.placement_strategy=SPREAD",
        "train.worker_resources={trainer_slot: 1}", "train.deterministic=true", "train.log_every=1",
        f"train.checkpoint_every_steps={CHECKPOINT_EVERY}", "train.max_failures=2",
        "eval.monitor_samples=20",
    ]  # fmt: skip
    elastic = [
        *TINY,
        "data.synthetic_train=220",
        f"train.epochs={ELASTIC_EPOCHS}",
        "train.batch_size=null",
        f"train.batch_size_per_worker={PER_WORKER}",
        "train.num_workers=[1,2]",
        "train.elastic_resize_interval_s=3",
        "train.cpus_per_worker=1",
        "train.data_cpus=1",
        "train.placement_strategy=SPREAD",
        "train.worker_resources={trainer_slot: 1}",
        "train.log_every=1",
        f"train.checkpoint_every_steps={ELASTIC_EVERY}",
        "train.max_failures=12",
        "eval.monitor_samples=20",
    ]  # fmt: skip  (the same data settings: the built-in dataset is prepared once)
    storage = tmp_path_factory.mktemp("runs")
    env_tmp = Path(tempfile.mkdtemp(prefix="crt", dir="/tmp"))  # unix socket paths must stay < 108 bytes
    args = [
        str(storage),
        json.dumps(overrides),
        str(CHECKPOINT_EVERY),
        json.dumps(elastic),
        str(ELASTIC_EVERY),
    ]
    env = {
        **os.environ,
        "RAY_TMPDIR": str(env_tmp),
        "RAY_ADDRESS": "",
        # the workers unpickle the elastic run's step callback from tests.helpers
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")])),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=860, env=env
        )
        out, err = done.stdout, done.stderr
    except subprocess.TimeoutExpired as timeout:  # what it printed so far still says what happened
        out, err = _text(timeout.stdout), _text(timeout.stderr) + "\n(timed out)"
    finally:
        shutil.rmtree(env_tmp, ignore_errors=True)
    results: dict[str, Any] = {"log": out, "err": err}
    for line in out.splitlines():
        for key, tag in (("node_loss", "RESULT "), ("elastic", "ELASTIC ")):
            if line.startswith(tag):
                results[key] = json.loads(line.removeprefix(tag))
    return results


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def _scenario(runs: dict[str, Any], key: str) -> dict[str, Any]:
    assert key in runs, runs["log"][-6000:] + runs["err"][-4000:]
    return {**runs[key], "log": runs["log"]}


@pytest.fixture(scope="module")
def node_loss(cluster_runs: dict[str, Any]) -> dict[str, Any]:
    return _scenario(cluster_runs, "node_loss")


@pytest.fixture(scope="module")
def elastic(cluster_runs: dict[str, Any]) -> dict[str, Any]:
    return _scenario(cluster_runs, "elastic")


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


# ---- the elastic run ----


def _runs(values: list[int]) -> list[int]:
    """``values`` with consecutive repeats collapsed."""
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


def test_the_run_shrinks_to_one_worker_and_grows_back_to_two(elastic: dict[str, Any]) -> None:
    """(Ray's view of the cluster refreshes every 20 s: a run that starts before it counts both nodes
    starts with one worker and grows first; then it goes through the same shrink and growth.)"""
    for what, seconds, position in elastic["events"]:  # the timeline (shown with pytest -rP)
        print(f"{seconds:7.1f} s  {what}: {position}")
    steps = elastic["history"]["steps"]
    assert _runs([s["world_size"] for s in steps])[-3:] == [2, 1, 2], elastic["events"]
    resizes = elastic["history"]["resizes"]
    assert [(r["from"], r["to"]) for r in resizes][-2:] == [(2, 1), (1, 2)]
    assert elastic["position"]["resizes"] == len(resizes)
    assert "resized: 2 → 1 workers" in elastic["log"]
    assert "resized: 1 → 2 workers" in elastic["log"]


def test_queues_are_identical_on_every_rank_after_each_resize(elastic: dict[str, Any]) -> None:
    for resize in elastic["history"]["resizes"]:
        checksums = resize["queue_checksums"]
        assert len(checksums) == resize["to"]
        assert len(set(checksums)) == 1, resize
    epochs = elastic["history"]["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, ELASTIC_EPOCHS + 1))
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
        per_epoch * (i + 1) for i in range(ELASTIC_EPOCHS)
    ]
    assert end == ELASTIC_EPOCHS * per_epoch


def test_at_most_one_checkpoint_interval_is_trained_twice_per_restart(elastic: dict[str, Any]) -> None:
    """Everything logged (the killed attempts' steps too, in MLflow) against the samples kept."""
    samples = sorted(elastic["logged"]["samples"])  # (time, step, value): in the order they were logged
    worlds = {(t, step): w for t, step, w in elastic["logged"]["world_size"]}
    trained = sum(PER_WORKER * worlds[(t, step)] for t, step, _ in samples)
    restarts = elastic["log"].count("resumed from ")  # rank 0's line at every restart from a checkpoint
    assert restarts >= 2  # the node loss and the growth (a start timing out trains nothing)
    redone = trained - elastic["position"]["samples"]
    biggest = PER_WORKER * 2
    assert 0 <= redone <= restarts * (ELASTIC_EVERY * biggest + biggest), (redone, restarts)
