"""The device check's single-process sections (bench/gpu_check.py runs them): the model, batch and
timing helpers, and ``agreement``, ``no_sync``, ``deterministic``, ``step`` and ``largest_batch``.

Torch only. Each section takes the :class:`Check` (device, setting, clock) and returns what it measured,
or raises; ``{"status": "skipped", "why": ...}`` where it cannot run on this device.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEMORY_GIB = 79  # what "an 80 GB GPU" holds: an A100 or H100 80GB has 79.2–79.6 GiB
# What "agree" means between the GPU and the CPU for one step from the same weights and batch, judged on the
# total loss and on each encoder's whole gradient (cosine, norm ratio). fp32: the same maths in another
# order. bf16 at random init: the losses and gradient norms agree, but the directions are mostly rounding,
# so the cosines are reported, not judged (None). The CPU's own figures at this setting, fp32 and bf16
# against fp64 (`python bench/gpu_check.py --cpu --only agreement`), are in bench/RESULTS.md.
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

    def __init__(self, dry_run: bool, budget: float, cpu: bool = False) -> None:
        """``dry_run``: the CPU at toy sizes; ``cpu``: the CPU at the real sizes (the agreement section's
        CPU reference figures: fp32 and bf16 against fp64)."""
        import torch

        self.dry_run, self.deadline = dry_run, time.monotonic() + budget
        self.device = torch.device("cpu" if dry_run or cpu else "cuda")
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
    from crossmoco_ray.pretrain.step import prepare_model

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


def agreement(c: Check) -> dict[str, Any]:
    """One step on the device and on the CPU from the same weights and batch (lr 0: the gradients are
    compared, not the update). Dry run: the CPU in fp32 against the CPU in fp64."""
    import torch

    from crossmoco_ray.nn.precision import configure_kernels
    from crossmoco_ray.pretrain.step import train_step

    s = dict(c.setting)
    if not c.dry_run:  # smaller than the paper's step, so that the CPU side takes seconds
        s.update(num_points=1024, image_size=112, batch=8)
    configure_kernels(tf32=False, deterministic=False)
    cpu = torch.device("cpu")
    # on the CPU the compared side is the CPU itself: the reference is then fp64
    reference_dtype = torch.float64 if c.device.type == "cpu" else torch.float32
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

    from crossmoco_ray.pretrain.step import train_step

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

    from crossmoco_ray.nn.precision import configure_kernels
    from crossmoco_ray.pretrain.step import train_step

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

    from crossmoco_ray.nn.precision import configure_kernels
    from crossmoco_ray.pretrain.step import train_step

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
