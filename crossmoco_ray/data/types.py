"""What every reader yields, and the error that names the bad file."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..bounded import printable

PROBLEM_CHARS = 2000  # the longest problem a DataError's message shows


class DataError(ValueError):
    """Bad input data; the message names the file (and the index inside it) and what is wrong.

    ``rows`` is how many samples the problem costs (a file without labels loses all its rows), so that
    ``prepare --skip-bad`` counts what it really skipped. The error survives pickling (Ray sends errors
    raised in its workers and tasks to the driver that way) with its message and fields intact.
    """

    def __init__(self, source: str, problem: str, index: int | None = None, rows: int = 1) -> None:
        self.source, self.problem, self.index, self.rows = source, problem, index, rows
        # The message is printable on any terminal and bounded, whatever the file is named (a name that is
        # not UTF-8, a newline in it) and whatever a library said about it.
        where = printable(source) if index is None else f"{printable(source)} [index {index}]"
        super().__init__(f"{where}: {printable(problem, PROBLEM_CHARS)}")

    def __reduce__(self) -> tuple[type[DataError], tuple[str, str, int | None, int]]:
        return (type(self), (self.source, self.problem, self.index, self.rows))


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
