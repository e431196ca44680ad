"""What several ``crossmoco`` command groups share: the shape of a subcommand's parser, the configuration
arguments and their resolution (``pretrain``, ``tune``, ``config show``; ``--config`` also ``finetune``), the
options of a run (``--data``, ``--name``, ``--storage``, ``--no-tracking``, ``--up-axis``) and the start of
a Ray job (``pretrain``, ``tune``); and :class:`ParsedCommand`, a command line as read.

Each helper adds its options under one definition (name, type, default, help), so that the commands that
share an option cannot drift apart; options that differ between commands stay with their command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from crossmoco_ray.cli import options as opt
from crossmoco_ray.config.loading import load_config, preset_names
from crossmoco_ray.config.schema import DEFAULT_PRESET, Config

if TYPE_CHECKING:
    from crossmoco_ray.tuning.space import Space


@dataclass(frozen=True)
class ParsedCommand:
    """A command line as ``crossmoco`` reads it, before anything runs.

    ``form`` is the subcommand path ("pretrain", "eval svm", "config show"; "" for a bare ``crossmoco``).
    ``config`` is the resolved, checked configuration of the commands that take one (``pretrain``, ``tune``,
    ``config show``) and None for the others; ``space`` is ``tune``'s search space, checked against it.
    """

    form: str
    args: argparse.Namespace
    config: Config | None = None
    space: Space | None = None

    def run(self) -> int:
        if self.config is not None:
            code: int = self.args.configured(self)
        else:
            code = self.args.func(self.args)
        return code


def add_command(
    sub: argparse._SubParsersAction[Any],
    name: str,
    *,
    help: str,
    description: str | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` to ``sub``; an ``epilog`` (the examples) is printed as written."""
    if epilog is None:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    else:
        parser = sub.add_parser(
            name,
            help=help,
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    return parser


def add_config_file(p: argparse.ArgumentParser) -> None:
    """``--config FILE``: a YAML file of overrides."""
    p.add_argument("--config", metavar="FILE", help="a YAML file of overrides, applied after the preset")


def add_config_args(p: argparse.ArgumentParser, handler: Callable[[ParsedCommand], int]) -> None:
    """The configuration arguments; ``handler`` gets the :class:`ParsedCommand` with the resolved config
    (:func:`resolve_config`)."""
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"a shipped preset ({', '.join(preset_names())}); default: {DEFAULT_PRESET}",
    )
    add_config_file(p)
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. objective.momentum=0.999"
    )
    p.set_defaults(configured=handler)


def resolve_config(args: argparse.Namespace) -> Config:
    """The configuration a command runs with: preset ← ``--config`` ← overrides (tracking off with
    ``--no-tracking``), checked."""
    cfg = load_config(preset=args.preset, config_file=args.config, overrides=args.overrides)
    if getattr(args, "no_tracking", False):
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    return cfg


def add_shards_data(p: argparse.ArgumentParser) -> None:
    """``--data``: the prepared shards a run trains on."""
    p.add_argument("--data", help="prepared shards (path or URI); default: the built-in synthetic set")


def add_no_tracking(p: argparse.ArgumentParser) -> None:
    """``--no-tracking``: no MLflow run."""
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``--name``, ``--storage`` and ``--no-tracking`` of a training run (``pretrain``, ``finetune``)."""
    p.add_argument("--name", type=opt.run_name, help="run name (relaunch the same name to resume)")
    p.add_argument("--storage", help="checkpoints and results (path or URI); default ./crossmoco_runs")
    add_no_tracking(p)


def add_up_axis(p: argparse.ArgumentParser) -> None:
    """``--up-axis`` of a labelled source that is read as it is (``eval``, ``finetune``)."""
    p.add_argument("--up-axis", default="y", choices=["x", "y", "z"], help="the source's up axis")


def launch(command: str, cmd: ParsedCommand, run: Callable[[Config, Callable[[str], None]], int]) -> int:
    """The shared part of ``pretrain`` and ``tune``: the storage path checked, console logging (a data
    error becomes one line in :func:`~crossmoco_ray.cli.main.main`)."""
    assert cmd.config is not None
    problem = opt.directory_problem("--storage", cmd.args.storage)
    if problem:
        print(f"crossmoco {command}: {problem}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, flush=True)

    return run(cmd.config, log)
