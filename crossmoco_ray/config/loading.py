"""Layered loading of a configuration: the schema's defaults ← a preset ← a YAML file ← dotted overrides.

Resolution order: the schema's defaults (the CrossMoCo paper recipe, METHOD.md §2.2) ← a preset from
``crossmoco_ray/config/presets/`` ← a user's YAML file ← ``section.key=value`` overrides. Each layer's keys
are checked as it comes (an unknown key is rejected with the nearest valid name,
:mod:`crossmoco_ray.config.keys`); the merged result is validated with the cross-field checks (queue length
vs global batch, batch vs workers, k vs points, …) that run before anything is built and name the fix
(:mod:`crossmoco_ray.config.validation`). The schema itself is in :mod:`crossmoco_ray.config.schema`.

Everything read here may be damaged or hostile: files and overrides are read as bounded YAML
(:mod:`crossmoco_ray.config.yaml_files`), and error messages show bad values through
:func:`~crossmoco_ray.bounded.short_repr`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from crossmoco_ray.bounded import short_repr
from crossmoco_ray.config.keys import check_keys
from crossmoco_ray.config.schema import BATCH_KEYS, Config
from crossmoco_ray.config.validation import validate
from crossmoco_ray.config.yaml_files import (
    MAX_CONFIG_DEPTH,
    load_bounded,
    read_config_file,
    read_yaml_mapping,
)
from crossmoco_ray.errors import ConfigError


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_names() -> list[str]:
    """Names of the shipped presets (``crossmoco_ray/config/presets/*.yaml``)."""
    folder = resources.files("crossmoco_ray.config") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The YAML text of preset ``name``."""
    if name not in preset_names():
        close = difflib.get_close_matches(name, preset_names(), n=1)
        raise ConfigError(
            f"unknown preset {short_repr(name)}; choose one of {preset_names()}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
        )
    return (resources.files("crossmoco_ray.config") / "presets" / f"{name}.yaml").read_text()


def parse_override(item: str) -> dict[str, Any]:
    """``"objective.queue_length=8000"`` → ``{"objective": {"queue_length": 8000}}`` (YAML-typed value)."""
    if "=" not in item:
        raise ConfigError(
            f"override {short_repr(item)} must look like section.key=value, e.g. objective.queue_length=8000"
        )
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {short_repr(item)} has an empty key; use section.key=value")
    if len(key.split(".")) > MAX_CONFIG_DEPTH:
        raise ConfigError(f"override {short_repr(item)}: no key is nested that deep")
    try:
        value = load_bounded(raw, f"override {short_repr(item)}") if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: the text as it is
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


Layer = tuple[str, Mapping[str, Any]]  # (where it comes from, for messages; its sections)


def merge_layers(
    model: type[BaseModel],
    layers: Iterable[Layer],
    adjust: Callable[[Mapping[str, Any], str], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Layered loading, for every configuration of the project: each layer's keys checked against
    ``model`` (an unknown key is a :class:`ConfigError` naming the layer and the closest known key), then
    merged over the ones before it (``adjust`` may rewrite a layer first)."""
    data: dict[str, Any] = {}
    for origin, layer in layers:
        check_keys(layer, origin, model)
        data = merge(data, adjust(layer, origin) if adjust else layer)
    return data


def config_layers(
    preset: tuple[str, str] | None = None,
    config_file: str | Path | None = None,
    overrides: Sequence[str] | Iterable[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> list[Layer]:
    """The layers of a configuration, lowest first: a preset (``(name, yaml text)``) ← a YAML file ←
    ``extra`` (values from command-line arguments) ← dotted ``section.key=value`` overrides."""
    layers: list[Layer] = []
    if preset is not None:
        name, text = preset
        layers.append((f"preset {name!r}", read_yaml_mapping(text, f"preset {name!r}")))
    if config_file is not None:
        layers.append((str(config_file), read_config_file(config_file)))
    if extra:
        layers.append(("arguments", dict(extra)))
    layers += [(f"override {short_repr(item)}", parse_override(item)) for item in overrides]
    return layers


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Sequence[str] | Iterable[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve defaults ← ``preset`` ← ``config_file`` ← ``extra`` ← ``overrides`` into a checked Config."""
    shipped = (preset, preset_text(preset)) if preset is not None else None
    layers = config_layers(shipped, config_file, overrides, extra)
    return validate(merge_layers(Config, layers, adjust=_batch_layer))


def _batch_layer(layer: Mapping[str, Any], origin: str) -> Mapping[str, Any]:
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
