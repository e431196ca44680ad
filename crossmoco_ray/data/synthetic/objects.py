"""Procedural everyday objects for the built-in dataset: each class is an arrangement of parts, as a mesh.

Like ModelNet's classes (and unlike plain primitives), a class is defined by how its parts are arranged —
a table is a top on legs, a stool a round seat on legs without a back, a bench a long seat, a chair a seat
with a back — and its members vary a lot: part proportions, counts (3 or 4 legs, 3 to 6 shelves), shapes
(round or square tops), optional parts (a footboard, arm rests). Neighbouring classes share parts, so a
classifier has to read their arrangement, not a single primitive.

Every builder has the signature ``rng -> (vertices [V, 3], faces [F, 3])``: a triangle mesh in the canonical
frame (y up), at an arbitrary scale, its parts tessellated finely enough (:data:`.shapes.STEP`) for the
deformations of
:mod:`crossmoco_ray.data.synthetic.dataset` to bend them; that module deforms the mesh, samples
points on it (uniformly by area, so a part gets points in proportion to its area) and renders it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from crossmoco_ray.data.synthetic.shapes import TAU, Mesh, box_mesh, lathe_mesh, merge_meshes

ObjectBuilder = Callable[[np.random.Generator], Mesh]

_AXES = {"x": [1, 0, 2], "y": [0, 1, 2], "z": [0, 2, 1]}  # y-up part frame → the part's axis along x/y/z


def _place(mesh: Mesh, centre: tuple[float, float, float], axis: str = "y") -> Mesh:
    """A part built about the y axis at the origin, turned so y lies along ``axis``, moved to ``centre``."""
    vertices, faces = mesh
    return vertices[:, _AXES[axis]] + np.asarray(centre, dtype=np.float64), faces


def box(centre: tuple[float, float, float], half: tuple[float, ...]) -> Mesh:
    """A closed axis-aligned box with half-sizes ``half`` (x, y, z)."""
    hx, hy, hz = half
    return _place(box_mesh((hx, hy, hz)), centre)


def cylinder(
    centre: tuple[float, float, float],
    r: float,
    h: float,
    axis: str = "y",
    top: bool = True,
    bottom: bool = True,
) -> Mesh:
    """A cylinder of radius ``r`` and height ``h`` along ``axis``; caps optional (an open cup, a tube)."""
    profile = [(r, -h / 2), (r, h / 2)]
    if bottom:
        profile.insert(0, (0.0, -h / 2))
    if top:
        profile.append((0.0, h / 2))
    return _place(lathe_mesh(np.array(profile)), centre, axis)


def disc(centre: tuple[float, float, float], r: float) -> Mesh:
    """A flat horizontal disc of radius ``r``."""
    return _place(lathe_mesh(np.array([(0.0, 0.0), (r, 0.0)])), centre)


def frustum(centre: tuple[float, float, float], r0: float, r1: float, h: float) -> Mesh:
    """The side of an upright truncated cone (radius ``r0`` at the bottom, ``r1`` at the top), no caps."""
    return _place(lathe_mesh(np.array([(r0, -h / 2), (r1, h / 2)])), centre)


def ellipsoid(centre: tuple[float, float, float], radii: tuple[float, ...]) -> Mesh:
    """An ellipsoid: a lathed half-ellipse (radii x and y) squeezed along z to its third radius."""
    a, b, c = radii
    t = np.linspace(0.0, np.pi, 17)
    vertices, faces = lathe_mesh(np.stack([a * np.sin(t), -b * np.cos(t)], axis=1))
    return _place((vertices * np.array([1.0, 1.0, c / a]), faces), centre)


def torus(centre: tuple[float, float, float], R: float, r: float, axis: str) -> Mesh:
    """A torus (ring radius ``R``, tube radius ``r``) about ``axis``."""
    v = TAU * np.arange(12) / 12
    return _place(lathe_mesh(np.stack([R + r * np.cos(v), r * np.sin(v)], axis=1), closed=True), centre, axis)


def _legs(
    rng: np.random.Generator, half_x: float, half_z: float, top_y: float, length: float, round_: bool
) -> list[Mesh]:
    """Four legs under the corners of a ``2·half_x × 2·half_z`` top whose underside is at ``top_y``."""
    t = rng.uniform(0.03, 0.07)
    y = top_y - length / 2
    parts: list[Mesh] = []
    for sx in (-1, 1):
        for sz in (-1, 1):
            c = (sx * (half_x - t), y, sz * (half_z - t))
            parts.append(cylinder(c, t, length) if round_ else box(c, (t, length / 2, t)))
    return parts


# ---- the classes ---------------------------------------------------------------------------------------


def table(rng: np.random.Generator) -> Mesh:
    """A top (rectangular or round) on four legs, or a round top on one pedestal with a foot."""
    hx, hz = rng.uniform(0.6, 1.0), rng.uniform(0.35, 0.8)
    height, thick = rng.uniform(0.6, 0.95), rng.uniform(0.03, 0.07)
    if rng.random() < 0.3:  # pedestal table
        r = max(hx, hz)
        parts = [cylinder((0, height, 0), r, 2 * thick)]
        parts.append(cylinder((0, height / 2, 0), rng.uniform(0.05, 0.1), height))
        parts.append(cylinder((0, 0.02, 0), rng.uniform(0.3, 0.5) * r, 0.04))
    else:
        parts = [box((0, height, 0), (hx, thick, hz))]
        parts += _legs(rng, hx, hz, height - thick, height - thick, rng.random() < 0.5)
    return merge_meshes(parts)


def chair(rng: np.random.Generator) -> Mesh:
    """A square seat on four legs with an upright back (sometimes slightly reclined)."""
    h = rng.uniform(0.3, 0.42)
    seat_y, thick = rng.uniform(0.4, 0.55), rng.uniform(0.03, 0.06)
    back_h = rng.uniform(0.4, 0.7)
    parts = [box((0, seat_y, 0), (h, thick, h))]
    parts += _legs(rng, h, h, seat_y - thick, seat_y - thick, rng.random() < 0.5)
    parts.append(box((0, seat_y + thick + back_h / 2, -h + 0.03), (h, back_h / 2, 0.03)))
    return merge_meshes(parts)


def stool(rng: np.random.Generator) -> Mesh:
    """A round seat on three or four splayed legs, no back."""
    r, seat_y = rng.uniform(0.2, 0.35), rng.uniform(0.45, 0.8)
    parts = [cylinder((0, seat_y, 0), r, rng.uniform(0.04, 0.08))]
    legs = int(rng.integers(3, 5))
    t = rng.uniform(0.025, 0.045)
    for i in range(legs):
        a = TAU * i / legs + rng.uniform(-0.1, 0.1)
        splay = rng.uniform(1.0, 1.4)
        top = np.array([np.cos(a), 0.0, np.sin(a)]) * r * 0.7
        foot = top * splay
        mid = (top + foot) / 2 + np.array([0.0, seat_y / 2, 0.0])
        parts.append(cylinder((float(mid[0]), float(mid[1]), float(mid[2])), t, seat_y))
    return merge_meshes(parts)


def bench(rng: np.random.Generator) -> Mesh:
    """A long narrow seat on two slab supports or four legs; sometimes a low back rail."""
    hx, hz = rng.uniform(0.8, 1.2), rng.uniform(0.15, 0.25)
    seat_y, thick = rng.uniform(0.35, 0.5), rng.uniform(0.03, 0.06)
    parts = [box((0, seat_y, 0), (hx, thick, hz))]
    if rng.random() < 0.5:
        for sx in (-1, 1):
            leg = (seat_y - thick) / 2
            parts.append(box((sx * (hx - 0.1), leg, 0), (0.03, leg, hz)))
    else:
        parts += _legs(rng, hx, hz, seat_y - thick, seat_y - thick, True)
    if rng.random() < 0.4:
        parts.append(box((0, seat_y + 0.3, -hz), (hx, 0.06, 0.02)))
    return merge_meshes(parts)


def bed(rng: np.random.Generator) -> Mesh:
    """A long mattress on a low frame, a tall headboard, sometimes a low footboard."""
    hx, hz = rng.uniform(0.5, 0.8), rng.uniform(0.9, 1.1)
    frame_h, mattress = rng.uniform(0.15, 0.3), rng.uniform(0.1, 0.2)
    parts = [box((0, frame_h / 2, 0), (hx, frame_h / 2, hz))]
    parts.append(box((0, frame_h + mattress / 2, 0), (hx * 0.97, mattress / 2, hz * 0.97)))
    head = rng.uniform(0.4, 0.8)
    parts.append(box((0, head / 2, -hz - 0.03), (hx, head / 2, 0.03)))
    if rng.random() < 0.5:
        foot = rng.uniform(0.25, 0.4)
        parts.append(box((0, foot / 2, hz + 0.03), (hx, foot / 2, 0.03)))
    return merge_meshes(parts)


def bookshelf(rng: np.random.Generator) -> Mesh:
    """Two side panels, a back and 3–6 evenly spaced boards."""
    hx, hy, hz = rng.uniform(0.4, 0.8), rng.uniform(0.6, 1.1), rng.uniform(0.15, 0.3)
    t = 0.025
    parts = [box((sx * hx, hy, 0), (t, hy, hz)) for sx in (-1, 1)]
    parts.append(box((0, hy, -hz), (hx, hy, t)))
    boards = int(rng.integers(3, 7))
    for y in np.linspace(t, 2 * hy - t, boards):
        parts.append(box((0, float(y), 0), (hx, t, hz)))
    return merge_meshes(parts)


def lamp(rng: np.random.Generator) -> Mesh:
    """A round base, a thin pole and an open shade (a truncated cone, wide at the bottom)."""
    height = rng.uniform(0.8, 1.6)
    base_r = rng.uniform(0.15, 0.3)
    parts = [cylinder((0, 0.03, 0), base_r, 0.06)]
    parts.append(cylinder((0, height / 2, 0), rng.uniform(0.015, 0.03), height))
    shade_h = rng.uniform(0.2, 0.4)
    r_low, r_high = rng.uniform(0.2, 0.4), rng.uniform(0.08, 0.2)
    parts.append(frustum((0, height, 0), r_low, r_high, shade_h))
    return merge_meshes(parts)


def bottle(rng: np.random.Generator) -> Mesh:
    """A tall closed body, a conical shoulder and a narrow neck."""
    r, body = rng.uniform(0.2, 0.35), rng.uniform(0.6, 1.1)
    neck_r, neck_h = rng.uniform(0.05, 0.1), rng.uniform(0.15, 0.35)
    shoulder = rng.uniform(0.1, 0.25)
    parts = [cylinder((0, body / 2, 0), r, body, top=False)]
    parts.append(frustum((0, body + shoulder / 2, 0), r, neck_r, shoulder))
    parts.append(cylinder((0, body + shoulder + neck_h / 2, 0), neck_r, neck_h, bottom=False))
    return merge_meshes(parts)


def mug(rng: np.random.Generator) -> Mesh:
    """An open cylinder with a bottom and a ring handle on its side."""
    r, h = rng.uniform(0.3, 0.45), rng.uniform(0.5, 0.9)
    parts = [cylinder((0, h / 2, 0), r, h, top=False)]
    R = rng.uniform(0.15, 0.25) * h
    parts.append(torus((r + R * 0.7, h / 2, 0), R, rng.uniform(0.02, 0.05), axis="z"))
    return merge_meshes(parts)


def bowl(rng: np.random.Generator) -> Mesh:
    """A wide open bowl (a truncated cone flaring upwards) on a small foot ring."""
    r_top, depth = rng.uniform(0.5, 0.8), rng.uniform(0.2, 0.4)
    r_bottom = r_top * rng.uniform(0.35, 0.6)
    parts = [frustum((0, depth / 2 + 0.05, 0), r_bottom, r_top, depth)]
    parts.append(disc((0, 0.05, 0), r_bottom))
    parts.append(cylinder((0, 0.025, 0), r_bottom * 0.8, 0.05, top=False, bottom=False))
    return merge_meshes(parts)


def airplane(rng: np.random.Generator) -> Mesh:
    """A long fuselage, thin swept-free wings across it, a tail fin and a small tail plane."""
    length, radius = rng.uniform(1.6, 2.2), rng.uniform(0.1, 0.18)
    parts = [ellipsoid((0, 0, 0), (radius, radius, length / 2))]
    span, chord = rng.uniform(1.2, 2.0), rng.uniform(0.2, 0.35)
    wing_z = rng.uniform(-0.1, 0.2) * length
    parts.append(box((0, 0, wing_z), (span / 2, 0.02, chord / 2)))
    tail_z = -length / 2 + 0.12
    fin_h = rng.uniform(0.25, 0.45)
    parts.append(box((0, fin_h / 2 + radius * 0.5, tail_z), (0.015, fin_h / 2, 0.1)))
    parts.append(box((0, radius * 0.3, tail_z), (span * rng.uniform(0.2, 0.3), 0.015, 0.08)))
    return merge_meshes(parts)


def car(rng: np.random.Generator) -> Mesh:
    """A long low body, a cabin on top (set back or forward) and four wheels at its sides."""
    hx, hz = rng.uniform(0.4, 0.55), rng.uniform(0.9, 1.2)
    wheel_r = rng.uniform(0.14, 0.22)
    body_h = rng.uniform(0.18, 0.3)
    body_y = wheel_r + body_h / 2
    parts = [box((0, body_y, 0), (hx, body_h / 2, hz))]
    cabin_h, cabin_len = rng.uniform(0.15, 0.3), rng.uniform(0.4, 0.65) * hz
    offset = rng.uniform(-0.3, 0.2) * hz
    parts.append(box((0, body_y + body_h / 2 + cabin_h / 2, offset), (hx * 0.9, cabin_h / 2, cabin_len)))
    for sx in (-1, 1):
        for sz in (-1, 1):
            c = (sx * (hx + 0.04), wheel_r, sz * hz * 0.7)
            parts.append(cylinder(c, wheel_r, 0.08, axis="x"))
    return merge_meshes(parts)


def sofa(rng: np.random.Generator) -> Mesh:
    """A long low seat block, a back block along one long side and two arm blocks at the ends."""
    hx, hz = rng.uniform(0.8, 1.2), rng.uniform(0.35, 0.5)
    seat_h, back_h = rng.uniform(0.3, 0.45), rng.uniform(0.3, 0.5)
    arm_w = rng.uniform(0.08, 0.18)
    parts = [box((0, seat_h / 2, 0), (hx, seat_h / 2, hz))]
    parts.append(box((0, seat_h + back_h / 2, -hz + 0.08), (hx, back_h / 2, 0.08)))
    arm_h = seat_h + rng.uniform(0.1, 0.25)
    for sx in (-1, 1):
        parts.append(box((sx * (hx + arm_w), arm_h / 2, 0), (arm_w, arm_h / 2, hz)))
    return merge_meshes(parts)


def monitor(rng: np.random.Generator) -> Mesh:
    """A thin wide screen on a short neck and a flat foot."""
    hx, hy = rng.uniform(0.5, 0.8), rng.uniform(0.3, 0.5)
    neck = rng.uniform(0.15, 0.35)
    parts = [box((0, neck + hy, 0), (hx, hy, rng.uniform(0.02, 0.05)))]
    parts.append(box((0, neck / 2, -0.02), (0.04, neck / 2, 0.02)))
    parts.append(box((0, 0.015, 0), (rng.uniform(0.15, 0.3), 0.015, rng.uniform(0.1, 0.2))))
    return merge_meshes(parts)


def bathtub(rng: np.random.Generator) -> Mesh:
    """An open box: a bottom and four thin walls, long and low."""
    hx, hz, hy = rng.uniform(0.35, 0.5), rng.uniform(0.8, 1.0), rng.uniform(0.2, 0.35)
    t = rng.uniform(0.03, 0.06)
    parts = [box((0, t, 0), (hx, t, hz))]
    for sx in (-1, 1):
        parts.append(box((sx * hx, hy, 0), (t, hy, hz)))
    for sz in (-1, 1):
        parts.append(box((0, hy, sz * hz), (hx, hy, t)))
    return merge_meshes(parts)


def guitar(rng: np.random.Generator) -> Mesh:
    """A flat body of two lobes (the lower one larger), a long neck and a head, standing upright."""
    lower, upper = rng.uniform(0.3, 0.4), rng.uniform(0.22, 0.3)
    depth = rng.uniform(0.06, 0.12)
    parts = [ellipsoid((0, lower, 0), (lower, lower, depth))]
    parts.append(ellipsoid((0, 2 * lower + upper * 0.6, 0), (upper, upper, depth)))
    neck = rng.uniform(0.6, 0.9)
    neck_y = 2 * lower + upper * 1.4 + neck / 2
    parts.append(box((0, neck_y, 0), (0.04, neck / 2, 0.025)))
    parts.append(box((0, neck_y + neck / 2 + 0.08, 0), (0.06, 0.08, 0.02)))
    return merge_meshes(parts)


OBJECT_MESHES: dict[str, ObjectBuilder] = {
    "table": table,
    "chair": chair,
    "stool": stool,
    "bench": bench,
    "bed": bed,
    "bookshelf": bookshelf,
    "lamp": lamp,
    "bottle": bottle,
    "mug": mug,
    "bowl": bowl,
    "airplane": airplane,
    "car": car,
    "sofa": sofa,
    "monitor": monitor,
    "bathtub": bathtub,
    "guitar": guitar,
}
"""Class name → mesh builder, in label order."""
