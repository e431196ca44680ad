"""Benchmark: the CrossMoCo training step and the DGCNN with the fast vs the reference EdgeConv.

Torch only (no Ray, MLflow or pydantic), so it runs on this CPU and on a bare GPU machine:

    python bench/step.py                      # everything, on CUDA when available
    python bench/step.py --device cpu --repeats 5 --json bench/out/step.json
    python bench/step.py --smoke              # tiny sizes: checks that the script runs

Each measurement runs in a fresh subprocess so that its peak memory is its own: on CPU the peak
resident set size (and the part above the RSS just before the first step), on CUDA the peak
allocated memory. Times are the median of ``--repeats`` steps after ``--warmup`` steps; every
comparison is a ratio between two measurements of the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The step settings mirror crossmoco_ray/configs/{paper,quickstart}.yaml (tests/bench/test_bench.py checks
# that they agree). Batch = what one worker runs per step: the paper trains on one GPU with batch 20;
# quickstart splits its global batch 32 over 2 workers.
SETTINGS: dict[str, dict[str, Any]] = {
    "paper": dict(
        k=15, emb_dims=1024, point_head_hidden=1024, image_encoder="resnet50", image_head_hidden=512,
        proj_dim=256, queue_length=4000, momentum=0.9999, temperature=0.1, cross_temperature=0.1,
        batch=20, num_points=2048, image_size=224, views=2, lr=1e-3, weight_decay=1e-6,
    ),
    "quickstart": dict(
        k=8, emb_dims=256, point_head_hidden=256, image_encoder="resnet18", image_head_hidden=256,
        proj_dim=128, queue_length=1024, momentum=0.99, temperature=0.1, cross_temperature=0.1,
        batch=16, num_points=256, image_size=32, views=2, lr=1e-3, weight_decay=1e-6,
    ),
    "smoke": dict(
        k=4, emb_dims=32, point_head_hidden=32, image_encoder="resnet18", image_head_hidden=16,
        proj_dim=16, queue_length=32, momentum=0.99, temperature=0.1, cross_temperature=0.1,
        batch=4, num_points=64, image_size=32, views=2, lr=1e-3, weight_decay=1e-6,
    ),
}  # fmt: skip


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rss_mb() -> float:
    """Current resident set size in MiB (Linux), falling back to the peak elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, setting: str, edgeconv: str, device_name: str, warmup: int, repeats: int) -> dict:
    """One measurement in this (fresh) process; returns a JSON-able dict."""
    import torch

    from crossmoco_ray.nn import DGCNN, CrossMoCo, ImageEncoder
    from crossmoco_ray.train.step import train_step

    torch.manual_seed(0)
    s = SETTINGS[setting]
    device = torch.device(device_name)
    B, N = s["batch"], s["num_points"]
    points = DGCNN(k=s["k"], emb_dims=s["emb_dims"], head_hidden=s["point_head_hidden"],
                   proj_dim=s["proj_dim"], edgeconv=edgeconv)  # fmt: skip
    if kind == "dgcnn":
        model: torch.nn.Module = points.to(device).train()
        x = torch.randn(B, N, 3, device=device)

        def step() -> None:
            z, feat = model(x)
            (z.square().mean() + feat.mean()).backward()
            model.zero_grad(set_to_none=True)

    else:
        image = ImageEncoder(s["image_encoder"], proj_dim=s["proj_dim"], head_hidden=s["image_head_hidden"])
        model = CrossMoCo(points, image, queue_length=s["queue_length"], dim=s["proj_dim"],
                          temperature=s["temperature"], cross_temperature=s["cross_temperature"])  # fmt: skip
        model = model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=s["lr"], weight_decay=s["weight_decay"])
        batch = {
            "points1": torch.randn(B, N, 3, device=device),
            "points2": torch.randn(B, N, 3, device=device),
            "images": torch.randn(B, s["views"], 3, s["image_size"], s["image_size"], device=device),
        }

        def step() -> None:
            train_step(model, batch, opt, s["momentum"])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    gc.collect()
    before_rss = rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before_cuda = torch.cuda.memory_allocated(device) / 2**20
    times = []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {
        "kind": kind, "setting": setting, "edgeconv": edgeconv, "batch": B, "times": times,
        "median_s": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "before_rss_mb": before_rss,
    }  # fmt: skip
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["before_cuda_mb"] = before_cuda
    return out


def measure(args: argparse.Namespace, kind: str, setting: str, edgeconv: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, setting, edgeconv, "--device", args.device,
           "--warmup", str(args.warmup), "--repeats", str(args.repeats)]  # fmt: skip
    print(f"... {kind} {setting} edgeconv={edgeconv}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement {kind}/{setting}/{edgeconv} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_mb(r: dict) -> float:
    """Memory the steps used: peak CUDA allocation, or on CPU the peak RSS above the pre-step RSS."""
    if "peak_cuda_mb" in r:
        return float(r["peak_cuda_mb"])
    return max(0.0, r["peak_rss_mb"] - r["before_rss_mb"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--settings", default="paper,quickstart", help="step settings to measure")
    parser.add_argument("--dgcnn-setting", default="paper", help="setting of the DGCNN fast-vs-reference run")
    parser.add_argument("--no-reference-step", action="store_true", help="skip the reference paper step")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat: checks the script runs")
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SETTING", "EDGECONV"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        kind, setting, edgeconv = args.child
        print(json.dumps(child(kind, setting, edgeconv, args.device, args.warmup, args.repeats)))
        return
    if args.smoke:
        args.settings, args.dgcnn_setting, args.repeats, args.warmup = "smoke", "smoke", 1, 0

    rows = []
    for impl in ("reference", "fast"):
        rows.append(measure(args, "dgcnn", args.dgcnn_setting, impl))
    for setting in args.settings.split(","):
        rows.append(measure(args, "step", setting, "fast"))
        if setting in ("paper", "smoke") and not args.no_reference_step:
            rows.append(measure(args, "step", setting, "reference"))

    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    mem_name = "peak CUDA alloc MiB" if args.device == "cuda" else "step peak RSS MiB"
    print(f"\ntorch {torch.__version__} on {args.device} ({device}), {torch.get_num_threads()} threads; "
          f"median of {args.repeats} after {args.warmup} warm-up\n")  # fmt: skip
    print(f"| what | setting | EdgeConv | batch | median s/step | samples/s | {mem_name} | peak RSS MiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        what = "DGCNN fwd+bwd" if r["kind"] == "dgcnn" else "CrossMoCo step"
        print(
            f"| {what} | {r['setting']} | {r['edgeconv']} "
            f"| {r['batch']} | {r['median_s']:.3f} | {r['batch'] / r['median_s']:.2f} | {memory_mb(r):.0f} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    print()
    pairs = [(r, f) for r in rows for f in rows
             if r["edgeconv"] == "reference" and f["edgeconv"] == "fast"
             and (r["kind"], r["setting"]) == (f["kind"], f["setting"])]  # fmt: skip
    for ref, fast in pairs:
        speedup = ref["median_s"] / fast["median_s"]
        print(
            f"{ref['kind']} {ref['setting']}: fast/reference speed x{speedup:.2f}, "
            f"memory x{memory_mb(fast) / max(memory_mb(ref), 1e-9):.2f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
