"""The configuration: one typed schema, YAML presets, dotted overrides, checks that say the fix.

Resolution order: the schema's defaults (the CrossMoCo paper recipe, METHOD.md §2.2) ← a preset from
``crossmoco_ray/config/presets/`` ← a user's YAML file ← ``section.key=value`` overrides. Unknown keys are
rejected with the nearest valid name; cross-field checks (queue length vs global batch, batch vs
workers, k vs points, …) run before anything is built and name the fix. The schema itself is in
:mod:`crossmoco_ray.config.schema`; its names are importable from here,
where the rest of the project gets them.

Everything read here may be damaged or hostile (a config file, an override, the config stored in a
checkpoint): files are read up to :data:`MAX_CONFIG_BYTES`, YAML is composed at most
:data:`MAX_CONFIG_DEPTH` levels deep, and a loaded structure is walked as the tree it expands to (YAML
aliases and pickle's shared references counted every time they are used) and refused beyond
:data:`MAX_CONFIG_VALUES` values before anything else walks it; error messages show bad values through
:func:`~crossmoco_ray.bounded.short_repr`.

This module imports only pydantic, yaml and :mod:`crossmoco_ray.bounded`: it is the top layer of the
project.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from crossmoco_ray.bounded import clip, first_line, shape_problem, short_repr
from crossmoco_ray.config.consistency import cross_field_problems
from crossmoco_ray.config.schema import (
    DEFAULT_PRESET,
    Config,
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
from crossmoco_ray.errors import ConfigError

__all__ = [
    "DEFAULT_PRESET",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "MAX_CONFIG_VALUES",
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

# Bounds on anything read as a configuration. The whole schema is about 150 values a few levels deep and
# a config file a few kilobytes; the bounds leave room for long lists of view angles and comments, and
# keep a hostile file's cost to well under a second (aliases may still be used: they are counted).
MAX_CONFIG_BYTES = 1 << 20  # a file, and all the text in a stored configuration
MAX_CONFIG_VALUES = 10_000  # scalars, keys, mappings and lists, a shared one counted at every use
MAX_CONFIG_DEPTH = 20  # levels of nesting

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


class _LimitError(Exception):
    """YAML past the bounds (raised while composing, before anything is built from it)."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stopping at :data:`MAX_CONFIG_DEPTH` levels of nesting while it composes (it
    recurses once per level: deep brackets would end in a RecursionError) and at
    :data:`MAX_CONFIG_VALUES` nodes. Aliases are allowed; what they expand to is counted after loading."""

    def __init__(self, stream: str, origin: str) -> None:
        super().__init__(stream)
        self.name = origin  # PyYAML's messages say where: 'in "my.yaml", line 3', not '"<unicode string>"'
        self.depth = 0
        self.nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        self.nodes += 1
        try:
            if self.depth > MAX_CONFIG_DEPTH:
                raise _LimitError(f"is nested deeper than {MAX_CONFIG_DEPTH} levels")
            if self.nodes > MAX_CONFIG_VALUES:
                raise _LimitError(f"holds more than {MAX_CONFIG_VALUES} values")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def flatten_mapping(self, node: Any) -> None:
        # merge keys (<<: *a) copy the merged pairs into the node; PyYAML releases that keep every copy
        # (recent ones drop repeated keys) let mappings merging each other ten times over grow tenfold a level
        super().flatten_mapping(node)
        if len(node.value) > MAX_CONFIG_VALUES:
            raise _LimitError(f"holds more than {MAX_CONFIG_VALUES} values (merge keys counted)")


def load_yaml(text: str, origin: str) -> Any:
    """The plain data of YAML ``text`` (safe tags only), or a :class:`ConfigError` naming ``origin``:
    invalid YAML, a number Python refuses to read, or a document past the bounds (aliases expanded)."""
    try:
        return _load_bounded(text, origin)
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin} is not valid YAML: {clip(str(err), 600)}") from None


def _load_bounded(text: str, origin: str) -> Any:
    """:func:`load_yaml`, but invalid YAML raises PyYAML's own error (an override's value falls back to
    its text)."""
    loader = _BoundedLoader(text, origin)
    try:
        data = loader.get_single_data()
    except _LimitError as err:
        raise ConfigError(f"{origin} {err}: a configuration is a few hundred values") from None
    except (ValueError, OverflowError) as err:  # int("1" * 5000): beyond Python's limit on int digits
        number = first_line(str(err))
        raise ConfigError(f"{origin} holds a value that is not a valid number: {number}") from None
    finally:
        loader.dispose()
    problem = shape_problem(data, MAX_CONFIG_VALUES, MAX_CONFIG_DEPTH, MAX_CONFIG_BYTES)
    if problem:
        raise ConfigError(f"{origin} {problem}: a configuration is a few hundred values")
    return data


def read_yaml_mapping(text: str, origin: str) -> dict[str, Any]:
    data = load_yaml(text, origin)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a mapping of sections, got {type(data).__name__}")
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of sections in the YAML file ``path`` (at most :data:`MAX_CONFIG_BYTES`, UTF-8),
    bounded as :func:`load_yaml`; every problem is a :class:`ConfigError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a config file (give a YAML file)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with path.open("rb") as f:
            blob = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    if len(blob) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: a configuration is a few kilobytes of "
            "YAML (is it the right file?)"
        )
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text: a configuration is a YAML file") from None
    return read_yaml_mapping(text, str(path))


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
        value = _load_bounded(raw, f"override {short_repr(item)}") if raw.strip() else None
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


BATCH_KEYS = ("batch_size", "batch_size_per_worker")


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
