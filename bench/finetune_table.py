"""The fine-tuning comparison of docs/results.md from ``crossmoco finetune cls`` reports.

    python bench/finetune_table.py RUN_A/report.json RUN_B/report.json ...

One row per run: test OA after each epoch, the last epoch's OA and mAcc (no choice on test) and the best
test OA over epochs (the papers' practice), as a Markdown table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(path: Path) -> str:
    report = json.loads(path.read_text())
    s = report["summary"]
    curve = " / ".join(f"{100 * oa:.1f}" for _, oa in s["curve"])
    init = "random init" if report["init"] == "random-init" else "pretrained"
    return (
        f"| {init} | {curve} | **{100 * s['final']['oa']:.2f}** | {100 * s['final']['macc']:.2f} | "
        f"{100 * s['best_test']['oa']:.2f} (epoch {s['best_test']['epoch']}) |"
    )


def main(paths: list[str]) -> None:
    print("| start | test OA after each epoch (%) | final OA | final mAcc | best test OA (papers' choice) |")
    print("|---|---|---:|---:|---:|")
    for p in paths:
        print(row(Path(p)))


if __name__ == "__main__":
    main(sys.argv[1:])
