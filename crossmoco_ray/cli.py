"""The ``crossmoco`` command line.

Every command that takes a configuration resolves it the same way: the schema's defaults (the paper
recipe) ← ``--preset`` (default: quickstart) ← ``--config FILE`` ← ``KEY=VALUE`` overrides.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossmoco",
        description="CrossMoCo pretraining of point-cloud encoders (point clouds x rendered views) on Ray.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"crossmoco-ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
