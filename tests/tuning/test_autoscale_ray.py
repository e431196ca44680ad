"""A search on a cluster that grows while it runs: trials are not throttled by the resources present at
start, a trial whose workers do not fit waits (its placement group is pending demand, asked for again after
every worker-group start timeout) and starts on the node that is added, alongside the first trial."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.pretrain.test_pretrain_ray import TINY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

START_TIMEOUT_S = 5  # Train's worker-group start timeout: the waiting trial lives through several
WORKER_CPUS = 1.5  # the head (3 CPUs) holds one trial's worker (+ 2 drivers, 1 CPU for Ray Data), not two

# Its own process: a simulated cluster cannot share the pytest session's Ray instance, and Cluster.add_node
# must run in the main thread, so the search runs in a thread (RAY.md §6.3).
SCRIPT = """
import json, sys, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table
from crossmoco_ray.config.loading import load_config
from crossmoco_ray.tuning import parse_space
from crossmoco_ray.tuning.search import tune_search

storage, overrides, worker_cpus = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
cluster.wait_for_nodes()
ray.init(address=cluster.address)
out = {}

def search():
    try:
        cfg = load_config("quickstart", overrides=overrides)
        space = parse_space({"train.seed": {"grid": [1, 2]}}, "test", name="scale")
        out["code"], _ = tune_search(cfg, space, name="s", storage=storage, trials=1, log=print)
    except BaseException as err:
        out["error"] = repr(err)

def worker_groups():
    return [pg["state"] for pg in placement_group_table().values()
            if list(pg["bundles"].values()) == [{"CPU": worker_cpus}]]

started = time.time()
thread = threading.Thread(target=search, daemon=True)
thread.start()
# Wait until one trial trains on the head and the other's worker group timed out at least once.
groups = []
while thread.is_alive() and time.time() - started < 240:
    groups = worker_groups()
    trained = list(Path(storage).glob("s/trials/*/*/state.pt"))
    if trained and "REMOVED" in groups and "PENDING" in groups:
        break
    time.sleep(0.5)
added_at = time.time()
node = cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
thread.join(timeout=300)
print("RESULT " + json.dumps({**out, "groups_before_add": groups, "started": started, "added_at": added_at,
                              "head": cluster.head_node.node_id, "added": node.node_id}), flush=True)
ray.shutdown()
cluster.shutdown()
"""


def _trial_reports(search_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every Tune result of every trial, as the trials reported them (Tune's result.json, one per line)."""
    reports = {}
    for path in search_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            reports[rows[0]["trial_id"]] = rows
    return reports


def test_two_trials_run_at_once_after_a_node_is_added(tmp_path: Path) -> None:
    overrides = [*TINY, "data.val_fraction=0", "train.epochs=6", "train.num_workers=1",
                 f"train.cpus_per_worker={WORKER_CPUS}", "train.data_cpus=1", "tune.scheduler=fifo",
                 "tune.metric=loss", "tune.mode=min", "tracking.enabled=false"]  # fmt: skip
    env_tmp = Path(tempfile.mkdtemp(prefix="crt", dir="/tmp"))  # unix socket paths must stay < 108 bytes
    env = {**os.environ, "RAY_TMPDIR": str(env_tmp), "RAY_ADDRESS": "",
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(START_TIMEOUT_S)}  # fmt: skip
    t0 = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(overrides), str(WORKER_CPUS)],
            capture_output=True, text=True, timeout=390, env=env,
        )  # fmt: skip
    finally:
        shutil.rmtree(env_tmp, ignore_errors=True)
    print(f"autoscale search: {time.monotonic() - t0:.0f} s")
    log = done.stdout[-4000:] + done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, log
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result.get("code") == 0, (result, log)
    # Before the node came: the first trial's workers held the head, the second's group was pending demand,
    # and after each start timeout it was asked for again (the removed groups) instead of failing the trial.
    assert "CREATED" in result["groups_before_add"], result
    assert "PENDING" in result["groups_before_add"], result
    assert "REMOVED" in result["groups_before_add"], result

    reports = _trial_reports(tmp_path / "s")
    assert len(reports) == 2, log
    nodes = {trial: {r["node_id"] for r in rows} for trial, rows in reports.items()}
    # one trial trained on the head, the other on the node added during the search
    on_head = [trial for trial, ids in nodes.items() if ids == {result["head"]}]
    on_added = [trial for trial, ids in nodes.items() if ids == {result["added"]}]
    assert len(on_head) == len(on_added) == 1, nodes
    assert reports[on_added[0]][0]["timestamp"] >= int(result["added_at"])  # it could only start then
    # Both trained at the same time: each trial's training spans from its first epoch's start (first report
    # minus that epoch's seconds) to its last report; the two spans overlap (timestamps are whole seconds).
    spans = [
        (rows[0]["timestamp"] - rows[0]["epoch_seconds"], rows[-1]["timestamp"]) for rows in reports.values()
    ]
    print(f"node added at {result['added_at'] - result['started']:.0f} s; spans {spans}")
    assert all(rows[-1]["epoch"] == 6 for rows in reports.values())
    assert max(start for start, _ in spans) + 1 < min(end for _, end in spans), spans
