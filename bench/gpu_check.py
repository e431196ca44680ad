"""The device check: what only a GPU can show about the CUDA path, in one script, in under 8 minutes.

    python bench/gpu_check.py                      # on a machine with one NVIDIA GPU
    python bench/gpu_check.py --dry-run            # on CPU at toy sizes, under a minute (CI runs this)

Sections, each timed and recorded as ok / failed / skipped (with why) so that one failure does not hide
the rest:

- ``environment``: GPU, compute capability, memory, native bf16, the NVIDIA driver, CUDA, cuDNN, NCCL
  (``crossmoco doctor``'s software and hardware reports).
- ``agreement``: one training step on the GPU and the same step on the CPU, from the same weights and
  batch: the losses and every parameter's gradient, fp32 (IEEE, no TF32) and bf16 autocast, against the
  stated tolerances (:data:`TOLERANCES`).
- ``no_sync``: the paper step under ``torch.cuda.set_sync_debug_mode("error")``: any host
  synchronisation in it raises (what tests/train/test_gpu_path.py proves on fake tensors, on the real
  kernels).
- ``step``: the paper's step (DGCNN k=15, emb 1024, 2048 points; ResNet-50 at 224 px; 2 views; batch 20;
  K=4000) as samples/s and peak ``torch.cuda.max_memory_allocated``: the reference EdgeConv (every edge
  materialised, fp32, NCHW, as the original code) and the fast one in fp32, fp32 with TF32, bf16 and bf16 +
  channels-last, each with its speed and memory ratio to the reference in the same run.
- ``deterministic``: ``train.deterministic=true``'s kernels (strict: an op without a deterministic one
  raises) on two runs of two bf16 steps from the same state: bitwise-equal losses and weights.
- ``largest_batch``: the largest per-GPU batch of that step (bf16 + channels-last) that fits in an 80 GB
  GPU (on a larger GPU the process is held to the 79 GiB an A100 or H100 80GB has).
- ``sync_bn``: SyncBN across 2 processes sharing the GPU (gloo; NCCL refuses two ranks on one GPU)
  against BatchNorm on the global batch in one process.
- ``pretrain``: ``crossmoco pretrain --preset quickstart train.use_gpu=true`` on Ray Train (NCCL), its
  worker killed mid-epoch, the run resumed from its last checkpoint and finished; then ``crossmoco eval
  svm`` of its checkpoint on the GPU. Needs Ray, MLflow and pydantic (skipped, and said, where missing).

Output: ``OUT/gpu_check.json`` (``{"meta": {...}, "sections": {name: {"status", "seconds", ...}}}``) and
``OUT/gpu_check.md``, a block to paste into bench/RESULTS.md (also printed). ``--dry-run`` runs every
section's code on the CPU at toy sizes (the GPU-only parts are said to be skipped), so the script cannot
rot. Needs torch only, except ``pretrain``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGET_S = 8 * 60
MEMORY_GIB = 79  # what "an 80 GB GPU" holds: an A100 or H100 80GB has 79.2–79.6 GiB
# What "agree" means between the GPU and the CPU for one step from the same weights and batch, judged on the
# total loss and on each encoder's whole gradient (cosine, norm ratio). fp32: the same maths in another
# order (on the CPU, fp32 against fp64 at this setting: loss 3e-5, cosines 0.997 / 0.9996, norms 0.3%).
# bf16 at random init: the losses and gradient norms agree, but the directions are mostly rounding (on the
# CPU, bf16 against fp64: image-encoder cosine 0.08, point encoder 0.63, norms within 1%), so the cosines
# are reported, not judged (None).
TOLERANCES: dict[str, dict[str, float | None]] = {
    "fp32": {"loss_rel": 1e-3, "grad_cosine": 0.99, "grad_norm_rel": 0.02},
    "bf16": {"loss_rel": 0.05, "grad_cosine": None, "grad_norm_rel": 0.1},
}
ENCODERS = ("point_q", "image_q")
# toy sizes of the dry run (the real ones are bench/step.py's "paper" setting)
DRY = dict(
    k=4, emb_dims=32, point_head_hidden=32, image_encoder="resnet18", image_head_hidden=16, proj_dim=16,
    queue_length=32, momentum=0.99, temperature=0.1, cross_temperature=0.1, batch=4, num_points=64,
    image_size=32, views=2, lr=1e-3, weight_decay=1e-6,
)  # fmt: skip


def paper_setting() -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.SETTINGS["paper"])


class Check:
    """The sections' results, the clock, the device."""

    def __init__(self, dry_run: bool, budget: float) -> None:
        import torch

        self.dry_run, self.deadline = dry_run, time.monotonic() + budget
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.setting = DRY if dry_run else paper_setting()
        self.sections: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[Check], dict[str, Any]], needs_s: float = 0.0) -> None:
        left = self.deadline - time.monotonic()
        if left < needs_s:
            self.sections[name] = {"status": "skipped", "why": f"{left:.0f} s left of the budget"}
            return
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            result = {"status": "ok", **fn(self)}
        except Exception as err:
            result = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000],
                      "trace": traceback.format_exc()[-3000:]}  # fmt: skip
        result["seconds"] = round(time.monotonic() - t0, 1)
        self.sections[name] = result
        print(f"   {result['status']} in {result['seconds']} s", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The model, a batch, one step
# --------------------------------------------------------------------------------------------------


def build(s: dict[str, Any], device: Any, edgeconv: str = "fast", channels_last: bool = True) -> Any:
    import torch

    from crossmoco_ray.nn import DGCNN, CrossMoCo, ImageEncoder
    from crossmoco_ray.train.step import prepare_model

    torch.manual_seed(0)
    point = DGCNN(k=s["k"], emb_dims=s["emb_dims"], head_hidden=s["point_head_hidden"],
                  proj_dim=s["proj_dim"], edgeconv=edgeconv)  # fmt: skip
    image = ImageEncoder(s["image_encoder"], proj_dim=s["proj_dim"], head_hidden=s["image_head_hidden"])
    model = CrossMoCo(point, image, queue_length=s["queue_length"], dim=s["proj_dim"],
                      temperature=s["temperature"], cross_temperature=s["cross_temperature"])  # fmt: skip
    return prepare_model(model, device, channels_last).train()


def optimizer_for(model: Any, s: dict[str, Any], lr: float | None = None) -> Any:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    fused = True if params[0].is_cuda else None  # as train.builders.build_optimizer on CUDA
    return torch.optim.Adam(
        params, lr=s["lr"] if lr is None else lr, weight_decay=s["weight_decay"], fused=fused
    )


def batch_of(s: dict[str, Any], batch: int, device: Any, seed: int = 0) -> dict[str, Any]:
    """The pipeline's batch: points, and uint8 views ``[B, V, H, W, 3]`` (pinned, as GPU workers read)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n, size = s["num_points"], s["image_size"]
    out = {
        "points1": torch.randn(batch, n, 3, generator=g),
        "points2": torch.randn(batch, n, 3, generator=g),
        "images": torch.randint(0, 256, (batch, s["views"], size, size, 3), dtype=torch.uint8, generator=g),
    }
    if device.type == "cuda":
        out = {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}
    return out


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def environment(c: Check) -> dict[str, Any]:
    from crossmoco_ray import doctor

    return {"software": doctor.software(), "hardware": doctor.hardware()}


def agreement(c: Check) -> dict[str, Any]:
    """One step on the device and on the CPU from the same weights and batch (lr 0: the gradients are
    compared, not the update). Dry run: the CPU in fp32 against the CPU in fp64."""
    import torch

    from crossmoco_ray.nn.runtime import configure_kernels
    from crossmoco_ray.train.step import train_step

    s = dict(c.setting)
    if not c.dry_run:  # smaller than the paper's step, so that the CPU side takes seconds
        s.update(num_points=1024, image_size=112, batch=8)
    configure_kernels(tf32=False, deterministic=False)
    cpu = torch.device("cpu")
    reference_dtype = torch.float64 if c.dry_run else torch.float32
    reference = build(s, cpu).to(reference_dtype)
    batch = {
        k: (v.to(reference_dtype) if v.is_floating_point() else v)
        for k, v in batch_of(s, s["batch"], cpu).items()
    }
    start = copy.deepcopy(reference)  # a step changes the queues and the key encoders: each side starts here
    ref = _losses_and_grads(reference, batch, s, "fp32", train_step)
    out: dict[str, Any] = {
        "setting": {k: s[k] for k in ("batch", "num_points", "image_size", "k", "emb_dims")}
    }
    for precision in ("fp32", "bf16"):
        model = copy.deepcopy(start).float().to(c.device)
        dev_batch = {k: (v.float() if v.is_floating_point() else v).to(c.device) for k, v in batch.items()}
        got = _losses_and_grads(model, dev_batch, s, precision, train_step)
        tol = TOLERANCES[precision]
        loss_rel = {k: abs(got[0][k] - v) / max(abs(v), 1e-12) for k, v in ref[0].items()}
        grads = {}
        for part in ENCODERS:
            a = torch.cat([g.flatten() for n, g in got[1].items() if n.startswith(part)])
            b = torch.cat([g.flatten() for n, g in ref[1].items() if n.startswith(part)]).to(a.dtype)
            cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
            grads[part] = {"cosine": cosine, "norm_rel": abs(float(a.norm() / b.norm()) - 1)}
        passed = loss_rel["loss"] <= tol["loss_rel"] and all(
            g["norm_rel"] <= tol["grad_norm_rel"]
            and (tol["grad_cosine"] is None or g["cosine"] >= tol["grad_cosine"])
            for g in grads.values()
        )
        out[precision] = {"tolerances": tol, "passed": passed, "loss_rel": loss_rel, "gradients": grads}
    # the toy model of the dry run is too small for bf16's tolerances (4 clouds per BatchNorm): reported only
    judged = ("fp32",) if c.dry_run else ("fp32", "bf16")
    out["judged"] = list(judged)
    if not all(out[p]["passed"] for p in judged):
        raise AssertionError(f"the GPU and the CPU disagree beyond the tolerances: {json.dumps(out)[:1500]}")
    return out


def _losses_and_grads(model: Any, batch: dict[str, Any], s: dict[str, Any], precision: str, step: Any) -> Any:
    import torch

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    out = step(model, batch, optimizer, s["momentum"], precision=precision, channels_last=True)
    losses = {k: float(out[k]) for k in ("loss", "loss_point", "loss_image", "loss_cross")}
    grads = {
        n: p.grad.detach().double().cpu()
        for n, p in model.named_parameters()
        if p.grad is not None and not n.endswith("inv_head.0.bias")  # feeds a BatchNorm: zero but for noise
    }
    return losses, grads


def no_sync(c: Check) -> dict[str, Any]:
    """The step under CUDA's sync debug mode "error": a host synchronisation in it raises."""
    import torch

    from crossmoco_ray.train.step import train_step

    if c.device.type != "cuda":
        return {
            "status": "skipped",
            "why": "CUDA's sync debug mode needs a GPU (the fake-CUDA test covers CPU)",
        }
    s = c.setting
    model = build(s, c.device)
    optimizer = optimizer_for(model, s)
    batch = batch_of(s, s["batch"], c.device)
    for _ in range(2):  # warm-up: cuDNN's autotuning and the optimizer's state
        train_step(model, batch, optimizer, s["momentum"], precision="bf16", channels_last=True)
    sync(c.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            train_step(model, batch, optimizer, s["momentum"], precision="bf16", channels_last=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sync(c.device)
    return {"steps": 3, "precision": "bf16", "host_syncs": 0}


VARIANTS = {  # name: (edgeconv, precision, channels_last, tf32)
    "reference fp32": ("reference", "fp32", False, False),
    "fast fp32": ("fast", "fp32", False, False),
    "fast fp32 + TF32": ("fast", "fp32", False, True),
    "fast bf16": ("fast", "bf16", False, False),
    "fast bf16 + channels-last": ("fast", "bf16", True, False),
}


def time_steps(
    c: Check, s: dict[str, Any], variant: str, batch: int, warmup: int, steps: int
) -> dict[str, Any]:
    import torch

    from crossmoco_ray.nn.runtime import configure_kernels
    from crossmoco_ray.train.step import train_step

    edgeconv, precision, channels_last, tf32 = VARIANTS[variant]
    configure_kernels(tf32=tf32, deterministic=False)
    s = {**s, "queue_length": batch * max(1, round(s["queue_length"] / batch))}
    model = build(s, c.device, edgeconv, channels_last)
    optimizer = optimizer_for(model, s)
    data = batch_of(s, batch, c.device)
    if c.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(c.device)
    times = []
    for i in range(warmup + steps):
        sync(c.device)
        t0 = time.perf_counter()
        train_step(model, data, optimizer, s["momentum"], precision=precision, channels_last=channels_last)
        sync(c.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(c.device) / 2**20 if c.device.type == "cuda" else float("nan")
    del model, optimizer, data
    return {"batch": batch, "median_s": median, "samples_per_s": batch / median, "peak_mib": peak,
            "times": times}  # fmt: skip


def step(c: Check) -> dict[str, Any]:
    warmup, steps = (1, 2) if c.dry_run else (3, 10)
    s = c.setting
    rows = {name: time_steps(c, s, name, s["batch"], warmup, steps) for name in VARIANTS}
    ref = rows["reference fp32"]
    for r in rows.values():
        r["speed_vs_reference"] = ref["median_s"] / r["median_s"]
        r["memory_vs_reference"] = (
            r["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] == ref["peak_mib"] else None
        )
    return {
        "setting": "toy (dry run)" if c.dry_run else "paper",
        "warmup": warmup,
        "steps": steps,
        "rows": rows,
    }


def largest_batch(c: Check) -> dict[str, Any]:
    """Doubling from the paper's 20 until a step does not fit, then bisecting (to 5% or 4 samples)."""
    import gc

    import torch

    if c.device.type == "cuda":
        total = torch.cuda.get_device_properties(c.device).total_memory
        fraction = min(1.0, MEMORY_GIB * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction, c.device)
        limit_gib = fraction * total / 2**30

        def fits(b: int) -> bool:
            try:
                time_steps(c, c.setting, "fast bf16 + channels-last", b, warmup=1, steps=1)
                return True
            except RuntimeError as err:  # torch.OutOfMemoryError, or cuBLAS / cuDNN failing to allocate
                if not isinstance(err, torch.OutOfMemoryError) and "ALLOC" not in str(err).upper():
                    raise
                return False
            finally:
                gc.collect()
                torch.cuda.empty_cache()
    else:  # dry run: the search itself, against a pretend limit of 12 samples
        limit_gib = float("nan")

        def fits(b: int) -> bool:
            return b <= 12 and bool(time_steps(c, c.setting, "fast fp32", b, warmup=0, steps=1))

    tried: dict[int, bool] = {}

    def time_left() -> bool:
        return time.monotonic() < c.deadline - 60

    lo, hi = 0, c.setting["batch"]
    try:
        while time_left():  # double while it fits
            tried[hi] = fits(hi)
            if not tried[hi]:
                break
            lo, hi = hi, hi * 2
        while hi - lo > max(4, lo // 20) and time_left():  # then bisect
            mid = (lo + hi) // 2
            tried[mid] = fits(mid)
            lo, hi = (mid, hi) if tried[mid] else (lo, mid)
    finally:
        if c.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, c.device)
    failing = hi if hi in tried and not tried[hi] else None
    return {"largest_fitting": lo, "smallest_failing": failing, "memory_limit_gib": limit_gib,
            "variant": "fast bf16 + channels-last", "tried": tried}  # fmt: skip


def deterministic(c: Check) -> dict[str, Any]:
    """train.deterministic=true: strict deterministic kernels (an op without one raises) and cuBLAS's
    fixed workspace; two runs of two steps from the same state give bitwise-equal losses and weights."""
    import torch

    from crossmoco_ray.nn.runtime import configure_kernels
    from crossmoco_ray.train.step import train_step

    s = dict(c.setting)
    if not c.dry_run:
        s.update(num_points=1024, image_size=112, batch=8)
    configure_kernels(tf32=False, deterministic=True)
    try:
        runs = []
        for _ in range(2):
            model = build(s, c.device)
            optimizer = optimizer_for(model, s)
            batch = batch_of(s, s["batch"], c.device)
            losses = [
                float(
                    train_step(model, batch, optimizer, s["momentum"], precision="bf16", channels_last=True)[
                        "loss"
                    ]
                )
                for _ in range(2)
            ]
            runs.append((losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}))
    finally:
        configure_kernels(tf32=False, deterministic=False)
    (losses_a, state_a), (losses_b, state_b) = runs
    differ = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    if losses_a != losses_b or differ:
        raise AssertionError(
            f"two deterministic runs differ: losses {losses_a} / {losses_b}, tensors {differ[:5]}"
        )
    return {"steps": 2, "precision": "bf16", "bitwise_equal": True, "losses": losses_a}


def sync_bn(c: Check) -> dict[str, Any]:
    if c.device.type != "cuda":
        why = "torch's SyncBatchNorm runs on GPUs only (tests/nn/test_sync_bn.py: on CPU with substitutes)"
        return {"status": "skipped", "why": why}
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_sync_bn_worker, args=(tmp,), nprocs=2, join=True, start_method="spawn")
        results = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
    worst = max(r["max_rel_err"] for r in results)
    if worst > 1e-3 or not all(r["bf16_finite"] for r in results):
        raise AssertionError(
            f"SyncBN across 2 processes differs from BatchNorm on the global batch: {results}"
        )
    return {"backend": "gloo (2 processes on one GPU)", "max_rel_err_vs_one_process": worst, "bf16": "finite"}


def _sync_bn_worker(rank: int, tmp: str) -> None:
    """Rank ``rank`` of 2 on one GPU: a DGCNN and a checkpointed channels-last ResNet with SyncBN, half the
    global batch each, under DDP as the workers wrap it; their gradients against one process with
    BatchNorm on the whole batch."""
    import torch
    import torch.distributed as dist

    from crossmoco_ray.nn import DGCNN, ImageEncoder, convert_sync_batchnorm
    from crossmoco_ray.train.process import wrap_ddp

    class Pair(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.point = DGCNN(k=15, emb_dims=256, head_hidden=128, proj_dim=32)
            self.image = ImageEncoder("resnet18", proj_dim=32, head_hidden=64, checkpoint_trunk=True)
            self.image.to(memory_format=torch.channels_last)

        def forward(self, points: torch.Tensor, images: torch.Tensor, bf16: bool = False) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                zp, zi = self.point(points)[0], self.image(images)[0]
            return zp.float().square().mean() + zi.float().square().mean()

    from crossmoco_ray.nn.runtime import configure_kernels

    configure_kernels(tf32=False, deterministic=False)  # IEEE fp32 on both sides
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(1)
    points = torch.randn(16, 512, 3, generator=g).to(device)
    images = torch.randint(0, 256, (16, 64, 64, 3), dtype=torch.uint8, generator=g).to(device)
    single = Pair().to(device).train()
    single(points, images).backward()
    model = Pair()
    model.point, model.image = convert_sync_batchnorm(model.point), convert_sync_batchnorm(model.image)
    net = wrap_ddp(model.to(device).train(), device, 2)
    net(points[rank * 8 : rank * 8 + 8], images[rank * 8 : rank * 8 + 8]).backward()
    errs = [
        float((a.grad - b.grad).norm() / b.grad.norm())
        for a, b in zip(model.parameters(), single.parameters(), strict=True)
        if b.grad is not None and b.grad.norm() > 1e-6
    ]
    model.zero_grad()
    net(points[rank * 8 : rank * 8 + 8], images[rank * 8 : rank * 8 + 8], True).backward()  # bf16 runs too
    finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    Path(tmp, f"rank{rank}.json").write_text(json.dumps({"max_rel_err": max(errs), "bf16_finite": finite}))
    dist.barrier()
    dist.destroy_process_group()


def pretrain(c: Check) -> dict[str, Any]:
    missing = [m for m in ("ray", "mlflow", "pydantic") if importlib.util.find_spec(m) is None]
    storage = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    device_args = ["train.use_gpu=true"] if c.device.type == "cuda" else []
    run = [
        "pretrain", "--preset", "quickstart", "--storage", str(storage), "--name", "gpu-check",
        "--no-tracking", "train.num_workers=1", "train.epochs=2", "train.checkpoint_every_steps=10",
        "train.cpus_per_worker=1", "eval.final=false", *device_args,
    ]  # fmt: skip
    if missing or c.dry_run:
        from crossmoco_ray.cli import parse_command

        if not missing:
            parse_command(run)  # the command is valid as written
        why = f"{', '.join(missing)} not installed" if missing else "dry run: the command is checked, not run"
        return {"status": "skipped", "why": why, "command": "crossmoco " + " ".join(run)}
    env = {**os.environ, "CROSSMOCO_FAULT_AT_STEP": "15", "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "crossmoco_ray", *run], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=max(60, c.deadline - time.monotonic() - 60))  # fmt: skip
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"pretrain exited {done.returncode}:\n{log[-3000:]}")
    resumed = "resumed from" in log and "[fault injection]" in log
    checkpoint = sorted((storage / "gpu-check").glob("epoch_*"))[-1]
    builtin = next((storage / "_builtin").glob("synthetic-*"))
    evaluate = ["eval", "svm", "--data", str(builtin), "--checkpoint", str(checkpoint), "--device", "cuda",
                "--num-points", "256", "--no-plots"]  # fmt: skip
    t1 = time.monotonic()
    ev = subprocess.run([sys.executable, "-m", "crossmoco_ray", *evaluate], capture_output=True, text=True,
                        cwd=ROOT, timeout=max(60, c.deadline - time.monotonic()))  # fmt: skip
    if ev.returncode != 0:
        raise RuntimeError(f"eval svm exited {ev.returncode}:\n{(ev.stdout + ev.stderr)[-3000:]}")
    if not resumed:
        raise AssertionError(f"the worker was not killed and resumed:\n{log[-3000:]}")
    lines = [ln for ln in log.splitlines() if "samples/s" in ln][-3:]
    return {"command": "crossmoco " + " ".join(run), "fault_at_step": 15, "resumed": resumed,
            "pretrain_s": round(t1 - t0, 1), "eval_s": round(time.monotonic() - t1, 1),
            "last_progress": lines, "eval": (ev.stdout.strip().splitlines() or [""])[-8:]}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    meta, sec = report["meta"], report["sections"]
    env = sec.get("environment", {})
    gpus = env.get("hardware", {}).get("gpus", [])
    gpu = ", ".join(f"{g['name']} (sm {g['compute capability']}, {g['memory GiB']} GiB, native bf16 "
                    f"{'yes' if g['native bf16'] else 'no'})"
                    for g in gpus) or "no GPU (dry run)"  # fmt: skip
    sw = env.get("software", {})
    lines = [
        f"### Device check ({meta['date']}, `{meta['command']}`)",
        "",
        f"{gpu}; driver {env.get('hardware', {}).get('nvidia driver', '?')}, torch "
        f"{sw.get('packages', {}).get('torch', '?')} (CUDA {sw.get('torch CUDA build', '?')}, cuDNN "
        f"{sw.get('cuDNN', '?')}, NCCL {sw.get('NCCL', '?')}); crossmoco-ray {sw.get('commit', '?')}.",
        "",
        "| section | status | seconds | result |",
        "|---|---|---:|---|",
    ]
    for name, r in sec.items():
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {_summary(name, r)} |")
    rows = sec.get("step", {}).get("rows")
    if rows:
        lines += ["", f"Step ({sec['step']['setting']} setting, median of {sec['step']['steps']} steps after "
                  f"{sec['step']['warmup']}):", "",
                  "| implementation | batch | s/step | samples/s | peak MiB | speed vs reference "
                  "| memory vs reference |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, r in rows.items():
            mem = r.get("memory_vs_reference")
            lines.append(f"| {name} | {r['batch']} | {r['median_s']:.4f} | {r['samples_per_s']:.1f} | "
                         f"{r['peak_mib']:.0f} | x{r['speed_vs_reference']:.2f} | "
                         f"{f'x{mem:.2f}' if mem else 'n/a'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _summary(name: str, r: dict[str, Any]) -> str:
    if r["status"] == "failed":
        return r["error"].splitlines()[0][:200]
    if r["status"] == "skipped":
        return r.get("why", "")
    if name == "agreement":
        return "; ".join(
            f"{p}: loss rel {r[p]['loss_rel']['loss']:.1e}, gradient cosine / norm rel "
            + ", ".join(f"{e} {g['cosine']:.4f} / {g['norm_rel']:.1e}" for e, g in r[p]["gradients"].items())
            for p in ("fp32", "bf16")
        )
    if name == "largest_batch":
        if r["memory_limit_gib"] != r["memory_limit_gib"]:  # NaN: the dry run's pretend limit
            return f"{r['largest_fitting']} (dry run: the search against a pretend limit of 12)"
        return f"{r['largest_fitting']} per GPU in {r['memory_limit_gib']:.0f} GiB ({r['variant']})"
    if name == "deterministic":
        return f"{r['steps']} {r['precision']} steps twice: bitwise-equal losses and weights"
    if name == "no_sync":
        return f"{r['steps']} {r['precision']} steps, no host synchronisation"
    if name == "sync_bn":
        return f"max rel. gradient error {r['max_rel_err_vs_one_process']:.1e} ({r['backend']})"
    if name == "pretrain":
        return (f"killed at step {r['fault_at_step']}, resumed, finished in {r['pretrain_s']} s; "
                f"eval svm {r['eval_s']} s")  # fmt: skip
    if name == "step":
        best = max(r["rows"].items(), key=lambda kv: kv[1]["samples_per_s"])
        rate, ratio = best[1]["samples_per_s"], best[1]["speed_vs_reference"]
        return f"best: {best[0]}, {rate:.1f} samples/s (x{ratio:.2f})"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="on CPU at toy sizes (what CI runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu_check")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything (default 480)")
    parser.add_argument("--only", help="comma-separated sections to run (default: all)")
    args = parser.parse_args()

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no GPU here: run with --dry-run to check the script on CPU")
    check = Check(args.dry_run, args.budget)
    sections: list[tuple[str, Callable[[Check], dict[str, Any]], float]] = [
        ("environment", environment, 0), ("agreement", agreement, 30), ("no_sync", no_sync, 20),
        ("deterministic", deterministic, 30), ("step", step, 60), ("largest_batch", largest_batch, 90),
        ("sync_bn", sync_bn, 30),
        ("pretrain", pretrain, 150),
    ]  # fmt: skip
    only = set(args.only.split(",")) if args.only else None
    for name, fn, needs in sections:
        if only is None or name in only:
            check.run(name, fn, needs)
    report = {
        "meta": {"date": time.strftime("%Y-%m-%d"), "dry_run": args.dry_run, "budget_s": args.budget,
                 "command": "python bench/gpu_check.py" + (" --dry-run" if args.dry_run else "")},
        "sections": check.sections,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    text = markdown(report)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    failed = [n for n, r in check.sections.items() if r["status"] == "failed"]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (details in {args.out / 'gpu_check.json'})")


if __name__ == "__main__":
    main()
