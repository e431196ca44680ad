"""Search spaces: YAML files keyed by dotted config paths, checked against the schema before a search.

A space file maps dotted keys to one distribution each::

    objective.momentum: {one_minus_loguniform: [1.0e-4, 1.0e-2]}  # m = 1 - u, u log-uniform
    objective.temperature: {loguniform: [0.05, 0.3]}
    objective.queue_length: {choice: [1024, 2048, 4096]}
    optim.lr: {loguniform: [1.0e-4, 3.0e-3]}

Distributions: ``uniform``, ``loguniform`` and ``one_minus_loguniform`` ([low, high]), ``randint``
([low, high), integers), ``choice`` and ``grid`` (lists; ``grid`` runs every value, ``--trials`` times). A
plain value fixes the key for the whole search. :func:`check_space` proves that no sample can produce an
invalid configuration (it builds a config at every choice value and at the ends and middle of every range)
before any trial starts; its messages carry the config's own fixes (e.g. the valid queue lengths nearby).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossmoco_ray.config.keys import suggest_key, valid_keys
from crossmoco_ray.config.loading import set_dotted
from crossmoco_ray.config.schema import Config
from crossmoco_ray.config.validation import validate
from crossmoco_ray.config.yaml_files import read_config_file
from crossmoco_ray.errors import ConfigError

KINDS = ("uniform", "loguniform", "one_minus_loguniform", "randint", "choice", "grid")
RANDINT_EXHAUSTIVE = 20_000  # integer ranges up to this size are checked value by value
MAX_PRODUCT = 512  # joint check of every combination of representative values up to this many
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "tune_spaces"


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``kind`` over ``args`` (or a fixed ``value`` when kind is ``fixed``)."""

    key: str
    kind: str
    args: tuple[Any, ...]

    @property
    def log_scale(self) -> bool:
        return self.kind in ("loguniform", "one_minus_loguniform")

    def to_value(self, sample: Any) -> Any:
        """The config value of a raw sample (``one_minus_loguniform`` samples 1 − value)."""
        return 1.0 - float(sample) if self.kind == "one_minus_loguniform" else sample

    def representatives(self) -> list[Any]:
        """Config values that bound what a sample can be: every discrete value, range ends and middle."""
        if self.kind in ("choice", "grid", "fixed"):
            return list(self.args)
        lo, hi = self.args
        if self.kind == "randint":
            if hi - lo <= RANDINT_EXHAUSTIVE:
                return list(range(lo, hi))
            return [lo, (lo + hi) // 2, hi - 1]
        mid = math.sqrt(lo * hi) if self.log_scale else (lo + hi) / 2
        return [self.to_value(v) for v in (lo, mid, hi)]

    def tune_domain(self) -> Any:
        """The Ray Tune sampler of the raw sample."""
        from ray import tune

        if self.kind == "fixed":
            return self.args[0]
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind in ("loguniform", "one_minus_loguniform"):
            return tune.loguniform(*self.args)
        if self.kind == "randint":
            return tune.randint(*self.args)
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return tune.grid_search(list(self.args))

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.key} = {self.args[0]!r}"
        if self.kind == "one_minus_loguniform":
            return f"{self.key} = 1 - loguniform{list(self.args)}"
        return f"{self.key} ~ {self.kind}{list(self.args)}"


@dataclass(frozen=True)
class Space:
    name: str
    dims: tuple[Dimension, ...]

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dims]

    @property
    def searched(self) -> list[Dimension]:
        return [d for d in self.dims if d.kind != "fixed"]

    def param_space(self) -> dict[str, Any]:
        """Tune's param space: one entry per key (dots replaced, since Tune flattens with '/')."""
        return {encode_key(d.key): d.tune_domain() for d in self.dims}

    def overrides(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Dotted config values of one trial's sample."""
        return {d.key: d.to_value(sampled[encode_key(d.key)]) for d in self.dims}

    def describe(self) -> str:
        return "\n".join(f"  {d.describe()}" for d in self.dims)


def encode_key(key: str) -> str:
    return key.replace(".", "__")


def _parse_dimension(key: str, spec: Any, origin: str) -> Dimension:
    if not isinstance(spec, dict):
        return Dimension(key, "fixed", (spec,))
    if len(spec) != 1:
        raise ConfigError(f"{origin}: {key} needs exactly one distribution, one of {', '.join(KINDS)}")
    kind, args = next(iter(spec.items()))
    if kind not in KINDS:
        raise ConfigError(f"{origin}: {key}: unknown distribution {kind!r}; use one of {', '.join(KINDS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{origin}: {key}: {kind} takes a non-empty list, e.g. {{{kind}: [a, b]}}")
    if kind in ("choice", "grid"):
        return Dimension(key, kind, tuple(args))
    if len(args) != 2:
        raise ConfigError(f"{origin}: {key}: {kind} takes [low, high], got {args}")
    lo, hi = args
    if kind == "randint":
        if not (isinstance(lo, int) and isinstance(hi, int)) or lo >= hi:
            raise ConfigError(
                f"{origin}: {key}: randint takes integers low < high (high excluded), got {args}"
            )
        return Dimension(key, kind, (lo, hi))
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {key}: {kind} takes numbers [low, high], got {args}") from None
    if not lo < hi:
        raise ConfigError(f"{origin}: {key}: {kind} needs low < high, got {args}")
    if kind != "uniform" and lo <= 0:
        raise ConfigError(f"{origin}: {key}: {kind} needs 0 < low, got {args}")
    return Dimension(key, kind, (lo, hi))


def resolve_space_path(space: str) -> Path:
    """A file path, or the name of a shipped space (``moco``, ``moco_lr``)."""
    path = Path(space)
    if path.is_file():
        return path
    for folder in (SHIPPED_DIR, Path.cwd() / "tune_spaces"):
        candidate = folder / (space if space.endswith(".yaml") else f"{space}.yaml")
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml")) if SHIPPED_DIR.is_dir() else []
    raise ConfigError(f"search space {space!r} is neither a file nor a shipped space ({', '.join(shipped)})")


def load_space(space: str) -> Space:
    path = resolve_space_path(space)
    data = read_config_file(path)  # bounded as --config is: size, depth, values (YAML aliases counted)
    return parse_space(data, str(path), name=path.stem)


def parse_space(data: Any, origin: str, name: str = "space") -> Space:
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{origin}: a search space is a mapping of dotted config keys to distributions")
    keys = set(valid_keys())
    dims = []
    for key, spec in data.items():
        if key not in keys:
            hint = suggest_key(str(key))
            raise ConfigError(
                f"{origin}: {key!r} is not a configuration key"
                + (f"; did you mean {hint!r}?" if hint else "; see `crossmoco config show`")
            )
        dims.append(_parse_dimension(key, spec, origin))
    return Space(name, tuple(dims))


def with_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a config as a plain mapping) with dotted ``values`` set."""
    out = copy.deepcopy(base)
    for key, value in values.items():
        set_dotted(out, key, value)
    return out


def check_space(space: Space, base: Config) -> None:
    """Raise a :class:`ConfigError` listing every value of the space that gives an invalid configuration."""
    base_data = base.model_dump(mode="json")
    problems: dict[str, str] = {}

    def attempt(values: dict[str, Any]) -> None:
        try:
            validate(with_values(base_data, values))
        except ConfigError as err:
            what = ", ".join(f"{k}={v!r}" for k, v in values.items())
            msg = str(err).removeprefix("invalid configuration:\n  ")
            problems.setdefault(msg, what)  # one line per distinct problem

    reps = {d.key: d.representatives() for d in space.dims}
    if math.prod(len(v) for v in reps.values()) <= MAX_PRODUCT:  # every combination
        for combo in itertools.product(*reps.values()):
            attempt(dict(zip(reps, combo, strict=True)))
    else:  # each key over its values, the others at their first value
        first = {k: v[0] for k, v in reps.items()}
        for key, values in reps.items():
            for value in values:
                attempt({**first, key: value})
    if problems:
        lines = [f"{what}:\n    {msg}" for msg, what in list(problems.items())[:10]]
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConfigError(
            f"search space {space.name!r} can produce invalid configurations (nothing was started):\n  "
            + "\n  ".join(lines)
            + more
        )
