"""Gains read with their noise: the paired standard error against a hand computation, the verdict's rule
(above / below only at two standard errors), and the lines the final evaluation prints."""

from __future__ import annotations

import math

import numpy as np
import pytest

from crossmoco_ray.evaluate.paired import gain_text, paired_gain, short_verdict, verdict
from crossmoco_ray.evaluate.protocols import final_metrics, gain_lines
from crossmoco_ray.evaluate.svm import SvmResult


def test_the_paired_se_is_that_of_the_per_object_differences() -> None:
    # 10 objects: pretrained right on 8, random init on 6; they disagree on 4 (3 for pretrained, 1 against)
    pre = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    rnd = [1, 1, 1, 1, 1, 0, 0, 0, 1, 0]
    g = paired_gain(pre, rnd)
    # d = [0,0,0,0,0,1,1,1,-1,0]: mean 0.2; sum of squares about the mean 4 − 10·0.04 = 3.6, /9 = 0.4
    assert g.n == 10
    assert g.gain == pytest.approx(0.2)
    assert g.se == pytest.approx(math.sqrt(0.4 / 10))  # 0.2 exactly
    assert g.text() == "+20.00 ± 20.00 points; within noise (±2 SE)"  # one SE: not enough to call


def test_the_verdict_needs_two_standard_errors() -> None:
    assert verdict(0.0375, 0.019) == "within noise (±2 SE)"  # 1.97 SE
    assert verdict(0.0375, 0.0187) == "above random init"  # 2.005 SE
    assert verdict(-0.05, 0.02) == "below random init"
    assert verdict(-0.03, 0.02) == "within noise (±2 SE)"
    assert verdict(0.0, 0.0) == "within noise (±2 SE)"  # the same predictions: no gain to call
    assert verdict(0.02, math.nan) == "SE unknown"
    assert short_verdict(0.05, 0.01) == "above"
    assert short_verdict(-0.05, 0.01) == "below"
    assert short_verdict(0.01, 0.01) == "within noise"
    assert gain_text(0.0375, 0.019) == "+3.75 ± 1.90 points; within noise (±2 SE)"
    assert gain_text(-0.0158, 0.02) == "-1.58 ± 2.00 points; within noise (±2 SE)"
    assert gain_text(0.031, 0.012, 1, short=True) == "+3.1 ± 1.2, above"
    assert gain_text(0.031, math.nan, 1, short=True) == "+3.1 ± ?, SE unknown"


def test_pairing_removes_the_objects_both_get_right_or_wrong_from_the_noise() -> None:
    rng = np.random.default_rng(0)
    both = rng.random(1000) < 0.85  # the same 85% right for both encoders ...
    pre, rnd = both.copy(), both.copy()
    pre[:30] = ~pre[:30]  # ... but for 30 objects where only one of them is
    g = paired_gain(pre, rnd)
    d = pre.astype(float) - rnd.astype(float)
    assert g.se == pytest.approx(d.std(ddof=1) / math.sqrt(1000))
    unpaired = math.sqrt(pre.var(ddof=1) / 1000 + rnd.var(ddof=1) / 1000)
    assert g.se < 0.5 * unpaired


def test_a_paired_gain_needs_the_same_objects() -> None:
    with pytest.raises(ValueError, match="same items"):
        paired_gain([1, 0, 1], [1, 0])
    assert math.isnan(paired_gain([1], [0]).se)  # one object: no spread to read
    assert math.isnan(paired_gain([], []).gain)


def _summary(acc: float) -> dict[str, float]:
    return SvmResult("clean", 1.0, acc, acc, 10, 400, 0.1).summary()


def test_the_final_lines_carry_the_gain_its_se_and_the_verdict() -> None:
    report = {
        "results": {
            "pretrained / val": {"clean": _summary(0.8538), "crosspoint": _summary(0.90)},
            "random-init / val": {"clean": _summary(0.8696), "crosspoint": _summary(0.80)},
            "pretrained / test": {"clean": _summary(0.8875)},
            "random-init / test": {"clean": _summary(0.85)},
        },
        "gains": {
            "val": {
                "clean": {"gain": -0.0158, "se": 0.0201, "n": 253},
                "crosspoint": {"gain": 0.10, "se": 0.02, "n": 253},
            },
            "test": {"clean": {"gain": 0.0375, "se": 0.0150, "n": 400}},
        },
    }
    assert gain_lines(report) == [
        "val, clean protocol: pretrained 85.38% vs random init 86.96%, gain -1.58 ± 2.01 points; "
        "within noise (±2 SE)",
        "val, CrossPoint protocol: pretrained 90.00% vs random init 80.00%, gain +10.00 ± 2.00 points; "
        "above random init",
        "test, clean protocol: pretrained 88.75% vs random init 85.00%, gain +3.75 ± 1.50 points; "
        "above random init",
    ]
    metrics = final_metrics(report)
    assert metrics["final_val_svm_clean"] == pytest.approx(0.8538)  # the names logged before, unchanged
    assert metrics["final_random_val_svm_clean"] == pytest.approx(0.8696)
    assert metrics["final_gain_test_svm_clean"] == pytest.approx(0.0375)
    assert metrics["final_gain_test_svm_clean_se"] == pytest.approx(0.0150)
