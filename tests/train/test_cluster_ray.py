"""A 2-node run on ``ray.cluster_utils.Cluster``: the two workers land on different nodes and train."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.train.test_pretrain_ray import TINY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Its own process: a simulated cluster cannot share the pytest session's Ray instance.
SCRIPT = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from crossmoco_ray.config import load_config
from crossmoco_ray.pretrain import pretrain

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
for _ in range(2):
    cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
try:
    cfg = load_config("quickstart", overrides=json.loads(sys.argv[2]))
    code, summary = pretrain(cfg, name="spread", storage=sys.argv[1], log=lambda m: None)
    print("RESULT " + json.dumps({"code": code, "node_ids": summary["metrics"]["node_ids"],
                                  "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_two_nodes_one_worker_each(tmp_path: Path) -> None:
    overrides = [*TINY, "train.epochs=1", "train.num_workers=2", "train.cpus_per_worker=1",
                 "train.data_cpus=1", "train.placement_strategy=STRICT_SPREAD"]  # fmt: skip
    env_tmp = Path(tempfile.mkdtemp(prefix="crt", dir="/tmp"))  # unix socket paths must stay < 108 bytes
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path / "runs"), json.dumps(overrides)],
            capture_output=True,
            text=True,
            timeout=540,
            env={**os.environ, "RAY_TMPDIR": str(env_tmp), "RAY_ADDRESS": ""},
        )
    finally:
        shutil.rmtree(env_tmp, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["code"] == 0
    assert len(result["nodes"]) == 3
    assert len(set(result["node_ids"])) == 2  # one worker per node
    assert set(result["node_ids"]) <= set(result["nodes"])
