"""Benchmark: distributed pretraining throughput with 1 and 2 Ray Train workers (quickstart config).

    python bench/train.py                   # 3 epochs per setting; the median of epochs 2..3 is reported
    python bench/train.py --epochs 5 --workers 1,2

Each setting is a real `crossmoco pretrain` run (local Ray, built-in data, tracking off, no final
evaluation) in a fresh process; the numbers are rank 0's epoch metrics, median over the epochs after the
first (which warms up): global samples/s and the fraction of the epoch spent waiting for Ray Data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(workers: int, epochs: int, storage: str) -> dict:
    overrides = [
        f"train.num_workers={workers}",
        f"train.epochs={epochs}",
        "eval.final=false",
        "eval.eval_every=1000",
    ]
    if workers == 1:
        overrides.append("train.cpus_per_worker=1.0")
    cmd = [
        sys.executable,
        "-m",
        "crossmoco_ray",
        "pretrain",
        "--no-tracking",
        "--storage",
        storage,
        "--name",
        f"bench-{workers}w",
        *overrides,
    ]
    print(f"... {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    ckpts = sorted(Path(storage, f"bench-{workers}w").glob("epoch_*"))
    history = json.loads((ckpts[-1] / "history.json").read_text())
    epochs = history["epochs"][1:] or history["epochs"]
    out = {
        k: statistics.median(e[k] for e in epochs)
        for k in ("samples_per_s", "epoch_seconds", "data_wait", "loss")
    }
    out["all_samples_per_s"] = [round(e["samples_per_s"], 1) for e in epochs]
    return out


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for w in (int(x) for x in args.workers.split(",")):
            rows.append((w, run(w, args.epochs, storage)))
    print(f"\nquickstart config, median of epochs 2..{args.epochs} (the first one warms up)\n")
    print("| workers | CPUs per worker | global samples/s | per epoch | epoch s | data wait | loss |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for w, e in rows:
        cpus = 1.0 if w == 1 else 0.5
        print(
            f"| {w} | {cpus} | {e['samples_per_s']:.1f} | {e['all_samples_per_s']} | "
            f"{e['epoch_seconds']:.0f} | {100 * e['data_wait']:.0f}% | {e['loss']:.3f} |"
        )
    base = rows[0][1]["samples_per_s"]
    for w, e in rows[1:]:
        print(f"\n{w} workers / {rows[0][0]} worker: x{e['samples_per_s'] / base:.2f} samples/s")


if __name__ == "__main__":
    main()
