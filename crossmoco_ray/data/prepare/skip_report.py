"""``skipped.json``: the bad samples ``prepare --skip-bad`` leaves out, written as they come."""

from __future__ import annotations

import json
from typing import Any

import pyarrow.fs as pafs

from crossmoco_ray.errors import DataError


class SkipReport:
    """``skipped.json`` written as samples are skipped (a JSON array, one problem per line): memory holds
    only the counts."""

    def __init__(self, fs: pafs.FileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        self.stream: Any = None
        self.problems = self.rows = 0

    def add(self, err: DataError) -> None:
        entry = {"source": err.source, "index": err.index, "rows": err.rows, "problem": err.problem}
        if self.stream is None:
            self.stream = self.fs.open_output_stream(self.path)
        self.stream.write(("[\n " if self.problems == 0 else ",\n ").encode() + json.dumps(entry).encode())
        self.stream.flush()
        self.problems += 1
        self.rows += err.rows

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write(b"\n]\n")
            self.stream.close()
            self.stream = None
