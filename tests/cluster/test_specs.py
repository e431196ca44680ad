"""Cluster specs, manifests and the image: valid, and in agreement on versions and image name (no Docker)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_SPECS = [ROOT / "cluster" / "aws.yaml", ROOT / "cluster" / "gcp.yaml"]
KUBERAY = [ROOT / "cluster" / "kuberay" / "raycluster.yaml", ROOT / "cluster" / "kuberay" / "rayjob.yaml"]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def pyproject() -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def image_pins() -> dict[str, str]:
    pins: dict[str, str] = pyproject()["tool"]["crossmoco"]["image"]
    return pins


def expected_image() -> str:
    return f"{image_pins()['name']}:{pyproject()['project']['version']}-gpu"


def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    schema: dict[str, Any] = json.loads(
        (Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()
    )
    return schema


@pytest.mark.parametrize("spec", LAUNCHER_SPECS, ids=lambda p: p.name)
def test_launcher_spec_validates_against_rays_schema(spec: Path) -> None:
    import jsonschema

    config = yaml.safe_load(spec.read_text())
    jsonschema.validate(config, ray_schema())
    assert config["head_node_type"] in config["available_node_types"]
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert "CHANGE ME" in spec.read_text()  # the fields a user must set are marked


def test_schema_check_is_not_vacuous() -> None:
    import jsonschema

    config = yaml.safe_load(LAUNCHER_SPECS[0].read_text())
    config["docker"]["imagee"] = config["docker"].pop("image")
    with pytest.raises(jsonschema.ValidationError, match="imagee"):
        jsonschema.validate(config, ray_schema())


def _images_in(node: Any) -> list[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                found.append(value)
            else:
                found += _images_in(value)
    elif isinstance(node, list):
        for item in node:
            found += _images_in(item)
    return found


@pytest.mark.parametrize("manifest", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_parse_and_use_the_image(manifest: Path) -> None:
    doc = yaml.safe_load(manifest.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in {"RayCluster", "RayJob"}
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == image_pins()["ray"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert spec["workerGroupSpecs"]
    images = _images_in(doc)
    assert len(images) >= 2  # head and workers
    assert set(images) == {expected_image()}


def test_launcher_specs_use_the_same_image() -> None:
    for spec in LAUNCHER_SPECS:
        assert yaml.safe_load(spec.read_text())["docker"]["image"] == expected_image(), spec.name


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def test_versions_agree_across_pyproject_docker_and_cluster() -> None:
    pins = image_pins()
    deps = pyproject()["project"]["dependencies"]
    ray_dep = next(d for d in deps if d.startswith("ray["))
    assert ray_dep.endswith(f"=={pins['ray']}")
    torch_dep = next(d for d in deps if re.match(r"torch\b", d) and not d.startswith("torchvision"))
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(torch_dep.removeprefix("torch")).contains(pins["torch"])
    vision_dep = next(d for d in deps if d.startswith("torchvision"))
    assert SpecifierSet(vision_dep.removeprefix("torchvision")).contains(pins["torchvision"])
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    assert requires.contains(f"{pins['python']}.0")

    args = _dockerfile_args()
    assert args["PYTHON_VERSION"] == pins["python"]
    assert args["RAY_VERSION"] == pins["ray"]
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]
    assert args["CUDA_VERSION"] == pins["cuda"]
    assert expected_image() in DOCKERFILE.read_text()  # the build command names the same tag
    # The runtime environment file and the scripts exist and are what the docs name.
    assert yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())["env_vars"]


def test_dockerfile_has_a_non_root_user_and_installs_the_project() -> None:
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users
    assert users[-1] not in {"root", "0", "0:0"}
    assert re.search(r"pip install \.", text)
    assert (ROOT / ".dockerignore").is_file()


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (dev extra, Linux)")
def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_scripts_are_valid_bash() -> None:
    for script in ("local_head.sh", "submit.sh"):
        done = subprocess.run(["bash", "-n", str(ROOT / "cluster" / script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
