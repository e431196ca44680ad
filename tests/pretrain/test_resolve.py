"""What a launch resolves on the driver before any worker starts: paths, the monitor, the batch mix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crossmoco_ray.config.loading import load_config
from crossmoco_ray.data.prepare.options import PrepareOptions
from crossmoco_ray.data.prepare.prepare import prepare
from crossmoco_ray.data.render.splat import RenderSpec
from crossmoco_ray.data.sources.formats import SyntheticSource
from crossmoco_ray.errors import ConfigError
from crossmoco_ray.pretrain.data_checks import iid_batch_classes
from crossmoco_ray.pretrain.driver import pretrain
from crossmoco_ray.pretrain.launch import monitor_spec, pipeline_options
from crossmoco_ray.pretrain.resolve import resolve_run
from tests.data import fixtures
from tests.pretrain.test_pretrain_ray import TINY as RUN_TINY

TINY = ["data.num_points=32", "eval.num_points=32", "tracking.enabled=false"]


@pytest.fixture
def shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    prepare(
        SyntheticSource({"train": 60, "test": 13}, num_points=32),
        "data/shards",
        PrepareOptions(val_fraction=0.2, render=RenderSpec(size=16)),
    )
    return tmp_path / "data" / "shards"


def test_relative_paths_are_resolved_on_the_driver(shards: Path) -> None:
    """`crossmoco pretrain --data data/mn40`: Ray Train workers run in their own working directory, so
    everything they are sent must be absolute."""
    fixtures.modelnet_h5(Path("eval_h5"), n_train=12, n_test=6)
    cfg = load_config("quickstart", overrides=[*TINY, "eval.data=eval_h5"])
    run = resolve_run(cfg, data="data/shards", storage="runs", log=lambda m: None)
    assert run.data_root == str(shards)
    assert run.cfg.data.source == str(shards)
    assert run.cfg.eval.data == str(shards.parent.parent / "eval_h5")
    assert run.storage == str(shards.parent.parent / "runs")
    spec = monitor_spec(run)
    assert spec is not None
    assert spec.root == run.cfg.eval.data
    assert Path(spec.root).is_absolute()
    # the same from a config file's data.source
    from_cfg = resolve_run(
        load_config("quickstart", overrides=[*TINY, "data.source=data/shards"]), storage="runs", log=print
    )
    assert from_cfg.data_root == str(shards)
    assert monitor_spec(from_cfg).root == str(shards)  # type: ignore[union-attr]


def test_eval_data_that_is_missing_or_has_no_train_split_fails_before_start(shards: Path) -> None:
    from crossmoco_ray.errors import DataError

    with pytest.raises(DataError, match="nowhere"):
        resolve_run(load_config("quickstart", overrides=[*TINY, "eval.data=nowhere"]), data="data/shards")
    h5 = fixtures.modelnet_h5(Path("only_test"), n_train=4, n_test=4)
    (h5 / "train.h5").unlink()
    with pytest.raises(ConfigError, match="has no train split"):
        resolve_run(load_config("quickstart", overrides=[*TINY, f"eval.data={h5}"]), data="data/shards")


def test_window_and_iid_class_count_come_from_the_manifest(shards: Path) -> None:
    run = resolve_run(load_config("quickstart", overrides=TINY), data="data/shards", storage="runs")
    opts = pipeline_options(run.cfg, manifest=run.manifest)
    per_row = sum(f["bytes"] for f in run.manifest["files"] if f["split"] == "train") / sum(
        f["rows"] for f in run.manifest["files"] if f["split"] == "train"
    )
    assert opts.shuffle_window == int(256 * 1024**2 / per_row)
    iid = iid_batch_classes(run.cfg, run.manifest)
    assert 1.0 < iid <= min(13, run.cfg.per_worker_batch)


def test_chance_levels_follow_the_objective_weights() -> None:
    """Each InfoNCE at chance is ln(1 + K), NT-Xent ln(2N − 1); the total weighs them as the loss does."""
    import math

    from crossmoco_ray.pretrain.console import chance_levels

    plain = chance_levels(2048, 32)
    assert plain["chance_loss_point"] == pytest.approx(math.log(2049))
    assert plain["chance_loss_cross"] == pytest.approx(math.log(63))
    assert plain["chance_loss"] == pytest.approx(2 * math.log(2049) + math.log(63))
    weighted = chance_levels(2048, 32, (100.0, 1.0, 0.5))
    assert weighted["chance_loss"] == pytest.approx(101 * math.log(2049) + 0.5 * math.log(63))


def test_run_name_follows_what_is_trained_not_how_it_runs() -> None:
    """Relaunching with more restarts, another checkpoint interval or a model registry resumes the run;
    another learning rate is another run."""
    from crossmoco_ray.pretrain.resolve import default_name

    base = load_config("quickstart")
    same = load_config(
        "quickstart",
        overrides=["train.max_failures=-1", "train.checkpoint_every_steps=7", "tracking.register_model=enc",
                   "train.channels_last=false", "model.image_checkpoint=true"],
    )  # fmt: skip
    assert default_name(same) == default_name(base)
    assert default_name(load_config("quickstart", overrides=["optim.lr=0.002"])) != default_name(base)
    assert default_name(load_config("quickstart", overrides=["train.precision=bf16"])) != default_name(base)


def test_invalid_config_fails_before_any_worker_starts(tmp_path: Path) -> None:
    """``pretrain`` refuses a bad config and a config that does not fit the data before Ray starts."""
    import ray

    with pytest.raises(ConfigError, match=r"use objective\.queue_length=4080 or 4100"):
        tiny_config("objective.queue_length=4096", "train.batch_size=20", "train.num_workers=2")
    shards = tmp_path / "shards"
    prepare(
        SyntheticSource({"train": 30}, num_points=64), str(shards), PrepareOptions(render=RenderSpec(size=16))
    )
    was_running = ray.is_initialized()
    with pytest.raises(
        ConfigError, match=r"data\.num_points=128 but the shards hold 64 .* data\.num_points=64"
    ):
        pretrain(
            tiny_config("data.num_points=128"), name="bad", storage=str(tmp_path), data=str(shards), log=print
        )
    assert ray.is_initialized() == was_running  # nothing was started for it
    assert not (tmp_path / "bad").exists()


def tiny_config(*overrides: str) -> Any:
    return load_config("quickstart", overrides=[*RUN_TINY, *overrides])


def test_the_built_in_set_draws_its_validation_split_apart_from_train(tmp_path: Path) -> None:
    """``data.synthetic_val``: a val split of exactly that many objects, class-balanced, train uncarved (the
    final gains' standard errors shrink with it); 0 carves ``data.val_fraction`` of train as before."""
    from crossmoco_ray.data.shards.manifest import read_manifest
    from crossmoco_ray.pretrain.resolve import builtin_dataset

    small = [*TINY, "data.synthetic_train=32", "data.synthetic_test=16", "data.render.size=16",
             "data.render.azimuths=[0,180]"]  # fmt: skip
    root = builtin_dataset(
        load_config("quickstart", overrides=[*small, "data.synthetic_val=32"]), str(tmp_path), print
    )
    counts = read_manifest(root)["counts"]
    assert {s: counts[s]["total"] for s in counts} == {"train": 32, "val": 32, "test": 16}
    assert set(counts["val"]["per_class"].values()) == {2}  # 16 classes, 2 each
    carved = builtin_dataset(
        load_config("quickstart", overrides=[*small, "data.synthetic_val=0"]), str(tmp_path), print
    )
    assert carved != root
    counts = read_manifest(carved)["counts"]
    assert counts["train"]["total"] + counts["val"]["total"] == 32
    assert 0 < counts["val"]["total"] < 32
