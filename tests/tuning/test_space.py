"""Search spaces: parsing, and the check that no sample can produce an invalid configuration (no Ray)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from crossmoco_ray.config import ConfigError, load_config
from crossmoco_ray.tuning import check_space, load_space, parse_space
from crossmoco_ray.tuning.report import best_row
from crossmoco_ray.tuning.search import check_search, concurrent_trials
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


def test_concurrency_is_capped_by_resources() -> None:
    cfg = load_config("quickstart")  # 2 workers x 0.5 CPU + 1 CPU for data + 0.1 driver = 2.1 CPUs a trial
    assert concurrent_trials(cfg, {"CPU": 2.0}) == 1
    assert concurrent_trials(cfg, {"CPU": 9.0}) == 4
    gpu = load_config("quickstart", overrides=["train.use_gpu=true", "train.num_workers=2"])
    assert concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4  # 2 GPUs a trial
    capped = load_config("quickstart", overrides=["tune.max_concurrent_trials=2"])
    assert concurrent_trials(capped, {"CPU": 64.0}) == 2


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
