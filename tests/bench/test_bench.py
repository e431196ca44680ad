"""The benchmarks measure what the presets describe, and the scripts run (no timing asserted)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from crossmoco_ray.config.loading import load_config
from crossmoco_ray.nn import kernels

BENCH = Path(__file__).resolve().parents[2] / "bench" / "step.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset", ["paper", "quickstart"])
def test_bench_settings_match_the_presets(preset: str) -> None:
    cfg = load_config(preset)
    m, o = cfg.model, cfg.objective
    expected = dict(
        k=m.k, emb_dims=m.emb_dims, point_head_hidden=m.point_head_hidden, image_encoder=m.image_encoder,
        image_head_hidden=m.image_head_hidden, proj_dim=m.proj_dim, queue_length=o.queue_length,
        momentum=o.momentum, temperature=o.temperature, cross_temperature=o.cross_temperature,
        batch=cfg.per_worker_batch, num_points=cfg.data.num_points, image_size=cfg.data.image_size,
        views=cfg.data.views_per_sample, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
    )  # fmt: skip
    assert load_bench().SETTINGS[preset] == expected


def test_bench_smoke_run_prints_the_table() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "| DGCNN fwd+bwd | smoke | fast | keep |" in done.stdout
    assert "| CrossMoCo step | smoke | reference | system |" in done.stdout
    assert "fast vs reference (malloc system): speed" in done.stdout
    assert "fast-ckpt vs reference (malloc keep): speed" in done.stdout


@pytest.mark.skipif(not kernels.available(), reason="no C compiler here: bench/knn.py measures the kernel")
def test_knn_bench_smoke_run_prints_the_table() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH.parent / "knn.py"), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "| smoke 2x100 k=5 | 4 (128) |" in done.stdout
    assert "| smoke: all four layers |" in done.stdout
    assert "| False |" not in done.stdout  # the three implementations selected the same distances


def test_features_bench_smoke_run_compares_with_the_baseline_commit() -> None:
    root = BENCH.parents[1]
    if subprocess.run(["git", "-C", str(root), "cat-file", "-e", "76a316d"], check=False).returncode != 0:
        pytest.skip("not a clone with the baseline commit in its history")
    script = BENCH.parent / "features.py"
    cmd = [sys.executable, str(script), "--smoke"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("| smoke |"))
    baseline_sum, current_sum = row.rstrip(" |").split("|")[-1].split(" / ")
    assert float(baseline_sum) == float(current_sum)  # the same features as the code before issue 14


def test_step_ab_smoke_run_compares_with_the_code_before_issue_26() -> None:
    root = BENCH.parents[1]
    if subprocess.run(["git", "-C", str(root), "cat-file", "-e", "21c23ad"], check=False).returncode != 0:
        pytest.skip("not a clone with the baseline commit in its history")
    cmd = [sys.executable, str(BENCH.parent / "step_ab.py"), "--smoke", "--precisions", "fp32"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("| fp32 |"))
    baseline_loss, current_loss = row.rstrip(" |").split("|")[-1].split(" / ")
    assert float(baseline_loss) == float(current_loss)  # the same step, fp32, as before issue 26


def test_the_render_benchmark_runs() -> None:
    spec = importlib.util.spec_from_file_location("bench_render", BENCH.parent / "render.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rates = module.main(["--size", "16", "--objects", "2", "--repeats", "1", "--points", "64"])
    assert set(rates) == {
        f"{kind}{png}" for kind in ("mesh", "depth splats", "shaded splats") for png in ("", " + PNG")
    } | {"mesh, 4M-candidate chunks"}
    assert all(r > 0 for r in rates.values())


def test_the_device_check_runs_dry_on_cpu(tmp_path: Path) -> None:
    """bench/gpu_check.py --dry-run: every section's code on CPU at toy sizes, so the script cannot rot
    before a GPU runs it; the GPU-only sections say they were skipped and why."""
    done = subprocess.run(
        [sys.executable, str(BENCH.parent / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import json

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    names = ["environment", "agreement", "no_sync", "deterministic", "step", "largest_batch", "sync_bn"]
    assert list(sections) == [*names, "pretrain"]
    assert {name for name, r in sections.items() if r["status"] == "ok"} >= {
        "environment", "agreement", "deterministic", "step", "largest_batch"
    }  # fmt: skip
    assert all(r["why"] for r in sections.values() if r["status"] == "skipped")
    assert sections["agreement"]["fp32"]["passed"]
    assert sections["largest_batch"]["largest_fitting"] == 12  # the search, against its pretend limit
    assert set(sections["step"]["rows"]) == {
        "reference fp32", "fast fp32", "fast fp32 + TF32", "fast bf16", "fast bf16 + channels-last"
    }  # fmt: skip
    assert "| step | ok |" in (tmp_path / "gpu_check.md").read_text()
