"""The mesh rasteriser (both backends) and shaded splats: analytic areas and shading of a cube, normals of
a plane."""

from __future__ import annotations

import numpy as np
import pytest

from crossmoco_ray.data.render import raster
from crossmoco_ray.data.render.camera import FILL, RenderSpec
from crossmoco_ray.data.render.raster import SHADE_RANGE, estimate_normals, render_mesh
from crossmoco_ray.data.render.splat import render_views

BACKENDS = ["compiled", "numpy"]


def use_backend(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Render meshes with ``backend`` for the rest of the test (skips the compiled one without a compiler)."""
    if backend == "numpy":
        monkeypatch.setenv(raster.FORCE_NUMPY_ENV, "numpy")
        return
    monkeypatch.delenv(raster.FORCE_NUMPY_ENV, raising=False)
    if raster.backend() != "compiled":
        pytest.skip("no C compiler here: meshes render on the numpy path (tested as such)")


def cube() -> tuple[np.ndarray, np.ndarray]:
    """The cube [-1, 1]³ as 12 triangles, windings mixed on purpose (shading is two-sided)."""
    v = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    faces = []
    for i, (a, b, c, d) in enumerate(quads):
        faces += [(a, b, c), (a, c, d)] if i % 2 else [(a, c, b), (a, d, c)]
    return v, np.array(faces)


def grey(intensity: float) -> float:
    lo, hi = SHADE_RANGE
    return lo + intensity * (hi - lo)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("azimuth", "stretch"), [(0.0, 1.0), (45.0, np.sqrt(2.0))])
def test_cube_visible_area_and_shading(
    azimuth: float, stretch: float, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_backend(monkeypatch, backend)
    size, ambient = 224, 0.25
    spec = RenderSpec(
        azimuths=(azimuth,),
        elevations=(0.0,),
        size=size,
        light=(0.0, 0.0, 1.0),
        ambient=ambient,
        supersample=4,
    )
    image = render_mesh(*cube(), spec)[0, ..., 0].astype(np.float64)
    # Normalised to unit radius the cube has half-side 1/√3; orthographic, the unit sphere spans FILL·size.
    half = 1 / np.sqrt(3) * FILL * size / 2
    expected_area = (2 * half) * (2 * half * stretch)
    # Face-on one face squarely faces the headlight; at 45° two faces each at cos 45°.
    lam = 1.0 if azimuth == 0.0 else np.cos(np.pi / 4)
    face_grey = grey(ambient + (1 - ambient) * lam)
    centre = image[size // 2, size // 2 - 10]
    assert abs(centre - face_grey) <= 0.5
    assert abs(image[size // 2, size // 2 + 10] - face_grey) <= 0.5  # both 45° faces alike
    # Anti-aliased coverage: the summed grey over the interior grey is the visible area in pixels.
    assert image.sum() / centre == pytest.approx(expected_area, rel=0.02)
    assert image[0, 0] == 0  # background


@pytest.mark.parametrize("backend", BACKENDS)
def test_mesh_views_are_deterministic_and_framed_like_points(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_backend(monkeypatch, backend)
    v, f = cube()
    spec = RenderSpec(size=48)
    a, b = render_mesh(v * 7 + 3, f, spec), render_mesh(v, f, spec)
    assert (a == b).all()  # position and scale do not change the images
    assert a.shape == (6, 48, 48, 3)
    points = render_views(v, RenderSpec(size=48, mode="depth"))
    for mesh_view, point_view in zip(a, points, strict=True):
        cols = np.nonzero(mesh_view.any(axis=(0, 2)))[0]
        point_cols = np.nonzero(point_view.any(axis=(0, 2)))[0]
        assert abs(cols.min() - point_cols.min()) <= 2  # corners of the cube are its vertices


@pytest.mark.parametrize("backend", BACKENDS)
def test_mesh_errors(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use_backend(monkeypatch, backend)
    v, f = cube()
    with pytest.raises(ValueError, match="face indices"):
        render_mesh(v, f + 8, RenderSpec(size=16))
    with pytest.raises(ValueError, match=r"\[F, 3\]"):
        render_mesh(v, f[:, :2], RenderSpec(size=16))
    assert not render_mesh(v, np.zeros((0, 3), np.int64), RenderSpec(size=16)).any()


def test_normals_of_a_plane_and_shaded_splats() -> None:
    rng = np.random.default_rng(0)
    plane = np.stack([rng.uniform(-1, 1, 500), rng.uniform(-1, 1, 500), np.zeros(500)], axis=1)
    normals = estimate_normals(plane, k=12)
    assert np.allclose(np.abs(normals[:, 2]), 1.0, atol=1e-6)
    spec = RenderSpec(azimuths=(0.0,), elevations=(0.0,), size=32, mode="shaded", light=(0.0, 0.0, 1.0))
    view = render_views(plane, spec)[0]
    assert view[view > 0].min() == SHADE_RANGE[1]  # the plane faces the headlight squarely


def test_chunking_does_not_change_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    # Memory is bounded by testing triangles in chunks; the z-buffer must carry over between chunks.
    use_backend(monkeypatch, "numpy")
    v, f = cube()
    spec = RenderSpec(size=40)
    whole = render_mesh(v, f, spec)
    monkeypatch.setattr("crossmoco_ray.data.render.raster.CHUNK", 50)
    assert (render_mesh(v, f, spec) == whole).all()
