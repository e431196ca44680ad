"""The code version is recorded where the code has no .git: a job's uploaded copy, the image."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crossmoco_ray import __version__
from crossmoco_ray.version import COMMIT_ENV, code_version

ROOT = Path(__file__).resolve().parents[1]
HAS_GIT = shutil.which("git") is not None and (ROOT / ".git").exists()


def head_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()


def version_in_copy(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """``code_version()`` of a copy of the package outside any git checkout (as in a job or the image)."""
    shutil.copytree(
        ROOT / "crossmoco_ray", tmp_path / "crossmoco_ray", ignore=shutil.ignore_patterns("__pycache__")
    )
    script = "import json; from crossmoco_ray.version import code_version; print(json.dumps(code_version()))"
    clean = {k: v for k, v in os.environ.items() if k != COMMIT_ENV}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**clean, "PYTHONPATH": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout)
    return result


def test_without_git_the_commit_comes_from_the_environment(tmp_path: Path) -> None:
    assert version_in_copy(tmp_path, {COMMIT_ENV: "0123abc"}) == {
        "git_commit": "0123abc",
        "git_commit_source": "env",
        "crossmoco_version": __version__,
    }


def test_without_git_or_variable_the_commit_is_unknown(tmp_path: Path) -> None:
    # the image built without --build-arg GIT_COMMIT sets the variable to "unknown"
    found = version_in_copy(tmp_path, {COMMIT_ENV: "unknown"})
    assert found["git_commit"] == "unknown"
    assert found["crossmoco_version"] == __version__


@pytest.mark.skipif(not HAS_GIT, reason="not a git checkout")
def test_in_a_checkout_the_commit_comes_from_git(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    found = code_version()
    assert found["git_commit_source"] == "git"
    assert re.fullmatch(re.escape(head_commit()) + "(-dirty)?", found["git_commit"])
    monkeypatch.setenv(COMMIT_ENV, "from-submit")  # a submitted job's value wins
    assert code_version()["git_commit"] == "from-submit"


@pytest.mark.skipif(not HAS_GIT, reason="not a git checkout")
def test_submit_hands_the_checkouts_commit_to_the_job(tmp_path: Path) -> None:
    """cluster/submit.sh puts this checkout's commit in the job's runtime environment, beside the runtime
    environment file's own settings (a stand-in `ray` records what it was asked to run)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_ray = bin_dir / "ray"
    fake_ray.write_text(
        f'#!/bin/sh\n"{sys.executable}" -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@"\n'
    )
    fake_ray.chmod(0o755)
    own = {"excludes": [".git", "data"], "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(own))
    done = subprocess.run(
        ["bash", str(ROOT / "cluster" / "submit.sh"), "--address", "http://127.0.0.1:1",
         "--runtime-env", str(env_file), "--", "pretrain", "--name", "x"],
        env={**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    args = json.loads(done.stdout.strip().splitlines()[-1])
    assert args[:2] == ["job", "submit"]
    runtime_env = json.loads(args[args.index("--runtime-env-json") + 1])
    commit = runtime_env["env_vars"].pop(COMMIT_ENV)
    assert re.fullmatch(re.escape(head_commit()) + "(-dirty)?", commit)
    assert runtime_env == own  # the file's settings travel unchanged
    assert args[args.index("--") + 1 :] == [
        "python",
        "-m",
        "crossmoco_ray.cli",
        "pretrain",
        "--name",
        "x",
    ]


def test_the_image_records_its_build_commit() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG GIT_COMMIT=unknown$", text, flags=re.M)
    assert re.search(rf"^ENV {COMMIT_ENV}=\$\{{GIT_COMMIT\}}$", text, flags=re.M)
    assert '--build-arg GIT_COMMIT="$(git rev-parse HEAD)"' in text  # the documented build command
