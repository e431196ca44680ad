"""End to end on loopback: `cluster/local_head.sh start` (ray start --head, token auth on), a tiny
`crossmoco pretrain` through `cluster/submit.sh` (ray job submit), SUCCEEDED, its checkpoint and MLflow run,
then `cluster/local_head.sh stop`, which ends exactly the processes the head started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pretrain.test_pretrain_ray import TINY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def exposed_listeners(pids: list[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every socket of ``pids`` that listens beyond loopback."""
    import importlib
    import ipaddress

    import ray  # noqa: F401  (puts Ray's bundled psutil on the path)

    psutil = importlib.import_module("psutil")

    exposed = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
            if not (getattr(ip, "ipv4_mapped", None) or ip).is_loopback:
                exposed.append((str(ip), c.laddr.port, c.pid))
    return exposed


def head_processes(head_dir: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{head_dir}/" in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def head(tmp_path: Path) -> Iterator[dict[str, str]]:
    head_dir = tempfile.mkdtemp(prefix="cmh", dir="/tmp")  # unix socket paths must stay < 108 bytes
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env = free_ports(7)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),  # the generated auth token stays in this test
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "CROSSMOCO_HEAD_DIR": head_dir,
        "CROSSMOCO_HEAD_PORT": str(gcs),
        "CROSSMOCO_DASHBOARD_PORT": str(dash),
        "CROSSMOCO_HEAD_OPTIONS": (
            f"--ray-client-server-port={client} --dashboard-agent-listen-port={agent} "
            f"--dashboard-agent-grpc-port={agent_grpc} --metrics-export-port={metrics} "
            f"--runtime-env-agent-port={runtime_env}"
        ),
        "RAY_ADDRESS": "",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_AUTH_MODE", None)
    started = subprocess.run(
        ["bash", str(ROOT / "cluster" / "local_head.sh"), "start", "--num-cpus", "3"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        pids = head_processes(head_dir)
        assert len(pids) >= 3, pids  # GCS, raylet, dashboard, agents
        assert not exposed_listeners(pids), "the head listens beyond loopback"
        assert os.stat(head_dir).st_mode & 0o077 == 0
        assert (home / ".ray" / "auth_token").stat().st_mode & 0o077 == 0
        yield {
            "env": env,
            "head_dir": head_dir,
            "dashboard": f"http://127.0.0.1:{dash}",
            "out": started.stdout,
        }  # type: ignore[misc]
    finally:
        stopped = subprocess.run(
            ["bash", str(ROOT / "cluster" / "local_head.sh"), "stop"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        leftovers = head_processes(head_dir)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not leftovers, f"processes of the head still alive: {leftovers}"


def test_job_submit_on_a_local_head(head: dict[str, str], tmp_path: Path) -> None:
    env = head["env"]
    pids = Path(head["head_dir"], "head.pids").read_text().split()
    assert pids  # the head recorded what it started
    assert "RAY_AUTH_MODE=token" in head["out"]
    assert (Path(env["HOME"]) / ".ray" / "auth_token").is_file()  # token authentication is on

    # Without the token a client is refused: authentication really is on.
    refused = subprocess.run(
        ["ray", "job", "list", "--address", head["dashboard"]],
        env={**env, "RAY_AUTH_MODE": "token", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0

    storage = tmp_path / "runs"
    overrides = [*TINY, "train.epochs=1", "train.num_workers=1", "train.cpus_per_worker=0.5"]
    submitted = subprocess.run(
        ["bash", str(ROOT / "cluster" / "submit.sh"), "--address", head["dashboard"], "--id", "e2e-job",
         "--runtime-env", "cluster/runtime_env.local.yaml", "--",
         "pretrain", "--name", "e2e", "--storage", str(storage), *overrides],
        env=env, capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    log = submitted.stdout + submitted.stderr
    query = (
        "import sys; from ray.job_submission import JobSubmissionClient as C; "
        "print(C(sys.argv[1]).get_job_status('e2e-job'))"
    )
    status = subprocess.run(
        [sys.executable, "-c", query, head["dashboard"]],
        env={**env, "RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.stdout.strip().endswith("SUCCEEDED"), status.stdout + status.stderr + log[-4000:]
    assert submitted.returncode == 0, log[-4000:]

    run_dir = storage / "e2e"
    assert (run_dir / "epoch_0001" / "state.pt").is_file(), log[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="attributes.run_name = 'e2e'"
    )
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    assert "epoch_loss" in runs[0].data.metrics
