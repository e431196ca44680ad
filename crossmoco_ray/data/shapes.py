"""Procedural surface samplers for the synthetic dataset, one per shape class.

Every sampler has the signature ``(num_points, rng) -> [num_points, 3] float64`` and returns points on the
surface of one random member of its class, in the canonical frame (y is up), at an arbitrary scale and
offset: :mod:`crossmoco_ray.data.synthetic` centres, normalises, deforms and adds noise afterwards.

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
ShapeSampler = Callable[[int, np.random.Generator], np.ndarray]


def _mix(parts: list[tuple[float, PartSampler]], n: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``n`` points between parts by area, sample each, and shuffle: ``[n, 3]``.

    The shuffle keeps the point order from revealing the parts (a loader taking the first k points would
    otherwise get only some faces).
    """
    areas = np.array([a for a, _ in parts], dtype=np.float64)
    counts = rng.multinomial(n, areas / areas.sum())
    pts = np.concatenate([sample(int(k)) for (_, sample), k in zip(parts, counts, strict=True)], axis=0)
    return pts[rng.permutation(n)]


def _disk(k: int, rng: np.random.Generator, r_in: float, r_out: float, y: float) -> np.ndarray:
    """``[k, 3]`` points uniform on the annulus ``r_in <= r <= r_out`` in the plane at height ``y``.

    ``r = sqrt(uniform(r_in², r_out²))`` makes the density uniform by area (a full disk is ``r_in = 0``).
    """
    r = np.sqrt(rng.uniform(r_in**2, r_out**2, k))
    t = rng.uniform(0.0, TAU, k)
    return np.stack([r * np.cos(t), np.full(k, y), r * np.sin(t)], axis=1)


def _tube(k: int, rng: np.random.Generator, r: float, y0: float, y1: float) -> np.ndarray:
    """``[k, 3]`` points uniform on the side of the cylinder of radius ``r`` between heights y0 and y1."""
    t = rng.uniform(0.0, TAU, k)
    return np.stack([r * np.cos(t), rng.uniform(y0, y1, k), r * np.sin(t)], axis=1)


def _unit_sphere(k: int, rng: np.random.Generator) -> np.ndarray:
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


# ---- the classes ---------------------------------------------------------------------------------------


def sphere(n: int, rng: np.random.Generator) -> np.ndarray:
    """A slightly ellipsoidal sphere (axes within ±10%)."""
    return _unit_sphere(n, rng) * rng.uniform(0.9, 1.1, 3)


def box(n: int, rng: np.random.Generator) -> np.ndarray:
    """A box with side ratios from 1:1:1 to about 1:0.35:0.35 (always a solid block, never a plate)."""
    sx, sz = rng.uniform(0.35, 1.0, 2)
    sy = rng.uniform(0.35, 1.4)
    square = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * [sx, sz]
    return sample_mesh(*prism_mesh(square, 2.0 * sy, (0.0, 0.0)), n, rng)


def cylinder(n: int, rng: np.random.Generator) -> np.ndarray:
    """A closed upright cylinder, height/radius 1.2–3.5 (never flat, unlike the ring)."""
    r, h = 1.0, rng.uniform(1.2, 3.5)
    return _mix(
        [
            (TAU * r * h, lambda k: _tube(k, rng, r, -h / 2, h / 2)),
            (np.pi * r**2, lambda k: _disk(k, rng, 0.0, r, h / 2)),
            (np.pi * r**2, lambda k: _disk(k, rng, 0.0, r, -h / 2)),
        ],
        n,
        rng,
    )


def cone(n: int, rng: np.random.Generator) -> np.ndarray:
    """An upright closed cone, apex up, height/radius 1–3."""
    r, h = 1.0, rng.uniform(1.0, 3.0)

    def lateral(k: int) -> np.ndarray:
        # The lateral area grows linearly with the distance from the apex: fraction t = sqrt(u).
        t = np.sqrt(rng.random(k))
        a = rng.uniform(0.0, TAU, k)
        return np.stack([r * t * np.cos(a), h * (1.0 - t), r * t * np.sin(a)], axis=1)

    slant = np.hypot(r, h)
    return _mix([(np.pi * r * slant, lateral), (np.pi * r**2, lambda k: _disk(k, rng, 0.0, r, 0.0))], n, rng)


def torus(n: int, rng: np.random.Generator) -> np.ndarray:
    """A torus lying flat (axis = y), tube radius / ring radius 0.2–0.5."""
    big, small = 1.0, rng.uniform(0.2, 0.5)
    # The area element is proportional to (R + r cos φ): rejection-sample φ in vectorised batches.
    phis: list[np.ndarray] = []
    got = 0
    while got < n:
        phi = rng.uniform(0.0, TAU, 2 * n + 16)
        keep = phi[rng.random(phi.size) * (big + small) < big + small * np.cos(phi)]
        phis.append(keep)
        got += keep.size
    phi = np.concatenate(phis)[:n]
    theta = rng.uniform(0.0, TAU, n)
    rho = big + small * np.cos(phi)
    return np.stack([rho * np.cos(theta), small * np.sin(phi), rho * np.sin(theta)], axis=1)


def capsule(n: int, rng: np.random.Generator) -> np.ndarray:
    """An upright capsule: a cylinder of length 1–3 radii capped by two hemispheres."""
    r, length = 1.0, rng.uniform(1.0, 3.0)

    def caps(k: int) -> np.ndarray:
        # A full sphere whose halves are pushed apart: each hemisphere keeps its uniform density.
        s = _unit_sphere(k, rng) * r
        s[:, 1] += np.where(s[:, 1] >= 0.0, length / 2, -length / 2)
        return s

    return _mix(
        [(TAU * r * length, lambda k: _tube(k, rng, r, -length / 2, length / 2)), (4 * np.pi * r**2, caps)],
        n,
        rng,
    )


def pyramid(n: int, rng: np.random.Generator) -> np.ndarray:
    """A pyramid on a rectangular base (sides ratio up to 1.4), apex up, height 0.7–1.8 base half-widths."""
    w, d = 1.0, rng.uniform(0.7, 1.0)
    h = rng.uniform(0.7, 1.8) * 2.0
    apex = [rng.uniform(-0.1, 0.1), h, rng.uniform(-0.1, 0.1)]
    vertices = np.array([[-w, 0, -d], [w, 0, -d], [w, 0, d], [-w, 0, d], apex], dtype=np.float64)
    faces = np.array([[0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4], [0, 2, 1], [0, 3, 2]])
    return sample_mesh(vertices, faces, n, rng)


def tetrahedron(n: int, rng: np.random.Generator) -> np.ndarray:
    """A tetrahedron on a triangular base, apex up, each vertex jittered from the regular one."""
    base = np.array([[np.cos(a), 0.0, np.sin(a)] for a in (0.0, TAU / 3, 2 * TAU / 3)])
    apex = np.array([[0.0, np.sqrt(2.0), 0.0]])  # a regular tetrahedron with unit circumradius base
    vertices = np.vstack([base, apex]) + rng.uniform(-0.15, 0.15, (4, 3))
    faces = np.array([[0, 1, 3], [1, 2, 3], [2, 0, 3], [0, 2, 1]])
    return sample_mesh(vertices, faces, n, rng)


def hemisphere(n: int, rng: np.random.Generator) -> np.ndarray:
    """A dome (closed by its flat disk), flat side down; the dome may be flattened or raised by ±20%."""
    r, lift = 1.0, rng.uniform(0.8, 1.2)

    def dome(k: int) -> np.ndarray:
        s = _unit_sphere(k, rng) * r
        s[:, 1] = np.abs(s[:, 1]) * lift
        return s

    # The dome's area is taken as 2πr² whatever the lift; a ±20% stretch changes it by less than 15%.
    return _mix([(TAU * r**2, dome), (np.pi * r**2, lambda k: _disk(k, rng, 0.0, r, 0.0))], n, rng)


def ring(n: int, rng: np.random.Generator) -> np.ndarray:
    """A flat washer: an annulus (inner/outer radius 0.4–0.75) with a thickness of 0.1–0.35 outer radii.

    Unlike the torus, its cross-section is a rectangle: flat faces and sharp edges.
    """
    r_out, r_in, t = 1.0, rng.uniform(0.4, 0.75), rng.uniform(0.1, 0.35)
    face = np.pi * (r_out**2 - r_in**2)
    return _mix(
        [
            (face, lambda k: _disk(k, rng, r_in, r_out, t / 2)),
            (face, lambda k: _disk(k, rng, r_in, r_out, -t / 2)),
            (TAU * r_out * t, lambda k: _tube(k, rng, r_out, -t / 2, t / 2)),
            (TAU * r_in * t, lambda k: _tube(k, rng, r_in, -t / 2, t / 2)),
        ],
        n,
        rng,
    )


def star_prism(n: int, rng: np.random.Generator) -> np.ndarray:
    """A prism with a star cross-section: 5–7 points, inner radius 0.35–0.6, thickness 0.3–1.2."""
    points = int(rng.integers(5, 8))
    r_in = rng.uniform(0.35, 0.6)
    a = np.arange(2 * points) * (np.pi / points)
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, r_in)
    outline = np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)
    return sample_mesh(*prism_mesh(outline, rng.uniform(0.3, 1.2), (0.0, 0.0)), n, rng)


def cross_prism(n: int, rng: np.random.Generator) -> np.ndarray:
    """A plus-shaped prism: two crossing bars (half-widths 0.18–0.35, arms 0.7–1), thickness 0.3–1."""
    w = rng.uniform(0.18, 0.35)
    ax, az = rng.uniform(0.7, 1.0, 2)
    outline = np.array(
        [
            [ax, -w],
            [ax, w],
            [w, w],
            [w, az],
            [-w, az],
            [-w, w],
            [-ax, w],
            [-ax, -w],
            [-w, -w],
            [-w, -az],
            [w, -az],
            [w, -w],
        ],
    )
    return sample_mesh(*prism_mesh(outline, rng.uniform(0.3, 1.0), (0.0, 0.0)), n, rng)


def l_shape(n: int, rng: np.random.Generator) -> np.ndarray:
    """An upright L: a vertical leg on a horizontal foot (outline in x-y), extruded along z."""
    width, height = rng.uniform(0.9, 1.5), rng.uniform(1.2, 2.0)
    t = rng.uniform(0.25, 0.45) * min(width, height)
    outline = np.array([[0, 0], [width, 0], [width, t], [t, t], [t, height], [0, height]], dtype=np.float64)
    # prism_mesh extrudes along y; extrude the (x, y) outline there, then swap y and z to stand it up.
    v, f = prism_mesh(outline, rng.uniform(0.3, 0.8), (t, t))
    return sample_mesh(v[:, [0, 2, 1]], f, n, rng)


SHAPE_SAMPLERS: dict[str, ShapeSampler] = {
    "sphere": sphere,
    "box": box,
    "cylinder": cylinder,
    "cone": cone,
    "torus": torus,
    "capsule": capsule,
    "pyramid": pyramid,
    "l_shape": l_shape,
    "ring": ring,
    "star_prism": star_prism,
    "cross_prism": cross_prism,
    "tetrahedron": tetrahedron,
    "hemisphere": hemisphere,
}
"""Class name → surface sampler, in label order."""
