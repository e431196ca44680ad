"""Views rendered in the pipeline: fresh viewpoints per (seed, epoch, object), the fixed grid, meshes and
splats, and the checks that keep a config from asking for views the shards cannot give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossmoco_ray.config.loading import load_config
from crossmoco_ray.data.pipeline.augment import ImageAugment
from crossmoco_ray.data.pipeline.batches import PipelineOptions, iter_local_batches, make_batch, split_files
from crossmoco_ray.data.prepare.options import PrepareOptions
from crossmoco_ray.data.prepare.prepare import prepare
from crossmoco_ray.data.render.camera import RenderSpec
from crossmoco_ray.data.render.viewpoints import Viewpoints, jittered, object_rng
from crossmoco_ray.data.sources.formats import FolderSource, SyntheticSource
from crossmoco_ray.errors import ConfigError, DataError
from crossmoco_ray.pretrain.data_checks import check_data
from crossmoco_ray.pretrain.launch import pipeline_options
from tests.data import fixtures

NO_AUGMENT = ImageAugment(brightness=0.0, contrast=0.0, saturation=0.0, hflip=0.0)
SPEC = RenderSpec(size=24)


@pytest.fixture(scope="module")
def mesh_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("viewpoints") / "meshes"
    prepare(SyntheticSource({"train": 24}, num_points=64, seed=2), str(root), PrepareOptions(store="meshes"))
    return root


def opts(**kw: object) -> PipelineOptions:
    base: dict[str, object] = {
        "num_points": 64,
        "image_size": 24,
        "seed": 5,
        "image_augment": NO_AUGMENT,
        "viewpoints": Viewpoints(spec=SPEC),
        "meshes": True,
    }
    return PipelineOptions(**{**base, **kw})  # type: ignore[arg-type]


def batch_of(root: Path, ids: list[int]) -> dict[str, object]:
    import pyarrow.parquet as pq

    table = pq.read_table(root / "train-00000.parquet").take(ids)
    return {
        "id": table.column("id").to_pylist(),
        "label": table.column("label").to_numpy(),
        "points": table.column("points").combine_chunks().to_numpy_ndarray(),
        "views": table.column("views").to_pylist(),
        "mesh": table.column("mesh").to_pylist(),
    }


def images_by_id(batch: dict[str, object], o: PipelineOptions, epoch: int) -> dict[str, np.ndarray]:
    out = make_batch(batch, o, epoch)
    # make_batch permutes rows; the label order follows the ids' permutation, so recover it from a render
    # of each object alone.
    single = {}
    for i, sid in enumerate(batch["id"]):  # type: ignore[arg-type]
        one = {k: v[i : i + 1] for k, v in batch.items()}  # type: ignore[index]
        single[sid] = make_batch(one, o, epoch)["images"][0]
    assert sorted(map(bytes, single.values())) == sorted(map(bytes, out["images"]))  # type: ignore[arg-type]
    return single


def test_fresh_viewpoints_change_every_epoch_and_not_with_the_batch(mesh_shards: Path) -> None:
    o = opts()
    whole = batch_of(mesh_shards, list(range(8)))
    e0 = images_by_id(whole, o, epoch=0)
    e1 = images_by_id(whole, o, epoch=1)
    again = images_by_id(batch_of(mesh_shards, [5, 0, 3]), o, epoch=0)  # another batch, the same objects
    for sid in again:
        np.testing.assert_array_equal(again[sid], e0[sid])  # (seed, epoch, id) alone decide the views
    differ = [not np.array_equal(e0[s], e1[s]) for s in e0]
    assert all(differ)  # two epochs see other viewpoints of every object
    assert all(img.max() > 0 for img in e0.values())  # the object is in view
    other_seed = images_by_id(whole, opts(seed=6), epoch=0)
    assert any(not np.array_equal(e0[s], other_seed[s]) for s in e0)


def test_views_are_renders_of_the_mesh_not_splats(mesh_shards: Path) -> None:
    whole = batch_of(mesh_shards, [0])
    mesh = images_by_id(whole, opts(), 0)
    splat = images_by_id(
        whole, opts(viewpoints=Viewpoints(spec=RenderSpec(size=24, points_only=True, point_size=1))), 0
    )
    sid = next(iter(mesh))
    assert not np.array_equal(mesh[sid], splat[sid])
    filled = (mesh[sid][..., 0] > 0).mean()
    assert filled > 2 * (splat[sid][..., 0] > 0).mean()  # surfaces fill what 64 points only dot


def test_fixed_viewpoints_are_distinct_views_of_the_grid() -> None:
    vp = Viewpoints(kind="fixed", spec=RenderSpec(azimuths=(0.0, 90.0, 180.0), elevations=(10.0, 30.0)))
    specs = vp.specs(np.random.default_rng(0), 6)
    assert sorted((s.azimuths[0], s.elevations[0]) for s in specs) == sorted(
        (a, e) for a in (0.0, 90.0, 180.0) for e in (10.0, 30.0)
    )
    with pytest.raises(ValueError, match="fixed grid of 6"):
        vp.specs(np.random.default_rng(0), 7)


def test_fresh_ranges_are_respected_and_checked() -> None:
    vp = Viewpoints(azimuth=(10.0, 20.0), elevation=(-5.0, 5.0), zoom=(0.5, 0.6), light_jitter=10.0)
    specs = vp.specs(object_rng(0, 0, "chair"), 200)
    assert all(10 <= s.azimuths[0] <= 20 and -5 <= s.elevations[0] <= 5 for s in specs)
    assert all(0.5 <= s.zoom <= 0.6 for s in specs)
    base = np.asarray(SPEC.light) / np.linalg.norm(SPEC.light)
    angles = [np.degrees(np.arccos(np.clip(np.dot(s.light, base), -1, 1))) for s in specs]
    assert max(angles) <= 10.0 + 1e-6
    assert max(angles) > 5.0  # jittered, not fixed
    assert np.allclose(jittered(SPEC.light, 0.0, np.random.default_rng(0)), base)
    for bad in ({"zoom": (0.1, 1.0)}, {"elevation": (40.0, 10.0)}, {"light_jitter": 120.0}, {"kind": "x"}):
        with pytest.raises(ValueError, match="Viewpoints"):
            Viewpoints(**bad)  # type: ignore[arg-type]


def test_point_only_shards_render_fresh_splats(tmp_path: Path) -> None:
    root = fixtures.point_folder(tmp_path / "points")
    prepare(FolderSource(root), str(tmp_path / "shards"), PrepareOptions(store="meshes", row_group_rows=4))
    o = opts(viewpoints=Viewpoints(spec=RenderSpec(size=24, mode="depth")), meshes=False)
    batches = list(iter_local_batches(str(tmp_path / "shards"), "train", o, batch_size=2, epoch=0))
    assert batches
    assert batches[0]["images"].shape[1:] == (2, 24, 24, 3)
    assert batches[0]["images"].max() > 0


def test_configs_that_ask_for_views_the_shards_lack_fail_before_training(mesh_shards: Path) -> None:
    import json

    manifest = json.loads((mesh_shards / "manifest.json").read_text())
    base = ["train.batch_size=4", "data.num_points=64"]
    cfg = load_config("quickstart", overrides=[*base, "data.render.viewpoints=stored"])
    with pytest.raises(ConfigError, match=r"0 views per object; set data.render.viewpoints=fresh"):
        check_data(cfg, str(mesh_shards), manifest)
    fixed = ["data.render.viewpoints=fixed", "data.render.azimuths=[0]", "data.views_per_sample=2"]
    with pytest.raises(ConfigError, match="grid of 1"):
        check_data(load_config("quickstart", overrides=[*base, *fixed]), str(mesh_shards), manifest)
    auto = load_config("quickstart", overrides=base)  # auto: no stored views, so fresh
    check_data(auto, str(mesh_shards), manifest)
    vp = pipeline_options(auto, manifest).viewpoints
    assert vp is not None
    assert vp.kind == "fresh"
    # auto renders only where nothing is stored: too few stored views is an error, not other images
    few = {**manifest, "views_per_object": 1}
    with pytest.raises(ConfigError, match=r"1 views per object; set data.views_per_sample=1"):
        check_data(auto, str(mesh_shards), few)
    for bad in ("{CPU: 1}", "{'': 1}", "{cpu_render: -1}", "{cpu_render: 1e9}"):
        with pytest.raises(ConfigError, match=r"data\.render\.resources"):
            load_config("quickstart", overrides=[f"data.render.resources={bad}"])
    with pytest.raises(ConfigError, match=r"data\.render\.num_cpus"):
        load_config("quickstart", overrides=["data.render.num_cpus=1e9"])
    with pytest.raises(DataError, match="viewpoints=fresh"):  # the pipeline's own check, for API users
        split_files(str(mesh_shards), "train", PipelineOptions(num_points=64))


def test_the_render_stage_asks_for_its_own_resources(
    mesh_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU-only nodes can render for GPU nodes: the render stage's tasks ask for data.render.num_cpus and the
    custom resources of data.render.resources (Ray Data itself is replaced by a recorder)."""
    import ray.data

    from crossmoco_ray.data.pipeline.batches import make_dataset

    calls: list[dict[str, object]] = []

    class Recorder:
        context = ray.data.DataContext.get_current()

        def map_batches(self, fn: object, **kwargs: object) -> Recorder:
            calls.append(kwargs)
            return self

    monkeypatch.setattr(ray.data, "from_items", lambda *a, **k: Recorder())
    make_dataset(str(mesh_shards), "train", opts(render_cpus=0.5, render_resources=(("cpu_render", 1.0),)))
    read, render = calls
    assert read["num_cpus"] == 0  # reading takes no CPU slot
    assert render["num_cpus"] == 0.5
    assert render["resources"] == {"cpu_render": 1.0}
