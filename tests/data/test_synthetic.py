"""The built-in synthetic dataset: objects of parts, scan nuisances, determinism, balance, up axis, and
learnable classes."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from sklearn.svm import SVC

from crossmoco_ray.data.synthetic import objects, shapes
from crossmoco_ray.data.synthetic.dataset import (
    SHAPE_CLASSES,
    class_names,
    rotate_about_up,
    sample_object,
    synthetic_samples,
    to_up_axis,
)

C = len(SHAPE_CLASSES)


def _descriptor(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotation-invariant descriptor of ``points [N, 3]``: D2 and radius histograms + PCA spectrum."""
    sub = points[rng.choice(len(points), 256, replace=False)].astype(np.float64)
    d = np.linalg.norm(sub[:, None] - sub[None], axis=-1)[np.triu_indices(len(sub), 1)]
    hist = np.histogram(d, bins=24, range=(0.0, 2.4))[0] / d.size
    centred = sub - sub.mean(axis=0)
    eig = np.sort(np.linalg.eigvalsh(centred.T @ centred / len(sub)))[::-1]
    radii = np.linalg.norm(centred, axis=1)
    return np.concatenate([hist * 10.0, eig * 5.0, np.histogram(radii, bins=8, range=(0.0, 1.4))[0] / 256])


def _features(split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(123)
    xs, ys = [], []
    for s in synthetic_samples(per_class * C, 1024, seed=0, split=split):
        xs.append(_descriptor(s.points, rng))
        ys.append(s.label)
    return np.stack(xs), np.array(ys)


@pytest.fixture(scope="module")
def train_test() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    start = time.perf_counter()
    x_train, y_train = _features("train", 30)
    x_test, y_test = _features("test", 10)
    return x_train, y_train, x_test, y_test, time.perf_counter() - start


def test_classes() -> None:
    assert len(SHAPE_CLASSES) >= 16
    assert len(set(SHAPE_CLASSES)) == len(SHAPE_CLASSES)
    assert class_names() == list(SHAPE_CLASSES)
    # neighbours that share parts: a class is told apart by the arrangement of its parts
    shared_parts = (
        "table",
        "chair",
        "stool",
        "bench",
        "bed",
        "sofa",
        "lamp",
        "bottle",
        "mug",
        "airplane",
        "car",
    )
    for name in shared_parts:
        assert name in SHAPE_CLASSES


@pytest.mark.parametrize("name", SHAPE_CLASSES)
def test_sample_object_is_unit_sized_float32(name: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        p, _ = sample_object(name, 500, rng)
        assert p.shape == (500, 3)
        assert p.dtype == np.float32
        assert np.isfinite(p).all()
        radius = np.linalg.norm(p, axis=1).max()
        assert 0.75 < radius < 1.3, radius
        lo, hi = np.percentile(p, [3, 97], axis=0)  # robust to the scan's few outliers
        assert np.abs((lo + hi) / 2).max() < 0.35  # roughly centred


def test_sample_object_rejects_unknown_class() -> None:
    with pytest.raises(ValueError, match="table"):
        sample_object("dodecahedron", 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="num_points"):
        sample_object("table", 0, np.random.default_rng(0))


def test_sampling_is_uniform_by_area() -> None:
    """A cylinder's caps get their share of the area, not a fixed share of the points."""
    rng = np.random.default_rng(1)
    h = 2.5
    p = shapes.sample_mesh(*objects.cylinder((0.0, 0.0, 0.0), 1.0, h), 20000, rng)
    on_caps = np.isclose(np.abs(p[:, 1]), h / 2).mean()
    # The tessellated cylinder (24 sides) has 24 sin(pi/12) / pi of the round one's perimeter.
    side = 2 * h * 24 * np.sin(np.pi / 24)
    caps = 2 * 12 * np.sin(2 * np.pi / 24)
    assert on_caps == pytest.approx(caps / (caps + side), abs=0.015)
    # a truncated cone's side: the wide end holds more points (density uniform by area)
    q = shapes.sample_mesh(*objects.frustum((0.0, 0.0, 0.0), 1.0, 0.25, 1.0), 20000, rng)
    assert (q[:, 1] < 0).mean() == pytest.approx((1.0 + 0.625) / (1.0 + 0.625 + 0.625 + 0.25), abs=0.015)
    # A 2 x 1 x 1 box (faces as grids of small squares): faces are sampled in proportion to their areas
    # (±x faces: 2 of 10 units of area), not to their triangle counts.
    v, f = objects.box((0.0, 0.0, 0.0), (1.0, 0.5, 0.5))
    q = shapes.sample_mesh(v, f, 20000, rng)
    assert np.isclose(np.abs(q[:, 0]), 1.0).mean() == pytest.approx(0.2, abs=0.01)


def test_part_meshes_are_closed_where_they_should_be() -> None:
    """A closed box and a capped cylinder: every edge is shared by exactly two triangles (watertight)."""
    for vertices, faces in (
        objects.box((0.1, 0.2, 0.3), (1.0, 0.3, 0.6)),
        objects.cylinder((0, 0, 0), 0.5, 1.0),
    ):
        # Merge coincident vertices (grids of neighbouring box faces repeat their shared edges).
        _, ids = np.unique(np.round(vertices, 9), axis=0, return_inverse=True)
        f = ids.ravel()[faces]
        f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]  # caps' degenerate centres
        edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
        _, uses = np.unique(edges, axis=0, return_counts=True)
        assert (uses == 2).all()


def test_samples_carry_their_mesh_in_the_points_frame() -> None:
    s = next(synthetic_samples(1, 2000, seed=4, up_axis="z"))
    assert s.mesh is not None
    vertices, faces = s.mesh
    # The points (a scan: noisy, maybe partial, a few outliers) lie on the mesh: their median distance to
    # a dense sample of its surface is about the noise; a mesh left in another frame would be far off.
    dense = shapes.sample_mesh(vertices, faces, 20000, np.random.default_rng(0))
    d = np.sqrt(((s.points[:, None, :] - dense[None, ::4, :]) ** 2).sum(-1)).min(axis=1)
    assert np.median(d) < 0.05
    wrong = dense[:, [0, 2, 1]]  # the mesh left y-up
    assert np.median(np.sqrt(((s.points[:, None, :] - wrong[None, ::4, :]) ** 2).sum(-1)).min(axis=1)) > 0.05
    assert faces.max() < len(vertices)


def test_sample_fields() -> None:
    samples = list(synthetic_samples(3, 64, seed=5, split="val"))
    assert [s.id for s in samples] == [f"synthetic-val-{i:07d}" for i in range(3)]
    for i, s in enumerate(samples):
        assert (s.index, s.source, s.split, s.views) == (i, "synthetic", "val", None)
        assert isinstance(s.label, int)
        assert 0 <= s.label < C
        assert s.points.shape == (64, 3)
        assert s.points.dtype == np.float32


def test_streaming_deterministic_and_prefix_stable() -> None:
    small = list(synthetic_samples(10, 128, seed=3))
    big = synthetic_samples(100, 128, seed=3)
    again = list(synthetic_samples(10, 128, seed=3))
    for a, b, c in zip(small, itertools.islice(big, 10), again, strict=True):
        assert a.id == b.id
        assert a.label == b.label == c.label
        np.testing.assert_array_equal(a.points, b.points)
        np.testing.assert_array_equal(a.points, c.points)


def test_seeds_and_splits_differ() -> None:
    base = [s.points for s in synthetic_samples(5, 128, seed=0, split="train")]
    for other in (synthetic_samples(5, 128, seed=1, split="train"), synthetic_samples(5, 128, split="test")):
        for a, s in zip(base, other, strict=True):
            assert not np.allclose(a, s.points)


def test_labels_balanced() -> None:
    labels = [s.label for s in synthetic_samples(4 * C, 16, seed=7)]
    assert np.bincount(np.array(labels), minlength=C).tolist() == [4] * C
    # Not a fixed class cycle: blocks are shuffled.
    assert labels[:C] != labels[C : 2 * C] or labels[:C] != list(range(C))


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="up_axis"):
        synthetic_samples(1, 8, up_axis="w")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        synthetic_samples(1, 8, seed=-1)  # raised at the call, not at the first sample
    with pytest.raises(ValueError, match="count"):
        synthetic_samples(-1, 8)


def test_up_axis_maps_the_tall_axis() -> None:
    """A tall thin cylinder stays tallest along the requested up axis, whatever the rotation about up."""
    tall = sample_object("lamp", 2000, np.random.default_rng(0))[0] * np.array([0.25, 1.0, 0.25], np.float32)
    for axis, k in (("x", 0), ("y", 1), ("z", 2)):
        p = to_up_axis(rotate_about_up(tall, 1.1), axis)  # type: ignore[arg-type]
        extent = p.max(axis=0) - p.min(axis=0)
        assert int(np.argmax(extent)) == k, (axis, extent)
        assert p[:, k].max() == pytest.approx(tall[:, 1].max(), abs=1e-5)  # up is +axis, not -axis
        assert np.linalg.det(np.linalg.lstsq(tall, p, rcond=None)[0]) == pytest.approx(1.0, abs=1e-4)


def test_up_axis_consistent_across_datasets() -> None:
    """up_axis="z" yields exactly the y-up samples turned so that +y becomes +z."""
    ys = list(synthetic_samples(2 * C, 256, seed=2, up_axis="y"))
    zs = list(synthetic_samples(2 * C, 256, seed=2, up_axis="z"))
    for a, b in zip(ys, zs, strict=True):
        np.testing.assert_allclose(b.points[:, 2], a.points[:, 1], atol=1e-6)
    # Statistically, upright elongated classes (bottles, lamps) are tallest along z.
    tall = [b.points for b in zs if SHAPE_CLASSES[b.label or 0] in ("bottle", "lamp")]
    ext = np.stack([p.max(axis=0) - p.min(axis=0) for p in tall])
    assert (ext[:, 2] >= ext[:, :2].max(axis=1)).mean() >= 0.75


def test_not_separable_by_size() -> None:
    """Every class has about the same size: the mean max radius per class lies in a narrow band."""
    radii: dict[int, list[float]] = {}
    for s in synthetic_samples(5 * C, 512, seed=4):
        radii.setdefault(s.label or 0, []).append(float(np.linalg.norm(s.points, axis=1).max()))
    means = np.array([np.mean(radii[c]) for c in range(C)])
    assert means.min() > 0.85, means
    assert means.max() < 1.3, means


def test_classes_learnable_from_shape(train_test: tuple[np.ndarray, ...]) -> None:
    """A linear SVM on a rotation-invariant shape descriptor beats chance (1/C) by far on a held-out split."""
    x_train, y_train, x_test, y_test, seconds = train_test
    mu, sd = x_train.mean(axis=0), x_train.std(axis=0) + 1e-8
    clf = SVC(kernel="linear", C=1.0).fit((x_train - mu) / sd, y_train)
    acc = float((clf.predict((x_test - mu) / sd) == y_test).mean())
    print(f"descriptor SVM test accuracy {acc:.3f} over {C} classes (features {seconds:.1f} s)")
    assert acc > 0.6


def test_class_means_differ(train_test: tuple[np.ndarray, ...]) -> None:
    x_train, y_train = train_test[0], train_test[1]
    means = np.stack([x_train[y_train == c].mean(axis=0) for c in range(C)])
    scale = x_train.std(axis=0).mean()
    for a, b in itertools.combinations(range(C), 2):
        assert np.linalg.norm(means[a] - means[b]) > 0.05 * scale, (SHAPE_CLASSES[a], SHAPE_CLASSES[b])
