"""The configuration: one typed schema, YAML presets, dotted overrides, checks that say the fix.

Resolution order: the schema's defaults (the CrossMoCo paper recipe, METHOD.md §2.2) ← a preset from
``crossmoco_ray/configs/`` ← a user's YAML file ← ``section.key=value`` overrides. Unknown keys are
rejected with the nearest valid name; cross-field checks (queue length vs global batch, batch vs
workers, k vs points, …) run before anything is built and name the fix. The schema itself is in
:mod:`crossmoco_ray.schema`; its names are importable from here, where the rest of the project gets them.

This module imports only pydantic and yaml: it is the top layer of the project.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .schema import (
    DEFAULT_PRESET,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ImageAugmentConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    PointAugmentConfig,
    RenderConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
)
from .schema_checks import cross_field_problems

__all__ = [
    "DEFAULT_PRESET",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ImageAugmentConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "PointAugmentConfig",
    "RenderConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "cross_field_problems",
]

M = TypeVar("M", bound=BaseModel)

# --------------------------------------------------------------------------------------------------
# Keys, presets, overrides
# --------------------------------------------------------------------------------------------------


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. ``objective.queue_length``."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += valid_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


# Names people type for a key (paper symbols, other codebases' flags) → the schema's key.
ALIASES = {
    "K": "objective.queue_length",
    "queue_size": "objective.queue_length",
    "m": "objective.momentum",
    "T": "objective.temperature",
    "tau": "objective.temperature",
    "learning_rate": "optim.lr",
    "wd": "optim.weight_decay",
    "num_images": "data.views_per_sample",
    "num_views": "data.views_per_sample",
    "img_model": "model.image_encoder",
    "output_dim": "model.proj_dim",
    "workers": "train.num_workers",
}


def suggest_key(key: str, model: type[BaseModel] = Config) -> str | None:
    """The valid key of ``model`` nearest to ``key`` (an alias, the full dotted path, then its last part)."""
    keys = valid_keys(model)
    leaf = key.rsplit(".", 1)[-1]
    if model is Config and leaf in ALIASES:
        return ALIASES[leaf]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[close[0]] if close else None


def _first_leaf(key: str, value: Any) -> str:
    """``trian`` + ``{"epochs": 3}`` → ``trian.epochs``: suggestions work on full paths."""
    while isinstance(value, Mapping) and value:
        name, value = next(iter(value.items()))
        key = f"{key}.{name}"
    return key


def _check_keys(
    data: Mapping[str, Any],
    origin: str,
    model: type[BaseModel] = Config,
    prefix: str = "",
    root: type[BaseModel] | None = None,
) -> None:
    root = root or model
    for name, value in data.items():
        key = f"{prefix}{name}"
        field = model.model_fields.get(str(name))
        if field is None:
            key = _first_leaf(key, value)
            hint = suggest_key(key, root)
            lister = getattr(root, "KEYS_HINT", "`crossmoco config show` lists every key")
            raise ConfigError(
                f"unknown config key {key!r} in {origin}"
                + (f"; did you mean {hint!r}?" if hint else "")
                + f" ({lister})"
            )
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{key!r} in {origin} is a section: give it a mapping of keys, not {value!r}"
                )
            _check_keys(value, origin, ann, f"{key}.", root)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_names() -> list[str]:
    """Names of the shipped presets (``crossmoco_ray/configs/*.yaml``)."""
    folder = resources.files("crossmoco_ray") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The YAML text of preset ``name``."""
    if name not in preset_names():
        close = difflib.get_close_matches(name, preset_names(), n=1)
        raise ConfigError(
            f"unknown preset {name!r}; choose one of {preset_names()}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
        )
    return (resources.files("crossmoco_ray") / "configs" / f"{name}.yaml").read_text()


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> dict[str, Any]:
    """``"objective.queue_length=8000"`` → ``{"objective": {"queue_length": 8000}}`` (YAML-typed value)."""
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} must look like section.key=value, e.g. objective.queue_length=8000"
        )
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key; use section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {}
    set_dotted(out, key, value)
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``key="a.b"``, creating the sections on the way."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Sequence[str] | Iterable[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve defaults ← ``preset`` ← ``config_file`` ← ``extra`` ← ``overrides`` into a checked Config."""
    data: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    if preset is not None:
        layers.append((f"preset {preset!r}", _read_yaml(preset_text(preset), f"preset {preset!r}")))
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        layers.append((str(path), _read_yaml(path.read_text(), str(path))))
    if extra:
        layers.append(("arguments", dict(extra)))
    for item in overrides:
        layers.append((f"override {item!r}", parse_override(item)))
    for origin, layer in layers:
        _check_keys(layer, origin)
        data = _merge(data, _batch_layer(layer, origin))
    return validate(data)


BATCH_KEYS = ("batch_size", "batch_size_per_worker")


def _batch_layer(layer: dict[str, Any], origin: str) -> dict[str, Any]:
    """A layer that sets one of the two batch keys unsets the other (a preset's "20 per worker" gives way
    to an override's global batch and vice versa); one layer setting both is an error."""
    train = layer.get("train")
    if not isinstance(train, Mapping):
        return layer
    given = [k for k in BATCH_KEYS if train.get(k) is not None]
    if len(given) == 2:
        raise ConfigError(
            f"{origin} sets both train.batch_size (global) and train.batch_size_per_worker; keep one"
        )
    if not given:
        return layer
    other = BATCH_KEYS[1 - BATCH_KEYS.index(given[0])]
    return {**layer, "train": {**train, other: None}}


def validate(data: Mapping[str, Any]) -> Config:
    """A checked :class:`Config` from a plain mapping, or a :class:`ConfigError` that says the fix."""
    return validate_as(Config, data, "configuration")


def validate_stored(data: Mapping[str, Any]) -> tuple[Config, list[str]]:
    """The :class:`Config` stored in a checkpoint written by an older version: keys this schema no longer
    has (a removed option) are dropped and returned, so that its encoder still loads, as are values it
    now refuses where they cannot matter to the encoder (``train.gpus_per_worker`` other than 1, read as
    1); everything else is checked as usual."""
    dropped: list[str] = []

    def keep(node: Mapping[str, Any], model: type[BaseModel], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            field = model.model_fields.get(str(key))
            if field is None:
                dropped.append(f"{prefix}{key}")
                continue
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(value, Mapping):
                value = keep(value, ann, f"{prefix}{key}.")
            out[str(key)] = value
        return out

    kept = keep(data, Config, "")
    train = kept.get("train")
    if isinstance(train, dict):  # written before the per-worker batch existed: its one batch key rules
        given = [k for k in BATCH_KEYS if k in train]
        if len(given) == 1:
            other = BATCH_KEYS[1 - BATCH_KEYS.index(given[0])]
            train = kept["train"] = {**train, other: None}
        # GPUs per worker other than 1 are refused for new runs now; a stored run that used them loads
        if train.get("use_gpu") and train.get("gpus_per_worker", 1) != 1:
            dropped.append(f"train.gpus_per_worker={train['gpus_per_worker']} (read as 1)")
            kept["train"] = {**train, "gpus_per_worker": 1.0}
    return validate(kept), dropped


def validate_as(model: type[M], data: Mapping[str, Any], what: str) -> M:
    """``model`` checked from a plain mapping: unknown keys with the nearest valid one, then pydantic's
    checks, every problem on its own line as ``dotted.key: message (got value)``."""
    _check_keys(data, f"the {what}", model)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg} (got {e.get('input')!r})" if loc else msg)
        raise ConfigError(f"invalid {what}:\n  " + "\n  ".join(lines)) from None


def to_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML, sections in schema order."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"objective.queue_length": 4000, ...}``: every leaf under its dotted key (a mapping-valued field
    such as ``train.worker_resources`` is one leaf)."""
    out: dict[str, Any] = {}
    leaves = set(valid_keys())

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping) and f"{prefix}{key}" not in leaves:
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(cfg.model_dump(mode="json"), "")
    return out


def config_hash(cfg: Config, exclude: tuple[str, ...] = ()) -> str:
    """A short stable hash of the resolved configuration (12 hex digits), leaving out the dotted keys that
    start with any of ``exclude`` (e.g. ``("tracking.",)``)."""
    data: Any = cfg.model_dump(mode="json")
    if exclude:
        data = {k: v for k, v in flatten(cfg).items() if not k.startswith(exclude)}
    blob = json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
