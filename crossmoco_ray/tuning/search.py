"""``crossmoco tune``: a Ray Tune search in which every trial is a distributed pretraining run.

Train V2 cannot be passed to a ``Tuner``; the working pattern (RAY.md §3.1) is a Tune *function* trainable
(:func:`trial_driver`) that builds and fits a ``TorchTrainer`` with ``TuneReportCallback``, so each epoch's
``val_svm_acc`` reaches the scheduler (ASHA over epochs). Each trial's Train run is named after its trial id
under ``STORAGE/SEARCH/trials``, so a resumed search also resumes its interrupted trials from their last
checkpoint.

MLflow: a parent run for the search (params: the base config and the space; artifacts: summary table,
plot, best preset) and a nested child run per trial (the trial's resolved config as params, its metrics as
the workers log them, ``tune_status``: completed, stopped_early, nonfinite or error).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, config_hash, flatten, to_yaml, validate
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
from .space import Space, check_space, parse_space, with_values

SEARCH_FILE = "crossmoco_search.json"
DRIVER_CPU = 0.1  # a trial is only a driver; Tune rejects {"CPU": 0}
BEST_FILE = "best.yaml"
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
    if cfg.tune.metric == "val_svm_acc" and "val" not in manifest["counts"]:
        raise ConfigError(
            "the search ranks trials by val_svm_acc, which needs a 'val' split in the data: prepare it with "
            "`crossmoco prepare ... --val-fraction 0.1` (the built-in dataset has one)"
        )
    if cfg.tune.scheduler == "asha":
        if cfg.eval.eval_every != 1:
            raise ConfigError(
                "ASHA compares trials on val_svm_acc at every epoch, but "
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
        f"trial {trial_id}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()),
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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


# --------------------------------------------------------------------------------------------------
# The search (runs in the driver)
# --------------------------------------------------------------------------------------------------


def _progress_callback(epochs: int, log: Callable[[str], None]) -> Any:
    from ray import tune

    class Progress(tune.Callback):
        """One console line per trial epoch and per trial end, instead of Tune's status tables."""

        def on_trial_result(
            self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any
        ) -> None:
            acc = result.get("val_svm_acc", float("nan"))
            log(
                f"  trial {trial.trial_id} epoch {result.get('epoch', '?')}/{epochs}: "
                f"loss {result.get('loss', float('nan')):.4f}  val_svm_acc {100 * acc:.2f}%"
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
    if previous is None:
        _write_json(
            f"{search_dir}/{SEARCH_FILE}",
            {
                "base": cfg.model_dump(mode="json"),
                "space": {d.key: _raw(d) for d in space.dims},
                "space_name": space.name,
                "preset": preset,
                "data": base_run.data_root,
                "parent_run_id": parent_id,
                "tracking_uri": tracking_uri,
            },
        )

    t = cfg.tune
    n_grid = math.prod(len(d.args) for d in space.dims if d.kind == "grid")
    log(
        f"search {name}: {t.num_samples * n_grid} trials ({t.scheduler}, metric {t.metric} {t.mode}), "
        f"{concurrency} at a time; each trial {cfg.train.num_workers} workers × {cfg.train.epochs} epochs\n"
        f"space {space.name}:\n{space.describe()}\nstorage {search_dir}"
    )
    if parent_id:
        log(f"MLflow parent run {parent_id} in {tracking_uri}")
    static = {
        "base": cfg.model_dump(mode="json"),
        "space": {d.key: _raw(d) for d in space.dims},
        "space_name": space.name,
        "preset": preset,
        "data": base_run.data_root,
        "trials_storage": f"{search_dir}/trials",
        "tracking_uri": tracking_uri,
        "parent_run_id": parent_id,
        "search": name,
    }
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
                callbacks=[_progress_callback(cfg.train.epochs, log)],
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
    rows = _trial_rows(grid, space, cfg)
    if not rows:
        parent.end("FAILED")
        log("no trial produced a result")
        return EXIT_FAILED, {"search_dir": search_dir, "rows": rows}
    _close_child_runs(tracking_uri, parent_id, rows)
    summary = _write_outputs(rows, space, cfg, search_dir, name, parent, log)
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


def _trial_rows(grid: Any, space: Space, cfg: Config) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        values = space.overrides(result.config)
        epoch = int(metrics.get("epoch", 0))
        if result.error is not None:
            status = "error"
        elif metrics.get("nonfinite"):
            status = "nonfinite"
        elif epoch >= cfg.train.epochs:
            status = "completed"
        else:
            status = "stopped_early"
        acc = float(metrics.get("val_svm_acc", float("nan")))
        rows.append({"trial_id": trial_id, **values, "epochs": epoch, "val_svm_acc": acc, "status": status})
    return rows


def _close_child_runs(uri: str | None, parent_id: str | None, rows: list[dict[str, Any]]) -> None:
    """Trials that ASHA stopped were killed mid-fit: mark their child runs (status + tag) here."""
    if uri is None or parent_id is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    by_trial = {r.data.tags.get("trial_id"): r for r in children}
    for row in rows:
        run = by_trial.get(row["trial_id"])
        if run is None:
            continue
        client.set_tag(run.info.run_id, "tune_status", row["status"])
        if run.info.status == "RUNNING":
            final = {"completed": "FINISHED", "stopped_early": "KILLED"}.get(row["status"], "FAILED")
            client.set_terminated(run.info.run_id, status=final)


def best_row(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The best trial: among those that completed (a stopped trial saw fewer epochs), else among all."""
    finite = [r for r in rows if r["val_svm_acc"] == r["val_svm_acc"]]
    pool = [r for r in finite if r["status"] == "completed"] or finite
    if not pool:
        return None
    pick = max if mode == "max" else min
    return pick(pool, key=lambda r: r["val_svm_acc"])


def _write_outputs(
    rows: list[dict[str, Any]],
    space: Space,
    cfg: Config,
    search_dir: str,
    name: str,
    parent: Tracker,
    log: Callable[[str], None],
) -> dict[str, Any]:
    from ..evaluate.plots import search_plot
    from ..pretrain import _publish

    work = Path(tempfile.mkdtemp(prefix="crossmoco-tune-"))
    out: dict[str, Any] = {}
    try:
        keys = space.keys
        header = ["trial_id", *keys, "epochs", "val_svm_acc", "status"]
        ordered = sorted(rows, key=lambda r: -r["val_svm_acc"] if r["val_svm_acc"] == r["val_svm_acc"] else 1)
        with open(work / "trials.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(ordered)
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in ordered:
            cells = [_fmt(r[h]) if h != "val_svm_acc" else f"{100 * r[h]:.2f}%" for h in header]
            lines.append("| " + " | ".join(cells) + " |")
        table = "\n".join(lines)
        (work / "trials.md").write_text(f"# search {name}\n\n{table}\n")
        search_plot(rows, [d for d in space.searched], work / "val_svm_acc_vs_params.png")
        best = best_row(rows, cfg.tune.mode)
        if best is not None:
            values = {k: best[k] for k in keys}
            best_cfg = validate(with_values(cfg.model_dump(mode="json"), values))
            note = (
                f"# Best configuration of search {name}: trial {best['trial_id']}, {cfg.tune.metric} "
                f"{100 * best['val_svm_acc']:.2f}% after {best['epochs']} epochs ({best['status']}).\n"
                + "".join(f"#   {k}: {_fmt(v)}\n" for k, v in values.items())
                + "# Run it:  crossmoco pretrain --config best.yaml\n"
            )
            (work / BEST_FILE).write_text(note + to_yaml(best_cfg))
            parent.log_metrics({f"best_{cfg.tune.metric}": best["val_svm_acc"]}, step=0)
            parent.set_tags({"best_trial": best["trial_id"]})
        (work / "trials.json").write_text(json.dumps(rows, indent=1))
        parent.log_artifact(work)
        published = _publish(work, f"{search_dir}/summary")
        out["table"] = table
        out["summary_dir"] = published
        log(f"trials (best first):\n{table}")
        if best is not None:
            out["best"] = best
            out["best_config"] = f"{published}/{BEST_FILE}"
            log(
                f"best preset: {out['best_config']}\n"
                f"  run it:  crossmoco pretrain --config {out['best_config']}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def load_search_state(storage: str, name: str) -> dict[str, Any] | None:
    return _read_json(f"{resolve_storage(storage)}/{name}/{SEARCH_FILE}")


__all__ = [
    "BEST_FILE",
    "SEARCH_FILE",
    "best_row",
    "check_search",
    "concurrent_trials",
    "load_search_state",
    "trial_driver",
    "trial_resources",
    "tune_search",
]
