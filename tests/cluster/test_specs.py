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


def ray_resource(manifest: Path) -> dict[str, Any]:
    """The RayCluster / RayJob of a manifest (which also holds its ServiceAccount)."""
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    (doc,) = [d for d in docs if d["kind"] in {"RayCluster", "RayJob"}]
    return doc


@pytest.mark.parametrize("manifest", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_parse_and_use_the_image(manifest: Path) -> None:
    doc = ray_resource(manifest)
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


# --------------------------------------------------------------------------------------------------
# Complete specs: credentials, CHANGE ME markers, the tracking server, spot fleets, drivers
# --------------------------------------------------------------------------------------------------

RUNTIME_ENV = ROOT / "cluster" / "runtime_env.yaml"
LOCAL_RUNTIME_ENV = ROOT / "cluster" / "runtime_env.local.yaml"
MARKER = "CHANGE ME"
# Values a user has to replace: placeholders of the shipped specs (bucket, image registry, account ids,
# cloud project, machine image, tracking server).
PLACEHOLDER = re.compile(
    r"YOUR-|your-org|your-gcp-project|123456789012|ami-0123456789abcdef0|mlflow\.mlops\.svc|deeplearning-platform"
)
# The oldest NVIDIA driver branch for a CUDA version of the image (NVIDIA's CUDA toolkit release notes).
MIN_DRIVER_BRANCH = {"13.0": 580, "12.8": 570, "12.6": 560, "12.4": 550}


def _pairs(node: yaml.Node) -> Any:
    """(key node, value node) of every mapping entry in a composed YAML document."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield key, value
            yield from _pairs(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _pairs(item)


def unmarked_fields(text: str) -> tuple[list[str], set[str]]:
    """(fields with a placeholder value whose line lacks the marker, every field with a placeholder).

    A field's line is its key's line (for a block scalar: where it starts, the only place a comment can
    go). Inline YAML strings (a RayJob's runtimeEnvYAML) are checked the same way.
    """
    lines = text.splitlines()
    missing, fields = [], set()
    for doc in yaml.compose_all(text):
        for key, value in _pairs(doc) if doc is not None else ():
            if not isinstance(value, yaml.ScalarNode) or not isinstance(value.value, str):
                continue
            if key.value == "runtimeEnvYAML":
                inner_missing, inner_fields = unmarked_fields(value.value)
                missing += inner_missing
                fields |= inner_fields
            elif PLACEHOLDER.search(value.value):
                fields.add(key.value)
                if MARKER not in lines[key.start_mark.line]:
                    missing.append(f"line {key.start_mark.line + 1}: {key.value}: {value.value[:60]}")
    return missing, fields


@pytest.mark.parametrize("spec", [*LAUNCHER_SPECS, *KUBERAY, RUNTIME_ENV], ids=lambda p: p.name)
def test_every_field_a_user_must_change_is_marked(spec: Path) -> None:
    missing, fields = unmarked_fields(spec.read_text())
    assert not missing, f"{spec.name}: placeholders without '# {MARKER}':\n" + "\n".join(missing)
    expected = {
        "aws.yaml": {"image", "ImageId", "Arn"},
        "gcp.yaml": {"image", "project_id", "email", "sourceImage"},
        "raycluster.yaml": {"image", "value", "eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"},
        "rayjob.yaml": {"image", "entrypoint", "MLFLOW_TRACKING_URI", "eks.amazonaws.com/role-arn"},
        "runtime_env.yaml": {"MLFLOW_TRACKING_URI"},
    }[spec.name]
    assert expected <= fields, (
        expected - fields
    )  # the image, the bucket, its credentials, the tracking server


def test_an_unmarked_placeholder_is_caught() -> None:
    text = KUBERAY[0].read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("image:"))
    missing, _ = unmarked_fields(text.replace(line, line.split("#")[0], 1))
    assert len(missing) == 1
    assert "image" in missing[0]


def _pod_specs(manifest: Path) -> list[dict[str, Any]]:
    doc = ray_resource(manifest)
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def _commented_secret_env(text: str) -> list[dict[str, Any]]:
    """The commented-out alternative: env entries with a secretKeyRef, parsed as YAML once uncommented."""
    entries = re.findall(r"^\s*#\s*(- name: \w+)\n\s*#\s*(valueFrom: .*)$", text, flags=re.M)
    return [yaml.safe_load(f"{name}\n  {value_from}")[0] for name, value_from in entries]


@pytest.mark.parametrize("manifest", KUBERAY, ids=lambda p: p.name)
def test_kuberay_pods_carry_bucket_credentials(manifest: Path) -> None:
    """Every pod runs as a ServiceAccount annotated for IRSA (EKS) and Workload Identity (GKE); static keys
    from a Secret are the documented, commented-out alternative for head and workers."""
    accounts = [d for d in yaml.safe_load_all(manifest.read_text()) if d and d["kind"] == "ServiceAccount"]
    assert len(accounts) == 1
    account = accounts[0]["metadata"]
    assert account["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert account["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    pods = _pod_specs(manifest)
    assert [p.get("serviceAccountName") for p in pods] == [account["name"]] * len(pods)
    secret_env = _commented_secret_env(manifest.read_text())
    assert len(secret_env) >= 2 * len(pods)  # key id and secret, head and every worker group
    for entry in secret_env:
        ref = entry["valueFrom"]["secretKeyRef"]
        assert entry["name"] in {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert ref["key"] == entry["name"]
        assert ref["name"]
    docs = (ROOT / "docs" / "cluster.md").read_text()
    for topic in ("IRSA", "Workload Identity", "secretKeyRef", "GOOGLE_APPLICATION_CREDENTIALS"):
        assert topic in docs, topic


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_mlflow_tracking_uri_is_set_everywhere_jobs_run() -> None:
    """Runs on bucket storage need a tracking server (sqlite cannot live in a bucket): the shipped job
    environments set one, as a marked placeholder; the single-machine one does not need it."""
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    for container in (c for pod in _pod_specs(KUBERAY[0]) for c in pod["containers"]):
        assert _env(container)["MLFLOW_TRACKING_URI"].startswith("http"), container["name"]
    job = ray_resource(KUBERAY[1])["spec"]
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    local = yaml.safe_load(LOCAL_RUNTIME_ENV.read_text())
    assert "MLFLOW_TRACKING_URI" not in local["env_vars"]
    assert local["excludes"] == env["excludes"]
    assert local["env_vars"] == {k: v for k, v in env["env_vars"].items() if k != "MLFLOW_TRACKING_URI"}
    assert "tracking server" in (ROOT / "docs" / "cluster.md").read_text()


def test_submit_refuses_the_placeholder_tracking_uri() -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "cluster" / "submit.sh"), "--address", "http://127.0.0.1:9", "--", "pretrain"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
    )
    assert done.returncode == 2
    assert "MLFLOW_TRACKING_URI" in done.stderr
    assert "runtime_env.local.yaml" in done.stderr


def _is_spot(spec: Path) -> bool:
    """Spot/preemptible workers: AWS market type, GCP preemptible/SPOT scheduling, a spot node selector."""
    found = []
    for doc in yaml.compose_all(spec.read_text()):
        for key, value in _pairs(doc) if doc is not None else ():
            v = str(getattr(value, "value", "")).lower()
            found.append(
                (key.value == "MarketType" and v == "spot")
                or (key.value == "preemptible" and v == "true")
                or (key.value == "provisioningModel" and v == "spot")
                or ("capacitytype" in key.value.lower() and v == "spot")
                or (key.value == "cloud.google.com/gke-spot" and v == "true")
            )
    return any(found)


def test_spot_fleets_restart_without_limit() -> None:
    """Where the workers are spot/preemptible, the documented commands set train.max_failures (-1 or a
    positive number) explicitly: losing a node must not end the run."""
    from tests.doc_commands import commands_in_file, parse

    spot = [spec for spec in [*LAUNCHER_SPECS, *KUBERAY] if _is_spot(spec)]
    assert set(LAUNCHER_SPECS) <= set(spot)  # the launcher specs use spot/preemptible workers
    for spec in spot:
        runs = [c for c in commands_in_file(spec) if c.argv[:1] in (("pretrain",), ("tune",))]
        assert runs, spec.name
        for cmd in runs:
            assert any(a.startswith("train.max_failures=") for a in cmd.argv), cmd.where
            parsed = parse(cmd)
            assert not isinstance(parsed, str)
            assert parsed.config is not None
            failures = parsed.config.train.max_failures
            assert failures == -1 or failures > 0, cmd.where


def test_hosts_have_a_driver_for_the_images_cuda() -> None:
    """The machine images of the launcher specs and the docs ask for a driver that runs the image's CUDA."""
    pins = image_pins()
    branch = MIN_DRIVER_BRANCH[pins["cuda"]]
    gcp = LAUNCHER_SPECS[1].read_text()
    families = re.findall(r"sourceImage: \S+/family/(\S+)", gcp)
    assert families
    for family in families:
        driver = re.search(r"nvidia-(\d+)", family)
        assert driver is not None, family
        assert int(driver.group(1)) >= branch, family
    aws_image = next(ln for ln in LAUNCHER_SPECS[0].read_text().splitlines() if "ImageId:" in ln)
    assert f">= {branch}" in aws_image
    assert f"CUDA {pins['cuda']}" in aws_image
    docs = (ROOT / "docs" / "cluster.md").read_text()
    assert f"branch {branch} or newer" in docs
    row = next(ln for ln in docs.splitlines() if ln.startswith("| `docker/Dockerfile`"))
    for name in ("python", "ray", "torch", "cuda"):
        assert pins[name] in row, (name, row)
