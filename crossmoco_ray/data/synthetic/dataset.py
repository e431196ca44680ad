"""The built-in synthetic dataset: procedural objects, so pretraining runs with nothing downloaded.

Each sample is one random member of one of :data:`SHAPE_CLASSES`, everyday objects made of parts (triangle
meshes built by :mod:`.objects`: tables, chairs, stools, benches, beds, lamps, bottles, mugs, airplanes,
cars, ...), centred and scaled to a maximum radius of 1, mildly deformed (anisotropic scale, taper, twist
and bend about the up axis), its points sampled on the mesh and seen as a scanner would see them: often
partial (a random side cut away, as a single scan misses the far side), slightly tilted, noisy, with a few
outliers; finally rotated by a random angle about the up axis and expressed with the requested up axis. The
sample carries its whole mesh in the same frame, so its views are shaded renders of the object while its
points are the scan. Classes differ by the arrangement of their parts, members vary a lot within a class,
and the nuisances are large, so features that merely describe the raw geometry do not separate the classes
well: the set tests what a representation has learned (an untrained encoder's standardised features do much
worse here than on primitives).

Sample ``i`` of ``(seed, split)`` is drawn from its own generator, so any sample can be rebuilt alone and a
set of ``count`` samples is a prefix of any larger one.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Literal

import numpy as np

from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.data.synthetic.objects import OBJECT_MESHES
from crossmoco_ray.data.synthetic.shapes import Mesh, sample_mesh

UpAxis = Literal["x", "y", "z"]

SHAPE_CLASSES: tuple[str, ...] = tuple(OBJECT_MESHES)
"""The class names; a sample's label is its class's position here."""

# Canonical (y-up) coordinates → coordinates with the given up axis, as proper rotations (det = +1) so
# that shapes are never mirrored: for "z", (x, y, z) → (x, -z, y) (a +90° turn about x); for "x",
# (x, y, z) → (y, -x, z) (a -90° turn about z).
_UP_ROTATIONS: dict[str, np.ndarray] = {
    "y": np.eye(3),
    "z": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),
    "x": np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
}

# Within-class deformation ranges (all mild, so a deformed box is still a box).
GENERATOR_VERSION = 3  # bump when the samples change (shards prepared by an older generator are not reused)
_ANISO = (0.85, 1.15)  # per-axis scale
_TAPER = 0.25  # relative change of the horizontal scale per unit height
_TWIST = 0.6  # radians of twist about the up axis per unit height
_BEND = 0.15  # horizontal offset at unit height from the centre
_NOISE = (0.005, 0.02)  # Gaussian noise σ, in units of the (unit) object radius
_PARTIAL = 0.6  # probability that a sample is a partial scan
_KEEP = (0.55, 0.9)  # the share of the object a partial scan keeps
_TILT = np.deg2rad(12.0)  # the largest tilt away from upright
_OUTLIERS = 0.02  # the largest share of points replaced by outliers in the bounding box


def class_names() -> list[str]:
    """The class names in label order (``class_names()[label]``)."""
    return list(SHAPE_CLASSES)


def rotate_about_up(points: np.ndarray, angle: float) -> np.ndarray:
    """Rotate canonical (y-up) ``points [N, 3]`` by ``angle`` radians about the y axis: ``[N, 3]``."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=points.dtype)
    return points @ rot.T


def to_up_axis(points: np.ndarray, up_axis: UpAxis) -> np.ndarray:
    """Express canonical y-up ``points [N, 3]`` with +``up_axis`` as up: ``[N, 3]``, same dtype."""
    if up_axis not in _UP_ROTATIONS:
        raise ValueError(f"up_axis must be one of 'x', 'y', 'z', got {up_axis!r}")
    return points @ _UP_ROTATIONS[up_axis].T.astype(points.dtype)


def _deform(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild random anisotropic scale, taper, twist and bend of unit-size y-up ``points [N, 3]``: ``[N, 3]``.

    All act about the up axis, so an upright shape stays upright and its class-defining outline survives.
    """
    p = points * rng.uniform(*_ANISO, 3)
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    taper = 1.0 + rng.uniform(-_TAPER, _TAPER) * y
    x, z = x * taper, z * taper
    twist = rng.uniform(-_TWIST, _TWIST) * y
    c, s = np.cos(twist), np.sin(twist)
    x, z = c * x - s * z, s * x + c * z
    # A parabolic bow (both ends pushed the same way, the middle in place) in a random horizontal direction.
    b = rng.uniform(0.0, _BEND)
    phi = rng.uniform(0.0, 2.0 * np.pi)
    offset = b * y**2
    return np.stack([x + offset * np.cos(phi), y, z + offset * np.sin(phi)], axis=1)


def _normalise(points: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Centre ``points [N, 3]`` on their bounding-box centre and scale them to a maximum radius of 1;
    ``others`` (e.g. the mesh's vertices) move and scale with them.

    The bounding-box centre (not the mean) puts e.g. a cone's base and apex at the same distance from
    the origin, so the position of the centroid stays a shape cue rather than being removed.
    """
    centre = (points.min(axis=0) + points.max(axis=0)) / 2.0
    radius = max(float(np.linalg.norm(points - centre, axis=1).max()), 1e-12)
    return tuple((p - centre) / radius for p in (points, *others))


def _partial(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What one scan sees: the points on the near side of a random plane (``_KEEP`` of the object)."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    depth = points @ direction
    return points[depth <= np.quantile(depth, rng.uniform(*_KEEP))]


def _unit_ball(k: int, rng: np.random.Generator) -> np.ndarray:
    """``[k, 3]`` points uniform in the unit ball (outliers of a scan)."""
    v = rng.normal(size=(k, 3))
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v * rng.random((k, 1)) ** (1 / 3)


def _tilt(rng: np.random.Generator) -> np.ndarray:
    """``[3, 3]``: a rotation by up to ``_TILT`` about a random horizontal axis (objects are rarely
    perfectly upright)."""
    a = rng.uniform(0.0, 2.0 * np.pi)
    axis = np.array([np.cos(a), 0.0, np.sin(a)])
    angle = rng.uniform(-_TILT, _TILT)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)  # Rodrigues


def sample_object(name: str, num_points: int, rng: np.random.Generator) -> tuple[np.ndarray, Mesh]:
    """A random member of class ``name``: its mesh, and points as a scanner sees it; canonical frame (y up).

    The class's mesh (random proportions) is centred and scaled to a maximum radius of 1 and mildly
    deformed (its vertices; parts are tessellated finely enough to bend), points are drawn on it uniformly
    by area, then (with probability ``_PARTIAL``) a partial scan keeps one side and is re-normalised; a
    small random tilt turns points and mesh alike; Gaussian noise (σ 0.005–0.02) and up to 2% outliers
    touch the points only. The mesh stays whole: renders show the object, the points what one scan saw
    (as a CAD model's renders beside a real scan of it).

    Args:
        name: one of :data:`SHAPE_CLASSES`.
        num_points: number of points ``N`` (at least 1).
        rng: the source of all randomness.

    Returns:
        ``([N, 3] float32 points, (vertices [V, 3] float64, faces [F, 3] int64))``, in one frame.
    """
    builder = OBJECT_MESHES.get(name)
    if builder is None:
        raise ValueError(f"unknown shape class {name!r}; the classes are: {', '.join(SHAPE_CLASSES)}")
    if num_points < 1:
        raise ValueError(f"num_points must be at least 1, got {num_points}")
    vertices, faces = builder(rng)
    (vertices,) = _normalise(vertices)
    vertices = _deform(vertices, rng)
    partial = rng.random() < _PARTIAL
    drawn = int(np.ceil(num_points / _KEEP[0])) + 1 if partial else num_points
    points = sample_mesh(vertices, faces, drawn, rng)
    if partial:
        points = _partial(points, rng)
        points, vertices = _normalise(points[rng.permutation(len(points))[:num_points]], vertices)
    tilt = _tilt(rng)
    points, vertices = points @ tilt.T, vertices @ tilt.T
    points += rng.normal(scale=rng.uniform(*_NOISE), size=points.shape)
    outliers = rng.random(num_points) < rng.uniform(0.0, _OUTLIERS)
    points[outliers] = _unit_ball(int(outliers.sum()), rng)
    return points.astype(np.float32), (vertices, faces)


def _split_code(split: str) -> int:
    """A stable integer for a split name (CRC-32: unlike ``hash``, identical in every process)."""
    return zlib.crc32(split.encode("utf-8"))


def synthetic_samples(
    count: int, num_points: int, seed: int = 0, split: str = "train", up_axis: UpAxis = "y"
) -> Iterator[Sample]:
    """Stream ``count`` labelled synthetic samples.

    Sample ``i`` depends only on ``(seed, split, i)``: its shape comes from
    ``np.random.default_rng([seed, split_code, i])`` and its label from a seeded permutation of the
    classes for its block of ``len(SHAPE_CLASSES)`` samples, so every block holds each class once (labels
    balanced over any multiple of the class count) without a fixed class order.

    Args:
        count: number of samples.
        num_points: points per sample ``N``.
        seed: dataset seed (non-negative).
        split: split name; different splits draw different samples.
        up_axis: the axis that is up in the yielded points (the shapes are built y-up).

    Yields:
        :class:`Sample` with ``points [N, 3]`` float32, its ``mesh`` in the same frame (views are rendered
        from it), ``label`` the class index, ``views=None``,
        ``id=f"synthetic-{split}-{i:07d}"``, ``source="synthetic"``, ``index=i`` and ``split``.
    """
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if num_points < 1:
        raise ValueError(f"num_points must be at least 1, got {num_points}")
    if up_axis not in _UP_ROTATIONS:
        raise ValueError(f"up_axis must be one of 'x', 'y', 'z', got {up_axis!r}")
    # Validate here, eagerly; a generator body would only raise at the first ``next``.
    return _stream(count, num_points, seed, split, up_axis)


def _stream(
    count: int, num_points: int, seed: int, split: str, up_axis: UpAxis, first: int = 0
) -> Iterator[Sample]:
    """The generator behind :func:`synthetic_samples` (arguments already checked): samples
    ``first..count-1``, each rebuilt from ``(seed, split, i)`` alone."""
    code = _split_code(split)
    n_classes = len(SHAPE_CLASSES)
    order, order_block = np.arange(n_classes), -1
    for i in range(first, count):
        block, slot = divmod(i, n_classes)
        if block != order_block:
            # The trailing tag keeps the label generators' seeds apart from the samples' ([seed, code, i]).
            order = np.random.default_rng([seed, code, block, 0x1ABE1]).permutation(n_classes)
            order_block = block
        label = int(order[slot])
        rng = np.random.default_rng([seed, code, i])
        points, (vertices, faces) = sample_object(SHAPE_CLASSES[label], num_points, rng)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        points = to_up_axis(rotate_about_up(points, angle), up_axis)
        vertices = to_up_axis(rotate_about_up(vertices, angle), up_axis)
        yield Sample(
            id=f"synthetic-{split}-{i:07d}",
            points=np.ascontiguousarray(points, dtype=np.float32),
            views=None,
            label=label,
            source="synthetic",
            index=i,
            split=split,
            mesh=(vertices, faces),
        )


def synthetic_range(
    first: int, end: int, num_points: int, seed: int = 0, split: str = "train", up_axis: UpAxis = "y"
) -> Iterator[Sample]:
    """Samples ``first..end-1`` of :func:`synthetic_samples` (identical to those it yields)."""
    if not 0 <= first <= end:
        raise ValueError(f"need 0 <= first <= end, got {first}, {end}")
    return _stream(end, num_points, seed, split, up_axis, first)
