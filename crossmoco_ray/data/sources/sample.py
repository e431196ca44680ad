"""What every reader yields: one object as a :class:`Sample`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    """One object: an id, its points and, where the source has them, encoded views and a label.

    Attributes:
        id: unique within the dataset (e.g. ``"chair_0001"``, ``"03001627/1a2b3c"``).
        points: ``[N, 3]`` float32.
        views: encoded images (PNG/JPEG bytes) of the object, or ``None`` when they must be rendered.
        label: class index, or ``None`` for unlabelled sources.
        source: the file the sample came from (for error messages).
        index: position of the sample inside ``source`` (row of an h5 file; 0 for one-object files).
        split: the split it belongs to, when the source knows.
        mesh: ``(vertices [V, 3], faces [F, 3])`` in the same frame as ``points`` when the object is a
            triangle mesh (its points were sampled on it); its views are then rendered from the mesh.
    """

    id: str
    points: np.ndarray
    views: list[bytes] | None = None
    label: int | None = None
    source: str = ""
    index: int = 0
    split: str | None = field(default=None)
    mesh: tuple[np.ndarray, np.ndarray] | None = None
