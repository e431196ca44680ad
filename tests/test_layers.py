"""The layers of docs/architecture.md are enforced: import-linter's contracts (pyproject.toml,
``[tool.importlinter]``) hold on the package, and a wrong-way import planted in a copy of it breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "crossmoco_ray"
LEAF_ALLOWED = {"storage", "errors", "bounded", "version"}  # what tracking may import of the package


def lint_imports() -> str:
    """The ``lint-imports`` of this interpreter's environment (else the one on PATH)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("lint-imports", path=path)
    if found is None:
        pytest.skip(
            "lint-imports is not installed (import-linter, in the dev extra: pip install -e '.[dev]')"
        )
    return found


def run_lint(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the package under ``root`` with ``root/pyproject.toml``: ``root`` goes first on the
    path, so the package analysed is the one there, whatever an (editable) install points to."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env["COLUMNS"] = "300"  # contract names on one line each, not wrapped at 80
    return subprocess.run(
        [lint_imports(), "--no-cache", "--no-logo", str(root / "pyproject.toml")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def contracts() -> dict[str, dict]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as CI
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def top_level_modules() -> set[str]:
    return {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.is_file() and p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()
    }


def test_the_package_keeps_its_import_contracts() -> None:
    done = run_lint(ROOT)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " 0 broken." in done.stdout


def test_the_tracking_leaf_contract_forbids_every_other_module() -> None:
    """The leaf rule lists what tracking may not import: a module added to the package is forbidden too."""
    leaf = contracts()["tracking-leaf"]
    assert leaf["source_modules"] == ["crossmoco_ray.tracking"]
    forbidden = {name.removeprefix("crossmoco_ray.") for name in leaf["forbidden_modules"]}
    assert forbidden == top_level_modules() - LEAF_ALLOWED - {"tracking"}


def test_a_planted_wrong_way_import_breaks_the_contracts(tmp_path: Path) -> None:
    """The core importing an upper layer: a copy of the package with one such import fails, naming the
    contracts it breaks and the planted line (so the copy, not the installed package, was analysed)."""
    shutil.copytree(PACKAGE, tmp_path / "crossmoco_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    queue = tmp_path / "crossmoco_ray" / "nn" / "queue.py"
    text = queue.read_text().rstrip("\n")
    queue.write_text(f"{text}\nimport crossmoco_ray.evaluate  # planted\n")
    planted_line = len(queue.read_text().splitlines())

    done = run_lint(tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    names = {c["id"]: c["name"] for c in contracts().values()}
    assert f"{names['core']} BROKEN" in out
    assert f"{names['layers']} BROKEN" in out
    assert "crossmoco_ray.nn is not allowed to import crossmoco_ray.evaluate" in out
    assert f"crossmoco_ray.nn.queue -> crossmoco_ray.evaluate (l.{planted_line})" in out
