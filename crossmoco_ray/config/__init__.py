"""The configuration: typed schemas (pretraining, fine-tuning), presets, layered loading, cross-field checks.

``from crossmoco_ray.config import load_config, Config`` is the public entry; the modules:
:mod:`.schema` (the pretraining schema, defaults = the paper recipe), :mod:`.finetune` (fine-tuning's),
:mod:`.loading` (presets ← file ← dotted overrides, bounded YAML, validation), :mod:`.consistency`
(checks across sections).
"""

from crossmoco_ray.config.loading import (
    Config,
    ConfigError,
    config_hash,
    flatten,
    load_config,
    parse_override,
    preset_names,
    to_yaml,
    validate,
)

__all__ = [
    "Config",
    "ConfigError",
    "config_hash",
    "flatten",
    "load_config",
    "parse_override",
    "preset_names",
    "to_yaml",
    "validate",
]
