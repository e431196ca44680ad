"""The outcome of a search: one row per trial, child-run statuses in MLflow, the best trial, and the
summary files (trials.md/csv/json, the plot, ``best.yaml``) published to storage and the parent run."""

from __future__ import annotations

import csv
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crossmoco_ray.config.schema import Config
from crossmoco_ray.config.serialized import to_yaml
from crossmoco_ray.config.validation import validate
from crossmoco_ray.tracking import Tracker
from crossmoco_ray.tuning.space import Space, with_values

BEST_FILE = "best.yaml"


def _metric_text(metric: str, value: float) -> str:
    """Accuracies (and their gains) as percentages, anything else (a loss) as a number."""
    return f"{100 * value:.2f}%" if "val_" in metric else fmt(value)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def trial_rows(grid: Any, space: Space, cfg: Config) -> list[dict[str, Any]]:
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
        # a diverged trial's report carries the metric it last measured; it must not rank as that
        value = math.nan if status == "nonfinite" else float(metrics.get(cfg.tune.metric, math.nan))
        row = {"trial_id": trial_id, **values, "epochs": epoch, cfg.tune.metric: value, "status": status}
        rows.append(row)
    return rows


def close_child_runs(uri: str | None, parent_id: str | None, rows: list[dict[str, Any]]) -> None:
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


def best_row(rows: list[dict[str, Any]], mode: str, metric: str) -> dict[str, Any] | None:
    """The best trial: among those that completed (a stopped trial saw fewer epochs), else among all."""
    finite = [r for r in rows if r[metric] == r[metric]]
    pool = [r for r in finite if r["status"] == "completed"] or finite
    if not pool:
        return None
    pick = max if mode == "max" else min
    return pick(pool, key=lambda r: r[metric])


def write_outputs(
    rows: list[dict[str, Any]],
    space: Space,
    cfg: Config,
    search_dir: str,
    name: str,
    parent: Tracker,
    log: Callable[[str], None],
) -> dict[str, Any]:
    from crossmoco_ray.evaluate.plots import search_plot
    from crossmoco_ray.storage import publish_dir

    work = Path(tempfile.mkdtemp(prefix="crossmoco-tune-"))
    out: dict[str, Any] = {}
    metric = cfg.tune.metric
    sign = -1.0 if cfg.tune.mode == "max" else 1.0
    try:
        keys = space.keys
        header = ["trial_id", *keys, "epochs", metric, "status"]
        ordered = sorted(rows, key=lambda r: sign * r[metric] if r[metric] == r[metric] else math.inf)
        with open(work / "trials.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(ordered)
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in ordered:
            cells = [fmt(r[h]) if h != metric else _metric_text(metric, r[h]) for h in header]
            lines.append("| " + " | ".join(cells) + " |")
        table = "\n".join(lines)
        (work / "trials.md").write_text(f"# search {name}\n\n{table}\n")
        search_plot(rows, [d for d in space.searched], work / f"{metric}_vs_params.png", metric)
        best = best_row(rows, cfg.tune.mode, metric)
        if best is not None:
            values = {k: best[k] for k in keys}
            best_cfg = validate(with_values(cfg.model_dump(mode="json"), values))
            note = (
                f"# Best configuration of search {name}: trial {best['trial_id']}, {cfg.tune.metric} "
                f"{_metric_text(metric, best[metric])} after {best['epochs']} epochs ({best['status']}).\n"
                + "".join(f"#   {k}: {fmt(v)}\n" for k, v in values.items())
                + "# Run it:  crossmoco pretrain --config best.yaml\n"
            )
            (work / BEST_FILE).write_text(note + to_yaml(best_cfg))
            parent.log_metrics({f"best_{metric}": best[metric]}, step=0)
            parent.set_tags({"best_trial": best["trial_id"]})
        (work / "trials.json").write_text(json.dumps(rows, indent=1))
        parent.log_artifact(work)
        published = publish_dir(work, f"{search_dir}/summary")
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
