"""``crossmoco doctor``: what a bug report needs, on a machine without a GPU, with and without a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from crossmoco_ray.cli import doctor


def test_doctor_describes_this_machine_as_json_without_a_gpu_or_a_cluster() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {
        "MLFLOW_TRACKING_PASSWORD": "hunter2",
        "NCCL_SOCKET_IFNAME": "eth0",
        "RAY_AUTH_TOKEN": "s3cret",
        "MLFLOW_TRACKING_URI": "https://alice:pa55@mlflow.example:5000/?token=t0k",
    }
    done = subprocess.run(
        [sys.executable, "-m", "crossmoco_ray", "doctor", "--json"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout)
    assert r["software"]["packages"]["torch"]
    assert r["software"]["NCCL"]
    assert r["hardware"]["cuda available"] is False
    assert r["hardware"]["gpus"] == []
    assert "loaded" in r["kernels"]
    assert r["ray cluster"]["connected"] is False
    assert r["environment"]["NCCL_SOCKET_IFNAME"] == "eth0"
    assert "hunter2" not in done.stdout
    assert "s3cret" not in done.stdout
    assert r["environment"]["RAY_AUTH_TOKEN"] == "(set, not shown)"
    assert r["environment"]["MLFLOW_TRACKING_URI"] == "https://***@mlflow.example:5000/?***"
    assert "pa55" not in done.stdout
    assert "t0k" not in done.stdout


def test_doctor_text_names_each_section() -> None:
    text = doctor.to_text(
        {"software": {"torch": "2.14.1"}, "hardware": {"gpus": [], "cuda available": False}}
    )
    assert "## software" in text
    assert "  torch: 2.14.1" in text
    assert "  gpus: none" in text
    assert "  cuda available: no" in text


@pytest.mark.timeout(120)
def test_doctor_reports_the_connected_cluster(ray_session: None) -> None:
    c = doctor.cluster(None)
    assert c["connected"] is True
    assert c["resources"]["CPU"] >= 1
    assert c["nodes alive"] >= 1
    assert c["gpu types"] == []
