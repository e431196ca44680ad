"""Augmentations keep shapes and their statistics match their parameters; ColorJitter matches torchvision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from crossmoco_ray.data.pipeline.augment import (
    ImageAugment,
    PointAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    augment_images,
    augment_points,
    normalize_unit_sphere,
)

OFF = dict(
    normalize=False,
    scale_low=1.0,
    scale_high=1.0,
    rotate=False,
    translate=0.0,
    jitter_std=0.0,
    dropout_max=0.0,
)


def clouds(b: int = 64, n: int = 256, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, n, 3)) * [1.0, 2.0, 0.5] + rng.normal(size=(b, 1, 3))).astype(np.float32)


def test_default_pipeline_keeps_shape_and_dtype() -> None:
    out = augment_points(clouds(), np.random.default_rng(0))
    assert out.shape == (64, 256, 3)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


def test_normalize_gives_centred_unit_sphere() -> None:
    x = normalize_unit_sphere(clouds())
    np.testing.assert_allclose(x.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(x, axis=2).max(axis=1), 1.0, rtol=1e-5)


def test_scale_is_isotropic_uniform_between_bounds() -> None:
    x = normalize_unit_sphere(clouds(b=4000, n=32))
    out = augment_points(
        x, np.random.default_rng(1), PointAugment(**{**OFF, "scale_low": 0.5, "scale_high": 2.0})
    )
    ratio = np.linalg.norm(out, axis=2).max(axis=1)  # radius was 1
    assert ratio.min() >= 0.5 - 1e-5
    assert ratio.max() <= 2.0 + 1e-5
    assert ratio.mean() == pytest.approx(1.25, abs=0.03)
    np.testing.assert_allclose(out / ratio[:, None, None], x, atol=1e-5)  # one factor per cloud


def test_rotation_is_about_the_up_axis() -> None:
    x = clouds()
    out = augment_points(x, np.random.default_rng(2), PointAugment(**{**OFF, "rotate": True}))
    np.testing.assert_allclose(out[..., 1], x[..., 1], atol=1e-5)  # y unchanged
    np.testing.assert_allclose(np.linalg.norm(out, axis=2), np.linalg.norm(x, axis=2), rtol=1e-5)
    angles = np.arctan2(out[:, 0, 2], out[:, 0, 0]) - np.arctan2(x[:, 0, 2], x[:, 0, 0])
    assert np.ptp(np.mod(angles, 2 * np.pi)) > 5.0  # angles spread over the circle


def test_translation_is_within_half_the_extent_per_axis() -> None:
    x = clouds(b=2000)
    out = augment_points(x, np.random.default_rng(3), PointAugment(**{**OFF, "translate": 0.5}))
    shift = (out - x)[:, 0, :]
    np.testing.assert_allclose(out - x, np.broadcast_to(shift[:, None, :], x.shape), atol=1e-5)  # rigid
    extent = x.max(axis=1) - x.min(axis=1)
    rel = shift / extent
    assert np.abs(rel).max() <= 0.5 + 1e-5
    assert np.abs(rel).mean() == pytest.approx(0.25, abs=0.02)  # U(-0.5, 0.5)


def test_jitter_std_and_clip() -> None:
    x = clouds()
    p = PointAugment(**{**OFF, "jitter_std": 0.01, "jitter_clip": 0.05})
    noise = augment_points(x, np.random.default_rng(4), p) - x
    assert noise.std() == pytest.approx(0.01, rel=0.05)
    assert np.abs(noise).max() <= 0.05 + 1e-6
    big = augment_points(
        x, np.random.default_rng(4), PointAugment(**{**OFF, "jitter_std": 1.0, "jitter_clip": 0.05})
    )
    assert np.abs(big - x).max() == pytest.approx(0.05, abs=1e-5)


def test_input_dropout_replaces_points_by_the_first_point() -> None:
    x = clouds(b=1000, n=200)
    out = augment_points(x, np.random.default_rng(5), PointAugment(**{**OFF, "dropout_max": 0.875}))
    dropped = np.all(out == out[:, :1, :], axis=2) & ~np.all(x == x[:, :1, :], axis=2)
    frac = dropped.mean(axis=1)
    assert frac.max() <= 0.875 + 0.1
    assert frac.mean() == pytest.approx(0.875 / 2, abs=0.03)  # ratio ~ U(0, 0.875)
    kept = ~dropped
    assert np.array_equal(out[kept], x[kept])


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ],
)
def test_color_adjustments_match_torchvision(ours, theirs) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(6)
    images = rng.random((5, 8, 9, 3), dtype=np.float32)
    factors = np.array([0.6, 0.9, 1.0, 1.2, 1.4], dtype=np.float32)
    got = ours(images, factors)
    for i in range(5):
        ref = theirs(torch.from_numpy(images[i]).permute(2, 0, 1), float(factors[i])).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got[i], ref, atol=1e-5)


def test_augment_images_flips_half_and_stays_uint8() -> None:
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(400, 6, 6, 3), dtype=np.uint8)
    no_jitter = ImageAugment(brightness=0.0, contrast=0.0, saturation=0.0, hflip=0.5)
    out = augment_images(images, np.random.default_rng(8), no_jitter)
    assert out.shape == (400, 6, 6, 3)
    assert out.dtype == np.uint8
    same = (out == images).all(axis=(1, 2, 3))
    flipped = (out == images[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (same | flipped).all()
    assert flipped.mean() == pytest.approx(0.5, abs=0.08)


def test_color_jitter_factors_vary_per_image_within_range() -> None:
    grey = np.full((300, 4, 4, 3), 128, dtype=np.uint8)
    p = ImageAugment(brightness=0.4, contrast=0.0, saturation=0.0, hflip=0.0)
    out = augment_images(grey, np.random.default_rng(9), p)
    factors = out[:, 0, 0, 0] / 128
    assert factors.min() >= 0.6 - 0.01
    assert factors.max() <= 1.4 + 0.01
    assert factors.std() > 0.15
