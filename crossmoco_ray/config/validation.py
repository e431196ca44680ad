"""Validation of a configuration from plain data, with messages that say the fix: unknown keys with the
nearest valid one, then pydantic's checks, one line per problem as ``dotted.key: message (got value; the
default is ...)``, bad values shown bounded (:func:`~crossmoco_ray.bounded.short_repr`).

:func:`validate_stored` reads the configuration stored in a checkpoint, which may be damaged or hostile
(shared references counted at every use) or written by an older version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from crossmoco_ray.bounded import clip, shape_problem, short_repr
from crossmoco_ray.config.keys import check_keys
from crossmoco_ray.config.schema import BATCH_KEYS, Config
from crossmoco_ray.config.yaml_files import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_VALUES
from crossmoco_ray.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def validate(data: Mapping[str, Any]) -> Config:
    """A checked :class:`Config` from a plain mapping, or a :class:`ConfigError` that says the fix."""
    return validate_as(Config, data, "configuration")


def validate_stored(data: Any, origin: str = "a checkpoint") -> tuple[Config, list[str]]:
    """The :class:`Config` stored in a checkpoint (``origin``: its file, for messages), bounded and
    checked like ``--config``: a :class:`ConfigError` names ``origin`` when it is not a mapping, is past
    the bounds of a configuration (shared references counted at every use) or does not validate.

    A checkpoint written by an older version: keys this schema no longer has (a removed option) are
    dropped and returned, so that its encoder still loads, as are values it now refuses where they cannot
    matter to the encoder (``train.gpus_per_worker`` other than 1, read as 1); everything else is checked
    as usual."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{origin}: the stored configuration is not a mapping of sections (got {short_repr(data)}); "
            "is it a crossmoco-ray checkpoint?"
        )
    problem = shape_problem(data, MAX_CONFIG_VALUES, MAX_CONFIG_DEPTH, MAX_CONFIG_BYTES)
    if problem:
        raise ConfigError(f"{origin}: the stored configuration {problem}; the checkpoint is damaged")
    dropped: list[str] = []

    def keep(node: Mapping[str, Any], model: type[BaseModel], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            field = model.model_fields.get(str(key))
            if field is None:
                dropped.append(clip(f"{prefix}{key}", 100))
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
            gpus = short_repr(train["gpus_per_worker"])
            dropped.append(f"train.gpus_per_worker={gpus} (read as 1)")
            kept["train"] = {**train, "gpus_per_worker": 1.0}
    return validate_as(Config, kept, f"configuration stored in {origin}"), dropped


def validate_as(model: type[M], data: Mapping[str, Any], what: str) -> M:
    """``model`` checked from a plain mapping: unknown keys with the nearest valid one, then pydantic's
    checks, every problem on its own line as ``dotted.key: message (got value; the default is ...)``, the
    value shown bounded (:func:`~crossmoco_ray.bounded.short_repr`)."""
    check_keys(data, f"the {what}", model)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors(include_url=False):
            loc = _dotted(e["loc"])
            msg = clip(e["msg"].removeprefix("Value error, "), 3000)
            if not loc:  # a cross-field check: its message names the keys and the fix
                lines.append(msg)
                continue
            default = _default_of(model, e["loc"])
            hint = f"; the default is {default}" if default is not None else ""
            lines.append(f"{loc}: {msg} (got {short_repr(e.get('input'))}{hint})")
        raise ConfigError(f"invalid {what}:\n  " + "\n  ".join(lines)) from None


def _dotted(loc: Sequence[Any]) -> str:
    """Pydantic's error location as a user writes it: ``data.render.azimuths[0]``,
    ``train.worker_resources key ''`` (a bad key of a mapping)."""
    text = ""
    for i, part in enumerate(loc):
        if part == "[key]":
            continue
        if i + 1 < len(loc) and loc[i + 1] == "[key]":
            text += f" key {short_repr(part, 60)}"
        elif isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + clip(str(part), 60)
    return text


def _default_of(model: type[BaseModel], loc: Sequence[Any]) -> str | None:
    """The default of the field at ``loc`` as YAML would spell it (a value that validates), if it has a
    plain one."""
    field = None
    node: Any = model
    for part in loc:
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return None
        field = node.model_fields.get(str(part))
        if field is None:
            return None
        node = field.annotation
    if field is None or field.default is PydanticUndefined or isinstance(field.default, BaseModel):
        return None
    value = field.default
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return short_repr(value, 60)
