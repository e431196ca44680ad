"""The device check: what only a GPU can show about the CUDA path, in one script, in under 8 minutes.

    python bench/gpu_check.py                      # on a machine with one NVIDIA GPU
    python bench/gpu_check.py --dry-run            # on CPU at toy sizes, under a minute (CI runs this)
    python bench/gpu_check.py --cpu --only agreement   # the CPU's reference figures at the real sizes

Sections, each timed and recorded as ok / failed / skipped (with why) so that one failure does not hide
the rest:

- ``environment``: GPU, compute capability, memory, native bf16, the NVIDIA driver, CUDA, cuDNN, NCCL
  (``crossmoco doctor``'s software and hardware reports).
- ``agreement``: one training step on the GPU and the same step on the CPU, from the same weights and
  batch: the losses and each encoder's whole gradient (cosine, norm ratio), fp32 (IEEE, no TF32) and bf16
  autocast, against the stated tolerances (``TOLERANCES`` in bench/gpu_sections.py, which holds the
  single-process sections).
- ``no_sync``: the paper step under ``torch.cuda.set_sync_debug_mode("error")``: any host
  synchronisation in it raises (what tests/pretrain/test_gpu_path.py proves on fake tensors, on the real
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
  worker killed mid-epoch by a step callback (bench/fault_callback.py, which runs the command in a fresh
  process with it), the run resumed from its last checkpoint and finished; then ``crossmoco eval svm`` of
  its checkpoint on the GPU (``--cpu --only pretrain``: all of it on the CPU). Needs Ray, MLflow and
  pydantic (skipped, and said, where missing).

Output: ``OUT/gpu_check.json`` (``{"meta": {...}, "sections": {name: {"status", "seconds", ...}}}``) and
``OUT/gpu_check.md``, a block to paste into bench/RESULTS.md (also printed). ``--dry-run`` runs every
section's code on the CPU at toy sizes (the GPU-only parts are said to be skipped), so the script cannot
rot. Needs torch only, except ``pretrain``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_sections import (
    ROOT,
    Check,
    agreement,
    deterministic,
    largest_batch,
    no_sync,
    step,
)

BUDGET_S = 8 * 60
FAULT_AT_STEP = 15  # the pretrain section's kill: after step 15, its checkpoint at step 10


def environment(c: Check) -> dict[str, Any]:
    from crossmoco_ray.cli import doctor

    return {"software": doctor.software(), "hardware": doctor.hardware()}


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
    from crossmoco_ray.runs.ddp import wrap_ddp

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

    from crossmoco_ray.nn.precision import configure_kernels

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
    """``crossmoco pretrain`` in a fresh process (bench/fault_callback.py: the command as ``crossmoco``
    reads it, run with a step callback that kills the last worker after step ``FAULT_AT_STEP``, once),
    resumed by Ray Train from its step-10 checkpoint; then ``crossmoco eval svm`` of its checkpoint."""
    missing = [m for m in ("ray", "mlflow", "pydantic") if importlib.util.find_spec(m) is None]
    storage = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    device_args = ["train.use_gpu=true"] if c.device.type == "cuda" else []
    run = [
        "pretrain", "--preset", "quickstart", "--storage", str(storage), "--name", "gpu-check",
        "--no-tracking", "train.num_workers=1", "train.epochs=2", "train.checkpoint_every_steps=10",
        "train.cpus_per_worker=1", "eval.final=false", *device_args,
    ]  # fmt: skip
    fault = ["--at-step", str(FAULT_AT_STEP)]
    command = (f"crossmoco {' '.join(run)} (the fault: a step callback killing the last worker after step "
               f"{FAULT_AT_STEP}, bench/fault_callback.py)")  # fmt: skip
    if missing or c.dry_run:
        if not missing:
            import fault_callback

            fault_callback.parse([*fault, *run])  # the command is valid as written
        why = f"{', '.join(missing)} not installed" if missing else "dry run: the command is checked, not run"
        return {"status": "skipped", "why": why, "command": command}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "fault_callback.py"), *fault, *run],
                          capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=max(60, c.deadline - time.monotonic() - 60))  # fmt: skip
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"pretrain exited {done.returncode}:\n{log[-3000:]}")
    marker = storage / "gpu-check" / ".fault_injected"  # what the callback leaves
    killed = "[fault injection] killing worker" in log and marker.exists()
    resumed = killed and "resumed from" in log
    checkpoint = sorted((storage / "gpu-check").glob("epoch_*"))[-1]
    builtin = next((storage / "_builtin").glob("synthetic-*"))
    evaluate = ["eval", "svm", "--data", str(builtin), "--checkpoint", str(checkpoint),
                "--device", c.device.type, "--num-points", "256", "--no-plots"]  # fmt: skip
    t1 = time.monotonic()
    ev = subprocess.run([sys.executable, "-m", "crossmoco_ray", *evaluate], capture_output=True, text=True,
                        cwd=ROOT, timeout=max(60, c.deadline - time.monotonic()))  # fmt: skip
    if ev.returncode != 0:
        raise RuntimeError(f"eval svm exited {ev.returncode}:\n{(ev.stdout + ev.stderr)[-3000:]}")
    if not resumed:
        raise AssertionError(f"the worker was not killed and resumed:\n{log[-3000:]}")
    lines = [ln for ln in log.splitlines() if "samples/s" in ln][-3:]
    return {"command": command, "fault_at_step": FAULT_AT_STEP, "resumed": resumed,
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
    parser.add_argument("--cpu", action="store_true", help="on CPU at the real sizes (with --only agreement)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu_check")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything (default 480)")
    parser.add_argument("--only", help="comma-separated sections to run (default: all)")
    args = parser.parse_args()

    import torch

    if not (args.dry_run or args.cpu) and not torch.cuda.is_available():
        raise SystemExit("no GPU here: run with --dry-run to check the script on CPU")
    check = Check(args.dry_run, args.budget, cpu=args.cpu)
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
                 "command": " ".join(["python bench/gpu_check.py", *sys.argv[1:]])},
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
