"""The main job: ``crossmoco pretrain`` from a configuration to a trained, evaluated, exported encoder.

1. resolve and check the run (:mod:`crossmoco_ray.pretrain.resolve`): data, steps, resources;
2. join or start Ray, open or resume the MLflow run;
3. ``TorchTrainer.fit()`` (:mod:`crossmoco_ray.pretrain.launch`; workers: :mod:`crossmoco_ray.pretrain.worker`
   on the skeleton of :mod:`crossmoco_ray.runs.worker`);
4. after training: linear SVM on the validation and test splits for the pretrained encoder and a
   random-init one of the same architecture, the exported backbone, curves, artifacts, a summary.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crossmoco_ray.checkpoints.encoders import export_backbone, exported_feature_model
from crossmoco_ray.checkpoints.resume import HISTORY_FILE, registered_checkpoint, resume_point
from crossmoco_ray.config.elastic import elastic_lines
from crossmoco_ray.config.schema import Config
from crossmoco_ray.evaluate.features import available_splits
from crossmoco_ray.evaluate.monitor import measured_epochs
from crossmoco_ray.evaluate.plots import curves_plot
from crossmoco_ray.evaluate.protocols import encoders, final_metrics, gain_lines, run_svm_splits, svm_table
from crossmoco_ray.pretrain.data_checks import unlabelled
from crossmoco_ray.pretrain.launch import pretrain_trainer
from crossmoco_ray.pretrain.resolve import Run, resolve_run, start_tracking, write_resolved_config
from crossmoco_ray.runs.launcher import fit
from crossmoco_ray.runs.resources import check_resources, init_ray
from crossmoco_ray.runs.worker import StepCallback
from crossmoco_ray.storage import publish_dir, read_json
from crossmoco_ray.tracking import Tracker

EXIT_OK, EXIT_FAILED, EXIT_NONFINITE = 0, 1, 3


def pretrain(
    cfg: Config,
    *,
    preset: str | None = None,
    name: str | None = None,
    storage: str | None = None,
    data: str | None = None,
    address: str | None = None,
    callbacks: list[Any] | None = None,
    step_callbacks: Sequence[StepCallback] = (),
    log: Callable[[str], None] = print,
) -> tuple[int, dict[str, Any]]:
    """Run (or resume) a pretraining run; returns (exit code, summary).

    ``callbacks``: Ray Train callbacks (on the driver); ``step_callbacks``: called in every worker after
    every step (:class:`~crossmoco_ray.runs.worker.StepInfo`; log a custom metric, or stop early)."""
    run = resolve_run(cfg, name=name, storage=storage, data=data, log=log)
    # a damaged position.json or progress.json is named here, not in a loop of worker restarts
    resume_point(run.run_dir, run.steps_per_epoch, registered_checkpoint(run.run_dir))
    local = init_ray(run.cfg, address, log)
    import ray

    check_resources(run.cfg, ray.cluster_resources(), local, log)
    tracker = start_tracking(run, preset)
    write_resolved_config(run)
    t = run.cfg.train
    workers, size, steps = f"{t.num_workers}", f"{run.cfg.global_batch}", f"{run.steps_per_epoch}"
    if run.cfg.elastic:
        workers, size = f"{t.min_workers}–{t.num_workers}", f"{size} at {t.num_workers} workers"
        steps += f" at {t.num_workers} workers"
    log(
        f"run {run.name}: {workers} workers × batch {run.cfg.per_worker_batch} "
        f"(global {size}), {t.epochs} epochs × {steps} steps\n"
        f"data {run.data_root}\nstorage {run.run_dir}"
    )
    for line in elastic_lines(run.cfg):
        log(line)
    if run.mlflow_run_id:
        log(f"MLflow run {run.mlflow_run_id} in {run.tracking_uri}")
    summary: dict[str, Any] = {"run_dir": run.run_dir, "mlflow_run_id": run.mlflow_run_id}
    result = fit(
        pretrain_trainer(run, callbacks, step_callbacks, log=log), tracker, run.run_dir, "training", log
    )
    if result is None:
        return EXIT_FAILED, summary
    ret = result.return_value or {}
    summary.update(result=result, metrics=result.metrics or {})
    if ret.get("status") == "nonfinite":
        tracker.end("FAILED")
        last = result.checkpoint.path if result.checkpoint else "none (no epoch completed)"
        losses = ", ".join(f"{k} {ret[k]:.4g}" for k in ("loss", "loss_point", "loss_image", "loss_cross"))
        log(
            f"stopped: the loss became NaN/Inf in epoch {ret['epoch'] + 1}, by step {ret['step']} "
            f"(means since the last check: {losses}). "
            f"The last good checkpoint is kept: {last}. Lower optim.lr, set optim.grad_clip (e.g. 1.0) or "
            "check the data; relaunching the same command resumes from that checkpoint."
        )
        return EXIT_NONFINITE, summary
    if ret.get("status") == "stopped":
        log(
            f"stopped by a step callback in epoch {ret['epoch'] + 1}, at step {ret['step']} (checkpoint kept)"
        )
    if result.checkpoint is None:
        tracker.end("FAILED")
        log("training produced no checkpoint")
        return EXIT_FAILED, summary
    with result.checkpoint.as_directory() as ckpt_dir:
        summary.update(finish(run, Path(ckpt_dir), tracker, log))
    tracker.end("FINISHED")
    return EXIT_OK, summary


def finish(run: Run, ckpt_dir: Path, tracker: Tracker, log: Callable[[str], None]) -> dict[str, Any]:
    """Everything after training: final SVMs, export, curves, artifacts, the closing summary."""
    cfg = run.cfg
    out: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="crossmoco-final-"))
    try:
        export_dir = export_backbone(ckpt_dir, work / "export")
        out["export"] = publish_dir(export_dir, f"{run.run_dir}/export")
        history = read_json(str(ckpt_dir / HISTORY_FILE)) or {}
        curves = _curves(history, work)
        # Unlabelled pretraining shards and no eval.data: nothing to score against (the launch said so).
        if cfg.eval.final and (cfg.eval.data is not None or not unlabelled(run.manifest)):
            spec = cfg.eval.data or run.data_root
            variant = cfg.eval.variant if cfg.eval.data else None
            splits = [s for s in ("val", "test") if s in available_splits(spec, cfg.eval.up_axis, variant)]
            # random init = the run's own encoder before its first step (same seed, same construction)
            encs = encoders(str(ckpt_dir), baseline=True, seed=cfg.train.seed)
            num_points = cfg.eval.num_points
            if cfg.eval.data is None:
                num_points = min(num_points, run.manifest["num_points"])
            report = run_svm_splits(
                spec,
                encs,
                splits,
                num_points,
                cfg.eval.svm_c,
                up_axis=cfg.eval.up_axis,
                variant=variant,
                out=work / "eval",
                log=log,
            )
            out["report"] = report
            out["eval"] = publish_dir(work / "eval", f"{run.run_dir}/eval")
            log(
                f"final linear SVM on {spec} (fit on train; scored on the 'val' and 'test' splits). 'clean' "
                "is the demanding protocol (standardised features, C by CV on train); 'crosspoint' is the "
                "papers' (raw features, fixed C). Each gain ± one standard error, paired on the split's "
                "objects; above/below random init only when |gain| >= 2 SE:"
            )
            log(svm_table(report))
            for line in gain_lines(report):
                log(line)
            tracker.log_metrics(final_metrics(report), 0)
        tracker.log_artifact(ckpt_dir / "config.yaml")
        for png in curves:
            tracker.log_artifact(png, "curves")
        tracker.log_artifact(work / "export", "export")
        if (work / "eval").is_dir():
            tracker.log_artifact(work / "eval", "eval")
        if tracker.enabled and cfg.tracking.log_model:
            # The backbone as a loadable MLflow model (+ a registry version). Training is over and the
            # files are stored and logged above, so a model that cannot be logged is reported, not fatal.
            try:
                model, example, meta = exported_feature_model(work / "export")
                out["model"] = tracker.log_point_model(
                    model, example, meta, register=cfg.tracking.register_model
                )
            except Exception as err:
                out["model_error"] = f"{type(err).__name__}: {err}"
                tracker.set_tags({"model_error": out["model_error"][:500]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"exported backbone: {out['export']}")
    if out.get("model") is not None:
        model = out["model"]
        log(f"MLflow model: {model.model_uri} (mlflow.pytorch.load_model; points [B, N, 3] → features)")
        if model.registered_uri:
            log(f"registered as {model.name!r} version {model.version}: {model.registered_uri}")
    if "model_error" in out:
        log(
            f"could not log the backbone as an MLflow model ({out['model_error']}); its files are in "
            f"{out['export']} and in the run's export/ artifacts"
        )
    if tracker.enabled:
        uri = str(tracker.uri)
        if uri.startswith(("http://", "https://", "databricks")):
            log(f"MLflow run {tracker.run_id} on the tracking server {uri}")
        else:
            log(f"MLflow run {tracker.run_id}; open it with:  mlflow ui --backend-store-uri {uri}")
    return out


def _curves(history: dict[str, Any], work: Path) -> list[Path]:
    """Loss curves per step and the validation SVM accuracy per epoch, as PNGs."""
    pngs = []
    steps = history.get("steps", [])
    if steps:
        series = {
            k: [(s["step"], s[k]) for s in steps] for k in ("loss", "loss_point", "loss_image", "loss_cross")
        }
        pngs.append(curves_plot(series, work / "loss.png", title="training losses"))
    base = history.get("baseline", {})
    for key, name in (
        ("val_svm_clean", "clean-protocol SVM"),
        ("val_knn", "kNN"),
        ("val_svm_crosspoint", "CrossPoint-protocol SVM"),
    ):
        points = [(e["epoch"], 100 * e[key]) for e in measured_epochs(history) if e.get(key) == e.get(key)]
        if not points:
            continue
        series = {"pretrained": points}
        random = base.get(f"random_{key}")
        if random is not None:
            series["random init"] = [(0, 100 * random), (points[-1][0], 100 * random)]
        pngs.append(curves_plot(series, work / f"{key}.png", title=f"validation {name} (%)", xlabel="epoch"))
    return pngs
