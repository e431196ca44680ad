"""``crossmoco eval report``: every protocol for an encoder and its random-init twin in one table + JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from crossmoco_ray.cli.main import main
from crossmoco_ray.nn import DGCNN
from tests.finetune.data import class_sorted_shapes_h5


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("report")
    data = class_sorted_shapes_h5(tmp / "h5", n_train=120, n_test=60, points=64, classes=6)
    torch.manual_seed(3)
    ckpt = tmp / "crosspoint.pth"  # a CrossPoint-layout file, module.-prefixed, as the authors released
    torch.save({f"module.{k}": v for k, v in DGCNN(k=4, emb_dims=32).state_dict().items()}, ckpt)
    out = tmp / "out"
    argv = ["eval", "report", "--data", str(data), "--checkpoint", str(ckpt), "--k", "4",
            "--num-points", "64", "--ways", "5", "--shots", "5,10", "--queries", "5", "--episodes", "3",
            "--knn-k", "5,20", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    return out, (out / "report.md").read_text()


def test_the_table_has_both_protocol_families_both_encoders_and_the_gain(reported: tuple[Path, str]) -> None:
    _, md = reported
    assert "The papers' protocols" in md
    assert "The demanding protocols" in md
    for column in ("linear SVM (raw, C=0.01)", "linear SVM (standardised, C by CV)", "kNN k=5", "kNN k=20",
                   "5w5s", "5w10s"):  # fmt: skip
        assert column in md, column
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in rows]
    assert names.count("pretrained") == 2
    assert names.count("random-init") == 2
    assert names.count("gain over random init ± SE") == 2
    assert names.count("verdict (±2 SE)") == 2
    verdicts = {c.strip() for ln in rows if ln.startswith("| verdict") for c in ln.split("|")[2:-1]}
    assert verdicts <= {"above", "below", "within noise", "—"}  # "—": mean class accuracy, no SE
    assert "only when |gain| ≥ 2 SE" in md


def test_the_json_holds_every_number_and_the_gain_row_is_their_difference(reported: tuple[Path, str]) -> None:
    out, md = reported
    report = json.loads((out / "report.json").read_text())
    pre, rnd = report["results"]["pretrained"], report["results"]["random-init"]
    for r in (pre, rnd):
        assert set(r) == {
            "svm_crosspoint",
            "svm_clean",
            "knn_5",
            "knn_20",
            "fewshot_crosspoint",
            "fewshot_clean",
        }
        assert 0.0 <= r["svm_clean"]["overall_acc"] <= 1.0
        assert set(r["fewshot_clean"]) == {"5w5s", "5w10s"}
    demanding = [line for line in md.splitlines() if line.startswith("| gain")][-1]  # the second table's
    first_gain, first_se = (float(x) for x in demanding.split("|")[2].split("±"))
    expected = 100 * (pre["svm_clean"]["overall_acc"] - rnd["svm_clean"]["overall_acc"])
    assert first_gain == pytest.approx(expected, abs=0.006)
    gain = report["gains"]["svm_clean"]["overall_acc"]  # paired on the 60 test objects
    assert gain["n"] == 60
    assert 100 * gain["se"] == pytest.approx(first_se, abs=0.006)
    assert 0 <= gain["se"] <= math.sqrt(1 / 60)  # |d| ≤ 1: its std is at most about 1
    assert "(no SE)" in demanding.split("|")[3]  # mean class accuracy: the gain alone
    fewshot = report["gains"]["fewshot_clean"]["5w5s"]  # paired on the 3 episodes, in %
    assert fewshot["n"] == 3
    assert fewshot["gain"] == pytest.approx(
        pre["fewshot_clean"]["5w5s"]["mean"] - rnd["fewshot_clean"]["5w5s"]["mean"]
    )
    assert report["encoders"]["pretrained"]["source"] == "crosspoint"
    assert report["markdown"] == md.rstrip("\n")
