"""Plots are written and not blank; the monitor reports its numbers against random init and leaves the
encoder as it was; kNN votes as InstDisc; evaluation normalises clouds as training does."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crossmoco_ray.data.prepare.options import PrepareOptions
from crossmoco_ray.data.prepare.prepare import prepare
from crossmoco_ray.data.render.splat import RenderSpec
from crossmoco_ray.data.sources.formats import SyntheticSource
from crossmoco_ray.evaluate.features import extract_features
from crossmoco_ray.evaluate.knn import knn_accuracy, knn_predict
from crossmoco_ray.evaluate.monitor import Monitor, MonitorSpec, effective_rank, unit_std
from crossmoco_ray.evaluate.plots import confusion_plot, curves_plot, tsne_plot
from crossmoco_ray.evaluate.svm import clean_svm, crosspoint_svm
from crossmoco_ray.nn import DGCNN


def not_blank(path: Path) -> bool:
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    return img.shape[0] > 100 and img.std() > 5


def test_plots_are_written_and_not_blank(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    x = rng.normal(size=(120, 16)) + y[:, None] * 3
    assert not_blank(tsne_plot(x, y, ["a", "b", "c", "d"], tmp_path / "tsne.png"))
    assert not_blank(confusion_plot([[5, 1], [0, 6]], ["a", "b"], tmp_path / "cm.png"))
    curve = curves_plot({"loss": [(0, 3.0), (1, 2.0), (2, 1.5)]}, tmp_path / "curves.png")
    assert not_blank(curve)


def test_monitor_reports_every_protocol_and_the_gain_over_random_init(tmp_path: Path) -> None:
    src = SyntheticSource({"train": 52, "test": 13}, num_points=64, seed=1)
    prepare(src, str(tmp_path / "shards"), PrepareOptions(val_fraction=0.3, render=RenderSpec(size=16)))
    monitor = Monitor.from_spec(MonitorSpec(str(tmp_path / "shards"), num_points=48, max_samples=30))
    assert len(monitor.train.labels) == 30  # bounded
    assert monitor.train.points.shape[1] == 48
    assert "train → val" in monitor.source
    torch.manual_seed(0)
    random = DGCNN(k=4, emb_dims=16, head_hidden=16, proj_dim=8)
    base = monitor.set_baseline(random)
    assert set(base) >= {"random_val_svm_clean", "random_val_knn", "random_val_svm_crosspoint"}
    encoder = DGCNN(k=4, emb_dims=16, head_hidden=16, proj_dim=8).train()
    out = monitor(encoder)
    for key in ("val_svm_clean", "val_knn", "val_svm_crosspoint"):
        assert 0.0 <= out[key] <= 1.0
        assert out[f"gain_{key}"] == pytest.approx(out[key] - base[f"random_{key}"])
        # its SE, paired on the same validation objects (the per-object results of random init kept)
        d = np.subtract(
            np.equal(monitor_predictions(monitor, encoder, key), monitor.val.labels),
            monitor.baseline_correct[key],
        )
        assert out[f"gain_{key}"] == pytest.approx(d.mean())
        assert out[f"gain_{key}_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
    assert out["monitor_seconds"] > 0
    assert 1.0 <= out["val_feature_rank"] <= 32
    assert encoder.training  # restored
    again = monitor(random)  # the baseline encoder itself: no gain, and no noise in it
    assert again["gain_val_knn"] == pytest.approx(0.0)
    assert again["gain_val_knn_se"] == pytest.approx(0.0)
    monitor.baseline_correct = {}  # a baseline restored as numbers alone: the SE is not known
    assert math.isnan(monitor(encoder)["gain_val_knn_se"])


def monitor_predictions(monitor: Monitor, encoder: torch.nn.Module, key: str) -> np.ndarray:
    """The monitor's predictions on its validation objects, made again by hand."""
    f_train, f_val = (
        extract_features(encoder, s.points, 32, "cpu", progress=False, normalize=monitor.normalize)
        for s in (monitor.train, monitor.val)
    )
    y = monitor.train.labels
    if key == "val_knn":
        return knn_predict(f_train, y, f_val, k=monitor.knn_k)
    if key == "val_svm_clean":
        return np.asarray(clean_svm(f_train, y, f_val, monitor.val.labels, cv_samples=len(y)).predictions)
    return np.asarray(crosspoint_svm(f_train, y, f_val, monitor.val.labels, C=monitor.C).predictions)


def test_monitor_on_a_source_without_val_carves_one(tmp_path: Path) -> None:
    from tests.data import fixtures

    root = fixtures.modelnet_h5(tmp_path / "mn", n_train=40, n_test=10, classes=4)
    monitor = Monitor.from_spec(MonitorSpec(str(root), num_points=32, max_samples=100, val_fraction=0.25))
    assert len(monitor.val.labels) == 10
    assert len(monitor.train.labels) == 30
    assert "carved" in monitor.source


def test_collapse_is_warned_against_the_random_init_rank() -> None:
    monitor = Monitor.__new__(Monitor)
    monitor.baseline = {"random_val_feature_rank": 40.0}
    assert monitor.collapse_warning({"val_feature_rank": 38.0, "val_feature_std": 0.8}) is None
    warning = monitor.collapse_warning({"val_feature_rank": 3.0, "val_feature_std": 0.8})
    assert warning is not None
    assert "collapsed" in warning


def test_effective_rank_and_unit_std_see_collapse() -> None:
    rng = np.random.default_rng(0)
    spread = rng.normal(size=(200, 16))
    collapsed = np.outer(rng.normal(size=200), rng.normal(size=16)) + 5.0
    assert effective_rank(spread) > 12
    assert effective_rank(collapsed) < 1.5
    assert unit_std(spread) > 0.8
    assert unit_std(np.ones((50, 16)) + 1e-6 * rng.normal(size=(50, 16))) < 0.01


def test_knn_weighted_votes_match_a_brute_force_count() -> None:
    rng = np.random.default_rng(1)
    x_train, y_train = rng.normal(size=(60, 5)), rng.integers(0, 3, 60)
    x_test = rng.normal(size=(20, 5))
    pred = knn_predict(x_train, y_train, x_test, k=7, temperature=0.1)
    a = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    b = x_test / np.linalg.norm(x_test, axis=1, keepdims=True)
    for i, row in enumerate(b @ a.T):
        top = np.argsort(-row)[:7]
        votes = np.zeros(3)
        np.add.at(votes, y_train[top], np.exp(row[top] / 0.1))
        assert pred[i] == votes.argmax()
    assert knn_accuracy(x_train, y_train, x_train, y_train, k=1) == 1.0  # each point is its own neighbour


def test_features_do_not_change_when_the_input_is_scaled_and_shifted() -> None:
    """Evaluation normalises as training does: millimetres or scanner coordinates evaluate the same."""
    torch.manual_seed(0)
    encoder = DGCNN(k=8, emb_dims=32, head_hidden=16, proj_dim=8)
    encoder(torch.randn(8, 64, 3))  # a training step's BatchNorm statistics, so eval mode is not trivial
    clouds = np.random.default_rng(2).normal(size=(6, 64, 3)) * np.array([1.0, 0.5, 0.3])
    raw = (clouds * 1000.0 + np.array([1200.0, -350.0, 4800.0])).astype(np.float32)  # millimetres, offset
    a = extract_features(encoder, clouds.astype(np.float32), progress=False)
    b = extract_features(encoder, raw, progress=False)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    unnormalised = extract_features(encoder, raw, progress=False, normalize=False)
    assert not np.allclose(a, unnormalised, rtol=1e-2)  # without it, raw units change everything
