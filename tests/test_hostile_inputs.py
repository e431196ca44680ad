"""The commands a user runs, on damaged and crafted files of every kind they read, as a process sees them.

The readers' own corpora (tests/data/test_hostile_sources.py, tests/data/test_integrity.py,
tests/test_hostile_config.py) prove each defect at the function that reads the file. Here the whole command
runs, and for each case it is checked: the exit code, the file and reason named on one line, no traceback
(and no "internal error", which is what a bug prints), the ``--skip-bad`` count, nothing outside ``--out``
touched, and the peak memory of the process (the few cases that allocate by a file's claim run as a
process of their own and report their peak RSS).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from crossmoco_ray.cli.main import main
from tests.data.test_hostile_sources import folder_corpus, h5_huge_claim
from tests.test_hostile_config import bomb_config, yaml_bomb

ROOT = Path(__file__).resolve().parents[1]
GB = 1 << 30
# Run the CLI in a process of its own and report its peak resident memory (kB): VmHWM, the high-water mark
# of this program's own memory. (getrusage's ru_maxrss would also count the pytest process it was forked
# from: Linux keeps the pre-exec peak.)
RUN_MEASURED = (
    "import re, sys\n"
    "from crossmoco_ray.cli.main import main\n"
    "code = main(sys.argv[1:])\n"
    "peak = re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1)\n"
    "print('MAXRSS_KB', peak, file=sys.stderr)\n"
    "sys.exit(code)\n"
)
RENDER = ["--azimuths", "0,180", "--render-size", "16", "--num-points", "64"]


def run_measured(argv: list[str], cwd: Path) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr without the RSS line, peak RSS in bytes) of ``crossmoco argv``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    done = subprocess.run(
        [sys.executable, "-c", RUN_MEASURED, *argv],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    match = re.search(r"^MAXRSS_KB (\d+)$", done.stderr, re.M)
    assert match, done.stderr[-3000:]
    return done.returncode, done.stdout, done.stderr[: match.start()], int(match.group(1)) * 1024


def assert_no_crash(err: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    assert "internal error" not in err, err[-3000:]


def tree(root: Path, skip: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root`` but ``skip`` (links not followed): mode, size, mtime in ns."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for name in dirnames + filenames:
            if Path(dirpath, name) == skip:
                continue
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def test_prepare_on_a_hostile_folder_skips_and_counts_each_bad_file_touching_nothing_else(
    tmp_path: Path,
) -> None:
    expected = folder_corpus(tmp_path / "src")  # ~55 damaged or crafted files beside 6 good ones
    out = tmp_path / "out"
    before = tree(tmp_path, out)

    code, _, err, rss = run_measured(["prepare", "src", "--out", "out", "--skip-bad", *RENDER], tmp_path)
    assert code == 0, err[-3000:]
    assert_no_crash(err)
    manifest = json.loads((out / "manifest.json").read_text())
    # Six good files, but good.{npy,ply,off,xyz} share the id thing/good: one goes in, three are duplicates.
    assert manifest["counts"]["train"]["total"] == 3
    skipped = json.loads((out / "skipped.json").read_text())
    assert manifest["skipped"] == len(skipped) == len(expected) + 3
    problems = {Path(entry["source"]).name: entry["problem"] for entry in skipped}
    assert set(expected) <= set(problems)
    for name, problem in expected.items():
        assert re.search(problem, problems[name]), (name, problems[name])
    assert sorted(set(problems) - set(expected)) == ["good.off", "good.ply", "good.xyz"]
    assert rss < 2 * GB, f"peak RSS {rss / GB:.2f} GB"
    assert tree(tmp_path, out) == before  # the sources (and everything beside --out) untouched

    # Without --skip-bad: the first bad file stops it, named on one line, and nothing is left in --out.
    (out / "manifest.json").unlink()
    code, _, err, _ = run_measured(["prepare", "src", "--out", "strict", *RENDER], tmp_path)
    assert code == 2
    assert_no_crash(err)
    [line] = [x for x in err.splitlines() if x.strip()]
    assert any(name in line for name in expected), line
    assert "--skip-bad" in line or "skip" in line.lower() or "src/thing/" in line
    assert not (tmp_path / "strict").exists() or not list((tmp_path / "strict").iterdir())


def test_prepare_skips_an_h5_file_that_claims_1e9_rows_in_bounded_memory(tmp_path: Path) -> None:
    src = tmp_path / "h5"
    src.mkdir()
    h5_huge_claim(src / "train_lies.h5")  # 10**9 rows of 4096 points claimed in a few kilobytes
    rng = np.random.default_rng(0)
    with h5py.File(src / "train_good.h5", "w") as f:
        f["data"] = rng.normal(size=(8, 64, 3)).astype(np.float32)
        f["label"] = (np.arange(8) % 2).reshape(8, 1).astype(np.int64)
    code, _, err, rss = run_measured(["prepare", "h5", "--out", "out", "--skip-bad", *RENDER], tmp_path)
    assert code == 0, err[-3000:]
    assert_no_crash(err)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == 10**9  # the rows the file claims, counted once, not read
    assert sum(c["total"] for c in manifest["counts"].values()) == 8
    assert rss < 2 * GB, f"peak RSS {rss / GB:.2f} GB (the lying file was read)"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("test", 6)):
        with h5py.File(root / f"{split}.h5", "w") as f:
            f["data"] = rng.normal(size=(n, 64, 3)).astype(np.float32)
            f["label"] = (np.arange(n) % 3).reshape(n, 1).astype(np.int64)
    assert main(["prepare", str(root), "--out", str(root / "out"), *RENDER]) == 0
    return root / "out"


def command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and everything printed (stdout, then stderr) by ``crossmoco argv`` in this process."""
    code = main(argv)
    captured = capsys.readouterr()
    assert_no_crash(captured.err)
    return code, captured.out + captured.err


def test_a_flipped_byte_is_named_by_verify_and_stops_evaluation(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in shards.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    shard = sorted(damaged.glob("train-*.parquet"))[0]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 3] ^= 0x01  # one bit, inside the data pages
    shard.write_bytes(bytes(blob))

    code, _ = command(["verify", str(shards)], capsys)
    assert code == 0
    code, said = command(["verify", str(damaged)], capsys)
    assert code == 1
    assert shard.name in said
    code, err = command(["eval", "knn", "--data", str(damaged)], capsys)
    assert code == 2
    assert shard.name in err


@pytest.mark.parametrize(
    "case",
    ["garbage", "truncated", "config bomb", "not a mapping"],
)
def test_a_damaged_or_crafted_checkpoint_is_one_line_for_export_and_eval(
    case: str, shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    state = ckpt / "state.pt"
    if case == "garbage":
        state.write_bytes(np.random.default_rng(2).bytes(4096))
    elif case == "truncated":
        torch.save({"format": "x", "model": {"w": torch.zeros(1000)}}, state)
        state.write_bytes(state.read_bytes()[:300])
    elif case == "config bomb":
        torch.save({"version": 2, "config": bomb_config(), "model": {}}, state)
    else:
        torch.save(["not", "a", "checkpoint"], state)
    for argv in (
        ["export", str(ckpt), "--out", str(tmp_path / "export")],
        ["eval", "knn", "--data", str(shards), "--checkpoint", str(ckpt), "--no-baseline"],
    ):
        code, err = command(argv, capsys)
        assert code == 2, (argv, err)
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1, err
        assert "state.pt" in lines[0] or str(ckpt) in lines[0], lines[0]
        assert len(lines[0]) < 1000
    assert not (tmp_path / "export").exists() or not any((tmp_path / "export").iterdir())


def test_configs_that_bomb_or_lie_are_one_line_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"optim:\n  lr: {yaml_bomb()}\n")
    prepare = ["prepare", str(tmp_path), "--out", str(tmp_path / "o")]
    cases: list[tuple[list[str], str]] = [
        (["pretrain", "--config", str(bomb)], "bomb.yaml"),
        (["pretrain", "optim.lr=inf"], "optim.lr"),
        (["pretrain", "objective.temperature=nan"], "objective.temperature"),
        (["pretrain", 'train.worker_resources={"CPU": -1}'], "worker_resources"),
        ([*prepare, "--val-fraction", "1.5"], "--val-fraction"),
        ([*prepare, "--render-size", "100000"], "--render-size"),
    ]
    for argv, named in cases:
        code, err = command(argv, capsys)
        assert code == 2, (argv, err)
        assert named in err, (argv, err)
        assert len(err) < 2000, (argv, len(err))
    assert not (tmp_path / "o").exists()
