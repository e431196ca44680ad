"""Prepare's shuffle: an external bucket shuffle that writes a split in a seeded uniform random order with
bounded memory.

Pass 1 appends every row to one of ``B`` temporary Arrow files chosen at random (:meth:`Buckets.add`); pass 2
loads one bucket at a time, permutes it and hands its rows on (:meth:`Buckets.drain`). A uniform bucket
choice plus a uniform permutation inside each bucket is a uniform permutation of the split.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from crossmoco_ray.data.progress import Progress


class RowSink(Protocol):
    """Where pass 2 puts the rows (prepare's shard writer)."""

    def add(
        self, sid: str, label: int, points: np.ndarray, views: list[bytes], mesh: bytes | None = None
    ) -> Any: ...


class Buckets:
    """Pass 1 of the shuffle: rows of one output split appended to ``n`` local Arrow files at random.

    Rows are buffered per bucket and written in small record batches of ``flush`` rows, sized so that
    pass 1 holds at most ``max(bucket_rows, n)`` rows in all.
    """

    SCHEMA = pa.schema(
        [
            ("id", pa.string()),
            ("label", pa.int32()),
            ("points", pa.binary()),  # float32 [N, 3], raw bytes
            ("views", pa.list_(pa.binary())),
            ("mesh", pa.binary()),  # a .meshes cell or null
        ]
    )

    def __init__(self, folder: str, split: str, n: int, seed: int, bucket_rows: int = 1024) -> None:
        self.folder, self.split, self.n = folder, split, n
        self.flush = max(1, min(16, bucket_rows // n))
        self.rng = np.random.default_rng([seed, zlib.crc32(split.encode()), 0xB0C])
        self.seed = seed
        self.buffers: list[list[tuple[str, int, bytes, list[bytes], bytes | None]]] = [[] for _ in range(n)]
        self.writers: list[Any] = [None] * n
        self.rows = 0

    def path(self, b: int) -> str:
        return f"{self.folder}/{self.split}-{b:04d}.arrow"

    def add(
        self, sid: str, label: int, points: np.ndarray, views: list[bytes], mesh: bytes | None = None
    ) -> None:
        b = int(self.rng.integers(self.n))
        self.buffers[b].append((sid, label, np.ascontiguousarray(points, np.float32).tobytes(), views, mesh))
        self.rows += 1
        if len(self.buffers[b]) >= self.flush:
            self._flush(b)

    def _flush(self, b: int) -> None:
        rows = self.buffers[b]
        if not rows:
            return
        if self.writers[b] is None:
            self.writers[b] = pa.ipc.new_file(self.path(b), self.SCHEMA)
        batch = pa.record_batch(
            [
                pa.array([r[0] for r in rows], pa.string()),
                pa.array([r[1] for r in rows], pa.int32()),
                pa.array([r[2] for r in rows], pa.binary()),
                pa.array([r[3] for r in rows], pa.list_(pa.binary())),
                pa.array([r[4] for r in rows], pa.binary()),
            ],
            schema=self.SCHEMA,
        )
        self.writers[b].write_batch(batch)
        self.buffers[b] = []

    def drain(self, writer: RowSink, num_points: int, progress: Progress) -> None:
        """Pass 2: each bucket in turn, its rows permuted, into ``writer``."""
        for b in range(self.n):
            self._flush(b)
            if self.writers[b] is not None:
                self.writers[b].close()
        for b in range(self.n):
            if self.writers[b] is None:
                continue
            with pa.memory_map(self.path(b)) as source:
                table = pa.ipc.open_file(source).read_all()
            order = np.random.default_rng([self.seed, zlib.crc32(self.split.encode()), b]).permutation(
                table.num_rows
            )
            ids, labels = table.column("id").to_pylist(), table.column("label").to_pylist()
            points, views = table.column("points").to_pylist(), table.column("views").to_pylist()
            meshes = table.column("mesh").to_pylist()
            del table
            for i in order.tolist():
                pts = np.frombuffer(points[i], dtype=np.float32).reshape(num_points, 3)
                writer.add(ids[i], labels[i], pts, views[i], meshes[i])
                progress.update()


def bucket_count(expected: int | None, bucket_rows: int, max_buckets: int) -> int:
    """Buckets for ``expected`` rows: about ``bucket_rows`` each, at least 1, at most ``max_buckets``
    (a quarter of them when the source cannot count its rows)."""
    if expected is None:
        return max_buckets // 4
    return max(1, min(max_buckets, math.ceil(expected / max(bucket_rows, 1))))
