"""Surface sampling for the synthetic dataset's objects (:mod:`.objects`): disks, tubes, spheres, meshes.

Points are spread uniformly by area: a shape made of several parts (faces, caps, sides) first splits the
point budget between its parts with a multinomial draw weighted by their areas, and each part is sampled
uniformly by area itself. Otherwise the point density, which a network can read trivially, would tell
classes apart (e.g. a cylinder's caps would be denser than its side).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TAU = 2.0 * np.pi

# A part sampler draws ``k`` points on one part of a surface.
PartSampler = Callable[[int], np.ndarray]


def mix_parts(parts: list[tuple[float, PartSampler]], n: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``n`` points between parts by area, sample each, and shuffle: ``[n, 3]``.

    The shuffle keeps the point order from revealing the parts (a loader taking the first k points would
    otherwise get only some faces).
    """
    areas = np.array([a for a, _ in parts], dtype=np.float64)
    counts = rng.multinomial(n, areas / areas.sum())
    pts = np.concatenate([sample(int(k)) for (_, sample), k in zip(parts, counts, strict=True)], axis=0)
    return pts[rng.permutation(n)]


def disk(k: int, rng: np.random.Generator, r_in: float, r_out: float, y: float) -> np.ndarray:
    """``[k, 3]`` points uniform on the annulus ``r_in <= r <= r_out`` in the plane at height ``y``.

    ``r = sqrt(uniform(r_in², r_out²))`` makes the density uniform by area (a full disk is ``r_in = 0``).
    """
    r = np.sqrt(rng.uniform(r_in**2, r_out**2, k))
    t = rng.uniform(0.0, TAU, k)
    return np.stack([r * np.cos(t), np.full(k, y), r * np.sin(t)], axis=1)


def tube(k: int, rng: np.random.Generator, r: float, y0: float, y1: float) -> np.ndarray:
    """``[k, 3]`` points uniform on the side of the cylinder of radius ``r`` between heights y0 and y1."""
    t = rng.uniform(0.0, TAU, k)
    return np.stack([r * np.cos(t), rng.uniform(y0, y1, k), r * np.sin(t)], axis=1)


def unit_sphere(k: int, rng: np.random.Generator) -> np.ndarray:
    """``[k, 3]`` points uniform on the unit sphere (normalised isotropic Gaussians)."""
    v = rng.normal(size=(k, 3))
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def sample_mesh(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, 3]`` points uniform by area on a triangle mesh (``vertices [V, 3]``, ``faces [F, 3]`` int).

    Degenerate (zero-area) triangles are never picked, so fans may include them.
    """
    tri = vertices[faces]  # [F, 3, 3]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    area = 0.5 * np.linalg.norm(np.cross(e1, e2), axis=1)
    f = rng.choice(len(faces), size=n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    # Folding the unit square onto the triangle keeps the barycentric draw uniform.
    flip = u + v > 1.0
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    return tri[f, 0] + u[:, None] * e1[f] + v[:, None] * e2[f]


def prism_mesh(
    polygon: np.ndarray, height: float, kernel: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Mesh of a polygon ``[P, 2]`` (x, z, counter-clockwise or not) extruded along y over ``±height / 2``.

    The caps are fanned from ``kernel``, a point from which the whole polygon is visible (the centre of a
    star or a cross, the inner corner of an L), which triangulates non-convex outlines without ear clipping.

    Returns:
        ``vertices [2P + 2, 3]`` and ``faces [4P, 3]``.
    """
    p = len(polygon)
    h = height / 2.0
    ring = np.vstack([polygon, np.asarray(kernel, dtype=np.float64)[None]])  # [P + 1, 2]
    bottom = np.stack([ring[:, 0], np.full(p + 1, -h), ring[:, 1]], axis=1)
    top = bottom + np.array([0.0, 2.0 * h, 0.0])
    vertices = np.vstack([bottom, top])
    i = np.arange(p)
    j = (i + 1) % p
    c_bot, c_top = p, 2 * p + 1
    faces = np.concatenate(
        [
            np.stack([i, j, i + p + 1], axis=1),  # side quads as two triangles each
            np.stack([j, j + p + 1, i + p + 1], axis=1),
            np.stack([np.full(p, c_bot), i, j], axis=1),  # cap fans
            np.stack([np.full(p, c_top), i + p + 1, j + p + 1], axis=1),
        ]
    )
    return vertices, faces
