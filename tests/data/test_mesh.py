"""Mesh sources: reading OFF (incl. ModelNet's malformed header) / OBJ / PLY meshes, surface sampling,
ModelNet's class-folder layout, and prepare writing shaded mesh renders."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from crossmoco_ray.data.prepare.options import PrepareOptions
from crossmoco_ray.data.prepare.prepare import prepare
from crossmoco_ray.data.render.camera import FILL
from crossmoco_ray.data.render.raster import SHADE_RANGE
from crossmoco_ray.data.render.splat import RenderSpec, decode_png
from crossmoco_ray.data.sources.formats import FolderSource, detect_format, open_source
from crossmoco_ray.data.sources.mesh import farthest_points, is_mesh_file, read_mesh, surface_points
from crossmoco_ray.errors import DataError
from tests.data import fixtures
from tests.data.test_raster import BACKENDS, use_backend
from tests.data.test_shards import read_rows


def test_malformed_off_header_reads_like_a_proper_one(tmp_path: Path) -> None:
    v, q = fixtures.cube_mesh()
    good = read_mesh(fixtures.write_off(tmp_path / "good.off", v, q))
    bad = read_mesh(fixtures.write_off(tmp_path / "bad.off", v, q, malformed=True))
    assert (tmp_path / "bad.off").read_text().startswith("OFF8 6 0\n")
    for a, b in zip(good, bad, strict=True):
        assert np.array_equal(a, b)
    assert good[1].shape == (12, 3)  # quads triangulated


def test_obj_and_ply_meshes(tmp_path: Path) -> None:
    v, q = fixtures.cube_mesh()
    obj = read_mesh(fixtures.write_obj(tmp_path / "c.obj", v, q))
    ply_path = fixtures.write_ply_mesh(tmp_path / "c.ply", v, q)
    ply = read_mesh(ply_path)
    assert np.allclose(obj[0], v)
    assert np.allclose(ply[0], v)
    assert obj[1].shape == ply[1].shape == (12, 3)
    assert is_mesh_file(ply_path)
    points_only = tmp_path / "p.ply"
    fixtures.write_ply(points_only, v.astype(np.float32))
    assert not is_mesh_file(points_only)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("OFF\n0 0 0\n", "empty mesh: no faces"),
        ("OFF\n3 0 0\n0 0 0\n1 0 0\n0 1 0\n", "empty mesh: no faces"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n2 0 0\n3 0 1 2\n", "zero surface area"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\nnan 1 0\n3 0 1 2\n", "NaN or infinite"),
        ("this is not a mesh\n", "unreadable mesh"),
    ],
)
def test_bad_meshes_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.off"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as info:
        read_mesh(path)
    assert str(path) in str(info.value)


def test_surface_points_are_area_weighted_seeded_and_on_the_surface() -> None:
    v, q = fixtures.cube_mesh()
    # One face cut into many small triangles: a per-triangle draw would crowd it; area weighting must not.
    tris = np.concatenate([q[:, :3], q[:, [0, 2, 3]]])
    grid = np.linspace(-1, 1, 9)
    gx, gz = np.meshgrid(grid, grid)
    top = np.stack([gx.ravel(), np.full(81, 1.0), gz.ravel()], axis=1)
    cells = [(r * 9 + c, r * 9 + c + 1, (r + 1) * 9 + c + 1) for r in range(8) for c in range(8)]
    cells += [(r * 9 + c, (r + 1) * 9 + c + 1, (r + 1) * 9 + c) for r in range(8) for c in range(8)]
    keep = ~np.all(v[tris][:, :, 1] == 1.0, axis=1)  # drop the original top face
    verts = np.vstack([v, top])
    faces = np.vstack([tris[keep], np.array(cells) + 8])
    pts = surface_points((verts, faces), 6000, "cube/0001", seed=3)
    assert pts.shape == (6000, 3)
    assert pts.dtype == np.float32
    assert np.allclose(np.abs(pts).max(axis=1), 1.0, atol=1e-6)  # every point on a face
    on_top = (pts[:, 1] > 1 - 1e-6).mean()
    assert on_top == pytest.approx(1 / 6, abs=0.02)
    assert np.array_equal(pts, surface_points((verts, faces), 6000, "cube/0001", seed=3))
    assert not np.array_equal(pts, surface_points((verts, faces), 6000, "cube/0002", seed=3))


def test_farthest_point_sampling() -> None:
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(300, 3))
    idx = farthest_points(pts, 20, start=5)
    # Brute force: each pick maximises the distance to the picked set.
    picked = [5]
    for _ in range(19):
        d = np.min(((pts[:, None] - pts[picked][None]) ** 2).sum(-1), axis=1)
        picked.append(int(d.argmax()))
    assert idx.tolist() == picked
    v, q = fixtures.cube_mesh()
    mesh = (v, np.concatenate([q[:, :3], q[:, [0, 2, 3]]]))

    def min_gap(p: np.ndarray) -> float:
        d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1)) + np.eye(len(p)) * 9
        return float(d.min())

    assert min_gap(surface_points(mesh, 256, "a", 0, fps=True)) > 3 * min_gap(
        surface_points(mesh, 256, "a", 0)
    )


def test_modelnet_layout_is_read_class_major(tmp_path: Path) -> None:
    root = fixtures.mesh_folder(tmp_path / "ModelNetMini")
    assert detect_format(str(root)) == "folder"
    src = open_source(str(root), up_axis="z", num_points=128)
    assert isinstance(src, FolderSource)
    assert src.has_meshes()
    assert src.splits() == ["train", "test"]
    assert src.class_names() == ["cube", "fins", "slab"]
    train = list(src.samples("train"))
    assert [s.id for s in train] == [  # type: ignore[union-attr]
        "cube/cube_0000",
        "cube/cube_0001",
        "cube/cube_0002",
        "fins/fins_0001",
        "slab/slab_0001",
        "slab/slab_0002",
    ]
    s = train[0]
    assert not isinstance(s, DataError)
    assert s.mesh is not None
    assert s.label == 0
    assert s.points.shape == (128, 3)
    # Raw units, z up: the cube spans z in [-50, -10] on disk; (x, y, z) -> (x, z, -y) makes it the up range.
    assert s.points[:, 1].min() == pytest.approx(-50.0, abs=1e-3)
    assert np.allclose(s.mesh[0][:, 1].max(), -10.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepare_meshes_names_the_empty_one_and_renders_shaded(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_backend(monkeypatch, backend)
    root = fixtures.mesh_folder(tmp_path / "meshes")
    (root / "cube" / "train" / "cube_9999.off").write_text("OFF\n0 0 0\n")  # an empty mesh
    spec = RenderSpec(azimuths=(0.0, 45.0), elevations=(0.0,), size=64, light=(0.0, 0.0, 1.0), supersample=4)
    src = open_source(str(root), num_points=256)
    with pytest.raises(DataError, match=r"cube_9999\.off: empty mesh"):
        prepare(src, str(tmp_path / "out"), PrepareOptions(render=spec), log=lambda m: None)
    manifest = prepare(
        src, str(tmp_path / "out"), PrepareOptions(render=spec, skip_bad=True), log=lambda m: None
    )
    assert manifest["rendered_from"] == "meshes"
    assert manifest["skipped"] == 1
    assert "cube_9999.off" in (tmp_path / "out" / "skipped.json").read_text()
    assert manifest["counts"]["train"]["total"] == 6
    assert manifest["counts"]["test"]["total"] == 3
    rows = read_rows(tmp_path / "out", "test")
    views = rows["views"][rows["id"].index("cube/cube_0100")]
    size = spec.size
    half = 1 / np.sqrt(3) * FILL * size / 2  # the unit-radius cube's half side in pixels
    lo, hi = SHADE_RANGE
    for view, stretch, lam in zip(views, (1.0, np.sqrt(2.0)), (1.0, np.cos(np.pi / 4)), strict=True):
        image = decode_png(view)[..., 0].astype(np.float64)
        face = lo + (spec.ambient + (1 - spec.ambient) * lam) * (hi - lo)
        assert abs(image[size // 2, size // 2 - 4] - face) <= 0.5  # the shading of the face(s) seen
        assert image.sum() / face == pytest.approx(4 * half * half * stretch, rel=0.02)  # the visible area
    # The non-manifold mesh renders and samples too.
    fins = rows["points"][rows["id"].index("fins/fins_0100")]
    assert np.isfinite(fins).all()
    assert len(fins) == 256
    # Re-running is a no-op; a different light is a different dataset.
    assert (
        prepare(src, str(tmp_path / "out"), PrepareOptions(render=spec, skip_bad=True), log=lambda m: None)
        == manifest
    )
    with pytest.raises(DataError, match="different prepared dataset"):
        prepare(
            src,
            str(tmp_path / "out"),
            PrepareOptions(
                render=RenderSpec(azimuths=(0.0, 45.0), size=64, light=(1.0, 0.0, 1.0)), skip_bad=True
            ),
            log=lambda m: None,
        )


def test_the_built_in_set_renders_meshes_unless_points_only(tmp_path: Path) -> None:
    src = open_source("synthetic", synthetic_counts={"train": 4, "test": 2}, num_points=128)
    spec = RenderSpec(azimuths=(0.0, 90.0), size=64, point_size=1)
    quiet = {"log": lambda m: None}
    mesh = prepare(src, str(tmp_path / "m"), PrepareOptions(render=spec, shuffle=False), **quiet)
    points_spec = RenderSpec(azimuths=(0.0, 90.0), size=64, point_size=1, points_only=True)
    splat = prepare(src, str(tmp_path / "p"), PrepareOptions(render=points_spec, shuffle=False), **quiet)
    assert mesh["rendered_from"] == "meshes"
    assert splat["rendered_from"] == "points"
    assert mesh["fingerprint"] != splat["fingerprint"]
    a, b = read_rows(tmp_path / "m", "train"), read_rows(tmp_path / "p", "train")
    assert np.array_equal(a["points"], b["points"])  # the same objects, rendered two ways
    m, p = decode_png(a["views"][0][0]), decode_png(b["views"][0][0])
    # A mesh render covers the silhouette; 128 one-pixel splats cover at most 128 of its 4096 pixels.
    assert (m > 0).mean() > 2 * (p > 0).mean()


# ---- meshes that lie about their size, reach for other files or overflow (issue 27) ----

TRIANGLE = "0 0 0\n1 0 0\n0 1 0\n"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("v.off", f"OFF\n1000000000 1 0\n{TRIANGLE}3 0 1 2\n", "OFF header declares 1000000000 vertices"),
        (
            "f.off",
            f"OFF\n3 1000000000 0\n{TRIANGLE}3 0 1 2\n",
            "OFF header declares 3 vertices and 1000000000",
        ),
        (
            "glued.off",
            f"OFF3 1000000000 0\n{TRIANGLE}3 0 1 2\n",
            "OFF header declares 3 vertices and 1000000000",
        ),
        ("neg.off", f"OFF\n-3 1 0\n{TRIANGLE}3 0 1 2\n", "OFF header declares -3 vertices"),
        (
            "f.ply",
            "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
            "element face 1000000000\nproperty list uchar int vertex_indices\nend_header\n"
            f"{TRIANGLE}3 0 1 2\n",
            "PLY header declares 3 'vertex', 1000000000 'face' rows",
        ),
    ],
    ids=["off-vertices", "off-faces", "off-glued", "off-negative", "ply-faces"],
)
def test_mesh_headers_claiming_more_than_the_file_holds_are_named(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: {message}"):
        read_mesh(tmp_path / name)


def test_obj_material_files_are_never_opened(tmp_path: Path) -> None:
    """``mtllib`` names another file; a FIFO (or /dev/zero) there would block or fill memory."""
    import os

    os.mkfifo(tmp_path / "trap.mtl")
    (tmp_path / "m.obj").write_text(
        "mtllib trap.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nusemtl a\nf 1 2 3\nf 1 2 4\n"
    )
    start = time.monotonic()
    _, faces = read_mesh(tmp_path / "m.obj")  # trimesh swallows every exception around a material's read
    assert time.monotonic() - start < 5  # so a read blocked on the FIFO would show as time, not an error
    assert faces.shape == (2, 3)


@pytest.mark.parametrize("scale", [1e30, 1e200], ids=["beyond-float32-normalisation", "area-overflows"])
def test_meshes_with_coordinates_beyond_the_limit_are_named(tmp_path: Path, scale: float) -> None:
    v, q = fixtures.cube_mesh()
    path = fixtures.write_off(tmp_path / "far.off", v * scale, q)
    with pytest.raises(DataError, match=r"far\.off: vertex coordinates reach 1e\+(30|200), beyond ±1e\+18"):
        read_mesh(path)
    folder = tmp_path / "pf" / "thing"
    folder.mkdir(parents=True)
    path.rename(folder / "far.off")
    [item] = [
        i
        for t in FolderSource(tmp_path / "pf").tasks("train")
        for i in [FolderSource(tmp_path / "pf").read("train", Path(t))]
    ]
    assert isinstance(item, DataError)
