"""``crossmoco pretrain``: distributed CrossMoCo pretraining on Ray Train, its parser and handler.

The configuration resolves as every configured command's (:func:`~crossmoco_ray.cli.common.resolve_config`);
registered on the top-level parser by :func:`crossmoco_ray.cli.main.build_parser`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from crossmoco_ray.cli.common import add_command, add_config_args, add_run_options, add_shards_data, launch

if TYPE_CHECKING:
    from crossmoco_ray.cli.common import ParsedCommand
    from crossmoco_ray.config.schema import Config

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


def cmd_pretrain(cmd: ParsedCommand) -> int:
    from crossmoco_ray.pretrain.driver import pretrain

    args = cmd.args

    def run(cfg: Config, log: Callable[[str], None]) -> int:
        code, _ = pretrain(
            cfg, preset=args.preset, name=args.name, storage=args.storage, data=args.data, log=log
        )
        return code

    return launch("pretrain", cmd, run)


def add_pretrain_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``pretrain`` to the top-level subparsers ``sub``."""
    p = add_command(
        sub,
        "pretrain",
        help="pretrain a point encoder with CrossMoCo on Ray Train (the main job)",
        description="Distributed CrossMoCo pretraining on a local Ray or a cluster, tracked, resumable.",
        epilog=PRETRAIN_EPILOG,
    )
    add_config_args(p, cmd_pretrain)
    add_shards_data(p)
    add_run_options(p)
