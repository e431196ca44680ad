"""A learnable labelled set in ModelNet40's h5 layout: synthetic shapes, stored class by class, in raw units
(millimetres), as users' files are."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from crossmoco_ray.data.synthetic.dataset import SHAPE_CLASSES, synthetic_samples


def class_sorted_shapes_h5(
    folder: Path, n_train: int = 120, n_test: int = 60, points: int = 128, classes: int = 6
) -> Path:
    """``train.h5`` / ``test.h5`` of ``classes`` synthetic shape classes, sorted by class, × 1000."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        kept = [s for s in synthetic_samples(n * len(SHAPE_CLASSES) // classes + 64, points, 0, split)]
        kept = [s for s in kept if s.label is not None and s.label < classes][:n]
        kept.sort(key=lambda s: int(s.label or 0))
        with h5py.File(folder / f"{split}.h5", "w") as f:
            f["data"] = 1000.0 * np.stack([s.points for s in kept]).astype(np.float32)
            f["label"] = np.array([[s.label] for s in kept], np.int64)
    (folder / "shape_names.txt").write_text("\n".join(SHAPE_CLASSES[:classes]) + "\n")
    return folder
