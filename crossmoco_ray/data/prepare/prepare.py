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
settings, a size, sha256 and row-group digests per file, and its own seal (:mod:`.manifest`). Work
happens in ``<out>/.incomplete-<id>/`` (:mod:`.workdir`: removed however the run ends, SIGTERM included;
those of dead runs are removed by the next run); files move into place and the manifest is written last,
so a reader never sees a half-written dataset. Re-running the same command is a no-op once the existing
shards pass a quick check (there, of the listed size, footers matching the manifest); damaged ones are
prepared again. A different dataset in the same place needs ``overwrite``, which deletes only files
prepare writes (shard-named files and its own reports inside ``out``), whatever the old manifest lists.
Bad samples skipped with ``skip_bad`` stream to ``skipped.json`` as they come (memory holds counts).

This module orchestrates; the pieces live beside it: :mod:`.checks` (per-sample validation, resampling,
views), :mod:`.writer` (rows → Parquet files), :mod:`.manifest` (reading the manifest back checked),
:mod:`.integrity` (reading the shards back checked), :mod:`.workdir` (the work directory) and
:mod:`crossmoco_ray.storage` (paths and URIs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from crossmoco_ray import __version__
from crossmoco_ray.bounded import printable
from crossmoco_ray.data.prepare.sample_checks import (
    MIN_POINTS,
    check_label,
    check_points,
    check_views,
    resample,
    val_assignment,
)
from crossmoco_ray.data.prepare.shuffle import Buckets, bucket_count
from crossmoco_ray.data.prepare.workdir import WorkDir, exit_on_sigterm, remove_stale, terminate_as_exit
from crossmoco_ray.data.progress import Progress
from crossmoco_ray.data.render.splat import RenderSpec, contact_sheet, decode_png
from crossmoco_ray.data.shards.integrity import check_shards
from crossmoco_ray.data.shards.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    SKIPPED,
    file_exists,
    is_shard_name,
    is_symlink,
    join_uri,
    load_manifest_json,
    read_manifest,
    seal,
    utf8_problem,
)
from crossmoco_ray.data.shards.writer import ShardWriter
from crossmoco_ray.data.sources.base import Source
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.errors import DataError
from crossmoco_ray.storage import resolve, write_json


@dataclass
class PrepareOptions:
    """How ``prepare`` turns samples into shards."""

    num_points: int | None = None  # resample every cloud to this many points; None: keep (all must agree)
    min_points: int = MIN_POINTS
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
    ray: bool = False  # read, check and render on Ray Data across the cluster (:mod:`.prepare_ray`)
    ray_cpus: int | None = None  # CPUs of the local Ray started for it (None: all); ignored on a cluster

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction {self.val_fraction}: must be in [0, 1)")
        for name in ("rows_per_shard", "row_group_rows", "bucket_rows", "max_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)}: must be at least 1")
        if self.num_points is not None and self.num_points < 1:
            raise ValueError(f"num_points {self.num_points}: must be at least 1")

    def identity(self, meshes: bool = False) -> dict[str, Any]:
        """What identifies these options' output (``meshes``: the source's views are mesh renders)."""
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
        render = asdict(self.render)
        meshes = meshes and not self.render.points_only
        if not self.render.points_only:
            render.pop("points_only")  # the fingerprints of datasets prepared before the option hold
        if self.render.mode != "shaded" and not meshes:
            # Lighting only shapes shaded views (and every mesh render): leaving it out keeps the fingerprints
            # of datasets prepared before it existed, so re-running their prepare command stays a no-op.
            for key in ("light", "ambient", "supersample", "normal_neighbours"):
                render.pop(key)
        return {**{k: getattr(self, k) for k in keep}, "render": render}


@dataclass
class Processed:
    """One sample after prepare's per-sample work (read, check, resample, render), ready to be placed.

    The work is a pure function of the sample and the options, so it can run anywhere (a Ray Data task);
    what depends on other samples (duplicate ids, one point count, the shuffle) is decided in order by
    the driver. Two error slots keep the local path's precedence: ``points_error`` (reading, the points)
    comes before the point-count agreement, ``error`` (label, views) after it.
    """

    id: str | None  # None: the item was a reading error
    source: str = ""
    index: int = 0
    label: int = -1
    points: np.ndarray | None = None
    views: list[bytes] | None = None
    points_error: DataError | None = None
    error: DataError | None = None


def process(
    item: Sample | DataError, opts: PrepareOptions, class_names: list[str] | None, hint: str
) -> Processed:
    """The per-sample work of prepare on one item of a source (never raises :class:`DataError`)."""
    if isinstance(item, DataError):
        return Processed(None, item.source, item.index or 0, points_error=item)
    out = Processed(item.id, item.source, item.index)
    try:
        pts = check_points(item, opts.min_points)
        if opts.num_points is not None:
            pts = resample(pts, opts.num_points, item.id, opts.seed)
    except DataError as err:
        out.points_error = err
        return out
    out.points = pts
    try:
        out.label = check_label(item, class_names, hint)
        out.views, _ = check_views(item, pts, opts.render)
    except DataError as err:
        out.error = err
    return out


def processed_locally(
    source: Source, split: str, opts: PrepareOptions, class_names: list[str] | None, hint: str
) -> Iterator[Processed]:
    """:func:`process` over every task of ``split`` in order, in this process."""
    for task in source.tasks(split):
        for item in source.read_task(split, task):
            yield process(item, opts, class_names, hint)


def fingerprint(source: Source, opts: PrepareOptions) -> str:
    blob = json.dumps(
        {
            "schema": SCHEMA_VERSION,
            "source": source.identity(),
            "options": opts.identity(meshes=source.has_meshes()),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def out_problem(out: str) -> str | None:
    """Why ``out`` cannot hold prepared shards (None: it can): it is not UTF-8, or it, or a folder above
    it, is a file."""
    problem = utf8_problem(out)
    if problem:
        return problem
    fs, root = resolve(out)
    if fs.get_file_info(root).type == pafs.FileType.File:
        return "is a file, not a directory"
    if isinstance(fs, pafs.LocalFileSystem):
        for parent in Path(root).parents:
            if parent.exists() or parent.is_symlink():
                return None if parent.is_dir() else f"{printable(parent)} is a file, not a directory"
    return None


def preview_problem(path: str) -> str | None:
    """Why a contact sheet cannot be written to ``path`` (None: it can), checked before any work."""
    p = Path(path)
    parent = p.parent
    if p.is_dir():
        return "is a directory"
    if not parent.is_dir():
        return f"the folder {printable(parent)} does not exist"
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        return "is not writable"
    return None


def prepare(
    source: Source, out: str, opts: PrepareOptions, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Write ``source`` as shards under ``out``; returns the manifest (the existing one if up to date)."""
    problem = out_problem(out)
    if problem:
        raise DataError(out, problem)
    problem = preview_problem(opts.preview) if opts.preview else None
    if opts.preview and problem:
        raise DataError(opts.preview, problem)
    fs, root = resolve(out)
    _check_destinations(fs, root, out, [MANIFEST, SKIPPED])
    fp = fingerprint(source, opts)
    remove_stale(fs, root, out, log)
    old_shards: list[str] = []
    if file_exists(fs, f"{root}/{MANIFEST}"):
        try:
            old: dict[str, Any] | None = read_manifest(out)
        except DataError as err:
            if not opts.overwrite:
                raise DataError(
                    out,
                    f"holds a dataset whose manifest cannot be used ({err}); pass --overwrite to replace it",
                ) from err
            old = None
        if old is not None and old.get("fingerprint") == fp:
            damage = check_shards(out, old)
            if damage is None:
                log(f"{out} is up to date (same source and options); nothing to do")
                return old
            log(f"{out}: the prepared dataset is damaged ({damage}); preparing it again")
        elif not opts.overwrite:
            raise DataError(out, "holds a different prepared dataset; pass --overwrite to replace it")
        old_shards = _listed_shards(out)
    with terminate_as_exit():
        work = WorkDir(fs, root, out)
        try:
            manifest, preview = _write(source, fs, work, opts, fp, log)
            manifest = seal(json.loads(json.dumps(manifest)))  # sealed as a reader will see it
            write_json(join_uri(work.uri, MANIFEST), manifest)  # inside the work dir: not yet a dataset
            _commit(fs, root, work.path, manifest, old_shards, out)
        finally:
            work.remove()
    rows = sum(f["rows"] for f in manifest["files"])
    log(f"wrote {rows} objects in {len(manifest['files'])} shards to {out}")
    if opts.preview:
        try:
            contact_sheet([views for _, views in preview], opts.preview, labels=[n for n, _ in preview])
            log(f"preview written to {opts.preview}")
        except (OSError, ValueError) as err:
            log(
                f"warning: could not write the preview to {opts.preview} ({printable(err)}); "
                "the shards are written"
            )
    return manifest


def _listed_shards(out: str) -> list[str]:
    """The shard file names an existing manifest lists (whatever else it lists is not prepare's to delete)."""
    try:
        files = load_manifest_json(out).get("files")
    except DataError:
        return []
    names = [f.get("path") for f in files if isinstance(f, dict)] if isinstance(files, list) else []
    return [n for n in names if isinstance(n, str) and is_shard_name(n)]


class _SkipReport:
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


def _write(
    source: Source,
    fs: pafs.FileSystem,
    work: WorkDir,
    opts: PrepareOptions,
    fp: str,
    log: Callable[[str], None],
) -> tuple[dict[str, Any], list[tuple[str, list[np.ndarray]]]]:
    """Both passes into shards in the work directory (with ``skipped.json``); returns the manifest and the
    preview's rows (a name and the views of a few objects)."""
    tmp = work.path
    class_names = source.class_names()
    hint = source.label_hint()
    writers: dict[str, ShardWriter] = {}
    buckets: dict[str, Buckets] = {}
    counts: dict[str, Counter[int]] = {}
    seen: set[str] = set()
    skipped = _SkipReport(fs, f"{tmp}/{SKIPPED}")
    num_points, num_views = opts.num_points, None
    preview: list[tuple[int, list[np.ndarray]]] = []
    local = isinstance(fs, pafs.LocalFileSystem)
    scratch = f"{tmp}/.buckets" if local else tempfile.mkdtemp(prefix="crossmoco-prepare-")
    if local:
        fs.create_dir(scratch, recursive=True)

    def fail(err: DataError) -> None:
        if not opts.skip_bad:
            raise err
        skipped.add(err)

    def sink(out_split: str, expected: int | None) -> ShardWriter | Buckets:
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
            writers[out_split] = ShardWriter(
                fs, tmp, out_split, num_points, opts.rows_per_shard, opts.row_group_rows
            )
        return writers[out_split]

    if opts.ray:
        from crossmoco_ray.data.prepare.on_ray import processed_on_ray, start_ray

        start_ray(opts.ray_cpus, log)
        exit_on_sigterm()  # ray.init installs its own handler
    try:
        for split in source.splits():
            total = source.count(split)
            progress = Progress(f"prepare {source.format} {split}", total)
            if opts.ray:
                items = processed_on_ray(source, split, opts, class_names, hint)
            else:
                items = processed_locally(source, split, opts, class_names, hint)
            for item in items:
                progress.update()
                work.beat()
                problem, num_points = _admit(item, seen, num_points, opts)
                if problem is not None:
                    fail(problem)
                    continue
                assert item.id is not None
                assert item.points is not None
                assert item.views is not None
                pts, label, views = item.points, item.label, item.views
                seen.add(item.id)
                num_views = len(views) if num_views is None else min(num_views, len(views))
                carve = split == "train" and val_assignment(item.id, opts.seed, opts.val_fraction)
                out_split = "val" if carve else split
                if total is None:
                    expected = None
                elif out_split == "val":
                    expected = math.ceil(total * opts.val_fraction)
                else:
                    expected = total if split != "train" else math.ceil(total * (1 - opts.val_fraction))
                sink(out_split, expected).add(item.id, label, pts, views)
                counts.setdefault(out_split, Counter())[label] += 1
                new_class = label not in {lab for lab, _ in preview}
                if opts.preview and len(preview) < opts.preview_objects and new_class:
                    preview.append((label, [decode_png(v) for v in views]))
            progress.close()
        if not counts or num_points is None:
            raise DataError(f"{source.format} source", "no valid samples to write")
        for out_split, bucket in buckets.items():  # pass 2
            writers[out_split] = ShardWriter(
                fs, tmp, out_split, num_points, opts.rows_per_shard, opts.row_group_rows
            )
            progress = Progress(f"write {out_split} in shuffled order", bucket.rows)
            bucket.drain(writers[out_split], num_points, progress)
            progress.close()
    finally:
        skipped.close()
        if local:
            if file_exists(fs, scratch):
                fs.delete_dir(scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    files = [info for w in writers.values() for info in w.close()]
    if not files:
        raise DataError(f"{source.format} source", "no valid samples to write")
    if skipped.problems:
        log(f"skipped {skipped.rows} bad samples ({skipped.problems} problems); see {SKIPPED} in the output")
    names = [class_names[lab] if class_names and lab >= 0 else str(lab) for lab, _ in preview]

    def per_class(c: Counter[int]) -> dict[str, int]:
        return {(class_names[k] if class_names and k >= 0 else str(k)): v for k, v in sorted(c.items())}

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "crossmoco_ray": __version__,
        "fingerprint": fp,
        "source": {"format": source.format, **{k: v for k, v in source.identity().items() if k != "files"}},
        "num_points": int(next(iter(writers.values())).schema.field("points").type.shape[0]),
        "views_per_object": num_views,
        "rendered": not source.has_views(),
        "rendered_from": None
        if source.has_views()
        else ("meshes" if source.has_meshes() and not opts.render.points_only else "points"),
        "render": asdict(opts.render) if not source.has_views() else None,
        "class_names": class_names,
        "counts": {s: {"total": sum(c.values()), "per_class": per_class(c)} for s, c in counts.items()},
        "val": {"fraction": opts.val_fraction, "seed": opts.seed},
        "order": {"shuffled": opts.shuffle, "seed": opts.seed},
        "skipped": skipped.rows,
        "files": files,
    }
    return manifest, list(zip(names, [views for _, views in preview], strict=True))


def _admit(
    item: Processed, seen: set[str], num_points: int | None, opts: PrepareOptions
) -> tuple[DataError | None, int | None]:
    """What keeps ``item`` out of the dataset, checked in the local path's order (None: it goes in), and
    the dataset's point count after it (set by the first cloud with sound points when not resampled)."""
    if item.id is None:
        return item.points_error, num_points
    if item.id in seen:
        return DataError(item.source, f"duplicate id {item.id!r}", item.index), num_points
    if item.points_error is not None or item.points is None:
        return item.points_error, num_points
    n = item.points.shape[0]
    if opts.num_points is None:
        if num_points is None:
            num_points = n
        elif n != num_points:
            problem = (
                f"{n} points where earlier clouds have {num_points}; "
                "pass --num-points to resample every cloud to one size"
            )
            return DataError(item.source, problem, item.index), num_points
    return item.error, num_points


def _check_destinations(fs: pafs.FileSystem, root: str, out: str, names: list[str]) -> None:
    """A :class:`DataError` when something at one of ``names`` in ``root`` is not a file prepare may replace:
    a directory, a FIFO, a device, a socket (a symbolic link is fine: a move replaces the link, never what it
    points to). Checked before anything moves, so a refusal leaves ``out`` as it was."""
    for name in names:
        path = f"{root}/{name}"
        if isinstance(fs, pafs.LocalFileSystem):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                continue
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
        else:
            kind_of = fs.get_file_info(path).type
            if kind_of in (pafs.FileType.NotFound, pafs.FileType.File):
                continue
            kind = "a directory" if kind_of == pafs.FileType.Directory else "not a regular file"
        raise DataError(
            join_uri(out, name),
            f"is {kind}, not a regular file; prepare writes a file there: remove it or choose another --out",
        )


def _commit(
    fs: pafs.FileSystem, root: str, tmp: str, manifest: dict[str, Any], old_shards: list[str], out: str = ""
) -> None:
    """Move the new files (and the manifest, already written in ``tmp``) into ``root``; delete the old
    dataset's shards that the new one does not replace (``old_shards``: plain shard names only, so
    nothing outside ``root`` and nothing prepare did not write; symbolic links are left alone).

    The manifest moves last: its presence means the dataset is complete.
    """
    new_names = {f["path"] for f in manifest["files"]} | {SKIPPED}
    _check_destinations(fs, root, out or root, [*sorted(new_names), MANIFEST])  # before anything moves
    if file_exists(fs, f"{root}/{MANIFEST}"):
        fs.delete_file(f"{root}/{MANIFEST}")  # from here the old dataset no longer counts as complete
    for name in new_names:
        if file_exists(fs, f"{tmp}/{name}"):
            fs.move(f"{tmp}/{name}", f"{root}/{name}")
        elif file_exists(fs, f"{root}/{name}") and not is_symlink(fs, f"{root}/{name}"):
            fs.delete_file(f"{root}/{name}")  # a stale skipped report
    for name in old_shards:
        path = f"{root}/{name}"
        ours = is_shard_name(name) and name not in new_names and not is_symlink(fs, path)
        if ours and fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    fs.move(f"{tmp}/{MANIFEST}", f"{root}/{MANIFEST}")
