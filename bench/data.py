"""Benchmark: the Ray Data input pipeline against plain torch DataLoaders reading the same shards.

    python bench/data.py                                 # quickstart sizes (512 points, 64 px)
    python bench/data.py --num-points 2048 --image-size 224 --objects 1000 --memory-objects 4000

1. Prepares the built-in synthetic set once (cached under --work): --objects for throughput,
   --memory-objects for the memory runs.
2. Throughput, in one run, median of --repeats epochs each: samples/s per CPU of
   - Ray Data (`make_dataset`: per-epoch random windows of row groups → map_batches(make_batch)) on
     --cpus CPUs, the window sized as `crossmoco pretrain` sizes it (data.shuffle_window_mb, --window-mb);
   - a torch DataLoader over single rows (per-sample transforms, as CrossPoint's loader), --cpus workers;
   - a torch DataLoader over row groups with the same batched `make_batch`, --cpus workers.
3. Memory of one streaming epoch over 1× and 10× the data (10× = every shard listed ten times): the peak
   proportional set size (PSS) of the driver plus every Ray process, sampled every 0.2 s, and the PSS of
   the idle cluster before the epoch. The 1× epoch must be long enough to reach the pipeline's steady
   state (the cluster's memory plateaus after ~15 s of streaming here), otherwise it measures the warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")  # as the launcher sets it: few files

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info  # noqa: E402

from crossmoco_ray.data.pipeline.batches import (  # noqa: E402
    PipelineOptions,
    make_batch,
    make_dataset,
    split_files,
    window_rows,
)
from crossmoco_ray.data.prepare.options import PrepareOptions  # noqa: E402
from crossmoco_ray.data.prepare.prepare import prepare  # noqa: E402
from crossmoco_ray.data.shards.manifest import read_manifest, seal  # noqa: E402
from crossmoco_ray.data.sources.formats import SyntheticSource  # noqa: E402


def row_columns(table: Any) -> dict[str, Any]:
    """A row group (pyarrow Table) → the column dict ``make_batch`` takes."""
    return {
        "id": table.column("id").to_pylist(),
        "label": table.column("label").to_numpy(),
        "points": table.column("points").combine_chunks().to_numpy_ndarray(),
        "views": table.column("views").to_pylist(),
    }


class RowDataset(Dataset):
    """Map-style: one row per item, transforms per sample (how CrossPoint's loader works)."""

    def __init__(self, paths: list[str], opts: PipelineOptions) -> None:
        self.paths, self.opts = paths, opts
        self.index = [(p, g, r) for p in paths for g in range(pq.ParquetFile(p).num_row_groups)
                      for r in range(pq.ParquetFile(p).metadata.row_group(g).num_rows)]  # fmt: skip
        self._files: dict[str, pq.ParquetFile] = {}
        self._group: tuple[str, int, dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, g, r = self.index[i]
        if self._group is None or self._group[:2] != (path, g):  # cache the last row group read
            f = self._files.setdefault(path, pq.ParquetFile(path))
            self._group = (path, g, row_columns(f.read_row_group(g)))
        cols = self._group[2]
        one = {"id": cols["id"][r : r + 1], "label": cols["label"][r : r + 1],
               "points": cols["points"][r : r + 1], "views": cols["views"][r : r + 1]}  # fmt: skip
        out = make_batch(one, self.opts)
        return {k: v[0] for k, v in out.items()}


class RowGroupDataset(IterableDataset):
    """Iterable: each worker reads its share of row groups and runs the batched ``make_batch``."""

    def __init__(self, paths: list[str], opts: PipelineOptions) -> None:
        self.paths, self.opts = paths, opts
        self.groups = [(p, g) for p in paths for g in range(pq.ParquetFile(p).num_row_groups)]

    def __iter__(self):  # type: ignore[no-untyped-def]
        info = get_worker_info()
        mine = self.groups if info is None else self.groups[info.id :: info.num_workers]
        for path, g in mine:
            yield make_batch(row_columns(pq.ParquetFile(path).read_row_group(g)), self.opts)


def time_epoch(batches: Any) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for b in batches:
        n += len(b["label"])
    return time.perf_counter() - t0, n


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux /proc)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parent[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [pid], [pid]
    while frontier:
        frontier = [c for c, p in parent.items() if p in frontier]
        out += frontier
    return out


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PssSampler:
    """Peak PSS (MiB) of this process and all its descendants (the local Ray cluster included)."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak, self._stop = every, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> float:
        return sum(pss_kib(p) for p in descendants(os.getpid())) / 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(self.every)

    def __enter__(self) -> PssSampler:
        self.peak = self.start = self._total()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def replicate(src: Path, dst: Path, times: int) -> None:
    """A dataset listing every shard of ``src`` ``times`` times (hard links: no extra disk), named and
    counted as a prepared dataset is (readers accept nothing else) and sealed again."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    manifest = read_manifest(str(src))
    files: list[dict[str, Any]] = []
    for _ in range(times):
        for info in manifest["files"]:
            name = f"{info['split']}-{sum(f['split'] == info['split'] for f in files):05d}.parquet"
            os.link(src / info["path"], dst / name)
            files.append({**info, "path": name})
    counts = {
        split: {"total": c["total"] * times, "per_class": {k: v * times for k, v in c["per_class"].items()}}
        for split, c in manifest["counts"].items()
    }
    copy = {**manifest, "files": files, "counts": counts, "fingerprint": "replicated"}
    (dst / "manifest.json").write_text(json.dumps(seal(copy)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "data")
    parser.add_argument("--objects", type=int, default=2000, help="objects of the throughput dataset")
    parser.add_argument("--memory-objects", type=int, default=10000, help="objects of the 1x memory dataset")
    parser.add_argument("--num-points", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs and DataLoader workers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--window-mb", type=float, default=256.0, help="data.shuffle_window_mb (default 256)")
    args = parser.parse_args()

    import ray

    def synthetic(objects: int) -> Path:
        out = args.work / f"synthetic-{objects}-{args.num_points}"
        source = SyntheticSource({"train": objects}, args.num_points)
        prepare(source, str(out), PrepareOptions(), log=lambda m: print(m, file=sys.stderr))
        return out

    shards, memory_shards = synthetic(args.objects), synthetic(args.memory_objects)
    window = window_rows(args.window_mb, read_manifest(str(memory_shards)), "train")
    opts = PipelineOptions(
        num_points=args.num_points, image_size=args.image_size, read_batch=64, shuffle_window=window
    )
    print(f"shuffle window: {window} rows ({args.window_mb:g} MiB)", file=sys.stderr)
    _, paths, _ = split_files(str(shards), "train", opts)
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)

    def ray_epoch() -> tuple[float, int]:
        ds = make_dataset(str(shards), "train", opts)
        return time_epoch(ds.iter_batches(batch_size=args.batch, drop_last=True))

    def rows_epoch() -> tuple[float, int]:
        loader = DataLoader(RowDataset(paths, opts), batch_size=args.batch, shuffle=True, drop_last=True,
                            num_workers=args.cpus, persistent_workers=False)  # fmt: skip
        return time_epoch(loader)

    def groups_epoch() -> tuple[float, int]:
        loader = DataLoader(RowGroupDataset(paths, opts), batch_size=None, num_workers=args.cpus)
        return time_epoch(loader)

    results: dict[str, list[float]] = {"ray_data": [], "dataloader_rows": [], "dataloader_rowgroups": []}
    runners = {"ray_data": ray_epoch, "dataloader_rows": rows_epoch, "dataloader_rowgroups": groups_epoch}
    ray_epoch()  # warm-up: worker processes, imports
    for _ in range(args.repeats):  # interleaved, so drift hits every method alike
        for name, run in runners.items():
            seconds, n = run()
            results[name].append(n / seconds / args.cpus)
            print(f"... {name}: {n / seconds:.1f} samples/s", file=sys.stderr, flush=True)

    memory = {}
    tenfold = args.work / f"synthetic-{args.memory_objects}-{args.num_points}-x10"
    replicate(memory_shards, tenfold, 10)
    for label, root in (("1x", memory_shards), ("10x", tenfold)):
        ds = make_dataset(str(root), "train", opts)
        with PssSampler() as sampler:
            seconds, n = time_epoch(ds.iter_batches(batch_size=args.batch, drop_last=True))
        memory[label] = {"peak_pss_mib": sampler.peak, "idle_pss_mib": sampler.start, "samples": n,
                         "seconds": seconds}  # fmt: skip
        print(f"... memory {label}: {sampler.peak:.0f} MiB over {n} samples", file=sys.stderr, flush=True)
    ray.shutdown()

    print(f"\nthroughput: {args.objects} objects, {args.num_points} points, {args.image_size} px, "
          f"batch {args.batch}, {args.cpus} CPUs; median of {args.repeats} epochs\n")  # fmt: skip
    print("| loader | samples/s per CPU (median) | all epochs | vs Ray Data |")
    print("|---|---:|---|---:|")
    base = statistics.median(results["ray_data"])
    for name, values in results.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.1f} | {', '.join(f'{v:.1f}' for v in values)} | x{med / base:.2f} |")
    print(f"\nmemory: 1x = {args.memory_objects} objects, 10x = every shard ten times\n")
    print("| data | samples in the epoch | epoch s | idle PSS MiB | peak PSS MiB (driver + Ray) |")
    print("|---|---:|---:|---:|---:|")
    for label, m in memory.items():
        row = [
            label,
            m["samples"],
            f"{m['seconds']:.1f}",
            f"{m['idle_pss_mib']:.0f}",
            f"{m['peak_pss_mib']:.0f}",
        ]
        print("| " + " | ".join(map(str, row)) + " |")
    print(f"\nmemory growth 10x / 1x: x{memory['10x']['peak_pss_mib'] / memory['1x']['peak_pss_mib']:.2f}")


if __name__ == "__main__":
    main()
