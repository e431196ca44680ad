"""The table of the A/B runs of bench/ab_modelnet40.sh: per run and epoch, the monitor's validation numbers
(clean-protocol SVM, kNN, CrossPoint-protocol SVM) against the random-init encoder measured at its start,
and the epoch's mean cross-modal loss (chance: ln(2N - 1) for N objects per global batch, 4.14 at 32) and
cross-modal top-1.

    python bench/ab_table.py bench/out/ab
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from crossmoco_ray.evaluate.monitor import measured_epochs


def last_history(run: Path) -> dict | None:
    ckpts = sorted(run.glob("epoch_*/history.json"))
    return json.loads(ckpts[-1].read_text()) if ckpts else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(
        "| run | epoch | clean SVM (random init, gain) | kNN (random init, gain) | CrossPoint SVM | "
        "top-1 point / image | loss_cross (cross top-1) | samples/s | wall |"
    )
    print("|---|---:|---|---|---:|---|---|---:|---:|")
    for run in sorted(p for p in args.out.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        history = last_history(run)
        if history is None:
            continue
        base = history.get("baseline", {})
        log = args.out / f"{run.name}.log"
        wall = ""
        if log.is_file():
            m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", log.read_text())
            wall = m.group(1) if m else ""
        for e in measured_epochs(history):
            cells = []
            for key in ("val_svm_clean", "val_knn"):
                r = base.get(f"random_{key}", float("nan"))
                se = e.get(f"gain_{key}_se")
                pm = f" ± {100 * se:.2f}" if se is not None and se == se else ""
                cells.append(f"{100 * e[key]:.2f} ({100 * r:.2f}, {100 * (e[key] - r):+.2f}{pm})")
            crosspoint = 100 * e.get("val_svm_crosspoint", float("nan"))
            print(
                f"| {run.name} | {e['epoch']} | {cells[0]} | {cells[1]} | {crosspoint:.2f} | "
                f"{100 * e['point_top1']:.0f}% / {100 * e['image_top1']:.0f}% | "
                f"{e['loss_cross']:.3f} ({100 * e['cross_top1']:.0f}%) | {e['samples_per_s']:.1f} | "
                f"{wall if e is history['epochs'][-1] else ''} |"
            )
    arms(args.out)


FINAL = re.compile(r"^(val|test), clean protocol: .*?gain ([+-−]?[0-9.]+) ± ([0-9.]+) points", re.M)


def arms(out: Path) -> None:
    """Runs named ``<arm>-s<seed>`` (bench/ab_viewpoints.sh) grouped by arm: per seed the last monitor's
    gains and the final clean SVM's gains (± their paired SE), and the arm's mean over seeds."""
    runs: dict[str, list[Path]] = {}
    for run in sorted(p for p in out.iterdir() if p.is_dir() and re.fullmatch(r".+-s\d+", p.name)):
        runs.setdefault(run.name.rsplit("-s", 1)[0], []).append(run)
    if not runs:
        return
    print()
    print(
        "| arm | seed | last monitor: clean SVM gain | kNN gain | final clean SVM gain: val | test | "
        "loss_cross (chance ln(2N−1): 4.14 at N = 32) |"
    )
    print("|---|---:|---|---|---|---|---|")
    for arm, members in runs.items():
        means: dict[str, list[float]] = {}
        for run in members:
            history = last_history(run)
            if history is None or not measured_epochs(history):
                continue
            e, base = measured_epochs(history)[-1], history.get("baseline", {})
            cells = []
            for key in ("val_svm_clean", "val_knn"):
                gain = 100 * (e[key] - base.get(f"random_{key}", float("nan")))
                means.setdefault(key, []).append(gain)
                cells.append(f"{gain:+.2f} ± {100 * e.get(f'gain_{key}_se', float('nan')):.2f}")
            log = out / f"{run.name}.log"
            final = (
                {m[1]: (m[2].replace("−", "-"), m[3]) for m in FINAL.finditer(log.read_text())}
                if log.is_file()
                else {}
            )
            for split in ("val", "test"):
                if split in final:
                    means.setdefault(split, []).append(float(final[split][0]))
                    cells.append(f"{float(final[split][0]):+.2f} ± {final[split][1]}")
                else:
                    cells.append("")
            seed = run.name.rsplit("-s", 1)[1]
            print(f"| {arm} | {seed} | {' | '.join(cells)} | {e['loss_cross']:.3f} |")
        if not means:
            continue
        mean = [
            f"{sum(v) / len(v):+.2f}" if (v := means.get(k)) else ""
            for k in ("val_svm_clean", "val_knn", "val", "test")
        ]
        print(f"| **{arm}**, mean | | {' | '.join(mean)} | |")


if __name__ == "__main__":
    main()
