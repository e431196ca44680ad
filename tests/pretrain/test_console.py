"""What a run shows while it trains: window and epoch means summed on the device, read back once each."""

from __future__ import annotations

import math

import pytest
import torch

from crossmoco_ray.pretrain.console import EpochMeter, distinct_count, monitor_line


def step_out(loss: float, top1: float) -> dict[str, torch.Tensor]:
    return {"loss": torch.tensor(loss), "point_top1": torch.tensor(top1), "feature": torch.zeros(3)}


def test_window_and_epoch_means_of_the_steps_scalars() -> None:
    meter = EpochMeter(global_batch=8)
    labels = [torch.tensor([0, 1, 1, 3]), torch.tensor([2, 2, 2, 2]), torch.tensor([5, 0, 7, 9])]
    for i, lab in enumerate(labels):
        meter.add(step_out(float(i), 0.5 * i), wait=0.1, labels=lab)
        if i == 1:
            window = meter.take_window()
            assert window["loss"] == pytest.approx(0.5)
            assert window["batch_classes"] == pytest.approx((3 + 1) / 2)
            assert "feature" not in window  # only scalars are averaged
    last = meter.take_window()
    assert last["loss"] == pytest.approx(2.0)
    assert last["point_top1"] == pytest.approx(1.0)
    epoch = meter.epoch_summary()
    assert epoch["loss"] == pytest.approx(1.0)
    assert epoch["batch_classes"] == pytest.approx((3 + 1 + 4) / 3)
    assert epoch["samples_per_s"] > 0
    assert epoch["data_wait"] > 0


def test_an_epoch_summary_counts_the_steps_not_yet_in_a_window() -> None:
    meter = EpochMeter(global_batch=8)
    meter.add(step_out(1.0, 0.0), 0.0)
    meter.take_window()
    meter.add(step_out(3.0, 0.0), 0.0)
    summary = meter.epoch_summary()
    assert summary["loss"] == pytest.approx(2.0)
    assert math.isnan(summary["batch_classes"])  # no labels


def test_a_nonfinite_loss_is_seen_before_the_next_window() -> None:
    meter = EpochMeter(global_batch=8)
    assert meter.loss_finite()
    meter.add(step_out(1.0, 0.0), 0.0)
    assert meter.loss_finite()
    meter.add(step_out(math.inf, 0.0), 0.0)
    meter.add(step_out(1.0, 0.0), 0.0)
    assert not meter.loss_finite()
    assert not math.isfinite(meter.take_window()["loss"])


def test_the_steps_outputs_may_not_change_within_an_epoch() -> None:
    meter = EpochMeter(global_batch=8)
    meter.add(step_out(1.0, 0.0), 0.0)
    with pytest.raises(ValueError, match="changed within an epoch"):
        meter.add({"loss": torch.tensor(1.0)}, 0.0)


def test_distinct_count_without_reading_the_labels_back() -> None:
    assert int(distinct_count(torch.tensor([4, 4, 9, -1, 9]))) == 3
    assert int(distinct_count(torch.tensor([[1, 2], [2, 1]]))) == 2
    assert int(distinct_count(torch.tensor([7]))) == 1


def test_the_monitor_line_reads_each_gain_with_its_standard_error() -> None:
    base = {"random_val_svm_clean": 0.85, "random_val_knn": 0.50, "random_val_svm_crosspoint": 0.10}
    s = {
        "val_svm_clean": 0.88, "gain_val_svm_clean": 0.03, "gain_val_svm_clean_se": 0.012,
        "val_knn": 0.49, "gain_val_knn": -0.01, "gain_val_knn_se": 0.016,
        "val_svm_crosspoint": 0.60, "gain_val_svm_crosspoint": 0.50, "gain_val_svm_crosspoint_se": math.nan,
        "val_feature_rank": 90.0,
    }  # fmt: skip
    line = monitor_line(s, {**base, "random_val_feature_rank": 110.0})
    assert "clean SVM 88.0% (random init 85.0%, +3.0 ± 1.2, above)" in line
    assert "kNN 49.0% (random init 50.0%, -1.0 ± 1.6, within noise)" in line
    assert "CrossPoint SVM 60.0% (random init 10.0%, +50.0 ± ?, SE unknown)" in line  # a restored baseline
    below = monitor_line({"val_knn": 0.40, "gain_val_knn": -0.10, "gain_val_knn_se": 0.02}, base)
    assert "(random init 50.0%, -10.0 ± 2.0, below)" in below
