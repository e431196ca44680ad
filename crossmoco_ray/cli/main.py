"""The ``crossmoco`` command line, assembled: the top-level parser (:func:`build_parser`),
:func:`parse_command`, :class:`ParsedCommand`, :class:`UsageError` and :func:`main` with its error handling.

Each command group is a module of its own that registers its parser and handler here: ``pretrain``
(:mod:`.pretrain`), ``tune`` (:mod:`.tune`), ``prepare`` and ``verify`` (:mod:`.prepare`), ``eval`` and
``export`` (:mod:`.eval`), ``finetune`` (:mod:`.finetune`), ``config`` (:mod:`.config`), ``doctor``
(:mod:`.doctor`); what several share is in :mod:`.common`. Every command that takes a configuration resolves
it the same way: the schema's defaults (the paper recipe) ← ``--preset`` (default: quickstart) ←
``--config FILE`` ← ``KEY=VALUE`` overrides. :func:`parse_command` does all of that (and every check that
needs no data, no Ray) for any command line; :func:`main` runs what it returns, and the documented-commands
test validates every command in the docs with it, so the two cannot disagree.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from crossmoco_ray import __version__
from crossmoco_ray.bounded import clip
from crossmoco_ray.cli.common import ParsedCommand, resolve_config
from crossmoco_ray.cli.config import CONFIG_EPILOG, add_config_parsers
from crossmoco_ray.cli.crash_report import exception_line, save_traceback
from crossmoco_ray.cli.doctor import add_doctor_parser
from crossmoco_ray.cli.eval import add_eval_parsers
from crossmoco_ray.cli.finetune import add_finetune_parsers
from crossmoco_ray.cli.prepare import add_prepare_parser, add_verify_parser
from crossmoco_ray.cli.pretrain import add_pretrain_parser
from crossmoco_ray.cli.tune import add_tune_parser
from crossmoco_ray.errors import ConfigError, DataError

if TYPE_CHECKING:
    pass


class UsageError(Exception):
    """A command line that argparse rejects (unknown option, bad value, missing argument).

    Raised instead of argparse's print-and-exit so that :func:`parse_command` can be called from code
    (the documented-commands test); :func:`main` prints it exactly as argparse would.
    """

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are exceptions; subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def _form(args: argparse.Namespace) -> str:
    dests = ("command", "eval_command", "finetune_command", "config_command")
    words = [getattr(args, dest, None) for dest in dests]
    return " ".join(w for w in words if w)


def parse_command(argv: Sequence[str] | None = None) -> ParsedCommand:
    """Parse ``argv`` (without the program name) and resolve and check its configuration, as
    ``crossmoco`` does before it runs anything: no training, no Ray, no data access (``--data``,
    ``--storage``, ``--checkpoint`` are not opened; ``--config`` and ``--space`` files are read).

    Raises :class:`UsageError` (argparse) or :class:`ConfigError` (configuration, search space); ``--help``
    and ``--version`` print and raise ``SystemExit(0)`` as usual.
    """
    args = build_parser().parse_args(argv)
    form = _form(args)
    if hasattr(args, "check"):  # a command with its own configuration (finetune): resolved and checked
        args.check(args)
    if not hasattr(args, "configured"):
        return ParsedCommand(form, args)
    cfg = resolve_config(args)
    space = args.space_check(args, cfg) if hasattr(args, "space_check") else None  # tune's search space
    return ParsedCommand(form, args, cfg, space)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="crossmoco",
        description="CrossMoCo pretraining of point-cloud encoders (point clouds x rendered views) on Ray.",
        epilog=CONFIG_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"crossmoco-ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_pretrain_parser(sub)
    add_tune_parser(sub)
    add_prepare_parser(sub)
    add_verify_parser(sub)
    add_eval_parsers(sub)
    add_finetune_parsers(sub)
    add_config_parsers(sub)
    add_doctor_parser(sub)

    def top_help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    parser.set_defaults(func=top_help)  # a bare `crossmoco`; every subcommand sets its own
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a ``crossmoco`` command line; returns the exit status. Whatever the input files and option
    values, the user sees one line per problem, never a traceback: usage, configuration and data errors
    exit 2; an unexpected exception (a bug) exits 1 with its type and a bounded message, its traceback
    saved to a private file (:func:`save_traceback`) that the line names; Ctrl+C exits 130."""
    prefix = "crossmoco"
    try:
        cmd = parse_command(argv)
        prefix = f"crossmoco {cmd.form}".strip()
        return cmd.run()
    except UsageError as err:  # what argparse itself prints, and its exit status
        err.parser.print_usage(sys.stderr)
        print(f"{err.parser.prog}: error: {clip(err.message, 1000)}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"crossmoco: configuration error: {clip(str(err), 5000)}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"{prefix}: {clip(str(err), 3000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # the machine said no (a full disk, a permission): not a bug, but kept
        if err.filename is None:
            return _internal_error(prefix, err)
        saved = save_traceback(err, prefix)
        where = f" (traceback: {saved})" if saved else ""
        reason = err.strerror or exception_line(err)
        print(f"{prefix}: {clip(str(err.filename), 300)}: {reason}{where}", file=sys.stderr)
        return 1
    except Exception as err:
        return _internal_error(prefix, err)


def _internal_error(prefix: str, err: BaseException) -> int:
    """One line for an unexpected exception (a bug), its traceback saved to a private file; exit 1."""
    saved = save_traceback(err, prefix)
    where = f"its traceback is in {saved}" if saved else "its traceback could not be saved"
    print(
        f"{prefix}: internal error: {exception_line(err)} -- a bug in crossmoco-ray: please report it "
        f"with the command line; {where}",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
