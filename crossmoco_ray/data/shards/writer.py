"""Rows of one split → ``<split>-<nnnnn>.parquet`` shards (the columns of :func:`.manifest.shard_schema`).

Rows are buffered into row groups of ``row_group_rows`` and files of at most ``rows_per_shard`` rows, zstd
compressed, with Parquet's page checksums (so any Parquet reader can check the pages);
:meth:`ShardWriter.close` returns what the manifest records of each file: rows, size, sha256 and the
digests of its footer and of every row group's bytes (:func:`.integrity.file_digests`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from crossmoco_ray.data.shards.integrity import file_digests
from crossmoco_ray.data.shards.manifest import shard_schema


class ShardWriter:
    """Rows of one split → ``<split>-<nnnnn>.parquet`` files of at most ``rows_per_shard`` rows."""

    def __init__(
        self,
        fs: pafs.FileSystem,
        folder: str,
        split: str,
        num_points: int,
        rows_per_shard: int,
        row_group_rows: int,
        meshes: bool = False,
    ) -> None:
        self.fs, self.folder, self.split = fs, folder, split
        self.rows_per_shard, self.row_group_rows = rows_per_shard, row_group_rows
        self.schema = shard_schema(num_points, meshes)
        self.meshes = meshes
        self.rows: list[tuple[str, int, np.ndarray, list[bytes], bytes | None]] = []
        self.files: list[dict[str, Any]] = []
        self.writer: pq.ParquetWriter | None = None
        self.sink: Any = None
        self.in_file = 0

    def add(
        self, sid: str, label: int, points: np.ndarray, views: list[bytes], mesh: bytes | None = None
    ) -> None:
        """Queue one row: ``points`` is ``[num_points, 3]`` float32, ``views`` PNG bytes, ``mesh`` a
        :mod:`.meshes` cell (kept only by a writer of ``meshes``)."""
        self.rows.append((sid, label, points, views, mesh))
        if len(self.rows) >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        if self.writer is None or self.in_file >= self.rows_per_shard:
            self._close_file()
            name = f"{self.split}-{len(self.files):05d}.parquet"
            self.sink = self.fs.open_output_stream(f"{self.folder}/{name}")
            self.writer = pq.ParquetWriter(
                self.sink, self.schema, compression="zstd", write_page_checksum=True
            )
            self.files.append({"path": name, "split": self.split, "rows": 0})
            self.in_file = 0
        take = self.rows[: self.rows_per_shard - self.in_file]
        self.rows = self.rows[len(take) :]
        columns = {
            "id": pa.array([r[0] for r in take], pa.string()),
            "label": pa.array([r[1] for r in take], pa.int32()),
            "split": pa.array([self.split] * len(take), pa.string()),
            "points": pa.FixedShapeTensorArray.from_numpy_ndarray(np.stack([r[2] for r in take])),
            "views": pa.array([r[3] for r in take], pa.list_(pa.binary())),
        }
        if self.meshes:
            columns["mesh"] = pa.array([r[4] for r in take], pa.binary())
        table = pa.table(columns, schema=self.schema)
        assert self.writer is not None
        self.writer.write_table(table, row_group_size=self.row_group_rows)
        self.in_file += len(take)
        self.files[-1]["rows"] += len(take)
        if self.rows:
            self._flush()

    def _close_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
            self.writer = None

    def close(self) -> list[dict[str, Any]]:
        """Write what is queued and close; the files' ``path``, ``split``, ``rows``, ``bytes``, ``sha256``,
        ``footer_sha256`` and ``row_group_sha256``."""
        self._flush()
        self._close_file()
        for info in self.files:
            info.update(file_digests(self.fs, f"{self.folder}/{info['path']}"))
        return self.files
