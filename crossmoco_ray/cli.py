"""The ``crossmoco`` command line.

Every command that takes a configuration resolves it the same way: the schema's defaults (the paper
recipe) ← ``--preset`` (default: quickstart) ← ``--config FILE`` ← ``KEY=VALUE`` overrides.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .config import DEFAULT_PRESET, Config, ConfigError, load_config, preset_names, preset_text, to_yaml

EPILOG = """\
examples:
  crossmoco config show                                  # the quickstart configuration, resolved
  crossmoco config show --preset paper                   # the CrossMoCo paper recipe
  crossmoco config show --preset paper objective.queue_length=8000 train.num_workers=4
  crossmoco config presets                               # the shipped presets

Overrides are dotted keys (section.key=value) with YAML values: train.epochs=10, model.image_weights=null.
Unknown keys are rejected with the nearest valid name; inconsistent values (a queue length that is
not a multiple of the global batch, k >= points, ...) are rejected with the fix.
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"a shipped preset ({', '.join(preset_names())}); default: {DEFAULT_PRESET}",
    )
    p.add_argument("--config", metavar="FILE", help="a YAML file of overrides, applied after the preset")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. objective.momentum=0.999"
    )


def resolve_config(args: argparse.Namespace) -> Config:
    return load_config(preset=args.preset, config_file=args.config, overrides=args.overrides)


def _cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(to_yaml(resolve_config(args)))
    return 0


def _cmd_config_presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        first = preset_text(name).splitlines()[0].lstrip("# ").strip()
        print(f"{name:<14} {first}")
    return 0


PREPARE_EPILOG = """\
examples:
  crossmoco prepare synthetic --out data/synthetic --preview docs/synthetic.png
  crossmoco prepare ../shared/data/modelnet40_1024 --out data/mn40 --up-axis z --val-fraction 0.1 \\
      --preview docs/modelnet40_renders.png
  crossmoco prepare /data/ShapeNetRender --out s3://bucket/shapenet-shards       # PLY + PNG renders
  crossmoco prepare /data/my_scans --out data/scans --num-points 2048 --skip-bad  # <class>/<file>.ply|npy|xyz

SOURCE is a directory, an .h5 file or glob, or 'synthetic'; --format auto detects ModelNet40/ScanObjectNN
h5, CrossPoint's ShapeNetRender layout (ShapeNet/ + ShapeNetRendering/) and folders of point files.
Sources without images get multi-view renders of their points. Rows are written in a seeded random order
per split (real datasets are stored class by class); the shuffle streams through temporary buckets beside
the output (in the local temp directory for s3:// or gs://), so memory stays bounded and the disk briefly
holds a second copy. Bad inputs are named (file and index); --skip-bad skips them and writes skipped.json.
Re-running the same command is a no-op.
"""


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .data.readers import open_source
    from .data.render import RenderSpec
    from .data.shards import PrepareOptions, prepare
    from .data.types import DataError

    try:
        source = open_source(
            args.source,
            args.format,
            up_axis=args.up_axis,
            synthetic_counts={"train": args.synthetic_train, "test": args.synthetic_test},
            num_points=args.num_points or 2048,
            seed=args.seed,
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
            ),
            rows_per_shard=args.rows_per_shard,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
            preview=args.preview,
            shuffle=not args.no_shuffle,
        )
        prepare(source, args.out, opts, log=lambda msg: print(msg, file=sys.stderr))
    except (DataError, ValueError) as err:
        print(f"crossmoco prepare: {err}", file=sys.stderr)
        return 2
    return 0


EVAL_EPILOG = """\
examples:
  crossmoco eval svm --data ../shared/data/modelnet40_1024 --up-axis z                   # random-init DGCNN
  crossmoco eval svm --data ../shared/data/modelnet40_1024 --up-axis z \\
      --checkpoint runs/quickstart/checkpoint_000004 --out eval/svm        # + report.json, t-SNE, confusion
  crossmoco eval fewshot --data data/mn40 --checkpoint exported/ --episodes 50
  crossmoco eval svm --data ScanObjectNN/main_split --checkpoint dgcnn_crosspoint.pth   # CrossPoint file

--checkpoint takes a crossmoco-ray checkpoint (directory or state.pt), an export (crossmoco export), or a
CrossPoint / CrossMoCo .pth (state dict, [q, k] list, module.-prefixed). Every evaluation also runs the
same protocol on a random-init encoder of the same architecture (--no-baseline to skip), so the gain
from pretraining is visible. Protocols: 'crosspoint' (the original code, exactly) and 'clean'
(SVM: standardised features, C by cross-validation on train; few-shot: queries from the test split).
"""


def _eval_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="h5 file/dir/glob, a folder source, or prepared shards")
    p.add_argument("--format", default="auto", help="source format (auto-detected)")
    p.add_argument("--up-axis", default="y", choices=["x", "y", "z"], help="the source's up axis")
    p.add_argument("--checkpoint", help="pretrained encoder; omitted: evaluate a random-init DGCNN only")
    p.add_argument("--no-baseline", action="store_true", help="skip the random-init baseline")
    p.add_argument("--k", type=int, default=15, help="DGCNN neighbours for foreign/random encoders (15)")
    p.add_argument("--emb-dims", type=int, default=1024, help="random-init DGCNN width when no checkpoint")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--protocol", default="both", choices=["both", "crosspoint", "clean"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write report.json (and plots) here")


def _protocols(args: argparse.Namespace) -> tuple[str, ...]:
    return ("crosspoint", "clean") if args.protocol == "both" else (args.protocol,)


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data.types import DataError
    from .evaluate.run import EvalData, encoders, fewshot_table_text, run_fewshot, run_svm, svm_table

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    data = EvalData(args.data, args.format, args.up_axis, args.num_points, args.train_split, args.test_split)
    out = Path(args.out) if args.out else None
    try:
        encs = encoders(args.checkpoint, not args.no_baseline, args.k, args.emb_dims, args.seed)
        if args.eval_command == "svm":
            report = run_svm(
                data,
                encs,
                _protocols(args),
                args.c,
                args.batch_size,
                args.device,
                out,
                not args.no_plots,
                args.seed,
                log,
            )
            print(svm_table(report))
        else:
            settings = [(w, s) for w in _ints(args.ways) for s in _ints(args.shots)]
            report = run_fewshot(
                data,
                encs,
                settings,
                _protocols(args),
                args.queries,
                args.episodes,
                args.batch_size,
                args.device,
                out,
                args.seed,
                log,
            )
            print(fewshot_table_text(report))
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"crossmoco eval: {err}", file=sys.stderr)
        return 2
    if out is not None:
        log(f"report: {out / 'report.json'}")
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _cmd_export(args: argparse.Namespace) -> int:
    from .evaluate.models import export_backbone

    try:
        out = export_backbone(args.checkpoint, args.out, with_image=args.with_image)
    except (ValueError, FileNotFoundError) as err:
        print(f"crossmoco export: {err}", file=sys.stderr)
        return 2
    print(f"exported backbone to {out} (backbone.pt + meta.json)")
    return 0


PRETRAIN_EPILOG = """\
examples:
  crossmoco pretrain                                   # quickstart preset, built-in data, local Ray, ~10 min
  crossmoco pretrain --preset paper --data s3://bucket/shapenet-shards train.num_workers=8 train.use_gpu=true
  crossmoco pretrain --name exp1 objective.momentum=0.999 optim.lr=3e-4
  RAY_ADDRESS=ray://head:10001 crossmoco pretrain ...  # or under `ray job submit`: joins that cluster

A run is identified by --name (default: derived from the configuration) and --storage: relaunching the
same name resumes from its latest checkpoint, the same MLflow run and the same queues. Results: checkpoints
under STORAGE/NAME, the exported backbone in STORAGE/NAME/export, the final SVM report in
STORAGE/NAME/eval, and the MLflow run (default store: sqlite in STORAGE/mlflow.db; MLFLOW_TRACKING_URI
overrides it).
"""


def _launch(
    command: str, args: argparse.Namespace, run: Callable[[Config, Callable[[str], None]], int]
) -> int:
    """The shared part of ``pretrain`` and ``tune``: the resolved config (tracking off with
    ``--no-tracking``), console logging, and data errors as a one-line message."""
    from .data.types import DataError

    cfg = resolve_config(args)
    if args.no_tracking:
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        return run(cfg, log)
    except DataError as err:
        print(f"crossmoco {command}: {err}", file=sys.stderr)
        return 2


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain

    def run(cfg: Config, log: Callable[[str], None]) -> int:
        code, _ = pretrain(
            cfg, preset=args.preset, name=args.name, storage=args.storage, data=args.data, log=log
        )
        return code

    return _launch("pretrain", args, run)


TUNE_EPILOG = """\
examples:
  crossmoco tune --space moco --trials 8                   # m, T, K on the quickstart preset, ASHA
  crossmoco tune --space moco_lr --preset paper --trials 16 train.num_workers=4 train.use_gpu=true \\
      --data s3://bucket/shards --storage s3://bucket/runs
  crossmoco tune --space my_space.yaml --scheduler fifo --name sweep1
  crossmoco tune --name sweep1 --resume                    # continue an interrupted search

--space takes a YAML file of dotted config keys and distributions (see tune_spaces/), or the name of a
shipped space (moco: momentum, temperature, queue length; moco_lr: + learning rate). The space is checked
against the configuration before any trial starts. Every trial is a full distributed pretraining run
(its config: the preset/file/overrides with the sampled values); ASHA stops poor trials by tune.metric at
each epoch (default val_svm_clean: the clean-protocol SVM on validation data; val_knn and
val_svm_crosspoint, the papers' raw-feature SVM, are also reported). Results: STORAGE/NAME/summary
(trials.md, trials.csv, a plot, best.yaml for `crossmoco pretrain --config`) and an MLflow parent run with
one child run per trial.
"""


def _cmd_tune(args: argparse.Namespace) -> int:
    from .tuning import load_space
    from .tuning.search import tune_search

    space = None if args.resume else load_space(args.space) if args.space else None

    def run(cfg: Config, log: Callable[[str], None]) -> int:
        code, _ = tune_search(
            cfg,
            space,
            preset=args.preset,
            name=args.name,
            storage=args.storage,
            data=args.data,
            trials=args.trials,
            scheduler=args.scheduler,
            resume=args.resume,
            log=log,
        )
        return code

    return _launch("tune", args, run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossmoco",
        description="CrossMoCo pretraining of point-cloud encoders (point clouds x rendered views) on Ray.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"crossmoco-ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_pre = sub.add_parser(
        "pretrain",
        help="pretrain a point encoder with CrossMoCo on Ray Train (the main job)",
        description="Distributed CrossMoCo pretraining on a local Ray or a cluster, tracked, resumable.",
        epilog=PRETRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p_pre)
    p_pre.add_argument("--data", help="prepared shards (path or URI); default: the built-in synthetic set")
    p_pre.add_argument("--name", help="run name (relaunch the same name to resume)")
    p_pre.add_argument("--storage", help="checkpoints and results (path or URI); default ./crossmoco_runs")
    p_pre.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p_pre.set_defaults(func=_cmd_pretrain)

    p_tune = sub.add_parser(
        "tune",
        help="search momentum, temperature, queue length (and more) with Ray Tune",
        description="Hyperparameter search: each trial is a distributed pretraining run, tracked in MLflow.",
        epilog=TUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p_tune)
    p_tune.add_argument("--space", help="search space YAML, or a shipped one: moco, moco_lr")
    p_tune.add_argument("--trials", type=int, help="samples from the space (default: tune.num_samples)")
    p_tune.add_argument("--scheduler", choices=["asha", "fifo"], help="default: tune.scheduler (asha)")
    p_tune.add_argument("--name", help="search name (default: derived from the space and config)")
    p_tune.add_argument("--resume", action="store_true", help="continue the interrupted search --name")
    p_tune.add_argument("--data", help="prepared shards (path or URI); default: the built-in synthetic set")
    p_tune.add_argument(
        "--storage", help="searches, trials and results (path or URI); default ./crossmoco_runs"
    )
    p_tune.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p_tune.set_defaults(func=_cmd_tune)

    p_prep = sub.add_parser(
        "prepare",
        help="turn a dataset into validated Parquet shards (+ renders) for training",
        description="Convert a source into Parquet shards with a manifest, validating every object.",
        epilog=PREPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_prep.add_argument("source", help="a directory, an .h5 file or glob, or 'synthetic'")
    p_prep.add_argument("--out", required=True, help="output directory or URI (s3://, gs://, file://)")
    p_prep.add_argument(
        "--format",
        default="auto",
        choices=["auto", "modelnet40", "scanobjectnn", "shapenetrender", "folder", "synthetic"],
    )
    p_prep.add_argument(
        "--up-axis", default="y", choices=["x", "y", "z"], help="the source's up axis (ModelNet40 raw: z)"
    )
    p_prep.add_argument("--num-points", type=int, help="resample every cloud to this many points")
    p_prep.add_argument("--min-points", type=int, default=16, help="reject clouds with fewer points")
    p_prep.add_argument("--val-fraction", type=float, default=0.0, help="carve a validation split from train")
    p_prep.add_argument("--seed", type=int, default=0, help="seed of the validation carve and resampling")
    p_prep.add_argument(
        "--skip-bad", action="store_true", help="skip bad objects, report them in skipped.json"
    )
    p_prep.add_argument("--overwrite", action="store_true", help="replace a different dataset at --out")
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
    p_prep.add_argument("--render-size", type=int, default=128, help="render: image side in pixels")
    p_prep.add_argument("--point-size", type=int, default=2, help="render: splat side in pixels")
    p_prep.add_argument("--render-mode", default="depth", choices=["depth", "coords"])
    p_prep.add_argument("--synthetic-train", type=int, default=2000, help="synthetic: training objects")
    p_prep.add_argument("--synthetic-test", type=int, default=500, help="synthetic: test objects")
    p_prep.set_defaults(func=_cmd_prepare)

    p_eval = sub.add_parser(
        "eval",
        help="linear SVM and few-shot on frozen features (CrossPoint protocols + clean ones)",
        description="Evaluate a point encoder's frozen features as in the papers.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    eval_sub = p_eval.add_subparsers(dest="eval_command", metavar="PROTOCOL", required=True)
    p_svm = eval_sub.add_parser(
        "svm",
        help="linear SVM: overall and mean class accuracy",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _eval_common(p_svm)
    p_svm.add_argument("--num-points", type=int, default=1024, help="first N points of each cloud (1024)")
    p_svm.add_argument("--c", type=float, default=0.01, help="C of the crosspoint protocol (notebook: 0.01)")
    p_svm.add_argument("--no-plots", action="store_true", help="no t-SNE / confusion PNGs")
    p_svm.set_defaults(func=_cmd_eval)
    p_fs = eval_sub.add_parser(
        "fewshot",
        help="N-way K-shot, mean ± std over episodes",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _eval_common(p_fs)
    p_fs.add_argument("--num-points", type=int, default=None, help="first N points (default: all)")
    p_fs.add_argument("--ways", default="5,10")
    p_fs.add_argument("--shots", default="10,20")
    p_fs.add_argument("--queries", type=int, default=20, help="queries per class")
    p_fs.add_argument("--episodes", type=int, default=10, help="episodes per setting (CrossPoint script: 50)")
    p_fs.set_defaults(func=_cmd_eval)

    p_export = sub.add_parser(
        "export",
        help="write a checkpoint's point backbone (state dict + meta.json) for evaluation or fine-tuning",
        description="Export the online point encoder (without projection head) of a pretraining checkpoint.",
    )
    p_export.add_argument("checkpoint", help="a checkpoint directory (or its state.pt)")
    p_export.add_argument("--out", required=True, help="output directory")
    p_export.add_argument("--with-image", action="store_true", help="also export the image trunk")
    p_export.set_defaults(func=_cmd_export)

    p_config = sub.add_parser(
        "config",
        help="show the resolved configuration or the presets",
        description="Inspect configurations: presets, YAML files and dotted overrides, resolved and checked.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_sub = p_config.add_subparsers(dest="config_command", metavar="ACTION")
    p_show = config_sub.add_parser(
        "show",
        help="print the resolved configuration as YAML",
        description="Print the configuration a command would run with, after preset, file and overrides.",
    )
    _add_config_args(p_show)
    p_show.set_defaults(func=_cmd_config_show)
    p_presets = config_sub.add_parser("presets", help="list the shipped presets")
    p_presets.set_defaults(func=_cmd_config_presets)

    def config_help(_args: argparse.Namespace) -> int:
        p_config.print_help()
        return 0

    p_config.set_defaults(func=config_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        code: int = args.func(args)
    except ConfigError as err:
        print(f"crossmoco: configuration error: {err}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    raise SystemExit(main())
