"""Elastic training's configuration: ``train.num_workers=[min, max]``, what ``config show`` says about every
size in the range, the checks before any worker starts, and what Ray Train is asked for."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from crossmoco_ray.cli.main import main
from crossmoco_ray.config.loading import load_config
from crossmoco_ray.config.serialized import to_yaml
from crossmoco_ray.errors import ConfigError
from crossmoco_ray.pretrain.resolve import default_name
from crossmoco_ray.runs.resources import check_resources

PAPER_ELASTIC = ["train.num_workers=[4,8]", "train.use_gpu=true"]


def test_a_range_is_the_elastic_minimum_and_maximum() -> None:
    cfg = load_config("paper", overrides=PAPER_ELASTIC)
    t = cfg.train
    assert (t.min_workers, t.num_workers, cfg.elastic) == (4, 8, True)
    assert (cfg.per_worker_batch, cfg.global_batch, cfg.global_batch_at(6)) == (20, 160, 120)
    # 4000 is no multiple of 120 or 140: accepted, the queue wraps (a fixed size of 6 is still refused)
    with pytest.raises(ConfigError, match="not a multiple of the global batch 120"):
        load_config("paper", overrides=["train.num_workers=6"])
    # the resolved config reads back as the same range
    train = yaml.safe_load(to_yaml(cfg))["train"]
    again = load_config("paper", overrides=[f"train.{k}={train[k]}" for k in ("num_workers", "min_workers")])
    assert (again.train.min_workers, again.train.num_workers) == (4, 8)
    # a range overrides the min_workers that config show wrote into a config file
    assert (
        load_config("paper", overrides=["train.min_workers=3", "train.num_workers=[2,4]"]).train.min_workers
        == 2
    )
    assert not load_config("paper", overrides=["train.num_workers=[4,4]"]).elastic  # a fixed size of 4


def test_config_show_explains_the_range_it_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--preset", "paper", *PAPER_ELASTIC]) == 0
    out = capsys.readouterr().out
    comments = [line for line in out.splitlines() if line.startswith("#")]
    text = "\n".join(comments)
    assert "elastic: 4 to 8 workers" in text
    assert "global batch 80 … 160 (20 per worker" in text
    assert "a multiple of the global batch at 4, 5, 8 worker(s), not at 6, 7" in text
    assert "checked: every size in the range" in text
    assert "learning rate 0.001 at every size (optim.lr_scaling=none)" in text
    assert "train.checkpoint_every_steps=500" in text
    assert yaml.safe_load(out)["train"]["min_workers"] == 4  # still a valid --config file
    assert main(["config", "show", "--preset", "paper", *PAPER_ELASTIC, "optim.lr_scaling=linear"]) == 0
    assert "learning rate 0.004 … 0.008 (optim.lr_scaling=linear" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["train.num_workers=[4,8,9]"], "a range [min, max] of two whole numbers"),
        (["train.num_workers=[8,4]"], "needs 0 < min <= max, e.g. train.num_workers=[4,8]"),
        (["train.num_workers=[0,4]"], "needs 0 < min <= max"),
        (["train.num_workers=[a,4]"], "two whole numbers"),
        (["train.num_workers=[true,4]"], "two whole numbers"),
        (["train.num_workers=4", "train.min_workers=6"], "give the elastic range as train.num_workers=[4,6]"),
        (
            ["train.num_workers=[2,4]", "train.batch_size=40", "train.batch_size_per_worker=null"],
            "train.batch_size=null train.batch_size_per_worker=10",
        ),
        (["train.num_workers=[2,8]", "objective.queue_length=100"], "use objective.queue_length=160 or more"),
        (["train.num_workers=[2,8]", "train.elastic_resize_interval_s=0"], "elastic_resize_interval_s"),
    ],
)
def test_bad_ranges_fail_with_the_fix(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("paper", overrides=overrides)
    assert named in str(err.value)
    assert len(str(err.value)) < 1200


def test_going_elastic_keeps_the_run_and_its_name() -> None:
    """Relaunching a fixed-size run as elastic on a fleet that shrank resumes it (how it runs, not what)."""
    fixed = load_config("paper", overrides=["train.num_workers=8"])
    elastic = load_config("paper", overrides=["train.num_workers=[4,8]"])
    assert default_name(fixed) == default_name(elastic)
    assert default_name(fixed) != default_name(load_config("paper", overrides=["train.num_workers=4"]))


LOCAL = {"CPU": 3.0, "memory": 16.0 * 2**30}
ONE_CPU = ["train.cpus_per_worker=1", "train.data_cpus=1"]


PER_WORKER = ["train.batch_size=null", "train.batch_size_per_worker=16"]  # quickstart gives a global batch


def test_an_elastic_run_needs_its_minimum_to_fit_and_says_what_fits_now() -> None:
    cfg = load_config("quickstart", overrides=[*PER_WORKER, *ONE_CPU, "train.num_workers=[1,4]"])
    said: list[str] = []
    check_resources(cfg, LOCAL, local=True, log=said.append)
    assert said == [
        "elastic: the cluster has room for 2 of train.num_workers=[1, 4] now; the run starts with what fits "
        "and grows when nodes join"
    ]
    too_many = load_config("quickstart", overrides=[*PER_WORKER, *ONE_CPU, "train.num_workers=[3,4]"])
    with pytest.raises(ConfigError, match=r"3 workers \(the elastic minimum\) × 1 CPU"):
        check_resources(too_many, LOCAL, local=True, log=print)


def test_ray_train_is_asked_for_the_range_and_the_resize_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.train.v2.api.config import ScalingConfig

    from crossmoco_ray.runs import launcher

    seen: dict[str, Any] = {}

    class Trainer:
        def __init__(self, *args: Any, scaling_config: ScalingConfig, **kwargs: Any) -> None:
            seen["scaling"] = scaling_config

    monkeypatch.setattr("ray.train.torch.TorchTrainer", Trainer)
    for workers, expected in (("[2,4]", (2, 4)), ("4", 4)):
        overrides = [*PER_WORKER, f"train.num_workers={workers}", "train.elastic_resize_interval_s=7"]
        cfg = load_config("quickstart", overrides=overrides)
        launch = launcher.Launch("n", "/tmp/x", lambda c: c, spec=None, train=cfg.train)  # type: ignore[arg-type]
        launcher.build_trainer(launch)
        scaling = seen["scaling"]
        assert scaling.num_workers == expected
        assert scaling.elasticity_enabled is (expected != 4)
        assert scaling.elastic_resize_monitor_interval_s == (7.0 if expected != 4 else 60.0)


def test_a_search_refuses_an_elastic_range() -> None:
    from crossmoco_ray.tuning.search import check_search
    from crossmoco_ray.tuning.space import load_space

    cfg = load_config("quickstart", overrides=[*PER_WORKER, "train.num_workers=[1,2]"])
    with pytest.raises(ConfigError, match="each trains at one size; give a number of workers"):
        check_search(cfg, load_space("moco"), {"counts": {"train": {}, "val": {}}})
