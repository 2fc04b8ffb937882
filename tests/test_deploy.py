"""The Kubernetes manifests: valid against the API schemas offline, consistent, and with the server."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from autopipeline_server.cli import build_parser, serve_flags
from autopipeline_server.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
# The oldest release the manifests promise (kustomization.yaml) and the newest schemas available.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# Custom resources have no schema in kubernetes-validate; they are checked by hand below.
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}
# Flags of features still on their way; drop an entry once the CLI knows the flag.
STARTUP_BUDGET_S = 30 * 60


def load(name: str) -> dict[str, Any]:
    (document,) = [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]
    assert isinstance(document, dict)
    return document


def manifests() -> list[Path]:
    return sorted(path for path in DEPLOY.glob("*.yaml") if path.name != "kustomization.yaml")


def generated_config_maps() -> list[dict[str, Any]]:
    """The ConfigMaps kustomize's configMapGenerator would emit (before it appends the hash)."""
    made = []
    for generator in load("kustomization.yaml").get("configMapGenerator", []):
        files = {Path(entry).name: (DEPLOY / entry).read_text() for entry in generator["files"]}
        made.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": files}
        )
    return made


@pytest.fixture(scope="module")
def pod() -> dict[str, Any]:
    spec = load("deployment.yaml")["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod["containers"]
    assert isinstance(only, dict)
    return only


def container_flags(container: dict[str, Any]) -> list[str]:
    """The container's arguments, every one of which the CLI must know."""
    args = [str(arg) for arg in container["args"]]
    _, unknown = build_parser().parse_known_args(args)
    assert not unknown, f"the CLI does not know {unknown}"
    return args


@pytest.fixture(scope="module")
def settings(container: dict[str, Any]) -> Settings:
    """What the server in the pod would run with: config.toml, the container's env and flags, one chain."""
    args = build_parser().parse_args(container_flags(container))
    assert args.command == "serve"
    config_dir = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    assert Path(args.config).parent == Path(config_dir)
    (config_map,) = generated_config_maps()
    assert Path(args.config).name in config_map["data"]
    flags = serve_flags(args)
    environ = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return load_settings(flags, environ, config_file=DEPLOY / Path(args.config).name)


def test_every_file_in_the_kustomization_exists() -> None:
    kustomization = load("kustomization.yaml")
    listed = list(kustomization["resources"])
    for generator in kustomization.get("configMapGenerator", []):
        listed += generator["files"]
    assert listed
    for name in listed:
        assert (DEPLOY / name).is_file(), name
    # Everything on disk is either applied by default or a documented alternative to hpa.yaml.
    assert {path.name for path in manifests()} - set(listed) == {"keda-scaledobject.yaml"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_are_valid_kubernetes_objects(version: str) -> None:
    """Strict schema validation (unknown fields fail) of every manifest and the generated ConfigMap."""
    checked = []
    documents = [doc for path in manifests() for doc in yaml.safe_load_all(path.read_text()) if doc]
    for document in [*documents, *generated_config_maps()]:
        if (document["apiVersion"], document["kind"]) in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(document, version, strict=True)
        checked.append(document["kind"])
    expected = {"PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget", "ConfigMap"}
    assert expected | {"HorizontalPodAutoscaler"} <= set(checked)


def test_the_validator_rejects_a_broken_manifest() -> None:
    deployment = load("deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_one_gpu_per_replica(container: dict[str, Any]) -> None:
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_ports_agree_across_server_probes_and_service(settings: Settings, container: dict[str, Any]) -> None:
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["grpc"] == settings.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # Native gRPC probes call grpc.health.v1 on the serving port (named ports are not allowed there).
        assert container[probe]["grpc"]["port"] == settings.port, probe
        assert container[probe]["grpc"].get("service", "") == "", probe
    service = load("service.yaml")["spec"]
    (grpc_port,) = service["ports"]
    assert grpc_port["port"] == settings.port
    assert ports[grpc_port["targetPort"]] == settings.port


def test_startup_probe_allows_loading_and_compiling(container: dict[str, Any]) -> None:
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= STARTUP_BUDGET_S


def test_termination_grace_covers_prestop_and_the_servers_drain(
    settings: Settings, container: dict[str, Any], pod: dict[str, Any]
) -> None:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    # The drain takes `grace`, then the server's final stop one more second.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.grace + 1


def test_metrics_port_matches_the_scrape_annotations(container: dict[str, Any]) -> None:
    args = [str(arg) for arg in container["args"]]
    metrics_port = int(args[args.index("--metrics-port") + 1])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["metrics"] == metrics_port
    annotations = load("deployment.yaml")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)


def test_headless_service_and_budget_select_the_pods() -> None:
    deployment = load("deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = load("service.yaml")["spec"]
    assert service["clusterIP"] == "None"
    assert service["selector"].items() <= labels.items()
    assert load("pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_autoscalers_target_the_deployment_on_queue_depth() -> None:
    deployment = load("deployment.yaml")
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    hpa = load("hpa.yaml")["spec"]
    keda = load("keda-scaledobject.yaml")["spec"]
    for target in (hpa["scaleTargetRef"], keda["scaleTargetRef"]):
        assert target["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "autopipeline_queue_depth"
    (trigger,) = keda["triggers"]
    assert trigger["type"] == "prometheus"
    assert re.search(rf"\b{name}\b", trigger["metadata"]["query"])
    assert float(trigger["metadata"]["threshold"]) > 0
    assert hpa["minReplicas"] == keda["minReplicaCount"] >= 2


def test_caches_live_on_the_read_write_volume(container: dict[str, Any], pod: dict[str, Any]) -> None:
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    cache = mounts["cache"]
    assert not cache.get("readOnly", False)
    env = {e["name"]: e.get("value") for e in container["env"]}
    for variable in ("HF_HOME", "TORCHINDUCTOR_CACHE_DIR"):
        assert Path(cache["mountPath"]) in Path(env[variable]).parents, variable
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    claim = volumes["cache"]["persistentVolumeClaim"]["claimName"]
    assert claim == load("pvc.yaml")["metadata"]["name"]


def test_runs_as_the_images_non_root_user(container: dict[str, Any], pod: dict[str, Any]) -> None:
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = re.search(r"useradd .*--uid (\d+)", dockerfile)
    assert uid and context["runAsUser"] == int(uid.group(1)) != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # The read-only root needs writable scratch space wherever libraries write.
    writable = {Path(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")}
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert {Path("/tmp"), Path("/var/cache/autopipeline")} <= writable


def test_container_args_are_a_valid_serve_command(container: dict[str, Any]) -> None:
    args = container_flags(container)
    assert build_parser().parse_args(args).command == "serve", shlex.join(args)
