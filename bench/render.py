"""Benchmark: renderer throughput, objects/s (6 views each), for the built-in set's meshes and points.

    python bench/render.py                           # 224 px, 6 views, 48 objects, 5 repetitions
    python bench/render.py --size 128 --objects 96

In one run, on the same objects (the built-in set's first --objects, 2048 points each), median of
--repeats passes over them, single process, one thread:
- mesh, compiled: shaded triangles (`render_mesh`, 2x2 supersampling) by the compiled rasteriser
  (data/render/_raster.c), the built-in set's and mesh folders' views;
- mesh, numpy: the same images by the numpy rasteriser (CROSSMOCO_RASTER=numpy), the fallback;
- depth splats (`render_views`, mode depth): what every point-only source gets by default;
- shaded splats (mode shaded: PCA normals over 16 neighbours, then splats);
the compiled mesh and the splats also with PNG encoding (what prepare stores). Repetitions are interleaved
(every renderer once, then again); ratios are against depth splats of the same run, and the last line is
the compiled rasteriser's speed over the numpy one's.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import crossmoco_ray.data.render.raster as raster  # noqa: E402
from crossmoco_ray.data.render.raster import render_mesh  # noqa: E402
from crossmoco_ray.data.render.splat import RenderSpec, encode_png, render_views  # noqa: E402
from crossmoco_ray.data.synthetic.dataset import synthetic_samples  # noqa: E402


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
    compiled = raster.backend() == "compiled"
    if not compiled:
        print(f"# the compiled rasteriser is unavailable ({raster.backend()} only): no compiled rows")
    specs = {
        **({"mesh, compiled": RenderSpec(size=args.size)} if compiled else {}),
        "mesh, numpy": RenderSpec(size=args.size),
        "depth splats": RenderSpec(size=args.size, mode="depth"),
        "shaded splats": RenderSpec(size=args.size, mode="shaded"),
    }

    def render(kind: str, encode: bool) -> None:
        if kind == "mesh, numpy":
            os.environ[raster.FORCE_NUMPY_ENV] = "numpy"
        try:
            for s in samples:
                if kind.startswith("mesh"):
                    assert s.mesh is not None
                    views = render_mesh(*s.mesh, specs[kind])
                else:
                    views = render_views(s.points, specs[kind])
                if encode:
                    [encode_png(v) for v in views]
        finally:
            if kind == "mesh, numpy":
                del os.environ[raster.FORCE_NUMPY_ENV]

    combos = [(k, e) for e in (False, True) for k in specs if not (e and k == "mesh, numpy")]
    times: dict[str, list[float]] = {f"{k}{' + PNG' if e else ''}": [] for k, e in combos}
    for _ in range(args.repeats):  # interleaved, so that drift of the machine touches every renderer alike
        for (kind, encode), name in zip(combos, times, strict=True):
            t = time.perf_counter()
            render(kind, encode)
            times[name].append(time.perf_counter() - t)
    rates = {name: args.objects / statistics.median(t) for name, t in times.items()}
    print(f"# {platform.processor() or platform.machine()}, {args.objects} built-in objects "
          f"(median {triangles:.0f} triangles, {args.points} points), {args.size} px, 6 views, "
          f"median of {args.repeats}")  # fmt: skip
    print("| renderer | objects/s | vs depth splats |")
    print("|---|---:|---:|")
    for name, rate in rates.items():
        base = rates["depth splats + PNG" if name.endswith("PNG") else "depth splats"]
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")
    if compiled:
        print(f"compiled / numpy rasteriser: {rates['mesh, compiled'] / rates['mesh, numpy']:.1f}x")
    return rates


if __name__ == "__main__":
    main()
