"""What every reader implements: :class:`Source` (a dataset streamed split by split) and the up-axis frame.

Sources return points in the project's canonical frame, **y up**: a z-up source (``up_axis="z"``, e.g. the
raw ModelNet frame) is rotated on read by :func:`to_y_up`, so pretraining augmentation, rendering and
evaluation all agree on the up axis.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.errors import DataError

UpAxis = Literal["x", "y", "z"]

NAME_LIMIT = 200  # characters of a file name or of a library's message shown in an error (printable's)

# The largest coordinate magnitude a reader's points (or mesh vertices) may have. Training normalises clouds
# in float32: it centres them (a centred coordinate reaches 2·|x|) and divides by the largest norm, whose
# square sums three squares: 3·(2·1e18)² = 1.2e37, about 30 times below float32's 3.4e38. At ~5e18 the
# squares overflow to inf and the cloud normalises to zeros in training while evaluation (float64) still sees
# it; beyond ~1e19 triangle areas of meshes overflow too. No real object needs more than 1e18 units.
MAX_COORDINATE = 1e18


def decodable(path: Path, root: Path | None = None) -> bool:
    """Whether ``path`` (below ``root``, when given) is named in valid UTF-8, as dataset ids and class names
    must be (they are stored as Arrow strings and printed)."""
    part = str(path.relative_to(root)) if root is not None else str(path)
    try:
        part.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (after symlinks): not a directory, a FIFO that would block the
    reader forever, a device such as ``/dev/zero`` that never ends, or a broken or looping link."""
    try:
        return path.is_file()
    except OSError:
        return False


def to_y_up(points: np.ndarray, up_axis: UpAxis) -> np.ndarray:
    """Rotate ``[..., 3]`` points so that the source's ``up_axis`` becomes +y (right-handed)."""
    if up_axis == "y":
        return points
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    if up_axis == "z":  # rotate −90° about x: z → y, y → −z
        return np.stack([x, z, -y], axis=-1)
    return np.stack([-y, x, z], axis=-1)  # x up: rotate +90° about z: x → y, y → −x


class Source(ABC):
    """A dataset on disk (or generated) that can be streamed split by split."""

    format: str = ""

    @abstractmethod
    def splits(self) -> list[str]:
        """The splits this source holds, e.g. ``["train", "test"]``."""

    def samples(self, split: str) -> Iterator[Sample | DataError]:
        """Stream the samples of ``split``: by default, every task of :meth:`tasks` read in order.

        Bad input is *yielded* as a :class:`DataError` naming the file (and index) instead of raised, so a
        caller that skips bad samples can go on with the next file; callers that cannot skip raise it.
        A source implements this, or :meth:`tasks` and :meth:`read_task` (or all three).
        """
        for task in self.tasks(split):
            yield from self.read_task(split, task)

    def tasks(self, split: str) -> list[Any]:
        """Independent, picklable pieces of ``split`` (files, row ranges) that :meth:`read_task` reads.

        Reading every task in order yields exactly :meth:`samples`; ``prepare --ray`` spreads them over a
        cluster. The default is one task, the whole split (correct, but not parallel).
        """
        return [None]

    def read_task(self, split: str, task: Any) -> Iterator[Sample | DataError]:
        """The samples of one task of :meth:`tasks`, in order (bad input yielded as errors)."""
        if type(self).samples is Source.samples:  # the defaults would read each other forever
            raise NotImplementedError(f"{type(self).__name__} implements samples, or tasks and read_task")
        return self.samples(split)

    def class_names(self) -> list[str] | None:
        """Class names in label order, or ``None`` for unlabelled sources."""
        return None

    def count(self, split: str) -> int | None:
        """Number of samples in ``split`` when known without reading it all (for progress)."""
        return None

    def has_views(self) -> bool:
        """Whether samples carry their own images (otherwise they are rendered at prepare time)."""
        return False

    def has_meshes(self) -> bool:
        """Whether some samples carry a triangle mesh (their views are shaded renders of it)."""
        return False

    def identity(self) -> dict[str, Any]:
        """What identifies this source's content (files, sizes, times) for re-run detection."""
        return {"format": self.format}

    def label_hint(self) -> str:
        """Where the class count comes from, when it is a guess (appended to label errors)."""
        return ""


def file_identity(paths: list[Path]) -> list[tuple[str, int, int]]:
    """``(absolute path, size, mtime in whole seconds)`` per file: a change to any of them is a new source.

    A file that cannot be looked at (it vanished, or its link loops) is recorded as size and time -1; reading
    it names the problem.
    """
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((os.path.realpath(p), st.st_size, int(st.st_mtime)))
        except OSError:
            out.append((os.path.abspath(p), -1, -1))
    return out
