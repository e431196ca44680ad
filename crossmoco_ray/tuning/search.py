"""``crossmoco tune``: a Ray Tune search in which every trial is a distributed pretraining run.

Train V2 cannot be passed to a ``Tuner``; the working pattern (RAY.md §3.1) is a Tune *function* trainable
(:func:`trial_driver`) that builds and fits a ``TorchTrainer`` with ``TuneReportCallback``, so each epoch's
``tune.metric`` (default ``val_svm_clean``, the clean-protocol SVM on validation data) reaches the scheduler
(ASHA over epochs). Each trial's Train run is named after its trial id
under ``STORAGE/SEARCH/trials``, so a resumed search also resumes its interrupted trials from their last
checkpoint.

MLflow: a parent run for the search (params: the base config and the space; artifacts: summary table,
plot, best preset) and a nested child run per trial (the trial's resolved config as params, its metrics as
the workers log them, ``tune_status``: completed, stopped_early, nonfinite or error).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from ..config import Config, ConfigError, config_hash, flatten, validate
from ..tracking import Tracker, default_tracking_uri
from ..train.launcher import (
    _read_json,
    _write_json,
    build_trainer,
    check_resources,
    init_ray,
    resolve_run,
    resolve_storage,
    start_tracking,
)
from .report import close_child_runs, fmt, trial_rows, write_outputs
from .space import Space, check_space, parse_space, with_values

SEARCH_FILE = "crossmoco_search.json"
DRIVER_CPU = 0.1  # a trial is only a driver; Tune rejects {"CPU": 0}
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def trial_resources(cfg: Config) -> tuple[float, float]:
    """(CPUs, GPUs) one trial occupies: its workers, the CPUs kept for Ray Data, its driver."""
    t = cfg.train
    cpus = t.num_workers * t.cpus_per_worker + t.data_cpus + DRIVER_CPU
    gpus = t.num_workers * t.gpus_per_worker if t.use_gpu else 0.0
    return cpus, gpus


def concurrent_trials(cfg: Config, resources: dict[str, float]) -> int:
    """How many trials fit at once (a Train run starts only when all its workers fit)."""
    cpus, gpus = trial_resources(cfg)
    fit = int(resources.get("CPU", 0.0) // cpus + 1e-9)
    if gpus > 0:
        fit = min(fit, int(resources.get("GPU", 0.0) // gpus + 1e-9))
    fit = max(1, fit)
    if cfg.tune.max_concurrent_trials:
        fit = min(fit, cfg.tune.max_concurrent_trials)
    return fit


def check_search(cfg: Config, space: Space, manifest: dict[str, Any]) -> None:
    """Everything about a search that can be wrong before a trial starts."""
    check_space(space, cfg)
    monitored = cfg.tune.metric.startswith(("val_", "gain_val_"))
    if monitored and cfg.eval.data is None and "val" not in manifest["counts"]:
        raise ConfigError(
            f"the search ranks trials by {cfg.tune.metric}, which needs validation data: prepare the data "
            "with `crossmoco prepare ... --val-fraction 0.1` (the built-in dataset has one) or set eval.data "
            "to a labelled dataset"
        )
    if cfg.tune.scheduler == "asha":
        if cfg.eval.eval_every != 1:
            raise ConfigError(
                f"ASHA compares trials on {cfg.tune.metric} at every epoch, but "
                f"eval.eval_every={cfg.eval.eval_every}: set eval.eval_every=1 (or --scheduler fifo)"
            )
        if cfg.tune.grace_period >= cfg.train.epochs:
            raise ConfigError(
                f"tune.grace_period={cfg.tune.grace_period} is not below train.epochs={cfg.train.epochs}, so "
                "ASHA could never stop a trial: lower tune.grace_period or raise train.epochs"
            )


# --------------------------------------------------------------------------------------------------
# One trial (runs inside a Tune trial actor)
# --------------------------------------------------------------------------------------------------


def trial_driver(config: dict[str, Any]) -> None:
    """Tune function trainable: resolve the trial's config, fit its TorchTrainer, report per epoch."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    static = config["crossmoco"]
    space = parse_space(static["space"], "search space", name=static["space_name"])
    values = space.overrides(config)
    cfg = validate(with_values(static["base"], values))
    trial_id = tune.get_context().get_trial_id()
    run = resolve_run(cfg, name=trial_id, storage=static["trials_storage"], data=static["data"])
    run.tracking_uri = static["tracking_uri"]
    tracker = start_tracking(
        run,
        static.get("preset"),
        parent_id=static["parent_run_id"],
        extra_tags={"crossmoco.search": static["search"], "trial_id": trial_id, "tune_status": "running"},
    )
    print(
        f"trial {trial_id}: " + ", ".join(f"{k}={fmt(v)}" for k, v in values.items()),
        flush=True,
    )
    result = build_trainer(run, callbacks=[TuneReportCallback()]).fit()
    ret = result.return_value or {}
    if ret.get("status") == "nonfinite":
        tracker.set_tags({"tune_status": "nonfinite"})
        tracker.end("FAILED")
    else:
        tracker.set_tags({"tune_status": "completed"})
        tracker.end("FINISHED")


# --------------------------------------------------------------------------------------------------
# The search (runs in the driver)
# --------------------------------------------------------------------------------------------------


def _progress_callback(epochs: int, metric: str, log: Callable[[str], None]) -> Any:
    from ray import tune

    class Progress(tune.Callback):
        """One console line per trial epoch and per trial end, instead of Tune's status tables."""

        def on_trial_result(
            self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any
        ) -> None:
            value = result.get(metric, float("nan"))
            log(
                f"  trial {trial.trial_id} epoch {result.get('epoch', '?')}/{epochs}: "
                f"loss {result.get('loss', float('nan')):.4f}  {metric} {value:.4f}"
            )

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            log(f"  trial {trial.trial_id} ended")

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            log(f"  trial {trial.trial_id} FAILED: see {trial.local_path or trial.path}")

    return Progress()


def default_search_name(cfg: Config, space: Space) -> str:
    return f"tune-{space.name}-{config_hash(cfg)[:8]}"


def tune_search(
    cfg: Config,
    space: Space | None,
    *,
    preset: str | None = None,
    name: str | None = None,
    storage: str | None = None,
    data: str | None = None,
    trials: int | None = None,
    scheduler: str | None = None,
    resume: bool = False,
    address: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[int, dict[str, Any]]:
    """Run (or resume) a search; returns (exit code, summary with the table, best preset and run ids)."""
    storage = resolve_storage(storage)
    if resume:
        if name is None:
            raise ConfigError("--resume needs the --name of the search to continue")
        state = _read_json(f"{storage}/{name}/{SEARCH_FILE}")
        if state is None:
            raise ConfigError(
                f"no search {name!r} under {storage}: nothing to resume (drop --resume to start it)"
            )
        cfg = validate(state["base"])
        space = parse_space(state["space"], "search space", name=state["space_name"])
        preset, data = state.get("preset"), state["data"]
        log(f"resuming search {name} (its own base config and space)")
    if space is None:
        raise ConfigError("a search needs --space FILE (or a shipped space: moco, moco_lr)")
    updates: dict[str, Any] = {}
    if scheduler is not None:
        updates["scheduler"] = scheduler
    if trials is not None:
        updates["num_samples"] = trials
    if updates and not resume:
        cfg = validate(with_values(cfg.model_dump(mode="json"), {f"tune.{k}": v for k, v in updates.items()}))
    name = name or default_search_name(cfg, space)
    search_dir = f"{storage}/{name}"

    # Everything that can fail, before Ray or any trial starts.
    base_run = resolve_run(cfg, name=name, storage=storage, data=data, log=log)
    check_search(cfg, space, base_run.manifest)
    previous = _read_json(f"{search_dir}/{SEARCH_FILE}")
    if previous is not None and not resume:
        raise ConfigError(
            f"search {name!r} already exists under {storage}: add --resume to continue it, "
            "or pick another --name"
        )

    local = init_ray(cfg, address, log, extra_cpus=DRIVER_CPU)
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    check_resources(cfg, ray.cluster_resources(), local, log)
    concurrency = concurrent_trials(cfg, ray.cluster_resources())

    tracking_uri = default_tracking_uri(storage, cfg.tracking.tracking_uri) if cfg.tracking.enabled else None
    parent = Tracker(tracking_uri)
    params = {**flatten(cfg), **{f"space.{d.key}": d.describe() for d in space.dims}}
    tags = {"crossmoco.search": name, "crossmoco.role": "search", "space": space.name}
    parent_id = parent.start(
        cfg.tracking.experiment, name, params, tags, resume_id=(previous or {}).get("parent_run_id")
    )
    state = {
        # paths made absolute on this driver: a trial runs in its own working directory
        "base": base_run.cfg.model_dump(mode="json"),
        "space": {d.key: _raw(d) for d in space.dims},
        "space_name": space.name,
        "preset": preset,
        "data": base_run.data_root,
        "parent_run_id": parent_id,
        "tracking_uri": tracking_uri,
    }
    if previous is None:
        _write_json(f"{search_dir}/{SEARCH_FILE}", state)

    t = cfg.tune
    n_grid = math.prod(len(d.args) for d in space.dims if d.kind == "grid")
    log(
        f"search {name}: {t.num_samples * n_grid} trials ({t.scheduler}, metric {t.metric} {t.mode}), "
        f"{concurrency} at a time; each trial {cfg.train.num_workers} workers × {cfg.train.epochs} epochs\n"
        f"space {space.name}:\n{space.describe()}\nstorage {search_dir}"
    )
    if parent_id:
        log(f"MLflow parent run {parent_id} in {tracking_uri}")
    static = {**state, "trials_storage": f"{search_dir}/trials", "search": name}
    trainable = tune.with_resources(trial_driver, {"CPU": DRIVER_CPU})
    if resume:
        tuner = tune.Tuner.restore(
            search_dir, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        sched: Any
        if t.scheduler == "asha":
            sched = ASHAScheduler(
                time_attr="epoch",
                max_t=cfg.train.epochs,
                grace_period=t.grace_period,
                reduction_factor=t.reduction_factor,
            )
        else:
            sched = FIFOScheduler()
        tuner = tune.Tuner(
            trainable,
            param_space={**space.param_space(), "crossmoco": static},
            tune_config=tune.TuneConfig(
                metric=t.metric,
                mode=t.mode,
                num_samples=t.num_samples,
                max_concurrent_trials=concurrency,
                scheduler=sched,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                callbacks=[_progress_callback(cfg.train.epochs, cfg.tune.metric, log)],
                verbose=0,
            ),
        )
    watch = _InterruptWatch()
    tune_logger = logging.getLogger("ray.tune.tune")
    tune_logger.addHandler(watch)
    try:
        grid = tuner.fit()
    finally:
        tune_logger.removeHandler(watch)
    if watch.interrupted or len(grid) < t.num_samples * n_grid:  # Ctrl+C: Tune saved its state, returned
        log(
            "search interrupted; its state is saved. "
            f"Continue it with:  crossmoco tune --name {name} --storage {storage} --resume"
        )
        return EXIT_INTERRUPTED, {"search_dir": search_dir, "parent_run_id": parent_id}
    rows = trial_rows(grid, space, cfg)
    if not rows:
        parent.end("FAILED")
        log("no trial produced a result")
        return EXIT_FAILED, {"search_dir": search_dir, "rows": rows}
    close_child_runs(tracking_uri, parent_id, rows)
    summary = write_outputs(rows, space, cfg, search_dir, name, parent, log)
    summary.update(search_dir=search_dir, rows=rows, parent_run_id=parent_id, tracking_uri=tracking_uri)
    parent.end("FINISHED")
    if parent.enabled:
        log(f"MLflow parent run {parent_id}; open it with:  mlflow ui --backend-store-uri {tracking_uri}")
    return EXIT_OK, summary


class _InterruptWatch(logging.Handler):
    """Tune returns normally after Ctrl+C (it saves its state and says so in a log record); notice it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.interrupted = False

    def emit(self, record: logging.LogRecord) -> None:
        if "has been interrupted" in record.getMessage():
            self.interrupted = True


def _raw(d: Any) -> Any:
    if d.kind == "fixed":
        return d.args[0]
    return {d.kind: list(d.args)}
