"""The splatting renderer: geometry, determinism, invariances, up axis, depth shading; PNG helpers."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossmoco_ray.data.render.splat import (
    COORD_RANGE,
    DEPTH_RANGE,
    SHEET_GAP,
    RenderSpec,
    contact_sheet,
    decode_png,
    encode_png,
    render_views,
)

# Proper rotations taking y-up data to data whose up is z or x (the inverse of what the renderer undoes).
Y_UP_TO = {
    "y": np.eye(3),
    "z": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),  # up (0,1,0) -> (0,0,1)
    "x": np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),  # up (0,1,0) -> (1,0,0)
}


def sphere(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def box_surface(n: int, half: tuple[float, float, float], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.uniform(-1.0, 1.0, size=(n, 3))
    face = rng.integers(0, 3, n)
    p[np.arange(n), face] = np.sign(p[np.arange(n), face])
    return p * np.asarray(half)


def cylinder_y(n: int, radius: float, half_height: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.0, 2 * np.pi, n)
    return np.stack(
        [radius * np.cos(t), rng.uniform(-half_height, half_height, n), radius * np.sin(t)], axis=1
    )


def extent(mask: np.ndarray) -> tuple[int, int]:
    """(height, width) of the bounding box of a ``[H, W]`` mask."""
    rows, cols = np.nonzero(mask)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def test_shape_dtype_and_view_order() -> None:
    spec = RenderSpec(azimuths=(0.0, 90.0, 200.0), elevations=(0.0, 45.0), size=32)
    assert spec.num_views == 6
    views = render_views(box_surface(500, (1.0, 0.5, 0.3)), spec)
    assert views.shape == (6, 32, 32, 3)
    assert views.dtype == np.uint8
    # Elevation-major: view 4 is elevation 45, azimuth 90.
    single = render_views(
        box_surface(500, (1.0, 0.5, 0.3)), RenderSpec(azimuths=(90.0,), elevations=(45.0,), size=32)
    )
    np.testing.assert_array_equal(views[4], single[0])


def test_sphere_renders_as_a_filled_centred_symmetric_disc() -> None:
    size = 64
    views = render_views(sphere(8192), RenderSpec(size=size, point_size=2))
    rows, cols = np.mgrid[0:size, 0:size]
    dist = np.hypot(rows + 0.5 - size / 2, cols + 0.5 - size / 2)  # from the image centre to pixel centres
    radius = 0.9 * size / 2
    for mask in np.asarray(views.any(axis=-1)):
        assert not mask[dist > radius + 1.5].any()  # inside the circle (a splat reaches ~1 px beyond)
        assert mask[dist < radius - 1].mean() > 0.95  # and fills it
        assert (mask == mask[:, ::-1]).mean() > 0.97  # left / right
        assert (mask == mask[::-1, :]).mean() > 0.97  # top / bottom


def test_views_differ_by_azimuth() -> None:
    box = box_surface(3000, (1.0, 0.2, 0.2))  # long along x
    views = render_views(box, RenderSpec(azimuths=(0.0, 90.0), elevations=(0.0,), size=64))
    (h0, w0), (h90, w90) = (extent(v.any(axis=-1)) for v in views)
    assert w0 > 3 * h0  # side on: wide
    assert w90 < 1.5 * h90  # end on: about square
    assert w0 > 3 * w90


def test_deterministic() -> None:
    pts = np.random.default_rng(1).normal(size=(2048, 3)).astype(np.float32)
    for mode in ("depth", "coords"):
        spec = RenderSpec(mode=mode)
        np.testing.assert_array_equal(render_views(pts, spec), render_views(pts.copy(), spec))


def test_scale_and_translation_do_not_change_the_images() -> None:
    pts = np.random.default_rng(2).normal(size=(2048, 3))
    for mode in ("depth", "coords"):
        spec = RenderSpec(size=64, mode=mode)
        a = render_views(pts, spec)
        b = render_views(pts * 37.5 + np.array([100.0, -20.0, 3.0]), spec)
        # Float rounding may move a point across a pixel edge in rare cases: allow a handful of pixels.
        assert (a != b).any(axis=-1).mean() < 1e-3


@pytest.mark.parametrize("up", ["y", "z", "x"])
def test_up_axis_points_up_in_the_image(up: str) -> None:
    tall = cylinder_y(3000, 0.1, 1.0) @ Y_UP_TO[up].T  # a thin cylinder along the data's up axis
    angles = {"azimuths": (0.0, 45.0, 90.0, 200.0), "elevations": (0.0, 30.0), "size": 64}
    spec = RenderSpec(**angles, up_axis=up)  # type: ignore[arg-type]
    views = render_views(tall, spec)
    for v in views:
        h, w = extent(v.any(axis=-1))
        assert h > 4 * w
    # The same object expressed in another up frame renders to the same images.
    reference = render_views(cylinder_y(3000, 0.1, 1.0), RenderSpec(**angles))  # type: ignore[arg-type]
    assert (views != reference).any(axis=-1).mean() < 1e-3


def test_up_is_at_the_top() -> None:
    # A cone-like cloud: a wide disc at the bottom, one point high up; the top point lands in row ~0.
    t = np.linspace(0.0, 2 * np.pi, 200, endpoint=False)
    base = np.stack([np.cos(t), np.full_like(t, -1.0), np.sin(t)], axis=1)
    pts = np.concatenate([base, [[0.0, 1.0, 0.0]]])
    view = render_views(pts, RenderSpec(azimuths=(0.0,), elevations=(0.0,), size=64, point_size=1))[0]
    rows = np.nonzero(view.any(axis=(1, 2)))[0]
    top_cols = np.nonzero(view[rows.min()].any(axis=-1))[0]
    assert rows.min() < 20
    assert rows.max() > 40
    assert len(top_cols) == 1
    assert abs(top_cols[0] - 32) <= 1


def test_depth_nearer_is_brighter() -> None:
    spec = RenderSpec(azimuths=(0.0, 180.0), elevations=(0.0,), size=32, point_size=1)
    # Camera at azimuth 0 is on the +z side: the first point is nearer, on the left.
    views = render_views(np.array([[-0.6, 0.0, 0.6], [0.6, 0.0, -0.6]]), spec)
    left, right = views[0][:, :16].max(), views[0][:, 16:].max()
    assert left > right >= DEPTH_RANGE[0]
    # From behind (azimuth 180) the second point is nearer and now on the left.
    assert views[1][:, :16].max() > views[1][:, 16:].max()
    # Two points on one pixel: the z-buffer keeps the nearer, from either side.
    both = render_views(np.array([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]), spec)
    assert both.max(axis=(1, 2, 3)).tolist() == [DEPTH_RANGE[1], DEPTH_RANGE[1]]
    assert (both.any(axis=-1).sum(axis=(1, 2)) == 1).all()


def test_value_ranges_and_background() -> None:
    pts = np.random.default_rng(3).normal(size=(1000, 3))
    depth = render_views(pts, RenderSpec(size=48))
    obj = depth.any(axis=-1)
    assert obj.any()
    assert not obj.all()
    assert depth[obj].min() >= DEPTH_RANGE[0]
    assert (depth[..., 0] == depth[..., 1]).all()
    assert (depth[..., 0] == depth[..., 2]).all()
    coords = render_views(pts, RenderSpec(size=48, mode="coords"))
    obj = coords.any(axis=-1)
    assert coords[obj].min() >= COORD_RANGE[0]
    assert (coords[..., 0] != coords[..., 1]).any()  # colour, not grey


def test_degenerate_clouds() -> None:
    spec = RenderSpec(size=16)
    assert not render_views(np.zeros((0, 3)), spec).any()
    one = render_views(np.array([[5.0, 5.0, 5.0]]), spec)
    assert (one.any(axis=-1).sum(axis=(1, 2)) == 4).all()  # a 2×2 splat in the middle of every view
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        render_views(np.zeros((4, 2)), spec)
    with pytest.raises(ValueError, match="NaN"):
        render_views(np.array([[0.0, np.nan, 0.0]]), spec)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 4}, "size must be at least 8"),
        ({"point_size": 0}, "point_size must be at least 1"),
        ({"azimuths": ()}, "at least one azimuth"),
        ({"elevations": ()}, "at least one elevation"),
        ({"mode": "normals"}, "mode"),
        ({"up_axis": "w"}, "up_axis"),
        ({"azimuths": (0.0, float("nan"))}, r"azimuths must be finite"),
        ({"elevations": (float("inf"),)}, r"elevations must be finite"),
        ({"azimuths": ("north",)}, r"azimuths must be numbers"),
        ({"size": 100000}, r"size must be at least 8 and at most 4096 pixels, got 100000"),
        ({"size": 4096, "supersample": 4}, r"size × supersample ≤ 8192"),
        ({"azimuths": tuple(range(300))}, r"300 views; at most 256"),
        ({"point_size": 200, "size": 64}, r"point_size must be at least 1 pixel \(and at most size\)"),
    ],
)
def test_spec_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RenderSpec(**kwargs)  # type: ignore[arg-type]


def test_png_round_trip() -> None:
    rng = np.random.default_rng(4)
    colour = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(encode_png(colour)), colour)
    grey = np.repeat(rng.integers(0, 256, size=(20, 30, 1), dtype=np.uint8), 3, axis=2)
    data = encode_png(grey)
    assert Image.open(io.BytesIO(data)).mode == "L"  # grey is stored with one channel
    np.testing.assert_array_equal(decode_png(data), grey)
    assert decode_png(data, size=8).shape == (8, 8, 3)


def test_decode_any_mode_and_corrupt_bytes() -> None:
    rgba = np.zeros((6, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 17
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
    out = decode_png(buffer.getvalue())
    assert out.shape == (6, 5, 3)
    assert (out[..., 0] == 200).all()
    assert (out[..., 1:] == 0).all()
    with pytest.raises(ValueError, match="cannot decode"):
        decode_png(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="cannot decode"):
        decode_png(encode_png(rgba[..., :3])[:40])


def test_contact_sheet(tmp_path: Path) -> None:
    spec = RenderSpec(azimuths=(0.0, 90.0, 180.0), size=32)
    rows = [
        list(render_views(sphere(500), spec)),
        list(render_views(box_surface(500, (1.0, 0.3, 0.3)), spec)),
    ]
    path = tmp_path / "sheet.png"
    contact_sheet(rows, path, labels=["sphere", "box"])
    sheet = np.asarray(Image.open(path).convert("RGB"))
    assert sheet.shape[0] == 2 * 32 + 3 * SHEET_GAP
    unlabelled = tmp_path / "plain.png"
    contact_sheet(rows, unlabelled)
    plain = np.asarray(Image.open(unlabelled).convert("RGB"))
    assert plain.shape[1] == SHEET_GAP + 3 * (32 + SHEET_GAP)
    assert sheet.shape[1] > plain.shape[1]  # room for the labels
    label_w = sheet.shape[1] - plain.shape[1]
    # The renders are there (bright object pixels right of the labels) and the labels are drawn (dark text).
    assert (sheet[:, label_w:].max(axis=-1) > 150).sum() > 200  # brighter than the grey gaps
    assert (sheet[:, :label_w].max(axis=-1) < 100).any()
    np.testing.assert_array_equal(plain[SHEET_GAP : SHEET_GAP + 32, SHEET_GAP : SHEET_GAP + 32], rows[0][0])
    with pytest.raises(ValueError, match="labels"):
        contact_sheet(rows, path, labels=["one"])


def bomb_png(side: int) -> bytes:
    """A real grayscale PNG of ``side`` x ``side`` zero pixels: tiny on disk, huge once decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    squeeze = zlib.compressobj(1)
    row = bytes(side + 1)  # filter byte 0, then the row
    idat = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decode_png_refuses_a_decompression_bomb_from_its_header(recwarn: pytest.WarningsRecorder) -> None:
    """A 13000x13000 PNG (169 M pixels from a small file) is refused by its size, never decoded."""
    import tracemalloc

    from crossmoco_ray.data.render.splat import MAX_VIEW_PIXELS, check_view_size

    data = bomb_png(13000)
    assert len(data) < 1024**2
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="13000x13000 pixels is over the limit"):
            decode_png(data)
        with pytest.raises(ValueError, match="13000x13000 pixels"):
            check_view_size(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024**2  # decoding would take 169 MB
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    # The limit itself: 4096 x 4096 is a view, one more row is not.
    assert MAX_VIEW_PIXELS == 4096 * 4096
    check_view_size(encode_png(np.zeros((16, 16), np.uint8)))
    check_view_size(b"not an image")  # left to decode_png, which names it


def test_decode_png_at_the_pixel_limit() -> None:
    img = np.zeros((4096, 4096), np.uint8)
    assert decode_png(encode_png(img)).shape == (4096, 4096, 3)
    with pytest.raises(ValueError, match="4097x4096 pixels"):
        decode_png(encode_png(np.zeros((4096, 4097), np.uint8)))
