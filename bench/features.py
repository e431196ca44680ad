"""Benchmark: feature extraction (``eval svm``, the training monitor) against an earlier commit's code.

Both sides run :func:`crossmoco_ray.evaluate.features.extract_features` on the same random clouds with a
randomly initialised DGCNN in eval mode, in fresh subprocesses, alternating; the baseline is the package
as it was at ``--baseline`` (extracted with ``git archive``, so the comparison is one run on one
machine). It needs torch, numpy, pyarrow and h5py (what the evaluation module imports), not Ray:

    python bench/features.py                              # modelnet40-cpu and paper encoders
    python bench/features.py --baseline 76a316d --clouds 256 --repeats 3
    python bench/features.py --smoke                      # tiny sizes: checks that the script runs

The current code runs as ``crossmoco eval`` does (freed memory kept for reuse); the baseline as it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The point encoders of crossmoco_ray/config/presets/{modelnet40-cpu,paper}.yaml, on the SVM protocol's
# 1024 points.
ENCODERS = {
    "modelnet40-cpu": dict(k=10, emb_dims=512, head_hidden=512, proj_dim=128),
    "paper": dict(k=15, emb_dims=1024, head_hidden=1024, proj_dim=256),
    "smoke": dict(k=4, emb_dims=32, head_hidden=32, proj_dim=16),
}


def child(encoder: str, clouds: int, points: int, batch: int, repeats: int, current: bool) -> dict:
    import numpy as np
    import torch

    from crossmoco_ray.evaluate.features import extract_features
    from crossmoco_ray.nn import DGCNN

    if current:
        from crossmoco_ray.nn.precision import keep_freed_memory

        keep_freed_memory()
    torch.manual_seed(0)
    model = DGCNN(**ENCODERS[encoder]).eval()  # type: ignore[arg-type]
    data = np.random.default_rng(0).standard_normal((clouds, points, 3)).astype(np.float32)
    kwargs = dict(batch_size=batch, device="cpu", progress=False)
    extract_features(model, data[: max(batch, 1)], **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        feats = extract_features(model, data, **kwargs)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"median_s": median, "times": times, "clouds": clouds, "checksum": float(feats.sum())}


def baseline_tree(commit: str, into: Path) -> Path:
    """The package as of ``commit`` under ``into`` (``git archive``)."""
    data = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "crossmoco_ray"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def measure(args: argparse.Namespace, encoder: str, code: Path, current: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", encoder, "--clouds", str(args.clouds), "--points",
           str(args.points), "--batch", str(args.batch), "--repeats", str(args.repeats)]  # fmt: skip
    if current:
        cmd.append("--current")
    env = {**os.environ, "PYTHONPATH": str(code)}
    env.pop("CROSSMOCO_MALLOC", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=code)
    if done.returncode != 0:
        raise SystemExit(f"measurement failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", default="76a316d", help="commit whose extraction is the baseline")
    parser.add_argument("--encoders", default="modelnet40-cpu,paper")
    parser.add_argument("--clouds", type=int, default=256)
    parser.add_argument("--points", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32, help="clouds per batch (eval's default)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating baseline/current pairs")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--current", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.clouds, args.points, args.batch, 1, args.current)))
        return
    if args.smoke:
        args.encoders, args.clouds, args.points, args.batch, args.repeats = "smoke", 8, 64, 4, 1

    sys.path.insert(0, str(ROOT))
    import torch

    from crossmoco_ray.nn.precision import cpu_description

    rows = []
    with tempfile.TemporaryDirectory(prefix="crossmoco-baseline-") as tmp:
        old = baseline_tree(args.baseline, Path(tmp))
        for encoder in args.encoders.split(","):
            runs: dict[str, list[float]] = {"baseline": [], "current": []}
            sums: dict[str, float] = {}
            for _ in range(args.repeats):  # alternate, so drifts in machine speed hit both alike
                for name, code, current in (("baseline", old, False), ("current", ROOT, True)):
                    r = measure(args, encoder, code, current)
                    runs[name].append(r["median_s"])
                    sums[name] = r["checksum"]
            base, cur = statistics.median(runs["baseline"]), statistics.median(runs["current"])
            rows.append(
                {"encoder": encoder, "baseline_s": base, "current_s": cur, "runs": runs, "checksums": sums}
            )
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_description()}; "
          f"{args.clouds} clouds x {args.points} points, batch {args.batch}, median of {args.repeats}; "
          f"baseline {args.baseline}\n")  # fmt: skip
    print("| encoder | baseline clouds/s | current clouds/s | speed-up "
          "| feature checksums (baseline / current) |")  # fmt: skip
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['encoder']} | {args.clouds / r['baseline_s']:.1f} | {args.clouds / r['current_s']:.1f} "
              f"| x{r['baseline_s'] / r['current_s']:.2f} | {r['checksums']['baseline']:.4g} / "
              f"{r['checksums']['current']:.4g} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
