"""Multi-view images of a point cloud by z-buffered splatting: the image modality of sources without images.

Three looks: ``depth`` (the default; grey, nearer is brighter), ``shaded`` (splats lit like surfaces, by
normals estimated from the points, :func:`.raster.estimate_normals`, with the lighting of the mesh renderer
:func:`.raster.render_mesh`) and ``coords`` (RGB = normalised coordinates).

The renderer is deterministic (no randomness: the same cloud gives bitwise the same views) and vectorised:
every (view, point, splat pixel) triple is projected at once and the z-buffer keeps the nearest one per
pixel through a sort, with no Python loop over points. The cloud is centred and scaled to unit radius
first, so position and scale of the input do not change the images.

The cameras (:mod:`.camera`) are the mesh renderer's: the same object gives the same framing either way.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from crossmoco_ray.data.render.camera import TO_Y_UP, RenderSpec, camera_rotations, normalise
from crossmoco_ray.data.render.raster import SHADE_RANGE, estimate_normals, intensity

__all__ = [
    "COORD_RANGE",
    "DEPTH_RANGE",
    "MAX_VIEW_PIXELS",
    "SHADE_RANGE",
    "RenderSpec",
    "check_view_size",
    "contact_sheet",
    "decode_png",
    "encode_png",
    "normalise",
    "render_views",
]

DEPTH_RANGE = (60, 255)  # grey of the farthest / nearest possible point; 0 stays the background
COORD_RANGE = (40, 255)  # channel value of normalised coordinate -1 / +1 in "coords" mode
# The most pixels an encoded view may decode to: 4096 x 4096 (renders are at most 4096 px a side,
# ShapeNetRendering's views 137 x 137). A small file can claim far more (a 164 KB PNG decodes to 169 M
# pixels), so the size in the header is checked before any pixel is decoded.
MAX_VIEW_PIXELS = 4096 * 4096
SHEET_GAP = 2  # pixels between the tiles of a contact sheet


def render_views(points: np.ndarray, spec: RenderSpec | None = None) -> np.ndarray:
    """Render a point cloud from every view of ``spec``.

    Args:
        points: ``[N, 3]`` positions, any real dtype, any position and scale.
        spec: the views and the look.

    Returns:
        ``[V, size, size, 3]`` uint8 with ``V = spec.num_views`` (elevation-major, then azimuth); the
        background is 0, object pixels are in ``SHADE_RANGE`` (shaded), ``DEPTH_RANGE`` (depth) or
        ``COORD_RANGE`` (coords).
    """
    spec = spec or RenderSpec()
    pts = normalise(points)
    V, S, k = spec.num_views, spec.size, spec.point_size
    images = np.zeros((V, S, S, 3), dtype=np.uint8)
    if len(pts) == 0:
        return images
    cam = np.einsum("vij,nj->vni", camera_rotations(spec), pts)  # [V, N, 3]: right, up, towards camera

    # Continuous pixel coordinates (the unit sphere spans FILL of the side, centred); a splat of side k
    # covers the k pixels whose centres are nearest the point along each axis.
    scale = spec.pixels_per_unit()
    col0 = np.floor(S / 2 + cam[..., 0] * scale - (k - 1) / 2).astype(np.int64)  # [V, N]
    row0 = np.floor(S / 2 - cam[..., 1] * scale - (k - 1) / 2).astype(np.int64)
    depth = cam[..., 2]  # larger is nearer

    # Sort the points of each view nearest first; then offsets of one point share its place in the order.
    order = np.argsort(-depth, axis=1, kind="stable")  # [V, N]
    col0 = np.take_along_axis(col0, order, axis=1)
    row0 = np.take_along_axis(row0, order, axis=1)
    offsets = np.arange(k)
    rows = (row0[:, :, None, None] + offsets[:, None]).astype(np.int64)  # [V, N, k, 1]
    cols = (col0[:, :, None, None] + offsets[None, :]).astype(np.int64)  # [V, N, 1, k]
    rows, cols = np.broadcast_arrays(rows, cols)  # [V, N, k, k]
    views = np.broadcast_to(np.arange(V)[:, None, None, None], rows.shape)
    points_sorted = np.broadcast_to(order[:, :, None, None], rows.shape)
    inside = (rows >= 0) & (rows < S) & (cols >= 0) & (cols < S)
    pixel = (views * S + rows) * S + cols
    pixel, source = pixel[inside], (views * len(pts) + points_sorted)[inside]  # view-major, nearest first

    # z-buffer: a stable sort by pixel keeps the nearest-first order inside each pixel, so the first entry
    # of every run of equal pixels is the visible point.
    by_pixel = np.argsort(pixel, kind="stable")
    pixel, source = pixel[by_pixel], source[by_pixel]
    first = np.ones(len(pixel), dtype=bool)
    first[1:] = pixel[1:] != pixel[:-1]
    pixel, source = pixel[first], source[first]

    if spec.mode == "shaded":
        normals = estimate_normals(pts, spec.normal_neighbours)  # [N, 3], data frame
        normals_cam = np.einsum("vij,nj->vni", camera_rotations(spec), normals)  # [V, N, 3]
        grey = intensity(normals_cam.reshape(-1, 3)[source], spec)
        colour = np.repeat(grey[:, None], 3, axis=1)
    elif spec.mode == "depth":
        lo, hi = DEPTH_RANGE
        d = depth.reshape(-1)[source]  # in [-1, 1] because the cloud has unit radius
        grey = np.rint(lo + (d + 1) / 2 * (hi - lo)).clip(lo, hi).astype(np.uint8)
        colour = np.repeat(grey[:, None], 3, axis=1)
    else:
        lo, hi = COORD_RANGE
        xyz = (pts @ TO_Y_UP[spec.up_axis].T)[source % len(pts)]
        colour = np.rint(lo + (xyz + 1) / 2 * (hi - lo)).clip(lo, hi).astype(np.uint8)
    images.reshape(-1, 3)[pixel] = colour
    return images


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an ``[H, W, 3]`` or ``[H, W]`` uint8 image; grey RGB is stored with one channel."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"encode_png needs an [H, W, 3] or [H, W] uint8 image, got {img.shape} {img.dtype}")
    if img.ndim == 3 and (img[..., 0] == img[..., 1]).all() and (img[..., 0] == img[..., 2]).all():
        img = img[..., 0]  # depth renders are grey: a third of the raw size, decoded back to RGB
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes, size: int | None = None) -> np.ndarray:
    """Decode image bytes (PNG, or any format Pillow reads) to ``[H, W, 3]`` uint8 RGB.

    Any mode is converted (grey is repeated, palette expanded, alpha dropped, 16-bit scaled to 8);
    with ``size`` the image is resized to ``[size, size]`` (bilinear). The size in the header is checked
    first: an image of more than :data:`MAX_VIEW_PIXELS` pixels is refused without being decoded.

    Raises:
        ValueError: the bytes are not a decodable image, or one too large to be a view.
    """
    with _open_view(data) as opened:
        try:
            opened.load()
            img = _to_rgb(opened)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot decode image ({type(e).__name__}: {e})") from None
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).copy()


def check_view_size(data: bytes) -> None:
    """Refuse encoded image bytes whose header declares more than :data:`MAX_VIEW_PIXELS` pixels, reading
    the header only (no pixel is decoded). Bytes that are not an image are left to :func:`decode_png`.

    Raises:
        ValueError: the image is too large to be a view (the message gives its size).
    """
    try:
        img = _open_lazily(data)
    except ValueError:
        return
    with img:
        _check_size(img)


def _open_view(data: bytes) -> Image.Image:
    """The lazily opened image (header read, no pixel decoded) once its size is known to be a view's."""
    img = _open_lazily(data)
    try:
        _check_size(img)
    except ValueError:
        img.close()
        raise
    return img


def _open_lazily(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns past 89 M pixels; MAX_VIEW_PIXELS is far lower and names the image instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image ({type(e).__name__}: {e})") from None


def _check_size(img: Image.Image) -> None:
    width, height = img.size
    if width * height > MAX_VIEW_PIXELS:
        raise ValueError(
            f"image of {width}x{height} pixels is over the limit of {MAX_VIEW_PIXELS} (4096x4096): not a view"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey (Pillow opens it as I;16 or I): keep the high byte; Pillow's own convert clips.
        grey = (np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")  # RGBA/LA/P/L/CMYK...: alpha dropped, palette expanded


def contact_sheet(
    rows: Sequence[Sequence[np.ndarray]], path: str | Path, labels: Sequence[str] | None = None
) -> None:
    """Write a PNG grid of images for a person to check: one row per object, one column per view.

    Args:
        rows: ``rows[r][c]`` is an ``[H, W, 3]`` or ``[H, W]`` uint8 image; rows may differ in length
            and images in size (each cell is as large as the largest image).
        path: the PNG file to write.
        labels: one text per row, drawn at the left of the row.
    """
    if not rows or not any(len(r) for r in rows):
        raise ValueError("contact_sheet needs at least one image")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"contact_sheet got {len(labels)} labels for {len(rows)} rows")
    tiles = [[_as_rgb_array(image) for image in row] for row in rows]
    tile_h = max(t.shape[0] for row in tiles for t in row)
    tile_w = max(t.shape[1] for row in tiles for t in row)
    gap, columns = SHEET_GAP, max(len(row) for row in tiles)

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0
    if labels is not None:
        label_w = max(int(np.ceil(probe.textbbox((0, 0), str(t), font=font)[2])) for t in labels) + 2 * gap

    width = label_w + gap + columns * (tile_w + gap)
    height = gap + len(tiles) * (tile_h + gap)
    # Mid grey between tiles so both the black backgrounds of renders and the tiles' edges show.
    sheet = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(tiles):
        top = gap + r * (tile_h + gap)
        if labels is not None:
            draw.rectangle((0, top, label_w - 1, top + tile_h - 1), fill=(255, 255, 255))
            box = draw.textbbox((0, 0), str(labels[r]), font=font)
            # Centred vertically by the text's box (anchors are not available for bitmap fonts).
            y = top + (tile_h - (box[3] - box[1])) // 2 - box[1]
            draw.text((gap, y), str(labels[r]), fill=(0, 0, 0), font=font)
        for c, tile in enumerate(row):
            sheet.paste(Image.fromarray(tile), (label_w + gap + c * (tile_w + gap), top))
    sheet.save(Path(path), format="PNG")


def _as_rgb_array(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"contact_sheet needs uint8 images, got {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"contact_sheet needs [H, W, 3] or [H, W] images, got {img.shape}")
    return np.ascontiguousarray(img)
