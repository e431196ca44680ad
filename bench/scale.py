"""Benchmark: the streaming pipeline with views rendered on the fly, on a 20,000-mesh corpus (issue 29).

    python bench/scale.py                 # the measurement (needs a quiet machine)
    python bench/scale.py --prepare-only  # make the corpora (cached under --work), nothing measured
    python bench/scale.py --quick         # smoke test: tiny corpora, one repetition (< 60 s)

1. Corpora, prepared once (cached under --work by prepare's fingerprint), all the built-in synthetic set:
   - --objects (20,000) and --objects/10 (2,000) meshes, `prepare --store meshes` (no renders), --points each;
   - --objects/10 (2,000) with stored renders (`--store renders`, --render-size px, 6 views): the reference;
   - --objects/10 (2,000) meshes and as many stored 224-px renders, 2,048 points each: the paper-sized arms.
2. Throughput, objects/s, of `make_dataset` (read windows → map_batches(make_batch)) iterated in batches of
   --batch, with the options `crossmoco pretrain` builds from the quickstart preset (`pipeline_options`: 256
   points, views rendered at 64 px and resized to 32 px, 2 views per object, read_batch 64, the read window
   sized from data.shuffle_window_mb and the shards' bytes per row), on a local Ray with 1 CPU and with
   2 CPUs, each in its own process (its own Ray session). Arms, interleaved in each repetition:
   - fresh: meshes of the 20,000 corpus, rendered from new random viewpoints (data.render.viewpoints=fresh);
   - stored: the 2,000 stored-renders corpus, two of six PNGs decoded (data.render.viewpoints=stored);
   - paper sizes (2,048 points, 224 px), fresh: views rendered at 224 px (the 2,000-mesh corpus of 2,048
     points); stored: 2 of 6 stored 224-px PNGs (a 2,000-object renders corpus of 2,048 points).
   Each repetition is a new epoch limited to --warmup + --batches batches (--paper-batches for the paper
   arms); the first --warmup batches (planning, task start, the window's read) are not timed. Median of
   --repeats repetitions, after one untimed repetition per arm (none with --quick).
3. Memory of one streaming epoch (2 CPUs, its own Ray session): the peak PSS of the driver and every Ray
   process (bench/data.py's sampler) over the 2,000-mesh and the 20,000-mesh corpus, fresh viewpoints; and,
   over the 2,000 corpus, --objects/(--objects/10) epochs in a row: as many objects streamed as the 20,000
   epoch, so the corpus size is the only difference.
4. Cost per object in CPU time of one thread (no Ray; numpy's and BLAS's threads held to one, as in a Ray
   task of 1 CPU): `make_batch` of every arm (--cost-objects rows, in read_batch chunks); `render_object` at
   224 px, 2 fresh views and 6 grid views, on the built-in meshes and on a 20,480-face sphere. CPU time, not
   wall time, so other work on the machine inflates it far less. Bytes: mean PNG of one 224-px view as
   prepare encodes it; the mesh cell (raw and zstd) of the corpus and of the sphere.
   --parts picks the measurements (throughput, memory, cost, render); the mesh table is always printed.

``--in-process`` runs the measurements in this process on the Ray already started (tests): the CPU counts
are then Ray Data resource limits on that cluster, not separate sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
for _threads in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy: one thread
    os.environ.setdefault(_threads, "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from data import PssSampler, row_columns, time_epoch  # noqa: E402  (bench/data.py)

from crossmoco_ray.config.loading import load_config  # noqa: E402
from crossmoco_ray.data.pipeline.batches import PipelineOptions, make_batch, make_dataset  # noqa: E402
from crossmoco_ray.data.prepare.options import PrepareOptions  # noqa: E402
from crossmoco_ray.data.prepare.prepare import prepare  # noqa: E402
from crossmoco_ray.data.render import raster  # noqa: E402
from crossmoco_ray.data.render.camera import RenderSpec  # noqa: E402
from crossmoco_ray.data.render.splat import encode_png  # noqa: E402
from crossmoco_ray.data.render.viewpoints import Viewpoints, render_object  # noqa: E402
from crossmoco_ray.data.shards.manifest import read_manifest, stores_meshes  # noqa: E402
from crossmoco_ray.data.shards.meshes import HEADER, encode_mesh  # noqa: E402
from crossmoco_ray.data.sources.formats import SyntheticSource  # noqa: E402
from crossmoco_ray.data.synthetic.dataset import synthetic_samples  # noqa: E402
from crossmoco_ray.pretrain.launch import pipeline_options  # noqa: E402
from crossmoco_ray.ray_session import start_local_ray  # noqa: E402

PAPER_POINTS = 2048


# ---------------------------------------------------------------------------------------------- corpora


def corpus(work: Path, store: str, objects: int, points: int, render_size: int) -> Path:
    """The built-in set's ``objects`` train objects prepared with ``--store store`` (cached: prepare is a
    no-op when its fingerprint matches)."""
    name = f"{store}-{objects}-{points}" + (f"-{render_size}px" if store != "meshes" else "")
    out = work / name
    opts = PrepareOptions(store=store, render=RenderSpec(size=render_size))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    prepare(SyntheticSource({"train": objects}, points, seed=0), str(out), opts, log=lambda m: None)
    took = time.perf_counter() - t0
    if took > 5:
        print(f"... prepared {name} in {took:.0f} s", file=sys.stderr, flush=True)
    return out


def corpora(args: argparse.Namespace) -> dict[str, Path]:
    small = max(1, args.objects // 10)
    return {
        "meshes_large": corpus(args.work, "meshes", args.objects, args.points, args.render_size),
        "meshes_small": corpus(args.work, "meshes", small, args.points, args.render_size),
        "renders_small": corpus(args.work, "renders", small, args.points, args.render_size),
        "meshes_paper": corpus(args.work, "meshes", small, PAPER_POINTS, args.render_size),
        "renders_paper": corpus(args.work, "renders", small, PAPER_POINTS, args.paper_size),
    }


def mesh_stats(root: Path) -> dict[str, float]:
    """Per object of a meshes corpus: the mesh cell's raw bytes and its bytes in the shards (zstd, from the
    Parquet footers), the row's bytes in the shards, mean vertices and faces."""
    manifest = read_manifest(str(root))
    files = [root / f["path"] for f in manifest["files"]]
    rows = compressed = 0
    for path in files:
        meta = pq.ParquetFile(path).metadata
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                if group.column(c).path_in_schema == "mesh":
                    compressed += group.column(c).total_compressed_size
    cells = pq.read_table(files[0], columns=["mesh"]).column("mesh").to_pylist()
    counts = np.array([HEADER.unpack_from(cell)[1:3] for cell in cells], dtype=np.float64)
    return {
        "objects": rows,
        "cell_bytes_raw": float(np.mean([len(c) for c in cells])),
        "cell_bytes_zstd": compressed / rows,
        "row_bytes": sum(f["bytes"] for f in manifest["files"]) / rows,
        "vertices": float(counts[:, 0].mean()),
        "faces": float(counts[:, 1].mean()),
    }


# ------------------------------------------------------------------------------------------- throughput


def options(
    root: Path,
    viewpoints: str,
    render_size: int,
    image_size: int,
    points: int,
    window_mb: float | None = None,
) -> PipelineOptions:
    """What ``crossmoco pretrain --preset quickstart`` builds for these shards (window sized from them;
    ``window_mb``: data.shuffle_window_mb instead of the preset's)."""
    window = [f"data.shuffle_window_mb={window_mb}"] if window_mb else []
    cfg = load_config(
        "quickstart",
        overrides=[
            f"data.render.viewpoints={viewpoints}",
            f"data.render.size={render_size}",
            f"data.image_size={image_size}",
            f"data.num_points={points}",
            f"eval.num_points={points}",
            *window,
        ],
    )
    return pipeline_options(cfg, read_manifest(str(root)))


def arms(paths: dict[str, Path], args: argparse.Namespace) -> dict[str, tuple[Path, PipelineOptions, int]]:
    """name → (shards, options, timed batches)."""
    paper = args.paper_size
    return {
        "fresh": (
            paths["meshes_large"],
            options(paths["meshes_large"], "fresh", args.render_size, args.image_size, args.points),
            args.batches,
        ),
        "stored": (
            paths["renders_small"],
            options(paths["renders_small"], "stored", args.render_size, args.image_size, args.points),
            args.batches,
        ),
        "fresh_paper": (
            paths["meshes_paper"],
            options(paths["meshes_paper"], "fresh", paper, paper, PAPER_POINTS),
            args.paper_batches,
        ),
        "stored_paper": (
            paths["renders_paper"],
            options(paths["renders_paper"], "stored", paper, paper, PAPER_POINTS),
            args.paper_batches,
        ),
    }


def limited(ds: Any, cpus: int | None) -> Any:
    """In-process runs: Ray Data may use at most ``cpus`` of the cluster's CPUs."""
    if cpus is not None:
        from ray.data import ExecutionResources

        opts = ds.context.execution_options
        opts.resource_limits = opts.resource_limits.min(ExecutionResources.for_limits(cpu=cpus))
    return ds


def timed_batches(root: Path, opts: PipelineOptions, args: argparse.Namespace, batches: int,
                  cpus: int | None) -> float:  # fmt: skip
    """objects/s over ``batches`` batches of a new epoch, after its first ``--warmup`` batches."""
    ds = limited(make_dataset(str(root), "train", opts), cpus).limit((args.warmup + batches) * args.batch)
    seen, t0 = 0, 0.0
    for i, b in enumerate(ds.iter_batches(batch_size=args.batch, drop_last=True)):
        if i == args.warmup:
            t0 = time.perf_counter()
        if i >= args.warmup:
            seen += len(b["label"])
    if seen < batches * args.batch:
        raise RuntimeError(f"{root}: the epoch ended after {seen} timed objects (fewer than asked)")
    return seen / (time.perf_counter() - t0)


def throughput(args: argparse.Namespace, cpus: int, in_process: bool) -> dict[str, list[float]]:
    """Per arm, objects/s of each timed repetition, on ``cpus`` CPUs (arms interleaved per repetition)."""
    plan = arms(corpora(args), args)
    limit = cpus if in_process else None
    out: dict[str, list[float]] = {name: [] for name in plan}
    for root, opts, n in plan.values() if not args.quick else ():  # untimed: workers, imports, the rasteriser
        timed_batches(root, opts, args, n, limit)
    for _ in range(args.repeats):
        for name, (root, opts, n) in plan.items():
            out[name].append(timed_batches(root, opts, args, n, limit))
            print(f"... {cpus} CPU {name}: {out[name][-1]:.1f} objects/s", file=sys.stderr, flush=True)
    return out


def pipeline_cost(args: argparse.Namespace) -> dict[str, float]:
    """Per arm, CPU ms per object of ``make_batch`` alone (no Ray: this thread's CPU time, so other work on
    the machine inflates it far less than wall time), median of --repeats passes over the first
    --cost-objects rows, in chunks of read_batch rows as the pipeline's map tasks take them."""
    out = {}
    for name, (root, opts, _) in arms(corpora(args), args).items():
        opts = replace(opts, meshes=stores_meshes(read_manifest(str(root))))
        files = [root / f["path"] for f in read_manifest(str(root))["files"]]
        table = pq.read_table(files[0], columns=opts.columns).slice(0, args.cost_objects)
        chunks = [columns(table.slice(a, opts.read_batch)) for a in range(0, table.num_rows, opts.read_batch)]
        make_batch(chunks[0], opts)  # the compiled rasteriser's first load
        times = []
        for _ in range(args.repeats):
            t0 = time.thread_time()
            for chunk in chunks:
                make_batch(chunk, opts)
            times.append((time.thread_time() - t0) / table.num_rows * 1000)
        out[name] = statistics.median(times)
        print(f"... CPU cost {name}: {out[name]:.2f} ms per object", file=sys.stderr, flush=True)
    return out


def columns(table: pa.Table) -> dict[str, Any]:
    """Shard rows → the column dict ``make_batch`` takes (bench/data.py's, plus the mesh column)."""
    cols = row_columns(table)
    if "mesh" in table.column_names:
        cols["mesh"] = table.column("mesh").to_pylist()
    return cols


# ----------------------------------------------------------------------------------------------- memory


def memory(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Peak PSS (driver + Ray) of a streaming epoch over the small and the large meshes corpus, fresh
    viewpoints; and of as many epochs of the small one as stream the large one's objects."""
    paths = corpora(args)
    small, large = paths["meshes_small"], paths["meshes_large"]
    times = args.objects // max(1, args.objects // 10)
    runs = {
        "small, 1 epoch": (small, 1),
        f"small, {times} epochs": (small, times),
        "large, 1 epoch": (large, 1),
    }
    out: dict[str, dict[str, float]] = {}
    for label, (root, epochs) in runs.items():
        opts = options(root, "fresh", args.render_size, args.image_size, args.points, args.window_mb)
        ds = make_dataset(str(root), "train", opts)
        seconds = samples = 0.0
        with PssSampler() as sampler:
            for _ in range(epochs):
                s, n = time_epoch(ds.iter_batches(batch_size=args.batch, drop_last=True))
                seconds, samples = seconds + s, samples + n
        out[label] = {
            "objects": float(read_manifest(str(root))["counts"]["train"]["total"]),
            "epochs": float(epochs),
            "window_rows": float(opts.shuffle_window),
            "samples": samples,
            "seconds": seconds,
            "idle_pss_mib": sampler.start,
            "peak_pss_mib": sampler.peak,
        }
        print(f"... memory {label}: {sampler.peak:.0f} MiB peak over {samples:.0f} objects", file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------------ render cost


def sphere(subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    """An icosphere: 20·4^subdivisions faces (5 → 20,480), vertices shared."""
    t = (1 + 5**0.5) / 2
    verts = [
        (-1, t, 0),
        (1, t, 0),
        (-1, -t, 0),
        (1, -t, 0),
        (0, -1, t),
        (0, 1, t),
        (0, -1, -t),
        (0, 1, -t),
        (t, 0, -1),
        (t, 0, 1),
        (-t, 0, -1),
        (-t, 0, 1),
    ]
    faces = [
        (0, 11, 5),
        (0, 5, 1),
        (0, 1, 7),
        (0, 7, 10),
        (0, 10, 11),
        (1, 5, 9),
        (5, 11, 4),
        (11, 10, 2),
        (10, 7, 6),
        (7, 1, 8),
        (3, 9, 4),
        (3, 4, 2),
        (3, 2, 6),
        (3, 6, 8),
        (3, 8, 9),
        (4, 9, 5),
        (2, 4, 11),
        (6, 2, 10),
        (8, 6, 7),
        (9, 8, 1),
    ]
    vs = [np.asarray(v, dtype=np.float64) / np.linalg.norm(v) for v in verts]
    middle: dict[tuple[int, int], int] = {}  # edge → its midpoint's vertex (shared by both faces)

    def mid(a: int, b: int) -> int:
        key = (min(a, b), max(a, b))
        if key not in middle:
            m = vs[a] + vs[b]
            vs.append(m / np.linalg.norm(m))
            middle[key] = len(vs) - 1
        return middle[key]

    for _ in range(subdivisions):
        middle.clear()
        new = []
        for a, b, c in faces:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            new += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = new
    return np.asarray(vs, dtype=np.float32), np.asarray(faces, dtype=np.int64)


def render_cost(args: argparse.Namespace) -> dict[str, Any]:
    """CPU ms per object (this thread's CPU time, median of --repeats passes) of 2 fresh and 6 grid views at
    --paper-size px, for the built-in meshes and a 20,480-face sphere; PNG bytes of one view; cell bytes."""
    size, n = args.paper_size, args.render_objects
    meshes = [s.mesh for s in synthetic_samples(n, 256, seed=0) if s.mesh is not None]
    big = sphere(args.sphere_subdivisions)
    fresh = Viewpoints(spec=RenderSpec(size=size))
    grid = RenderSpec(size=size)
    six = [
        RenderSpec(size=size, azimuths=(a,), elevations=(e,)) for e in grid.elevations for a in grid.azimuths
    ]
    rng = np.random.default_rng(0)
    points = np.zeros((256, 3), dtype=np.float32)

    def per_object(objs: list[tuple[np.ndarray, np.ndarray]], views: str) -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.thread_time()
            for mesh in objs:
                specs = fresh.specs(rng, 2) if views == "2 fresh" else six
                render_object(specs, points, mesh)
            times.append((time.thread_time() - t0) / len(objs) * 1000)
        return statistics.median(times)

    rows = {}
    for label, objs in (("built-in meshes", meshes), (f"sphere, {len(big[1])} faces", [big])):
        for views in ("2 fresh", "6 grid"):
            rows[f"{label}, {views}"] = per_object(objs, views)
    pngs = [len(encode_png(img)) for mesh in meshes for img in render_object(six, points, mesh)]
    sphere_pngs = [len(encode_png(img)) for img in render_object(six, points, big)]
    cell = encode_mesh(*big)
    corpus_faces = statistics.mean(len(m[1]) for m in meshes)
    return {
        "size": size,
        "backend": raster.backend(),
        "ms_per_object": rows,
        "builtin_mean_faces": corpus_faces,
        "sphere_faces": len(big[1]),
        "png_bytes_per_view": statistics.mean(pngs),
        "sphere_png_bytes_per_view": statistics.mean(sphere_pngs),
        "sphere_cell_raw": len(cell),
        "sphere_cell_zstd": len(pa.compress(cell, codec="zstd", asbytes=True)),
    }


# ------------------------------------------------------------------------------------------------- main


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process, on its own local Ray of ``--cpus`` CPUs, started as ``crossmoco
    pretrain`` starts one (loopback only, token authentication, private session files)."""
    import ray

    start_local_ray(args.cpus, log=lambda m: print(m, file=sys.stderr), dashboard=False)
    try:
        if args.child == "throughput":
            return {"throughput": throughput(args, args.cpus, in_process=False)}
        return {"memory": memory(args)}
    finally:
        ray.shutdown()


def run_child(argv: list[str], kind: str, cpus: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", kind, "--cpus", str(cpus)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode})")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "scale")
    parser.add_argument(
        "--objects", type=int, default=20_000, help="the large corpus (the small one: a tenth)"
    )
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--render-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--paper-size", type=int, default=224, help="render and image size of the paper row")
    parser.add_argument("--batch", type=int, default=32, help="rows per iterated batch (quickstart's global)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed batches at the start of each epoch")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per repetition")
    parser.add_argument("--paper-batches", type=int, default=10, help="timed batches of the paper arm")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--render-objects", type=int, default=48)
    parser.add_argument("--sphere-subdivisions", type=int, default=5)
    parser.add_argument("--cost-objects", type=int, default=256, help="rows of the CPU-time measurement")
    parser.add_argument("--parts", default="throughput,memory,cost,render", help="which measurements")
    parser.add_argument(
        "--window-mb",
        type=float,
        help="memory runs: data.shuffle_window_mb (default: the preset's 256 MiB, which holds all 20,000 "
        "meshes' rows: memory then grows with the corpus up to the window by design)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--in-process", action="store_true", help="measure on the Ray this process runs")
    parser.add_argument("--child", choices=["throughput", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--cpus", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    passed = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        quick = dict(objects=320, warmup=1, batches=2, paper_batches=1, repeats=1, render_objects=2,
                     sphere_subdivisions=2, paper_size=48, batch=8, cost_objects=16)  # fmt: skip
        for key, value in quick.items():
            setattr(args, key, value)
        if args.work == parser.get_default("work"):
            args.work = ROOT / "bench" / "out" / "scale-quick"
    return args, passed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, passed = parse(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    t_start = time.perf_counter()
    paths = corpora(args)
    stats = {name: mesh_stats(path) for name, path in paths.items() if name.startswith("meshes")}
    if args.prepare_only:
        print(json.dumps(stats, indent=1))
        return {"mesh_stats": stats}
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {"mesh_stats": stats}
    if args.in_process and parts & {"throughput", "memory"}:
        import ray

        if not ray.is_initialized():
            ray.init(address="local", num_cpus=2, include_dashboard=False)
    if "throughput" in parts:
        result["throughput"] = {
            cpus: throughput(args, cpus, in_process=True)
            if args.in_process
            else run_child(passed, "throughput", cpus)["throughput"]
            for cpus in (1, 2)
        }
    if "memory" in parts:
        result["memory"] = memory(args) if args.in_process else run_child(passed, "memory", 2)["memory"]
    if "cost" in parts:
        result["pipeline_cost"] = pipeline_cost(args)
    if "render" in parts:
        result["render_cost"] = render_cost(args)
    report(args, result, time.perf_counter() - t_start)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "scale.json").write_text(json.dumps(result, indent=1))
    return result


def cpu() -> str:
    """The CPU's model name and whether it has AVX-512 and AMX (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), ""
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []
    )
    wide = [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")]
    return f"{model or platform.machine()} ({', '.join(wide) or 'no avx2'})"


def table(header: list[str], rows: list[list[Any]], text: tuple[int, ...] = (0,)) -> None:
    """A markdown table (the columns ``text`` left-aligned, the others right-aligned)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i in text else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def report(args: argparse.Namespace, r: dict[str, Any], seconds: float) -> None:
    small, size, image, paper = args.objects // 10, args.render_size, args.image_size, args.paper_size
    print(f"\n# {cpu()}, {os.cpu_count()} CPUs; {seconds:.0f} s in all\n")
    labels = {
        "fresh": f"fresh viewpoints: {args.objects} meshes, {args.points} points, {size} px → {image} px",
        "stored": f"stored renders: {small} objects, {args.points} points, 2 of 6 PNGs, {size} → {image} px",
        "fresh_paper": f"fresh viewpoints: {small} meshes, {PAPER_POINTS} points, {paper} px",
        "stored_paper": f"stored renders: {small} objects, {PAPER_POINTS} points, 2 of 6 PNGs, {paper} px",
    }
    if "throughput" in r:
        print(
            f"throughput: batches of {args.batch}, {args.warmup} untimed + {args.batches} timed batches per "
            f"epoch ({args.paper_batches} at {paper} px), median of {args.repeats} epochs, arms interleaved; "
            "the options pretrain builds from the quickstart preset\n"
        )
        speed = r["throughput"]
        med = {cpus: {k: statistics.median(v) for k, v in t.items()} for cpus, t in speed.items()}
        rows = []
        for name, label in labels.items():
            a, b = med[1][name], med[2][name]
            runs = "; ".join(", ".join(f"{v:.0f}" for v in speed[cpus][name]) for cpus in (1, 2))
            rows.append([label, f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}×", runs])
        header = ["pipeline (2 views per object)", "objects/s, 1 CPU", "objects/s, 2 CPUs", "2 / 1", "epochs"]
        table(header, rows, (0, 4))
        for cpus in (1, 2):
            ratios = [med[cpus][f"fresh{x}"] / med[cpus][f"stored{x}"] for x in ("", "_paper")]
            print(
                f"\nfresh / stored, {cpus} CPU(s): ×{ratios[0]:.2f} ({size} px), ×{ratios[1]:.2f} ({paper})"
            )
    if "memory" in r:
        print(
            "\nmemory of streaming (fresh viewpoints, 2 CPUs): peak PSS of the driver and every Ray process\n"
        )
        mem = r["memory"]
        table(
            [
                "corpus",
                "objects",
                "window rows",
                "epochs",
                "objects streamed",
                "s",
                "idle PSS MiB",
                "peak PSS MiB",
            ],
            [
                [
                    label,
                    f"{m['objects']:.0f}",
                    f"{m['window_rows']:.0f}",
                    f"{m['epochs']:.0f}",
                    f"{m['samples']:.0f}",
                    f"{m['seconds']:.1f}",
                    f"{m['idle_pss_mib']:.0f}",
                    f"{m['peak_pss_mib']:.0f}",
                ]
                for label, m in mem.items()
            ],
        )
        peaks = [m["peak_pss_mib"] for m in mem.values()]
        print(
            f"\nmemory growth, large / small corpus: ×{peaks[2] / peaks[0]:.2f} (one epoch each), "
            f"×{peaks[2] / peaks[1]:.2f} (the same objects streamed)"
        )
    if "pipeline_cost" in r:
        print(
            f"\nCPU time of make_batch alone (no Ray), this thread, median of {args.repeats} passes over "
            f"{args.cost_objects} objects\n"
        )
        table(
            ["pipeline (2 views per object)", "CPU ms per object", "objects per CPU-second"],
            [[labels[k], f"{ms:.2f}", f"{1000 / ms:.0f}"] for k, ms in r["pipeline_cost"].items()],
        )
    if "render_cost" in r:
        c = r["render_cost"]
        print(
            f"\nrender_object at {c['size']} px, one thread's CPU time ({c['backend']} rasteriser), median "
            f"of {args.repeats}; built-in meshes: {c['builtin_mean_faces']:.0f} faces on average\n"
        )
        table(
            ["meshes, views", "CPU ms per object", "objects per CPU-second"],
            [[label, f"{ms:.2f}", f"{1000 / ms:.0f}"] for label, ms in c["ms_per_object"].items()],
        )
        print(
            f"\nPNG bytes of one {c['size']}-px view (as prepare encodes it): built-in meshes "
            f"{c['png_bytes_per_view']:.0f} on average, the sphere {c['sphere_png_bytes_per_view']:.0f}"
        )
        print(
            f"mesh cell of the {c['sphere_faces']}-face sphere: {c['sphere_cell_raw']} bytes raw, "
            f"{c['sphere_cell_zstd']} with zstd"
        )
    print()
    table(
        [
            "meshes corpus",
            "objects",
            "vertices",
            "faces",
            "cell bytes",
            "cell bytes, zstd in shards",
            "row bytes",
        ],
        [
            [
                name,
                s["objects"],
                f"{s['vertices']:.0f}",
                f"{s['faces']:.0f}",
                f"{s['cell_bytes_raw']:.0f}",
                f"{s['cell_bytes_zstd']:.0f}",
                f"{s['row_bytes']:.0f}",
            ]
            for name, s in r["mesh_stats"].items()
        ],
    )


if __name__ == "__main__":
    main()
