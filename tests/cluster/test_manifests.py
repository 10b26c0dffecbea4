"""Every cluster file parses and has what its kind requires; every entrypoint names a module that exists
and a config file that loads into that job's typed config."""

import importlib
import importlib.util
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHERS = sorted(CLUSTER.glob("*.yaml"))
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def load(path):
    return yaml.safe_load(path.read_text())


def check_entrypoint(command: str) -> None:
    """``python -m pipelines.<job> [stage] --config <file> ...``: the module imports, the config loads."""
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"], command
    module = words[2]
    assert importlib.util.find_spec(module) is not None, f"{module} does not exist"
    if "--config" in words:
        config = ROOT / words[words.index("--config") + 1]
        assert config.is_file(), f"{config} does not exist"
        job = importlib.import_module(module)
        with pytest.raises(SystemExit) as exit_info:  # the job's own parser loads and validates the config
            job.main([*words[3 : words.index("--config")], "--config", str(config), "--print-config"])
        assert exit_info.value.code == 0, command




def check_pod_template(template: dict, gpu: bool) -> None:
    container = template["spec"]["containers"][0]
    assert container["image"] and container["name"]
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    assert "/dev/shm" in mounts, "Ray's object store needs a large /dev/shm"
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    shm = next(v for v in volumes.values() if v.get("emptyDir", {}).get("medium") == "Memory")
    assert shm
    if gpu:
        assert "nvidia.com/gpu" in container["resources"]["limits"]


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"].startswith("2.")
    check_pod_template(spec["headGroupSpec"]["template"], gpu=False)
    groups = spec["workerGroupSpecs"]
    assert groups, "no worker group"
    gpu_groups = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        check_pod_template(group["template"], gpu=True)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_configs(path):
    config = load(path)
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "docker"):
        assert key in config, key
    assert config["provider"]["type"] in ("aws", "gcp")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers)
    assert any("--shm-size" in option for option in config["docker"]["run_options"])
    machine = {"aws": "InstanceType", "gcp": "machineType"}[config["provider"]["type"]]
    assert all(machine in t["node_config"] for t in types.values())


def test_launchers_cover_aws_and_gcp():
    assert {load(p)["provider"]["type"] for p in LAUNCHERS} == {"aws", "gcp"}


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests(path):
    manifest = load(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    kind, spec = manifest["kind"], manifest["spec"]
    assert manifest["metadata"]["name"]
    if kind == "RayCluster":
        check_ray_cluster_spec(spec)
    elif kind == "RayJob":
        check_ray_cluster_spec(spec["rayClusterSpec"])
        check_entrypoint(spec["entrypoint"])
    elif kind == "RayService":
        check_ray_cluster_spec(spec["rayClusterConfig"])
        serve = yaml.safe_load(spec["serveConfigV2"])
        assert serve["applications"], "serveConfigV2 has no application"
        for app in serve["applications"]:
            module = app["import_path"].rsplit(":", 1)[0].rsplit(".", 1)[0] if ":" not in app["import_path"] \
                else app["import_path"].split(":")[0]
            assert importlib.util.find_spec(module) is not None, app["import_path"]
    else:
        pytest.fail(f"unexpected kind {kind}")


def test_kuberay_has_a_cluster_a_service_and_a_job_per_stage():
    kinds = [load(p)["kind"] for p in KUBERAY]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayService") == 1
    entrypoints = " ".join(load(p)["spec"]["entrypoint"] for p in KUBERAY if load(p)["kind"] == "RayJob")
    for job in ("pipelines.capfilt", "pipelines.train stage1", "pipelines.train stage2", "pipelines.train instruct"):
        assert job in entrypoints


def test_rayservice_serves_the_projects_serve_config():
    service = next(load(p) for p in KUBERAY if load(p)["kind"] == "RayService")
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == load(ROOT / "pipelines" / "configs" / "serve_deploy.yaml")


def test_every_node_runs_serve_as_blip2_serve_does():
    """The image every manifest runs sets Serve's environment (throughput mode) as `blip2 serve` sets it."""
    from pipelines.common import SERVE_ENVIRONMENT

    env = {}
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if line.startswith("ENV "):
            env.update(word.split("=", 1) for word in shlex.split(line[4:]))
    assert {name: env.get(name) for name in SERVE_ENVIRONMENT} == SERVE_ENVIRONMENT
    images = {load(p)["docker"]["image"] for p in LAUNCHERS}
    images |= {line.split("image:", 1)[1].split("#")[0].strip().strip('"') for p in KUBERAY
               for line in p.read_text().splitlines() if line.strip().startswith("image:")}
    assert images == {"<registry>/blip2-ray:latest"}, images
