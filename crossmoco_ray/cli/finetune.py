"""``crossmoco finetune {cls,partseg}``: supervised fine-tuning on Ray Train, its parsers and handler
(registered on the top-level parser by :func:`crossmoco_ray.cli.main.build_parser`).

The fine-tuning configuration (:mod:`crossmoco_ray.config.finetune`) resolves like pretraining's:
defaults ← ``--preset`` ← ``--config`` ← ``KEY=VALUE`` overrides, checked by ``parse_command`` before
anything runs (no data, no Ray).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from crossmoco_ray.bounded import clip
from crossmoco_ray.cli import options as opt
from crossmoco_ray.cli.common import add_command, add_config_file, add_run_options, add_up_axis
from crossmoco_ray.data.sources.variants import SCANOBJECTNN_VARIANTS

FINETUNE_EPILOG = """\
examples:
  crossmoco finetune cls --data ../shared/data/modelnet40_1024 --up-axis z \\
      --checkpoint bench/out/mn40/runs/mn40-cpu/epoch_0010 --preset modelnet40-cpu --name mn40-ft
  crossmoco finetune cls --data ../shared/data/modelnet40_1024 --up-axis z --preset modelnet40-cpu \\
      model.k=10 model.emb_dims=512 --name mn40-ft-random               # random init, same architecture
  crossmoco finetune cls --data data/mn40 --checkpoint exported/ train.freeze_backbone=true \\
      model.head=linear optim.lr=0.01                                    # a linear probe by SGD
  crossmoco finetune cls --data h5_files/main_split --variant pb_t50_rs --checkpoint dgcnn_crosspoint.pth \\
      train.num_workers=4 train.use_gpu=true                             # a CrossPoint file, 4 GPUs
  crossmoco finetune cls --show-config --preset modelnet40-cpu          # the resolved configuration

Defaults: DGCNN's classification recipe (SGD lr 0.1, momentum 0.9, weight decay 1e-4, cosine to 1e-3,
label smoothing 0.2, dropout 0.5, per-axis scale U(2/3, 3/2) and shift U(-0.2, 0.2), batch 32, 250
epochs). --checkpoint takes anything `crossmoco eval` reads (this project's checkpoints and exports,
CrossPoint/CrossMoCo .pth files); without it the encoder starts from random init (model.k, model.emb_dims).
Every epoch reports test OA and mean class accuracy; the final report gives the last epoch's (no choice
made on test), the epoch chosen on a validation split when data.val_fraction > 0, and the best test epoch
(what the papers report). A run is STORAGE/NAME: relaunching the same name resumes it, mid-epoch too.
"""


def _resolve(args: argparse.Namespace) -> Any:
    from crossmoco_ray.config.finetune import load_finetune_config

    cfg = load_finetune_config(args.preset, args.config, args.overrides)
    if args.no_tracking:
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    args.finetune_config = cfg
    return cfg


def cmd_finetune(args: argparse.Namespace) -> int:
    import yaml

    from crossmoco_ray.errors import DataError
    from crossmoco_ray.finetune.driver import finetune

    cfg = args.finetune_config if getattr(args, "finetune_config", None) else _resolve(args)
    if args.show_config:
        sys.stdout.write(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0
    if not args.data:
        print(
            f"crossmoco finetune {args.finetune_command}: --data is required (h5 file/dir, folder source or "
            "shards; partseg: also `synthetic`)",
            file=sys.stderr,
        )
        return 2

    checks = [
        opt.existing_path_problem("--checkpoint", args.checkpoint),
        opt.directory_problem("--storage", args.storage),
    ]
    if opt.refused(f"crossmoco finetune {args.finetune_command}", checks):
        return 2

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        code, _ = finetune(
            args.finetune_command,
            cfg,
            data=args.data,
            checkpoint=args.checkpoint,
            name=args.name,
            storage_path=args.storage,
            up_axis=args.up_axis,
            variant=args.variant,
            log=log,
        )
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"crossmoco finetune {args.finetune_command}: {clip(str(err), 3000)}", file=sys.stderr)
        return 2
    return code


PARTSEG_EPILOG = """\
examples:
  crossmoco finetune partseg --data synthetic --preset synthetic-parts    # built-in part set, CPU
  crossmoco finetune partseg --data data/shapenet_part_seg_hdf5_data --checkpoint dgcnn_partseg_best.pth \\
      train.num_workers=4 train.use_gpu=true                                # CrossPoint's recipe, 4 GPUs
  crossmoco finetune partseg --show-config                                  # the partseg preset, resolved

--data: a folder in ShapeNetPart's h5 layout (*train*.h5 + *val*.h5 = trainval, *test*.h5; datasets data,
label, pid), or `synthetic`: procedural tables, lamps, mugs and chairs with labelled parts (written once
under STORAGE/_builtin). --checkpoint: a DGCNN_partseg encoder (CrossPoint's dgcnn_seg .pth, or a run of
`crossmoco pretrain model.point_encoder=dgcnn_seg`); without it, random init. Defaults (preset partseg):
CrossPoint's train_partseg.py (SGD 0.1, cosine to 1e-3, label smoothing 0.2, dropout 0.5, k 40, 2048
points, batch 8, 300 epochs). Scores: instance mIoU (per shape over its category's parts, averaged over
shapes) and class mIoU (averaged per category, then over categories), every epoch on test.
"""


def _task_parser(
    sub: Any, task: str, help: str, description: str, epilog: str, preset: str
) -> argparse.ArgumentParser:
    from crossmoco_ray.config.finetune import finetune_preset_names

    c = add_command(sub, task, help=help, description=description, epilog=epilog)
    c.add_argument("--checkpoint", help="the encoder to start from; omitted: random init")
    c.add_argument(
        "--preset",
        default=preset,
        help=f"a shipped fine-tuning preset ({', '.join(finetune_preset_names())}); default: {preset}",
    )
    add_config_file(c)
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=0.05")
    add_run_options(c)
    c.add_argument("--show-config", action="store_true", help="print the resolved configuration and exit")
    c.set_defaults(func=cmd_finetune, check=_resolve, up_axis="y", variant=None)
    return c


def add_finetune_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    from crossmoco_ray.config.finetune import DEFAULT_FINETUNE_PRESET

    p = add_command(
        sub,
        "finetune",
        help="supervised fine-tuning of a pretrained (or random-init) point encoder on Ray Train",
        description="Fine-tune a point encoder with a task head: classification (cls), part segmentation "
        "(partseg).",
    )
    fsub = p.add_subparsers(dest="finetune_command", metavar="TASK", required=True)
    c = _task_parser(
        fsub,
        "cls",
        "shape classification: test OA and mean class accuracy",
        "Classification fine-tuning (DDP on Ray Train, checkpoints and resume, MLflow).",
        FINETUNE_EPILOG,
        DEFAULT_FINETUNE_PRESET,
    )
    c.add_argument("--data", help="labelled source with train and test splits (h5, folders, shards)")
    add_up_axis(c)
    c.add_argument("--variant", choices=SCANOBJECTNN_VARIANTS, metavar="VARIANT", help="ScanObjectNN variant")
    s = _task_parser(
        fsub,
        "partseg",
        "part segmentation (DGCNN_partseg): instance and class mIoU",
        "Part-segmentation fine-tuning (DDP on Ray Train, checkpoints and resume, MLflow).",
        PARTSEG_EPILOG,
        "partseg",
    )
    s.add_argument("--data", help="ShapeNetPart h5 folder, or `synthetic` (the built-in part set)")
