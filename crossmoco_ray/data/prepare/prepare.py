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

This module is the driver: it runs both passes in order and decides what depends on more than one
sample. The pieces live beside it: :mod:`.options` (the options and the fingerprint), :mod:`.per_sample`
(read, check, resample, render one sample; :mod:`.sample_checks` holds the checks), :mod:`.on_ray` (that
work on Ray Data), :mod:`.shuffle`, :mod:`.skip_report` (``skipped.json``), :mod:`.destination` (what may
be written where; the commit into ``out``), :mod:`.workdir` (the work directory), and in
:mod:`crossmoco_ray.data.shards` the writer (rows → Parquet files), the manifest and the integrity checks
(reading the shards back checked); :mod:`crossmoco_ray.storage` (paths and URIs).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from crossmoco_ray import __version__
from crossmoco_ray.bounded import printable
from crossmoco_ray.data.prepare.destination import (
    check_destinations,
    commit_dataset,
    listed_shards,
    out_problem,
    preview_problem,
)
from crossmoco_ray.data.prepare.options import PrepareOptions, fingerprint
from crossmoco_ray.data.prepare.per_sample import Processed, preview_views, processed_locally
from crossmoco_ray.data.prepare.sample_checks import val_assignment
from crossmoco_ray.data.prepare.shuffle import Buckets, bucket_count
from crossmoco_ray.data.prepare.skip_report import SkipReport
from crossmoco_ray.data.prepare.workdir import WorkDir, exit_on_sigterm, remove_stale, terminate_as_exit
from crossmoco_ray.data.progress import Progress
from crossmoco_ray.data.render.splat import contact_sheet
from crossmoco_ray.data.shards.integrity import check_shards
from crossmoco_ray.data.shards.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    SKIPPED,
    file_exists,
    join_uri,
    read_manifest,
    seal,
)
from crossmoco_ray.data.shards.writer import ShardWriter
from crossmoco_ray.data.sources.base import Source
from crossmoco_ray.errors import DataError
from crossmoco_ray.storage import resolve, write_json


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
    check_destinations(fs, root, out, [MANIFEST, SKIPPED])
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
        old_shards = listed_shards(out)
    with terminate_as_exit():
        work = WorkDir(fs, root, out)
        try:
            manifest, preview = _write(source, fs, work, opts, fp, log)
            manifest = seal(json.loads(json.dumps(manifest)))  # sealed as a reader will see it
            write_json(join_uri(work.uri, MANIFEST), manifest)  # inside the work dir: not yet a dataset
            commit_dataset(fs, root, work.path, manifest, old_shards, out)
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
    skipped = SkipReport(fs, f"{tmp}/{SKIPPED}")
    num_points, num_views = opts.num_points, None
    preview: list[tuple[int, list[np.ndarray]]] = []
    local = isinstance(fs, pafs.LocalFileSystem)
    meshes = opts.meshes and source.has_meshes() and not opts.render.points_only  # a mesh column is written
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
                fs, tmp, out_split, num_points, opts.rows_per_shard, opts.row_group_rows, meshes
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
                sink(out_split, expected).add(item.id, label, pts, views, item.mesh)
                counts.setdefault(out_split, Counter())[label] += 1
                new_class = label not in {lab for lab, _ in preview}
                if opts.preview and len(preview) < opts.preview_objects and new_class:
                    preview.append((label, preview_views(item, opts.render)))
            progress.close()
        if not counts or num_points is None:
            raise DataError(f"{source.format} source", "no valid samples to write")
        for out_split, bucket in buckets.items():  # pass 2
            writers[out_split] = ShardWriter(
                fs, tmp, out_split, num_points, opts.rows_per_shard, opts.row_group_rows, meshes
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
        "store": opts.store,
        "meshes": meshes,
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
