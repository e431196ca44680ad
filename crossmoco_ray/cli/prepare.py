"""``crossmoco prepare``: a dataset source to validated Parquet shards (+ renders). No configuration; Ray only
with ``--ray`` (or ``RAY_ADDRESS``). ``crossmoco verify``: the full check of prepared shards.

Registered on the top-level parser by :func:`~crossmoco_ray.cli.main.build_parser`.
Every option value is checked
before any work starts; a bad one is named with its value ("--val-fraction 1.5: must be in [0, 1)"), exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from crossmoco_ray.cli.common import add_command
from crossmoco_ray.data.prepare.sample_checks import MIN_POINTS
from crossmoco_ray.data.render.camera import MAX_SIZE, MIN_SIZE
from crossmoco_ray.data.shards.meshes import MAX_MESH_FACES
from crossmoco_ray.data.sources.variants import SCANOBJECTNN_VARIANTS

PREPARE_EPILOG = """\
examples:
  crossmoco prepare synthetic --out data/synthetic --preview docs/synthetic.png
  crossmoco prepare ../shared/data/modelnet40_1024 --out data/mn40 --up-axis z --val-fraction 0.1 \\
      --preview docs/modelnet40_renders.png
  crossmoco prepare /data/ShapeNetRender --out s3://bucket/shapenet-shards       # PLY + PNG renders
  crossmoco prepare /data/my_scans --out data/scans --num-points 2048 --skip-bad  # <class>/<file>.ply|npy|xyz
  crossmoco prepare /data/ModelNet40 --out data/mn40_mesh --up-axis z --fps       # <class>/<split>/*.off
  crossmoco prepare objaverse/glbs --format corpus --out data/objaverse --val-fraction 0.01  # unlabelled
  crossmoco prepare s3://bucket/objaverse/files.txt --out s3://bucket/objv --ray  # a file list
  RAY_ADDRESS=auto crossmoco prepare /data/ModelNet40 --out s3://bucket/mn40 --up-axis z  # on a cluster

SOURCE is a directory, an .h5 file or glob, a list of files, or 'synthetic'; --format auto detects
ModelNet40/ScanObjectNN h5, CrossPoint's ShapeNetRender layout (ShapeNet/ + ShapeNetRendering/), class
folders of point or mesh files (.off .obj .stl .glb .gltf, .ply with faces; points are sampled on the
surface) and lists of files (.txt); a folder tree without classes needs --format corpus. Sources without
images get multi-view renders: shaded triangles of their meshes where they have them (the built-in set,
mesh folders), else splats of their points. Rows are written in a seeded random order per split (real
datasets are stored class by class); the shuffle streams through temporary buckets beside the output (in
the local temp directory for s3:// or gs://), so memory stays bounded and the disk briefly holds a second
copy. Bad inputs are named (file and index); --skip-bad skips them and writes skipped.json. Re-running
the same command is a no-op once a quick check of the existing shards passes; damaged shards are prepared
again (`crossmoco verify DIR` is the full check). --overwrite deletes only the old dataset's shard files
inside --out, never anything else. With --ray (or RAY_ADDRESS set) reading, checking and rendering run as
a Ray Data pipeline over the cluster's CPUs; the driver keeps the order, shuffle and writer, so the
shards are the same bytes as without it. SIGTERM stops it like Ctrl-C (its work directory removed; exit
143), and a later run removes the work directories that runs killed harder left behind.
"""

VERIFY_EPILOG = """examples:
  crossmoco verify data/mn40                   # before a long run, after a copy, when a run failed on data
  crossmoco verify s3://bucket/shapenet-shards

What is checked, in order:
  1. manifest.json: it is a manifest this version reads; its seal (a sha256 of its content) matches, so
     an edited count, point count or fingerprint shows; every listed path is a plain
     <split>-<nnnnn>.parquet name inside the directory (no '..', no absolute path, no symbolic link);
     the per-split and per-class counts add up.
  2. every listed file: it exists with the listed size; its footer (Parquet metadata) matches its digest
     and the manifest (rows, columns, points per cloud); every row group's bytes match their sha256;
     every page matches Parquet's own page checksum (all pages are decoded); the whole file matches its
     sha256; its rows hold at least the manifest's views per object.
  3. the labels of all files against the per-class counts, the rows against the split totals.

Training and evaluation make the cheap part of this check on every read (size, footer, the digest of
each row group before its rows are used); prepare checks sizes and footers before it says "up to date".
Shards prepared before row-group digests existed are checked by size and sha256 of each file.

Each problem is printed as one line naming the file and the reason, then a summary; the exit status is
0 for no damage, 1 damage found (re-run the same `crossmoco prepare` command to prepare it again),
2 not a prepared dataset (no manifest, or one this version cannot read).
"""

RENDER_SIZES = (MIN_SIZE, MAX_SIZE)  # --render-size: the render spec's own bounds (data/camera.py)
POINT_SIZES = (1, 64)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _shown(value: object) -> str:
    from crossmoco_ray.bounded import printable

    return printable(value, 80)


def option_problem(args: argparse.Namespace) -> str | None:
    """The first bad option value of a ``prepare`` command line, as "--option value: why" (None: all good).

    Checked before any work: the value ranges, the list options, and the paths (an --out that is a file, a
    --preview whose folder is missing or that is a directory), so nothing fails after hours of rendering.
    """
    from crossmoco_ray.data.prepare.destination import out_problem, preview_problem

    lo, hi = RENDER_SIZES
    checks = [
        ("--val-fraction", args.val_fraction, 0.0 <= args.val_fraction < 1.0, "must be in [0, 1)"),
        ("--render-size", args.render_size, lo <= args.render_size <= hi, f"must be in {lo}..{hi}"),
        (
            "--mesh-faces",
            args.mesh_faces,
            4 <= args.mesh_faces <= MAX_MESH_FACES,
            f"must be in 4..{MAX_MESH_FACES}",
        ),
        (
            "--point-size",
            args.point_size,
            POINT_SIZES[0] <= args.point_size <= POINT_SIZES[1],
            f"must be in {POINT_SIZES[0]}..{POINT_SIZES[1]}",
        ),
        ("--rows-per-shard", args.rows_per_shard, args.rows_per_shard >= 1, "must be at least 1"),
        ("--min-points", args.min_points, args.min_points >= 1, "must be at least 1"),
        (
            "--num-points",
            args.num_points,
            args.num_points is None or args.num_points >= 1,
            "must be at least 1",
        ),
        ("--synthetic-train", args.synthetic_train, args.synthetic_train >= 0, "must be at least 0"),
        ("--synthetic-test", args.synthetic_test, args.synthetic_test >= 0, "must be at least 0"),
        ("--ray-cpus", args.ray_cpus, args.ray_cpus is None or args.ray_cpus >= 1, "must be at least 1"),
    ]
    for option, value, good, why in checks:
        if not good:
            return f"{option} {_shown(value)}: {why}"
    for option, text in (("--azimuths", args.azimuths), ("--elevations", args.elevations)):
        try:
            if not _floats(text):
                return f"{option} {_shown(repr(text))}: no angle given"
        except ValueError:
            return f"{option} {_shown(repr(text))}: not a comma-separated list of degrees"
    problem = out_problem(args.out)
    if problem:
        return f"--out {_shown(args.out)}: {problem}"
    problem = preview_problem(args.preview) if args.preview else None
    if problem:
        return f"--preview {_shown(args.preview)}: {problem}"
    return None


def cmd_prepare(args: argparse.Namespace) -> int:
    import os

    from crossmoco_ray.data.prepare.options import PrepareOptions
    from crossmoco_ray.data.prepare.prepare import prepare
    from crossmoco_ray.data.render.splat import RenderSpec
    from crossmoco_ray.data.sources.formats import open_source
    from crossmoco_ray.errors import DataError

    problem = option_problem(args)
    if problem:
        print(f"crossmoco prepare: {problem}", file=sys.stderr)
        return 2
    try:
        source = open_source(
            args.source,
            args.format,
            up_axis=args.up_axis,
            synthetic_counts={"train": args.synthetic_train, "test": args.synthetic_test},
            num_points=args.num_points or 2048,
            seed=args.seed,
            variant=args.variant,
            fps=args.fps,
        )
        opts = PrepareOptions(
            num_points=args.num_points,
            min_points=args.min_points,
            val_fraction=args.val_fraction,
            seed=args.seed,
            render=RenderSpec(
                azimuths=_floats(args.azimuths),
                elevations=_floats(args.elevations),
                size=args.render_size,
                point_size=args.point_size,
                mode=args.render_mode,
                points_only=args.render_points_only,
            ),
            rows_per_shard=args.rows_per_shard,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
            preview=args.preview,
            shuffle=not args.no_shuffle,
            ray=args.ray or bool(os.environ.get("RAY_ADDRESS")),
            ray_cpus=args.ray_cpus,
            store=args.store,
            mesh_faces=args.mesh_faces,
        )
        prepare(source, args.out, opts, log=lambda msg: print(msg, file=sys.stderr))
    except (DataError, ValueError) as err:
        print(f"crossmoco prepare: {err}", file=sys.stderr)
        return 2
    return 0


def add_prepare_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``prepare`` to the top-level subparsers ``sub``."""
    p_prep = add_command(
        sub,
        "prepare",
        help="turn a dataset into validated Parquet shards (+ renders) for training",
        description="Convert a source into Parquet shards with a manifest, validating every object.",
        epilog=PREPARE_EPILOG,
    )
    p_prep.add_argument(
        "source",
        help="a directory, an .h5 file or glob, a list of files (.txt, local or URI), or 'synthetic'",
    )
    p_prep.add_argument("--out", required=True, help="output directory or URI (s3://, gs://, file://)")
    p_prep.add_argument(
        "--format",
        default="auto",
        choices=[
            "auto",
            "modelnet40",
            "scanobjectnn",
            "shapenetrender",
            "folder",
            "corpus",
            "list",
            "synthetic",
        ],
        help="corpus: every object file below a folder, unlabelled (e.g. Objaverse's glbs/; never detected); "
        "list: a .txt of files or URIs, one a line, optional <TAB>class column",
    )
    p_prep.add_argument(
        "--up-axis", default="y", choices=["x", "y", "z"], help="the source's up axis (ModelNet40 raw: z)"
    )
    p_prep.add_argument(
        "--variant",
        choices=SCANOBJECTNN_VARIANTS,
        metavar="VARIANT",
        help="ScanObjectNN's official h5 release: the variant to prepare (obj_bg, obj_only, pb_t50_rs, ...; "
        "main_split/ holds several, so it is required there)",
    )
    p_prep.add_argument(
        "--num-points",
        type=int,
        help="resample every cloud to this many points (meshes: points sampled on the surface; default 2048)",
    )
    p_prep.add_argument(
        "--fps",
        action="store_true",
        help="meshes: farthest-point sample the points (from a 4x denser area-uniform draw) for even spacing",
    )
    p_prep.add_argument("--min-points", type=int, default=MIN_POINTS, help="reject clouds with fewer points")
    p_prep.add_argument(
        "--val-fraction", type=float, default=0.0, help="carve a validation split from train, in [0, 1)"
    )
    p_prep.add_argument("--seed", type=int, default=0, help="seed of the validation carve and resampling")
    p_prep.add_argument(
        "--skip-bad", action="store_true", help="skip bad objects, report them in skipped.json"
    )
    p_prep.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a different dataset at --out (only its shard files are deleted, nothing else)",
    )
    p_prep.add_argument(
        "--no-shuffle",
        action="store_true",
        help="keep the source's row order (default: a seeded random order per split, so that class-sorted "
        "sources such as ModelNet40's h5 do not give single-class training windows)",
    )
    p_prep.add_argument(
        "--preview", metavar="PNG", help="write a contact sheet of the views of a few objects"
    )
    p_prep.add_argument("--rows-per-shard", type=int, default=2048)
    p_prep.add_argument(
        "--azimuths", default="0,60,120,180,240,300", help="render: degrees about the up axis"
    )
    p_prep.add_argument("--elevations", default="20", help="render: degrees above the horizon")
    p_prep.add_argument(
        "--render-size",
        type=int,
        default=128,
        help=f"render: image side in pixels ({RENDER_SIZES[0]}..{RENDER_SIZES[1]})",
    )
    p_prep.add_argument("--point-size", type=int, default=2, help="render: splat side in pixels")
    p_prep.add_argument(
        "--render-mode",
        default="depth",
        choices=["depth", "shaded", "coords"],
        help="render: how splats of points look: depth (nearer is brighter), shaded (lit by normals from the "
        "points), coords; meshes are always rendered as shaded triangles",
    )
    p_prep.add_argument(
        "--render-points-only",
        action="store_true",
        help="render: splats of the points even where the source has meshes (to compare renders)",
    )
    p_prep.add_argument(
        "--store",
        default="renders",
        choices=["renders", "meshes", "both"],
        help="the image modality as stored: renders (PNG views, rendered now where the source has none), "
        "meshes (the triangle meshes, decimated to --mesh-faces, no renders: training renders fresh "
        "viewpoints every epoch; point-only objects keep their points, whose splats training renders), both",
    )
    p_prep.add_argument(
        "--mesh-faces",
        type=int,
        default=20_000,
        help="--store meshes|both: meshes with more faces are decimated to this many (default: 20000)",
    )
    p_prep.add_argument(
        "--ray",
        action="store_true",
        help="read, check and render on Ray Data across the cluster's CPUs (the default when RAY_ADDRESS is "
        "set; a local Ray otherwise); same shards as without it",
    )
    p_prep.add_argument(
        "--ray-cpus", type=int, help="CPUs of the local Ray that --ray starts (default: all of this machine)"
    )
    p_prep.add_argument("--synthetic-train", type=int, default=2000, help="synthetic: training objects")
    p_prep.add_argument("--synthetic-test", type=int, default=500, help="synthetic: test objects")
    p_prep.set_defaults(func=cmd_prepare)


def cmd_verify(args: argparse.Namespace) -> int:
    """``crossmoco verify``: every problem on its own line, a summary; exit 0 clean, 1 damaged, 2 not a
    dataset."""
    from crossmoco_ray.data.shards.verify import verify_dataset
    from crossmoco_ray.errors import DataError

    try:
        report = verify_dataset(args.shards)
    except DataError as err:
        print(f"crossmoco verify: {err}", file=sys.stderr)
        return 2
    for problem in report.problems:
        print(f"damaged: {problem}")
    size = f"{report.bytes / 1024**2:.1f} MiB"
    if not report.problems:
        print(f"{args.shards}: {report.files} files, {report.rows} rows, {size}: no damage")
        return 0
    found = f"{len(report.problems)} problems in {len(report.damaged_files)} of {report.files} files"
    print(
        f"{args.shards}: {found} (sound: {report.rows} rows, {size}); "
        "re-run the same `crossmoco prepare` command to prepare it again"
    )
    return 1


def add_verify_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``verify`` to the top-level subparsers ``sub``."""
    p = add_command(
        sub,
        "verify",
        help="check prepared shards completely: manifest, paths, sizes, checksums, counts",
        description="The full integrity check of a prepared dataset: every byte of every shard against the "
        "manifest's digests, the manifest against its seal and against the files' own metadata.",
        epilog=VERIFY_EPILOG,
    )
    p.add_argument("shards", help="a prepared dataset: the directory or URI given to `prepare --out`")
    p.set_defaults(func=cmd_verify)
