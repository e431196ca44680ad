"""Benchmark: what checking the shards costs when they are read (crossmoco_ray/data/shards/integrity.py).

    python bench/verify_cost.py                          # 2000 objects, 512 points, 128 px renders
    python bench/verify_cost.py --objects 1000 --repeats 9

Prepares the built-in set once (cached under --work; prepare's defaults: 6 views of 128 px, row groups of
256 rows) and times, in one run, the median of --repeats passes of each method, the methods interleaved
so that drift on a shared machine hits all of them alike:

1. reads: an epoch of the pipeline's reads (every row group once, in the pipeline's random windows;
   the mean of --read-epochs epochs per pass), columns id, label, points, views, with
   - ``unchecked``: pyarrow reading the row groups, nothing checked (the pipeline before the checks);
   - ``page CRCs``: the same with Parquet's page checksums verified (``page_checksum_verification``);
   - ``row-group sha256``: the files opened and checked (size, footer digest, metadata) and every row group
     checked against its digest before it is decoded: what the pipeline does;
   - ``file sha256 + read``: every file hashed whole once per epoch, then read unchecked;
2. the local pipeline: an epoch of ``iter_local_batches`` (reads + decoding two views + augmentation, one
   process) with the checks against the same code with them switched off;
3. prepare's re-run check before "up to date" (sizes, footers, metadata: ``check_shards``) against a full
   sha256 of every file.

The ratios are against ``unchecked`` in the same run: the median over the passes of each pass's ratio
(a pass runs every method once, so a slow moment of a shared machine hits both sides of a ratio). Prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq  # noqa: E402

from crossmoco_ray.data.pipeline import batches as pipeline  # noqa: E402
from crossmoco_ray.data.pipeline.batches import (  # noqa: E402
    COLUMNS,
    PipelineOptions,
    epoch_windows,
    iter_local_batches,
    row_groups,
)
from crossmoco_ray.data.prepare.options import PrepareOptions  # noqa: E402
from crossmoco_ray.data.prepare.prepare import prepare  # noqa: E402
from crossmoco_ray.data.shards.integrity import (  # noqa: E402
    ShardFile,
    check_shards,
    open_split,
    read_footer,
    read_row_groups,
)
from crossmoco_ray.data.shards.manifest import file_digest, join_uri, read_manifest  # noqa: E402
from crossmoco_ray.data.sources.formats import SyntheticSource  # noqa: E402
from crossmoco_ray.storage import resolve  # noqa: E402


def unchecked_split(uri: str, manifest: dict[str, Any], split: str) -> tuple[Any, list[ShardFile]]:
    """The split's files opened as the pipeline opened them before the checks: the footer, nothing else
    (entries without digests: :func:`read_row_groups` then reads them with pyarrow, unchecked)."""
    fs, root = resolve(uri)
    out = []
    for entry in manifest["files"]:
        if entry["split"] != split:
            continue
        path = f"{root}/{entry['path']}"
        size = fs.get_file_info(path).size
        with fs.open_input_file(path) as handle:
            _, footer = read_footer(handle, size)
        plain = {k: v for k, v in entry.items() if k not in ("footer_sha256", "row_group_sha256")}
        out.append(ShardFile(join_uri(uri, entry["path"]), path, plain, size, footer))
    return fs, out


def epoch_reads(
    uri: str, manifest: dict[str, Any], opts: PipelineOptions, how: str, epoch: int
) -> tuple[int, int]:
    """One epoch of the pipeline's reads, checked as ``how`` says; returns (rows, bytes of the files)."""
    checked = how == "row-group sha256"
    fs, shards = (open_split if checked else unchecked_split)(uri, manifest, "train")
    if how == "file sha256 + read":
        for shard in shards:
            file_digest(fs, shard.path)
    rows = 0
    for window in epoch_windows(row_groups(shards), opts, epoch):
        by_file: dict[int, list[int]] = {}
        for g in window:
            by_file.setdefault(g.file, []).append(g.index)
        for f, indices in by_file.items():
            if checked:
                table = read_row_groups(fs, shards[f], indices, COLUMNS)
            else:
                with fs.open_input_file(shards[f].path) as handle:
                    reader = pq.ParquetFile(
                        handle, metadata=shards[f].metadata, page_checksum_verification=how == "page CRCs"
                    )
                    table = reader.read_row_groups(indices, columns=COLUMNS)
            rows += table.num_rows
    return rows, sum(s.size for s in shards)


def pipeline_epoch(uri: str, opts: PipelineOptions, checked: bool, epoch: int) -> int:
    """One local pipeline epoch; without ``checked`` the pipeline opens its files unchecked."""
    if not checked:
        pipeline.open_split = unchecked_split  # type: ignore[assignment]
    try:
        return sum(len(b["label"]) for b in iter_local_batches(uri, "train", opts, 32, epoch=epoch))
    finally:
        pipeline.open_split = open_split


def timed(run: Callable[[], Any]) -> tuple[float, float]:
    """(wall-clock s, CPU s of this process, all its threads) of ``run()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "verify_cost")
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--num-points", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=64, help="the pipeline's image side")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--read-epochs", type=int, default=5, help="epochs of reads per timed pass (short)")
    args = parser.parse_args()

    uri = str(args.work / f"synthetic-{args.objects}-{args.num_points}")
    prepare(
        SyntheticSource({"train": args.objects}, args.num_points),
        uri,
        PrepareOptions(),
        log=lambda m: print(m, file=sys.stderr),
    )
    manifest = read_manifest(uri)
    opts = PipelineOptions(num_points=args.num_points, image_size=args.image_size, seed=0)
    reads = ["unchecked", "page CRCs", "row-group sha256", "file sha256 + read"]
    others = ["pipeline unchecked", "pipeline checked", "quick check", "full sha256"]
    wall: dict[str, list[float]] = {name: [] for name in reads + others}
    cpu: dict[str, list[float]] = {name: [] for name in reads + others}

    def record(name: str, run: Callable[[], Any], per: int = 1) -> None:
        w, c = timed(run)
        wall[name].append(w / per)
        cpu[name].append(c / per)

    rows, size = epoch_reads(uri, manifest, opts, "unchecked", 0)  # warm-up: the page cache, imports
    pipeline_epoch(uri, opts, True, 0)
    fs, root = resolve(uri)
    n = args.read_epochs
    for r in range(args.repeats):
        for name in reads:
            epochs = range(r * n, (r + 1) * n)
            record(
                name,
                lambda name=name, epochs=epochs: [epoch_reads(uri, manifest, opts, name, e) for e in epochs],
                n,
            )
        for checked in (False, True):
            label = "pipeline checked" if checked else "pipeline unchecked"
            record(label, lambda checked=checked, r=r: pipeline_epoch(uri, opts, checked, r))
        record("quick check", lambda: check_shards(uri, manifest))
        record("full sha256", lambda: [file_digest(fs, f"{root}/{f['path']}") for f in manifest["files"]])
        print(f"... pass {r + 1}/{args.repeats}", file=sys.stderr, flush=True)

    def ratio(table: dict[str, list[float]], name: str, base: str) -> float:
        """The median over the passes of each pass's ratio ``name / base``."""
        return statistics.median(a / b for a, b in zip(table[name], table[base], strict=True))

    def row(name: str, base: str, digits: int) -> str:
        mw, mc = statistics.median(wall[name]), statistics.median(cpu[name])
        passes = ", ".join(f"{v:.{digits}f}" for v in cpu[name])
        return (
            f"| {name} | {mc:.{digits}f} | {passes} | x{ratio(cpu, name, base):.2f} | "
            f"{mw:.{digits}f} | x{ratio(wall, name, base):.2f} |"
        )

    load = os.getloadavg()[0]
    print(f"\n{date.today().isoformat()}, {cpu_model()}, {os.cpu_count()} CPUs, load average {load:.1f}")
    print(
        f"{args.objects} objects ({len(manifest['files'])} files, {size / 1024**2:.1f} MiB, {rows} rows), "
        f"{args.num_points} points, pipeline images {args.image_size} px; median of {args.repeats} passes. "
        "CPU s: this process's CPU time (all threads), steady on a shared machine; ratios: the median of "
        "the passes' ratios to the unchecked run of the same pass\n"
    )
    head = (
        "| CPU s (median) | CPU s, every pass | vs unchecked (CPU) | wall s (median) | vs unchecked (wall) |"
    )
    print(f"| an epoch of reads {head}")
    print("|---|---:|---|---:|---:|---:|")
    for name in reads:
        print(row(name, "unchecked", 3))
    print(f"\n| a local pipeline epoch {head}")
    print("|---|---:|---|---:|---:|---:|")
    for name in ("pipeline unchecked", "pipeline checked"):
        print(row(name, "pipeline unchecked", 2))
    c, w = (
        ratio(cpu, "pipeline checked", "pipeline unchecked"),
        ratio(wall, "pipeline checked", "pipeline unchecked"),
    )
    print(
        f"\nthe checks cost {100 * (c - 1):+.1f}% of the pipeline's CPU time per epoch "
        f"({100 * (w - 1):+.1f}% of its wall-clock time); "
        f"{rows / statistics.median(wall['pipeline checked']):.0f} samples/s checked, "
        f"{rows / statistics.median(wall['pipeline unchecked']):.0f} unchecked (wall, one process)"
    )
    print(
        f"prepare's re-run check before 'up to date': quick (sizes, footers) "
        f"{1000 * statistics.median(wall['quick check']):.1f} ms, a full sha256 of every file "
        f"{1000 * statistics.median(wall['full sha256']):.1f} ms "
        f"({size / 1024**2:.1f} MiB from the page cache)"
    )


if __name__ == "__main__":
    main()
