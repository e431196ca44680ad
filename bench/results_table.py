"""The tables of docs/results.md from the reports that bench/modelnet40.sh writes (bench/out/mn40).

    python bench/results_table.py bench/out/mn40 [--figures docs/figures]

Prints markdown: linear SVM (CrossPoint and clean protocols) and few-shot, random-init (mean ± spread over
seeds) vs pretrained, with the gains; copies the t-SNE plots and draws the loss curves and the monitor's
curves (pretrained vs random init, per epoch) of the run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

DESCRIPTOR_SVM = 48.2  # shared/data README: 55-number hand-made descriptor + linear SVM
DESCRIPTOR_FEWSHOT = {"5w10s": 70.7, "5w20s": 70.0, "10w10s": 59.8, "10w20s": 64.9}
SETTINGS = ["5w10s", "5w20s", "10w10s", "10w20s"]


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()
    out: Path = args.out

    svm = load(out / "svm" / "report.json")
    randoms = [svm["results"]["random-init"]] if svm and "random-init" in svm["results"] else []
    for seed in (1, 2):
        r = load(out / f"random_svm_seed{seed}" / "report.json")
        if r:
            randoms.append(r["results"]["random-init"])
    print("| encoder | SVM CrossPoint (C=0.01) overall | mean class | SVM clean overall | mean class |")
    print("|---|---:|---:|---:|---:|")
    print(f"| hand-made descriptor (55 numbers; data README) | {DESCRIPTOR_SVM:.1f} | | | |")
    for proto_rows in [randoms]:
        if proto_rows:
            cells = []
            for proto in ("crosspoint", "clean"):
                for key in ("overall_acc", "mean_class_acc"):
                    values = [100 * r[proto][key] for r in proto_rows]
                    spread = (max(values) - min(values)) / 2
                    cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}")
            seeds = ", ".join(str(i) for i in range(len(proto_rows)))
            print(f"| random-init DGCNN (seeds {seeds}: mean ± half-range) | " + " | ".join(cells) + " |")
            for i, r in enumerate(proto_rows):
                row = [
                    pct(r[p][k]) for p in ("crosspoint", "clean") for k in ("overall_acc", "mean_class_acc")
                ]
                print(f"| &nbsp;&nbsp;seed {i} | " + " | ".join(row) + " |")
    if svm and "pretrained" in svm["results"]:
        r = svm["results"]["pretrained"]
        row = [pct(r[p][k]) for p in ("crosspoint", "clean") for k in ("overall_acc", "mean_class_acc")]
        print("| **CrossMoCo pretrained (modelnet40-cpu)** | " + " | ".join(f"**{c}**" for c in row) + " |")
        if randoms:
            gains = []
            for proto in ("crosspoint", "clean"):
                for key in ("overall_acc", "mean_class_acc"):
                    mean = statistics.mean(100 * x[proto][key] for x in randoms)
                    gains.append(f"{100 * r[proto][key] - mean:+.2f}")
            print("| gain over the random-init mean | " + " | ".join(gains) + " |")

    few = load(out / "fewshot" / "report.json")
    if few:
        print()
        print("| encoder | protocol | " + " | ".join(SETTINGS) + " |")
        print("|---|---|" + "---:|" * len(SETTINGS))
        print(
            "| hand-made descriptor (data README) | clean | "
            + " | ".join(f"{DESCRIPTOR_FEWSHOT[s]:.1f}" for s in SETTINGS)
            + " |"
        )
        for enc, protos in few["results"].items():
            for proto, res in protos.items():
                cells = [f"{res[s]['mean']:.1f} ± {res[s]['std']:.1f}" for s in SETTINGS]
                print(f"| {enc} | {proto} | " + " | ".join(cells) + " |")
        res = few["results"]
        if "pretrained" in res and "random-init" in res:
            for proto in res["pretrained"]:
                wins = sum(
                    res["pretrained"][proto][s]["mean"] > res["random-init"][proto][s]["mean"]
                    for s in SETTINGS
                )
                print(
                    f"\n{proto} protocol: pretrained above random init in {wins} of {len(SETTINGS)} settings"
                )

    args.figures.mkdir(parents=True, exist_ok=True)
    for png in sorted((out / "svm").glob("tsne_*.png")):
        shutil.copy(png, args.figures / f"mn40_{png.name}")
    checkpoints = sorted((out / "runs" / "mn40-cpu").glob("epoch_*/history.json"))
    if checkpoints:
        from crossmoco_ray.evaluate.monitor import measured_epochs
        from crossmoco_ray.evaluate.plots import curves_plot

        history = json.loads(checkpoints[-1].read_text())
        steps = history.get("steps", [])
        series = {
            k: [(s["step"], s[k]) for s in steps] for k in ("loss", "loss_point", "loss_image", "loss_cross")
        }
        curves_plot(series, args.figures / "mn40_loss.png", title="modelnet40-cpu: training losses")
        base = history.get("baseline", {})
        for key, name in (("val_svm_clean", "clean-protocol SVM"), ("val_knn", "kNN (k=20)")):
            acc = [(e["epoch"], 100 * e[key]) for e in measured_epochs(history) if e.get(key) == e.get(key)]
            if not acc:
                continue
            series = {"pretrained": [(0, 100 * base[f"random_{key}"]), *acc]} if base else {"pretrained": acc}
            if base:
                series["random init"] = [
                    (0, 100 * base[f"random_{key}"]),
                    (acc[-1][0], 100 * base[f"random_{key}"]),
                ]
            curves_plot(series, args.figures / f"mn40_{key}.png", xlabel="epoch",
                        title=f"modelnet40-cpu: validation {name}, % (monitor)")  # fmt: skip


if __name__ == "__main__":
    main()
