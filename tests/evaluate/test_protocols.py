"""SVM and few-shot: ≈100% on separable features, ≈chance on shuffled labels; episodes keep support and
query apart."""

from __future__ import annotations

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
