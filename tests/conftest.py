"""Shared test setup: quiet, offline Ray settings and one local Ray instance per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before anything imports Ray: no usage stats (no network), no progress bars, generous start timeouts on
# 2-core CI machines, one footer-reading actor (Ray's own test settings).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODELNET40 = SHARED_DATA / "modelnet40_1024"


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A private local Ray for the whole session (4 logical CPUs so Train workers and Data tasks fit)."""
    import ray

    os.environ["RAY_TMPDIR"] = str(tmp_path_factory.mktemp("rt"))
    ray.init(address="local", num_cpus=4, object_store_memory=300 * 1024**2, include_dashboard=True)
    yield
    ray.shutdown()


# Seconds per test file (setup, call and teardown, module fixtures included), printed at the end of every run
# beside --durations' slowest tests: CI time is budgeted, and a file's Ray fits hide in its fixtures.
_FILE_SECONDS: dict[str, float] = {}
FILES_SHOWN = 15


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = report.nodeid.split("::", 1)[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FILE_SECONDS:
        return
    total = sum(_FILE_SECONDS.values())
    slowest = sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])[:FILES_SHOWN]
    terminalreporter.write_sep("=", f"slowest {len(slowest)} test files (of {total:.0f} s in tests)")
    for path, seconds in slowest:
        terminalreporter.write_line(f"{seconds:8.1f}s  {100 * seconds / total:4.1f}%  {path}")
