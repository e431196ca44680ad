"""``crossmoco tune``: a hyperparameter search with Ray Tune, its parser and handler, and the check of its
search space against the configuration (made when the command line is parsed).

Registered on the top-level parser by :func:`crossmoco_ray.cli.main.build_parser`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from crossmoco_ray.cli import options as opt
from crossmoco_ray.cli.common import add_command, add_config_args, add_no_tracking, add_shards_data, launch

if TYPE_CHECKING:
    from crossmoco_ray.cli.common import ParsedCommand
    from crossmoco_ray.config.schema import Config
    from crossmoco_ray.tuning import Space

TUNE_EPILOG = """\
examples:
  crossmoco tune --space moco --trials 8                   # m, T, K on the quickstart preset, ASHA
  crossmoco tune --space moco_lr --preset paper --trials 16 train.num_workers=4 train.use_gpu=true \\
      train.batch_size_per_worker=32 objective.queue_length=4096 \\
      --data s3://bucket/shards --storage s3://bucket/runs        # powers of two: the space's K
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


def checked_space(args: argparse.Namespace, cfg: Config) -> Space | None:
    """The search space of ``--space``, checked against ``cfg`` (None without ``--space`` and with
    ``--resume``: a resumed search runs its stored space)."""
    if not args.space or args.resume:
        return None
    from crossmoco_ray.tuning import check_space, load_space

    space = load_space(args.space)
    check_space(space, cfg)
    return space


def cmd_tune(cmd: ParsedCommand) -> int:
    from crossmoco_ray.tuning.search import tune_search

    args = cmd.args

    def run(cfg: Config, log: Callable[[str], None]) -> int:
        code, _ = tune_search(
            cfg,
            cmd.space,
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

    return launch("tune", cmd, run)


def add_tune_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``tune`` to the top-level subparsers ``sub``."""
    p = add_command(
        sub,
        "tune",
        help="search momentum, temperature, queue length (and more) with Ray Tune",
        description="Hyperparameter search: each trial is a distributed pretraining run, tracked in MLflow.",
        epilog=TUNE_EPILOG,
    )
    add_config_args(p, cmd_tune)
    p.add_argument("--space", help="search space YAML, or a shipped one: moco, moco_lr")
    p.add_argument(
        "--trials", type=opt.positive_int, help="samples from the space (default: tune.num_samples)"
    )
    p.add_argument("--scheduler", choices=["asha", "fifo"], help="default: tune.scheduler (asha)")
    p.add_argument(
        "--name", type=opt.run_name, help="search name (default: derived from the space and config)"
    )
    p.add_argument("--resume", action="store_true", help="continue the interrupted search --name")
    add_shards_data(p)
    p.add_argument("--storage", help="searches, trials and results (path or URI); default ./crossmoco_runs")
    add_no_tracking(p)
    p.set_defaults(space_check=checked_space)
