"""``crossmoco prepare``: any source → Parquet shards + ``manifest.json``, validated, streamed, atomic.

Shard schema (one row per object)::

    id      string
    label   int32                   (−1 when the source is unlabelled)
    split   string                  ("train", "val", "test")
    points  fixed_shape_tensor<float32>[N, 3]   (Arrow's canonical tensor type; one N per dataset)
    views   list<binary>            (PNG bytes; rendered from the points when the source has none)

Rows are written in a seeded random order per split, whatever the source's order: real datasets are stored
class by class (ModelNet40's h5, ShapeNetRender by synset, every class-folder source), and shards in that
order would feed the training pipeline single-class windows. The shuffle streams in two passes with
bounded memory (an external bucket shuffle, :mod:`.shuffle`): pass 1 reads, validates and renders every
object once and appends it to a random temporary bucket; pass 2 permutes one bucket at a time into the
shards. Memory holds about ``bucket_rows`` objects in either pass (up to
``max_buckets × bucket_rows`` objects per split; beyond that, and for sources that cannot count their
objects (64 buckets), a bucket holds ``1/B`` of the split); the disk holds one extra copy while it runs.

Files are ``<split>-<nnnnn>.parquet`` with row groups of ``row_group_rows``. The manifest records the
schema version, counts per split and class, class names, point count, views per object, the render
settings and a sha256 per file. Work happens in ``<out>/.incomplete-<id>/``; files move into place and
the manifest is written last, so a reader never sees a half-written dataset. Re-running the same command
is a no-op; a different dataset in the same place needs ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .. import __version__
from .progress import Progress
from .readers import Source
from .render import RenderSpec, contact_sheet, decode_png, encode_png, render_views
from .shuffle import Buckets, bucket_count
from .types import DataError, Sample

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SKIPPED = "skipped.json"


@dataclass
class PrepareOptions:
    """How ``prepare`` turns samples into shards."""

    num_points: int | None = None  # resample every cloud to this many points; None: keep (all must agree)
    min_points: int = 16
    val_fraction: float = 0.0  # carve a validation split from train (by a hash of seed and id)
    seed: int = 0
    render: RenderSpec = field(default_factory=RenderSpec)
    rows_per_shard: int = 2048
    row_group_rows: int = 256
    skip_bad: bool = False
    overwrite: bool = False
    preview: str | None = None  # path of a contact sheet PNG
    preview_objects: int = 8
    shuffle: bool = True  # rows in a seeded random order per split (False: the source's order)
    bucket_rows: int = 1024  # objects per temporary bucket of the shuffle (what pass 2 holds in memory)
    max_buckets: int = 256  # open bucket files in pass 1, at most

    def identity(self) -> dict[str, Any]:
        keep = (
            "num_points",
            "min_points",
            "val_fraction",
            "seed",
            "rows_per_shard",
            "row_group_rows",
            "shuffle",
            "bucket_rows",
            "max_buckets",
        )
        return {**{k: getattr(self, k) for k in keep}, "render": asdict(self.render)}


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or a pyarrow-filesystem URI (``s3://``, ``gs://``, ``file://``)."""
    if "://" not in uri:
        from pathlib import Path

        uri = str(Path(uri).expanduser().resolve())
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def val_assignment(sample_id: str, seed: int, fraction: float) -> bool:
    """Whether a train sample goes to the carved validation split (stable per seed and id)."""
    return fraction > 0 and zlib.crc32(f"{seed}:{sample_id}".encode()) / 2**32 < fraction


def check_points(sample: Sample, min_points: int) -> np.ndarray:
    """The sample's points as ``[N, 3]`` float32, or a :class:`DataError` naming file and index.

    Rejected: wrong shape, empty, fewer than ``min_points``, NaN/Inf, and degenerate clouds (all points
    equal, or all on one line), which normalise to nothing or to a needle and carry no shape.
    """
    pts = np.asarray(sample.points)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise DataError(sample.source, f"points must be [N, 3], got {tuple(pts.shape)}", sample.index)
    if pts.shape[0] == 0:
        raise DataError(sample.source, "empty point cloud", sample.index)
    if pts.shape[0] < min_points:
        raise DataError(sample.source, f"only {pts.shape[0]} points (fewer than {min_points})", sample.index)
    finite = np.isfinite(pts).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise DataError(sample.source, f"NaN or Inf at point {bad}", sample.index)
    centred = pts.astype(np.float64) - pts.mean(axis=0, dtype=np.float64)
    spread = np.linalg.svd(centred, compute_uv=False)  # √(N·variance) along the principal axes
    scale = float(np.abs(pts).max()) * np.sqrt(pts.shape[0]) + 1e-30
    if spread[0] <= 1e-9 * scale:
        raise DataError(sample.source, "degenerate cloud: all points are equal", sample.index)
    if spread[1] <= 1e-6 * spread[0]:
        raise DataError(sample.source, "degenerate cloud: all points lie on one line", sample.index)
    return pts.astype(np.float32, copy=False)


def check_label(sample: Sample, class_names: list[str] | None, hint: str = "") -> int:
    """The sample's label as a class index (−1 for unlabelled sources), or a :class:`DataError`."""
    if sample.label is None:
        return -1
    label = sample.label
    if isinstance(label, (float, np.floating)) and not (
        math.isfinite(float(label)) and label == round(float(label))
    ):
        raise DataError(sample.source, f"label {label!r} is not an integer class index", sample.index)
    label = int(label)
    if label < 0:
        raise DataError(
            sample.source,
            f"label {label} is negative; labels are class indices 0..C-1 (-1 marks unlabelled objects)"
            + hint,
            sample.index,
        )
    if class_names is not None and label >= len(class_names):
        raise DataError(sample.source, f"label {label} outside 0..{len(class_names) - 1}{hint}", sample.index)
    return label


def resample(points: np.ndarray, n: int, sample_id: str, seed: int) -> np.ndarray:
    """Exactly ``n`` points: a seeded subset, or all points plus seeded repeats when there are fewer."""
    rng = np.random.default_rng([seed, zlib.crc32(sample_id.encode())])
    if points.shape[0] >= n:
        idx = np.sort(rng.choice(points.shape[0], n, replace=False))
    else:
        idx = np.concatenate([np.arange(points.shape[0]), rng.choice(points.shape[0], n - points.shape[0])])
    return points[idx]


class _ShardWriter:
    """Rows of one split → ``<split>-<nnnnn>.parquet`` files of at most ``rows_per_shard`` rows."""

    def __init__(self, fs: pafs.FileSystem, folder: str, split: str, num_points: int, opts: PrepareOptions):
        self.fs, self.folder, self.split, self.opts = fs, folder, split, opts
        self.schema = pa.schema(
            [
                ("id", pa.string()),
                ("label", pa.int32()),
                ("split", pa.string()),
                ("points", pa.fixed_shape_tensor(pa.float32(), [num_points, 3])),
                ("views", pa.list_(pa.binary())),
            ]
        )
        self.rows: list[tuple[str, int, np.ndarray, list[bytes]]] = []
        self.files: list[dict[str, Any]] = []
        self.writer: pq.ParquetWriter | None = None
        self.sink: Any = None
        self.in_file = 0

    def add(self, sid: str, label: int, points: np.ndarray, views: list[bytes]) -> None:
        self.rows.append((sid, label, points, views))
        if len(self.rows) >= self.opts.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        if self.writer is None or self.in_file >= self.opts.rows_per_shard:
            self._close_file()
            name = f"{self.split}-{len(self.files):05d}.parquet"
            self.sink = self.fs.open_output_stream(f"{self.folder}/{name}")
            self.writer = pq.ParquetWriter(self.sink, self.schema, compression="zstd")
            self.files.append({"path": name, "split": self.split, "rows": 0})
            self.in_file = 0
        take = self.rows[: self.opts.rows_per_shard - self.in_file]
        self.rows = self.rows[len(take) :]
        table = pa.table(
            {
                "id": pa.array([r[0] for r in take], pa.string()),
                "label": pa.array([r[1] for r in take], pa.int32()),
                "split": pa.array([self.split] * len(take), pa.string()),
                "points": pa.FixedShapeTensorArray.from_numpy_ndarray(np.stack([r[2] for r in take])),
                "views": pa.array([r[3] for r in take], pa.list_(pa.binary())),
            },
            schema=self.schema,
        )
        assert self.writer is not None
        self.writer.write_table(table, row_group_size=self.opts.row_group_rows)
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
        self._flush()
        self._close_file()
        for info in self.files:
            info["bytes"], info["sha256"] = file_digest(self.fs, f"{self.folder}/{info['path']}")
        return self.files


def file_digest(fs: pafs.FileSystem, path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file on ``fs``, read in chunks."""
    h, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of prepared shards at ``uri``, checked; :class:`DataError` names what is wrong."""
    fs, root = resolve(uri)
    path = f"{root}/{MANIFEST}"
    if not _exists(fs, path):
        raise DataError(f"{uri}/{MANIFEST}", "no manifest: not a prepared dataset (run `crossmoco prepare`)")
    try:
        with fs.open_input_stream(path) as f:
            manifest = json.loads(f.read().decode())
    except (OSError, ValueError) as err:
        raise DataError(f"{uri}/{MANIFEST}", f"unreadable manifest: {err}") from err
    if not isinstance(manifest, dict):
        raise DataError(f"{uri}/{MANIFEST}", "the manifest is not a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(
            f"{uri}/{MANIFEST}",
            f"schema version {version!r}, this crossmoco-ray reads {SCHEMA_VERSION}: "
            "re-run `crossmoco prepare`",
        )
    for key in ("files", "num_points", "views_per_object", "counts", "class_names"):
        if key not in manifest:
            raise DataError(f"{uri}/{MANIFEST}", f"the manifest lacks {key!r}")
    for i, info in enumerate(manifest["files"]):
        if not isinstance(info, dict) or not {"path", "split", "rows"} <= set(info):
            raise DataError(f"{uri}/{MANIFEST}", "file entry needs path, split and rows", i)
    return manifest


def verify_shards(uri: str) -> None:
    """Check every shard's size and sha256 against the manifest (:class:`DataError` on the first mismatch)."""
    manifest = read_manifest(uri)
    fs, root = resolve(uri)
    for i, info in enumerate(manifest["files"]):
        path = f"{root}/{info['path']}"
        if not _exists(fs, path):
            raise DataError(f"{uri}/{MANIFEST}", f"lists {info['path']}, which is missing", i)
        size, digest = file_digest(fs, path)
        if (size, digest) != (info.get("bytes"), info.get("sha256")):
            raise DataError(
                f"{uri}/{info['path']}", "checksum differs from the manifest (changed or truncated)"
            )


def fingerprint(source: Source, opts: PrepareOptions) -> str:
    blob = json.dumps(
        {"schema": SCHEMA_VERSION, "source": source.identity(), "options": opts.identity()}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare(
    source: Source, out: str, opts: PrepareOptions, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Write ``source`` as shards under ``out``; returns the manifest (the existing one if up to date)."""
    fs, root = resolve(out)
    fp = fingerprint(source, opts)
    if _exists(fs, f"{root}/{MANIFEST}"):
        try:
            old = read_manifest(out)
        except DataError:
            old = None
        if old is not None and old.get("fingerprint") == fp:
            log(f"{out} is up to date (same source and options); nothing to do")
            return old
        if not opts.overwrite:
            raise DataError(out, "holds a different prepared dataset; pass --overwrite to replace it")
    else:
        old = None
    tmp = f"{root}/.incomplete-{uuid.uuid4().hex[:8]}"
    fs.create_dir(tmp, recursive=True)
    try:
        manifest = json.loads(json.dumps(_write(source, fs, tmp, opts, fp, log)))  # as a reader will see it
        _commit(fs, root, tmp, manifest, old)
    finally:
        if _exists(fs, tmp):
            fs.delete_dir(tmp)
    rows = sum(f["rows"] for f in manifest["files"])
    log(f"wrote {rows} objects in {len(manifest['files'])} shards to {out}")
    return manifest


def _write(
    source: Source, fs: pafs.FileSystem, tmp: str, opts: PrepareOptions, fp: str, log: Callable[[str], None]
) -> dict[str, Any]:
    class_names = source.class_names()
    hint = source.label_hint()
    writers: dict[str, _ShardWriter] = {}
    buckets: dict[str, Buckets] = {}
    counts: dict[str, Counter[int]] = {}
    seen: set[str] = set()
    skipped: list[dict[str, Any]] = []
    num_points, num_views = opts.num_points, None
    preview: list[tuple[int, list[np.ndarray]]] = []
    local = isinstance(fs, pafs.LocalFileSystem)
    scratch = f"{tmp}/.buckets" if local else tempfile.mkdtemp(prefix="crossmoco-prepare-")
    if local:
        fs.create_dir(scratch, recursive=True)

    def fail(err: DataError) -> None:
        if not opts.skip_bad:
            raise err
        skipped.append({"source": err.source, "index": err.index, "rows": err.rows, "problem": err.problem})

    def sink(out_split: str, expected: int | None) -> _ShardWriter | Buckets:
        if opts.shuffle:
            if out_split not in buckets:
                buckets[out_split] = Buckets(
                    scratch,
                    out_split,
                    bucket_count(expected, opts.bucket_rows, opts.max_buckets),
                    opts.seed,
                    opts.bucket_rows,
                )
            return buckets[out_split]
        if out_split not in writers:
            assert num_points is not None
            writers[out_split] = _ShardWriter(fs, tmp, out_split, num_points, opts)
        return writers[out_split]

    try:
        for split in source.splits():
            total = source.count(split)
            progress = Progress(f"prepare {source.format} {split}", total)
            for item in source.samples(split):
                progress.update()
                try:
                    if isinstance(item, DataError):
                        raise item
                    sample = item
                    if sample.id in seen:
                        raise DataError(sample.source, f"duplicate id {sample.id!r}", sample.index)
                    pts = check_points(sample, opts.min_points)
                    if opts.num_points is not None:
                        pts = resample(pts, opts.num_points, sample.id, opts.seed)
                    elif num_points is None:
                        num_points = pts.shape[0]
                    elif pts.shape[0] != num_points:
                        raise DataError(
                            sample.source,
                            f"{pts.shape[0]} points where earlier clouds have {num_points}; "
                            "pass --num-points to resample every cloud to one size",
                            sample.index,
                        )
                    label = check_label(sample, class_names, hint)
                    views, decoded = _views(sample, pts, opts)
                except DataError as err:
                    fail(err)
                    continue
                seen.add(sample.id)
                num_views = len(views) if num_views is None else min(num_views, len(views))
                carve = split == "train" and val_assignment(sample.id, opts.seed, opts.val_fraction)
                out_split = "val" if carve else split
                if total is None:
                    expected = None
                elif out_split == "val":
                    expected = math.ceil(total * opts.val_fraction)
                else:
                    expected = total if split != "train" else math.ceil(total * (1 - opts.val_fraction))
                sink(out_split, expected).add(sample.id, label, pts, views)
                counts.setdefault(out_split, Counter())[label] += 1
                new_class = label not in {lab for lab, _ in preview}
                if opts.preview and len(preview) < opts.preview_objects and new_class:
                    preview.append(
                        (label, decoded if decoded is not None else [decode_png(v) for v in views])
                    )
            progress.close()
        if not counts or num_points is None:
            raise DataError(f"{source.format} source", "no valid samples to write")
        for out_split, bucket in buckets.items():  # pass 2
            writers[out_split] = _ShardWriter(fs, tmp, out_split, num_points, opts)
            progress = Progress(f"write {out_split} in shuffled order", bucket.rows)
            bucket.drain(writers[out_split], num_points, progress)
            progress.close()
    finally:
        if local:
            if _exists(fs, scratch):
                fs.delete_dir(scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    files = [info for w in writers.values() for info in w.close()]
    if not files:
        raise DataError(f"{source.format} source", "no valid samples to write")
    skipped_rows = sum(r["rows"] for r in skipped)
    if skipped:
        with fs.open_output_stream(f"{tmp}/{SKIPPED}") as f:
            f.write(json.dumps(skipped, indent=1).encode())
        log(f"skipped {skipped_rows} bad samples ({len(skipped)} problems); see {SKIPPED} in the output")
    if opts.preview:
        names = [class_names[lab] if class_names and lab >= 0 else str(lab) for lab, _ in preview]
        contact_sheet([views for _, views in preview], opts.preview, labels=names)
        log(f"preview written to {opts.preview}")

    def per_class(c: Counter[int]) -> dict[str, int]:
        return {(class_names[k] if class_names and k >= 0 else str(k)): v for k, v in sorted(c.items())}

    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "crossmoco_ray": __version__,
        "fingerprint": fp,
        "source": {"format": source.format, **{k: v for k, v in source.identity().items() if k != "files"}},
        "num_points": int(next(iter(writers.values())).schema.field("points").type.shape[0]),
        "views_per_object": num_views,
        "rendered": not source.has_views(),
        "render": asdict(opts.render) if not source.has_views() else None,
        "class_names": class_names,
        "counts": {s: {"total": sum(c.values()), "per_class": per_class(c)} for s, c in counts.items()},
        "val": {"fraction": opts.val_fraction, "seed": opts.seed},
        "order": {"shuffled": opts.shuffle, "seed": opts.seed},
        "skipped": skipped_rows,
        "files": files,
    }


def _views(
    sample: Sample, pts: np.ndarray, opts: PrepareOptions
) -> tuple[list[bytes], list[np.ndarray] | None]:
    """PNG bytes of the sample's views (rendered when it has none), checked to decode; ≥ 2 needed."""
    if sample.views is None:
        images = list(render_views(pts, opts.render))
        return [encode_png(img) for img in images], images
    decoded = []
    for v, data in enumerate(sample.views):
        try:
            decoded.append(decode_png(data))
        except ValueError as err:
            raise DataError(sample.source, f"view {v} is not a readable image: {err}", sample.index) from err
    if len(decoded) < 2:
        raise DataError(sample.source, f"{len(decoded)} view(s); CrossMoCo needs at least 2", sample.index)
    return list(sample.views), decoded


def _commit(
    fs: pafs.FileSystem, root: str, tmp: str, manifest: dict[str, Any], old: dict[str, Any] | None
) -> None:
    """Move the new files into ``root``; the manifest goes last (its presence means complete)."""
    if _exists(fs, f"{root}/{MANIFEST}"):
        fs.delete_file(f"{root}/{MANIFEST}")  # from here the old dataset no longer counts as complete
    new_names = {f["path"] for f in manifest["files"]} | {SKIPPED}
    for name in new_names:
        if _exists(fs, f"{tmp}/{name}"):
            fs.move(f"{tmp}/{name}", f"{root}/{name}")
        elif _exists(fs, f"{root}/{name}"):
            fs.delete_file(f"{root}/{name}")  # a stale skipped report
    for info in (old or {}).get("files", []):
        if info.get("path") not in new_names and _exists(fs, f"{root}/{info['path']}"):
            fs.delete_file(f"{root}/{info['path']}")
    with fs.open_output_stream(f"{tmp}/{MANIFEST}") as f:
        f.write(json.dumps(manifest, indent=1).encode())
    fs.move(f"{tmp}/{MANIFEST}", f"{root}/{MANIFEST}")
