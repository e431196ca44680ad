"""The compiled mesh rasteriser draws what the numpy one does, never writes outside its buffers, and
without a compiler (or when told to) meshes still render, on the numpy path."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crossmoco_ray.data.render import raster
from crossmoco_ray.data.render.camera import RenderSpec
from crossmoco_ray.data.render.raster import render_mesh
from crossmoco_ray.data.synthetic.dataset import synthetic_samples
from tests.data.test_raster import cube

needs_compiled = pytest.mark.skipif(
    raster.backend() != "compiled", reason="no C compiler here: meshes render on the numpy path"
)


def both(vertices: np.ndarray, faces: np.ndarray, spec: RenderSpec, monkeypatch: pytest.MonkeyPatch):
    """``(compiled, numpy)`` renders of one mesh."""
    monkeypatch.delenv(raster.FORCE_NUMPY_ENV, raising=False)
    compiled = render_mesh(vertices, faces, spec)
    monkeypatch.setenv(raster.FORCE_NUMPY_ENV, "numpy")
    numpy = render_mesh(vertices, faces, spec)
    monkeypatch.delenv(raster.FORCE_NUMPY_ENV)
    return compiled, numpy


def assert_agree(compiled: np.ndarray, numpy: np.ndarray) -> None:
    assert compiled.shape == numpy.shape
    assert compiled.dtype == numpy.dtype == np.uint8
    close = np.abs(compiled.astype(np.int64) - numpy.astype(np.int64)) <= 2
    assert close.mean() >= 0.99, f"{(~close).sum()} pixels differ by more than 2 grey levels"
    area_c, area_n = (compiled[..., 0] > 0).sum(), (numpy[..., 0] > 0).sum()
    assert abs(int(area_c) - int(area_n)) <= 0.002 * area_n + 2  # the same visible area


@needs_compiled
@pytest.mark.parametrize(
    "spec",
    [
        RenderSpec(size=64),
        RenderSpec(size=96, supersample=3, up_axis="z", elevations=(-30.0, 75.0), light=(0.3, -0.2, 0.9)),
        RenderSpec(size=48, supersample=1, ambient=0.0, zoom=0.5),
    ],
    ids=["default", "ss3-z-up", "ss1-zoomed-out"],
)
def test_compiled_and_numpy_agree_on_the_built_in_set(spec: RenderSpec, monkeypatch) -> None:
    for sample in synthetic_samples(6, 64, seed=0):
        assert sample.mesh is not None
        compiled, numpy = both(*sample.mesh, spec, monkeypatch)
        assert compiled.shape == (spec.num_views, spec.size, spec.size, 3)
        assert compiled.any()
        assert_agree(compiled, numpy)


@needs_compiled
def test_zoomed_in_meshes_clip_at_the_border_like_numpy(monkeypatch) -> None:
    # At zoom 4 most of every object lies outside the image on all four sides.
    spec = RenderSpec(size=40, zoom=4.0, azimuths=(0.0, 30.0, 135.0))
    for sample in synthetic_samples(3, 64, seed=1):
        assert sample.mesh is not None
        compiled, numpy = both(*sample.mesh, spec, monkeypatch)
        assert_agree(compiled, numpy)
    compiled, numpy = both(*cube(), spec, monkeypatch)
    assert (compiled[0] > 0).all()  # the face seen fills the image
    assert_agree(compiled, numpy)


@needs_compiled
def test_the_kernel_writes_nothing_outside_its_buffers() -> None:
    """Triangles far beyond every border, drawn into buffers fenced by canaries."""
    lib = raster._compiled()
    assert lib is not None
    size, ss = 16, 2
    n = size * ss
    rng = np.random.default_rng(0)
    cam = rng.uniform(-6.0, 6.0, (300, 3))  # at 0.9·n/2 pixels per unit: up to 5 images beyond each side
    faces = rng.integers(0, len(cam), (2000, 3))
    fence = 4096

    def fenced(count: int, dtype: type, fill: float) -> tuple[np.ndarray, int]:
        buf = np.full(count + 2 * fence, fill, dtype=dtype)
        return buf, buf[fence:].ctypes.data

    zbuf, zptr = fenced(n * n, np.float64, 7.0)
    grey, gptr = fenced(n * n, np.uint8, 7)
    out, optr = fenced(size * size * 3, np.uint8, 0)
    out[:fence] = out[-fence:] = 7
    light = np.array([0.0, 0.0, 1.0])
    err = lib.raster_view(
        cam.ctypes.data, len(cam), faces.ctypes.data, len(faces), size, ss, 0.9 * n / 2,
        light.ctypes.data, 0.25, 30.0, 255.0, zptr, gptr, optr,
    )  # fmt: skip
    assert err == 0
    for buf in (zbuf, grey, out):
        assert (buf[:fence] == 7).all()
        assert (buf[-fence:] == 7).all()
    assert out[fence:-fence].any()  # it did draw


@needs_compiled
def test_the_kernel_checks_face_indices_itself() -> None:
    lib = raster._compiled()
    assert lib is not None
    cam = np.zeros((3, 3))
    zbuf, grey, out = np.empty(64), np.empty(64, np.uint8), np.zeros(4 * 4 * 3, np.uint8)
    light = np.array([0.0, 0.0, 1.0])
    for bad in ([0, 1, 3], [0, -1, 2]):
        faces = np.array([bad], dtype=np.int64)
        err = lib.raster_view(
            cam.ctypes.data, 3, faces.ctypes.data, 1, 4, 2, 1.0, light.ctypes.data, 0.25, 30.0, 255.0,
            zbuf.ctypes.data, grey.ctypes.data, out.ctypes.data,
        )  # fmt: skip
        assert err == 1


@pytest.mark.parametrize("backend", ["compiled", "numpy"])
def test_hostile_meshes(backend: str, monkeypatch) -> None:
    from tests.data.test_raster import use_backend

    use_backend(monkeypatch, backend)
    v, f = cube()
    spec = RenderSpec(size=16, azimuths=(0.0,))
    nan = v.copy()
    nan[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        render_mesh(nan, f, spec)
    for bad in (f + 8, f - 9, np.array([[0, 1, 2**40]])):
        with pytest.raises(ValueError, match="face indices"):
            render_mesh(v, bad, spec)
    # Degenerate triangles (a repeated vertex, three in a row) cover nothing: a black image.
    line = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    assert not render_mesh(line, np.array([[0, 1, 2], [0, 0, 1], [2, 2, 2]]), spec).any()
    with pytest.raises(ValueError, match="threads"):
        render_mesh(v, f, spec, threads=0)


@needs_compiled
def test_many_triangles_and_threads(monkeypatch) -> None:
    rng = np.random.default_rng(3)
    verts = rng.normal(size=(5000, 3))
    spec = RenderSpec(size=24, azimuths=(0.0, 120.0, 240.0), elevations=(10.0,))
    assert_agree(*both(verts, rng.integers(0, len(verts), (30_000, 3)), spec, monkeypatch))
    faces = rng.integers(0, len(verts), (1_000_000, 3))  # no chunking in the C loop: memory stays flat
    one = render_mesh(verts, faces, spec)
    assert one.any()
    assert np.array_equal(render_mesh(verts, faces, spec, threads=3), one)  # views split over threads
    v, f = cube()
    assert np.array_equal(
        render_mesh(v, f, RenderSpec(size=32), threads=4), render_mesh(v, f, RenderSpec(size=32))
    )


# --------------------------------------------------------------------------------------------------
# Without a compiler, or told to, meshes render on the numpy path; in a fresh interpreter each, since
# the library is loaded once per process.
# --------------------------------------------------------------------------------------------------

PROBE = (
    "import sys; from crossmoco_ray.data.render import raster; "
    "from crossmoco_ray.data.render.camera import RenderSpec; from tests.data.test_raster import cube; "
    "spec = RenderSpec(size=32); a = raster.render_mesh(*cube(), spec); "
    "b = raster.render_mesh(*cube(), spec); "
    "print('backend', raster.backend()); print('sum', int(a.sum()), int(b.sum())); "
    "print('torch', 'torch' in sys.modules)"
)


def run_fresh(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", PROBE],
        env={**os.environ, **env},
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def numpy_sum(monkeypatch) -> int:
    monkeypatch.setenv(raster.FORCE_NUMPY_ENV, "numpy")
    return int(render_mesh(*cube(), RenderSpec(size=32)).sum())


def test_without_a_compiler_meshes_render_on_numpy_with_one_warning(tmp_path: Path, monkeypatch) -> None:
    done = run_fresh({"CC": "/nonexistent", "PATH": "/nonexistent", "CROSSMOCO_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "backend numpy" in done.stdout
    want = numpy_sum(monkeypatch)
    assert f"sum {want} {want}" in done.stdout
    assert done.stderr.count("compiled mesh rasteriser is unavailable") == 1
    assert "no C compiler found" in done.stderr
    assert not list(tmp_path.rglob("*.so"))


def test_forced_numpy_path_neither_builds_nor_warns(tmp_path: Path, monkeypatch) -> None:
    done = run_fresh({raster.FORCE_NUMPY_ENV: "numpy", "CROSSMOCO_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "backend numpy" in done.stdout
    want = numpy_sum(monkeypatch)
    assert f"sum {want} {want}" in done.stdout
    assert "unavailable" not in done.stderr
    assert "torch False" in done.stdout  # the builder (and with it torch) is not even imported
    assert not list(tmp_path.rglob("*.so"))


@needs_compiled
def test_the_library_is_cached_with_its_digest_and_checked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CROSSMOCO_CACHE", str(tmp_path))
    monkeypatch.setattr(raster, "_library", None)  # a fresh loader: builds into tmp_path
    assert raster.backend() == "compiled"
    (so,) = (tmp_path / "kernels").glob("raster-*.so")
    assert (so.parent / (so.name + ".sha256")).is_file()
    # A library that fails the trust checks is rebuilt, not loaded (the checks: tests/nn/test_kernels.py).
    so.chmod(0o777)
    monkeypatch.setattr(raster, "_library", None)
    with pytest.warns(RuntimeWarning, match="not loading the mesh rasteriser from .*writable by others"):
        assert raster.backend() == "compiled"
    assert not so.stat().st_mode & 0o022
    lib = raster._compiled()
    assert isinstance(lib, ctypes.CDLL)
