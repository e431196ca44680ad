"""The resolved configuration written out: as YAML (saved beside every checkpoint), as dotted keys (logged
with every run) and as a short stable hash (naming a run's configuration)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import yaml

from crossmoco_ray.config.keys import valid_keys
from crossmoco_ray.config.schema import Config


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
