"""The ``crossmoco`` command line.

Every command that takes a configuration resolves it the same way: the schema's defaults (the paper
recipe) ← ``--preset`` (default: quickstart) ← ``--config FILE`` ← ``KEY=VALUE`` overrides.
:func:`parse_command` does all of that (and every check that needs no data, no Ray) for any command
line; :func:`main` runs what it returns, and the documented-commands test validates every command in the
docs with it, so the two cannot disagree. ``prepare`` lives in :mod:`.cli_prepare`, ``eval`` and
``export`` in :mod:`.cli_eval`, ``finetune`` in :mod:`.cli_finetune`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from crossmoco_ray import __version__
from crossmoco_ray.bounded import clip
from crossmoco_ray.cli import options as opt
from crossmoco_ray.cli.crash_report import exception_line, save_traceback
from crossmoco_ray.cli.eval import add_eval_parsers
from crossmoco_ray.cli.finetune import add_finetune_parsers
from crossmoco_ray.cli.prepare import add_prepare_parser, add_verify_parser
from crossmoco_ray.config.loading import load_config, preset_names, preset_text
from crossmoco_ray.config.schema import DEFAULT_PRESET, Config
from crossmoco_ray.config.serialized import to_yaml
from crossmoco_ray.errors import ConfigError, DataError

if TYPE_CHECKING:
    from crossmoco_ray.tuning import Space

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


def _add_config_args(p: argparse.ArgumentParser, handler: Callable[[ParsedCommand], int]) -> None:
    """The configuration arguments; ``handler`` gets the :class:`ParsedCommand` with the resolved config."""
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"a shipped preset ({', '.join(preset_names())}); default: {DEFAULT_PRESET}",
    )
    p.add_argument("--config", metavar="FILE", help="a YAML file of overrides, applied after the preset")
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
    space = None
    if form == "tune" and args.space and not args.resume:  # --resume: the search's stored space
        from crossmoco_ray.tuning import check_space, load_space

        space = load_space(args.space)
        check_space(space, cfg)
    return ParsedCommand(form, args, cfg, space)


def _cmd_config_show(cmd: ParsedCommand) -> int:
    cfg = cmd.config
    assert cfg is not None
    t = cfg.train
    per = "train.batch_size_per_worker" if t.batch_size_per_worker is not None else "train.batch_size"
    # YAML comments, so that the output stays a valid --config file
    print(
        f"# global batch {cfg.global_batch} = {t.num_workers} worker(s) x {cfg.per_worker_batch} per worker "
        f"(set by {per})"
    )
    sys.stdout.write(to_yaml(cfg))
    return 0


def _cmd_config_presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        first = preset_text(name).splitlines()[0].lstrip("# ").strip()
        print(f"{name:<14} {first}")
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


def _launch(command: str, cmd: ParsedCommand, run: Callable[[Config, Callable[[str], None]], int]) -> int:
    """The shared part of ``pretrain`` and ``tune``: the storage path checked, console logging (a data
    error becomes one line in :func:`main`)."""
    assert cmd.config is not None
    problem = opt.directory_problem("--storage", cmd.args.storage)
    if problem:
        print(f"crossmoco {command}: {problem}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, flush=True)

    return run(cmd.config, log)


def _cmd_pretrain(cmd: ParsedCommand) -> int:
    from crossmoco_ray.pretrain.driver import pretrain

    args = cmd.args

    def run(cfg: Config, log: Callable[[str], None]) -> int:
        code, _ = pretrain(
            cfg, preset=args.preset, name=args.name, storage=args.storage, data=args.data, log=log
        )
        return code

    return _launch("pretrain", cmd, run)


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


def _cmd_tune(cmd: ParsedCommand) -> int:
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

    return _launch("tune", cmd, run)


def _add_run_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    """``pretrain`` and ``tune``: the commands that start Ray."""
    p_pre = sub.add_parser(
        "pretrain",
        help="pretrain a point encoder with CrossMoCo on Ray Train (the main job)",
        description="Distributed CrossMoCo pretraining on a local Ray or a cluster, tracked, resumable.",
        epilog=PRETRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p_pre, _cmd_pretrain)
    p_pre.add_argument("--data", help="prepared shards (path or URI); default: the built-in synthetic set")
    p_pre.add_argument("--name", type=opt.run_name, help="run name (relaunch the same name to resume)")
    p_pre.add_argument("--storage", help="checkpoints and results (path or URI); default ./crossmoco_runs")
    p_pre.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")

    p_tune = sub.add_parser(
        "tune",
        help="search momentum, temperature, queue length (and more) with Ray Tune",
        description="Hyperparameter search: each trial is a distributed pretraining run, tracked in MLflow.",
        epilog=TUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p_tune, _cmd_tune)
    p_tune.add_argument("--space", help="search space YAML, or a shipped one: moco, moco_lr")
    p_tune.add_argument(
        "--trials", type=opt.positive_int, help="samples from the space (default: tune.num_samples)"
    )
    p_tune.add_argument("--scheduler", choices=["asha", "fifo"], help="default: tune.scheduler (asha)")
    p_tune.add_argument(
        "--name", type=opt.run_name, help="search name (default: derived from the space and config)"
    )
    p_tune.add_argument("--resume", action="store_true", help="continue the interrupted search --name")
    p_tune.add_argument("--data", help="prepared shards (path or URI); default: the built-in synthetic set")
    p_tune.add_argument(
        "--storage", help="searches, trials and results (path or URI); default ./crossmoco_runs"
    )
    p_tune.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def _add_config_parsers(sub: argparse._SubParsersAction[Any]) -> None:
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
    _add_config_args(p_show, _cmd_config_show)
    p_presets = config_sub.add_parser("presets", help="list the shipped presets")
    p_presets.set_defaults(func=_cmd_config_presets)

    def config_help(_args: argparse.Namespace) -> int:
        p_config.print_help()
        return 0

    p_config.set_defaults(func=config_help)


DOCTOR_EPILOG = """\
examples:
  crossmoco doctor                                  # this machine: paste the output into a bug report
  crossmoco doctor --json > doctor.json
  RAY_ADDRESS=127.0.0.1:6379 crossmoco doctor       # and the Ray cluster it would join

Never starts a Ray of its own; secrets among the environment variables are named, not shown.
"""


def _cmd_doctor(args: argparse.Namespace) -> int:
    from crossmoco_ray.cli.doctor import main as doctor

    return doctor(args.address, args.json)


def _add_doctor_parser(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "doctor",
        help="versions, GPUs, native bf16, compiled kernels, the Ray cluster: what a bug report needs",
        description="Print what this machine and install are (and the Ray cluster, when connected).",
        epilog=DOCTOR_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--address", help="a Ray cluster to describe (default: RAY_ADDRESS, else none)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="crossmoco",
        description="CrossMoCo pretraining of point-cloud encoders (point clouds x rendered views) on Ray.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"crossmoco-ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run_parsers(sub)
    add_prepare_parser(sub)
    add_verify_parser(sub)
    add_eval_parsers(sub)
    add_finetune_parsers(sub)
    _add_config_parsers(sub)
    _add_doctor_parser(sub)

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
