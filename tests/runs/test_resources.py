"""Resource checks before any worker starts: CPUs for workers and Ray Data, GPUs, bf16 on GPUs that emulate
it; the workers' environment."""

from __future__ import annotations

import pytest

from crossmoco_ray.config.loading import load_config
from crossmoco_ray.errors import ConfigError
from crossmoco_ray.runs.resources import check_resources, gpu_types, worker_env


def gpu_run(precision: str = "bf16") -> object:
    return load_config("paper", overrides=["train.use_gpu=true", f"train.precision={precision}"])


def test_bf16_on_a_cluster_whose_gpus_all_emulate_it_is_refused_with_the_fix() -> None:
    t4s = {"CPU": 16.0, "GPU": 4.0, "accelerator_type:T4": 4.0}
    for local in (True, False):  # an autoscaler does not change what these GPUs can do
        with pytest.raises(ConfigError) as err:
            check_resources(gpu_run(), t4s, local=local, log=print)
        assert "T4 (compute capability 7.5) has no native bf16" in str(err.value)
        assert "Set train.precision=fp32" in str(err.value)
    check_resources(gpu_run("fp32"), t4s, local=True, log=print)


@pytest.mark.parametrize(
    "resources",
    [
        {"CPU": 16.0, "GPU": 8.0, "accelerator_type:H100": 8.0},
        {"CPU": 16.0, "GPU": 8.0, "accelerator_type:T4": 4.0, "accelerator_type:A100": 4.0},  # may land well
        {"CPU": 16.0, "GPU": 8.0, "accelerator_type:GeForce-RTX-9090": 8.0},  # unknown: the worker decides
        {"CPU": 16.0},  # no GPU node yet (an autoscaler adds them): nothing to judge
    ],
)
def test_bf16_is_left_to_the_workers_where_a_gpu_may_have_it(resources: dict[str, float]) -> None:
    warnings: list[str] = []
    check_resources(gpu_run(), resources, local=False, log=warnings.append)
    assert not any("bf16" in w for w in warnings)


def test_gpu_types_are_read_from_rays_accelerator_resources() -> None:
    assert gpu_types({"CPU": 1.0, "accelerator_type:V100": 1.0, "accelerator_type:A10G": 2.0}) == [
        "A10G",
        "V100",
    ]


def test_deterministic_runs_give_their_workers_the_cublas_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in worker_env()
    assert worker_env(deterministic=True)["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


LOCAL = {"CPU": 8.0, "memory": 16.0 * 2**30, "object_store_memory": 4.0 * 2**30, "node:127.0.0.1": 1.0}


@pytest.mark.parametrize(
    ("worker_resources", "named"),
    [
        ("{CPU: 64}", "lower train.worker_resources.CPU"),
        ("{trainer_slot: 1}", "train.worker_resources 'trainer_slot': 1 workers × 1 = 1, the cluster has 0"),
        ("{memory: 68719476736}", "train.worker_resources.memory: 1 workers × 64 GiB = 64 GiB"),
    ],
    ids=["cpu", "custom", "memory"],
)
def test_worker_resources_that_cannot_be_met_are_refused_locally_and_warned_on_a_cluster(
    worker_resources: str, named: str
) -> None:
    """Every key of train.worker_resources is counted as Ray is asked for it: a local Ray that lacks one
    would wait forever for the workers."""
    cfg = load_config(
        "quickstart", overrides=["train.num_workers=1", f"train.worker_resources={worker_resources}"]
    )
    with pytest.raises(ConfigError) as err:
        check_resources(cfg, LOCAL, local=True, log=print)
    assert named in str(err.value)
    warnings: list[str] = []
    check_resources(cfg, LOCAL, local=False, log=warnings.append)  # an autoscaler may add such nodes
    assert len(warnings) == 1
    assert named in warnings[0]
    assert "waiting for the autoscaler" in warnings[0]


def test_a_custom_resource_is_named_with_how_to_start_a_ray_that_has_it() -> None:
    cfg = load_config("quickstart", overrides=["train.worker_resources={trainer_slot: 1}"])
    with pytest.raises(ConfigError, match=r"ray start --head --resources='\{\"trainer_slot\": 2\}'"):
        check_resources(cfg, LOCAL, local=True, log=print)
    check_resources(cfg, {**LOCAL, "trainer_slot": 2.0}, local=True, log=print)  # the cluster has it


def test_worker_resources_that_fit_pass() -> None:
    cfg = load_config(
        "quickstart", overrides=["train.num_workers=2", "train.worker_resources={CPU: 2, memory: 1e9}"]
    )
    warnings: list[str] = []
    check_resources(cfg, LOCAL, local=True, log=warnings.append)  # 2 x 2 CPUs + 1 for Ray Data of 8
    assert warnings == []
