"""The evaluation commands' work: encoders × protocols → a printed table, report.json and plots."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from crossmoco_ray.checkpoints.encoders import LoadedEncoder, load_point_encoder, random_encoder
from crossmoco_ray.evaluate.features import EvalSplit, extract_features, load_split
from crossmoco_ray.evaluate.fewshot import fewshot_table
from crossmoco_ray.evaluate.paired import gain_text, paired_gain
from crossmoco_ray.evaluate.plots import confusion_plot, tsne_plot
from crossmoco_ray.evaluate.svm import clean_svm, crosspoint_svm


@dataclass
class EvalData:
    spec: str
    fmt: str = "auto"
    up_axis: str = "y"
    num_points: int | None = 1024
    train_split: str = "train"
    test_split: str = "test"
    variant: str | None = None

    def load(self, split: str) -> EvalSplit:
        axis: Any = self.up_axis
        return load_split(
            self.spec, split, fmt=self.fmt, up_axis=axis, num_points=self.num_points, variant=self.variant
        )


def encoders(
    checkpoint: str | None, baseline: bool, k: int = 15, emb_dims: int = 1024, seed: int = 0
) -> list[tuple[str, LoadedEncoder]]:
    """``[("pretrained", …), ("random-init", …)]``: the checkpoint's encoder and a fresh one like it."""
    out: list[tuple[str, LoadedEncoder]] = []
    if checkpoint:
        loaded = load_point_encoder(checkpoint, k=k)
        out.append(("pretrained", loaded))
        if baseline:  # the same architecture, fed the same way
            random = random_encoder(loaded.name, seed, **loaded.kwargs)
            random.normalize = loaded.normalize
            out.append(("random-init", random))
    else:
        out.append(("random-init", random_encoder("dgcnn", seed, k=k, emb_dims=emb_dims)))
    return out


def encoder_features(
    enc: LoadedEncoder, splits: Sequence[EvalSplit], batch_size: int, device: str, label: str
) -> list[np.ndarray]:
    """The frozen features of ``enc`` on each split (normalised as the encoder was trained), with progress."""
    return [
        extract_features(
            enc.encoder,
            s.points,
            batch_size,
            device,
            what=f"features {label} {s.name}",
            normalize=enc.normalize,
        )
        for s in splits
    ]


def _write_report(out: Path | None, report: dict[str, Any]) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))


def run_svm(
    data: EvalData,
    encs: list[tuple[str, LoadedEncoder]],
    protocols: Sequence[str] = ("crosspoint", "clean"),
    C: float = 0.01,
    batch_size: int = 32,
    device: str = "auto",
    out: Path | None = None,
    plots: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Linear SVM for every encoder and protocol; returns (and writes) the report."""
    t0 = time.perf_counter()
    train, test = data.load(data.train_split), data.load(data.test_split)
    sizes = f"train {len(train.labels)} / test {len(test.labels)}, {train.points.shape[1]} points"
    log(f"linear SVM: {data.spec} {sizes}")
    report: dict[str, Any] = {
        "command": "svm",
        "data": asdict(data),
        "when": utc_now(),
        "results": {},
        "encoders": {},
    }
    for name, enc in encs:
        te = time.perf_counter()
        f_train, f_test = encoder_features(enc, (train, test), batch_size, device, name)
        report["encoders"][name] = {
            "source": enc.source,
            "architecture": enc.name,
            "kwargs": enc.kwargs,
            **enc.info,
            "feature_seconds": time.perf_counter() - te,
        }
        results = {}
        for protocol in protocols:
            if protocol == "crosspoint":
                res = crosspoint_svm(f_train, train.labels, f_test, test.labels, C)
            else:
                res = clean_svm(f_train, train.labels, f_test, test.labels, seed=seed)
            results[protocol] = res.summary()
            if out is not None and plots:
                confusion_plot(
                    res.confusion,
                    test.class_names,
                    out / f"confusion_{name}_{protocol}.png",
                    title=f"{name}, {protocol} SVM: {100 * res.overall_acc:.1f}%",
                )
        report["results"][name] = results
        if out is not None and plots:
            tsne_plot(
                f_test,
                test.labels,
                test.class_names,
                out / f"tsne_{name}.png",
                title=f"t-SNE of {data.test_split} features ({name})",
                seed=seed,
            )
    report["seconds"] = time.perf_counter() - t0
    _write_report(out, report)
    return report


def run_svm_splits(
    spec: str,
    encs: list[tuple[str, LoadedEncoder]],
    test_splits: Sequence[str],
    num_points: int,
    C: float,
    batch_size: int = 32,
    device: str = "auto",
    out: Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
    up_axis: str = "y",
    variant: str | None = None,
) -> dict[str, Any]:
    """Both SVM protocols on several evaluation splits (of shards or a source); train features once.

    Results are keyed ``"<encoder> / <split>"`` (e.g. ``"pretrained / test"``), so :func:`svm_table` prints
    them. With both a ``pretrained`` and a ``random-init`` encoder, ``report["gains"][split][protocol]``
    holds the gain and its standard error, paired on the split's objects (:mod:`.paired`). The t-SNE and
    confusion plots are of the last split (normally test).
    """
    t0 = time.perf_counter()
    axis: Any = up_axis
    train = load_split(spec, "train", num_points=num_points, up_axis=axis, variant=variant)
    tests = [load_split(spec, s, num_points=num_points, up_axis=axis, variant=variant) for s in test_splits]
    report: dict[str, Any] = {
        "command": "svm",
        "data": spec,
        "when": utc_now(),
        "results": {},
        "encoders": {},
    }
    correct: dict[tuple[str, str, str], np.ndarray] = {}  # (encoder, split, protocol) → per object
    for name, enc in encs:
        feats = encoder_features(enc, (train, *tests), batch_size, device, name)
        report["encoders"][name] = {
            "source": enc.source,
            "architecture": enc.name,
            "kwargs": enc.kwargs,
            **enc.info,
        }
        for split, f_test in zip(tests, feats[1:], strict=True):
            res = {
                "crosspoint": crosspoint_svm(feats[0], train.labels, f_test, split.labels, C),
                "clean": clean_svm(feats[0], train.labels, f_test, split.labels, seed=seed),
            }
            report["results"][f"{name} / {split.name}"] = {p: r.summary() for p, r in res.items()}
            correct.update({(name, split.name, p): r.correct(split.labels) for p, r in res.items()})
            if out is not None and split is tests[-1]:
                confusion_plot(
                    res["clean"].confusion,
                    split.class_names,
                    out / f"confusion_{name}.png",
                    title=f"{name}, clean SVM on {split.name}: {100 * res['clean'].overall_acc:.1f}%",
                )
                tsne_plot(
                    f_test,
                    split.labels,
                    split.class_names,
                    out / f"tsne_{name}.png",
                    title=f"t-SNE of {split.name} features ({name})",
                    seed=seed,
                )
        log(f"evaluated {name}")
    report["gains"] = {
        split.name: {
            p: paired_gain(
                correct[("pretrained", split.name, p)], correct[("random-init", split.name, p)]
            ).as_dict()
            for p in ("crosspoint", "clean")
        }
        for split in tests
        if ("pretrained", split.name, "clean") in correct and ("random-init", split.name, "clean") in correct
    }
    report["seconds"] = time.perf_counter() - t0
    _write_report(out, report)
    return report


def gain_lines(report: dict[str, Any]) -> list[str]:
    """One line per split and protocol: pretrained vs random init, the gain ± its standard error (paired on
    the split's objects) and the verdict: above / below random init only when ``|gain| ≥ 2·SE``, else
    within noise (clean protocol first). E.g. ``test, clean protocol: pretrained 88.75% vs random init
    85.00%, gain +3.75 ± 1.50 points; above random init``."""
    lines = []
    results, gains = report["results"], report.get("gains", {})
    splits = [key.split(" / ", 1)[1] for key in results if key.startswith("pretrained / ")]
    for split in splits:
        pre, rnd = results.get(f"pretrained / {split}"), results.get(f"random-init / {split}")
        if not pre or not rnd:
            continue
        for protocol, label in (("clean", "clean protocol"), ("crosspoint", "CrossPoint protocol")):
            if protocol in pre and protocol in rnd:
                a, b = pre[protocol]["overall_acc"], rnd[protocol]["overall_acc"]
                g = gains.get(split, {}).get(protocol, {})
                gain, se = float(g.get("gain", a - b)), float(g.get("se", math.nan))
                lines.append(
                    f"{split}, {label}: pretrained {100 * a:.2f}% vs random init {100 * b:.2f}%, "
                    f"gain {gain_text(gain, se)}"
                )
    return lines


def final_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``final_<split>_svm_<protocol>`` (and ``final_random_…``) accuracies for MLflow, and where both
    encoders were scored ``final_gain_<split>_svm_<protocol>`` with its standard error (``…_se``)."""
    out = {}
    for key, results in report["results"].items():
        encoder, split = key.split(" / ", 1) if " / " in key else (key, "test")
        prefix = "final_" if encoder == "pretrained" else "final_random_"
        for protocol, r in results.items():
            out[f"{prefix}{split}_svm_{protocol}"] = float(r["overall_acc"])
    for split, by_protocol in report.get("gains", {}).items():
        for protocol, g in by_protocol.items():
            out[f"final_gain_{split}_svm_{protocol}"] = float(g["gain"])
            out[f"final_gain_{split}_svm_{protocol}_se"] = float(g["se"])
    return out


def svm_table(report: dict[str, Any]) -> str:
    lines = [
        "| encoder | protocol | C | overall acc | mean class acc | SVM s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, results in report["results"].items():
        for protocol, r in results.items():
            lines.append(
                f"| {name} | {protocol} | {r['C']:g} | {100 * r['overall_acc']:.2f} | "
                f"{100 * r['mean_class_acc']:.2f} | {r['seconds']:.0f} |"
            )
    return "\n".join(lines)


def run_fewshot(
    data: EvalData,
    encs: list[tuple[str, LoadedEncoder]],
    settings: Sequence[tuple[int, int]],
    protocols: Sequence[str] = ("crosspoint", "clean"),
    queries: int = 20,
    episodes: int = 10,
    batch_size: int = 32,
    device: str = "auto",
    out: Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """N-way K-shot for every encoder, protocol and setting; returns (and writes) the report."""
    t0 = time.perf_counter()
    train = data.load(data.train_split)
    test = data.load(data.test_split) if "clean" in protocols else None
    sizes = f"train {len(train.labels)}" + (f" / test {len(test.labels)}" if test is not None else "")
    log(f"few-shot: {data.spec} {sizes}, {episodes} episodes, {queries} queries per class")
    report: dict[str, Any] = {"command": "fewshot", "data": asdict(data), "when": utc_now(), "results": {}}
    for name, enc in encs:
        splits = (train,) if test is None else (train, test)
        feats = encoder_features(enc, splits, batch_size, device, name)
        report["results"][name] = {}
        for protocol in protocols:
            x_test, y_test = (
                (feats[1], test.labels) if protocol == "clean" and test is not None else (None, None)
            )
            table = fewshot_table(feats[0], train.labels, x_test, y_test, settings, queries, episodes, seed)
            report["results"][name][protocol] = {
                r.name: {"mean": r.mean, "std": r.std, "accuracies": r.accuracies} for r in table
            }
    report["seconds"] = time.perf_counter() - t0
    _write_report(out, report)
    return report


def run_knn(
    data: EvalData,
    encs: list[tuple[str, LoadedEncoder]],
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
    batch_size: int = 32,
    device: str = "auto",
    out: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """kNN on frozen features (cosine, InstDisc's weighted votes) for every encoder and ``k``: the train
    split is the memory bank, the test split is scored; overall and mean class accuracy."""
    from sklearn.metrics import balanced_accuracy_score

    from crossmoco_ray.evaluate.knn import knn_predict

    t0 = time.perf_counter()
    train, test = data.load(data.train_split), data.load(data.test_split)
    log(f"kNN: {data.spec} train {len(train.labels)} / {data.test_split} {len(test.labels)}, k = {list(ks)}")
    report: dict[str, Any] = {"command": "knn", "data": asdict(data), "when": utc_now(), "results": {}}
    report["temperature"] = temperature
    for name, enc in encs:
        f_train, f_test = encoder_features(enc, (train, test), batch_size, device, name)
        report["results"][name] = {}
        for k in ks:
            pred = knn_predict(f_train, train.labels, f_test, k, temperature)
            report["results"][name][f"k={k}"] = {
                "overall_acc": float((pred == test.labels).mean()),
                "mean_class_acc": float(balanced_accuracy_score(test.labels, pred)),
            }
    report["seconds"] = time.perf_counter() - t0
    _write_report(out, report)
    return report


def knn_table(report: dict[str, Any]) -> str:
    lines = ["| encoder | k | overall acc % | mean class acc % |", "|---|---:|---:|---:|"]
    for name, by_k in report["results"].items():
        for k, r in by_k.items():
            acc, mean_class = 100 * r["overall_acc"], 100 * r["mean_class_acc"]
            lines.append(f"| {name} | {k.removeprefix('k=')} | {acc:.2f} | {mean_class:.2f} |")
    return "\n".join(lines)


def fewshot_table_text(report: dict[str, Any]) -> str:
    first = next(iter(report["results"].values()))
    names = list(next(iter(first.values())))
    lines = ["| encoder | protocol | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for enc, protocols in report["results"].items():
        for protocol, cells in protocols.items():
            row = " | ".join(f"{cells[n]['mean']:.1f} ± {cells[n]['std']:.1f}" for n in names)
            lines.append(f"| {enc} | {protocol} | {row} |")
    return "\n".join(lines)


def utc_now() -> str:
    """When a report was made: UTC, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
