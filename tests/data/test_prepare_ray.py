"""``prepare --ray``: the same shards, manifest and bad-input report as the local path, from Ray Data tasks;
an unexpected error inside a task reaches the caller with its message."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crossmoco_ray.data.prepare.options import PrepareOptions
from crossmoco_ray.data.prepare.prepare import prepare
from crossmoco_ray.data.render.splat import RenderSpec
from crossmoco_ray.data.sources.base import Source
from crossmoco_ray.data.sources.formats import open_source
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.errors import DataError
from tests.data import fixtures

pytestmark = pytest.mark.usefixtures("ray_session")

SPEC = RenderSpec(azimuths=(0.0, 120.0, 240.0), size=32)


def quiet(msg: str) -> None:
    pass


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.name != "manifest.json"}


def manifest(root: Path) -> dict[str, Any]:
    m = json.loads((root / "manifest.json").read_text())
    m.pop("created")
    return m


def test_ray_writes_the_local_bytes_and_report(tmp_path: Path) -> None:
    """A class-major mesh folder (with an empty mesh and a duplicate id: bad input) and the built-in set."""
    root = fixtures.mesh_folder(tmp_path / "meshes")
    (root / "cube" / "train" / "cube_9999.off").write_text("OFF\n0 0 0\n")
    v, q = fixtures.cube_mesh()
    fixtures.write_obj(root / "cube" / "train" / "cube_0001.obj", v, q)  # id cube/cube_0001 twice
    sources = {
        "meshes": open_source(str(root), num_points=128),
        "synthetic": open_source("synthetic", synthetic_counts={"train": 40, "test": 8}, num_points=128),
    }
    for name, src in sources.items():
        kw: dict[str, Any] = {"render": SPEC, "val_fraction": 0.25, "skip_bad": True, "rows_per_shard": 16}
        prepare(src, str(tmp_path / f"{name}-local"), PrepareOptions(**kw), log=quiet)
        prepare(src, str(tmp_path / f"{name}-ray"), PrepareOptions(**kw, ray=True), log=quiet)
        local, ray = tmp_path / f"{name}-local", tmp_path / f"{name}-ray"
        assert files(local) == files(ray), name
        assert manifest(local) == manifest(ray), name
    report = json.loads((tmp_path / "meshes-ray" / "skipped.json").read_text())
    problems = sorted(r["problem"] for r in report)
    assert problems == ["duplicate id 'cube/cube_0001'", "empty mesh: no faces (no vertices either)"]
    # Without --skip-bad the first bad input fails the run by name, as locally.
    with pytest.raises(DataError, match=r"cube_0001\.obj.*duplicate id|cube_0001\.off.*duplicate id"):
        prepare(sources["meshes"], str(tmp_path / "strict"), PrepareOptions(render=SPEC, ray=True), log=quiet)


class _Exploding(Source):
    """A source whose reader has a bug: the error is raised inside the Ray task."""

    format = "exploding"

    def splits(self) -> list[str]:
        return ["train"]

    def tasks(self, split: str) -> list[Any]:
        return [0, 1]

    def samples(self, split: str) -> Iterator[Sample | DataError]:
        raise AssertionError("not used")

    def read_task(self, split: str, task: Any) -> Iterator[Sample | DataError]:
        raise RuntimeError(f"reader bug in task {task}")


def test_an_error_inside_a_task_reaches_the_caller(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="reader bug in task"):
        prepare(_Exploding(), str(tmp_path / "out"), PrepareOptions(render=SPEC, ray=True), log=quiet)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob(".incomplete-*"))  # nothing half-written left behind
