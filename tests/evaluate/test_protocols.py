"""SVM and few-shot: ≈100% on separable features, ≈chance on shuffled labels; episodes keep support and
query apart."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from crossmoco_ray.evaluate.fewshot import episodes, fewshot, fewshot_table
from crossmoco_ray.evaluate.svm import clean_svm, crosspoint_svm


def blobs(per_class: int, classes: int = 6, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian classes; the class centres are fixed, ``seed`` draws the samples."""
    centres = np.random.default_rng(1234).normal(size=(classes, dim)) * 6
    y = np.repeat(np.arange(classes), per_class)
    noise = np.random.default_rng(seed).normal(size=(len(y), dim))
    return (centres[y] + noise).astype(np.float32), y


@pytest.mark.parametrize("protocol", ["crosspoint", "clean"])
def test_svm_separable_and_shuffled(protocol: str) -> None:
    x_tr, y_tr = blobs(40, seed=0)
    x_te, y_te = blobs(20, seed=1)
    run = crosspoint_svm if protocol == "crosspoint" else clean_svm
    good = run(x_tr, y_tr, x_te, y_te)
    assert good.overall_acc > 0.98
    assert good.mean_class_acc > 0.98
    assert good.n_train == 240
    shuffled = run(x_tr, np.random.default_rng(3).permutation(y_tr), x_te, y_te)
    assert shuffled.overall_acc < 1 / 6 + 0.15  # chance is 1/6


def test_clean_svm_picks_c_by_cross_validation_on_train() -> None:
    x, y = blobs(30)
    res = clean_svm(x, y, x[:10], y[:10], Cs=(0.01, 1.0))
    assert set(res.cv) == {"0.01", "1"}
    assert res.C in (0.01, 1.0)
    assert res.cv[f"{res.C:g}"] == max(res.cv.values())


def test_episodes_never_share_a_sample_between_support_and_query() -> None:
    y = np.repeat(np.arange(8), 35)
    rng = np.random.default_rng(0)
    for support, query, classes in episodes(y, None, way=5, shot=10, queries=20, count=30, rng=rng):
        assert len(support) == 50
        assert len(query) == 100
        assert not set(support.tolist()) & set(query.tolist())
        assert len(set(classes.tolist())) == 5
        assert set(y[support].tolist()) == set(classes.tolist()) == set(y[query].tolist())


def test_fewshot_separable_and_shuffled() -> None:
    x, y = blobs(60, classes=12)
    x_te, y_te = blobs(25, classes=12, seed=5)
    for r in fewshot_table(x, y, None, None, count=5):
        assert r.mean > 99
        assert r.protocol == "crosspoint"
    clean = fewshot(x, y, x_te, y_te, way=5, shot=10, count=5)
    assert clean.protocol == "clean"
    assert clean.mean > 99
    noise = fewshot(x, np.random.default_rng(1).permutation(y), None, None, way=5, shot=10, count=20)
    assert 20 - 12 < noise.mean < 20 + 12  # chance is 20% for 5-way
    assert len(noise.accuracies) == 20
    assert noise.std == pytest.approx(np.std(noise.accuracies))


def test_fewshot_needs_enough_samples() -> None:
    x, y = blobs(5, classes=3)
    with pytest.raises(ValueError, match="enough samples"):
        fewshot(x, y, None, None, way=5, shot=10)


# ---- evaluation straight from a source validates every cloud and label as prepare does (issue 27) ----


def h5_source(tmp_path: Path, bad: str) -> Path:
    """A ModelNet-style h5 pair whose train row 3 is bad in one way."""
    from tests.data import fixtures

    root = fixtures.modelnet_h5(tmp_path / "mn", n_train=8, n_test=4, points=64, classes=3)
    with h5py.File(root / "train.h5", "r+") as f:
        if bad == "nan":
            f["data"][3, 10] = np.nan
        elif bad == "far":
            f["data"][3] = f["data"][3] * np.float32(1e30)
        elif bad == "label":
            f["label"][3] = 99
        elif bad == "first-points":  # whole cloud sound, its first 16 points all equal
            row = f["data"][3]
            row[:16] = row[0]
            f["data"][3] = row
    return root


@pytest.mark.parametrize(
    ("bad", "num_points", "message"),
    [
        ("nan", None, "NaN or Inf at point 10"),
        (
            "nan",
            8,
            "NaN or Inf at point 10",
        ),  # beyond the cut, yet prepare would refuse the cloud: so does eval
        ("far", None, r"coordinates reach .*e\+30, beyond ±1e\+18"),
        ("label", None, r"label 99 outside 0\.\.2"),
        ("first-points", 16, "degenerate cloud: all points are equal in its first 16 points"),
    ],
)
def test_load_split_from_a_source_validates_like_prepare(
    tmp_path: Path, bad: str, num_points: int | None, message: str
) -> None:
    from crossmoco_ray.errors import DataError
    from crossmoco_ray.evaluate.features import load_split

    root = h5_source(tmp_path, bad)
    with pytest.raises(DataError, match=rf"train\.h5 \[index 3\]: {message}"):
        load_split(str(root), "train", num_points=num_points)
    assert load_split(str(root), "test", num_points=num_points).points.shape[0] == 4  # the sound split loads
