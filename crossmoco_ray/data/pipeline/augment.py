"""CrossPoint's augmentations (METHOD.md §1.9), vectorised over a batch with numpy.

Points, in CrossPoint's order: unit-sphere normalisation → isotropic scale U(lo, hi) → rotation about the
up (y) axis by U(0, 2π) → per-axis translation U(−t, t) × that axis's extent → Gaussian jitter clipped at
±clip → random input dropout (ratio U(0, max); dropped points become the first point, so N is kept).
Every random draw is per cloud, as if each cloud went through CrossPoint's per-sample transforms.

Images: ``ColorJitter(brightness, contrast, saturation)`` with torchvision's semantics (factors
U(max(0, 1−x), 1+x), applied in a random order per image) → 8-bit → horizontal flip. The resize happens
at decode time; ``ToTensor`` and the ImageNet normalisation in the training step
(``crossmoco_ray.nn.image.images_to_tensor``, in the image encoders).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

GRAY = np.array([0.2989, 0.587, 0.114], dtype=np.float32)  # torchvision's rgb_to_grayscale weights


@dataclass(frozen=True)
class PointAugment:
    normalize: bool = True
    scale_low: float = 0.5
    scale_high: float = 2.0
    rotate: bool = True
    translate: float = 0.5
    jitter_std: float = 0.01
    jitter_clip: float = 0.05
    dropout_max: float = 0.875


@dataclass(frozen=True)
class ImageAugment:
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hflip: float = 0.5


def normalize_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Centre each cloud ``[B, N, 3]`` at its centroid and scale it to unit max radius."""
    x = points - points.mean(axis=1, keepdims=True)
    radius = np.linalg.norm(x, axis=2).max(axis=1)
    return x / np.maximum(radius, 1e-12)[:, None, None]


def rotation_about_y(angles: np.ndarray) -> np.ndarray:
    """Rotation matrices ``[B, 3, 3]`` about the y axis by ``angles`` [B] (radians)."""
    c, s = np.cos(angles), np.sin(angles)
    zeros, ones = np.zeros_like(c), np.ones_like(c)
    return np.stack(
        [np.stack([c, zeros, s], -1), np.stack([zeros, ones, zeros], -1), np.stack([-s, zeros, c], -1)],
        axis=1,
    )


def augment_points(
    points: np.ndarray, rng: np.random.Generator, p: PointAugment = PointAugment()
) -> np.ndarray:
    """One random CrossPoint augmentation per cloud: ``[B, N, 3]`` → ``[B, N, 3]`` float32."""
    x = points.astype(np.float32, copy=True)
    B, N, _ = x.shape
    if p.normalize:
        x = normalize_unit_sphere(x)
    x = x * rng.uniform(p.scale_low, p.scale_high, size=(B, 1, 1)).astype(np.float32)
    if p.rotate:
        R = rotation_about_y(np.asarray(rng.uniform(0.0, 2.0 * np.pi, size=B))).astype(np.float32)
        x = x @ R.transpose(0, 2, 1)  # points @ Rᵀ, as CrossPoint
    if p.translate > 0:
        extent = x.max(axis=1) - x.min(axis=1)  # [B, 3]
        x = x + (rng.uniform(-p.translate, p.translate, size=(B, 3)) * extent)[:, None, :].astype(np.float32)
    if p.jitter_std > 0:
        noise = rng.normal(0.0, p.jitter_std, size=x.shape).astype(np.float32)
        x = x + np.clip(noise, -p.jitter_clip, p.jitter_clip)
    if p.dropout_max > 0:
        ratio = rng.uniform(0.0, p.dropout_max, size=(B, 1))
        drop = rng.random((B, N)) <= ratio
        x = np.where(drop[..., None], x[:, :1, :], x)
    return x.astype(np.float32, copy=False)


def _blend(img: np.ndarray, other: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """torchvision's ``_blend``: ``clip(f·img + (1−f)·other, 0, 1)`` with a factor per image."""
    f = factor[:, None, None, None]
    return np.clip(f * img + (1.0 - f) * other, 0.0, 1.0)


def adjust_brightness(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``[M, H, W, 3]`` in [0, 1], one factor per image (torchvision ``adjust_brightness``)."""
    return _blend(x, np.zeros_like(x[:1]), factor)


def adjust_contrast(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Blend with the image's mean grey level (torchvision ``adjust_contrast``)."""
    return _blend(x, (x @ GRAY).mean(axis=(1, 2))[:, None, None, None], factor)


def adjust_saturation(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Blend with the image's greyscale version (torchvision ``adjust_saturation``)."""
    return _blend(x, (x @ GRAY)[..., None], factor)


ADJUSTMENTS = {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation}


def color_jitter(
    images: np.ndarray, rng: np.random.Generator, p: ImageAugment = ImageAugment()
) -> np.ndarray:
    """``ColorJitter`` on ``[M, H, W, 3]`` floats in [0, 1], factors and order random per image."""
    M = images.shape[0]
    strengths = {"brightness": p.brightness, "contrast": p.contrast, "saturation": p.saturation}
    factors = {
        name: np.asarray(rng.uniform(max(0.0, 1.0 - s), 1.0 + s, size=M), dtype=np.float32)
        for name, s in strengths.items()
        if s > 0
    }
    orders = list(itertools.permutations(factors))
    choice = rng.integers(len(orders), size=M)
    out = images.copy()
    for o, order in enumerate(orders):
        sel = np.flatnonzero(choice == o)
        if sel.size:
            x = out[sel]
            for name in order:
                x = ADJUSTMENTS[name](x, factors[name][sel])
            out[sel] = x
    return out


def augment_images(
    images: np.ndarray, rng: np.random.Generator, p: ImageAugment = ImageAugment()
) -> np.ndarray:
    """ColorJitter then horizontal flip on resized ``[M, H, W, 3]`` uint8 images → uint8, same shape.

    As in CrossPoint, the jitter's result is an 8-bit image (there it is a PIL image); ``ToTensor`` and
    the ImageNet normalisation happen where the batch becomes a tensor (the training step), which also
    keeps the pipeline's output 4× smaller than float32.
    """
    x = color_jitter(images.astype(np.float32) * np.float32(1.0 / 255.0), rng, p)
    out = np.rint(x * 255.0).astype(np.uint8)
    if p.hflip > 0:
        flip = rng.random(out.shape[0]) < p.hflip
        out[flip] = out[flip, :, ::-1]
    return out
