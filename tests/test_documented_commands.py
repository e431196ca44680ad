"""Every ``crossmoco`` command written in the docs, the cluster specs, the presets' headers and the help
texts parses and resolves exactly as ``crossmoco`` would run it (``crossmoco_ray.cli.main.parse_command``: the
same parser, the same preset ← --config ← overrides resolution, the same checks), without training,
Ray or data. How commands are found and placeholders handled: ``tests/doc_commands.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from crossmoco_ray.cli.main import ParsedCommand, parse_command
from tests.doc_commands import (
    ROOT,
    DocCommand,
    commands_in_file,
    commands_in_lines,
    help_examples,
    markdown_lines,
    parse,
    parser_forms,
    problem,
    shell_lines,
    yaml_lines,
)

# The commands that take a configuration: validated down to the resolved, checked Config.
CONFIG_BEARING = {"pretrain", "tune", "config show"}
# The others: their arguments are parsed (types, choices, required ones), nothing is opened.
ARGUMENTS_ONLY = {
    "": "a bare `crossmoco` prints the help",
    "prepare": "SOURCE and --out are paths, read only when it runs",
    "verify": "SHARDS is read only when it runs",
    "eval": "a group: eval svm / eval knn / eval fewshot / eval report",
    "eval svm": "--data / --checkpoint are read only when it runs",
    "eval fewshot": "--data / --checkpoint are read only when it runs",
    "eval knn": "--data / --checkpoint are read only when it runs",
    "eval report": "--data / --checkpoint are read only when it runs",
    "export": "the checkpoint is read only when it runs",
    "finetune": "a group: finetune cls / finetune partseg",
    "finetune cls": "its own config is resolved and checked; --data / --checkpoint are read when it runs",
    "finetune partseg": "its own config is resolved and checked; --data / --checkpoint are read when it runs",
    "config": "a group: prints its help",
    "config presets": "lists the presets",
    "doctor": "--address is joined only when it runs",
}
# Matches of the command finder that are not commands: (file, text in the line) -> why.
NOT_COMMANDS = {
    ("cluster/submit.sh", 'python -m crossmoco_ray.cli "$@"'): "the script forwards its own arguments",
}


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted(p for p in (ROOT / "cluster").rglob("*") if p.is_file())
    files += sorted((ROOT / "crossmoco_ray" / "config" / "presets").glob("*.yaml"))  # the presets' headers
    files += sorted((ROOT / "tune_spaces").glob("*.yaml"))
    return [*files, ROOT / "docker" / "Dockerfile"]


def _excluded(cmd: DocCommand) -> bool:
    return any(cmd.where.startswith(f"{f}:") and text in cmd.text for f, text in NOT_COMMANDS)


def all_commands() -> list[DocCommand]:
    cmds = [c for path in doc_files() for c in commands_in_file(path)]
    cmds += [c for name, text in help_examples().items() for c in commands_in_lines(shell_lines(text), name)]
    return cmds


COMMANDS = all_commands()


def _form(parsed: ParsedCommand | str) -> str:
    return parsed if isinstance(parsed, str) else parsed.form


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if not _excluded(c)], ids=lambda c: c.where)
def test_documented_command_is_valid(cmd: DocCommand) -> None:
    error = problem(cmd)
    assert error is None, error
    if cmd.shown_error is not None:
        return  # it fails, as its console block shows
    parsed = parse(cmd)
    form = _form(parsed)
    assert form == "help" or form in CONFIG_BEARING or form in ARGUMENTS_ONLY, (
        f"{cmd.where}: `crossmoco {form}` is neither config-bearing nor listed in ARGUMENTS_ONLY"
    )
    if isinstance(parsed, ParsedCommand):
        assert (parsed.config is not None) == (form in CONFIG_BEARING), cmd.where


def test_the_docs_are_covered() -> None:
    """The finder reaches every kind of source, and finds the flagship command where the issue saw it."""
    where = {c.where.rsplit(":", 1)[0] for c in COMMANDS}
    required = {"README.md", "docs/cluster.md", "docs/tune.md", "docs/results.md", "cluster/aws.yaml",
                "cluster/gcp.yaml", "cluster/submit.sh", "cluster/local_head.sh",
                "cluster/kuberay/rayjob.yaml", "cluster/kuberay/raycluster.yaml",
                "crossmoco_ray/config/presets/modelnet40-gpu.yaml", "crossmoco pretrain --help",
                "crossmoco tune --help"}  # fmt: skip
    assert required <= where, required - where
    flagship = {
        c.where.rsplit(":", 1)[0]
        for c in COMMANDS
        if c.argv[:1] == ("pretrain",) and "--preset" in c.argv and "paper" in c.argv
        and "train.use_gpu=true" in c.argv
    }  # fmt: skip
    assert {
        "README.md",
        "docs/cluster.md",
        "cluster/aws.yaml",
        "cluster/gcp.yaml",
        "cluster/submit.sh",
    } <= flagship
    for file, text in NOT_COMMANDS:  # no stale exclusions
        assert any(c.where.startswith(f"{file}:") and text in c.text for c in COMMANDS), (file, text)


def test_every_subcommand_is_classified() -> None:
    forms = {"", *parser_forms()}
    assert forms == CONFIG_BEARING | set(ARGUMENTS_ONLY), forms ^ (CONFIG_BEARING | set(ARGUMENTS_ONLY))
    for form in CONFIG_BEARING:
        assert parse_command(form.split()).config is not None, form


def test_the_paper_preset_on_8_gpus_is_the_papers_20_per_gpu() -> None:
    cfg = parse_command(["pretrain", "--preset", "paper", "train.num_workers=8", "train.use_gpu=true"]).config
    assert cfg is not None
    assert (cfg.global_batch, cfg.per_worker_batch) == (160, 20)


SYNTHETIC_MD = """\
# A doc that rotted

```bash
crossmoco pretrain --preset paper train.num_workers=2              # fine
crossmoco pretrain --preset paper objective.queue_lenght=8000      # unknown key
crossmoco pretrain --preset paper \\
    train.num_workers=three                                          # invalid value, continued line
RAY_ADDRESS=ray://head:10001 ray job submit --address x -- crossmoco tune --space moco --trials eight
python -m crossmoco_ray config show train.batch_size=0 && echo done
cluster/submit.sh --no-wait -- pretrain --presett paper
crossmoco pretrain --config <your file>.yaml --data s3://bucket/<shards> --storage $STORAGE
```

Evaluate with `crossmoco eval svm ... --protocol both-ways`.
Or `crossmoco eval fewshot ... --episodes 5`.

```console
$ crossmoco config show objective.queue_length=1000
crossmoco: configuration error: something the CLI no longer says
```
"""

SYNTHETIC_YAML = """\
# header: crossmoco pretrain --preset quickstart train.epochs=2
spec:
  entrypoint: >-
    crossmoco pretrain --preset paper
    train.max_failure=-1
"""


def test_a_rotten_doc_fails_with_file_and_line(tmp_path: Path) -> None:
    """The negative self-test: bad keys, values, options and shown errors are caught, and located."""
    cmds = commands_in_lines(markdown_lines(SYNTHETIC_MD), "doc.md", tmp_path)
    cmds += commands_in_lines(yaml_lines(SYNTHETIC_YAML), "job.yaml", tmp_path)
    problems = {c.where: problem(c, tmp_path) for c in cmds}
    bad = {where for where, p in problems.items() if p}
    assert bad == {"doc.md:5", "doc.md:6", "doc.md:8", "doc.md:9", "doc.md:10", "doc.md:14", "doc.md:18",
                   "job.yaml:3"}, problems  # fmt: skip
    assert "did you mean 'objective.queue_length'" in problems["doc.md:5"]
    assert "train.num_workers" in problems["doc.md:6"]
    assert "--trials" in problems["doc.md:8"]
    assert "train.batch_size" in problems["doc.md:9"]
    assert "--presett" in problems["doc.md:10"]
    assert "both-ways" in problems["doc.md:14"]
    assert "no longer says" in problems["doc.md:18"]  # the error a console block shows is checked too
    assert "train.max_failures" in problems["job.yaml:3"]  # the nearest valid name
    for where, p in problems.items():
        assert p is None or p.startswith(f"{where}: "), p
    # placeholders: `<...>`, s3://bucket, $VAR are never opened; a --config the user writes is left out
    placeholder = next(c for c in cmds if c.where == "doc.md:11")
    assert problems["doc.md:11"] is None
    assert "--config" not in placeholder.argv
    assert placeholder.notes
    # a fragment (inline code, `...`) may leave required arguments out, but what it states is checked
    assert {c.where for c in cmds if c.fragment} == {"doc.md:14", "doc.md:15"}
    assert problems["doc.md:15"] is None


def test_shell_continuations_in_comments_are_joined() -> None:
    text = "#   crossmoco pretrain --preset paper \\\n#       train.num_workers=8 train.use_gpu=true\n"
    (cmd,) = commands_in_lines(shell_lines(text), "x.sh")
    assert cmd.argv == ("pretrain", "--preset", "paper", "train.num_workers=8", "train.use_gpu=true")
    assert cmd.where == "x.sh:1"
