"""``crossmoco eval {svm,knn,fewshot,report}`` and ``crossmoco export``: frozen-feature evaluation, export.

Neither takes a configuration nor starts Ray; registered on the top-level parser by
:func:`crossmoco_ray.cli.main.build_parser`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from crossmoco_ray.bounded import clip, short_repr
from crossmoco_ray.cli import options as opt
from crossmoco_ray.cli.common import add_command, add_up_axis
from crossmoco_ray.data.sources.variants import SCANOBJECTNN_VARIANTS

EVAL_EPILOG = """\
examples:
  crossmoco eval svm --data ../shared/data/modelnet40_1024 --up-axis z                   # random-init DGCNN
  crossmoco eval svm --data ../shared/data/modelnet40_1024 --up-axis z \\
      --checkpoint runs/quickstart/checkpoint_000004 --out eval/svm        # + report.json, t-SNE, confusion
  crossmoco eval fewshot --data data/mn40 --checkpoint exported/ --episodes 50
  crossmoco eval knn --data data/mn40 --checkpoint exported/ --knn-k 20,200
  crossmoco eval report --data data/mn40 --checkpoint exported/ --out eval/report   # report.md + .json
  crossmoco eval svm --data ScanObjectNN/main_split --checkpoint dgcnn_crosspoint.pth   # CrossPoint file
  crossmoco eval svm --data h5_files/main_split --variant pb_t50_rs --checkpoint exported/

--checkpoint takes a crossmoco-ray checkpoint (directory or state.pt), an export (crossmoco export), or a
CrossPoint / CrossMoCo .pth (state dict, [q, k] list, module.-prefixed). Every evaluation also runs the
same protocol on a random-init encoder of the same architecture (--no-baseline to skip), so the gain
from pretraining is visible. Protocols: 'crosspoint' (the original code, exactly) and 'clean'
(SVM: standardised features, C by cross-validation on train; few-shot: queries from the test split).
"""


def _protocol_parser(sub: Any, name: str, help: str, k: int, k_source: str) -> argparse.ArgumentParser:
    """``crossmoco eval NAME``: the common options, ``--k`` with the default the protocol's source used."""
    p = add_command(sub, name, help=help, epilog=EVAL_EPILOG)
    _eval_common(p)
    p.add_argument(
        "--k",
        type=opt.positive_int,
        default=k,
        help=f"DGCNN neighbours of a CrossPoint/CrossMoCo .pth and of a random-init encoder ({k}, as "
        f"{k_source}); this project's checkpoints and exports carry their own",
    )
    p.set_defaults(func=cmd_eval)
    return p


def _eval_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="h5 file/dir/glob, a folder source, or prepared shards")
    p.add_argument("--format", default="auto", help="source format (auto-detected)")
    add_up_axis(p)
    p.add_argument(
        "--variant",
        choices=SCANOBJECTNN_VARIANTS,
        metavar="VARIANT",
        help="ScanObjectNN's official h5 release: which variant to read (obj_bg, obj_only, pb_t50_rs, ...; "
        "main_split/ holds several, so it is required there)",
    )
    p.add_argument("--checkpoint", help="pretrained encoder; omitted: evaluate a random-init DGCNN only")
    p.add_argument("--no-baseline", action="store_true", help="skip the random-init baseline")
    p.add_argument(
        "--emb-dims", type=opt.positive_int, default=1024, help="random-init DGCNN width when no checkpoint"
    )
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--protocol", default="both", choices=["both", "crosspoint", "clean"])
    p.add_argument("--batch-size", type=opt.positive_int, default=32)
    p.add_argument("--device", type=opt.device, default="auto", help="cpu, cuda, cuda:1, or auto")
    p.add_argument("--seed", type=opt.seed, default=0)
    p.add_argument("--out", help="write report.json (and plots) here")


def add_num_points(p: argparse.ArgumentParser) -> None:
    """``--num-points`` of ``eval svm``, ``knn`` and ``report``: the first 1024 points by default."""
    p.add_argument(
        "--num-points", type=opt.positive_int, default=1024, help="first N points of each cloud (1024)"
    )


def add_fewshot_settings(p: argparse.ArgumentParser) -> None:
    """``--ways`` and ``--shots`` of ``eval fewshot`` and ``report``: the N-way K-shot settings."""
    p.add_argument("--ways", type=opt.positive_ints, default="5,10")
    p.add_argument("--shots", type=opt.positive_ints, default="10,20")


def _protocols(args: argparse.Namespace) -> tuple[str, ...]:
    return ("crosspoint", "clean") if args.protocol == "both" else (args.protocol,)


def start_problems(args: argparse.Namespace) -> list[str]:
    """What an ``eval`` command line asks for that is not here (checked before any data is read)."""
    from crossmoco_ray.data.sources.formats import FORMATS

    problems = [
        opt.existing_path_problem("--checkpoint", args.checkpoint),
        opt.directory_problem("--out", args.out),
        opt.device_problem("--device", args.device),
    ]
    if args.format not in ("auto", *FORMATS):
        problems.append(f"--format {short_repr(args.format, 60)}: choose one of auto, {', '.join(FORMATS)}")
    return [p for p in problems if p]


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from crossmoco_ray.errors import DataError
    from crossmoco_ray.evaluate.protocols import (
        EvalData,
        encoders,
        fewshot_table_text,
        knn_table,
        run_fewshot,
        run_knn,
        run_svm,
        svm_table,
    )
    from crossmoco_ray.nn.precision import keep_freed_memory

    if opt.refused("crossmoco eval", start_problems(args)):
        return 2
    keep_freed_memory()  # large feature batches: freed memory reused, not re-faulted

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    data = EvalData(
        args.data, args.format, args.up_axis, args.num_points, args.train_split, args.test_split, args.variant
    )
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
        elif args.eval_command == "knn":
            report = run_knn(data, encs, args.knn_k, args.temperature, args.batch_size, args.device, out, log)
            print(knn_table(report))
        elif args.eval_command == "report":
            from crossmoco_ray.evaluate.report import run_report

            settings = [(w, s) for w in args.ways for s in args.shots]
            report = run_report(
                data,
                encs,
                C=args.c,
                ks=args.knn_k,
                temperature=args.temperature,
                settings=settings,
                queries=args.queries,
                episodes=args.episodes,
                batch_size=args.batch_size,
                device=args.device,
                out=out,
                seed=args.seed,
                log=log,
            )
            print(report["markdown"])
        else:
            settings = [(w, s) for w in args.ways for s in args.shots]
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
        print(f"crossmoco eval: {clip(str(err), 3000)}", file=sys.stderr)
        return 2
    if out is not None:
        log(f"report: {out / 'report.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from crossmoco_ray.checkpoints.encoders import export_backbone

    checks = [
        opt.existing_path_problem("CHECKPOINT", args.checkpoint),
        opt.directory_problem("--out", args.out),
    ]
    if opt.refused("crossmoco export", checks):
        return 2
    try:
        out = export_backbone(args.checkpoint, args.out, with_image=args.with_image)
    except (ValueError, FileNotFoundError) as err:
        print(f"crossmoco export: {clip(str(err), 3000)}", file=sys.stderr)
        return 2
    print(f"exported backbone to {out} (backbone.pt + meta.json)")
    return 0


def add_eval_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``eval`` (with ``svm``, ``knn``, ``fewshot`` and ``report``) and ``export`` to the top-level
    subparsers ``sub``."""
    p_eval = add_command(
        sub,
        "eval",
        help="linear SVM, kNN and few-shot on frozen features (CrossPoint protocols + clean ones)",
        description="Evaluate a point encoder's frozen features as in the papers.",
        epilog=EVAL_EPILOG,
    )
    eval_sub = p_eval.add_subparsers(dest="eval_command", metavar="PROTOCOL", required=True)
    p_svm = _protocol_parser(
        eval_sub, "svm", "linear SVM: overall and mean class accuracy", 15, "CrossPoint's SVM notebook"
    )
    add_num_points(p_svm)
    p_svm.add_argument(
        "--c", type=opt.positive_float, default=0.01, help="C of the crosspoint protocol (notebook: 0.01)"
    )
    p_svm.add_argument("--no-plots", action="store_true", help="no t-SNE / confusion PNGs")
    p_knn = _protocol_parser(
        eval_sub,
        "knn",
        "kNN on frozen features: cosine, weighted votes (InstDisc); train is the bank, test is scored",
        15,
        "the SVM",
    )
    add_num_points(p_knn)
    p_knn.add_argument(
        "--knn-k", type=opt.positive_ints, default="20,200", help="neighbours that vote, one or more (20,200)"
    )
    p_knn.add_argument(
        "--temperature", type=opt.positive_float, default=0.07, help="vote weight exp(cos / T) (0.07)"
    )
    p_fs = _protocol_parser(
        eval_sub,
        "fewshot",
        "N-way K-shot, mean ± std over episodes",
        5,
        "CrossPoint's eval_fewshot.py, which its few-shot numbers come from",
    )
    p_fs.add_argument(
        "--num-points", type=opt.positive_int, default=None, help="first N points (default: all)"
    )
    add_fewshot_settings(p_fs)
    p_fs.add_argument("--queries", type=opt.positive_int, default=20, help="queries per class")
    p_fs.add_argument(
        "--episodes", type=opt.positive_int, default=10, help="episodes per setting (CrossPoint script: 50)"
    )

    p_rep = _protocol_parser(
        eval_sub,
        "report",
        "every protocol for one encoder and random init: one Markdown table in the papers' layout + JSON",
        15,
        "the SVM",
    )
    add_num_points(p_rep)
    p_rep.add_argument(
        "--c", type=opt.positive_float, default=0.01, help="C of the papers' SVM (notebook: 0.01)"
    )
    p_rep.add_argument(
        "--knn-k", type=opt.positive_ints, default="20,200", help="kNN neighbours, one or more (20,200)"
    )
    p_rep.add_argument(
        "--temperature", type=opt.positive_float, default=0.07, help="kNN vote weight exp(cos / T)"
    )
    add_fewshot_settings(p_rep)
    p_rep.add_argument("--queries", type=opt.positive_int, default=20, help="few-shot queries per class")
    p_rep.add_argument("--episodes", type=opt.positive_int, default=10, help="few-shot episodes per setting")

    p_export = add_command(
        sub,
        "export",
        help="write a checkpoint's point backbone (state dict + meta.json) for evaluation or fine-tuning",
        description="Export the online point encoder (without projection head) of a pretraining checkpoint.",
    )
    p_export.add_argument("checkpoint", help="a checkpoint directory (or its state.pt)")
    p_export.add_argument("--out", required=True, help="output directory")
    p_export.add_argument("--with-image", action="store_true", help="also export the image trunk")
    p_export.set_defaults(func=cmd_export)
