"""Benchmark: does bf16 change what the quickstart learns? fp32 vs bf16, a second fp32 seed for the noise.

    python bench/precision.py                       # 3 quickstart pretrainings, ~4 minutes each on 2 cores
    python bench/precision.py --runs fp32:1,bf16:1  # precision:seed pairs

Each run is a real ``crossmoco pretrain`` (quickstart preset, local Ray, built-in data, tracking off) in a
fresh process. Reported per run: the last epoch's loss and samples/s, the monitor's last clean-SVM gain
over random init on val, and the final clean / CrossPoint SVM on test with random init beside it. On a
CPU without native bf16 the bf16 run trains in fp32 and says so (the table shows the precision used).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(precision: str, seed: int, storage: str) -> dict:
    name = f"precision-{precision}-{seed}"
    cmd = [sys.executable, "-m", "crossmoco_ray", "pretrain", "--no-tracking", "--storage", storage,
           "--name", name, f"train.precision={precision}", f"train.seed={seed}"]  # fmt: skip
    print(f"... {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    used = "fp32 (no native bf16)" if "training in fp32" in done.stdout + done.stderr else precision
    ckpt = sorted(Path(storage, name).glob("epoch_*"))[-1]
    last = json.loads((ckpt / "history.json").read_text())["epochs"][-1]
    report = json.loads(Path(storage, name, "eval", "report.json").read_text())["results"]
    test = {enc: report[f"{enc} / test"] for enc in ("pretrained", "random-init")}
    return {"precision": used, "seed": seed, "loss": last["loss"], "samples_per_s": last["samples_per_s"],
            "gain_val_svm_clean": last.get("gain_val_svm_clean"), "test": test}  # fmt: skip


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--runs", default="fp32:1,fp32:2,bf16:1", help="precision:seed pairs, in order")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for spec in args.runs.split(","):
            precision, seed = spec.split(":")
            rows.append(run(precision, int(seed), storage))
    print("\n| precision | seed | last loss | samples/s | monitor val clean gain | test clean: pretrained / "
          "random init | test CrossPoint: pretrained / random init |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        t = r["test"]
        pct = {(enc, p): 100 * t[enc][p]["overall_acc"] for enc in t for p in ("clean", "crosspoint")}
        gain = r["gain_val_svm_clean"]
        print(
            f"| {r['precision']} | {r['seed']} | {r['loss']:.3f} | {r['samples_per_s']:.1f} "
            f"| {'' if gain is None else f'{100 * gain:+.2f}'} "
            f"| {pct['pretrained', 'clean']:.2f} / {pct['random-init', 'clean']:.2f} "
            f"| {pct['pretrained', 'crosspoint']:.2f} / {pct['random-init', 'crosspoint']:.2f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
