"""The monitor's random-init baseline across a restart: its per-object results come back with the history,
so a resumed run's gains keep their paired standard errors; a crafted history cannot feed them garbage."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

import crossmoco_ray.pretrain.worker as worker
from crossmoco_ray.evaluate.monitor import MonitorSpec
from crossmoco_ray.pretrain.worker import PretrainJob


class FakeMonitor:
    measured = 0

    def __init__(self) -> None:
        self.baseline: dict[str, float] = {}
        self.baseline_correct: dict[str, list[int]] = {}
        self.source, self.device = "fake", "cpu"

    @classmethod
    def from_spec(cls, spec: MonitorSpec) -> FakeMonitor:
        return cls()

    def set_baseline(self, encoder: Any) -> dict[str, float]:
        FakeMonitor.measured += 1
        self.baseline, self.baseline_correct = {"random_val_knn": 0.5}, {"val_knn": [1, 0, 1]}
        return self.baseline


def measure(history: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> FakeMonitor:
    monkeypatch.setattr(worker, "Monitor", FakeMonitor)
    job = PretrainJob.__new__(PretrainJob)
    job.initial_point = object()  # type: ignore[assignment]
    job.spec = SimpleNamespace(monitor=MonitorSpec(root="x"), iid_batch_classes=4.0)  # type: ignore[assignment]
    job.chance = {}
    tracker = SimpleNamespace(log_metrics=lambda *a: None)
    ctx = SimpleNamespace(history=history, device="cpu", say=lambda _: None, tracker=tracker, step=0)
    job._measure_baseline(ctx)  # type: ignore[arg-type]
    assert isinstance(job.monitor, FakeMonitor)
    return job.monitor


def test_a_resumed_run_gets_random_inits_per_object_results_back(monkeypatch: pytest.MonkeyPatch) -> None:
    history: dict[str, Any] = {}
    measure(history, monkeypatch)
    assert history["baseline_correct"] == {"val_knn": [1, 0, 1]}  # kept for a restart
    FakeMonitor.measured = 0
    restored = measure(history, monkeypatch)  # the restart: the same monitor spec, so not measured again
    assert FakeMonitor.measured == 0
    assert restored.baseline_correct == {"val_knn": [1, 0, 1]}


@pytest.mark.parametrize(
    "crafted", ["text", {"val_knn": "101"}, {"val_knn": [1, 2]}, {"val_knn": [0.5]}, None]
)
def test_a_crafted_history_gives_gains_without_standard_errors(
    crafted: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    history: dict[str, Any] = {}
    measure(history, monkeypatch)
    history["baseline_correct"] = crafted
    assert measure(history, monkeypatch).baseline_correct == {}
