"""The two callbacks between a search's layers: Train → Tune results, and Tune → the console.

Imported only once Ray runs (it imports Ray Tune at module level).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback


class Carry:
    """Fills the keys a report lacks with their last reported values (``epoch`` 0 and NaN before any)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.last: dict[str, Any] = {key: 0 if key == "epoch" else math.nan for key in keys}

    def __call__(self, metrics: dict[str, Any]) -> dict[str, Any]:
        self.last.update({k: metrics[k] for k in self.last if k in metrics})
        return {**self.last, **metrics}


class CarriedReport(TuneReportCallback):
    """``TuneReportCallback`` whose every result holds ``keys`` (the ranked metric and ``epoch``).

    Each ``ray.train.report`` becomes a Tune result, mid-epoch checkpoint reports included. A report without
    a key repeats its last reported value (:class:`Carry`), so Tune's strict metric check never fails a
    search and ASHA always finds its ``time_attr``. Runs in the Train controller, which outlives
    worker-group restarts, so the carried values do too.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        super().__init__()
        self.carry = Carry(keys)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics:
            metrics = [self.carry(metrics[0]), *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


def console(line: str) -> None:
    """One line on the driver's console (the callback's log function as it is stored with the search)."""
    print(line, flush=True)


class Progress(tune.Callback):
    """One console line per trial epoch and per trial end, instead of Tune's status tables.

    Mid-epoch reports repeat the last epoch-end ``epoch``; a trial's line is printed when its epoch grows.
    """

    def __init__(self, epochs: int, metric: str, log: Callable[[str], None]) -> None:
        self.epochs, self.metric, self.log = epochs, metric, log
        self.shown: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks with the search. ``print`` pickles by its name, which fails once
        ``builtins.print`` is another object (Ray's tqdm_ray swaps it in the driver when a progress bar
        reaches it, at any time): a log function that does not pickle is stored as :func:`console`."""
        from ray import cloudpickle

        state = dict(self.__dict__)
        try:
            cloudpickle.dumps(state["log"])
        except Exception:  # PicklingError, or whatever a foreign callable raises
            state["log"] = console
        return state

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        epoch = int(result.get("epoch", 0))
        if epoch <= self.shown.get(trial.trial_id, 0):
            return
        self.shown[trial.trial_id] = epoch
        value = float(result.get(self.metric, math.nan))
        self.log(
            f"  trial {trial.trial_id} epoch {epoch}/{self.epochs}: "
            f"loss {float(result.get('loss', math.nan)):.4f}  {self.metric} {value:.4f}"
        )

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.log(f"  trial {trial.trial_id} ended")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.log(f"  trial {trial.trial_id} FAILED: see {trial.local_path or trial.path}")
