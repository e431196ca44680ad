"""Search spaces: parsing, and the check that no sample can produce an invalid configuration (no Ray)."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest

from crossmoco_ray.config.loading import load_config
from crossmoco_ray.errors import ConfigError
from crossmoco_ray.tuning import check_space, load_space, parse_space
from crossmoco_ray.tuning.results import best_row
from crossmoco_ray.tuning.search import check_search, trial_concurrency, trials_that_fit
from crossmoco_ray.tuning.space import SHIPPED_DIR, with_values


def test_shipped_spaces_parse_and_fit_the_quickstart() -> None:
    names = sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))
    assert {"moco", "moco_lr"} <= set(names)
    cfg = load_config("quickstart")
    for name in names:
        space = load_space(name)
        check_space(space, cfg)
        assert {"objective.momentum", "objective.temperature", "objective.queue_length"} <= set(space.keys)
    assert "optim.lr" in load_space("moco_lr").keys


def test_unknown_key_is_rejected_with_the_nearest_name() -> None:
    with pytest.raises(ConfigError, match=re.escape("did you mean 'objective.temperature'")):
        parse_space({"objective.temprature": {"loguniform": [0.05, 0.2]}}, "space.yaml")


def test_queue_length_not_a_multiple_of_the_batch_is_rejected_with_neighbours() -> None:
    cfg = load_config("quickstart")  # global batch 32
    space = parse_space({"objective.queue_length": {"choice": [1024, 1000]}}, "s")
    with pytest.raises(ConfigError) as err:
        check_space(space, cfg)
    text = str(err.value)
    assert "objective.queue_length=1000" in text
    assert "992 or 1024" in text
    assert "queue_length=1024:" not in text  # the valid value is not blamed


def test_randint_ranges_are_checked_value_by_value() -> None:
    cfg = load_config("quickstart")
    with pytest.raises(ConfigError, match="queue_length=1025"):
        check_space(parse_space({"objective.queue_length": {"randint": [1024, 1100]}}, "s"), cfg)


def test_range_ends_are_checked_against_the_schema() -> None:
    cfg = load_config("quickstart")
    with pytest.raises(ConfigError, match=re.escape("objective.momentum")):  # 1 - 2 = -1 < 0
        check_space(parse_space({"objective.momentum": {"one_minus_loguniform": [1e-4, 2.0]}}, "s"), cfg)
    with pytest.raises(ConfigError, match=re.escape("needs low < high")):
        parse_space({"optim.lr": {"loguniform": [1e-2, 1e-3]}}, "s")
    with pytest.raises(ConfigError, match="unknown distribution"):
        parse_space({"optim.lr": {"normal": [1e-3, 1e-4]}}, "s")


def test_joint_combinations_are_checked() -> None:
    # Each value alone is valid against the base (batch 32), but batch 48 with queue 1024 is not.
    cfg = load_config("quickstart")
    space = parse_space({"train.batch_size": {"choice": [32, 48]}, "objective.queue_length": 1536}, "s")
    check_space(space, cfg)  # 1536 is a multiple of both
    space = parse_space(
        {"train.batch_size": {"choice": [32, 48]}, "objective.queue_length": {"choice": [1024, 1536]}}, "s"
    )
    with pytest.raises(ConfigError, match=re.escape("train.batch_size=48, objective.queue_length=1024")):
        check_space(space, cfg)


def test_one_minus_loguniform_maps_samples_to_momentum() -> None:
    space = parse_space({"objective.momentum": {"one_minus_loguniform": [1e-4, 1e-2]}}, "s")
    dim = space.dims[0]
    assert dim.to_value(1e-3) == pytest.approx(0.999)
    reps = dim.representatives()
    assert min(reps) == pytest.approx(0.99)
    assert max(reps) == pytest.approx(0.9999)
    assert space.overrides({"objective__momentum": 1e-4}) == {"objective.momentum": pytest.approx(0.9999)}


def test_search_level_checks(tmp_path: Path) -> None:
    cfg = load_config("quickstart")
    space = load_space("moco")
    with pytest.raises(ConfigError, match=re.escape("--val-fraction")):
        check_search(cfg, space, {"counts": {"train": 10, "test": 5}})
    with pytest.raises(ConfigError, match=re.escape("eval.eval_every=1")):
        check_search(
            load_config("quickstart", overrides=["eval.eval_every=2"]), space, {"counts": {"val": 1}}
        )
    with pytest.raises(ConfigError, match="grace_period"):
        check_search(
            load_config("quickstart", overrides=["tune.grace_period=5"]), space, {"counts": {"val": 1}}
        )


def test_concurrency_on_a_cluster_is_the_setting_not_the_resources_present() -> None:
    cfg = load_config("quickstart")  # 2 workers x 0.5 CPU + 1 CPU for data + 0.1 driver = 2.1 CPUs a trial
    # an autoscaling cluster starts empty: every trial is queued and its workers are pending demand
    assert trial_concurrency(cfg, {"CPU": 0.0}, local=False) is None
    assert trial_concurrency(cfg, {"CPU": 2.0}, local=False) is None
    capped = load_config("quickstart", overrides=["tune.max_concurrent_trials=3"])
    assert trial_concurrency(capped, {"CPU": 2.0}, local=False) == 3


def test_concurrency_on_a_local_ray_is_what_fits() -> None:
    # nothing adds nodes to a local Ray, and trials holding every CPU would starve each other's Ray Data
    cfg = load_config("quickstart")
    assert trial_concurrency(cfg, {"CPU": 2.0}, local=True) == 1
    assert trial_concurrency(cfg, {"CPU": 9.0}, local=True) == 4
    capped = load_config("quickstart", overrides=["tune.max_concurrent_trials=2"])
    assert trial_concurrency(capped, {"CPU": 64.0}, local=True) == 2
    gpu = load_config("quickstart", overrides=["train.use_gpu=true", "train.num_workers=2"])
    assert trials_that_fit(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4  # 2 GPUs a trial
    assert trials_that_fit(gpu, {"CPU": 64.0}) == 0  # what the search warns about on a cluster


def test_reports_carry_epoch_and_the_metric_tune_needs() -> None:
    from crossmoco_ray.tuning.callbacks import Carry

    carry = Carry(("epoch", "val_svm_clean"))
    first = carry({"step": 5, "loss": 9.0})  # mid-epoch, before any epoch ended or the monitor ran
    assert first["epoch"] == 0
    assert math.isnan(first["val_svm_clean"])
    assert carry({"epoch": 1, "step": 10, "val_svm_clean": 0.5})["val_svm_clean"] == 0.5
    mid = carry({"step": 15, "loss": 8.0})  # a mid-epoch checkpoint report of epoch 2
    assert (mid["epoch"], mid["val_svm_clean"], mid["step"]) == (1, 0.5, 15)
    nonfinite = carry({"epoch": 1, "step": 17, "nonfinite": 1.0})
    assert nonfinite["val_svm_clean"] == 0.5
    assert carry({"epoch": 2, "val_svm_clean": 0.6})["val_svm_clean"] == 0.6  # fresh values win


def test_progress_prints_a_trial_once_per_epoch() -> None:
    from types import SimpleNamespace

    from crossmoco_ray.tuning.callbacks import Progress

    lines: list[str] = []
    progress = Progress(3, "loss", lines.append)
    trial = SimpleNamespace(trial_id="t1")
    for result in ({"epoch": 0, "step": 4}, {"epoch": 1, "loss": 2.0}, {"epoch": 1, "step": 14},
                   {"epoch": 2, "loss": 1.5}):  # fmt: skip
        progress.on_trial_result(0, [], trial, result)
    assert [line.split(":")[0].strip() for line in lines] == ["trial t1 epoch 1/3", "trial t1 epoch 2/3"]


def test_best_trial_prefers_completed_trials() -> None:
    rows = [
        {"trial_id": "a", "val_svm_clean": 0.9, "status": "stopped_early"},
        {"trial_id": "b", "val_svm_clean": 0.8, "status": "completed"},
        {"trial_id": "c", "val_svm_clean": float("nan"), "status": "error"},
        {"trial_id": "d", "val_svm_clean": 0.7, "status": "completed"},
    ]
    assert best_row(rows, "max", "val_svm_clean")["trial_id"] == "b"  # type: ignore[index]
    assert best_row(rows, "min", "val_svm_clean")["trial_id"] == "d"  # type: ignore[index]
    assert best_row(rows[:1], "max", "val_svm_clean")["trial_id"] == "a"  # type: ignore[index]
    assert best_row(rows[2:3], "max", "val_svm_clean") is None


def test_with_values_sets_dotted_keys_without_touching_the_base() -> None:
    base = load_config("quickstart").model_dump(mode="json")
    out = with_values(base, {"objective.temperature": 0.2})
    assert out["objective"]["temperature"] == 0.2
    assert base["objective"]["temperature"] == 0.1


def test_the_console_callback_pickles_with_the_search_after_its_log_was_swapped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tune pickles its callbacks with the Tuner. print pickles by its name, which fails once builtins.print
    is another object (Ray's tqdm_ray swaps it in the driver when a progress bar reaches it): searches
    failed that way, at random, in CI. Here a builtin that nothing else swaps (ascii) stands in for print,
    which this test session's Ray may already have swapped."""
    import builtins
    import pickle

    from ray import cloudpickle

    from crossmoco_ray.tuning.callbacks import Progress, console

    original = builtins.ascii
    progress = Progress(3, "val_svm_clean", original)
    monkeypatch.setattr(builtins, "ascii", lambda obj: repr(obj))
    with pytest.raises(pickle.PicklingError):
        cloudpickle.dumps(original)
    restored = cloudpickle.loads(cloudpickle.dumps(progress))
    assert restored.log is console
    restored.log("a trial's line")
    assert "a trial's line" in capsys.readouterr().out
    assert cloudpickle.loads(cloudpickle.dumps(Progress(3, "loss", console))).log is console


def test_a_yaml_alias_bomb_in_a_search_space_is_refused_fast(tmp_path: Path) -> None:
    from tests.test_hostile_config import yaml_bomb

    path = tmp_path / "bomb.yaml"
    path.write_text(f"optim.lr: {yaml_bomb()}\n")  # a key that exists, a value that expands to 10**9
    started = time.monotonic()
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_space(str(path))
    assert time.monotonic() - started < 2.0
