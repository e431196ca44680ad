"""``crossmoco config {show,presets}``: the resolved configuration as YAML, the shipped presets; their parsers
and handlers, and the configuration examples (also the top-level ``crossmoco --help`` epilog).

Registered on the top-level parser by :func:`crossmoco_ray.cli.main.build_parser`.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from crossmoco_ray.cli.common import add_command, add_config_args
from crossmoco_ray.config.elastic import elastic_lines
from crossmoco_ray.config.loading import preset_names, preset_text
from crossmoco_ray.config.serialized import to_yaml

if TYPE_CHECKING:
    from crossmoco_ray.cli.common import ParsedCommand

CONFIG_EPILOG = """\
examples:
  crossmoco config show                                  # the quickstart configuration, resolved
  crossmoco config show --preset paper                   # the CrossMoCo paper recipe
  crossmoco config show --preset paper objective.queue_length=8000 train.num_workers=4
  crossmoco config show --preset paper train.num_workers=[4,8] train.use_gpu=true   # elastic: 4 to 8 workers
  crossmoco config presets                               # the shipped presets

Overrides are dotted keys (section.key=value) with YAML values: train.epochs=10, model.image_weights=null.
Unknown keys are rejected with the nearest valid name; inconsistent values (a queue length that is
not a multiple of the global batch, k >= points, ...) are rejected with the fix.
"""


def cmd_config_show(cmd: ParsedCommand) -> int:
    cfg = cmd.config
    assert cfg is not None
    t = cfg.train
    per = "train.batch_size_per_worker" if t.batch_size_per_worker is not None else "train.batch_size"
    # YAML comments, so that the output stays a valid --config file
    print(
        f"# global batch {cfg.global_batch} = {t.num_workers} worker(s) x {cfg.per_worker_batch} per worker "
        f"(set by {per})" + (" at the most workers" if cfg.elastic else "")
    )
    for line in elastic_lines(cfg):
        print(f"# {line}")
    sys.stdout.write(to_yaml(cfg))
    return 0


def cmd_config_presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        first = preset_text(name).splitlines()[0].lstrip("# ").strip()
        print(f"{name:<14} {first}")
    return 0


def add_config_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``config`` (with ``show`` and ``presets``) to the top-level subparsers ``sub``."""
    p_config = add_command(
        sub,
        "config",
        help="show the resolved configuration or the presets",
        description="Inspect configurations: presets, YAML files and dotted overrides, resolved and checked.",
        epilog=CONFIG_EPILOG,
    )
    config_sub = p_config.add_subparsers(dest="config_command", metavar="ACTION")
    p_show = add_command(
        config_sub,
        "show",
        help="print the resolved configuration as YAML",
        description="Print the configuration a command would run with, after preset, file and overrides.",
    )
    add_config_args(p_show, cmd_config_show)
    p_presets = add_command(config_sub, "presets", help="list the shipped presets")
    p_presets.set_defaults(func=cmd_config_presets)

    def config_help(_args: argparse.Namespace) -> int:
        p_config.print_help()
        return 0

    p_config.set_defaults(func=config_help)
