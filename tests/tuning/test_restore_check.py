"""`tune --resume` unpickles Tune's stored state, so it refuses a local search that someone else could have
written (no Tune fit here: the check and its call site)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crossmoco_ray.cli.main import main
from crossmoco_ray.errors import ConfigError
from crossmoco_ray.nn import trusted_files
from crossmoco_ray.tuning import restore_check, search
from crossmoco_ray.tuning.restore_check import check_resumable, local_problems

ROOT = os.geteuid() == 0
FOREIGN = 65534  # nobody / nogroup
TRIAL = "trial_driver_0a1b2_00000_0_objective__momentum=0.99_2026-01-01_00-00-00"


def stored_search(storage: Path, name: str = "s") -> Path:
    """A search directory laid out as Tune and the search leave it (modes of umask 022)."""
    d = storage / name
    (d / TRIAL).mkdir(parents=True)
    for rel in ("tuner.pkl", "experiment_state-2026-01-01_00-00-00.json", "basic-variant-state-x.json",
                "crossmoco_search.json", f"{TRIAL}/params.pkl", f"{TRIAL}/result.json"):  # fmt: skip
        (d / rel).write_bytes(b"{}")
        (d / rel).chmod(0o644)
    (d / "trials" / TRIAL).mkdir(parents=True)  # its Train runs: checkpoints of tensors
    (d / "trials" / TRIAL / "state.pt").write_bytes(b"")
    for sub in (d, d / TRIAL, d / "trials", d / "trials" / TRIAL):
        sub.chmod(0o755)
    return d


def refused(d: Path) -> str:
    with pytest.raises(ConfigError) as err:
        check_resumable(str(d), print)
    message = str(err.value)
    assert "not resuming" in message
    assert "chmod -R go-w" in message  # the fix
    assert "fresh search" in message
    assert len(message) < 3000
    return message


def test_a_search_as_tune_leaves_it_is_resumable(tmp_path: Path) -> None:
    d = stored_search(tmp_path)
    assert local_problems(d) == []
    check_resumable(str(d), print)
    check_resumable(f"file://{d}", print)


def test_a_world_writable_search_directory_is_refused(tmp_path: Path) -> None:
    d = stored_search(tmp_path)
    d.chmod(0o777)  # anyone could replace tuner.pkl
    assert f"{d} is writable by others (mode 777)" in refused(d)


@pytest.mark.parametrize(
    "rel", ["tuner.pkl", "experiment_state-2026-01-01_00-00-00.json", f"{TRIAL}/params.pkl"]
)
def test_a_pickled_file_others_can_write_is_refused(rel: str, tmp_path: Path) -> None:
    d = stored_search(tmp_path)
    (d / rel).chmod(0o666)
    assert f"{d / rel} is writable by others" in refused(d)


def test_a_trial_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    d = stored_search(tmp_path)
    (d / TRIAL).chmod(0o777)  # anyone could add an error.pkl
    assert f"{d / TRIAL} is writable by others" in refused(d)


def test_a_linked_state_file_or_search_is_refused(tmp_path: Path) -> None:
    d = stored_search(tmp_path)
    (d / "tuner.pkl").unlink()
    planted = tmp_path / "planted.pkl"
    planted.write_bytes(b"{}")
    (d / "tuner.pkl").symlink_to(planted)
    assert f"{d / 'tuner.pkl'} is a symbolic link" in refused(d)
    link = tmp_path / "linked"
    link.symlink_to(stored_search(tmp_path, "other"))
    assert f"{link} is a symbolic link" in refused(link)


@pytest.mark.skipif(not ROOT, reason="chown needs root")
def test_a_state_file_of_another_user_is_refused(tmp_path: Path) -> None:
    d = stored_search(tmp_path)
    os.chown(d / "tuner.pkl", FOREIGN, FOREIGN)
    assert f"{d / 'tuner.pkl'} belongs to uid {FOREIGN}" in refused(d)


@pytest.mark.skipif(not ROOT, reason="chgrp to a group of others needs root")
def test_write_by_a_shared_group_is_refused(tmp_path: Path) -> None:
    d = stored_search(tmp_path)
    os.chown(d / "tuner.pkl", os.geteuid(), FOREIGN)
    (d / "tuner.pkl").chmod(0o664)
    assert f"{d / 'tuner.pkl'} is writable by group {FOREIGN}" in refused(d)


@pytest.mark.skipif(not trusted_files.private_group(os.getegid()), reason="no user private group here")
def test_write_by_your_private_group_is_accepted(tmp_path: Path) -> None:
    d = stored_search(tmp_path)  # as umask 002 leaves it on Debian and Ubuntu
    for p in (d, d / TRIAL, d / "tuner.pkl"):
        os.chown(p, os.geteuid(), os.getegid())
        p.chmod(p.stat().st_mode | 0o020)
    assert local_problems(d) == []


def test_a_parent_others_can_write_is_refused_unless_sticky(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    d = stored_search(storage)
    storage.chmod(0o777)  # anyone could move the search away and put another in its place
    assert f"{storage} is writable by others" in refused(d)
    storage.chmod(0o1777)  # like /tmp: nobody may move what is not theirs
    assert local_problems(d) == []


def test_the_train_runs_are_not_descended_into(tmp_path: Path) -> None:
    d = stored_search(tmp_path)
    (d / "trials" / TRIAL / "state.pt").chmod(0o666)  # tensors, read with weights_only
    assert local_problems(d) == []
    (d / "trials").chmod(0o777)
    assert f"{d / 'trials'} is writable by others" in refused(d)


def test_a_long_list_is_bounded(tmp_path: Path) -> None:
    d = stored_search(tmp_path)
    for i in range(30):
        (d / f"extra{i}.pkl").write_bytes(b"")
        (d / f"extra{i}.pkl").chmod(0o666)
    problems = local_problems(d)
    assert len(problems) == restore_check.MAX_LISTED + 1
    assert problems[-1] == "... and 25 more"


def test_remote_storage_is_resumed_with_one_warning() -> None:
    said: list[str] = []
    check_resumable("s3://bucket/runs/s", said.append)
    assert len(said) == 1
    assert "runs code stored there" in said[0]
    assert "s3 bucket must be writable only by principals you trust" in said[0]


def test_tune_resume_checks_before_restoring(tmp_path: Path, monkeypatch, capsys) -> None:
    """The call site: `crossmoco tune --resume` refuses before it reads the search or starts Ray."""
    d = stored_search(tmp_path)
    (d / "tuner.pkl").chmod(0o666)
    monkeypatch.setattr(search, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.setattr(search, "read_json", lambda *a, **k: pytest.fail("the search's state was read"))
    code = main(["tune", "--name", "s", "--storage", str(tmp_path), "--resume"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{d / 'tuner.pkl'} is writable by others" in err
    assert "chmod -R go-w" in err


def test_a_pickle_an_acl_lets_another_user_write_is_refused(tmp_path: Path) -> None:
    from tests.nn.test_kernels import grant_write_by_acl

    d = stored_search(tmp_path)
    grant_write_by_acl(d / "tuner.pkl", FOREIGN)  # `ls -l` shows 0664: only the ACL says who else writes
    assert f"{d / 'tuner.pkl'} is writable by user {FOREIGN} through an ACL" in refused(d)
