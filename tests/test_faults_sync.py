"""Faults in registration and sync, injected against a real MLflow server and a real Triton (explicit
model control) under a request loop:

- crafted artifacts: a version registered through the MLflow API (no validation) whose names or paths
  leave the served repository, and bundles with symlinks, are refused; nothing is written outside;
- sync killed (SIGKILL) or stopped (SIGTERM, --watch) at several moments of a swap: no request fails,
  no request mixes versions, no file is left in the temp folder or the repository, and the next sync
  serves the promoted version;
- one sync process for two registered models: a swap of one, killed mid-way, is still rolled back when
  the other model is synced first;
- Triton killed and restarted: sync serves the promoted version again.

The small fashion generator (16x16 images, two composing models) keeps each swap to seconds; two seeds
are versions A and B, so every answer says which version computed it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fashionserve import registry
from fashionserve import sync as live
from fashionserve.catalogue.bundle import (
    CLASSIFIER,
    export_classifier_bundle,
    export_generator_bundle,
    load_fashion_generator,
    load_garment_classifier,
)
from fashionserve.catalogue.networks.classifier import ClassifierConfig
from fashionserve.catalogue.networks.pggan import PGGANConfig
from fashionserve.client import TritonModelClient
from fashionserve.launcher import TritonServer
from fashionserve.repository import read_config, write_config
from tests.conftest import PROJECT_ROOT, one_line_error, run_cli
from tests.test_mlflow import Traffic, listing

MODEL = "fashion_generator"
STEPS = ("fashion_generator_network", "fashion_generator_postprocess")
CONFIG = PGGANConfig(latent_dim=24, depth_scale0=16, depth_other_scales=(16, 8))  # 16x16
SEEDS = {"A": 11, "B": 12}
STOP_TIMEOUT_S = 120.0  # bound on a stopped sync finishing or rolling back its step
MARKER_TIMEOUT_S = 120.0  # bound on a sync reaching the moment a fault is injected at


@pytest.fixture(scope="module")
def client(mlflow_server):
    return registry.connect(mlflow_server.url)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    for label, seed in SEEDS.items():
        network, provenance = load_fashion_generator(None, CONFIG, seed)
        export_generator_bundle(network, provenance, root / label, log=lambda _: None)
    return {label: root / label for label in SEEDS}


@pytest.fixture(scope="module")
def versions(mlflow_server, bundles) -> dict[str, str]:
    registered = {}
    for label, bundle in bundles.items():
        result = run_cli("mlflow/register.py", str(bundle), "--tracking-uri", mlflow_server.url)
        assert result.returncode == 0, result.stderr
        registered[label] = result.stdout.split(f"registered '{MODEL}' version ")[1].split()[0]
    return registered


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Holds the served repository and nothing else: whatever else appears here leaked out of it."""
    return tmp_path_factory.mktemp("root")


@pytest.fixture(scope="module")
def temp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TMPDIR of every sync: must be empty after each completed sync."""
    return tmp_path_factory.mktemp("synctmp")


@pytest.fixture(scope="module")
def served(root):
    (root / "repository").mkdir()
    with TritonServer(repository=root / "repository", model_control="explicit") as server:
        yield server


@pytest.fixture(scope="module")
def latents() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((1, CONFIG.latent_dim)).astype(np.float32)


def sync_command(served, mlflow_server, *extra: str) -> list[str]:
    return [
        sys.executable, "mlflow/sync.py", "--model", MODEL, "--repository", str(served.repository),
        "--triton-url", served.http_url, "--tracking-uri", mlflow_server.url, *extra,
    ]  # fmt: skip


def sync_env(temp: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(temp)}


def sync(served, mlflow_server, temp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        sync_command(served, mlflow_server), cwd=PROJECT_ROOT, env=sync_env(temp),
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def generate(served, z: np.ndarray) -> np.ndarray:
    triton = TritonModelClient(served.grpc_url, MODEL)
    try:
        return triton.infer({"latents": z})["fashion_image"]
    finally:
        triton.close()


@pytest.fixture(scope="module")
def outputs(mlflow_server, client, served, versions, temp, latents) -> dict[str, np.ndarray]:
    """What versions A and B answer to `latents` (each served once, B last... then A again)."""
    answers = {}
    for label in ("B", "A"):
        registry.promote(client, MODEL, versions[label])
        result = sync(served, mlflow_server, temp)
        assert result.returncode == 0, result.stderr
        answers[label] = generate(served, latents)
    assert not np.array_equal(answers["A"], answers["B"])
    return answers


def serving(served, outputs, latents) -> str:
    answer = generate(served, latents)
    return next(label for label, output in outputs.items() if np.array_equal(answer, output))


def state(served) -> dict:
    return json.loads((served.repository / live.STATE_FILE).read_text())[MODEL]


def index(served) -> dict[str, dict[int, str]]:
    """Model -> Triton version -> state, as Triton's repository index reports them."""
    triton = live.TritonControl(served.http_url, 60.0)
    return {model: {v: s for v, (s, _) in triton.versions(model).items()} for model in (MODEL, *STEPS)}


def assert_clean(served, root: Path, temp: Path) -> None:
    """Nothing outside the repository, nothing left in temp, only the versions the state records, and
    Triton settled with the live version of every model ready."""
    assert sorted(p.name for p in root.iterdir()) == ["repository"]
    assert list(temp.iterdir()) == []
    recorded = state(served)
    assert "pending" not in recorded, recorded
    current, previous = recorded["triton_version"], recorded.get("previous_triton_version")
    dirs = {m: sorted(p.name for p in (served.repository / m).iterdir()) for m in (MODEL, *STEPS)}
    assert dirs[MODEL] == [str(current), "config.pbtxt"]
    for step in STEPS:
        assert set(dirs[step]) <= {str(current), str(previous), "config.pbtxt"}, dirs
    states = index(served)
    assert all(s not in ("LOADING", "UNLOADING") for versions in states.values() for s in versions.values())
    assert all(states[m].get(current) == "READY" for m in (MODEL, *STEPS)), states


def assert_one_version_per_request(traffic: Traffic, outputs: dict[str, np.ndarray], first: str) -> str:
    """No failed request, every answer exactly one version's, and at most one switch, from `first`."""
    assert traffic.failures == [] and traffic.results, traffic.failures[:3]
    sequence = traffic.sequence(outputs)
    assert "?" not in sequence, sequence
    other = "B" if first == "A" else "A"
    assert sequence == first * sequence.count(first) + other * sequence.count(other), sequence
    return sequence


def traffic_on(served, latents: np.ndarray) -> Traffic:
    """Requests of one latent vector, one after another (tiny model: many, bounded by time)."""
    return Traffic(
        served, model=MODEL, batch={"latents": latents}, output="fashion_image", max_seconds=240,
        max_requests=100_000,
    )  # fmt: skip


class SyncProcess:
    """mlflow/sync.py running in the background, its output lines collected as they come."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self._reader.start()

    def wait_for(self, marker: str) -> None:
        deadline = time.monotonic() + MARKER_TIMEOUT_S
        while not any(marker in line for line in self.lines):
            assert self.process.poll() is None or any(marker in line for line in self.lines), self.lines
            assert time.monotonic() < deadline, f"no line with {marker!r}: {self.lines}"
            time.sleep(0.02)

    def finish(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(timeout=10)


# ---------------------------------------------------------------------------------------------------
# Crafted artifacts


def register_raw(client, bundle: Path, configs: Path | None = None) -> str:
    """Register a bundle as an attacker with MLflow API access would: no validation at all."""
    experiment = client.get_experiment_by_name(MODEL).experiment_id
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(bundle), registry.BUNDLE_ARTIFACTS)
    if configs is not None:
        client.log_artifacts(run.info.run_id, str(configs), "")
    client.set_terminated(run.info.run_id)
    return client.create_model_version(MODEL, run.info.artifact_uri, run.info.run_id).version


def crafted_traversal_step(bundle: Path, manifest: dict, tmp: Path) -> Path:
    """The artifact's ensemble config routes a step to ../outside/<model> (a sibling of the served
    repository), with the configs and manifest entries that make it render."""
    configs = tmp / "configs"
    shutil.copytree(PROJECT_ROOT / "model_repository" / MODEL, configs / "model_repository" / MODEL)
    ensemble = read_config(configs / "model_repository" / MODEL / "config.pbtxt")
    ensemble.ensemble_scheduling.step[0].model_name = f"../outside/{STEPS[0]}"
    write_config(ensemble, configs / "model_repository" / MODEL / "config.pbtxt")
    for step in STEPS:  # the artifact's own configs folder, where sync looked them up
        where = "outside" if step == STEPS[0] else f"model_repository/{step}"
        (configs / where / step).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(PROJECT_ROOT / "model_repository" / step, configs / where / step)
    manifest["models"][f"../outside/{STEPS[0]}"] = manifest["models"].pop(STEPS[0])
    return configs


def crafted_ensemble_name(bundle: Path, manifest: dict, tmp: Path) -> None:
    manifest["ensembles"] = {
        f"../outside/{MODEL}": {k: manifest[k] for k in ("input_contract", "output_contract")}
    }


def crafted_file_path(bundle: Path, manifest: dict, tmp: Path) -> None:
    manifest["models"][STEPS[1]]["file"] = "../../../../etc/hostname"
    manifest["models"][STEPS[1]].pop("sha256", None)


CRAFTED = {
    "step ../outside in the artifact's configs": (crafted_traversal_step, "not a valid model name"),
    "ensemble named ../outside": (crafted_ensemble_name, "not a valid model name"),
    "file outside the bundle": (crafted_file_path, "outside the bundle"),
}


@pytest.mark.parametrize("case", CRAFTED, ids=list(CRAFTED))
def test_a_crafted_version_never_writes_outside_the_repository(
    case, mlflow_server, client, served, versions, outputs, bundles, root, temp, latents, tmp_path
):
    registry.promote(client, MODEL, versions["A"])
    assert sync(served, mlflow_server, temp).returncode == 0
    before = listing(served.repository)
    craft, expected = CRAFTED[case]
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles["B"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    configs = craft(bundle, manifest, tmp_path)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    version = register_raw(client, bundle, configs)
    registry.promote(client, MODEL, version)
    try:
        result = sync(served, mlflow_server, temp)
    finally:
        registry.promote(client, MODEL, versions["A"])
    # Refused, or served from our tracked configs: either way nothing outside, nothing changed for A.
    if expected:
        one_line_error(result, f"version {version}", expected)
        assert listing(served.repository) == before
    assert sorted(p.name for p in root.iterdir()) == ["repository"]
    assert sync(served, mlflow_server, temp).returncode == 0
    assert serving(served, outputs, latents) == "A"
    assert_clean(served, root, temp)


def test_register_uploads_exactly_the_manifest_files_and_refuses_symlinks(
    mlflow_server, client, bundles, tmp_path
):
    secret = tmp_path / "host-secret.txt"
    secret.write_text("not for the registry")
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles["A"], bundle)
    (bundle / "notes.txt").symlink_to(secret)  # unlisted symlink: must not be uploaded
    (bundle / "scratch.bin").write_bytes(b"unlisted")  # unlisted file: not part of the version
    result = run_cli("mlflow/register.py", str(bundle), "--tracking-uri", mlflow_server.url)
    assert result.returncode == 0, result.stderr
    version = result.stdout.split(f"registered '{MODEL}' version ")[1].split()[0]
    run_id = client.get_model_version(MODEL, version).run_id
    uploaded = set()
    pending = [registry.BUNDLE_ARTIFACTS]
    while pending:
        for entry in client.list_artifacts(run_id, pending.pop()):
            (pending.append if entry.is_dir else uploaded.add)(entry.path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    listed = {f"{registry.BUNDLE_ARTIFACTS}/{f}" for f, _ in registry.listed_files(manifest)}
    assert uploaded == listed | {f"{registry.BUNDLE_ARTIFACTS}/manifest.json"}

    # A listed file that is a symlink (here to a copy of itself outside the bundle) is refused.
    model_file = bundle / manifest["models"][STEPS[1]]["file"]
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(model_file, outside)
    model_file.unlink()
    model_file.symlink_to(outside)
    before = len(client.search_model_versions(f"name='{MODEL}'"))
    result = run_cli("mlflow/register.py", str(bundle), "--tracking-uri", mlflow_server.url)
    one_line_error(result, "symlink")
    assert len(client.search_model_versions(f"name='{MODEL}'")) == before


# ---------------------------------------------------------------------------------------------------
# Sync killed or stopped mid-swap

# The progress lines sync prints as it enters each step of a swap, and how long after it the fault comes.
MOMENTS = {
    "downloading": ("downloading", 0.0),
    "staged": ("beside live version", 0.0),
    "composing load requested": ("loading the composing models", 0.3),
    "ensemble switch requested": ("switching the ensembles", 0.05),
}
FAULTS = [
    *(
        (signal.SIGKILL, moment)
        for moment in ("downloading", "composing load requested", "ensemble switch requested")
    ),
    *(
        (signal.SIGTERM, moment)
        for moment in ("staged", "composing load requested", "ensemble switch requested")
    ),
]


@pytest.mark.parametrize("fault, moment", FAULTS, ids=[f"{f.name}-{m.replace(' ', '-')}" for f, m in FAULTS])
def test_a_sync_killed_or_stopped_mid_swap_fails_no_request(
    fault, moment, mlflow_server, client, served, versions, outputs, root, temp, latents
):
    first = serving(served, outputs, latents)
    assert state(served)["mlflow_version"] == versions[first]
    target = "B" if first == "A" else "A"
    registry.promote(client, MODEL, versions[target])
    marker, delay = MOMENTS[moment]
    watch = ["--watch", "--interval", "1"] if fault == signal.SIGTERM else []
    with traffic_on(served, latents) as traffic:
        time.sleep(0.5)
        process = SyncProcess(sync_command(served, mlflow_server, *watch), sync_env(temp))
        process.wait_for(marker)
        time.sleep(delay)
        process.process.send_signal(fault)
        code = process.finish(STOP_TIMEOUT_S)
        if fault == signal.SIGTERM:  # stopped, not killed: the step in progress was finished or undone
            assert code == 0 and "Traceback" not in "".join(process.lines), process.lines
            assert process.lines[-1].startswith("stopped"), process.lines
        now = serving(served, outputs, latents)
        after_fault = len(traffic.results)
        result = sync(served, mlflow_server, temp)
        assert result.returncode == 0, (result.stdout, result.stderr)
        deadline = time.monotonic() + 30
        while len(traffic.results) < after_fault + 3 and time.monotonic() < deadline:
            time.sleep(0.1)  # a few requests after the next sync
    print(
        f"\n{fault.name} at {moment}: {len(traffic.results)} requests, {len(traffic.failures)} failed; "
        f"sync said {process.lines[-1].strip()!r}, the next one {result.stdout.strip().splitlines()[-1]!r}"
    )
    assert now in (first, target)
    assert serving(served, outputs, latents) == target
    assert state(served)["mlflow_version"] == versions[target]
    assert_one_version_per_request(traffic, outputs, first)
    assert_clean(served, root, temp)


def test_a_load_that_times_out_is_one_line_and_rolled_back(
    mlflow_server, client, served, versions, outputs, root, temp, latents
):
    """Each Triton load call gets 1 ms. The HTTP client retries a timed-out call, so the swap may still
    go through once Triton has loaded; either way: no traceback, and a clean repository after."""
    first = serving(served, outputs, latents)
    target = "B" if first == "A" else "A"
    registry.promote(client, MODEL, versions[target])
    command = sync_command(served, mlflow_server, "--load-timeout", "0.001")
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, env=sync_env(temp), capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        one_line_error(result, "Triton")
        assert serving(served, outputs, latents) == first, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert sync(served, mlflow_server, temp).returncode == 0
    assert serving(served, outputs, latents) == target
    assert_clean(served, root, temp)


# ---------------------------------------------------------------------------------------------------
# Several registered models in one repository, one sync process

# A sync killed (os._exit, as kill -9) between writing the new ensemble config and asking Triton to load
# it: the version dirs and the config are in place, the old config kept beside it, the journal pending.
KILLED_BEFORE_THE_SWITCH = """
import os, sys
from pathlib import Path
from fashionserve import registry, sync as live

mlflow_url, model, repository, triton_url = sys.argv[1:]
switching = []
original = live.TritonControl.load

def log(line):
    print(line, flush=True)
    if line.startswith("switching the ensembles"):
        switching.append(line)

def load(self, name):
    if switching:
        os._exit(137)
    return original(self, name)

live.TritonControl.load = load
live.sync_once(registry.connect(mlflow_url), model, Path(repository), triton_url, log=log)
"""


def test_a_sync_of_another_model_keeps_an_unfinished_swap_recoverable(
    mlflow_server, client, served, versions, outputs, root, temp, latents, tmp_path
):
    """One process syncs garment_classifier, then fashion_generator, into one repository. A killed swap
    of fashion_generator keeps its old ensemble config beside the new one; the classifier's sync, which
    runs first, must leave it, so the generator's own sync can roll the swap back: no request fails."""
    network, provenance = load_garment_classifier(None, ClassifierConfig(width=8, hidden=32), 3)
    export_classifier_bundle(network, provenance, tmp_path / CLASSIFIER, log=lambda _: None)
    classifier = registry.register_bundle(client, tmp_path / CLASSIFIER, log=lambda _: None).version
    registry.promote(client, CLASSIFIER, classifier)
    first = serving(served, outputs, latents)
    target = "B" if first == "A" else "A"
    registry.promote(client, MODEL, versions[target])
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BEFORE_THE_SWITCH, mlflow_server.url, MODEL, str(served.repository),
         served.http_url],
        cwd=PROJECT_ROOT, env=sync_env(temp), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert killed.returncode == 137, (killed.stdout, killed.stderr)
    assert "pending" in state(served) and (served.repository / MODEL / live.CONFIG_BACKUP).is_file()
    assert serving(served, outputs, latents) == first  # Triton was never asked to switch
    command = sync_command(served, mlflow_server)
    command[2:2] = ["--model", CLASSIFIER]  # before the generator's: the classifier is synced first
    with traffic_on(served, latents) as traffic:
        time.sleep(0.5)
        result = subprocess.run(
            command,
            cwd=PROJECT_ROOT, env=sync_env(temp), capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        time.sleep(0.5)
    failed = len(traffic.failures)
    print(f"\none sync of both models repaired it: {len(traffic.results)} requests, {failed} failed")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "rolled back Triton version" in result.stdout, result.stdout
    assert serving(served, outputs, latents) == target
    assert_one_version_per_request(traffic, outputs, first)
    assert_clean(served, root, temp)
    synced = json.loads((served.repository / live.STATE_FILE).read_text())
    assert synced[CLASSIFIER]["mlflow_version"] == classifier and "pending" not in synced[CLASSIFIER]


# ---------------------------------------------------------------------------------------------------
# Triton killed


def test_triton_killed_and_restarted_serves_the_promoted_version_after_sync(
    mlflow_server, client, served, versions, outputs, root, temp, latents
):
    label = serving(served, outputs, latents)
    os.kill(served.pid, signal.SIGKILL)
    served._process.wait(timeout=30)
    served.stop()
    with TritonServer(repository=served.repository, model_control="explicit") as restarted:
        result = sync(restarted, mlflow_server, temp)
        assert result.returncode == 0, result.stderr
        assert "loading it" in result.stdout
        assert serving(restarted, outputs, latents) == label
        assert_clean(restarted, root, temp)
