"""Benchmark: the CrossMoCo training step and the DGCNN, fast (fp32, bf16) vs the straightforward reference.

Torch only (no Ray, MLflow or pydantic), so it runs on this CPU and on a bare GPU machine:

    python bench/step.py                      # everything, on CUDA when available
    python bench/step.py --device cpu --repeats 5 --json bench/out/step.json
    python bench/step.py --smoke              # tiny sizes: checks that the script runs
    python bench/step.py --smoke --in-process # the same in one process (what the tests run)

Implementations:

- ``reference``: as the original code: every edge feature materialised (``[B, 2C, N, k]``), fp32,
  contiguous (NCHW) image tensors;
- ``fast``: the fused EdgeConv (:mod:`crossmoco_ray.nn.edgeconv`), channels-last image tensors, fp32;
- ``fast-keep``: ``fast`` with each EdgeConv's per-point products kept for backward instead of
  recomputed (``DGCNN(recompute_products=False)``): nothing recomputed at all;
- ``fast-ckpt``: ``fast`` with activation checkpointing of the online image trunk
  (``model.image_checkpoint``): less memory for one more trunk forward;
- ``fast-bf16``: ``fast`` under bf16 autocast (measured where the device has native bf16).

Each measurement runs in a fresh subprocess so that its peak memory is its own: on CPU the peak
resident set size (and the part above the RSS just before the first step), on CUDA the peak
allocated memory. The allocator: ``keep`` = freed memory kept for reuse, as training runs
(:func:`crossmoco_ray.nn.precision.keep_freed_memory`); ``system`` = glibc's defaults, as the original
code runs. The fast rows run with ``keep``; the reference step runs with both, so that the table gives
the implementation's gain alone (same allocator) and the step as shipped against the original's way of
running (on CUDA the allocator setting does nothing). Times are the median
of ``--repeats`` steps after ``--warmup`` steps; every comparison is a ratio between two measurements of
the same run (``--in-process`` measures every row in the script's own process instead: quick, for smoke
runs; its memory figures and allocator are then shared by all rows). ``saved`` rows give what each part of
the step keeps for backward (bytes of the tensors autograd saves, each storage counted once). On CPU,
``live`` is the peak of the bytes held by tensors during one step above what was held before it (from the
profiler's allocation events: independent of the allocator, the counterpart of CUDA's peak allocated
memory), after one warm-up step.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The step settings mirror crossmoco_ray/config/presets/{paper,quickstart}.yaml
# (tests/bench/test_bench.py checks
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


def rss_mb() -> float:
    """Current resident set size in MiB (Linux), falling back to the peak elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


IMPLS = ("reference", "fast", "fast-keep", "fast-ckpt", "fast-bf16")


def build(setting: str, impl: str, device: Any) -> tuple[Any, dict]:
    """The CrossMoCo model of ``setting`` for ``impl`` on ``device``, and one batch."""
    import torch

    from crossmoco_ray.nn import DGCNN, CrossMoCo, ImageEncoder
    from crossmoco_ray.pretrain.step import prepare_model

    s = SETTINGS[setting]
    B, N = s["batch"], s["num_points"]
    edgeconv = "reference" if impl == "reference" else "fast"
    points = DGCNN(k=s["k"], emb_dims=s["emb_dims"], head_hidden=s["point_head_hidden"],
                   proj_dim=s["proj_dim"], edgeconv=edgeconv,
                   recompute_products=impl != "fast-keep")  # fmt: skip
    image = ImageEncoder(s["image_encoder"], proj_dim=s["proj_dim"], head_hidden=s["image_head_hidden"])
    model = CrossMoCo(points, image, queue_length=s["queue_length"], dim=s["proj_dim"],
                      temperature=s["temperature"], cross_temperature=s["cross_temperature"])  # fmt: skip
    model = prepare_model(model, device, channels_last=impl != "reference").train()
    model.image_q.checkpoint_trunk = impl == "fast-ckpt"
    batch = {
        "points1": torch.randn(B, N, 3, device=device),
        "points2": torch.randn(B, N, 3, device=device),
        "images": torch.randn(B, s["views"], 3, s["image_size"], s["image_size"], device=device),
    }
    return model, batch


def saved_bytes(setting: str, impl: str, device_name: str) -> dict:
    """Bytes autograd keeps for backward, per part of one step (each storage counted once)."""
    import torch

    from crossmoco_ray.pretrain.step import to_device_batch

    torch.manual_seed(0)
    device = torch.device(device_name)
    model, batch = build(setting, impl, device)
    p1, _, views = to_device_batch(batch, device, channels_last=impl != "reference")
    out: dict[str, Any] = {"kind": "saved", "setting": setting, "edgeconv": impl, "batch": p1.shape[0],
                           "malloc": "keep"}  # fmt: skip
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided:  # (the small CSR adjacency of the kNN graph is left out)
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    parts = (("point encoder", model.point_q, p1), ("image encoder", model.image_q, views[0]))
    for part, encoder, x in parts:
        seen.clear()
        bf16 = impl == "fast-bf16"
        with (
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            result = encoder(x)
        out[part] = sum(seen.values()) / 2**20
        del result
    return out


def live_peak(setting: str, impl: str, device_name: str) -> dict:
    """Peak bytes held by tensors during one step above those held at its start (the profiler's memory
    timeline: every tensor the step allocates, frees or uses, by category)."""
    import torch
    from torch.profiler import profile

    from crossmoco_ray.pretrain.step import train_step

    torch.manual_seed(0)
    s = SETTINGS[setting]
    model, batch = build(setting, impl, torch.device(device_name))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=s["lr"])
    kwargs = dict(precision="bf16" if impl == "fast-bf16" else "fp32", channels_last=impl != "reference")
    train_step(model, batch, opt, s["momentum"], **kwargs)  # warm-up: the optimizer state exists
    with profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        profile_memory=True,
        record_shapes=True,
        with_stack=True,
    ) as prof:
        train_step(model, batch, opt, s["momentum"], **kwargs)
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    totals = [sum(row) for row in sizes]  # bytes held per event, every category
    peak = max(totals) - totals[0] if totals else 0
    return {"kind": "live", "setting": setting, "edgeconv": impl, "batch": s["batch"], "malloc": "any",
            "live_peak_mb": peak / 2**20}  # fmt: skip


def child(
    kind: str, setting: str, impl: str, device_name: str, warmup: int, repeats: int, malloc: str
) -> dict:
    """One measurement in this (fresh) process; returns a JSON-able dict."""
    import torch

    from crossmoco_ray.nn import DGCNN
    from crossmoco_ray.pretrain.step import train_step

    if kind == "saved":
        return saved_bytes(setting, impl, device_name)
    if kind == "live":
        return live_peak(setting, impl, device_name)
    torch.manual_seed(0)
    s = SETTINGS[setting]
    device = torch.device(device_name)
    B, N = s["batch"], s["num_points"]
    bf16 = impl == "fast-bf16"
    if kind == "dgcnn":
        model: torch.nn.Module = DGCNN(
            k=s["k"], emb_dims=s["emb_dims"], head_hidden=s["point_head_hidden"], proj_dim=s["proj_dim"],
            edgeconv="reference" if impl == "reference" else "fast",
        ).to(device).train()  # fmt: skip
        x = torch.randn(B, N, 3, device=device)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                z, feat = model(x)
            (z.float().square().mean() + feat.float().mean()).backward()
            model.zero_grad(set_to_none=True)

    else:
        model, batch = build(setting, impl, device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=s["lr"], weight_decay=s["weight_decay"])

        def step() -> None:
            train_step(model, batch, opt, s["momentum"], precision="bf16" if bf16 else "fp32",
                       channels_last=impl != "reference")  # fmt: skip

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
        "kind": kind, "setting": setting, "edgeconv": impl, "batch": B, "times": times, "malloc": malloc,
        "median_s": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "before_rss_mb": before_rss,
    }  # fmt: skip
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["before_cuda_mb"] = before_cuda
    return out


def measure(args: argparse.Namespace, kind: str, setting: str, impl: str, malloc: str = "keep") -> dict:
    if args.in_process:  # no fresh process: the allocator is this one's, the memory figures not the row's own
        return child(kind, setting, impl, args.device, args.warmup, args.repeats, malloc)
    cmd = [sys.executable, __file__, "--child", kind, setting, impl, "--device", args.device,
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--malloc", malloc]  # fmt: skip
    print(f"... {kind} {setting} {impl} (malloc {malloc})", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement {kind}/{setting}/{impl} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_mb(r: dict) -> float:
    """Memory the steps used: peak CUDA allocation, or on CPU the peak RSS above the pre-step RSS."""
    if "peak_cuda_mb" in r:
        return float(r["peak_cuda_mb"])
    return max(0.0, r["peak_rss_mb"] - r["before_rss_mb"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--settings", default="paper,quickstart", help="step settings to measure")
    parser.add_argument("--dgcnn-setting", default="paper", help="setting of the DGCNN rows")
    parser.add_argument("--no-reference-step", action="store_true", help="skip the reference paper step")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="bf16 rows: auto = where the device has native bf16")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat: checks the script runs")
    parser.add_argument("--in-process", action="store_true", help="every row in this process (smoke runs)")
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SETTING", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--malloc", choices=("keep", "system"), default="keep", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    from crossmoco_ray.nn.precision import bf16_support, cpu_description, keep_freed_memory

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        if args.malloc == "keep":
            keep_freed_memory()
        kind, setting, impl = args.child
        print(json.dumps(child(kind, setting, impl, args.device, args.warmup, args.repeats, args.malloc)))
        return
    if args.smoke:
        args.settings, args.dgcnn_setting, args.repeats, args.warmup = "smoke", "smoke", 1, 0
    no_bf16 = bf16_support(torch.device(args.device))
    impls = ["reference", "fast", "fast-keep", "fast-ckpt"]
    if args.bf16 == "on" or (args.bf16 == "auto" and no_bf16 is None):
        impls.append("fast-bf16")
    elif args.bf16 == "auto":
        print(f"no bf16 rows: {no_bf16}", file=sys.stderr)

    dgcnn_impls = [impl for impl in impls if impl in ("reference", "fast", "fast-bf16")]
    rows = [measure(args, "dgcnn", args.dgcnn_setting, impl) for impl in dgcnn_impls]
    for setting in args.settings.split(","):
        if setting in ("paper", "smoke") and not args.no_reference_step:
            rows.append(measure(args, "step", setting, "reference", malloc="system"))
        for impl in impls:
            if impl != "reference" or (setting in ("paper", "smoke") and not args.no_reference_step):
                rows.append(measure(args, "step", setting, impl))
    saved = [measure(args, "saved", args.dgcnn_setting, impl) for impl in impls]
    live = []
    if args.device == "cpu":
        live_impls = impls[:2] if args.smoke else impls  # smoke: the slow profiler pass for reference, fast
        live = [measure(args, "live", args.settings.split(",")[0], impl) for impl in live_impls]

    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_description()
    mem_name = "peak CUDA alloc MiB" if args.device == "cuda" else "step peak RSS MiB"
    print(f"\ntorch {torch.__version__} on {args.device} ({device}), {torch.get_num_threads()} threads; "
          f"median of {args.repeats} after {args.warmup} warm-up\n")  # fmt: skip
    print(f"| what | setting | implementation | malloc | batch | median s/step | samples/s | {mem_name} "
          "| peak RSS MiB |")  # fmt: skip
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        what = "DGCNN fwd+bwd" if r["kind"] == "dgcnn" else "CrossMoCo step"
        print(
            f"| {what} | {r['setting']} | {r['edgeconv']} | {r['malloc']} "
            f"| {r['batch']} | {r['median_s']:.3f} | {r['batch'] / r['median_s']:.2f} | {memory_mb(r):.0f} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    print("\n| kept for backward (MiB) | setting | implementation | point encoder (query) "
          "| image encoder (query) |")  # fmt: skip
    print("|---|---|---|---:|---:|")
    for r in saved:
        print(f"| | {r['setting']} | {r['edgeconv']} | {r['point encoder']:.0f} | {r['image encoder']:.0f} |")
    if live:
        ref_live = live[0]["live_peak_mb"]
        print("\n| step peak held by tensors (MiB, CPU) | setting | implementation | MiB | / reference |")
        print("|---|---|---|---:|---:|")
        for r in live:
            print(f"| | {r['setting']} | {r['edgeconv']} | {r['live_peak_mb']:.0f} "
                  f"| x{r['live_peak_mb'] / max(ref_live, 1e-9):.2f} |")  # fmt: skip
    print()
    for ref in rows:
        for fast in rows:
            if ref["edgeconv"] != "reference" or fast["edgeconv"] == "reference":
                continue
            if (ref["kind"], ref["setting"]) != (fast["kind"], fast["setting"]):
                continue
            print(
                f"{ref['kind']} {ref['setting']}: {fast['edgeconv']} vs reference (malloc {ref['malloc']}): "
                "speed "
                f"x{ref['median_s'] / fast['median_s']:.2f}, "
                f"memory x{memory_mb(fast) / max(memory_mb(ref), 1e-9):.2f}"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"device": device, "torch": torch.__version__, "rows": rows, "saved": saved, "live": live},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
