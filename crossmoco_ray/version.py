"""The code version a run was made with, recorded even where the code has no ``.git``.

A job submitted with ``cluster/submit.sh`` runs from an uploaded copy of the submitter's checkout without
its ``.git`` (``cluster/runtime_env.yaml`` excludes it), and the project's image is built from a context
without it (``.dockerignore``), so ``git rev-parse`` alone says nothing there. The commit is therefore
captured where the checkout still exists and handed on in ``CROSSMOCO_GIT_COMMIT``:

- ``cluster/submit.sh`` sets it from ``git rev-parse HEAD`` (``-dirty`` appended when tracked files have
  uncommitted changes, which the upload includes) in the job's runtime environment (every Ray process);
- the image sets it from its build argument: ``docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD)``.

A submitted job's value overrides the image's: the job runs the uploaded code, not the image's copy.
"""

from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path

from crossmoco_ray import __version__

COMMIT_ENV = "CROSSMOCO_GIT_COMMIT"
DISTRIBUTION = "crossmoco-ray"
UNKNOWN = "unknown"
# MLflow tag names under which a run records :func:`code_version`
TAG_COMMIT = "git_commit"
TAG_COMMIT_SOURCE = "git_commit_source"
TAG_VERSION = "crossmoco_version"


def package_version() -> str:
    """The installed distribution's version, else the package's own ``__version__`` (a source tree)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return __version__


def _git_head(directory: Path) -> str | None:
    """``git rev-parse HEAD`` of the checkout ``directory`` is part of (``-dirty`` if tracked files have
    changes); None without git, or when the package is not tracked there (installed into a virtual
    environment that happens to sit inside some other repository)."""
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", "__init__.py"],
            capture_output=True,
            timeout=5,
            cwd=directory,
        )
        if tracked.returncode != 0:
            return None
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=directory
        )
        commit = head.stdout.strip()
        if head.returncode != 0 or not commit:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=directory,
        )
        return f"{commit}-dirty" if status.returncode == 0 and status.stdout.strip() else commit
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> tuple[str, str]:
    """(commit, where it came from): ``env`` (:data:`COMMIT_ENV`), ``git`` (the package's checkout) or
    ``unknown``. An empty or ``unknown`` variable (the image built without ``GIT_COMMIT``) falls through."""
    from_env = os.environ.get(COMMIT_ENV, "").strip()
    if from_env and from_env != UNKNOWN:
        return from_env, "env"
    from_git = _git_head(Path(__file__).resolve().parent)
    if from_git:
        return from_git, "git"
    return UNKNOWN, UNKNOWN


def code_version() -> dict[str, str]:
    """The tags a run records: ``{git_commit, git_commit_source, crossmoco_version}``."""
    commit, source = git_commit()
    return {TAG_COMMIT: commit, TAG_COMMIT_SOURCE: source, TAG_VERSION: package_version()}
