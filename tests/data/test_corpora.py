"""Corpora as people have them: a folder tree without classes (``--format corpus``) and a list of files or
URIs (``list``), unlabelled (label −1) or labelled by a class column; hostile lists; Ray's shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import trimesh

from crossmoco_ray import storage
from crossmoco_ray.cli.main import main
from crossmoco_ray.data.prepare.options import PrepareOptions
from crossmoco_ray.data.prepare.prepare import prepare
from crossmoco_ray.data.render.splat import RenderSpec
from crossmoco_ray.data.sources import filelist
from crossmoco_ray.data.sources.formats import detect_format, open_source
from crossmoco_ray.errors import DataError

SPEC = RenderSpec(azimuths=(0.0, 120.0, 240.0), size=32)


def quiet(msg: str) -> None:
    pass


def objaverse_like(root: Path, n: int = 6) -> list[str]:
    """``glbs/000-00k/<uid>.glb`` (scenes of two boxes) and a point cloud: paths below ``root``."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        scene = trimesh.Scene()
        for j in range(2):
            box = trimesh.creation.box(extents=rng.uniform(0.5, 2.0, 3))
            scene.add_geometry(box, transform=trimesh.transformations.translation_matrix([j * 2.0, 0, 0]))
        rel = f"glbs/000-{i % 2:03d}/{i:032x}.glb"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(scene.export(file_type="glb"))
        out.append(rel)
    (root / "glbs" / "scans").mkdir()
    np.save(root / "glbs" / "scans" / "scan.npy", rng.normal(size=(300, 3)).astype(np.float32))
    return [*out, "glbs/scans/scan.npy"]


def opts(**kw: Any) -> PrepareOptions:
    return PrepareOptions(num_points=64, render=SPEC, rows_per_shard=16, **kw)


def rows(out: Path) -> list[dict[str, Any]]:
    return [
        r
        for f in sorted(out.glob("*.parquet"))
        for r in pq.read_table(f, columns=["id", "label", "split"]).to_pylist()
    ]


def test_an_unlabelled_folder_tree_prepares_as_a_corpus(tmp_path: Path) -> None:
    files = objaverse_like(tmp_path / "objaverse")
    src = open_source(str(tmp_path / "objaverse" / "glbs"), "corpus", num_points=64)
    assert src.class_names() is None
    assert src.has_meshes()
    manifest = prepare(src, str(tmp_path / "out"), opts(val_fraction=0.3), log=quiet)
    assert manifest["class_names"] is None
    assert set(manifest["counts"]) == {"train", "val"}
    assert sum(c["total"] for c in manifest["counts"].values()) == len(files)
    assert all(set(c["per_class"]) == {"-1"} for c in manifest["counts"].values())
    got = rows(tmp_path / "out")
    assert {r["label"] for r in got} == {-1}
    assert sorted(r["id"] for r in got) == sorted(f.removeprefix("glbs/") for f in files)


def test_a_tree_guessed_as_class_folders_says_to_pass_format_corpus(tmp_path: Path) -> None:
    objaverse_like(tmp_path / "o")
    with pytest.raises(DataError, match="--format corpus"):
        open_source(str(tmp_path / "o"))  # glbs/ would be a class whose files are all one level deeper
    (tmp_path / "flat").mkdir()
    np.save(tmp_path / "flat" / "a.npy", np.zeros((10, 3), np.float32))
    with pytest.raises(DataError, match="--format corpus"):
        open_source(str(tmp_path / "flat"))


def write_list(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


def test_a_list_of_paths_and_file_uris_with_bad_lines_named_per_line(tmp_path: Path) -> None:
    files = objaverse_like(tmp_path / "data")
    lst = write_list(
        tmp_path / "data" / "files.txt",
        [
            "# Objaverse, a few",
            files[0],  # relative to the list's folder
            str(tmp_path / "data" / files[1]),  # absolute
            (tmp_path / "data" / files[2]).as_uri(),  # file://
            "",
            files[-1],
            "glbs/missing.glb",
            b"glbs/\xff\xfe.glb",
            "x" * 5000,
            "http://example.com/a.glb",
            "/dev/zero.glb",
        ],
    )
    assert detect_format(str(lst)) == "list"
    with pytest.raises(DataError, match=r"missing\.glb \(files\.txt line 7\): missing"):
        prepare(open_source(str(lst), num_points=64), str(tmp_path / "strict"), opts(), log=quiet)
    manifest = prepare(
        open_source(str(lst), num_points=64), str(tmp_path / "out"), opts(skip_bad=True), log=quiet
    )
    assert manifest["counts"]["train"]["total"] == 4
    assert {r["label"] for r in rows(tmp_path / "out")} == {-1}
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    problems = {r["source"].rsplit(" line ", 1)[-1].rstrip(")"): r["problem"] for r in skipped}
    assert problems["7"] == "missing, or not a regular file"
    assert problems["8"] == "not valid UTF-8"
    assert problems["9"].startswith("a line over 4096 bytes")
    assert problems["10"].startswith("URI scheme 'http'")
    assert problems["11"] == "missing, or not a regular file"


def test_a_labelled_list_and_a_half_labelled_one(tmp_path: Path) -> None:
    files = objaverse_like(tmp_path)
    lst = write_list(tmp_path / "l.txt", [f"{f}\t{'box' if f.endswith('.glb') else 'scan'}" for f in files])
    src = open_source(str(lst), num_points=64)
    assert src.class_names() == ["box", "scan"]
    manifest = prepare(src, str(tmp_path / "out"), opts(), log=quiet)
    assert manifest["counts"]["train"]["per_class"] == {"box": 6, "scan": 1}
    write_list(lst, [f"{files[0]}\tbox", files[1]])
    with pytest.raises(DataError, match="line 2 has no class column but line 1 has one"):
        open_source(str(lst))


def test_hostile_lists_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lst = write_list(tmp_path / "l.txt", ["a.npy"] * 10)
    monkeypatch.setattr(filelist, "LIST_BYTES", 32)
    with pytest.raises(DataError, match=r"a list of \d+ bytes"):
        open_source(str(lst))
    monkeypatch.setattr(filelist, "LIST_BYTES", 1024**3)
    monkeypatch.setattr(filelist, "LIST_ENTRIES", 5)
    with pytest.raises(DataError, match="more than 5 objects"):
        open_source(str(lst))
    write_list(lst, ["# nothing", ""])
    with pytest.raises(DataError, match="names no files"):
        open_source(str(lst))
    with pytest.raises(DataError, match="not found"):
        open_source(str(tmp_path / "none.txt"), "list")


def test_malformed_uris_and_uris_with_options_are_named_by_line(tmp_path: Path) -> None:
    """A crafted line neither stops the run (pyarrow's error for a malformed URI is named with the line) nor
    passes filesystem options: a query could send this bucket's reads, signed, to another endpoint."""
    (tmp_path / "a.xyz").write_text("0 0 0\n1 1 1\n")
    lst = write_list(
        tmp_path / "files.txt",
        [
            "s3:///no-bucket.glb",
            "s3://bucket/k?endpoint_override=evil.example/x.glb",
            "gs://b/k.glb#x",
            "a.xyz",
        ],
    )
    got = list(open_source(str(lst)).samples("train"))
    assert [type(x).__name__ for x in got] == ["DataError", "DataError", "DataError", "Sample"]
    assert "files.txt line 1): not a readable URI (Missing bucket name" in str(got[0])
    for err in got[1:3]:
        assert "a URI with a query or fragment" in str(err)
    with pytest.raises(DataError, match="cannot read the list"):
        open_source("s3:///files.txt")


def test_an_s3_list_reads_through_pyarrow_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``s3://bucket/...`` served from a local folder: the storage helper (``FileSystem.from_uri``) gives a
    filesystem and the ``bucket/key`` path, as pyarrow's S3 does (no real S3 here)."""
    bucket = tmp_path / "s3"
    files = objaverse_like(bucket / "bucket" / "objaverse")
    gltf = trimesh.creation.box().export(file_type="gltf")
    (bucket / "bucket" / "objaverse" / "split").mkdir()
    for name, data in gltf.items():
        (bucket / "bucket" / "objaverse" / "split" / name).write_bytes(data)
    write_list(
        bucket / "bucket" / "objaverse" / "files.txt",
        [files[0], f"s3://bucket/objaverse/{files[1]}", "split/model.gltf", "glbs/gone.glb"],
    )
    real = storage.resolve
    calls: list[str] = []

    def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
        if not uri.startswith("s3://"):
            return real(uri)
        calls.append(uri)
        return pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem()), uri.removeprefix("s3://")

    monkeypatch.setattr(storage, "resolve", resolve)
    spec = "s3://bucket/objaverse/files.txt"
    assert detect_format(spec) == "list"
    src = open_source(spec, num_points=64)
    manifest = prepare(src, str(tmp_path / "out"), opts(skip_bad=True), log=quiet)
    assert manifest["counts"]["train"]["total"] == 3
    ids = {r["id"] for r in rows(tmp_path / "out")}
    assert ids == {files[0], f"s3://bucket/objaverse/{files[1]}", "split/model.gltf"}
    (problem,) = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert problem["problem"] == "not found"
    assert "s3://bucket/objaverse/glbs/gone.glb (files.txt line 4)" in problem["source"]
    assert len(calls) == 2  # the list, then one filesystem for the bucket's objects


@pytest.mark.usefixtures("ray_session")
def test_corpus_and_list_on_ray_write_the_local_bytes(tmp_path: Path) -> None:
    files = objaverse_like(tmp_path / "data", n=4)
    lst = write_list(tmp_path / "data" / "files.txt", [*files, "glbs/missing.glb"])
    for name, src in {
        "corpus": open_source(str(tmp_path / "data"), "corpus", num_points=64),
        "list": open_source(str(lst), num_points=64),
    }.items():
        kw: dict[str, Any] = {"val_fraction": 0.25, "skip_bad": True}
        prepare(src, str(tmp_path / f"{name}-local"), opts(**kw), log=quiet)
        prepare(src, str(tmp_path / f"{name}-ray"), opts(**kw, ray=True), log=quiet)
        local, ray = tmp_path / f"{name}-local", tmp_path / f"{name}-ray"
        for f in sorted(local.iterdir()):
            if f.name != "manifest.json":
                assert f.read_bytes() == (ray / f.name).read_bytes(), (name, f.name)


def test_the_cli_takes_format_corpus(tmp_path: Path) -> None:
    objaverse_like(tmp_path / "o", n=2)
    args = ["prepare", str(tmp_path / "o"), "--format", "corpus", "--out", str(tmp_path / "out")]
    assert main([*args, "--num-points", "64", "--render-size", "32", "--azimuths", "0,180"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source"]["format"] == "corpus"
