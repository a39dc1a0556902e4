"""GPU host deployment, checked offline: compose.yaml and the kustomize overlays parse, render and agree
with the model repository, the CLIs and each other; the first-run bootstrap and the plan store run
against a real MLflow server. No Docker engine, GPU or cluster is needed (nor used).

Each checker returns a list of problems; the tests run it on the real files (no problem) and on broken
copies (the problem is named), so no check passes by finding nothing to check.
"""

import copy
import functools
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.server.security_utils import is_allowed_host_header

from fashionserve.checkpoints import sha256_file
from fashionserve.client import DEFAULT_URLS
from fashionserve.mlflow_server import MlflowServer
from fashionserve.plans import HEAVY_NETWORKS, Gpu, plan_file_name, record_plan
from fashionserve.registry import RANDOM_INIT, RegistryError, bundle_digest, connect, download_bundle
from fashionserve.repository import PRECISIONS, TRACKED_REPOSITORY, ensemble_steps, read_config
from fashionserve.sync import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    PLAN_STORE_INDEX,
    _stage,
    plan_store_dir,
    publish_plans,
)
from tests.conftest import PROJECT_ROOT, run_cli

COMPOSE_FILE = PROJECT_ROOT / "compose.yaml"
ENV_EXAMPLE = PROJECT_ROOT / ".env.example"
OVERLAYS = ("local", "production")
SECRET_NAME = "fashionserve-credentials"
ADMIN_KEY_SECRET = "triton-admin-key"  # key in the Secret fashionserve-credentials
SECRET_KEYS = {"postgres-password", "minio-root-password", ADMIN_KEY_SECRET}
GPU_SERVICES = ("triton", "plan-builder")
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
SERVED_MODEL = "tryon"
QUEUE_METRIC = "nv_inference_queue_duration_us"
SMALL_EXPORT = ["--condition-resolution", "128x96", "--condition-ngf", "8", "--image-ngf", "8"]
SMALL_EXPORT += ["--spade-hidden", "16"]
_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
_MODEL_ENDPOINT = re.compile(r"^/v2/models/([\w-]+)/ready$")
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
MIN_SYNC_GRACE_S = 120
TRITON_CLIENT_LABEL = "fashionserve.io/triton-client"
K8S_PODS = [
    ("Deployment", "mlflow"), ("Deployment", "triton"), ("StatefulSet", "postgres"), ("StatefulSet", "minio"),
    ("Job", "bootstrap"), ("Job", "minio-bucket"), ("Deployment", "web"),
]  # fmt: skip
# compose: who may share a network with whom (a shared network is the only way in)
COMPOSE_TOOLS = {"bootstrap", "plan-builder", "sync"}
COMPOSE_PEERS = {
    "mlflow": {*COMPOSE_TOOLS, "postgres", "minio", "minio-init"},
    "postgres": {"mlflow", "minio", "minio-init"},
    "minio": {"mlflow", "postgres", "minio-init"},
    "triton": {"sync", "web"},  # web: inference only (the control API wants the admin key)
}


# ---------------------------------------------------------------------------------------------------
# Shared helpers


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}; `$$` is a literal `$`."""

    def value(match: re.Match) -> str:
        name, operator, default = match.groups()
        if env.get(name):
            return env[name]
        return default if operator in (":-", "-") else ""

    return _VARIABLE.sub(value, text).replace("$$", "$")


def load_compose(text: str, env: dict[str, str]) -> dict:
    """compose.yaml as compose reads it: parsed first, then every string interpolated."""

    def walk(node):
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return interpolate(node, env) if isinstance(node, str) else node

    return walk(yaml.safe_load(text))


def model_names() -> set[str]:
    return {path.parent.name for path in TRACKED_REPOSITORY.glob("*/config.pbtxt")}


def image_problems(image: str, where: str) -> list[str]:
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return [f"{where}: image {image} has no tag"]
    if tag == "latest":
        return [f"{where}: image {image} uses the moving tag latest"]
    return []


def flag(args: list[str], name: str) -> str | None:
    """Value of `--name=value` in a command line; the last one wins, as in argparse."""
    return next((arg.split("=", 1)[1] for arg in reversed(args) if arg.startswith(f"--{name}=")), None)


def flags(args: list[str], name: str) -> list[str]:
    """Every value of a repeated `--name=value` option (argparse's append), in order."""
    return [arg.split("=", 1)[1] for arg in args if arg.startswith(f"--{name}=")]


def registered_by_bootstrap(command: list[str]) -> list[str]:
    """The registered models deploy/bootstrap.py gives a promoted version when run as `command`."""
    bootstrap = load_script("deploy/bootstrap.py")
    return [*(bootstrap.CATALOGUE_MODELS if "--catalogue" in command else ()), bootstrap.MODEL]


def served_models_problems(
    bootstrap: list[str], sync: list[str], plan_builder: list[str], where: str
) -> list[str]:
    """Sync serves every model the bootstrap registers (each one in model_repository/), and the plan
    builder builds plans for exactly the models sync serves."""
    served = flags(sync, "model") or ["tryon"]  # sync's default
    problems = [
        f"{where}: sync serves {model}, which is not in model_repository/"
        for model in served
        if model not in model_names()
    ]
    problems += [
        f"{where}: sync does not serve {model}, which bootstrap registers"
        for model in registered_by_bootstrap(bootstrap)
        if model not in served
    ]
    built = flags(plan_builder, "model") or ["tryon"]
    problems += [
        f"{where}: plan-builder does not build for {m}, which sync serves" for m in served if m not in built
    ]
    problems += [
        f"{where}: plan-builder builds for {m}, which sync does not serve" for m in built if m not in served
    ]
    return problems


def probe_problems(path: str, where: str) -> list[str]:
    """A probe must ask a real Triton endpoint: server health or a served model's readiness."""
    if path in ("/v2/health/live", "/v2/health/ready"):
        return []
    model = _MODEL_ENDPOINT.match(path)
    if model and model.group(1) in model_names():
        return []
    return [f"{where}: probe path {path} is not a Triton health endpoint of a model in model_repository/"]


# ---------------------------------------------------------------------------------------------------
# compose.yaml


def compose_problems(compose_text: str, env_example: dict[str, str]) -> list[str]:
    """Everything compose.yaml names resolves, and the GPU stack is wired as documented."""
    problems = []
    for name, operator, default in _VARIABLE.findall(compose_text):
        if name not in env_example:
            problems.append(f"${{{name}}} is not in .env.example")
        elif operator == ":-" and env_example[name] != default:
            problems.append(
                f"${{{name}}} defaults to {default!r} but .env.example says {env_example[name]!r}"
            )
        elif operator not in (":-", ":?"):
            problems.append(f"${{{name}}} has neither a default (:-) nor a required message (:?)")
    used = {name for name, _, _ in _VARIABLE.findall(compose_text)}
    problems += [
        f".env.example sets {name}, which compose.yaml never uses" for name in env_example if name not in used
    ]

    values = {**env_example, **{k: "x" for k, v in env_example.items() if not v}}  # required: any value
    compose = load_compose(compose_text, values)
    services = compose.get("services", {})
    declared_volumes = set(compose.get("volumes") or {})
    used_volumes = set()
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            target = services.get(dependency)
            if target is None:
                problems.append(f"{name} depends on {dependency}, which is not a service")
            elif condition["condition"] == "service_healthy" and "healthcheck" not in target:
                problems.append(f"{name} waits for {dependency} to be healthy, but it has no healthcheck")
            elif condition["condition"] == "service_completed_successfully" and target.get("restart") != "no":
                problems.append(f"{name} waits for {dependency} to complete, but {dependency} restarts")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                used_volumes.add(source)
                if source not in declared_volumes:
                    problems.append(f"{name} mounts volume {source}, which is not declared")
        for port in service.get("ports", []):
            if not port.startswith(f"{values['BIND_ADDRESS']}:"):
                problems.append(f"{name} publishes {port} on another address than BIND_ADDRESS")
        if "image" not in service:
            problems.append(f"{name} has no image name")
        else:
            problems += image_problems(service["image"], name)
    problems += [f"volume {v} is declared but never mounted" for v in declared_volumes - used_volumes]

    for name in GPU_SERVICES:
        devices = services.get(name, {}).get("deploy", {}).get("resources", {}).get("reservations", {})
        if not any("gpu" in d.get("capabilities", []) for d in devices.get("devices", [])):
            problems.append(f"{name} reserves no GPU")
    triton = services.get("triton", {})
    release = triton.get("image", "").rpartition(":")[2].removesuffix("-py3")
    plans_release = services.get("plan-builder", {}).get("build", {}).get("args", {}).get("NGC_RELEASE")
    if release != plans_release:
        problems.append(f"Triton is release {release}, the plan builder's TensorRT {plans_release}")
    command = triton.get("command", [])
    if "--model-control-mode=explicit" not in command:
        problems.append("Triton does not run in explicit model-control mode")
    if not triton.get("shm_size"):
        problems.append("Triton has no shm_size for the python backend")
    for port_name, port in TRITON_PORTS.items():
        if flag(command, f"{port_name}-port") != str(port):
            problems.append(f"Triton's {port_name} port is not {port}")
        published = [p for p in triton.get("ports", []) if p.endswith(f":{port}")]
        if [p.split(":")[1] for p in published] != [str(port)]:
            problems.append(f"Triton's {port_name} port {port} is not published as {port} by default")
    probe = re.search(r"127\.0\.0\.1:8000(/[\w/]+)", " ".join(triton.get("healthcheck", {}).get("test", [])))
    if probe is None:
        problems.append("the triton healthcheck does not ask Triton's HTTP port")
    else:
        problems += probe_problems(probe.group(1), "triton healthcheck")

    sync = services.get("sync", {}).get("command", [])
    if flag(sync, "triton-url") != f"triton:{TRITON_PORTS['http']}":
        problems.append("sync does not talk to Triton's HTTP port")
    plan_builder = services.get("plan-builder", {})
    plan_builder_args = (plan_builder.get("entrypoint") or []) + (plan_builder.get("command") or [])
    bootstrap = services.get("bootstrap", {}).get("command", [])
    problems += served_models_problems(bootstrap, sync, plan_builder_args, "compose")
    for name, args in [("sync", sync), ("plan-builder", plan_builder_args)]:
        if flag(args, "variant") not in PRECISIONS:
            problems.append(f"{name} serves variant {flag(args, 'variant')}, not one of {PRECISIONS}")
    problems += compose_isolation_problems(compose, values)
    sync_volumes = services.get("sync", {}).get("volumes", [])
    for volume, folder in (("models", "repository"), ("plans", "plans")):
        mounts = {
            v.split(":")[1] for s in ("sync", "triton" if volume == "models" else "plan-builder")
            for v in services.get(s, {}).get("volumes", []) if v.split(":")[0] == volume
        }  # fmt: skip
        if len(mounts) != 1 or flag(sync, folder) not in mounts:
            problems.append(f"sync's --{folder} is not where the {volume} volume is mounted ({sync_volumes})")
    return problems + compose_web_problems(services)


def compose_web_problems(services: dict) -> list[str]:
    """The web app talks to Triton's gRPC port and nothing else (the live versions come from Triton: no
    MLflow, no models volume), and its port, published port and healthcheck agree."""
    web = services.get("web", {})
    command = web.get("command", [])
    problems = (
        [] if command[:3] == ["python", "-m", "web"] else ["the web service does not run python -m web"]
    )
    if flag(command, "triton") != f"triton:{TRITON_PORTS['grpc']}":
        problems.append(f"web talks to Triton at {flag(command, 'triton')}, not its gRPC port")
    if "triton" not in web.get("depends_on", {}):
        problems.append("web does not wait for triton")
    if web.get("volumes"):
        problems.append(
            f"web mounts {web['volumes']}: it needs no volume (the live versions come from Triton)"
        )
    if flag(command, "mlflow-uri") is not None or "MLFLOW_TRACKING_URI" in (web.get("environment") or {}):
        problems.append("web reads MLflow, which answers the tools only: its status comes from Triton")
    port = flag(command, "port")
    if not any(p.endswith(f":{port}") for p in web.get("ports", [])):
        problems.append(f"web listens on {port}, which is not published")
    if f"127.0.0.1:{port}/healthz" not in " ".join(web.get("healthcheck", {}).get("test", [])):
        problems.append("the web healthcheck does not ask /healthz on its port")
    return problems


def restricted_api_problems(command: list[str], key: str, where: str) -> list[str]:
    """Triton's control APIs (HTTP and gRPC) answer only requests carrying ADMIN_HEADER = `key`."""
    problems = []
    for option in ("http-restricted-api", "grpc-restricted-protocol"):
        value = flag(command, option)
        if value is None:
            problems.append(f"{where}: Triton runs without --{option}: any client can load and unload models")
            continue
        apis, _, header = value.partition(":")
        missing = set(RESTRICTED_APIS) - set(apis.split(","))
        if missing:
            problems.append(f"{where}: --{option} leaves {', '.join(sorted(missing))} open")
        if header != f"{ADMIN_HEADER}={key}":
            problems.append(
                f"{where}: --{option} does not expect the header {ADMIN_HEADER} with the admin key"
            )
    return problems


def _grace_seconds(value: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", value))


def compose_isolation_problems(compose: dict, values: dict[str, str]) -> list[str]:
    """Only the tools share a network with MLflow, only MLflow (and the bucket job) with its stores; the
    registry networks are internal; Triton's control API needs the admin key, which sync sends; sync may
    roll a swap back before it is killed."""
    problems = []
    services = compose.get("services", {})
    declared = compose.get("networks") or {}
    networks = {name: set(service.get("networks") or ["default"]) for name, service in services.items()}

    def peers(name: str) -> set[str]:
        return {
            other for other, nets in networks.items() if other != name and nets & networks.get(name, set())
        }

    for name, allowed in COMPOSE_PEERS.items():
        for other in sorted(peers(name) - allowed):
            problems.append(f"{other} can reach {name}: it shares a network with it")
    for network in ("store", "registry"):
        if not (declared.get(network) or {}).get("internal"):
            problems.append(f"network {network} is not internal")
    for name, service in services.items():
        if service.get("ports") and all((declared.get(n) or {}).get("internal") for n in networks[name]):
            problems.append(f"{name} publishes ports but is only on internal networks (they publish none)")
    key = values["TRITON_ADMIN_KEY"]
    problems += restricted_api_problems(services.get("triton", {}).get("command", []), key, "compose triton")
    sync = services.get("sync", {})
    if (sync.get("environment") or {}).get(ADMIN_KEY_ENV) != key:
        problems.append(f"sync does not get the admin key as {ADMIN_KEY_ENV}")
    if _grace_seconds(str(sync.get("stop_grace_period", "0s"))) < MIN_SYNC_GRACE_S:
        problems.append(f"sync's stop_grace_period is under {MIN_SYNC_GRACE_S} s: a swap cannot roll back")
    return problems


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


def test_compose_parses_and_every_reference_resolves(env_example):
    assert compose_problems(COMPOSE_FILE.read_text(), env_example) == []


def test_no_secret_is_committed(env_example):
    secrets = ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "TRITON_ADMIN_KEY")
    assert [env_example[name] for name in secrets] == ["", "", ""]
    for name in secrets:
        assert f"${{{name}:?" in COMPOSE_FILE.read_text()  # required: compose refuses to start without it
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".env"], cwd=PROJECT_ROOT, check=False, capture_output=True
    )
    assert ignored.returncode == 0, ".env must be git-ignored"


BROKEN_COMPOSE = {
    "unknown dependency": (
        (
            "condition: service_healthy\n",
            "condition: service_healthy\n      nosuch:\n        condition: service_started\n",
        ),
        "depends on nosuch, which is not a service",
    ),
    "undeclared volume": (
        ("- bundles:/bundles", "- scratch:/bundles"),
        "mounts volume scratch, which is not declared",
    ),
    "port on all interfaces": (
        ('"${BIND_ADDRESS:-127.0.0.1}:${MLFLOW_PORT:-5000}:5000"', '"0.0.0.0:5000:5000"'),
        "publishes 0.0.0.0:5000:5000 on another address",
    ),
    "latest tag": (
        ("tritonserver:${NGC_RELEASE:-26.07}-py3", "tritonserver:latest"),
        "uses the moving tag latest",
    ),
    "variable nobody sets": (
        ("--interval=${SYNC_INTERVAL:-10}", "--interval=${SYNC_EVERY}"),
        "${SYNC_EVERY} is not in",
    ),
    "default differs from .env.example": (
        ("${TRITON_SHM_SIZE:-1g}", "${TRITON_SHM_SIZE:-2g}"),
        "defaults to '2g'",
    ),
    "Triton without GPU": (
        ("    deploy: *gpu\n    restart: unless-stopped", "    restart: unless-stopped"),
        "triton reserves no GPU",
    ),
    "mismatched TensorRT": (
        ("NGC_RELEASE: ${NGC_RELEASE:-26.07}", "NGC_RELEASE: 26.02"),
        "the plan builder's TensorRT 26.02",
    ),
    "poll mode": (("--model-control-mode=explicit", "--model-control-mode=poll"), "explicit model-control"),
    "wrong health path": (
        ("/v2/health/ready', timeout", "/v2/health/up', timeout"),
        "probe path /v2/health/up",
    ),
    "sync on gRPC": (
        ("--triton-url=triton:8000", "--triton-url=triton:8001"),
        "sync does not talk to Triton's HTTP",
    ),
    "unknown model": (
        (
            "--interval=${SYNC_INTERVAL:-10}\n      - --model=tryon\n",
            "--interval=${SYNC_INTERVAL:-10}\n      - --model=tryon_v2\n",
        ),
        "sync serves tryon_v2",
    ),
    "sync forgets the catalogue": (
        ("      - --model=garment_classifier  # the shipped catalogue models (bootstrap --catalogue)\n", ""),
        "compose: sync does not serve garment_classifier, which bootstrap registers",
    ),
    "plan builder forgets the catalogue": (
        ("      - --model=fashion_generator\n", ""),  # the first: plan-builder's
        "compose: plan-builder does not build for fashion_generator, which sync serves",
    ),
    "web on Triton's HTTP port": (("--triton=triton:8001", "--triton=triton:8000"), "not its gRPC port"),
    "web reads MLflow": (
        (
            "      - --triton=triton:8001\n",
            "      - --triton=triton:8001\n      - --mlflow-uri=http://mlflow:5000\n",
        ),
        "web reads MLflow",
    ),
    "web mounts the models": (
        (
            '    ports:\n      - "${BIND_ADDRESS:-127.0.0.1}:${WEB_PORT',
            '    volumes: [models:/models:ro]\n    ports:\n      - "${BIND_ADDRESS:-127.0.0.1}:${WEB_PORT',
        ),
        "web mounts ['models:/models:ro']",
    ),
    "web port not published": (("${WEB_PORT:-8080}:8080", "${WEB_PORT:-8080}:8081"), "web listens on 8080"),
    "plans elsewhere": (
        ("--plans=/plans\n      - --repository", "--plans=/cache\n      - --repository"),
        "sync's --plans",
    ),
    "Triton on the registry network": (
        ("    networks: [serving]\n", "    networks: [serving, registry]\n"),
        "triton can reach mlflow",
    ),
    "Postgres on the registry network": (
        ("    networks: [store]\n    healthcheck", "    networks: [store, registry]\n    healthcheck"),
        "can reach postgres",
    ),
    "registry network with a way out": (
        ("  registry:\n    internal: true\n", "  registry:\n"),
        "network registry is not internal",
    ),
    "MLflow only on internal networks": (
        ("    networks: [store, registry, published]", "    networks: [store, registry]"),
        "mlflow publishes ports but is only on internal networks",
    ),
    "control API open": (
        ("      - --http-restricted-api=", "      - --http-restricted-api-off="),
        "without --http-restricted-api",
    ),
    "control API not restricted over gRPC": (
        ("--grpc-restricted-protocol=model-repository,", "--grpc-restricted-protocol="),
        "--grpc-restricted-protocol leaves model-repository open",
    ),
    "sync without the admin key": (
        ("      TRITON_ADMIN_KEY: ${TRITON_ADMIN_KEY", "      OTHER_KEY: ${TRITON_ADMIN_KEY"),
        "sync does not get the admin key",
    ),
    "sync killed before it can roll back": (
        ("    stop_grace_period: 5m\n", "    stop_grace_period: 10s\n"),
        "stop_grace_period is under",
    ),
}


@pytest.mark.parametrize("case", BROKEN_COMPOSE, ids=list(BROKEN_COMPOSE))
def test_compose_checker_names_what_a_broken_copy_breaks(case, env_example):
    (old, new), expected = BROKEN_COMPOSE[case]
    text = COMPOSE_FILE.read_text()
    assert old in text
    problems = compose_problems(text.replace(old, new, 1), env_example)
    assert any(expected in problem for problem in problems), problems


def test_compose_ports_are_the_client_and_launcher_defaults(env_example):
    published = {name: int(env_example[f"TRITON_{name.upper()}_PORT"]) for name in TRITON_PORTS}
    assert published == TRITON_PORTS
    assert {p: int(url.rsplit(":", 1)[1]) for p, url in DEFAULT_URLS.items()} == {
        "http": TRITON_PORTS["http"],
        "grpc": TRITON_PORTS["grpc"],
    }
    assert env_example["BIND_ADDRESS"] == "127.0.0.1"


# ---------------------------------------------------------------------------------------------------
# Kubernetes


def render(overlay: str) -> list[dict]:
    """The overlay's manifests as `kubectl kustomize` renders them (fresh objects on every call)."""
    return [doc for doc in yaml.safe_load_all(_kustomize(overlay)) if doc]


@functools.cache
def _kustomize(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: it renders k8s/ (kubectl kustomize); CI has it")
    result = subprocess.run(
        [kubectl, "kustomize", str(PROJECT_ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def find(docs: list[dict], kind: str, name: str) -> dict:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), {})


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
    ]


def k8s_problems(docs: list[dict]) -> list[str]:
    problems = []
    kinds = {d["kind"] for d in docs}
    if "Secret" in kinds:
        problems.append("a Secret is inlined; create fashionserve-credentials outside the repository")
    config_map = find(docs, "ConfigMap", "fashionserve-settings").get("data", {})
    for where, spec in pod_specs(docs):
        claims = {c["metadata"]["name"] for d in docs if f"{d['kind']}/{d['metadata']['name']}" == where
                  for c in d["spec"].get("volumeClaimTemplates", [])}  # fmt: skip
        volumes = {v["name"] for v in spec.get("volumes", [])} | claims
        for container in spec.get("initContainers", []) + spec["containers"]:
            at = f"{where} container {container['name']}"
            problems += image_problems(container["image"], at)
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(container.get("resources", {}).get(kind, {}))
                if missing:
                    problems.append(f"{at} has no {kind} for {', '.join(sorted(missing))}")
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(f"{at} mounts {mount['name']}, which the pod does not declare")
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                if (
                    any(word in env["name"] for word in ("PASSWORD", "SECRET"))
                    and "secretKeyRef" not in source
                ):
                    problems.append(f"{at} sets {env['name']} from something else than a Secret")
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    if ref["name"] != SECRET_NAME or ref["key"] not in SECRET_KEYS:
                        problems.append(f"{at} reads {ref['name']}/{ref['key']}, not a documented key")
                if "configMapKeyRef" in source and source["configMapKeyRef"]["key"] not in config_map:
                    problems.append(
                        f"{at} reads setting {source['configMapKeyRef']['key']}, which is not set"
                    )
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                path = container.get(probe, {}).get("httpGet", {}).get("path")
                if path and path.startswith("/v2/"):
                    problems += probe_problems(path, f"{at} {probe}")

    triton = find(docs, "Deployment", "triton")
    spec = triton.get("spec", {}).get("template", {}).get("spec", {})
    containers = {c["name"]: c for c in spec.get("containers", []) + spec.get("initContainers", [])}
    server = containers.get("triton", {})
    for name in ("triton", "plan-builder"):
        if containers.get(name, {}).get("resources", {}).get("limits", {}).get("nvidia.com/gpu") != 1:
            problems.append(f"triton pod: {name} has no nvidia.com/gpu limit of 1")
    if not any(c["name"] == "plan-builder" for c in spec.get("initContainers", [])):
        problems.append("triton pod: plans are not built by an init step")
    ports = {p["name"]: p["containerPort"] for p in server.get("ports", [])}
    if ports != TRITON_PORTS:
        problems.append(f"triton container ports {ports} are not {TRITON_PORTS}")
    for port_name, port in TRITON_PORTS.items():
        if flag(server.get("command", []), f"{port_name}-port") != str(port):
            problems.append(f"tritonserver's {port_name} port is not {port}")
    if "--model-control-mode=explicit" not in server.get("command", []):
        problems.append("tritonserver does not run in explicit model-control mode")
    expected = {"livenessProbe": "/v2/health/live", "readinessProbe": f"/v2/models/{SERVED_MODEL}/ready"}
    for probe, path in {**expected, "startupProbe": "/v2/health/"}.items():
        get = server.get(probe, {}).get("httpGet", {})
        if (
            not str(get.get("path", "")).startswith(path)
            or ports.get(get.get("port")) != TRITON_PORTS["http"]
        ):
            problems.append(f"triton {probe} does not ask {path} on the HTTP port: {get}")
    sync = containers.get("sync", {}).get("command", [])
    if flag(sync, "triton-url") != f"127.0.0.1:{TRITON_PORTS['http']}":
        problems.append("the sync sidecar does not talk to Triton's HTTP port")
    jobs = dict(pod_specs(docs))
    bootstrap = [c for c in jobs.get("Job/bootstrap", {}).get("containers", []) if c["name"] == "bootstrap"]
    plan_builder = containers.get("plan-builder", {}).get("command", [])
    problems += served_models_problems(
        bootstrap[0]["command"] if bootstrap else [], sync, plan_builder, "k8s"
    )
    mounts = {
        name: {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])} for name, c in containers.items()
    }
    repository = flag(server.get("command", []), "model-repository")
    if not flag(sync, "repository") == mounts.get("sync", {}).get("models") == repository:
        problems.append("the sync sidecar does not write the model repository Triton serves")
    if (
        not flag(sync, "plans")
        == mounts.get("sync", {}).get("plans")
        == mounts.get("plan-builder", {}).get("plans")
    ):
        problems.append("the sync sidecar does not read the plan store the init step writes")
    if "nvidia.com/gpu" not in json.dumps(spec.get("tolerations", [])):
        problems.append("triton pod does not tolerate GPU node taints")

    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    served = {
        p["port"]: p["targetPort"]
        for s in ("triton", "triton-metrics")
        for p in services.get(s, {}).get("spec", {}).get("ports", [])
    }
    if {port: ports.get(target) for port, target in served.items()} != {v: v for v in TRITON_PORTS.values()}:
        problems.append(f"the triton Services expose {served}, not HTTP, gRPC and metrics")

    problems += k8s_isolation_problems(docs)
    problems += k8s_web_problems(docs, services, served)

    hpa = next((d for d in docs if d["kind"] == "HorizontalPodAutoscaler"), {})
    if hpa.get("apiVersion") != "autoscaling/v2":
        problems.append(f"the HPA is {hpa.get('apiVersion')}, not autoscaling/v2")
    target = hpa.get("spec", {}).get("scaleTargetRef", {})
    if (target.get("kind"), target.get("name")) != ("Deployment", "triton"):
        problems.append("the HPA does not scale the triton Deployment")
    metrics = hpa.get("spec", {}).get("metrics", [])
    if [m.get("pods", {}).get("metric", {}).get("name") for m in metrics] != [adapter_metric_name()]:
        problems.append("the HPA does not scale on the Prometheus adapter's Triton queue-time metric")
    return problems


def _matches(selector: dict, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels only: the policies here use nothing else) against labels."""
    if set(selector) - {"matchLabels"}:
        raise AssertionError(f"selector {selector} uses more than matchLabels; teach admits() about it")
    return selector.get("matchLabels", {}).items() <= labels.items()


def admits(
    docs: list[dict], target: dict[str, str], port: int, source: dict[str, str], elsewhere: bool
) -> bool:
    """Whether the NetworkPolicies let a pod labelled `source` (in another namespace when `elsewhere`)
    connect to `port` of a pod of this namespace labelled `target`, as Kubernetes evaluates them."""
    policies = [
        d["spec"] for d in docs
        if d["kind"] == "NetworkPolicy" and "Ingress" in d["spec"].get("policyTypes", ["Ingress"])
        and _matches(d["spec"]["podSelector"], target)
    ]  # fmt: skip
    if not policies:
        return True

    def peer_admits(peer: dict) -> bool:
        if "ipBlock" in peer:
            return True  # an address range lets in pods of every label
        if "namespaceSelector" not in peer and elsewhere:
            return False  # a bare podSelector means this namespace
        namespace_ok = "namespaceSelector" not in peer or _matches(peer["namespaceSelector"], {})
        return namespace_ok and _matches(peer.get("podSelector", {}), source)

    return any(
        (not rule.get("from") or any(peer_admits(peer) for peer in rule["from"]))
        and (not rule.get("ports") or any(p.get("port") == port for p in rule["ports"]))
        for policy in policies
        for rule in policy.get("ingress", [])
    )


def egress_admits(docs: list[dict], source: dict[str, str], target: dict[str, str], port: int) -> bool:
    """Whether the NetworkPolicies let a pod labelled `source` open a connection to `port` of a pod of
    this namespace labelled `target` (egress side only)."""
    policies = [
        d["spec"] for d in docs
        if d["kind"] == "NetworkPolicy" and "Egress" in d["spec"].get("policyTypes", [])
        and _matches(d["spec"]["podSelector"], source)
    ]  # fmt: skip
    if not policies:
        return True

    def peer_admits(peer: dict) -> bool:
        if "ipBlock" in peer:
            return True
        namespace_ok = "namespaceSelector" not in peer or _matches(peer["namespaceSelector"], {})
        return namespace_ok and _matches(peer.get("podSelector", {}), target)

    return any(
        (not rule.get("to") or any(peer_admits(peer) for peer in rule["to"]))
        and (not rule.get("ports") or any(p.get("port") == port for p in rule["ports"]))
        for policy in policies
        for rule in policy.get("egress", [])
    )


def pod_labels(docs: list[dict], kind: str, name: str) -> dict[str, str]:
    return find(docs, kind, name).get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})


def k8s_isolation_problems(docs: list[dict]) -> list[str]:
    """Ingress as the NetworkPolicies allow it: MLflow answers the tools only, its stores MLflow only,
    Triton labelled clients (its control API also wants the admin key, which only sync has)."""
    problems = []
    if not any(
        d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"] in ({}, None)
        and not d["spec"].get("ingress")
        for d in docs
    ):
        problems.append("no default-deny NetworkPolicy: a pod without its own policy takes any connection")
    pods = {name: pod_labels(docs, kind, name) for kind, name in K8S_PODS}
    stranger, client = {"app": "anything"}, {TRITON_CLIENT_LABEL: "true"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    expectations = [  # (target pod, port, source labels, from another namespace, admitted)
        *(("mlflow", 5000, pods[tool], False, True) for tool in ("bootstrap", "triton")),
        ("mlflow", 5000, stranger, False, False),
        ("mlflow", 5000, client, False, False),
        ("mlflow", 5000, pods["web"], False, False),  # its status line reads Triton, not MLflow
        ("mlflow", 5000, pods["bootstrap"], True, False),
        *(
            (store, port, pods["mlflow"], False, True)
            for store, port in (("postgres", 5432), ("minio", 9000))
        ),
        ("minio", 9000, pods["minio-bucket"], False, True),
        *(
            (store, port, pods[other], False, False)
            for store, port in (("postgres", 5432), ("minio", 9000))
            for other in ("bootstrap", "triton")
        ),  # fmt: skip
        ("minio", 9001, pods["mlflow"], False, False),
        *(("triton", port, client, True, True) for port in (8000, 8001)),
        *(("triton", port, stranger, False, False) for port in (8000, 8001, 8002)),
        ("triton", 8002, prometheus, True, True),
        ("bootstrap", 8000, stranger, False, False),
    ]
    for target, port, source, elsewhere, expected in expectations:
        if admits(docs, pods[target], port, source, elsewhere) != expected:
            where = "another namespace" if elsewhere else "this namespace"
            verb = "refuses" if expected else "admits"
            problems.append(f"{target}:{port} {verb} a pod labelled {source} from {where}")

    for target, port, expected in [("triton", 8001, True), ("triton", 8000, False), ("mlflow", 5000, False)]:
        if egress_admits(docs, pods["web"], pods[target], port) != expected:
            verb = "may not" if expected else "may"
            problems.append(f"web pods {verb} connect to {target}:{port}")

    spec = find(docs, "Deployment", "triton").get("spec", {}).get("template", {}).get("spec", {})
    containers = {c["name"]: c for c in spec.get("containers", [])}

    def key_variable(container: dict) -> str | None:
        """The env variable the container gets the admin key from the Secret in."""
        wanted = {"name": SECRET_NAME, "key": ADMIN_KEY_SECRET}
        env = container.get("env", [])
        return next((e["name"] for e in env if e.get("valueFrom", {}).get("secretKeyRef") == wanted), None)

    server = containers.get("triton", {})
    variable = key_variable(server)
    if variable is None:
        problems.append(f"tritonserver does not get the admin key from the Secret ({ADMIN_KEY_SECRET})")
    problems += restricted_api_problems(server.get("command", []), f"$({variable})", "k8s triton")
    if key_variable(containers.get("sync", {})) != ADMIN_KEY_ENV:
        problems.append(f"the sync sidecar does not get the admin key from the Secret as {ADMIN_KEY_ENV}")
    if spec.get("terminationGracePeriodSeconds", 30) < MIN_SYNC_GRACE_S:
        problems.append(f"the triton pod's grace period is under {MIN_SYNC_GRACE_S} s: sync cannot roll back")
    return problems


def k8s_web_problems(docs: list[dict], services: dict, triton_ports: dict) -> list[str]:
    """The web Deployment talks to the triton Service's gRPC port and not to MLflow; its Service and
    probes reach it."""
    spec = find(docs, "Deployment", "web").get("spec", {}).get("template", {}).get("spec", {})
    web = next((c for c in spec.get("containers", []) if c["name"] == "web"), {})
    command = web.get("command", [])
    problems = (
        [] if command[:3] == ["python", "-m", "web"] else ["the web Deployment does not run python -m web"]
    )
    host, _, port = (flag(command, "triton") or "").partition(":")
    if host != "triton" or triton_ports.get(int(port or 0)) != "grpc":
        problems.append(
            f"web talks to Triton at {flag(command, 'triton')}, not the triton Service's gRPC port"
        )
    ports = {p["name"]: p["containerPort"] for p in web.get("ports", [])}
    if ports.get("http") != int(flag(command, "port") or 0) or flag(command, "host") != "0.0.0.0":
        problems.append(
            f"web listens on {flag(command, 'host')}:{flag(command, 'port')}, not its port {ports}"
        )
    if flag(command, "mlflow-uri") is not None or any(
        e["name"] == "MLFLOW_TRACKING_URI" for e in web.get("env", [])
    ):
        problems.append("web reads MLflow, which answers the tools only: its status comes from Triton")
    for probe in ("readinessProbe", "livenessProbe"):
        if web.get(probe, {}).get("httpGet") != {"path": "/healthz", "port": "http"}:
            problems.append(f"web {probe} does not ask /healthz on its port")
    service = services.get("web", {}).get("spec", {})
    if [p["targetPort"] for p in service.get("ports", [])] != ["http"] or service.get("selector") != {
        "app.kubernetes.io/name": "web"
    }:
        problems.append("the web Service does not reach the web pods' port")
    return problems


def adapter_rule() -> dict:
    values = yaml.safe_load((PROJECT_ROOT / "k8s" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return rule


def adapter_metric_name() -> str:
    return adapter_rule()["name"]["as"]


def test_kustomize_renders_every_overlay_and_the_checks_pass(rendered):
    overlay, docs = rendered
    assert k8s_problems(docs) == []
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"fashionserve"}


def test_overlays_differ_where_they_should():
    local, production = render("local"), render("production")
    triton = {
        o: find(d, "Deployment", "triton")["spec"] for o, d in (("local", local), ("production", production))
    }
    assert (
        "nodeSelector" not in triton["local"]["template"]["spec"]
        or not triton["local"]["template"]["spec"]["nodeSelector"]
    )
    assert triton["production"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    assert triton["local"]["strategy"]["type"] == "Recreate"  # one GPU
    assert find(production, "HorizontalPodAutoscaler", "triton")["spec"]["maxReplicas"] > 1
    assert find(production, "ServiceMonitor", "triton")["spec"]["endpoints"][0]["port"] == "metrics"
    metrics_service = find(production, "Service", "triton-metrics")
    selector = find(production, "ServiceMonitor", "triton")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics_service["metadata"]["labels"].items()


def test_one_release_pins_triton_and_tensorrt_everywhere(env_example):
    release = env_example["NGC_RELEASE"]
    assert re.fullmatch(r"\d\d\.\d\d", release)
    dockerfile = (PROJECT_ROOT / "deploy" / "Dockerfile").read_text()
    assert f"ARG NGC_RELEASE={release}" in dockerfile
    assert "FROM nvcr.io/nvidia/tensorrt:${NGC_RELEASE}-py3 AS plans" in dockerfile
    assert f"ARG PYTHON_IMAGE={env_example['PYTHON_IMAGE']}" in dockerfile
    assert image_problems(env_example["PYTHON_IMAGE"], "PYTHON_IMAGE") == []
    for overlay in OVERLAYS:
        images = [
            c["image"]
            for _, spec in pod_specs(render(overlay))
            for c in spec.get("initContainers", []) + spec["containers"]
        ]
        assert f"nvcr.io/nvidia/tritonserver:{release}-py3" in images
        plans = {image for image in images if image.rpartition(":")[0].endswith("plans")}
        assert len(plans) == 1 and plans.pop().rpartition(":")[2].startswith(f"{release}-")


def read_pins(path: Path) -> dict[str, str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    pins = (line.split("==") for line in lines if line)
    return {re.sub(r"\[.*\]", "", name).lower(): version for name, version in pins}


def test_the_images_install_the_project_pins():
    project = read_pins(PROJECT_ROOT / "requirements.txt")
    assert project["mlflow"] == read_pins(PROJECT_ROOT / "deploy" / "requirements-mlflow.txt")["mlflow"]
    plans = read_pins(PROJECT_ROOT / "deploy" / "requirements-plans.txt")
    assert plans.pop("mlflow-skinny") == project["mlflow"]  # the client half of the same release
    assert plans == {name: project[name] for name in plans}


def test_the_adapter_rule_builds_the_metric_from_triton_queue_time():
    rule = adapter_rule()
    assert rule["seriesQuery"].startswith(QUEUE_METRIC)
    query = rule["metricsQuery"]
    assert f"increase({QUEUE_METRIC}{{" in query and "nv_inference_request_success" in query
    composing = re.search(r'model=~"([^"]+)"', query).group(1)
    ensemble = re.search(r'model="([^"]+)"', query).group(1)
    steps = {step.model_name for step in ensemble_steps(ensemble)}
    assert {m for m in model_names() if re.fullmatch(composing, m)} == steps


def broken(docs: list[dict], edit) -> list[dict]:
    docs = copy.deepcopy(docs)
    edit(docs)
    return docs


def _container(docs: list[dict], kind: str, workload: str, name: str) -> dict:
    spec = find(docs, kind, workload)["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def _triton_container(docs: list[dict], name: str = "triton") -> dict:
    return _container(docs, "Deployment", "triton", name)


BROKEN_K8S = {
    "no GPU limit": (
        lambda d: _triton_container(d)["resources"]["limits"].pop("nvidia.com/gpu"),
        "triton has no nvidia.com/gpu limit",
    ),
    "no GPU for the plan builder": (
        lambda d: _triton_container(d, "plan-builder")["resources"]["limits"].pop("nvidia.com/gpu"),
        "plan-builder has no nvidia.com/gpu limit",
    ),
    "made-up probe path": (
        lambda d: _triton_container(d)["livenessProbe"]["httpGet"].update(path="/v2/health/alive"),
        "probe path /v2/health/alive",
    ),
    "probe on an unknown model": (
        lambda d: _triton_container(d)["readinessProbe"]["httpGet"].update(path="/v2/models/hair/ready"),
        "probe path /v2/models/hair/ready",
    ),
    "probe on the metrics port": (
        lambda d: _triton_container(d)["livenessProbe"]["httpGet"].update(port="metrics"),
        "livenessProbe does not ask /v2/health/live on the HTTP port",
    ),
    "latest image": (
        lambda d: _triton_container(d, "sync").update(image="fashionserve-tools:latest"),
        "latest",
    ),
    "untagged image": (
        lambda d: _triton_container(d).update(image="nvcr.io/nvidia/tritonserver"),
        "has no tag",
    ),
    "inlined Secret": (
        lambda d: d.append({"kind": "Secret", "metadata": {"name": SECRET_NAME}, "stringData": {"a": "b"}}),
        "a Secret is inlined",
    ),
    "password in plain env": (
        lambda d: _triton_container(d, "sync")["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}),
        "sets AWS_SECRET_ACCESS_KEY from something else than a Secret",
    ),
    "no limits": (lambda d: _triton_container(d, "sync")["resources"].pop("limits"), "sync has no limits"),
    "old HPA API": (
        lambda d: find(d, "HorizontalPodAutoscaler", "triton").update(apiVersion="autoscaling/v2beta2"),
        "not autoscaling/v2",
    ),
    "HPA on CPU": (
        lambda d: find(d, "HorizontalPodAutoscaler", "triton")["spec"].update(
            metrics=[{"type": "Resource", "resource": {"name": "cpu"}}]
        ),
        "queue-time metric",
    ),
    "web on Triton's HTTP port": (
        lambda d: _container(d, "Deployment", "web", "web")["command"].append("--triton=triton:8000"),
        "not the triton Service's gRPC port",
    ),
    "web Service on another port": (
        lambda d: find(d, "Service", "web")["spec"]["ports"][0].update(targetPort=9000),
        "the web Service does not reach",
    ),
    "web without limits": (
        lambda d: _container(d, "Deployment", "web", "web").pop("resources"),
        "has no limits",
    ),
    "gRPC Service on the HTTP port": (
        lambda d: find(d, "Service", "triton")["spec"]["ports"][1].update(targetPort="http"),
        "the triton Services expose",
    ),
    "sidecar writes elsewhere": (
        lambda d: _triton_container(d, "sync")["volumeMounts"][0].update(mountPath="/srv"),
        "does not write the model repository",
    ),
    "sidecar syncs another folder": (
        lambda d: _triton_container(d, "sync")["command"].append("--repository=/tmp/models"),
        "does not write the model repository",
    ),
    "undeclared volume": (
        lambda d: _triton_container(d)["volumeMounts"].append({"name": "cache", "mountPath": "/cache"}),
        "mounts cache, which the pod does not declare",
    ),
    "no default deny": (
        lambda d: d.remove(find(d, "NetworkPolicy", "default-deny-ingress")),
        "no default-deny NetworkPolicy",
    ),
    "MLflow open to every pod": (
        lambda d: find(d, "NetworkPolicy", "mlflow")["spec"]["ingress"][0].pop("from"),
        "mlflow:5000 admits a pod labelled {'app': 'anything'}",
    ),
    "MLflow open to other namespaces": (
        lambda d: find(d, "NetworkPolicy", "mlflow")["spec"]["ingress"][0]["from"][0].update(
            namespaceSelector={}
        ),
        "from another namespace",
    ),
    "web labelled as an MLflow client": (
        lambda d: pod_labels(d, "Deployment", "web").update({"fashionserve.io/mlflow-client": "true"}),
        "mlflow:5000 admits a pod labelled {'app.kubernetes.io/name': 'web'",
    ),
    "web reads MLflow": (
        lambda d: _container(d, "Deployment", "web", "web")["command"].append(
            "--mlflow-uri=http://mlflow:5000"
        ),
        "web reads MLflow",
    ),
    "web egress open": (
        lambda d: find(d, "NetworkPolicy", "web")["spec"].update(policyTypes=["Ingress"]),
        "web pods may connect to mlflow:5000",
    ),
    "web egress without Triton": (
        lambda d: find(d, "NetworkPolicy", "web")["spec"]["egress"].pop(0),
        "web pods may not connect to triton:8001",
    ),
    "sidecar forgets the catalogue": (
        lambda d: _triton_container(d, "sync")["command"].remove("--model=garment_classifier"),
        "k8s: sync does not serve garment_classifier, which bootstrap registers",
    ),
    "plan builder forgets the catalogue": (
        lambda d: _triton_container(d, "plan-builder")["command"].remove("--model=fashion_generator"),
        "k8s: plan-builder does not build for fashion_generator, which sync serves",
    ),
    "sidecar not an MLflow client": (
        lambda d: pod_labels(d, "Deployment", "triton").pop("fashionserve.io/mlflow-client"),
        "mlflow:5000 refuses a pod labelled {'app.kubernetes.io/name': 'triton'",
    ),
    "Postgres open to the tools": (
        lambda d: find(d, "NetworkPolicy", "postgres")["spec"]["ingress"][0]["from"].append(
            {"podSelector": {"matchLabels": {"fashionserve.io/mlflow-client": "true"}}}
        ),
        "postgres:5432 admits",
    ),
    "Triton open to every pod": (
        lambda d: find(d, "NetworkPolicy", "triton")["spec"]["ingress"][0]["from"][0].pop("podSelector"),
        "triton:8000 admits a pod labelled {'app': 'anything'}",
    ),
    "control API open": (
        lambda d: _triton_container(d)["command"].remove(
            next(a for a in _triton_container(d)["command"] if a.startswith("--http-restricted-api="))
        ),
        "without --http-restricted-api",
    ),
    "admin key in plain text": (
        lambda d: _triton_container(d)["command"].append(
            "--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:fashionserve-admin-key=k"
        ),
        "does not expect the header fashionserve-admin-key with the admin key",
    ),
    "sidecar without the admin key": (
        lambda d: _triton_container(d, "sync").update(env=_triton_container(d, "sync")["env"][1:]),
        "the sync sidecar does not get the admin key",
    ),
    "short grace period": (
        lambda d: find(d, "Deployment", "triton")["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds=30
        ),
        "grace period is under",
    ),
}


@pytest.mark.parametrize("case", BROKEN_K8S, ids=list(BROKEN_K8S))
def test_k8s_checker_names_what_a_broken_copy_breaks(case):
    edit, expected = BROKEN_K8S[case]
    problems = k8s_problems(broken(render("production"), edit))
    assert any(expected in problem for problem in problems), problems


# ---------------------------------------------------------------------------------------------------
# The commands compose and k8s run are accepted by the CLIs (each stops at its first real dependency)


def expand_k8s_variables(arg: str, env: dict[str, str]) -> str:
    """Kubernetes expands $(NAME) in a container's command from its environment."""
    return re.sub(r"\$\((\w+)\)", lambda match: env[match.group(1)], arg)


def stack_commands(source: str, env_example: dict[str, str]) -> dict[str, list[str]]:
    """The tools' command lines as compose or the production overlay runs them (one-shot: no --watch)."""
    if source == "compose":
        values = {**env_example, "POSTGRES_PASSWORD": "x", "MINIO_ROOT_PASSWORD": "x"}
        services = load_compose(COMPOSE_FILE.read_text(), values)["services"]
        commands = {
            "sync": services["sync"]["command"],
            "bootstrap": services["bootstrap"]["command"],
            "plan-builder": services["plan-builder"]["entrypoint"] + services["plan-builder"]["command"],
        }
    else:
        docs = render("production")
        settings = find(docs, "ConfigMap", "fashionserve-settings")["data"]
        containers = {
            name: _container(docs, kind, workload, name)
            for kind, workload, name in [
                ("Deployment", "triton", "sync"),
                ("Deployment", "triton", "plan-builder"),
                ("Job", "bootstrap", "bootstrap"),
            ]
        }
        commands = {}
        for name, container in containers.items():
            env = {
                e["name"]: settings[e["valueFrom"]["configMapKeyRef"]["key"]]
                for e in container["env"]
                if "configMapKeyRef" in e["valueFrom"]  # the admin key (a Secret) is no argument
            }
            commands[name] = [expand_k8s_variables(arg, env) for arg in container["command"]]
    assert all(command[0] == "python" for command in commands.values())
    return {name: [a for a in command[1:] if a != "--watch"] for name, command in commands.items()}


@pytest.mark.parametrize("source", ["compose", "k8s"])
def test_the_stack_commands_are_accepted_by_the_clis(source, env_example):
    """Each tool stops at its first real dependency (MLflow, TensorRT), so its arguments were accepted."""
    commands = stack_commands(source, env_example)
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    for name in ("sync", "bootstrap"):
        result = run_cli(*commands[name], f"--tracking-uri={dead}", timeout=120)
        assert (result.returncode, result.stderr.splitlines()) == (
            2,
            [f"error: cannot reach MLflow at {dead}: [Errno 111] Connection refused"],
        ), name
    result = run_cli(*commands["plan-builder"], timeout=120)
    assert result.returncode == 2 and "error: TensorRT is not installed" in result.stderr, result.stderr


def test_the_plan_builder_takes_a_version_of_one_model(env_example):
    """`docker compose run --rm plan-builder --model tryon --version N` (the command replaced), as
    docs/deploy.md says; a version with several models is refused (it names one model's version)."""
    values = {**env_example, "POSTGRES_PASSWORD": "x", "MINIO_ROOT_PASSWORD": "x"}
    entrypoint = load_compose(COMPOSE_FILE.read_text(), values)["services"]["plan-builder"]["entrypoint"]
    result = run_cli(*entrypoint[1:], "--model", "tryon", "--version", "3", timeout=120)
    assert result.returncode == 2 and "error: TensorRT is not installed" in result.stderr, result.stderr
    two = run_cli(*entrypoint[1:], "--model", "tryon", "--model", "hair", "--version", "3", timeout=120)
    assert two.returncode == 2 and "give one --model with it" in two.stderr.splitlines()[-1], two.stderr


@pytest.mark.parametrize("source", ["compose", "k8s"])
def test_the_web_command_is_accepted(source, env_example):
    """Every argument parses: the app stops at the first check after parsing (a --dataroot that is not
    there), where an unknown argument would have stopped argparse first."""
    if source == "compose":
        values = {**env_example, "POSTGRES_PASSWORD": "x", "MINIO_ROOT_PASSWORD": "x"}
        command = load_compose(COMPOSE_FILE.read_text(), values)["services"]["web"]["command"]
    else:
        docs = render("production")
        web = _container(docs, "Deployment", "web", "web")
        settings = find(docs, "ConfigMap", "fashionserve-settings")["data"]
        env = {e["name"]: settings[e["valueFrom"]["configMapKeyRef"]["key"]] for e in web.get("env", [])}
        command = [expand_k8s_variables(arg, env) for arg in web["command"]]
    result = run_cli(*command[1:], "--dataroot=/nonexistent", timeout=120)
    assert (result.returncode, result.stderr.splitlines()) == (
        2,
        ["error: --dataroot /nonexistent is not a folder"],
    )


def test_sync_takes_plans_only_on_the_gpu_target():
    result = run_cli("mlflow/sync.py", "--repository=/models", "--plans=/plans")  # cpu target
    assert result.returncode == 2 and "--plans applies to --target gpu only" in result.stderr


# ---------------------------------------------------------------------------------------------------
# First run and the plan store, against a real MLflow server


@pytest.fixture(scope="module")
def bootstrapped(mlflow_server, tmp_path_factory):
    bundles = tmp_path_factory.mktemp("bundles")
    args = ["deploy/bootstrap.py", f"--bundles={bundles}", "--resolution=256x192"]
    result = run_cli(*args, f"--tracking-uri={mlflow_server.url}", "--", *SMALL_EXPORT, timeout=600)
    return result, bundles


def test_bootstrap_registers_and_promotes_the_demo_once(mlflow_server, bootstrapped):
    result, bundles = bootstrapped
    assert result.returncode == 0, result.stderr
    assert "random-init weights: outputs are noise" in result.stdout
    assert "'tryon' alias 'production' -> version 1" in result.stdout
    client = connect(mlflow_server.url)
    version = client.get_model_version_by_alias("tryon", "production")
    assert RANDOM_INIT in version.tags and version.tags["resolution"] == "256x192"
    again = run_cli("deploy/bootstrap.py", f"--bundles={bundles}", f"--tracking-uri={mlflow_server.url}")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "'tryon' alias 'production' -> version 1: nothing to do"
    assert len(client.search_model_versions("name='tryon'")) == 1


def test_bootstrap_never_promotes_the_demo_over_a_registry_in_use(bootstrapped, tmp_path):
    demo_bundle = bootstrapped[1] / "tryon-random-init-256x192"
    with MlflowServer(root=tmp_path / "mlflow") as server:
        client = connect(server.url)
        run_cli("mlflow/register.py", str(demo_bundle), f"--tracking-uri={server.url}")
        client.delete_model_version_tag("tryon", "1", RANDOM_INIT)  # stands for a trained version
        result = run_cli("deploy/bootstrap.py", f"--bundles={tmp_path}", f"--tracking-uri={server.url}")
        assert result.returncode == 2
        assert result.stderr.startswith("error: 'tryon' has versions (1) but none holds alias 'production'")
        client.set_model_version_tag("tryon", "1", RANDOM_INIT, "true")  # a demo an earlier run registered
        result = run_cli("deploy/bootstrap.py", f"--bundles={tmp_path}", f"--tracking-uri={server.url}")
        assert result.returncode == 0, result.stderr
        assert "reusing the demo version 1" in result.stdout
        assert client.get_model_version_by_alias("tryon", "production").version == "1"


def test_bootstrap_serves_the_shipped_catalogue_models_once(mlflow_server, bootstrapped, tmp_path):
    args = [
        "deploy/bootstrap.py",
        f"--bundles={tmp_path}",
        "--catalogue",
        f"--tracking-uri={mlflow_server.url}",
    ]
    result = run_cli(*args, timeout=600)
    assert result.returncode == 0, result.stderr
    client = connect(mlflow_server.url)
    for model in ("garment_classifier", "fashion_generator"):
        version = client.get_model_version_by_alias(model, "production")
        shipped = PROJECT_ROOT / "models" / "catalogue" / f"{model}.pt"
        assert version.tags["checkpoint_sha256"] == sha256_file(shipped) and RANDOM_INIT not in version.tags
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert [line.split(" -> ")[0] for line in again.stdout.splitlines()] == [
        "'garment_classifier' alias 'production'",
        "'fashion_generator' alias 'production'",
        "'tryon' alias 'production'",
    ] and all(line.endswith("nothing to do") for line in again.stdout.splitlines())


def fake_plans(bundle: Path, manifest: dict) -> dict:
    """Plan files as the builder names and lists them (TensorRT cannot run here): the store only moves
    and checks bytes."""
    for network in HEAVY_NETWORKS:
        gpu = Gpu("NVIDIA H100", "9.0")
        relative = f"{network}/{plan_file_name('fp32', gpu, '10.13.3.9')}"
        (bundle / relative).write_bytes(b"plan of " + network.encode())
        entry = {
            "file": relative,
            "variant": "fp32",
            "compute_capability": "9.0",
            "tensorrt_version": "10.13.3.9",
        }
        manifest = record_plan(manifest, network, entry)
    return manifest


def test_sync_renders_the_gpu_target_from_the_plan_store(mlflow_server, bootstrapped, tmp_path):
    plan_builder = load_script("deploy/plan_builder.py")
    client = connect(mlflow_server.url)
    model_version = client.get_model_version_by_alias("tryon", "production")
    store = tmp_path / "plans"

    def stage(name: str):
        return _stage(model_version, client, tmp_path / name, tmp_path / "served", {}, "gpu", "fp32", store)

    with pytest.raises(RegistryError, match="no TensorRT plans for this bundle in .*: build them"):
        stage("without-plans")

    # what the plan builder does after TensorRT built the plans into its download
    bundle, manifest = download_bundle(client, model_version, tmp_path / "builder")
    dest = plan_store_dir(store, "tryon", bundle_digest(bundle))
    assert bundle_digest(bundle) == model_version.tags["bundle_sha256"]
    assert not plan_builder.already_built(dest, list(HEAVY_NETWORKS), "fp32", "9.0", "10.13.3.9")
    published = publish_plans(bundle, fake_plans(bundle, manifest), dest)
    assert len(published) == len(HEAVY_NETWORKS) and not list(dest.rglob("*.partial"))
    assert plan_builder.already_built(dest, list(HEAVY_NETWORKS), "fp32", "9.0", "10.13.3.9")
    assert not plan_builder.already_built(dest, list(HEAVY_NETWORKS), "fp32", "8.9", "10.13.3.9")
    assert not plan_builder.already_built(dest, list(HEAVY_NETWORKS), "int8", "9.0", "10.13.3.9")

    _, staged, version = stage("with-plans")
    config = read_config(staged / "tryon_image_generator" / "config.pbtxt")
    assert config.platform == "tensorrt_plan"
    assert dict(config.cc_model_filenames) == {"9.0": "model.fp32.sm90.trt10.13.3.9.plan"}
    plan = staged / "tryon_image_generator" / str(version) / "model.fp32.sm90.trt10.13.3.9.plan"
    assert plan.read_bytes() == b"plan of tryon_image_generator"

    index = json.loads((dest / PLAN_STORE_INDEX).read_text())
    (dest / index["tryon_image_generator"][0]["file"]).write_bytes(b"flipped bits")
    with pytest.raises(RegistryError, match="differs from its sha256"):
        stage("corrupted")


def load_script(relative: str):
    """A CLI script as a module (its functions), without running main."""
    spec = importlib.util.spec_from_file_location(Path(relative).stem, PROJECT_ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlflow_accepts_the_host_names_the_containers_use():
    """MLflow refuses unknown Host headers (DNS rebinding); compose and k8s reach it as mlflow:5000."""
    compose_command = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["mlflow"]["command"]
    k8s_command = _container(render("production"), "Deployment", "mlflow", "mlflow")["command"]
    for command in (compose_command, k8s_command):
        allowed = flag(command, "allowed-hosts").split(",")
        for host in ("mlflow:5000", "localhost:5000", "127.0.0.1:5000"):
            assert is_allowed_host_header(allowed, host), host
        assert not is_allowed_host_header(allowed, "evil.example.com:5000")
