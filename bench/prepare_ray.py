"""Benchmark: `prepare --ray` throughput with 1 and 2 CPUs against the local path, in one run.

    python bench/prepare_ray.py                      # 192 built-in objects, 128 px, 3 repetitions
    python bench/prepare_ray.py --objects 512 --size 224 --cpus 1,2,4

For each CPU count a local Ray is started with that many CPUs and the built-in set's --objects are
prepared (read, check, render meshes, write shards) into a fresh directory --repeats times; the time of
`prepare` itself is taken (Ray's start is not: it is paid once per cluster). The local path (no Ray) runs
in the same process first, as the baseline. Every Ray run's shards are compared with the local ones (they
must be the same bytes). Prints objects/s, the speed-up over 1 CPU and the driver's peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from crossmoco_ray.data.prepare.options import PrepareOptions  # noqa: E402
from crossmoco_ray.data.prepare.prepare import prepare  # noqa: E402
from crossmoco_ray.data.render.splat import RenderSpec  # noqa: E402
from crossmoco_ray.data.sources.formats import open_source  # noqa: E402


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.glob("*.parquet")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--objects", type=int, default=192)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--points", type=int, default=2048)
    parser.add_argument("--cpus", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import ray

    from crossmoco_ray.data.prepare.on_ray import start_ray

    source = open_source("synthetic", synthetic_counts={"train": args.objects}, num_points=args.points)
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    quiet = {"log": lambda m: None}

    def timed(tag: str, ray_on: bool) -> tuple[float, str]:
        times, digests = [], set()
        for r in range(args.repeats):
            out = work / f"{tag}-{r}"
            opts = PrepareOptions(render=RenderSpec(size=args.size), num_points=args.points, ray=ray_on)
            t = time.perf_counter()
            prepare(source, str(out), opts, **quiet)
            times.append(time.perf_counter() - t)
            digests.add(digest(out))
            shutil.rmtree(out)
        assert len(digests) == 1, f"{tag}: repetitions differ"
        return args.objects / statistics.median(times), digests.pop()

    try:
        rates: dict[str, float] = {}
        rates["local (no Ray)"], reference = timed("local", False)
        for cpus in [int(c) for c in args.cpus.split(",")]:
            start_ray(cpus, log=lambda m: None)
            rates[f"Ray, {cpus} CPU"], got = timed(f"ray{cpus}", True)
            ray.shutdown()
            assert got == reference, f"Ray with {cpus} CPUs wrote different shards"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one = next(v for k, v in rates.items() if k.startswith("Ray, 1 "))
    print(f"# {args.objects} built-in objects, {args.size} px, 6 views; median of {args.repeats}; "
          f"shards identical to the local path: yes")  # fmt: skip
    print("| path | objects/s | vs Ray, 1 CPU |")
    print("|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / one:.2f}x |")
    print(f"driver peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return rates


if __name__ == "__main__":
    main()
