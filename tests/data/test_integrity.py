"""Every file prepare's readers open may be damaged or hostile: flipped bytes, truncated or deleted shards,
edited manifests, paths that leave the shard directory, stale work directories, options that crash late.

Each test damages a small prepared dataset the way a disk, a copy or a person would and checks that the
pipeline, evaluation, ``prepare`` and ``crossmoco verify`` notice it, name the file and the reason, and
never read or delete outside the shard directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crossmoco_ray.cli.main import main
from crossmoco_ray.data.pipeline.batches import PipelineOptions, iter_local_batches
from crossmoco_ray.data.prepare import prepare as shards_module
from crossmoco_ray.data.prepare.options import PrepareOptions
from crossmoco_ray.data.prepare.prepare import prepare
from crossmoco_ray.data.prepare.workdir import remove_stale
from crossmoco_ray.data.render.splat import RenderSpec
from crossmoco_ray.data.shards import manifest as manifest_module
from crossmoco_ray.data.shards.integrity import file_digests
from crossmoco_ray.data.shards.manifest import file_digest, read_manifest, seal
from crossmoco_ray.data.sources.base import Source
from crossmoco_ray.data.sources.formats import H5Source
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.errors import DataError
from crossmoco_ray.evaluate.features import load_split
from crossmoco_ray.storage import resolve
from tests.data import fixtures

SMALL = RenderSpec(azimuths=(0.0, 120.0, 240.0), size=16)
PIPE = PipelineOptions(num_points=64, image_size=8, seed=0)


def quiet(msg: str) -> None:
    pass


def opts(**kw: Any) -> PrepareOptions:
    return PrepareOptions(**{"render": SMALL, "row_group_rows": 4, "rows_per_shard": 8, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 train objects in two files (8 + 4 rows, row groups of 4), 6 test objects; 64 points, 3 views."""
    tmp = tmp_path_factory.mktemp("integrity")
    out = tmp / "shards"
    prepare(H5Source(fixtures.modelnet_h5(tmp / "mn")), str(out), opts(), log=quiet)
    return out


@pytest.fixture
def dataset(prepared: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared dataset, free to damage."""
    return Path(shutil.copytree(prepared, tmp_path / "shards"))


def train_batches(root: Path) -> list[dict[str, np.ndarray]]:
    return list(iter_local_batches(str(root), "train", PIPE, batch_size=2))


def flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


def rewrite_manifest(root: Path, change: Any, sealed: bool = True) -> None:
    """Edit the manifest; ``sealed``: seal it again (a careful editor), else write it as a manifest of
    before the seal and the row-group digests existed."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.pop("manifest_sha256", None)
    change(manifest)
    if not sealed:
        for info in manifest["files"]:
            info.pop("footer_sha256", None)
            info.pop("row_group_sha256", None)
    (root / "manifest.json").write_text(json.dumps(seal(manifest) if sealed else manifest))


# ---- integrity: checksums checked before the data is used ----


def test_a_flipped_byte_anywhere_in_a_shard_is_caught_by_training_and_evaluation(dataset: Path) -> None:
    """Every region of the file: the leading magic, page headers and data of every column (views too) of
    both row groups, the footer's thrift metadata, its length and trailing magic."""
    shard = dataset / "train-00000.parquet"
    clean = shard.read_bytes()
    assert len(train_batches(dataset)) == 6  # 12 rows, batches of 2
    positions = sorted(
        {0, 3, *range(5, len(clean), max(1, len(clean) // 160)), *range(len(clean) - 12, len(clean))}
    )
    for position in positions:
        flip(shard, position)
        with pytest.raises(DataError, match=r"train-00000\.parquet.*differs from the manifest"):
            train_batches(dataset)
        with pytest.raises(DataError, match=r"train-00000\.parquet.*differs from the manifest"):
            load_split(str(dataset), "train")
        shard.write_bytes(clean)
    assert load_split(str(dataset), "train").points.shape == (12, 64, 3)


def test_shards_carry_parquet_page_checksums(dataset: Path) -> None:
    """Tools other than ours (pyarrow, Ray Data's read_parquet, DuckDB) can check the pages too."""
    shard = dataset / "test-00000.parquet"
    meta = pq.read_metadata(shard)
    views = meta.row_group(0).column(4)
    start = views.dictionary_page_offset if views.has_dictionary_page else views.data_page_offset
    flip(shard, start + views.total_compressed_size - 5)  # inside the last page's data
    with pytest.raises(OSError, match="CRC"):
        pq.read_table(shard, page_checksum_verification=True)


def test_shards_written_before_row_group_checksums_are_still_read_and_checked_whole(dataset: Path) -> None:
    """An old dataset (no page checksums, a manifest with size + sha256 per file only) still trains and
    evaluates; its files are checked whole against the manifest's sha256 before their rows are used."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    fs, _ = resolve(str(dataset))
    for info in manifest["files"]:
        path = dataset / info["path"]
        pq.write_table(pq.read_table(path), path, compression="zstd", row_group_size=4)  # no page CRCs
        info["bytes"], info["sha256"] = file_digest(fs, str(path))
        for key in ("footer_sha256", "row_group_sha256"):
            info.pop(key)
    manifest.pop("manifest_sha256")
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    assert len(train_batches(dataset)) == 6
    assert load_split(str(dataset), "test").labels.shape == (6,)
    flip(dataset / "train-00001.parquet", 100)
    with pytest.raises(DataError, match=r"train-00001\.parquet: sha256 differs from the manifest"):
        train_batches(dataset)
    with pytest.raises(DataError, match=r"train-00001\.parquet: sha256 differs from the manifest"):
        load_split(str(dataset), "train")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["counts"]["train"].update(total=13), "edited or damaged"),
        (lambda m: m.update(num_points=128), "edited or damaged"),
        (lambda m: m.update(fingerprint="0" * 16), "edited or damaged"),
    ],
    ids=["count", "points", "fingerprint"],
)
def test_an_edited_sealed_manifest_is_noticed(dataset: Path, change: Any, message: str) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    change(manifest)
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"manifest\.json: .*{message}"):
        read_manifest(str(dataset))


def one_more_row(manifest: dict[str, Any]) -> None:
    """A consistent edit: a file's rows, its split's total and a class count all one higher."""
    manifest["files"][0]["rows"] += 1
    counts = manifest["counts"]["train"]
    counts["total"] += 1
    counts["per_class"]["class0"] += 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["files"][0].update(rows=9), r"'train' counts 12 rows, its files list 13"),
        (one_more_row, r"train-00000\.parquet: the manifest says 9 rows, the file holds 8"),
        (lambda m: m["counts"]["train"].update(total=13), r"'train' counts 13 rows, its files list 12"),
        (
            lambda m: m.update(num_points=128),
            r"train-00000\.parquet: points are \[64, 3\].*manifest says 128",
        ),
    ],
    ids=["rows", "rows-and-counts", "total", "points"],
)
def test_manifest_counts_are_checked_against_the_parquet_metadata(
    dataset: Path, change: Any, message: str
) -> None:
    """Counts and point counts of an edited manifest (resealed, as a careful editor would, or an old
    unsealed one) must agree with what the files' own metadata says."""
    clean = (dataset / "manifest.json").read_text()
    for sealed in (True, False):
        (dataset / "manifest.json").write_text(clean)
        rewrite_manifest(dataset, change, sealed=sealed)
        with pytest.raises(DataError, match=message):
            train_batches(dataset)
        with pytest.raises(DataError, match=message):
            load_split(str(dataset), "train")
        assert main(["verify", str(dataset)]) == 1


@pytest.mark.parametrize(
    "path",
    [
        "../victim.txt",
        "/etc/passwd",
        "sub/train-00000.parquet",
        "./train-00000.parquet",
        "train-00000.parquet/../../x",
        "notes.txt",
        "test-00000.parquet",  # listed as a train file
        "train-1.parquet",
        "x" * 5000,
    ],
)
def test_manifest_paths_stay_inside_the_shard_directory(dataset: Path, path: str) -> None:
    rewrite_manifest(dataset, lambda m: m["files"][0].update(path=path))
    with pytest.raises(
        DataError, match=r"manifest\.json \[index 0\]: .*not a shard of this directory"
    ) as err:
        read_manifest(str(dataset))
    assert len(str(err.value)) < 600  # a hostile value is not printed whole
    with pytest.raises(DataError, match="not a shard of this directory"):
        load_split(str(dataset), "train")


def test_symlinked_shards_are_refused(dataset: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.parquet"
    os.replace(dataset / "train-00001.parquet", elsewhere)
    (dataset / "train-00001.parquet").symlink_to(elsewhere)
    with pytest.raises(DataError, match=r"train-00001\.parquet.*symbolic link"):
        read_manifest(str(dataset))


def test_truncated_and_deleted_shards_are_named_and_re_prepared(prepared: Path, dataset: Path) -> None:
    shard = dataset / "train-00001.parquet"
    clean = shard.read_bytes()
    shard.write_bytes(clean[: len(clean) // 2])
    for read in (lambda: train_batches(dataset), lambda: load_split(str(dataset), "train")):
        with pytest.raises(DataError, match=r"train-00001\.parquet: \d+ bytes, the manifest says \d+") as err:
            read()
        assert "<Buffer>" not in str(err.value)
    # the same prepare command again: not "up to date" but prepared again (a truncated, then a deleted shard)
    src = H5Source(prepared.parent / "mn")
    for damage in (lambda: shard.write_bytes(clean[:100]), shard.unlink):
        damage()
        said: list[str] = []
        prepare(src, str(dataset), opts(), log=said.append)
        assert not any("up to date" in line for line in said), said
        assert any("train-00001.parquet" in line and "preparing it again" in line for line in said), said
        assert shard.read_bytes() == clean
    said = []
    prepare(src, str(dataset), opts(), log=said.append)
    assert any("up to date" in line for line in said)


def test_a_shard_replaced_by_non_parquet_bytes_of_the_same_size(dataset: Path) -> None:
    shard = dataset / "test-00000.parquet"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    with pytest.raises(
        DataError, match=r"test-00000\.parquet: (no Parquet footer|.*differs from the manifest)"
    ):
        load_split(str(dataset), "test")


# ---- crossmoco verify ----


def test_verify_reports_every_damage_and_exits_by_kind(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(dataset)]) == 0
    out = capsys.readouterr().out
    assert "3 files, 18 rows" in out
    assert "no damage" in out
    clean = (dataset / "manifest.json").read_text()

    def move_a_count(m: dict[str, Any]) -> None:  # the totals still add up; only the labels can tell
        per_class = m["counts"]["test"]["per_class"]
        per_class["class0"] -= 1
        per_class["class1"] += 1

    rewrite_manifest(dataset, move_a_count)
    assert main(["verify", str(dataset)]) == 1
    assert "split 'test': its files' labels differ from the per-class counts" in capsys.readouterr().out
    (dataset / "manifest.json").write_text(clean)
    train0, train1, test0 = (
        dataset / n for n in ("train-00000.parquet", "train-00001.parquet", "test-00000.parquet")
    )
    flip(train0, train0.stat().st_size // 2)
    train1.write_bytes(train1.read_bytes()[:-30])
    test0.unlink()
    assert main(["verify", str(dataset)]) == 1
    out = capsys.readouterr().out
    assert "train-00000.parquet: row group" in out
    assert "differs from the manifest" in out
    assert "train-00001.parquet:" in out
    assert "bytes, the manifest says" in out
    assert "test-00000.parquet: missing" in out
    assert "3 problems in 3 of 3 files" in out
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty")]) == 2
    assert "no manifest" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["verify", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "exit status" in text
    assert "sha256" in text


# ---- safe deletes ----


def test_overwrite_deletes_only_the_shards_it_wrote(dataset: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (dataset / "notes.txt").write_text("mine")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "train-00007.parquet").write_text("not a shard of the dataset")

    def hostile(m: dict[str, Any]) -> None:
        m["files"] += [
            {"path": "../victim.txt", "split": "train", "rows": 0},
            {"path": "notes.txt", "split": "train", "rows": 0},
            {"path": str(outside / "train-00007.parquet"), "split": "train", "rows": 0},
        ]

    rewrite_manifest(dataset, hostile)
    src = H5Source(fixtures.modelnet_h5(tmp_path / "other", n_train=4, n_test=2, points=32))
    with pytest.raises(DataError, match="pass --overwrite"):
        prepare(src, str(dataset), opts(), log=quiet)
    prepare(src, str(dataset), opts(overwrite=True), log=quiet)
    assert victim.read_text() == "keep me"
    assert (dataset / "notes.txt").read_text() == "mine"
    assert (outside / "train-00007.parquet").exists()
    assert sorted(p.name for p in dataset.glob("*.parquet")) == ["test-00000.parquet", "train-00000.parquet"]
    assert main(["verify", str(dataset)]) == 0


# ---- the skipped report streams to disk ----


class _ManyBad(Source):
    """Good and bad samples interleaved; checks, while it is read, that earlier problems are on disk."""

    format = "manybad"

    def __init__(self, out: Path, n: int = 40) -> None:
        self.out, self.n, self.seen_on_disk = out, n, 0

    def splits(self) -> list[str]:
        return ["train"]

    def count(self, split: str) -> int | None:
        return self.n

    def samples(self, split: str) -> Iterator[Sample | DataError]:
        rng = np.random.default_rng(0)
        for i in range(self.n):
            if i % 2:
                reports = list(self.out.glob(".incomplete-*/skipped.json*"))
                if i > 20 and reports:
                    self.seen_on_disk = max(self.seen_on_disk, reports[0].read_text().count('"problem"'))
                yield DataError(f"file{i}.h5", "unreadable", index=i, rows=3)
            else:
                views = [fixtures.png(10 * v) for v in range(2)]
                yield Sample(f"s{i}", rng.normal(size=(32, 3)).astype(np.float32), views, label=0)


def test_skipped_samples_stream_to_the_work_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    src = _ManyBad(out)
    manifest = prepare(src, str(out), opts(skip_bad=True), log=quiet)
    assert src.seen_on_disk >= 9  # written as they came, not held until the end
    assert manifest["skipped"] == 20 * 3  # the rows each problem cost
    report = json.loads((out / "skipped.json").read_text())
    assert len(report) == 20
    assert report[0] == {"source": "file1.h5", "index": 1, "rows": 3, "problem": "unreadable"}


# ---- prepare's options, checked before the work ----


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--val-fraction", "1.5"], r"--val-fraction 1\.5: must be in \[0, 1\)"),
        (["--val-fraction", "-0.1"], r"--val-fraction -0\.1: must be in \[0, 1\)"),
        (["--render-size", "100000"], r"--render-size 100000: must be in 8\.\.4096"),
        (["--rows-per-shard", "0"], r"--rows-per-shard 0: must be at least 1"),
        (["--azimuths", "0,ninety"], r"--azimuths '0,ninety': not a comma-separated list of degrees"),
        (["--preview", "{tmp}/no/such/dir/p.png"], r"--preview .*p\.png: the folder .* does not exist"),
        (["--preview", "{tmp}"], r"--preview .*: is a directory"),
        (["--out", "{tmp}/a_file"], r"--out .*a_file: is a file, not a directory"),
    ],
)
def test_prepare_option_errors_name_the_option_before_any_work(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    message: str,
) -> None:
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(shards_module, "_write", lambda *a, **k: pytest.fail("the work started"))
    argv = ["prepare", "synthetic", "--out", str(tmp_path / "out"), "--synthetic-train", "4"]
    argv += [x.replace("{tmp}", str(tmp_path)) for x in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("crossmoco prepare: ")
    assert re.search(message, err), err


def test_a_preview_that_fails_after_the_work_keeps_the_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(shards_module, "contact_sheet", broken)
    said: list[str] = []
    out = tmp_path / "out"
    src = H5Source(fixtures.modelnet_h5(tmp_path / "mn", n_train=4, n_test=2, points=32))
    manifest = prepare(src, str(out), opts(preview=str(tmp_path / "p.png")), log=said.append)
    assert read_manifest(str(out)) == manifest
    assert any("could not write the preview" in line and "No space left" in line for line in said), said


# ---- SIGTERM and stale work directories ----


class _Terminated(Source):
    """A source during whose reading the process receives SIGTERM (as from `kill`, Slurm or Kubernetes)."""

    format = "terminated"

    def splits(self) -> list[str]:
        return ["train"]

    def samples(self, split: str) -> Iterator[Sample | DataError]:
        rng = np.random.default_rng(0)
        for i in range(50):
            if i == 5:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)  # the handler runs in this thread at the next bytecode
            yield Sample(
                f"s{i}", rng.normal(size=(32, 3)).astype(np.float32), [fixtures.png(1), fixtures.png(2)]
            )


def test_sigterm_during_prepare_removes_the_work_directory_and_exits_143(tmp_path: Path) -> None:
    class Outside(Exception):
        pass

    def outside_handler(signum: int, frame: Any) -> None:
        raise Outside  # what the test process would do without prepare's own handling (not die)

    before = signal.signal(signal.SIGTERM, outside_handler)
    try:
        with pytest.raises(SystemExit) as done:
            prepare(_Terminated(), str(tmp_path / "out"), opts(), log=quiet)
        assert done.value.code == 143
        assert signal.getsignal(signal.SIGTERM) is outside_handler  # restored after prepare
    finally:
        signal.signal(signal.SIGTERM, before)
    assert not list((tmp_path / "out").glob(".incomplete-*"))


def test_stale_work_directories_of_dead_runs_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that is no longer alive
    host = socket.gethostname()
    now = time.time()
    owners = {
        "dead": {"pid": child.pid, "host": host, "heartbeat": now},
        "live": {"pid": os.getpid(), "host": host, "heartbeat": now - 10 * 86400},
        "remote-old": {"pid": 1, "host": "another-node", "heartbeat": now - 2 * 86400},
        "remote-new": {"pid": 1, "host": "another-node", "heartbeat": now - 60},
    }
    for name, owner in owners.items():
        (out / f".incomplete-{name}").mkdir()
        (out / f".incomplete-{name}" / "owner.json").write_text(json.dumps(owner))
        (out / f".incomplete-{name}" / "train-00000.parquet").write_text("half written")
    old = out / ".incomplete-old-version"  # a run of an older crossmoco-ray: no owner file
    old.mkdir()
    os.utime(old, (now - 2 * 86400, now - 2 * 86400))
    fresh = out / ".incomplete-fresh-old-version"
    fresh.mkdir()
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data.txt").write_text("keep")
    (out / ".incomplete-link").symlink_to(target)
    said: list[str] = []
    prepare(
        H5Source(fixtures.modelnet_h5(tmp_path / "mn", n_train=4, n_test=2, points=32)),
        str(out),
        opts(),
        log=said.append,
    )
    left = sorted(p.name for p in out.glob(".incomplete-*"))
    assert left == [
        ".incomplete-fresh-old-version",
        ".incomplete-link",
        ".incomplete-live",
        ".incomplete-remote-new",
    ]
    assert (target / "data.txt").read_text() == "keep"
    assert sum("removed the stale work directory" in line for line in said) == 3, said


# ---- issue 27: files that are not what their names say ----


@contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the body takes longer than ``seconds``."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_max_manifest_bytes_covers_a_large_real_manifest() -> None:
    classes = [f"class_{c:04d}" for c in range(1000)]
    files = [
        {
            "path": f"train-{i:05d}.parquet",
            "split": "train",
            "rows": 4096,
            "bytes": 123456789,
            "sha256": "f" * 64,
            "footer_sha256": "f" * 64,
            "row_group_sha256": ["f" * 64] * 8,
        }
        for i in range(2000)
    ]
    counts = {
        s: {"total": 10**7, "per_class": dict.fromkeys(classes, 10**4)} for s in ("train", "val", "test")
    }
    size = len(json.dumps({"files": files, "class_names": classes, "counts": counts}).encode())
    assert manifest_module.MAX_MANIFEST_BYTES == 16 * 1024**2
    assert 4 * size < manifest_module.MAX_MANIFEST_BYTES


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory"])
def test_a_manifest_that_is_not_a_regular_file_is_refused_at_once(
    dataset: Path, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = dataset / "manifest.json"
    manifest.unlink()
    if kind == "dev-zero":
        manifest.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.mkdir()
    with within(5):
        with pytest.raises(DataError, match="not a regular file"):
            read_manifest(str(dataset))
        assert main(["verify", str(dataset)]) == 2
        assert "not a regular file" in capsys.readouterr().err
        source = H5Source(fixtures.modelnet_h5(tmp_path / "mn", n_train=4, n_test=2, points=32))
        with pytest.raises(DataError, match="not a regular file"):
            prepare(source, str(dataset), opts(), log=quiet)


def test_a_manifest_over_the_limit_is_refused_without_reading_it_all(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(DataError, match="too large for a manifest"):
        read_manifest(str(dataset))


def test_an_owner_file_that_is_a_fifo_does_not_hang_prepare(tmp_path: Path) -> None:
    out = tmp_path / "out"
    work = out / ".incomplete-fifo"
    work.mkdir(parents=True)
    os.mkfifo(work / "owner.json")
    os.utime(work, (time.time() - 2 * 86400,) * 2)
    said: list[str] = []
    with within(5):
        remove_stale(*resolve(str(out)), str(out), said.append)
    assert not work.exists()
    assert "no owner" in said[0]


@pytest.mark.parametrize(
    "owner",
    [
        '{"host": "HOST", "pid": 99999999999999999999, "heartbeat": 0}',
        '{"host": "HOST", "pid": 4194305, "heartbeat": 0}',
        '{"host": "another-node", "pid": 1, "heartbeat": 1' + "0" * 400 + "}",
        '{"host": "another-node", "pid": 1, "heartbeat": NaN}',
        '{"host": "another-node", "pid": true, "heartbeat": 1.0}',
    ],
    ids=["huge-pid", "pid-over-pid-max", "huge-heartbeat", "nan-heartbeat", "bool-pid"],
)
def test_a_malformed_owner_file_is_an_unknown_owner(tmp_path: Path, owner: str) -> None:
    out = tmp_path / "out"
    old, fresh = out / ".incomplete-old", out / ".incomplete-fresh"
    for work in (old, fresh):
        work.mkdir(parents=True)
        (work / "owner.json").write_text(owner.replace("HOST", socket.gethostname()))
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    said: list[str] = []
    remove_stale(*resolve(str(out)), str(out), said.append)
    assert not old.exists()
    assert fresh.exists()
    assert len(said) == 1
    assert "no owner" in said[0]


@pytest.mark.parametrize("name", ["skipped.json", "train-00000.parquet", "manifest.json"])
def test_a_directory_where_prepare_writes_a_file_is_named_before_anything_moves(
    tmp_path: Path, name: str
) -> None:
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    (out / name / "keep.txt").write_text("keep")
    source = H5Source(fixtures.modelnet_h5(tmp_path / "mn", n_train=4, n_test=2, points=32))
    with pytest.raises(DataError, match=r"is a directory.*remove it or choose another --out"):
        prepare(source, str(out), opts(overwrite=True), log=quiet)
    assert sorted(p.name for p in out.iterdir()) == [name]
    assert (out / name / "keep.txt").read_text() == "keep"


def test_a_non_utf8_path_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = os.fsdecode(bytes(tmp_path) + b"/o\xff")
    source = H5Source(fixtures.modelnet_h5(tmp_path / "mn", n_train=4, n_test=2, points=32))
    with pytest.raises(DataError, match="not UTF-8"):
        prepare(source, bad, opts(), log=quiet)
    assert main(["verify", bad]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err
    assert "unreadable manifest" not in err
    err.encode()  # printable


def forge(root: Path, split: str, change: Any) -> None:
    """Rewrite ``split``'s first shard with ``change`` applied to its (points, labels) and re-seal the
    manifest around it: what a forger who knows the format can do."""
    manifest = json.loads((root / "manifest.json").read_text())
    info = next(f for f in manifest["files"] if f["split"] == split)
    path = root / info["path"]
    table = pq.read_table(path)
    points = table.column("points").combine_chunks().to_numpy_ndarray().copy()
    labels = table.column("label").to_numpy().copy()
    change(points, labels)
    schema = table.schema
    columns = {n: table.column(n) for n in schema.names}
    columns["points"] = pa.FixedShapeTensorArray.from_numpy_ndarray(points.astype(np.float32)).cast(
        schema.field("points").type
    )
    columns["label"] = pa.array(labels, schema.field("label").type)
    new = pa.table(columns, schema=schema)
    pq.write_table(new, path, row_group_size=4, write_page_checksum=True, compression="zstd")
    fs, _ = resolve(str(root))
    info.update(file_digests(fs, str(path)))
    if labels.max() > 10**6:
        manifest["counts"][split]["per_class"] = {str(int(labels.max())): len(labels)}
        manifest["class_names"] = None
    manifest.pop("manifest_sha256")
    (root / "manifest.json").write_text(json.dumps(seal(manifest)))


def _set(
    points: np.ndarray, labels: np.ndarray, label: int | None = None, value: float | None = None
) -> None:
    if label is not None:
        labels[2] = label
    if value is not None:
        points[2, 5, 1] = value


@pytest.mark.parametrize(
    ("label", "value", "message"),
    [
        (2147483647, None, r"test-00000\.parquet \[index 2\]: label 2147483647 outside 0\.\.[0-9]+$"),
        (None, float("nan"), r"test-00000\.parquet \[index 2\]: NaN or Inf at point 5"),
        (None, 1e30, r"test-00000\.parquet \[index 2\]: coordinates reach 1e\+30"),
        (-5, None, r"test-00000\.parquet \[index 2\]: label -5 is negative"),
    ],
    ids=["huge-label", "nan", "huge-coordinate", "negative-label"],
)
def test_evaluation_checks_the_rows_of_re_sealed_shards(
    dataset: Path, label: int | None, value: float | None, message: str
) -> None:
    forge(dataset, "test", lambda p, lab: _set(p, lab, label, value))
    with within(5), pytest.raises(DataError, match=message):
        load_split(str(dataset), "test")


def test_evaluation_refuses_labels_beyond_the_class_names(dataset: Path) -> None:
    names = read_manifest(str(dataset))["class_names"]
    forge(dataset, "train", lambda p, lab: _set(p, lab, len(names)))
    with pytest.raises(DataError, match=rf"train-00000\.parquet \[index 2\]: label {len(names)} outside"):
        load_split(str(dataset), "train")
