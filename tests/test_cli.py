"""The crossmoco CLI: config show / presets, errors on stderr with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from crossmoco_ray.cli import UsageError, main, parse_command
from crossmoco_ray.config import ConfigError


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


def test_config_show_prints_the_global_and_per_worker_batch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--preset", "paper", "train.num_workers=8", "train.use_gpu=true"]) == 0
    out = capsys.readouterr().out
    first = "# global batch 160 = 8 worker(s) x 20 per worker (set by train.batch_size_per_worker)"
    assert out.startswith(first)
    shown = yaml.safe_load(out)  # the comment keeps the output a valid --config file
    assert shown["train"]["batch_size_per_worker"] == 20
    assert shown["train"]["batch_size"] is None


def test_parse_command_resolves_what_the_command_would_run_with() -> None:
    """No training, no Ray, no data: the bucket is never opened, the configuration is fully checked."""
    cmd = parse_command(["pretrain", "--preset", "paper", "--data", "s3://no-such-bucket/x",
                         "--no-tracking", "train.num_workers=8", "train.use_gpu=true"])  # fmt: skip
    assert cmd.form == "pretrain"
    assert cmd.config is not None
    assert (cmd.config.global_batch, cmd.config.per_worker_batch) == (160, 20)
    assert cmd.config.tracking.enabled is False  # --no-tracking is part of the resolved config
    assert cmd.args.data == "s3://no-such-bucket/x"
    assert parse_command(["eval", "svm", "--data", "nowhere"]).config is None  # takes no configuration


def test_tune_space_is_checked_against_the_config_when_parsed() -> None:
    with pytest.raises(ConfigError, match="search space 'moco' can produce invalid configurations"):
        parse_command(["tune", "--space", "moco", "--preset", "paper"])  # K 512..4096 vs batch 20
    assert parse_command(["tune", "--space", "moco"]).space is not None  # fits the quickstart


def test_usage_errors_print_like_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: crossmoco [-h]")
    assert "crossmoco: error: unrecognized arguments: --bogus" in err
    assert main(["eval", "svm", "--data", "x", "--k", "many"]) == 2  # the subcommand's usage line
    assert "crossmoco eval svm: error: argument --k: invalid int value: 'many'" in capsys.readouterr().err
    with pytest.raises(UsageError, match="invalid choice: 'both-ways'"):
        parse_command(["eval", "svm", "--data", "x", "--protocol", "both-ways"])


def test_fewshot_k_defaults_to_crosspoints_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from crossmoco_ray.cli import build_parser

    parser = build_parser()
    fewshot = parser.parse_args(["eval", "fewshot", "--data", "x"])
    svm = parser.parse_args(["eval", "svm", "--data", "x"])
    assert (fewshot.k, svm.k) == (5, 15)  # CrossPoint's eval_fewshot.py and its SVM notebook
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "fewshot", "--help"])
    assert "as CrossPoint's eval_fewshot.py" in " ".join(capsys.readouterr().out.split())
