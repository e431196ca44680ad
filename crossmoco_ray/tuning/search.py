"""``crossmoco tune``: a Ray Tune search in which every trial is a distributed pretraining run.

Train V2 cannot be passed to a ``Tuner``; the working pattern (RAY.md §3.1) is a Tune *function* trainable
(:func:`trial_driver`, 0.1 CPU) that builds and fits a ``TorchTrainer`` whose results reach Tune through
:class:`~.callbacks.CarriedReport`, so ``tune.metric`` (default ``val_svm_clean``, the clean-protocol SVM on
validation data) reaches the scheduler (ASHA over completed epochs, ``time_attr="epoch"``). Each trial's
Train run is named after its trial id under ``STORAGE/SEARCH/trials``, so a resumed search also resumes its
interrupted trials from their last checkpoint.

Scaling: on a cluster every trial starts at once (up to ``tune.max_concurrent_trials``) and its Train run
requests its workers' placement group; a group that does not fit waits, which is the resource demand an
autoscaler adds nodes for. Train's worker-group start timeout only makes it ask again
(``controller_failure_limit`` is unlimited), so a waiting trial waits and does not fail. Only a local Ray,
which nothing can grow, limits the trials to what fits (with the CPUs kept for Ray Data, which would
otherwise starve).

MLflow: a parent run for the search (params: the base config and the space; artifacts: summary table,
plot, best preset) and a nested child run per trial (the trial's resolved config as params, its metrics as
the workers log them, ``tune_status``: completed, stopped_early, nonfinite or error).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from crossmoco_ray.config.schema import Config
from crossmoco_ray.config.serialized import config_hash, flatten
from crossmoco_ray.config.validation import validate
from crossmoco_ray.errors import ConfigError
from crossmoco_ray.pretrain.launch import pretrain_trainer
from crossmoco_ray.pretrain.resolve import resolve_run, start_tracking
from crossmoco_ray.runs.identity import resolve_storage
from crossmoco_ray.runs.resources import check_resources, init_ray
from crossmoco_ray.storage import read_json, write_json
from crossmoco_ray.tracking import Tracker, default_tracking_uri
from crossmoco_ray.tuning.restore_check import check_resumable
from crossmoco_ray.tuning.results import close_child_runs, fmt, trial_rows, write_outputs
from crossmoco_ray.tuning.space import Space, check_space, parse_space, with_values

SEARCH_FILE = "crossmoco_search.json"
DRIVER_CPU = 0.1  # a trial is only a driver; Tune rejects {"CPU": 0}
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def trial_resources(cfg: Config) -> tuple[float, float]:
    """(CPUs, GPUs) one trial occupies: its workers, the CPUs kept for Ray Data, its driver."""
    t = cfg.train
    cpus = t.num_workers * t.cpus_per_worker + t.data_cpus + DRIVER_CPU
    gpus = t.num_workers * t.gpus_per_worker if t.use_gpu else 0.0
    return cpus, gpus


def trials_that_fit(cfg: Config, resources: dict[str, float]) -> int:
    """How many trials ``resources`` hold at once (0: not one); a Train run starts only when all its
    workers fit, and its Ray Data tasks need the CPUs kept for them besides."""
    cpus, gpus = trial_resources(cfg)
    fit = int(resources.get("CPU", 0.0) / cpus + 1e-9)
    if gpus > 0:
        fit = min(fit, int(resources.get("GPU", 0.0) / gpus + 1e-9))
    return fit


def trial_concurrency(cfg: Config, resources: dict[str, float], local: bool) -> int | None:
    """Tune's ``max_concurrent_trials`` (``None``: no limit).

    On a cluster it is ``tune.max_concurrent_trials``, never the resources present now: every trial is
    started, its Train run requests its workers, and a request that does not fit is pending demand that an
    autoscaler adds nodes for. A local Ray never grows, and trials whose workers took every CPU would starve
    each other's Ray Data (a hang), so there it is what fits (at least 1), capped by the setting.
    """
    limit = cfg.tune.max_concurrent_trials
    if not local:
        return limit
    fit = max(1, trials_that_fit(cfg, resources))
    return min(fit, limit) if limit else fit


def check_search(cfg: Config, space: Space, manifest: dict[str, Any]) -> None:
    """Everything about a search that can be wrong before a trial starts."""
    check_space(space, cfg)
    if cfg.elastic:
        raise ConfigError(
            f"train.num_workers=[{cfg.train.min_workers}, {cfg.train.num_workers}]: a search compares its "
            "trials, so each trains at one size; give a number of workers, e.g. "
            f"train.num_workers={cfg.train.min_workers}"
        )
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
    """Tune function trainable: resolve the trial's config, fit its TorchTrainer; every Train report
    (epoch ends and mid-epoch checkpoints) becomes a Tune result."""
    from ray import tune

    from crossmoco_ray.tuning.callbacks import CarriedReport

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
    # A Train run whose workers do not fit yet waits for them (the autoscaler's cue), retrying its
    # worker-group start without limit; every report becomes a Tune result carrying epoch and the metric.
    report = CarriedReport(("epoch", cfg.tune.metric))
    result = pretrain_trainer(run, callbacks=[report]).fit()
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
        check_resumable(f"{storage}/{name}", log)  # Tune's restore unpickles what is stored there
        state = read_json(f"{storage}/{name}/{SEARCH_FILE}")
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
    previous = read_json(f"{search_dir}/{SEARCH_FILE}")
    if previous is not None and not resume:
        raise ConfigError(
            f"search {name!r} already exists under {storage}: add --resume to continue it, "
            "or pick another --name"
        )

    local = init_ray(cfg, address, log, extra_cpus=DRIVER_CPU)
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from crossmoco_ray.tuning.callbacks import Progress

    resources = ray.cluster_resources()
    if local:
        check_resources(cfg, resources, local, log)  # a local Ray that cannot hold one trial never will
    elif trials_that_fit(cfg, resources) == 0:
        cpus, gpus = trial_resources(cfg)
        log(
            f"warning: the cluster cannot hold one trial now ({cpus:g} CPUs, {gpus:g} GPUs each; it has "
            f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs): the trials are queued "
            "with their resource requests and wait for the autoscaler to add nodes"
        )
    concurrency = trial_concurrency(cfg, resources, local)

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
        write_json(f"{search_dir}/{SEARCH_FILE}", state)

    t = cfg.tune
    n_grid = math.prod(len(d.args) for d in space.dims if d.kind == "grid")
    log(
        f"search {name}: {t.num_samples * n_grid} trials ({t.scheduler}, metric {t.metric} {t.mode}), "
        f"{_concurrency_text(concurrency, local)}; each trial {cfg.train.num_workers} workers × "
        f"{cfg.train.epochs} epochs\n"
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
                callbacks=[Progress(cfg.train.epochs, cfg.tune.metric, log)],
                # a trial driver lost with its node is restarted; its Train run (named after the trial id)
                # then resumes from its newest checkpoint
                failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
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


def _concurrency_text(concurrency: int | None, local: bool) -> str:
    if concurrency is None:
        return "all at once as the cluster's resources allow"
    return f"{concurrency} at a time" + (" (what this machine holds)" if local else "")


def _raw(d: Any) -> Any:
    if d.kind == "fixed":
        return d.args[0]
    return {d.kind: list(d.args)}
