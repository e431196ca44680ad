"""``crossmoco eval report``: every frozen-feature protocol for one encoder and its random-init twin, in
one Markdown table laid out as the papers' (linear SVM, then few-shot N-way K-shot), plus JSON.

Features are extracted once per encoder and split (train, test; the first ``num_points`` points) and
every protocol reads them:

- the papers' protocols: CrossPoint's linear SVM (raw features, fixed C) and its few-shot (queries from
  the train split, as ``eval_fewshot.py``);
- the demanding ones: the clean SVM (standardised features, C by cross-validation on train), kNN (cosine,
  weighted votes) and few-shot with queries from the test split.

The claim rests on the second table; both are reported, labelled. Under each table, the gain of the
pretrained encoder over random init ± its standard error and the verdict (:mod:`.paired`): accuracies
paired on the same test objects, few-shot on the same episodes (``std(d, ddof=1) / sqrt(n)`` of the
per-object, or per-episode, differences ``d``); above / below random init only when ``|gain| ≥ 2·SE``,
else within noise. Mean class accuracy's gain is given without an SE (no per-object reading of it).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from crossmoco_ray.checkpoints.encoders import LoadedEncoder
from crossmoco_ray.evaluate.fewshot import fewshot_table
from crossmoco_ray.evaluate.knn import knn_predict
from crossmoco_ray.evaluate.paired import WITHIN_NOISE, paired_gain, short_verdict
from crossmoco_ray.evaluate.protocols import EvalData, encoder_features, utc_now
from crossmoco_ray.evaluate.svm import clean_svm, crosspoint_svm

FEWSHOT_SETTINGS = ((5, 10), (5, 20), (10, 10), (10, 20))


def run_report(
    data: EvalData,
    encs: list[tuple[str, LoadedEncoder]],
    *,
    C: float = 0.01,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    settings: Sequence[tuple[int, int]] = FEWSHOT_SETTINGS,
    queries: int = 20,
    episodes: int = 10,
    batch_size: int = 32,
    device: str = "auto",
    out: Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """All protocols for every encoder; returns (and writes ``report.json`` + ``report.md``) the report."""
    t0 = time.perf_counter()
    train, test = data.load(data.train_split), data.load(data.test_split)
    log(
        f"report: {data.spec} train {len(train.labels)} / {data.test_split} {len(test.labels)}, "
        f"{train.points.shape[1]} points; SVM ×2, kNN k={list(ks)}, few-shot {len(settings)} settings × "
        f"{episodes} episodes × 2 protocols"
    )
    report: dict[str, Any] = {
        "command": "report",
        "data": asdict(data),
        "when": utc_now(),
        "settings": {
            "C": C,
            "knn_k": list(ks),
            "temperature": temperature,
            "queries": queries,
            "episodes": episodes,
            "seed": seed,
        },
        "encoders": {},
        "results": {},
    }
    # per encoder and (result key, field): which test objects it got right, or each episode's accuracy
    paired: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    for name, enc in encs:
        f_train, f_test = encoder_features(enc, (train, test), batch_size, device, name)
        info = {"source": enc.source, "architecture": enc.name, "kwargs": enc.kwargs}
        report["encoders"][name] = {**info, **enc.info}
        r: dict[str, Any] = {}
        items = paired[name] = {}
        log(f"{name}: linear SVM (CrossPoint: raw features, C={C:g}) ...")
        svm = crosspoint_svm(f_train, train.labels, f_test, test.labels, C)
        r["svm_crosspoint"], items[("svm_crosspoint", "overall_acc")] = (
            svm.summary(),
            svm.correct(test.labels),
        )
        log(f"{name}: linear SVM (clean: standardised, C by CV) ...")
        svm = clean_svm(f_train, train.labels, f_test, test.labels, seed=seed)
        r["svm_clean"], items[("svm_clean", "overall_acc")] = svm.summary(), svm.correct(test.labels)
        for k in ks:
            pred = knn_predict(f_train, train.labels, f_test, k, temperature)
            per = [float((pred[test.labels == c] == c).mean()) for c in sorted(set(test.labels.tolist()))]
            r[f"knn_{k}"] = {
                "overall_acc": float((pred == test.labels).mean()),
                "mean_class_acc": float(sum(per) / len(per)),
            }
            items[(f"knn_{k}", "overall_acc")] = (pred == test.labels).astype(np.int8)
        log(f"{name}: few-shot ...")
        for protocol, (xq, yq) in (("crosspoint", (None, None)), ("clean", (f_test, test.labels))):
            table = fewshot_table(f_train, train.labels, xq, yq, settings, queries, episodes, seed)
            r[f"fewshot_{protocol}"] = {t.name: {"mean": t.mean, "std": t.std} for t in table}
            items.update({(f"fewshot_{protocol}", t.name): np.asarray(t.accuracies) for t in table})
        report["results"][name] = r
    if "pretrained" in paired and "random-init" in paired:
        report["gains"] = _gains(report["results"], paired["pretrained"], paired["random-init"])
    report["seconds"] = time.perf_counter() - t0
    report["markdown"] = report_markdown(report)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "report.md").write_text(report["markdown"] + "\n")
    return report


Column = tuple[str, str, str]  # (title, result key, field or few-shot setting)


def _gains(
    results: dict[str, Any], pre: dict[tuple[str, str], np.ndarray], rnd: dict[tuple[str, str], np.ndarray]
) -> dict[str, dict[str, dict[str, Any]]]:
    """``gains[result key][field]``: the gain over random init in the results' own unit (accuracies as
    fractions, few-shot in %), its paired SE and ``n`` (objects, or episodes); mean class accuracy's gain
    with ``se`` NaN (not measured)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (key, field), items in pre.items():
        out.setdefault(key, {})[field] = paired_gain(items, rnd[(key, field)]).as_dict()
    for key in ("svm_clean", "svm_crosspoint", *[k for k in results["pretrained"] if k.startswith("knn_")]):
        a, b = results["pretrained"][key]["mean_class_acc"], results["random-init"][key]["mean_class_acc"]
        out.setdefault(key, {})["mean_class_acc"] = {"gain": a - b, "se": math.nan, "n": 0}
    return out


def _value(r: dict[str, Any], col: Column) -> float:
    _, key, field = col
    cell = r[key][field]
    return float(cell["mean"]) if key.startswith("fewshot_") else 100 * float(cell)


def _cell(r: dict[str, Any], col: Column) -> str:
    _, key, field = col
    if key.startswith("fewshot_"):
        return f"{r[key][field]['mean']:.1f} ± {r[key][field]['std']:.1f}"
    return f"{_value(r, col):.2f}"


def _gain_cells(gains: dict[str, Any], results: dict[str, Any], col: Column) -> tuple[str, str]:
    """The gain row's cell (``+3.75 ± 1.90``; no SE where none was measured) and the verdict row's."""
    _, key, field = col
    scale = 1.0 if key.startswith("fewshot_") else 100.0
    g = gains.get(key, {}).get(field)
    if g is None:  # a report without per-object results: the difference alone
        return f"{_value(results['pretrained'], col) - _value(results['random-init'], col):+.2f}", "—"
    gain, se = float(g["gain"]), float(g["se"])
    if se != se:
        return f"{scale * gain:+.2f} (no SE)", "—"
    return f"{scale * gain:+.2f} ± {scale * se:.2f}", short_verdict(gain, se)


def _table(title: str, results: dict[str, Any], cols: list[Column], gains: dict[str, Any]) -> list[str]:
    lines = [f"**{title}**", "", "| encoder | " + " | ".join(c[0] for c in cols) + " |"]
    lines.append("|---|" + "---:|" * len(cols))
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(r, c) for c in cols) + " |")
    if "pretrained" in results and "random-init" in results:
        cells = [_gain_cells(gains, results, c) for c in cols]
        lines.append("| gain over random init ± SE | " + " | ".join(c[0] for c in cells) + " |")
        lines.append("| verdict (±2 SE) | " + " | ".join(c[1] for c in cells) + " |")
    return [*lines, ""]


def report_markdown(report: dict[str, Any]) -> str:
    """The two tables (papers' protocols, demanding ones), one row per encoder, and the gain row."""
    results = report["results"]
    first = next(iter(results.values()))
    shots = list(first["fewshot_crosspoint"])
    ks = [key.removeprefix("knn_") for key in first if key.startswith("knn_")]
    d = report["data"]
    variant = f" ({d['variant']})" if d.get("variant") else ""
    head = (
        f"Data: `{d['spec']}`{variant}, fit on {d['train_split']}, scored on {d['test_split']}, first "
        f"{d['num_points']} points. Accuracies in %; few-shot: mean ± std over "
        f"{report['settings']['episodes']} episodes."
    )
    C = report["settings"]["C"]
    papers: list[Column] = [(f"linear SVM (raw, C={C:g})", "svm_crosspoint", "overall_acc")]
    papers += [(s, "fewshot_crosspoint", s) for s in shots]
    demanding: list[Column] = [
        ("linear SVM (standardised, C by CV)", "svm_clean", "overall_acc"),
        ("SVM mean class acc", "svm_clean", "mean_class_acc"),
        *[(f"kNN k={k}", f"knn_{k}", "overall_acc") for k in ks],
        *[(s, "fewshot_clean", s) for s in shots],
    ]
    lines = [head, ""]
    title_papers = "The papers' protocols (CrossPoint's SVM; few-shot queries from the train split)"
    title_demanding = (
        "The demanding protocols (the claim rests on these; few-shot queries from the test split)"
    )
    gains = report.get("gains", {})
    lines += _table(title_papers, results, papers, gains)
    lines += _table(title_demanding, results, demanding, gains)
    if "pretrained" in results and "random-init" in results:
        lines.append(
            "Gains in points ± one standard error of the paired difference (the same test objects for both "
            f"encoders; few-shot: the same {report['settings']['episodes']} episodes). Verdict: above or "
            f"below random init only when |gain| ≥ 2 SE, else {WITHIN_NOISE.split(' (')[0]}. Mean class "
            "accuracy's gain has no SE here."
        )
    return "\n".join(lines).rstrip()
