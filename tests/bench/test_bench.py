"""The benchmarks measure what the presets describe, and the scripts run (no timing asserted).

Cheap by design (the file takes seconds, not minutes): each script's smallest setting, called in this
process through its ``main(argv)`` where it has one; subprocesses only where the script needs its own
process (a baseline commit's package beside this one, process-wide torch settings)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from crossmoco_ray.config.loading import load_config
from crossmoco_ray.nn import kernels

BENCH = Path(__file__).resolve().parents[2] / "bench" / "step.py"


def load_bench(name: str = "step") -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH.parent / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench_script(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], ModuleType]]:
    """Loads ``bench/<name>.py`` into this process; undoes what the scripts do to ``sys.path`` (bench/
    first; step_ab.py takes the checkout off it, for its children) and drops the bench modules they import
    by their bare names (``features``, ``step``)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield load_bench
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(BENCH.parent)):
            del sys.modules[name]


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


def test_bench_smoke_run_prints_the_table(
    bench_script: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every kind of row of the step benchmark, each implementation and allocator, at the smoke sizes and in
    this process (``--in-process``: a fresh process per row, ~20 of them, is what a real run pays for)."""
    bench_script("step").main(["--smoke", "--device", "cpu", "--in-process"])
    out = capsys.readouterr().out
    assert "| DGCNN fwd+bwd | smoke | fast | keep |" in out
    assert "| CrossMoCo step | smoke | reference | system |" in out
    assert "| | smoke | fast-ckpt |" in out  # the saved-for-backward table
    assert "fast vs reference (malloc system): speed" in out
    assert "fast-ckpt vs reference (malloc keep): speed" in out


def test_bench_child_measures_one_row(
    bench_script: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    """What each row of a real run is: ``--child`` prints one measurement as JSON (``system`` malloc: this
    process's allocator is left as it is)."""
    args = ["--child", "dgcnn", "smoke", "fast", "--device", "cpu", "--warmup", "0", "--repeats", "1"]
    bench_script("step").main([*args, "--malloc", "system"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row | {"kind": "dgcnn", "setting": "smoke", "edgeconv": "fast", "malloc": "system"} == row
    assert row["median_s"] > 0
    assert len(row["times"]) == 1


@pytest.mark.skipif(not kernels.available(), reason="no C compiler here: bench/knn.py measures the kernel")
def test_knn_bench_smoke_run_prints_the_table(
    bench_script: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    bench_script("knn").main(["--smoke"])
    out = capsys.readouterr().out
    assert "| smoke 2x100 k=5 | 4 (128) |" in out
    assert "| smoke: all four layers |" in out
    assert "| False |" not in out  # the three implementations selected the same distances


def has_commit(commit: str) -> bool:
    root = BENCH.parents[1]
    return subprocess.run(["git", "-C", str(root), "cat-file", "-e", commit], check=False).returncode == 0


def test_features_bench_smoke_run_compares_with_the_baseline_commit(
    bench_script: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    """The script in this process; its two measurements (the baseline commit's package, this one) each in
    its own process, as they must be."""
    if not has_commit("76a316d"):
        pytest.skip("not a clone with the baseline commit in its history")
    bench_script("features").main(["--smoke"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| smoke |"))
    baseline_sum, current_sum = row.rstrip(" |").split("|")[-1].split(" / ")
    assert float(baseline_sum) == float(current_sum)  # the same features as the code before issue 14


def test_step_ab_smoke_run_compares_with_the_code_before_issue_26(
    bench_script: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    if not has_commit("21c23ad"):
        pytest.skip("not a clone with the baseline commit in its history")
    bench_script("step_ab").main(["--smoke", "--precisions", "fp32"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| fp32 |"))
    baseline_loss, current_loss = row.rstrip(" |").split("|")[-1].split(" / ")
    assert float(baseline_loss) == float(current_loss)  # the same step, fp32, as before issue 26


def test_the_render_benchmark_runs(bench_script: Callable[[str], ModuleType]) -> None:
    args = ["--size", "16", "--objects", "2", "--repeats", "1", "--points", "64"]
    rates = bench_script("render").main(args)
    from crossmoco_ray.data.render import raster

    kinds = ["depth splats", "shaded splats"] + (["mesh, compiled"] if raster.backend() == "compiled" else [])
    assert set(rates) == {f"{kind}{png}" for kind in kinds for png in ("", " + PNG")} | {"mesh, numpy"}
    assert all(r > 0 for r in rates.values())


def test_the_device_check_runs_dry_on_cpu(tmp_path: Path) -> None:
    """bench/gpu_check.py --dry-run: every section's code on CPU at toy sizes, so the script cannot rot
    before a GPU runs it; the GPU-only sections say they were skipped and why. In its own process: the
    sections set process-wide torch settings (deterministic kernels, TF32)."""
    done = subprocess.run(
        [sys.executable, str(BENCH.parent / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
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


@pytest.mark.usefixtures("ray_session")
def test_the_scale_benchmark_runs(
    bench_script: Callable[[str], ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/scale.py --quick in this process, on the session's Ray (the CPU counts as Ray Data limits):
    every table, and the memory runs stream what they claim."""
    result = bench_script("scale").main(["--quick", "--in-process", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    for row in ("| fresh viewpoints: 320 meshes", "| stored renders: 32 objects", "| small, 10 epochs |"):
        assert row in out
    arms = {"fresh", "stored", "fresh_paper", "stored_paper"}
    assert set(result["throughput"][1]) == set(result["throughput"][2]) == arms
    assert set(result["pipeline_cost"]) == arms
    assert [m["samples"] for m in result["memory"].values()] == [32, 320, 320]
    assert result["mesh_stats"]["meshes_large"]["objects"] == 320
    assert 0 < result["render_cost"]["sphere_cell_zstd"] < result["render_cost"]["sphere_cell_raw"]
