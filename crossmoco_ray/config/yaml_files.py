"""Reading YAML that may be damaged or hostile (a config file, an override's value, a preset), bounded.

Files are read up to :data:`MAX_CONFIG_BYTES`, YAML is composed at most :data:`MAX_CONFIG_DEPTH` levels
deep, and a loaded structure is walked as the tree it expands to (YAML aliases counted every time they are
used) and refused beyond :data:`MAX_CONFIG_VALUES` values before anything else walks it. Every problem is a
:class:`~crossmoco_ray.errors.ConfigError` naming where the text came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from crossmoco_ray.bounded import clip, first_line, shape_problem
from crossmoco_ray.errors import ConfigError

# Bounds on anything read as a configuration. The whole schema is about 150 values a few levels deep and
# a config file a few kilobytes; the bounds leave room for long lists of view angles and comments, and
# keep a hostile file's cost to well under a second (aliases may still be used: they are counted).
MAX_CONFIG_BYTES = 1 << 20  # a file, and all the text in a stored configuration
MAX_CONFIG_VALUES = 10_000  # scalars, keys, mappings and lists, a shared one counted at every use
MAX_CONFIG_DEPTH = 20  # levels of nesting


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
        return load_bounded(text, origin)
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin} is not valid YAML: {clip(str(err), 600)}") from None


def load_bounded(text: str, origin: str) -> Any:
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
