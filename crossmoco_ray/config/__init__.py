"""The configuration: typed schemas (pretraining, fine-tuning), presets, layered loading, cross-field checks.

``from crossmoco_ray.config import load_config, Config`` is the public entry; the modules:
:mod:`.schema` (the pretraining schema, defaults = the paper recipe), :mod:`.finetune` (fine-tuning's),
:mod:`.loading` (presets ← file ← dotted overrides), :mod:`.keys` (every key, the nearest to a typo,
unknown keys rejected), :mod:`.yaml_files` (bounded YAML), :mod:`.validation` (checks that say the fix),
:mod:`.serialized` (the resolved config as YAML, dotted keys, a hash), :mod:`.consistency` (checks across
sections).
"""

from crossmoco_ray.config.loading import load_config, parse_override, preset_names
from crossmoco_ray.config.schema import Config
from crossmoco_ray.config.serialized import config_hash, flatten, to_yaml
from crossmoco_ray.config.validation import validate
from crossmoco_ray.errors import ConfigError

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
