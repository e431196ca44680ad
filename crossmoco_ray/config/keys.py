"""The keys of a configuration schema: every dotted key, the nearest one to a mistyped key (the names people
type for them, :data:`ALIASES`, first), and the check that rejects unknown keys with that suggestion.

Used by the layered loading (:mod:`crossmoco_ray.config.loading`), by validation
(:mod:`crossmoco_ray.config.validation`) and by the search spaces of ``crossmoco tune``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from crossmoco_ray.bounded import short_repr
from crossmoco_ray.config.schema import Config
from crossmoco_ray.errors import ConfigError


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


def check_keys(
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
                f"unknown config key {short_repr(key)} in {origin}"
                + (f"; did you mean {hint!r}?" if hint else "")
                + f" ({lister})"
            )
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{short_repr(key)} in {origin} is a section: give it a mapping of keys, "
                    f"not {short_repr(value)}"
                )
            check_keys(value, origin, ann, f"{key}.", root)
