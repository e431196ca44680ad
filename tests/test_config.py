"""Config: presets, dotted overrides, unknown keys with suggestions, cross-field checks that say the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from crossmoco_ray.config.keys import valid_keys
from crossmoco_ray.config.loading import load_config, parse_override, preset_names
from crossmoco_ray.config.schema import Config
from crossmoco_ray.config.serialized import config_hash, flatten, to_yaml
from crossmoco_ray.config.validation import validate
from crossmoco_ray.errors import ConfigError


def test_paper_preset_is_the_crossmoco_recipe_and_the_schema_default() -> None:
    cfg = load_config("paper")
    assert cfg == Config()
    m, o, d, opt, t = cfg.model, cfg.objective, cfg.data, cfg.optim, cfg.train
    assert (m.point_encoder, m.k, m.emb_dims, m.proj_dim) == ("dgcnn", 15, 1024, 256)
    assert (m.image_encoder, m.image_weights) == ("resnet50", None)
    assert (o.queue_length, o.momentum, o.temperature, o.cross_temperature) == (4000, 0.9999, 0.1, 0.1)
    assert (opt.optimizer, opt.lr, opt.weight_decay, opt.schedule) == ("adam", 1e-3, 1e-6, "cosine")
    assert (t.epochs, t.batch_size_per_worker, d.num_points, d.image_size, d.views_per_sample) == (
        125,
        20,
        2048,
        224,
        2,
    )
    assert t.max_failures > 0  # failures are survived by default


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_validates(name: str) -> None:
    cfg = load_config(name)
    assert cfg.objective.queue_length % cfg.global_batch == 0
    assert cfg.train.max_failures != 0


def test_paper_on_eight_gpus_is_twenty_per_gpu() -> None:
    """The flagship cluster command: the paper's batch of 20 is per GPU, so 8 workers train at 160."""
    cfg = load_config("paper", overrides=["train.num_workers=8", "train.use_gpu=true"])
    assert (cfg.per_worker_batch, cfg.global_batch) == (20, 160)
    assert cfg.objective.queue_length % cfg.global_batch == 0
    assert cfg.base_lr == cfg.optim.lr  # no silent lr scaling


def test_a_global_batch_override_replaces_a_presets_per_worker_batch() -> None:
    cfg = load_config("paper", overrides=["train.num_workers=2", "train.batch_size=40"])
    assert (cfg.train.batch_size_per_worker, cfg.per_worker_batch, cfg.global_batch) == (None, 20, 40)
    cfg = load_config("quickstart", overrides=["train.batch_size_per_worker=8"])
    assert (cfg.train.batch_size, cfg.global_batch) == (None, 16)


def test_one_layer_setting_both_batches_or_none_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"sets both train\.batch_size"):
        load_config(extra={"train": {"batch_size": 40, "batch_size_per_worker": 20}})
    with pytest.raises(ConfigError, match=r"set exactly one of train\.batch_size"):
        validate({"train": {"batch_size_per_worker": None}})


def test_learning_rate_scales_with_the_global_batch_only_when_asked() -> None:
    base = ["train.num_workers=8", "optim.lr=0.001"]
    assert load_config("paper", overrides=base).base_lr == pytest.approx(0.001)
    linear = load_config("paper", overrides=[*base, "optim.lr_scaling=linear"])
    assert linear.base_lr == pytest.approx(0.001 * 160 / 20)
    sqrt = load_config("paper", overrides=[*base, "optim.lr_scaling=sqrt"])
    assert sqrt.base_lr == pytest.approx(0.001 * (160 / 20) ** 0.5)


def test_queue_check_uses_the_global_batch_from_workers_and_names_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("paper", overrides=["train.num_workers=3"])
    message = str(err.value)
    assert "global batch 60" in message
    assert "x 3 workers" in message
    assert "objective.queue_length=3960 or 4020" in message


def test_dotted_overrides_are_typed() -> None:
    cfg = load_config(
        "paper",
        overrides=[
            "objective.queue_length=8000",
            "optim.lr=3e-4",
            "model.image_weights=/tmp/w.pth",
            "objective.shuffle_bn=false",
            "optim.grad_clip=null",
        ],
    )
    assert cfg.objective.queue_length == 8000
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.image_weights == "/tmp/w.pth"
    assert cfg.objective.shuffle_bn is False
    assert cfg.optim.grad_clip is None
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("objective.queue_lenght=8000", "objective.queue_length"),
        ("queue_length=8000", "objective.queue_length"),
        ("optim.learning_rate=0.1", "optim.lr"),
        ("trian.epochs=3", "train.epochs"),
    ],
)
def test_unknown_key_names_the_nearest_valid_key(override: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        load_config(overrides=[override])


def test_unknown_key_in_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "my.yaml"
    path.write_text("objective:\n  temprature: 0.2\n")
    with pytest.raises(
        ConfigError, match=r"'objective.temprature' in .*my.yaml; did you mean 'objective.temperature'"
    ):
        load_config(config_file=path)


def test_queue_length_not_a_multiple_of_the_global_batch_suggests_4000_or_4100() -> None:
    with pytest.raises(ConfigError, match="queue_length=4096") as err:
        load_config("paper", overrides=["objective.queue_length=4096"])
    assert "4000" in str(err.value)
    assert "4100" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        (["train.batch_size=20", "train.num_workers=3"], "use num_workers in [1, 2, 4, 5, 10, 20]"),
        (["train.batch_size=20", "train.num_workers=3"], "train.batch_size_per_worker=6"),
        (
            ["train.batch_size=4", "train.num_workers=4", "objective.queue_length=16"],
            "raise train.batch_size to 8",
        ),
        (["model.k=2048"], "lower model.k below 2048"),
        (["tracking.register_model=enc", "tracking.log_model=false"], "set tracking.log_model=true"),
        (["train.batch_size=-1"], "train.batch_size: Input should be greater than 0"),
        (["objective.momentum=1.0"], "objective.momentum: Input should be less than 1"),
    ],
)
def test_invalid_values_say_the_fix(overrides: list[str], fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("paper", overrides=overrides)
    assert fix in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        (["train.num_workers=2", "train.gpus_per_worker=0.5"], "Duplicate GPU detected"),
        (["train.num_workers=2", "train.gpus_per_worker=0.5"], "set train.gpus_per_worker=1"),
        (["train.num_workers=2", "train.gpus_per_worker=2"], "e.g. train.num_workers=4"),
        (["train.gpus_per_worker=0"], "gives the workers no GPU"),
    ],
)
def test_gpus_that_a_worker_cannot_use_are_refused(overrides: list[str], fix: str) -> None:
    """One worker is one DDP process on one GPU: a fraction lets two ranks share a GPU (NCCL refuses),
    more than one reserves GPUs nothing uses."""
    with pytest.raises(ConfigError) as err:
        load_config("paper", overrides=["train.use_gpu=true", "objective.queue_length=4000", *overrides])
    assert fix in str(err.value)
    # a fraction is fine for a one-worker run (Tune trials sharing a GPU), and CPU runs ignore the key
    load_config("paper", overrides=["train.use_gpu=true", "train.gpus_per_worker=0.5"])
    load_config("paper", overrides=["train.num_workers=2", "train.gpus_per_worker=0.5"])


def test_finetuning_refuses_the_same_gpu_settings() -> None:
    from crossmoco_ray.config.finetune import load_finetune_config

    with pytest.raises(ConfigError, match="Duplicate GPU detected"):
        load_finetune_config(
            overrides=["train.use_gpu=true", "train.num_workers=2", "train.gpus_per_worker=0.5"]
        )
    with pytest.raises(ConfigError, match="reserves 3 GPUs per worker"):
        load_finetune_config(overrides=["train.use_gpu=true", "train.gpus_per_worker=3"])


def test_resolution_order_preset_then_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  log_every: 3\n")
    cfg = load_config("quickstart", config_file=path, overrides=["train.epochs=9"])
    assert cfg.model.image_encoder == "resnet18"  # preset
    assert cfg.train.log_every == 3  # file
    assert cfg.train.epochs == 9  # override wins


def test_yaml_round_trip_flatten_and_hash() -> None:
    cfg = load_config("quickstart", overrides=["objective.temperature=0.2"])
    again = Config.model_validate(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg
    flat = flatten(cfg)
    assert flat["objective.temperature"] == 0.2
    assert set(flat) == set(valid_keys())
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config("paper")) != config_hash(cfg)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'papr'.*did you mean 'paper'"):
        load_config("papr")
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(overrides=["objective.queue_length"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(config_file=path)


def test_a_config_stored_by_an_older_version_still_loads() -> None:
    """A checkpoint's config written before an option was removed (train.fault_at_step) and before the
    per-worker batch existed (only train.batch_size) loads: the removed key is dropped and named."""
    from crossmoco_ray.config.validation import validate_stored

    stored = load_config("quickstart").model_dump(mode="json")
    stored["train"]["fault_at_step"] = None
    stored["train"]["batch_size"] = 32
    del stored["train"]["batch_size_per_worker"]
    with pytest.raises(ConfigError):
        validate(stored)
    cfg, dropped = validate_stored(stored)
    assert dropped == ["train.fault_at_step"]
    assert cfg.global_batch == 32
    # a GPU run stored with 2 GPUs per worker (refused for new runs since) still loads, read as 1
    stored["train"] |= {"use_gpu": True, "gpus_per_worker": 2.0}
    cfg, dropped = validate_stored(stored)
    assert dropped == ["train.fault_at_step", "train.gpus_per_worker=2.0 (read as 1)"]
    assert cfg.train.gpus_per_worker == 1


# --------------------------------------------------------------------------------------------------
# Values no setting means anything at: non-finite floats, fractions outside [0, 1), negative resources
# --------------------------------------------------------------------------------------------------


def float_keys(model: type, prefix: str = "") -> list[str]:
    """Every dotted key of ``model`` that holds floats (alone, optional, in a list or as mapping values)."""
    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += float_keys(ann, f"{prefix}{name}.")
        elif "float" in str(ann):
            keys.append(f"{prefix}{name}")
    return keys


def _finetune_keys() -> list[str]:
    from crossmoco_ray.config.finetune import FinetuneConfig

    return float_keys(FinetuneConfig)


def bad_value(key: str, number: str) -> str:
    """An override giving ``key`` the YAML float ``number`` in the shape the key holds."""
    if key.endswith(("azimuths", "elevations", "fresh.azimuth", "fresh.elevation", "fresh.zoom")):
        return f"{key}=[0.0, {number}]"
    if key.endswith(("worker_resources", "render.resources")):
        return f"{key}={{trainer_slot: {number}}}"
    return f"{key}={number}"


@pytest.mark.parametrize("number", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("key", float_keys(Config))
def test_no_float_of_the_config_takes_inf_or_nan(key: str, number: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", overrides=[bad_value(key, number)])
    message = str(err.value)
    assert key in message
    assert "finite number" in message or "greater than" in message or "less than" in message


@pytest.mark.parametrize("number", [".inf", ".nan"])
@pytest.mark.parametrize("key", _finetune_keys())
def test_no_float_of_the_finetuning_config_takes_inf_or_nan(key: str, number: str) -> None:
    from crossmoco_ray.config.finetune import load_finetune_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_finetune_config(overrides=[f"{key}={number}"])


def test_a_non_finite_value_is_named_with_the_value_and_the_default() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["optim.lr=.inf", "objective.temperature=.nan"])
    message = str(err.value)
    assert "optim.lr: Input should be a finite number (got inf; the default is 0.001)" in message
    assert "objective.temperature: Input should be a finite number (got nan; the default is 0.1)" in message


FRACTIONS = [
    "data.val_fraction",
    "eval.val_fraction",
    "data.point_augment.dropout_max",
    "objective.momentum",
    "optim.sgd_momentum",
]
FINETUNE_FRACTIONS = ["data.val_fraction", "model.dropout", "optim.label_smoothing", "optim.momentum"]


@pytest.mark.parametrize("value", ["-0.1", "1.0", "1.5"])
def test_fractions_outside_zero_to_one_are_refused(value: str) -> None:
    from crossmoco_ray.config.finetune import load_finetune_config

    for key in FRACTIONS:
        with pytest.raises(ConfigError, match=rf"{key}: Input should be .* \(got {value}"):
            load_config(overrides=[f"{key}={value}"])
    for key in FINETUNE_FRACTIONS:
        with pytest.raises(ConfigError, match=rf"{key}: Input should be .* \(got {value}"):
            load_finetune_config(overrides=[f"{key}={value}"])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.cpus_per_worker=-1", "train.cpus_per_worker: Input should be greater than 0 (got -1"),
        ("train.gpus_per_worker=-1", "train.gpus_per_worker: Input should be greater than or equal to 0"),
        ("train.data_cpus=-0.5", "train.data_cpus: Input should be greater than or equal to 0 (got -0.5"),
        ("train.worker_resources={CPU: -1}", "train.worker_resources.CPU: Input should be greater than or"),
        ("train.worker_resources={memory: .nan}", "train.worker_resources.memory: Input should be a finite"),
        ("train.worker_resources={'': 1}", "train.worker_resources key '': String should have at least 1"),
        ("train.worker_resources={GPU: 1}", "GPUs are set by train.use_gpu=true and train.gpus_per_worker"),
        ("data.render.azimuths=[]", "data.render.azimuths: List should have at least 1 item"),
        ("data.render.elevations=[]", "data.render.elevations: List should have at least 1 item"),
        (
            "data.render.azimuths=[0, .inf]",
            "data.render.azimuths[1]: Input should be a finite number (got inf)",
        ),
    ],
)
def test_resources_and_view_angles_that_mean_nothing_are_refused_with_the_key(
    override: str, named: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert named in str(err.value)


@pytest.mark.parametrize(
    ("override", "named"),
    [("train.seed=-1", "train.seed"), ("train.seed=99999999999999999999", "train.seed"),
     ("train.epochs=0x7fffffffffffffffffffffffff", "train.epochs")],
)  # fmt: skip
def test_seeds_and_epochs_generators_and_schedules_cannot_take_are_refused(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config("quickstart", overrides=[override])
