"""The crossmoco CLI: config show / presets, errors on stderr with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from crossmoco_ray.cli import main


def test_config_show_resolves_preset_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--preset", "paper", "objective.queue_length=8000"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["objective"]["queue_length"] == 8000
    assert shown["model"]["image_encoder"] == "resnet50"


def test_config_show_default_is_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["image_encoder"] == "resnet18"


def test_config_error_goes_to_stderr_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "objective.queue_lenght=8000"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'objective.queue_length'" in err


def test_presets_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "presets"]) == 0
    out = capsys.readouterr().out
    assert "paper" in out
    assert "quickstart" in out


def test_console_entry_point_and_module_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "crossmoco_ray", "config", "show", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "--preset" in out.stdout
    top = subprocess.run([sys.executable, "-m", "crossmoco_ray", "--help"], capture_output=True, text=True)
    assert "examples:" in top.stdout
