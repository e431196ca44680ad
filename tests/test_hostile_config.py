"""Configuration files, overrides and the configs stored in checkpoints may be damaged or hostile: each is
refused quickly with a named error, and no error message prints more than a bounded view of a value.

The bombs are tiny: YAML aliases or pickle memo references that share one list between ten slots, nine
levels deep ("billion laughs"), expand to 10**9 items wherever something walks them whole (validation, a
repr in an error message, a hash), so any walk that is not bounded hangs; a deep one (two slots, 60 levels)
expands to 2**60.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from crossmoco_ray.bounded import REPR_CHARS, shape_problem, short_repr
from crossmoco_ray.cli.main import main
from crossmoco_ray.config.loading import load_config
from crossmoco_ray.config.schema import Config
from crossmoco_ray.config.validation import validate_stored
from crossmoco_ray.config.yaml_files import MAX_CONFIG_BYTES
from crossmoco_ray.errors import ConfigError

FAST_S = 2.0  # a bomb is refused well within this


@contextmanager
def fast() -> Iterator[None]:
    start = time.perf_counter()
    yield
    assert time.perf_counter() - start < FAST_S


def shared_bomb(levels: int = 9, width: int = 10) -> list[Any]:
    """A list that expands to width**levels floats: every level holds the one below ``width`` times."""
    node: list[Any] = [1.0]
    for _ in range(levels):
        node = [node] * width
    return node


def yaml_bomb(levels: int = 9, width: int = 10) -> str:
    """The YAML form of :func:`shared_bomb`: one anchor per level, aliases of the level below."""
    text = "&a0 [1.0]"
    for i in range(1, levels + 1):
        text = f"&a{i} [{text}" + f", *a{i - 1}" * (width - 1) + "]"
    return text


def cyclic() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


class Hostile:
    """An object whose repr never ends (error messages must not call it)."""

    def __repr__(self) -> str:
        raise AssertionError("repr of a hostile object was called")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "value",
    [
        shared_bomb(),
        shared_bomb(60, 2),
        cyclic(),
        "x" * 10_000_000,
        b"\0" * 10_000_000,
        10**5000,  # its decimal string is refused by Python itself beyond 4300 digits
        {"k" * 1_000_000: shared_bomb()},
        [Hostile()] * 3,
        list(range(1_000_000)),
        {1, 2, 3},
        (float("nan"), float("inf")),
    ],
    ids=["shared", "deep", "cyclic", "str", "bytes", "int", "dict", "object", "long-list", "set", "floats"],
)
def test_short_repr_is_short_and_fast_for_any_value(value: Any) -> None:
    with fast():
        text = short_repr(value)
    assert len(text) <= REPR_CHARS + 1
    assert text


def test_short_repr_of_small_values_is_their_repr() -> None:
    for value in (0.001, "resnet50", None, True, [1.0, 2.5], {"CPU": 64}, ("a", 1)):
        assert short_repr(value) == repr(value)
    assert short_repr("x" * 500).startswith("'xxxx")
    assert short_repr("x" * 500).endswith("…")


@pytest.mark.timeout(10)
def test_shape_problem_counts_shared_references_every_time_they_are_reached() -> None:
    with fast():
        assert "more than 1000 values" in str(shape_problem(shared_bomb(), max_values=1000))
        assert "nested deeper than 8" in str(shape_problem(cyclic(), max_depth=8))
        assert "nested deeper than 20" in str(shape_problem(shared_bomb(60, 2)))
        assert "text" in str(shape_problem({"a": "x" * 5000}, max_text=1000))
        assert shape_problem(list(range(10**7)), max_values=1000) is not None
    assert shape_problem(Config().model_dump(mode="json")) is None


# --------------------------------------------------------------------------------------------------
# --config files and overrides
# --------------------------------------------------------------------------------------------------


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with fast():
        code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.timeout(10)
def test_a_yaml_alias_bomb_in_a_config_file_is_refused_fast(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(f"data:\n  render:\n    azimuths: {yaml_bomb()}\n")
    assert path.stat().st_size < 1500
    code, err = run(["config", "show", "--config", str(path)], capsys)
    assert code == 2
    assert "bomb.yaml" in err
    assert "more than" in err
    assert "values" in err
    assert "aliases" in err
    assert len(err) < 1000


@pytest.mark.timeout(10)
def test_a_yaml_alias_bomb_in_an_override_is_refused_fast(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(["config", "show", f"data.render.azimuths={yaml_bomb()}"], capsys)
    assert code == 2
    assert "override" in err
    assert "more than" in err
    assert len(err) < 1000


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("train:\n  worker_resources: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested deeper than"),
        ("train:\n  worker_resources: &a [*a]\n", "nested deeper than"),
        ("optim:\n  lr: 1" + "0" * 5000 + "\n", "not a valid number"),
        ("a: [unclosed\n" + "x" * 100_000, "is not valid YAML"),
    ],
    ids=["deep", "self-alias", "huge-int", "broken"],
)
def test_damaged_config_files_are_named_errors(
    text: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, err = run(["config", "show", "--config", str(path)], capsys)
    assert code == 2, err
    assert "bad.yaml" in err
    assert problem in err
    assert "Traceback" not in err
    assert len(err) < 1500


@pytest.mark.timeout(10)
def test_config_files_larger_than_the_limit_are_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("train:\n  epochs: 3\n" + "#" * MAX_CONFIG_BYTES)
    with fast(), pytest.raises(ConfigError, match=r"big\.yaml is larger than 1 MiB"):
        load_config(config_file=path)


def test_config_files_that_are_not_text_or_not_files_are_named(tmp_path: Path) -> None:
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x81\xfe\xff" * 10)
    with pytest.raises(ConfigError, match=r"weights\.yaml is not UTF-8 text"):
        load_config(config_file=binary)
    with pytest.raises(ConfigError, match=r"is a directory, not a config file"):
        load_config(config_file=tmp_path)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "override",
    [
        "tracking.experiment=[" + "1, " * 50_000 + "]",
        "k" * 100_000 + "=1",
        "train.epochs=" + "9" * 100_000,
        "model.image_encoder=" + "x" * 100_000,
    ],
    ids=["list", "key", "int", "str"],
)
def test_error_messages_show_a_bounded_view_of_the_bad_value(override: str) -> None:
    with fast(), pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert len(str(err.value)) < 1000


# --------------------------------------------------------------------------------------------------
# Configs stored in checkpoints: eval, export, finetune
# --------------------------------------------------------------------------------------------------


def stored(config: Any, path: Path) -> Path:
    """A checkpoint without weights whose stored config is ``config``."""
    from crossmoco_ray.checkpoints.state import FORMAT, VERSION

    torch.save({"format": FORMAT, "version": VERSION, "config": config, "model": {}}, path)
    return path


def bomb_config() -> dict[str, Any]:
    config = Config().model_dump(mode="json")
    config["data"]["render"]["azimuths"] = shared_bomb()
    return config


@pytest.mark.timeout(10)
def test_a_stored_config_bomb_is_refused_by_validate_stored() -> None:
    with fast(), pytest.raises(ConfigError, match=r"more than .* values"):
        validate_stored(bomb_config(), "ckpt/state.pt")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("command", ["export", "eval", "finetune"])
def test_a_checkpoint_whose_stored_config_is_a_bomb_fails_fast(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = stored(bomb_config(), tmp_path / "bomb.pt")
    assert path.stat().st_size < 8000
    argv = {
        "export": ["export", str(path), "--out", str(tmp_path / "out")],
        "eval": ["eval", "svm", "--data", str(tmp_path / "no-data"), "--checkpoint", str(path)],
        "finetune": ["finetune", "cls", "--data", str(tmp_path / "no-data"), "--checkpoint", str(path),
                     "--storage", str(tmp_path / "runs"), "--no-tracking"],
    }[command]  # fmt: skip
    code, err = run(argv, capsys)
    assert code == 2
    assert "bomb.pt" in err
    assert "more than" in err
    assert len(err) < 1000


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        (["not", "a", "mapping"], "not a mapping"),
        ({"train": {"epochs": "x" * 100_000}}, "train.epochs"),
        ({"model": {"k": float("inf")}}, "model.k"),
    ],
    ids=["list", "long-str", "inf"],
)
def test_a_damaged_stored_config_is_a_named_error(
    config: Any, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = stored(config, tmp_path / "bad.pt")
    code, err = run(["export", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "bad.pt" in err
    assert problem in err
    assert len(err) < 1000


@pytest.mark.timeout(10)
def test_a_huge_global_batch_that_does_not_split_is_named_fast() -> None:
    """The message lists the worker counts that split the batch: a bounded search, not one per sample."""
    with fast(), pytest.raises(ConfigError, match=r"does not split evenly over train\.num_workers=2"):
        load_config(overrides=["train.batch_size=1000000000001", "train.num_workers=2"])


def _flatten_keeping_every_copy(self: Any, node: Any) -> None:
    """Merge keys as PyYAML releases that keep every merged pair flatten them (repeated keys included)."""
    from yaml.nodes import SequenceNode

    merged: list[Any] = []
    own: list[Any] = []
    for key, value in node.value:
        if key.tag != "tag:yaml.org,2002:merge":
            own.append((key, value))
            continue
        for sub in value.value if isinstance(value, SequenceNode) else [value]:
            self.flatten_mapping(sub)
            merged.extend(sub.value)
    node.value = merged + own


@pytest.mark.timeout(10)
def test_a_merge_key_bomb_is_refused_fast_whatever_pyyaml_keeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml.constructor

    monkeypatch.setattr(yaml.constructor.SafeConstructor, "flatten_mapping", _flatten_keeping_every_copy)
    lines = ["x0: &a0 {k: 1}"]
    for i in range(1, 11):  # each level merges the one below ten times: 10**10 pairs
        lines.append(f"x{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 10)}], k{i}: 1}}")
    path = tmp_path / "merge.yaml"
    path.write_text("\n".join(lines) + "\n")
    with fast(), pytest.raises(ConfigError, match=r"merge\.yaml holds more than 10000 values \(merge keys"):
        load_config(config_file=path)
