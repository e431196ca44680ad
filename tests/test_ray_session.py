"""The local Ray this package starts is private: its servers listen on loopback only, token authentication is
on and the token file is readable by its owner alone."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from crossmoco_ray import ray_session
from crossmoco_ray.ray_session import private_temp_dir, private_token

# Run in a fresh interpreter (the pytest process may hold the tests' shared Ray): start the local Ray the
# way `pretrain`, `tune` and `finetune` do, run a task, and list what every process of that Ray (the
# driver and all its descendants: GCS, raylet, dashboard, agents, workers) listens on.
PROBE = """
import ipaddress, json, os, types
import ray
import psutil  # Ray's bundled copy, importable once ray is
from crossmoco_ray.runs.resources import init_ray

train = types.SimpleNamespace(
    num_workers=1, cpus_per_worker=1.0, data_cpus=0.0, use_gpu=False, worker_resources={}
)
lines = []
assert init_ray(types.SimpleNamespace(train=train), None, lines.append)
try:
    assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker, with its own servers
    me = psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
    listening = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
            mapped = getattr(ip, "ipv4_mapped", None)
            try:
                name = psutil.Process(c.pid).name()
            except psutil.Error:
                name = "?"
            listening.append([str(ip), c.laddr.port, name, bool((mapped or ip).is_loopback)])
    session = ray._private.worker._global_node.get_session_dir_path()
    report = {"listening": listening, "processes": len(pids), "log": lines, "session": session}
    print(json.dumps({**report, "tmpdir": os.environ.get("RAY_TMPDIR")}))
finally:
    ray.shutdown()
"""


@pytest.mark.timeout(180)
def test_the_local_ray_listens_on_loopback_only_and_its_token_is_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_TMPDIR"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=170, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    private = Path(report["tmpdir"])
    try:  # Ray's session files (it makes their directories 0777) under a directory of the user's alone
        assert private.parent == Path("/tmp")
        assert private.name.startswith("cmr-")
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        assert Path(report["session"]).is_relative_to(private)
        assert any(str(private) in line for line in report["log"])
    finally:
        shutil.rmtree(private, ignore_errors=True)
    assert report["processes"] >= 4, report  # the driver, GCS, raylet, dashboard, agents, a worker
    assert len(report["listening"]) >= 5, report  # GCS, raylet, dashboard, its agent, the worker ...
    exposed = [entry for entry in report["listening"] if not entry[3]]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert any(port == 8265 or name.startswith("ray::Dashboard") for _, port, name, _ in report["listening"])
    token = home / ".ray" / "auth_token"
    assert token.is_file()  # token authentication is on: Ray used the token made for it
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert len(token.read_text().strip()) == 64


def test_prepare_starts_the_same_private_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """`prepare --ray` goes through the one private start (no dashboard: Ray Data alone needs none)."""
    import ray

    from crossmoco_ray.data.prepare import on_ray as prepare_ray

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called directly"))
    monkeypatch.setattr(ray_session, "start_local_ray", lambda cpus, log, **kw: calls.append((cpus, kw)))
    prepare_ray.start_ray(3, log=lambda _: None)
    assert calls == [(3, {"dashboard": False})]


@pytest.fixture
def token_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty home and no token settings; returns the default token path there."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / ".ray" / "auth_token"


def test_a_new_token_is_created_private(token_env: Path) -> None:
    assert private_token(print) == token_env
    assert stat.S_IMODE(token_env.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_env.parent.stat().st_mode) == 0o700
    first = token_env.read_text()
    assert len(first) == 64
    int(first, 16)
    assert private_token(print) == token_env
    assert token_env.read_text() == first  # an existing token is kept


def test_an_existing_token_others_can_read_is_made_private(token_env: Path) -> None:
    token_env.parent.mkdir()
    token_env.write_text("a" * 64)
    token_env.chmod(0o644)  # what Ray 2.60 leaves
    said: list[str] = []
    private_token(said.append)
    assert stat.S_IMODE(token_env.stat().st_mode) == 0o600
    assert token_env.read_text() == "a" * 64
    assert any("readable by you alone" in line and "644" in line for line in said)


def test_a_token_file_given_by_path_is_made_private(token_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    custom = token_env.parent.parent / "my-token"
    custom.write_text("b" * 64)
    custom.chmod(0o664)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(custom))
    assert private_token(lambda _: None) == custom
    assert stat.S_IMODE(custom.stat().st_mode) == 0o600
    assert not token_env.exists()  # no second token


def test_a_linked_token_file_is_left_alone_and_said(token_env: Path) -> None:
    target = token_env.parent.parent / "elsewhere"
    target.write_text("c" * 64)
    target.chmod(0o644)
    token_env.parent.mkdir()
    token_env.symlink_to(target)
    said: list[str] = []
    private_token(said.append)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not followed
    assert any("left as it is" in line for line in said)


def test_a_token_in_the_environment_or_auth_turned_off_writes_nothing(
    token_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "d" * 64)
    assert private_token(print) is None
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    said: list[str] = []
    assert private_token(said.append) is None
    assert any("without token authentication" in line for line in said)
    assert not token_env.parent.exists()


def test_rays_files_go_to_a_fresh_private_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    said: list[str] = []
    made = Path(private_temp_dir(said.append))
    try:
        assert os.environ["RAY_TMPDIR"] == str(made)  # every process of the Ray inherits it
        assert stat.S_IMODE(made.stat().st_mode) == 0o700
        assert made.stat().st_uid == os.geteuid()
        assert len(str(made)) < 30  # Ray's socket paths under it must fit in 107 bytes
    finally:
        shutil.rmtree(made, ignore_errors=True)


def test_a_ray_tmpdir_you_set_is_kept_and_an_open_one_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    monkeypatch.setenv("RAY_TMPDIR", str(mine))
    said: list[str] = []
    assert private_temp_dir(said.append) == str(mine)
    assert said == []
    mine.chmod(0o755)
    assert private_temp_dir(said.append) == str(mine)
    assert any("open to other users" in line for line in said)
