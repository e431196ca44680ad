"""Benchmark: renderer throughput, objects/s (6 views each), for the built-in set's meshes and points.

    python bench/render.py                           # 224 px, 6 views, 48 objects, 5 repetitions
    python bench/render.py --size 128 --objects 96

In one run, on the same objects (the built-in set's first --objects, 2048 points each), median of
--repeats passes over them, single process:
- mesh: shaded triangles (`render_mesh`, 2x2 supersampling), the built-in set's and mesh folders' views;
- depth splats (`render_views`, mode depth): what every point-only source gets by default;
- shaded splats (mode shaded: PCA normals over 16 neighbours, then splats);
each with and without PNG encoding (what prepare stores). Ratios are against depth splats of the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crossmoco_ray.data.raster import render_mesh  # noqa: E402
from crossmoco_ray.data.render import RenderSpec, encode_png, render_views  # noqa: E402
from crossmoco_ray.data.synthetic import synthetic_samples  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--objects", type=int, default=48)
    parser.add_argument("--points", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    samples = list(synthetic_samples(args.objects, args.points, seed=0))
    triangles = statistics.median(len(s.mesh[1]) for s in samples if s.mesh is not None)
    specs = {
        "mesh": RenderSpec(size=args.size),
        "depth splats": RenderSpec(size=args.size, mode="depth"),
        "shaded splats": RenderSpec(size=args.size, mode="shaded"),
    }

    def render(kind: str, encode: bool) -> None:
        for s in samples:
            if kind == "mesh":
                assert s.mesh is not None
                views = render_mesh(*s.mesh, specs[kind])
            else:
                views = render_views(s.points, specs[kind])
            if encode:
                [encode_png(v) for v in views]

    rates: dict[str, float] = {}
    for encode in (False, True):
        for kind in specs:
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                render(kind, encode)
                times.append(time.perf_counter() - t)
            rates[f"{kind}{' + PNG' if encode else ''}"] = args.objects / statistics.median(times)
    print(f"# {platform.processor() or platform.machine()}, {args.objects} built-in objects "
          f"(median {triangles:.0f} triangles, {args.points} points), {args.size} px, 6 views, "
          f"median of {args.repeats}")  # fmt: skip
    print("| renderer | objects/s | vs depth splats |")
    print("|---|---:|---:|")
    for name, rate in rates.items():
        base = rates["depth splats + PNG" if name.endswith("PNG") else "depth splats"]
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")
    return rates


if __name__ == "__main__":
    main()
