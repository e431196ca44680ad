"""The crossmoco CLI: config show / presets, errors on stderr with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crossmoco_ray.cli.main import UsageError, main, parse_command
from crossmoco_ray.errors import ConfigError, DataError


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
    err = capsys.readouterr().err
    assert "crossmoco eval svm: error: argument --k: must be a positive integer, got 'many'" in err
    with pytest.raises(UsageError, match="invalid choice: 'both-ways'"):
        parse_command(["eval", "svm", "--data", "x", "--protocol", "both-ways"])


def test_fewshot_k_defaults_to_crosspoints_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from crossmoco_ray.cli.main import build_parser

    parser = build_parser()
    fewshot = parser.parse_args(["eval", "fewshot", "--data", "x"])
    svm = parser.parse_args(["eval", "svm", "--data", "x"])
    assert (fewshot.k, svm.k) == (5, 15)  # CrossPoint's eval_fewshot.py and its SVM notebook
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "fewshot", "--help"])
    assert "as CrossPoint's eval_fewshot.py" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------------------------------
# Hostile input files and option values: one line naming the problem, never a traceback
# --------------------------------------------------------------------------------------------------


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def damaged_checkpoints(tmp_path: Path) -> dict[str, Path]:
    import torch

    good = tmp_path / "good.pt"
    torch.save({"format": "crossmoco-ray/checkpoint", "version": 2, "config": {}, "model": {}}, good)
    blob = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "nostate").mkdir()
    return {name: tmp_path / f"{name}.pt" for name in ("truncated", "garbage", "empty")} | {
        "nostate": tmp_path / "nostate"
    }


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "nostate"])
def test_export_of_an_unreadable_checkpoint_is_one_line_naming_the_file(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = damaged_checkpoints(tmp_path)[damage]
    assert main(["export", str(path), "--out", str(tmp_path / "out")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("crossmoco export: ")
    assert str(path) in line
    assert "not a readable PyTorch file" in line or "not a checkpoint directory" in line


EVAL = ["eval", "svm", "--data", "x"]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        ([*EVAL, "--batch-size", "-3"], "--batch-size: must be a positive integer, got '-3'"),
        (["eval", "knn", "--data", "x", "--num-points", "0"], "--num-points: must be a positive integer"),
        (["eval", "knn", "--data", "x", "--knn-k", "20,x"], "--knn-k: must be one or more positive integers"),
        (["eval", "fewshot", "--data", "x", "--ways", "0"], "--ways: must be one or more positive"),
        (["eval", "fewshot", "--data", "x", "--episodes", "-1"], "--episodes: must be a positive integer"),
        ([*EVAL, "--c", "nan"], "--c: must be a positive, finite number, got 'nan'"),
        (["eval", "knn", "--data", "x", "--temperature", "0"], "--temperature: must be a positive"),
        ([*EVAL, "--seed", "-1"], "--seed: must be an integer from 0 to 4294967295"),
        ([*EVAL, "--device", "gpu0"], "--device: must be auto, cpu, cuda, cuda:N or mps"),
        ([*EVAL, "--k", "1" * 5000], "--k: must be a positive integer, got '111"),
        (["tune", "--trials", "0"], "--trials: must be a positive integer, got '0'"),
        (["pretrain", "--name", "../elsewhere"], "--name: must be a name for one directory"),
        (["finetune", "cls", "--name", "a/b"], "--name: must be a name for one directory"),
    ],
)
def test_bad_option_values_are_refused_naming_the_option_and_value(argv: list[str], named: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_command(argv)
    assert f"argument {named}" in err.value.message
    assert len(err.value.message) < 300


NO_DATA = ["--data", "{t}/no-data"]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["eval", "svm", *NO_DATA, "--checkpoint", "{t}/nope"], "--checkpoint '{t}/nope': no such file"),
        (["eval", "svm", *NO_DATA, "--out", "{t}/file"], "--out '{t}/file' is a file"),
        (["eval", "svm", *NO_DATA, "--format", "h6"], "--format 'h6': choose one of auto"),
        (["export", "{t}/nope", "--out", "{t}/o"], "CHECKPOINT '{t}/nope': no such file or directory"),
        (["export", "{t}/file", "--out", "{t}/file"], "--out '{t}/file' is a file"),
        (["export", "{t}/file", "--out", "{t}/file/sub"], "--out '{t}/file/sub': {t}/file is a file"),
        (["finetune", "cls", *NO_DATA, "--checkpoint", "{t}/nope"], "--checkpoint '{t}/nope': no such"),
        (["finetune", "cls", *NO_DATA, "--storage", "{t}/file"], "--storage '{t}/file' is a file"),
    ],
)
def test_paths_that_are_not_there_are_named_by_their_option_before_anything_runs(
    argv: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("not a directory")
    assert main([a.replace("{t}", str(tmp_path)) for a in argv]) == 2
    assert named.replace("{t}", str(tmp_path)) in one_line(capsys.readouterr().err)


def test_a_pretraining_storage_that_is_a_file_is_refused_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import crossmoco_ray.pretrain.driver

    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("pretraining started")

    monkeypatch.setattr(crossmoco_ray.pretrain.driver, "pretrain", no_run)
    (tmp_path / "file").write_text("")
    assert main(["pretrain", "--storage", str(tmp_path / "file"), "--no-tracking"]) == 2
    assert f"--storage '{tmp_path / 'file'}' is a file" in one_line(capsys.readouterr().err)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Crash reports go under ``tmp_path`` (the temporary directory tempfile hands out)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def fail_with(monkeypatch: pytest.MonkeyPatch, err: BaseException) -> None:
    """``crossmoco config presets`` raises ``err``."""
    import crossmoco_ray.cli.config

    def broken(name: str) -> str:
        raise err

    monkeypatch.setattr(crossmoco_ray.cli.config, "preset_text", broken)


def test_an_unexpected_exception_is_one_line_and_a_private_traceback_file(
    private_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import stat

    fail_with(monkeypatch, RuntimeError("x" * 100_000 + "\nsecond line"))
    assert main(["config", "presets"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("crossmoco config presets: internal error: RuntimeError: xxx")
    assert "a bug in crossmoco-ray: please report it" in line
    assert len(line) < 600
    saved = Path(line.rsplit("its traceback is in ", 1)[1])
    assert saved.parent == private_tmp / f"crossmoco-{os.getuid()}"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert stat.S_IMODE(saved.parent.stat().st_mode) == 0o700
    text = saved.read_text()
    assert "Traceback (most recent call last)" in text
    assert "second line" in text


def test_a_crash_directory_taken_by_a_link_or_open_to_others_is_not_used(private_tmp: Path) -> None:
    import os

    from crossmoco_ray.cli.crash_report import crash_dir

    target = private_tmp / "elsewhere"
    target.mkdir()
    (private_tmp / f"crossmoco-{os.getuid()}").symlink_to(target)
    folder = crash_dir()
    assert folder.parent == private_tmp
    assert folder != private_tmp / f"crossmoco-{os.getuid()}"
    assert not folder.is_symlink()


@pytest.mark.parametrize(
    ("err", "code", "shown"),
    [
        (KeyboardInterrupt(), 130, "crossmoco config presets: interrupted"),
        (DataError("/data/x.h5", "no 'label' dataset"), 2, "config presets: /data/x.h5: no 'label'"),
        (PermissionError(13, "Permission denied", "/out/report.json"), 1, "/out/report.json: Permission"),
    ],
    ids=["interrupt", "data", "oserror"],
)
def test_interrupts_data_errors_and_os_errors_are_one_line_with_their_exit_code(
    err: BaseException,
    code: int,
    shown: str,
    private_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fail_with(monkeypatch, err)
    assert main(["config", "presets"]) == code
    line = one_line(capsys.readouterr().err)
    assert shown in line
    assert "bug" not in line
