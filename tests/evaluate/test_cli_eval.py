"""``crossmoco eval`` and ``crossmoco export`` end to end on small fixtures (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossmoco_ray.cli.main import main
from tests.data import fixtures


@pytest.fixture
def h5(tmp_path: Path) -> Path:
    return fixtures.modelnet_h5(tmp_path / "mn", n_train=30, n_test=15, points=64, classes=3)


def test_eval_svm_random_init_prints_both_protocols(h5: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "svm", "--data", str(h5), "--k", "8", "--emb-dims", "32", "--num-points", "48"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| random-init | crosspoint | 0.01 |" in out
    assert "| random-init | clean |" in out


def test_eval_svm_with_checkpoint_writes_report_and_plots(
    h5: Path, checkpoint: tuple[Path, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = checkpoint
    out_dir = tmp_path / "report"
    code = main(["eval", "svm", "--data", str(h5), "--checkpoint", str(path), "--num-points", "32",
                 "--protocol", "crosspoint", "--out", str(out_dir)])  # fmt: skip
    assert code == 0
    report = json.loads((out_dir / "report.json").read_text())
    assert set(report["results"]) == {"pretrained", "random-init"}  # the baseline comes along
    assert report["encoders"]["pretrained"]["source"] == "checkpoint"
    assert (out_dir / "tsne_pretrained.png").is_file()
    assert (out_dir / "confusion_random-init_crosspoint.png").is_file()


def test_eval_fewshot_all_four_settings(h5: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = fixtures.modelnet_h5(tmp_path / "many", n_train=250, n_test=60, points=32, classes=10)
    code = main(["eval", "fewshot", "--data", str(data), "--k", "4", "--emb-dims", "16", "--queries", "2",
                 "--episodes", "2", "--out", str(tmp_path / "fs")])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    for name in ("5w10s", "5w20s", "10w10s", "10w20s"):
        assert name in out
    report = json.loads((tmp_path / "fs" / "report.json").read_text())
    assert set(report["results"]["random-init"]) == {"crosspoint", "clean"}


def test_export_command(checkpoint: tuple[Path, object], tmp_path: Path) -> None:
    path, _ = checkpoint
    assert main(["export", str(path), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "meta.json").is_file()
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2


def test_eval_reports_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "svm", "--data", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
