"""The project's exceptions: picklable (Ray sends a worker's error to the driver pickled), bounded, and
saying what is wrong and how to fix it."""

from __future__ import annotations

from crossmoco_ray.bounded import printable


class ConfigError(ValueError):
    """A configuration problem; the message says what is wrong and how to fix it."""


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


class ResumeError(ConfigError):
    """A previous launch's MLflow run cannot be continued (gone from this store, deleted, unreachable)."""
