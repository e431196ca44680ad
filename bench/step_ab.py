"""Benchmark: the CrossMoCo training step against an earlier commit's code, on this machine, in one run.

Both sides run their own ``train_step`` and model code on the same batch as the pipeline delivers it
(points, uint8 views), in fresh subprocesses, alternating baseline / current so that drifts in the
machine's speed hit both alike; the baseline is the package as it was at ``--baseline`` (``git
archive``). Both keep freed memory for reuse, as training workers do. Torch only (no Ray):

    python bench/step_ab.py --baseline 21c23ad                   # paper step, fp32 and bf16
    python bench/step_ab.py --baseline 21c23ad --setting quickstart --repeats 5
    python bench/step_ab.py --smoke                              # tiny sizes: checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from features import baseline_tree  # noqa: E402  (bench/ is not a package)
from step import SETTINGS  # noqa: E402

if str(ROOT) in sys.path:  # bench/step.py puts this checkout first; each child imports its own tree
    sys.path.remove(str(ROOT))


def child(setting: str, precision: str, warmup: int, steps: int) -> dict[str, Any]:
    """``steps`` timed steps after ``warmup`` of the package on ``sys.path`` (this process's tree)."""
    import torch

    from crossmoco_ray.nn import DGCNN, CrossMoCo, ImageEncoder

    try:
        from crossmoco_ray.nn.precision import keep_freed_memory
        from crossmoco_ray.pretrain.step import prepare_model, train_step
    except ImportError:  # a baseline from before issue 28 (the modules had other names)
        from crossmoco_ray.nn.runtime import keep_freed_memory  # type: ignore[no-redef]
        from crossmoco_ray.train.step import prepare_model, train_step  # type: ignore[no-redef]

    keep_freed_memory()
    s = SETTINGS[setting]
    torch.manual_seed(0)
    point = DGCNN(
        k=s["k"], emb_dims=s["emb_dims"], head_hidden=s["point_head_hidden"], proj_dim=s["proj_dim"]
    )
    image = ImageEncoder(s["image_encoder"], proj_dim=s["proj_dim"], head_hidden=s["image_head_hidden"])
    model = CrossMoCo(point, image, queue_length=s["queue_length"], dim=s["proj_dim"],
                      temperature=s["temperature"], cross_temperature=s["cross_temperature"])  # fmt: skip
    model = prepare_model(model, torch.device("cpu"), channels_last=True).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=s["lr"], weight_decay=s["weight_decay"])
    g = torch.Generator().manual_seed(0)
    B, N, size = s["batch"], s["num_points"], s["image_size"]
    batch = {
        "points1": torch.randn(B, N, 3, generator=g),
        "points2": torch.randn(B, N, 3, generator=g),
        "images": torch.randint(0, 256, (B, s["views"], size, size, 3), dtype=torch.uint8, generator=g),
    }
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = train_step(model, batch, optimizer, s["momentum"], precision=precision, channels_last=True)
        losses.append(float(out["loss"]))  # after the clock: reading the loss is the caller's business
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    import crossmoco_ray

    return {"median_s": statistics.median(times), "times": times, "first_loss": losses[0],
            "package": crossmoco_ray.__file__}  # fmt: skip


def measure(args: argparse.Namespace, code: Path, precision: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", args.setting, precision, "--warmup", str(args.warmup),
           "--steps", str(args.steps)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(code)}
    env.pop("CROSSMOCO_MALLOC", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=code)
    if done.returncode != 0:
        raise SystemExit(f"measurement failed:\n{done.stderr[-4000:]}")
    r: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(r["package"]).resolve().is_relative_to(code.resolve()):
        raise SystemExit(f"the child imported {r['package']}, not the tree under {code}")
    return r


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", default="21c23ad", help="commit whose step is the baseline")
    parser.add_argument("--setting", default="paper", help="bench/step.py's SETTINGS: paper, quickstart")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement (median)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating baseline/current pairs")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("SETTING", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.warmup, args.steps)))
        return
    if args.smoke:
        args.setting, args.warmup, args.steps, args.repeats = "smoke", 0, 1, 1

    import torch

    from crossmoco_ray.nn.precision import cpu_description

    rows = []
    with tempfile.TemporaryDirectory(prefix="crossmoco-baseline-") as tmp:
        old = baseline_tree(args.baseline, Path(tmp))
        for precision in args.precisions.split(","):
            runs: dict[str, list[float]] = {"baseline": [], "current": []}
            first: dict[str, float] = {}
            for _ in range(args.repeats):
                for name, code in (("baseline", old), ("current", ROOT)):
                    print(f"... {precision} {name}", file=sys.stderr, flush=True)
                    r = measure(args, code, precision)
                    runs[name].append(r["median_s"])
                    first[name] = r["first_loss"]
            base, cur = statistics.median(runs["baseline"]), statistics.median(runs["current"])
            rows.append(
                {
                    "precision": precision,
                    "baseline_s": base,
                    "current_s": cur,
                    "runs": runs,
                    "first_loss": first,
                }
            )
    batch = SETTINGS[args.setting]["batch"]
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_description()}; "
          f"{args.setting} step (batch {batch}), median of {args.repeats} alternating runs of {args.steps} "
          f"steps after {args.warmup}; baseline {args.baseline}\n")  # fmt: skip
    print("| precision | baseline s/step | current s/step | speed-up | first loss (baseline / current) |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        speedup = r["baseline_s"] / r["current_s"]
        print(f"| {r['precision']} | {r['baseline_s']:.3f} | {r['current_s']:.3f} | x{speedup:.2f} "
              f"| {r['first_loss']['baseline']:.4f} / {r['first_loss']['current']:.4f} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": cpu_description(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
