"""Part segmentation data and metrics: ShapeNetPart's h5 layout, a built-in synthetic part set, and the
instance and class mIoU of the papers.

**ShapeNetPart** (``shapenet_part_seg_hdf5_data``): files whose names hold ``train``, ``val`` or ``test``,
each with ``data`` [M, 2048, 3], ``label`` [M, 1] (category, 16) and ``pid`` [M, 2048] (part, 50). The
training split is train + val ("trainval"), as CrossPoint and DGCNN train. A category's parts are a
contiguous range of part ids (:data:`SHAPENET_PART_COUNTS`).

**Synthetic parts**: procedural objects whose surface points carry the part they were drawn on (tables:
top, legs; lamps: base, pole, shade; mugs: body, handle; chairs: seat, back, legs), random proportions, noise,
unit sphere, written in the same h5 layout with ``parts.json`` naming the categories and their part ranges.

**mIoU** (DGCNN's ``calculate_shape_IoU``): per shape, the IoU of every part of its category between
prediction and truth (a part absent from both counts as 1), averaged over those parts; **instance mIoU**
= the mean over shapes, **class mIoU** = the mean over categories of their shapes' mean.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import h5py
import numpy as np

from crossmoco_ray.data.synthetic.shapes import disk, tube
from crossmoco_ray.errors import DataError

SHAPENET_CATEGORIES = (
    "airplane", "bag", "cap", "car", "chair", "earphone", "guitar", "knife",
    "lamp", "laptop", "motorbike", "mug", "pistol", "rocket", "skateboard", "table",
)  # fmt: skip
SHAPENET_PART_COUNTS = (4, 2, 2, 4, 4, 3, 3, 2, 4, 2, 6, 2, 3, 3, 3, 3)
PARTS_FILE = "parts.json"


@dataclass
class PartSplit:
    """``points`` [M, N, 3] float32, ``category`` [M] int64, ``parts`` [M, N] int64 (global part ids)."""

    points: np.ndarray
    category: np.ndarray
    parts: np.ndarray
    name: str


@dataclass(frozen=True)
class PartScheme:
    """Categories and the contiguous range of global part ids each owns."""

    categories: tuple[str, ...]
    part_counts: tuple[int, ...]

    @property
    def num_parts(self) -> int:
        return sum(self.part_counts)

    def parts_of(self, category: int) -> np.ndarray:
        start = sum(self.part_counts[:category])
        return np.arange(start, start + self.part_counts[category])


SHAPENET_PART = PartScheme(SHAPENET_CATEGORIES, SHAPENET_PART_COUNTS)


# --------------------------------------------------------------------------------------------------
# mIoU
# --------------------------------------------------------------------------------------------------


def shape_ious(pred: np.ndarray, parts: np.ndarray, category: np.ndarray, scheme: PartScheme) -> np.ndarray:
    """Per-shape mean IoU over its category's parts: ``pred``, ``parts`` [M, N], ``category`` [M] → [M]."""
    out = np.empty(len(category), np.float64)
    for i, c in enumerate(category.tolist()):
        ious = []
        for p in scheme.parts_of(int(c)).tolist():
            inter = np.sum((pred[i] == p) & (parts[i] == p))
            union = np.sum((pred[i] == p) | (parts[i] == p))
            ious.append(1.0 if union == 0 else inter / union)
        out[i] = np.mean(ious)
    return out


def miou(ious: np.ndarray, category: np.ndarray) -> tuple[float, float]:
    """(instance mIoU, class mIoU) from per-shape IoUs."""
    if len(ious) == 0:
        return float("nan"), float("nan")
    per_class = [float(ious[category == c].mean()) for c in np.unique(category)]
    return float(ious.mean()), float(np.mean(per_class))


# --------------------------------------------------------------------------------------------------
# ShapeNetPart h5 (and the synthetic set in the same layout)
# --------------------------------------------------------------------------------------------------


def _files(root: Path, word: str) -> list[Path]:
    return sorted(p for p in root.glob("*.h5") if word in p.name)


def part_scheme(root: str | Path) -> PartScheme:
    """ShapeNetPart's, or the one ``parts.json`` beside the files names."""
    spec = Path(root) / PARTS_FILE
    if spec.is_file():
        meta = json.loads(spec.read_text())
        return PartScheme(tuple(meta["categories"]), tuple(int(n) for n in meta["part_counts"]))
    return SHAPENET_PART


def load_part_split(root: str | Path, split: str, scheme: PartScheme) -> PartSplit:
    """``trainval`` (train + val files) or ``test`` of a ShapeNetPart-layout folder, checked."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            str(root), "not a directory of ShapeNetPart h5 files (*train*.h5, *val*.h5, *test*.h5)"
        )
    files = _files(root, "train") + _files(root, "val") if split == "trainval" else _files(root, split)
    if not files:
        raise DataError(str(root), f"no h5 files for {split!r} (names holding 'train'/'val' or 'test')")
    points, category, parts = [], [], []
    for path in files:
        try:
            with h5py.File(path, "r") as f:
                missing = [k for k in ("data", "label", "pid") if k not in f]
                if missing:
                    raise DataError(str(path), f"missing datasets {missing} (ShapeNetPart: data, label, pid)")
                points.append(np.asarray(f["data"], np.float32))
                category.append(np.asarray(f["label"]).reshape(-1).astype(np.int64))
                parts.append(np.asarray(f["pid"]).astype(np.int64))
        except OSError as err:
            raise DataError(str(path), f"not a readable h5 file ({err})") from err
    out = PartSplit(np.concatenate(points), np.concatenate(category), np.concatenate(parts), split)
    _check(out, scheme, str(root))
    return out


def _check(split: PartSplit, scheme: PartScheme, where: str) -> None:
    if split.parts.shape != split.points.shape[:2]:
        raise DataError(where, f"pid {split.parts.shape} does not match data {split.points.shape[:2]}")
    if split.category.min() < 0 or split.category.max() >= len(scheme.categories):
        raise DataError(where, f"categories outside 0..{len(scheme.categories) - 1}")
    starts = np.cumsum((0, *scheme.part_counts))
    lo, hi = starts[split.category], starts[split.category + 1]
    bad = np.nonzero(((split.parts < lo[:, None]) | (split.parts >= hi[:, None])).any(axis=1))[0]
    if len(bad):
        raise DataError(where, f"{len(bad)} shapes have part ids outside their category's range", int(bad[0]))


# --------------------------------------------------------------------------------------------------
# The synthetic part set
# --------------------------------------------------------------------------------------------------


def _box(k: int, rng: np.random.Generator, centre: Sequence[float], size: Sequence[float]) -> np.ndarray:
    """``[k, 3]`` points uniform on the surface of an axis-aligned box."""
    sx, sy, sz = size
    areas = np.array([sy * sz, sy * sz, sx * sz, sx * sz, sx * sy, sx * sy])
    face = rng.choice(6, size=k, p=areas / areas.sum())
    u = rng.uniform(-0.5, 0.5, size=(k, 3)) * np.array(size)
    axis, sign = face // 2, np.where(face % 2 == 0, -0.5, 0.5)
    u[np.arange(k), axis] = sign * np.array(size)[axis]
    return u + np.asarray(centre)


Part = tuple[float, Callable[[int], np.ndarray]]  # (area, sampler)


def _legs(rng: np.random.Generator, w: float, d: float, h: float, leg: float) -> list[Part]:
    """Four square legs of height ``h`` under the corners of a ``w`` × ``d`` top."""
    corners = [(x, z) for x in (-w / 2 + leg, w / 2 - leg) for z in (-d / 2 + leg, d / 2 - leg)]
    return [
        (4 * leg * h, partial(_box, rng=rng, centre=(x, h / 2, z), size=(leg, h, leg))) for x, z in corners
    ]


def _table(rng: np.random.Generator) -> list[list[Part]]:
    w, d, h, t, leg = rng.uniform(1.2, 2.0), rng.uniform(0.7, 1.2), rng.uniform(0.6, 1.0), 0.06, 0.07
    top = [(2 * w * d, lambda k: _box(k, rng, (0, h, 0), (w, t, d)))]
    legs = _legs(rng, w, d, h, leg)
    return [top, legs]


def _lamp(rng: np.random.Generator) -> list[list[Part]]:
    rb, h, rs = rng.uniform(0.3, 0.5), rng.uniform(1.0, 1.6), rng.uniform(0.35, 0.6)
    base = [(np.pi * rb**2, lambda k: disk(k, rng, 0, rb, 0.0))]
    pole = [(2 * np.pi * 0.03 * h, lambda k: tube(k, rng, 0.03, 0.0, h))]
    shade = [(2 * np.pi * rs * 0.4, lambda k: tube(k, rng, rs, h - 0.1, h + 0.3))]
    return [base, pole, shade]


def _mug(rng: np.random.Generator) -> list[list[Part]]:
    r, h = rng.uniform(0.35, 0.5), rng.uniform(0.7, 1.1)
    body = [
        (2 * np.pi * r * h, lambda k: tube(k, rng, r, 0.0, h)),
        (np.pi * r**2, lambda k: disk(k, rng, 0, r, 0)),
    ]

    def handle(k: int) -> np.ndarray:
        t = rng.uniform(-np.pi / 2, np.pi / 2, k)
        a, s = rng.uniform(0, 2 * np.pi, k), 0.04
        R = h / 3
        x = r + R * np.cos(t) + s * np.cos(a) * np.cos(t)
        y = h / 2 + R * np.sin(t) + s * np.cos(a) * np.sin(t)
        return np.stack([x, y, s * np.sin(a)], axis=1)

    return [body, [(np.pi * h / 3 * 2 * np.pi * 0.04, handle)]]


def _chair(rng: np.random.Generator) -> list[list[Part]]:
    w, h, b, leg = rng.uniform(0.8, 1.1), rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.3), 0.06
    seat = [(2 * w * w, lambda k: _box(k, rng, (0, h, 0), (w, 0.08, w)))]
    back = [(2 * w * b, lambda k: _box(k, rng, (0, h + b / 2, -w / 2), (w, b, 0.08)))]
    legs = _legs(rng, w, w, h, leg)
    return [seat, back, legs]


SYNTHETIC_OBJECTS: dict[str, Callable[[np.random.Generator], list[list[Part]]]] = {
    "table": _table, "lamp": _lamp, "mug": _mug, "chair": _chair,
}  # fmt: skip
SYNTHETIC_PARTS = PartScheme(tuple(SYNTHETIC_OBJECTS), (2, 3, 2, 3))


def synthetic_part_shape(category: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` surface points of a random object of ``category`` and their global part ids, unit sphere."""
    name = SYNTHETIC_PARTS.categories[category]
    groups = SYNTHETIC_OBJECTS[name](rng)
    first = int(SYNTHETIC_PARTS.parts_of(category)[0])
    pieces = [(area, sampler, first + g) for g, group in enumerate(groups) for area, sampler in group]
    areas = np.array([a for a, _, _ in pieces])
    counts = rng.multinomial(n, areas / areas.sum())
    pts = np.concatenate([s(int(c)) for (_, s, _), c in zip(pieces, counts, strict=True)])
    pid = np.concatenate([np.full(int(c), p) for (_, _, p), c in zip(pieces, counts, strict=True)])
    pts = pts + rng.normal(scale=0.01, size=pts.shape)
    order = rng.permutation(n)
    pts, pid = pts[order] - pts.mean(axis=0), pid[order]
    return (pts / np.linalg.norm(pts, axis=1).max()).astype(np.float32), pid.astype(np.int64)


def write_synthetic_parts(root: str | Path, n_train: int = 400, n_test: int = 100, points: int = 512,
                          seed: int = 0) -> Path:  # fmt: skip
    """The synthetic part set in ShapeNetPart's h5 layout (``train0.h5``, ``test0.h5``) + ``parts.json``;
    categories balanced and interleaved, every shape seeded by (seed, split, index)."""
    root = Path(root)
    if (root / PARTS_FILE).is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        cats = np.arange(n) % len(SYNTHETIC_PARTS.categories)
        shapes = [synthetic_part_shape(int(c), points, np.random.default_rng([seed, len(split), i]))
                  for i, c in enumerate(cats)]  # fmt: skip
        tmp = root / f".{split}0.h5.tmp"
        with h5py.File(tmp, "w") as f:
            f["data"] = np.stack([s[0] for s in shapes])
            f["label"] = cats.reshape(-1, 1).astype(np.int64)
            f["pid"] = np.stack([s[1] for s in shapes])
        tmp.replace(root / f"{split}0.h5")
    meta = {"categories": list(SYNTHETIC_PARTS.categories), "part_counts": list(SYNTHETIC_PARTS.part_counts)}
    (root / PARTS_FILE).write_text(json.dumps(meta, indent=1))
    return root
