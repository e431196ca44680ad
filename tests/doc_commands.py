"""Find the ``crossmoco`` commands written in the docs, specs and help texts, and check them with the CLI.

Used by ``tests/test_documented_commands.py`` (every documented command) and ``tests/cluster/test_specs.py``
(the commands of the spot-fleet specs). A command is found wherever it is written:

- Markdown: every line of a fenced code block, and inline code spans (``fragment``: see below);
- shell scripts and the Dockerfile: code and ``#`` comment lines;
- YAML: ``#`` comment lines, and every string value (KubeRay ``entrypoint``, launcher commands);
- lines continued with a trailing backslash are joined (in comments too);
- the invocation is ``crossmoco ARGS``, ``python -m crossmoco_ray[.cli] ARGS``, or
  ``cluster/submit.sh [OPTIONS] -- ARGS``; environment prefixes (``RAY_ADDRESS=... crossmoco``), prompts
  and wrappers (``ray job submit ... -- crossmoco``) around it are ignored; it ends at a shell operator
  (``&&``, ``|``, ``;``, redirections) or a comment.

Placeholders a user fills in are handled without opening anything: ``<...>`` becomes one token,
``s3://bucket/...`` and ``$VAR`` stay strings (the CLI never opens ``--data``/``--storage``/
``--checkpoint`` while parsing), and a ``--config``/``--space`` file that is not in this checkout (one the
user writes, or a run's ``best.yaml``) is left out, with a note. A ``fragment`` (an inline code span, or a
command with ``...`` in it) may omit required arguments: placeholders are filled in for those, and
everything it does state must be valid.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from crossmoco_ray.cli.main import ParsedCommand, UsageError, build_parser, parse_command
from crossmoco_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "PLACEHOLDER"
OPERATORS = {"&&", "||", ";", ";;", "|", "&", ">", ">>", "<", "<<", ">&", "<&", "(", ")", "|&", "<<<"}
# `<path>`, `<224-px shards>`: one token (the space would split it); not `<<` or `< file`
ANGLE = re.compile(r"<[^<>\s][^<>]*>")
INLINE_CODE = re.compile(r"`([^`]+)`")
FENCE = re.compile(r"^\s*(```|~~~)")
# a cheap pre-filter: lines that could hold an invocation
MENTION = re.compile(r"crossmoco(?![-_.:/\w])|crossmoco_ray(?:\.cli)?\b|submit\.sh")


@dataclass(frozen=True)
class DocCommand:
    """One documented command: where it is written, as written, and the argv the CLI gets."""

    where: str  # "docs/cluster.md:57"
    text: str  # the logical line it was found in (continuations joined)
    argv: tuple[str, ...]
    fragment: bool = False
    notes: tuple[str, ...] = field(default=())
    # the error a console block shows after the command (`$ crossmoco ...` then `crossmoco: configuration
    # error: ...`): the command must fail with exactly that message (whitespace aside)
    shown_error: str | None = None


@dataclass(frozen=True)
class _Line:
    lineno: int
    text: str
    inline: bool = False
    output: str = ""  # console blocks: what is shown after a `$ ` prompt line, up to the next one


# --------------------------------------------------------------------------------------------------
# Lines of text in each kind of file
# --------------------------------------------------------------------------------------------------


def _uncomment(line: str) -> str:
    stripped = line.lstrip()
    return stripped.lstrip("#") if stripped.startswith("#") else line


def _join_continued(lines: list[_Line]) -> list[_Line]:
    """Join lines that end with a backslash to the next one (shell continuation, also in comments)."""
    out: list[_Line] = []
    pending: _Line | None = None
    for line in lines:
        if pending is not None:
            line = _Line(pending.lineno, pending.text + " " + line.text.strip(), line.inline)
            pending = None
        if not line.inline and line.text.rstrip().endswith("\\"):
            pending = _Line(line.lineno, line.text.rstrip()[:-1].rstrip(), line.inline)
        else:
            out.append(line)
    if pending is not None:
        out.append(pending)
    return out


def _with_output(block: list[_Line]) -> list[_Line]:
    """A code block's lines, each ``$ `` prompt line carrying the output lines shown under it."""
    out = _join_continued(block)
    prompts = [i for i, line in enumerate(out) if line.text.lstrip().startswith("$ ")]
    for k, i in enumerate(prompts):
        end = prompts[k + 1] if k + 1 < len(prompts) else len(out)
        shown = "\n".join(line.text for line in out[i + 1 : end]).strip()
        out[i] = _Line(out[i].lineno, out[i].text, output=shown)
    return out


def markdown_lines(text: str) -> list[_Line]:
    lines: list[_Line] = []
    block: list[_Line] = []
    in_fence = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            if in_fence:
                lines += _with_output(block)
                block = []
            in_fence = not in_fence
        elif in_fence:
            block.append(_Line(n, line))
        else:
            lines += [_Line(n, m.group(1), inline=True) for m in INLINE_CODE.finditer(line)]
    return lines + _with_output(block)


def shell_lines(text: str) -> list[_Line]:
    return _join_continued([_Line(n, _uncomment(line)) for n, line in enumerate(text.splitlines(), 1)])


def _scalars(node: yaml.Node) -> Iterator[yaml.ScalarNode]:
    if isinstance(node, yaml.ScalarNode):
        yield node
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _scalars(item)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield from _scalars(key)
            yield from _scalars(value)


def yaml_lines(text: str) -> list[_Line]:
    comments = [
        _Line(n, _uncomment(line))
        for n, line in enumerate(text.splitlines(), 1)
        if line.lstrip().startswith("#")
    ]
    values: list[_Line] = []
    for doc in yaml.compose_all(text):
        for node in _scalars(doc) if doc is not None else ():
            if isinstance(node.value, str) and MENTION.search(node.value):
                first = node.start_mark.line + 1
                values += _join_continued(
                    [_Line(first + i, line) for i, line in enumerate(node.value.splitlines())]
                )
    return _join_continued(comments) + values


def file_lines(path: Path) -> list[_Line]:
    text = path.read_text()
    if path.suffix == ".md":
        return markdown_lines(text)
    if path.suffix in {".yaml", ".yml"}:
        return yaml_lines(text)
    return shell_lines(text)  # .sh, Dockerfile


# --------------------------------------------------------------------------------------------------
# Invocations in a line
# --------------------------------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    lexer = shlex.shlex(ANGLE.sub(PLACEHOLDER, text), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _first_arg(tokens: list[str], i: int) -> int | None:
    """If an invocation starts at ``tokens[i]``: the index of its first argument, else None."""
    tok = tokens[i]
    if tok == "crossmoco":
        return i + 1
    if (
        re.fullmatch(r"(.*/)?python3?(\.\d+)?", tok)
        and tokens[i + 1 : i + 2] == ["-m"]
        and tokens[i + 2 : i + 3] in (["crossmoco_ray"], ["crossmoco_ray.cli"])
    ):
        return i + 3
    if tok.endswith("submit.sh"):  # cluster/submit.sh [OPTIONS] -- ARGS
        for j in range(i + 1, len(tokens)):
            if tokens[j] in OPERATORS:
                return None
            if tokens[j] == "--":
                return j + 1
    return None


def invocations(text: str) -> list[list[str]]:
    """The argument lists of every invocation in one logical line (see the module docstring)."""
    mention = MENTION.search(text)
    if mention is None:
        return []
    try:
        tokens = _tokens(text)
    except ValueError:  # an unbalanced quote in prose before the command: start at the command
        tokens = _tokens(text[mention.start() :])
    found, i = [], 0
    while i < len(tokens):
        start = _first_arg(tokens, i)
        if start is None:
            i += 1
            continue
        j = start
        while j < len(tokens) and tokens[j] not in OPERATORS:
            j += 1
        args = tokens[start:j]
        if args and re.fullmatch(r"\d", args[-1]) and j < len(tokens) and tokens[j].startswith(">"):
            args = args[:-1]  # the "2" of 2>&1
        found.append(args)
        i = j
    return found


def _user_file(option: str, value: str, root: Path) -> bool:
    """A ``--config``/``--space`` value that names no file of this checkout (nor a shipped space)."""
    if (root / value).is_file():
        return False
    return not (
        option == "--space" and (root / "tune_spaces" / f"{value.removesuffix('.yaml')}.yaml").is_file()
    )


def to_command(
    where: str, text: str, args: list[str], inline: bool, output: str = "", root: Path = ROOT
) -> DocCommand:
    notes, argv = [], []
    fragment = inline or any(a == "..." or a.endswith("...") for a in args)
    it = iter(a for a in args if not (a == "..." or a.endswith("...")))
    for arg in it:
        option, eq, value = arg.partition("=")
        if option in {"--config", "--space"}:
            if not eq:
                value = next(it, "")
            if value and _user_file(option, value, root):
                notes.append(f"{option} {value}: a file the user provides, not in this checkout; left out")
                continue
            argv += [option, value]
            continue
        argv.append(arg)
    shown_error = output if output.startswith("crossmoco: configuration error:") else None
    return DocCommand(where, text.strip(), tuple(argv), fragment, tuple(notes), shown_error)


def commands_in_lines(lines: list[_Line], name: str, root: Path = ROOT) -> list[DocCommand]:
    return [
        to_command(f"{name}:{line.lineno}", line.text, args, line.inline, line.output, root)
        for line in lines
        for args in invocations(line.text)
        if args or line.text.strip() != "crossmoco"  # the bare name (a YAML value, `crossmoco` in prose)
    ]


def commands_in_file(path: Path, root: Path = ROOT) -> list[DocCommand]:
    return commands_in_lines(file_lines(path), str(path.relative_to(root)), root)


def parser_forms(parser: argparse.ArgumentParser | None = None, prefix: str = "") -> list[str]:
    """Every subcommand path of the CLI ("pretrain", "eval svm", "config", "config show", ...)."""
    parser = parser or build_parser()
    forms = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                forms += [prefix + name, *parser_forms(sub, f"{prefix}{name} ")]
    return forms


def help_examples() -> dict[str, str]:
    """The ``examples:`` block of every ``crossmoco ... --help``: documentation too (the rest of a help
    text is a synopsis and prose)."""
    out = {}
    for form in ["", *parser_forms()]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            parse_command([*form.split(), "--help"])
        lines = buf.getvalue().splitlines()
        if "examples:" in lines:
            start = lines.index("examples:")
            block = [line if n > start and line.strip() else "" for n, line in enumerate(lines)]
            end = next((n for n in range(start + 1, len(block)) if not block[n]), len(block))
            out[f"crossmoco {form} --help".replace("  ", " ")] = "\n".join(block[:end])
    return out


# --------------------------------------------------------------------------------------------------
# Checking one command with the CLI's own parser and configuration resolution
# --------------------------------------------------------------------------------------------------


def _missing(err: UsageError) -> list[argparse.Action]:
    """The required arguments argparse reports missing, as actions of the parser that raised."""
    prefix = "the following arguments are required: "
    if not err.message.startswith(prefix):
        return []
    names = err.message.removeprefix(prefix).split(", ")
    actions = []
    for action in err.parser._actions:
        name = "/".join(action.option_strings) or action.metavar or action.dest
        if name in names:
            actions.append(action)
    return actions


def parse(cmd: DocCommand, root: Path = ROOT) -> ParsedCommand | str:
    """The command as ``crossmoco`` parses and resolves it (run from ``root``, as the docs assume), or
    the form ``"help"`` for ``--help``/``--version``. Raises UsageError / ConfigError like the CLI."""
    argv = list(cmd.argv)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        for _ in range(5):  # a fragment: fill in what it leaves out, one parser level at a time
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    return parse_command(argv)
            except SystemExit as exit_:
                if exit_.code not in (0, None):
                    raise
                return "help"
            except UsageError as err:
                missing = _missing(err) if cmd.fragment else []
                if not missing:
                    raise
                for action in missing:
                    if isinstance(action, argparse._SubParsersAction):
                        argv.append(next(iter(action.choices)))
                    elif action.option_strings:
                        argv += [action.option_strings[0], PLACEHOLDER]
                    else:
                        argv.append(PLACEHOLDER)
        raise AssertionError(f"could not complete the fragment {cmd.text!r}")
    finally:
        os.chdir(cwd)


def problem(cmd: DocCommand, root: Path = ROOT) -> str | None:
    """None when the command is valid (or fails exactly as its console block shows); else what
    ``crossmoco`` says about it, with the file and line it is written at."""
    head = f"{cmd.where}: `{cmd.text}`\n  as run: crossmoco {' '.join(cmd.argv)}\n  "
    try:
        parse(cmd, root)
    except UsageError as err:
        return head + f"usage error: {err.message}"
    except ConfigError as err:
        said = f"crossmoco: configuration error: {err}"
        if cmd.shown_error is None:
            return head + said
        if said.split() != cmd.shown_error.split():
            return head + f"the docs show\n{cmd.shown_error}\n  but crossmoco says\n{said}"
        return None
    if cmd.shown_error is not None:
        return head + f"the docs show an error, but the command is valid:\n{cmd.shown_error}"
    return None
