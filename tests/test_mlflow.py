"""The MLflow registry against a real `mlflow server` (SQLite) and a real Triton in explicit model control.

Two random-init bundles of the small test configuration with different seeds are v1 and v2, so their
outputs differ visibly. The tests share one registry and one served repository; each leaves the
`production` alias on the version Triton serves.
"""

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from fashionserve import registry
from fashionserve.checkpoints import sha256_file
from fashionserve.client import TritonModelClient
from fashionserve.launcher import TritonServer
from fashionserve.processes import process_stat
from fashionserve.sync import LIVE_TAG, STATE_FILE
from fashionserve.tryon.bundle import export_bundle, load_networks, read_manifest, write_manifest
from tests.conftest import PROJECT_ROOT, TEST_CONFIG, one_line_error, run_cli
from tests.test_tryon_pipeline import as_args, sample_batch

MODEL = "tryon"
WAIT_S = 240.0  # bound on waiting for a watch-mode swap


@pytest.fixture(scope="module")
def client(mlflow_server):
    return registry.connect(mlflow_server.url)


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory: pytest.TempPathFactory):
    """v2: same architecture as the session bundle (seed 0), seed 1."""
    pipeline, provenance = load_networks(TEST_CONFIG, None, None, seed=1)
    bundle = tmp_path_factory.mktemp("bundles-v2") / "tryon-seed1"
    export_bundle(pipeline, TEST_CONFIG, provenance, bundle, log=lambda _: None)
    return bundle, pipeline


@pytest.fixture(scope="module")
def versions(mlflow_server, tryon_bundle, second_bundle) -> dict[str, str]:
    """v1 and v2 registered through the CLI, as a user would."""
    registered = {}
    for label, bundle in (("v1", tryon_bundle[0]), ("v2", second_bundle[0])):
        result = run_cli(
            "mlflow/register.py", str(bundle), "--model", MODEL, "--tracking-uri", mlflow_server.url
        )
        assert result.returncode == 0, result.stderr
        registered[label] = result.stdout.split("registered 'tryon' version ")[1].split()[0]
    return registered


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """Triton on an empty repository, models loaded only through the repository API."""
    with TritonServer(repository=tmp_path_factory.mktemp("served"), model_control="explicit") as server:
        yield server


@pytest.fixture(scope="module")
def references(tryon_pipeline, second_bundle, samples_dir) -> dict[str, np.ndarray]:
    """PyTorch outputs of v1 and v2 on the sample pairs."""
    args = as_args(sample_batch(samples_dir))
    with torch.no_grad():
        return {"v1": tryon_pipeline[0](*args).numpy(), "v2": second_bundle[1](*args).numpy()}


def sync(mlflow_server, served, *extra: str):
    return run_cli(
        "mlflow/sync.py",
        "--repository", str(served.repository), "--triton-url", served.http_url,
        "--tracking-uri", mlflow_server.url, *extra,
    )  # fmt: skip


def promote(mlflow_server, *args: str):
    return run_cli("mlflow/promote.py", MODEL, *args, "--tracking-uri", mlflow_server.url)


def serve(client, mlflow_server, served, version: str) -> None:
    """Promote `version` (API) and sync it (CLI)."""
    registry.promote(client, MODEL, version)
    result = sync(mlflow_server, served)
    assert result.returncode == 0, result.stderr


def infer(served, samples_dir, pairs: int = 2) -> np.ndarray:
    client = TritonModelClient(served.grpc_url, MODEL)
    try:
        return client.infer({k: v[:pairs] for k, v in sample_batch(samples_dir).items()})["tryon_image"]
    finally:
        client.close()


def close_to(served_output: np.ndarray, reference: np.ndarray) -> bool:
    """Same tolerance as the pipeline tests: ONNX Runtime vs PyTorch, label flips at region borders."""
    difference = np.abs(served_output.astype(np.int16) - reference.astype(np.int16))
    return difference.mean() < 0.5 and (difference > 8).mean() < 0.01


def listing(repository: Path) -> dict[str, bytes]:
    """Every file of the served repository with its content (byte-exact comparisons), but the sync
    state's count of Triton version numbers handed out (a rolled-back version takes one too)."""
    files = {
        str(p.relative_to(repository)): p.read_bytes() for p in sorted(repository.rglob("*")) if p.is_file()
    }
    if STATE_FILE in files:
        state = json.loads(files[STATE_FILE])
        files[STATE_FILE] = json.dumps({k: {**v, "last_version": None} for k, v in state.items()}).encode()
    return files


def live_version(client) -> str | None:
    holders = [v.version for v in client.search_model_versions(f"name='{MODEL}'") if LIVE_TAG in v.tags]
    assert len(holders) <= 1, holders
    return holders[0] if holders else None


class Traffic:
    """A client thread sending one request after another until stopped (bounded in time and count):
    by default one try-on sample pair, as infer(pairs=1)."""

    def __init__(
        self,
        served,
        samples_dir: Path | None = None,
        max_seconds: float = 300.0,
        max_requests: int = 2000,
        model: str = MODEL,
        batch: dict[str, np.ndarray] | None = None,
        output: str = "tryon_image",
    ):
        if batch is None:
            batch = {name: array[:1] for name, array in sample_batch(samples_dir).items()}
        self.batch, self.output = batch, output
        self.client = TritonModelClient(served.grpc_url, model)
        self.deadline = time.monotonic() + max_seconds
        self.max_requests = max_requests
        self.results: list[tuple[float, np.ndarray | str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while (
            not self._stop.is_set()
            and time.monotonic() < self.deadline
            and len(self.results) < self.max_requests
        ):
            sent = time.monotonic()
            try:
                self.results.append((sent, self.client.infer(self.batch)[self.output]))
            except Exception as exc:  # any failure counts; the test asserts there are none
                self.results.append((sent, str(exc)))

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.client.close()

    @property
    def failures(self) -> list[str]:
        return [r for _, r in self.results if isinstance(r, str)]

    def sequence(self, named: dict[str, np.ndarray]) -> str:
        """One letter per request: which of the `named` outputs it returned exactly, '?' for none."""
        letters = []
        for _, output in self.results:
            match = [k for k, v in named.items() if not isinstance(output, str) and np.array_equal(output, v)]
            letters.append(match[0] if match else "?")
        return "".join(letters)


def copy_bundle(source: Path, dest: Path, change) -> Path:
    shutil.copytree(source, dest)
    manifest = read_manifest(dest)
    change(dest, manifest)
    write_manifest(dest, manifest)
    return dest


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, expected",
    [
        (
            lambda b, m: (b / "tryon_warp" / "model.onnx").unlink(),
            "tryon_warp/model.onnx (listed in the manifest) is missing",
        ),
        (lambda b, m: (b / "tryon_warp" / "model.onnx").write_bytes(b"\0" * 64), "differs from its sha256"),
        (
            lambda b, m: (
                (b / "tryon_warp" / "model.onnx").write_bytes(b"not an onnx file"),
                m["models"]["tryon_warp"].update(sha256=sha256_file(b / "tryon_warp" / "model.onnx")),
            ),
            "tryon_warp/model.onnx is not a valid ONNX model",
        ),
    ],
    ids=["missing-file", "sha256-mismatch", "bad-onnx"],
)
def test_register_refuses_a_bad_bundle(
    mlflow_server, client, versions, tryon_bundle, tmp_path, damage, expected
):
    before = len(client.search_model_versions(f"name='{MODEL}'"))
    runs = len(client.search_runs([client.get_experiment_by_name(MODEL).experiment_id]))
    bad = copy_bundle(tryon_bundle[0], tmp_path / "bad", damage)
    result = run_cli("mlflow/register.py", str(bad), "--tracking-uri", mlflow_server.url)
    one_line_error(result, expected)
    assert len(client.search_model_versions(f"name='{MODEL}'")) == before
    assert len(client.search_runs([client.get_experiment_by_name(MODEL).experiment_id])) == runs


def _rest(mlflow_server, path: str) -> dict:
    with urllib.request.urlopen(f"{mlflow_server.url}/api/2.0/mlflow/{path}", timeout=30) as response:
        return json.loads(response.read())


def test_the_ui_api_shows_versions_metrics_tags_and_the_alias(mlflow_server, client, served, versions):
    serve(client, mlflow_server, served, versions["v1"])
    model = _rest(mlflow_server, f"registered-models/get?name={MODEL}")["registered_model"]
    assert {"alias": registry.ALIAS, "version": versions["v1"]} in model["aliases"]
    found = _rest(mlflow_server, f"model-versions/search?filter=name%3D%27{MODEL}%27")["model_versions"]
    assert {versions["v1"], versions["v2"]} <= {v["version"] for v in found}
    for version in found:
        if version["version"] not in versions.values():
            continue
        tags = {t["key"]: t["value"] for t in version["tags"]}
        assert tags["weights"] == registry.RANDOM_INIT and registry.RANDOM_INIT in tags
        assert tags[registry.GATE_TAG] == "passed" and tags["resolution"] == "256x192"
        assert (LIVE_TAG in tags) == (version["version"] == versions["v1"])
        run = _rest(mlflow_server, f"runs/get?run_id={version['run_id']}")["run"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert 0 <= metrics["parity_max_error/tryon_image_generator/image"] <= 5e-3
        assert len([k for k in metrics if k.startswith("parity_max_error/")]) == 13  # every stage output
        artifacts = _rest(mlflow_server, f"artifacts/list?run_id={version['run_id']}&path=bundle")["files"]
        assert "bundle/manifest.json" in {a["path"] for a in artifacts}


def test_sync_serves_the_promoted_version_and_is_idempotent(
    mlflow_server, client, served, versions, references, samples_dir
):
    serve(client, mlflow_server, served, versions["v1"])
    output = infer(served, samples_dir)
    assert close_to(output, references["v1"]) and not close_to(output, references["v2"])
    assert live_version(client) == versions["v1"]
    before = listing(served.repository)
    index = served_index(served)
    result = sync(mlflow_server, served)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout
    assert listing(served.repository) == before and served_index(served) == index
    assert np.array_equal(infer(served, samples_dir), output)
    # A restarted Triton (nothing loaded) gets the live version back from the same files.
    with TritonServer(repository=served.repository, model_control="explicit") as restarted:
        result = sync(mlflow_server, restarted)
        assert result.returncode == 0, result.stderr
        assert "not loaded in Triton; loading it" in result.stdout
        assert np.array_equal(infer(restarted, samples_dir), output)
    assert listing(served.repository) == before


def served_index(served) -> list[dict]:
    request = urllib.request.Request(
        f"http://{served.http_url}/v2/repository/index", data=b"{}", method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_promotion_swaps_under_load_without_a_failed_request(
    mlflow_server, client, served, versions, references, samples_dir
):
    serve(client, mlflow_server, served, versions["v1"])
    before = infer(served, samples_dir, pairs=1)  # ONNX Runtime's results may differ by batch size
    command = [sys.executable, "mlflow/sync.py", "--repository", str(served.repository), "--watch"]
    command += ["--triton-url", served.http_url, "--tracking-uri", mlflow_server.url, "--interval", "1"]
    watch = subprocess.Popen(
        command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(watch.stdout), daemon=True)
    reader.start()
    try:
        with Traffic(served, samples_dir) as traffic:
            time.sleep(2)
            assert promote(mlflow_server, "--version", versions["v2"]).returncode == 0
            deadline = time.monotonic() + WAIT_S
            while not any(line.startswith("live: ") for line in lines) and time.monotonic() < deadline:
                assert watch.poll() is None, watch.stderr.read()
                time.sleep(0.5)
            swapped_at = len(traffic.results)
            while len(traffic.results) < swapped_at + 3 and time.monotonic() < deadline:
                time.sleep(0.2)  # a few requests on the new version
    finally:
        watch.send_signal(signal.SIGTERM)
        watch.wait(timeout=60)
        reader.join(timeout=10)
    swapped = [line for line in lines if line.startswith("live: ")]
    assert swapped, lines
    after = infer(served, samples_dir, pairs=1)
    assert close_to(after, references["v2"][:1]) and not close_to(after, references["v1"][:1])
    assert traffic.failures == []
    sequence = traffic.sequence({"1": before, "2": after})
    # Every request got exactly one version's output (no mixed pipeline), v1 until the swap, then v2.
    assert sequence.count("1") > 0 and sequence.count("2") > 0 and "?" not in sequence, sequence
    assert sequence == "1" * sequence.count("1") + "2" * sequence.count("2"), sequence
    print(f"\n{swapped[0]}; {len(sequence)} requests during the test: {sequence}")
    assert live_version(client) == versions["v2"]


def test_rollback_serves_the_previous_version_again(
    mlflow_server, client, served, versions, references, samples_dir
):
    registry.promote(client, MODEL, versions["v1"])
    serve(client, mlflow_server, served, versions["v2"])  # history ends v1, v2
    result = promote(mlflow_server, "--rollback")
    assert result.returncode == 0, result.stderr
    assert f"rolled back to version {versions['v1']}" in result.stdout
    assert sync(mlflow_server, served).returncode == 0
    assert close_to(infer(served, samples_dir), references["v1"])
    assert live_version(client) == versions["v1"]
    # The composing models keep the live and the previous Triton version; the ensemble only the live one.
    state = json.loads((served.repository / STATE_FILE).read_text())[MODEL]
    live = state["triton_version"]
    assert sorted(p.name for p in (served.repository / MODEL).iterdir() if p.is_dir()) == [str(live)]
    assert sorted(p.name for p in (served.repository / "tryon_warp").iterdir() if p.is_dir()) == [
        str(live - 1),
        str(live),
    ]


def test_a_gate_failed_version_needs_force(mlflow_server, client, served, versions, tryon_bundle, tmp_path):
    serve(client, mlflow_server, served, versions["v1"])
    failed = {
        "passed": False,
        "reason": "SSIM 0.4100 < 0.95",
        "quality": {"ssim_mean": 0.41, "psnr_mean": 12.5},
    }
    bundle = copy_bundle(tryon_bundle[0], tmp_path / "gate", lambda b, m: m.update(variants={"int8": failed}))
    version = registry.register_bundle(client, bundle, log=lambda _: None)
    assert version.tags[registry.GATE_TAG] == "failed"
    one_line_error(
        promote(mlflow_server, "--version", version.version), "failed its quality gate", "SSIM 0.41"
    )
    assert client.get_model_version_by_alias(MODEL, registry.ALIAS).version == versions["v1"]
    result = promote(mlflow_server, "--version", version.version, "--force")
    assert result.returncode == 0, result.stderr
    assert client.get_model_version_by_alias(MODEL, registry.ALIAS).version == version.version
    assert promote(mlflow_server, "--rollback").returncode == 0
    assert client.get_model_version_by_alias(MODEL, registry.ALIAS).version == versions["v1"]


def test_a_corrupted_artifact_never_reaches_the_served_repository(
    mlflow_server, client, served, versions, second_bundle, references, samples_dir, tmp_path
):
    serve(client, mlflow_server, served, versions["v1"])
    before = listing(served.repository)
    version = registry.register_bundle(client, second_bundle[0], log=lambda _: None)
    (stored,) = (mlflow_server.root / "artifacts").glob(
        f"*/{version.run_id}/artifacts/bundle/tryon_warp/model.onnx"
    )
    stored.write_bytes(stored.read_bytes()[:1000])  # truncated in the artifact store
    registry.promote(client, MODEL, version.version)
    try:
        one_line_error(sync(mlflow_server, served), f"version {version.version} in MLflow", "sha256")
    finally:
        registry.rollback(client, MODEL)
    assert listing(served.repository) == before
    assert close_to(infer(served, samples_dir), references["v1"])
    assert live_version(client) == versions["v1"]


def _unloadable(bundle: Path, manifest: dict) -> None:
    """Postprocess replaced by a model the ONNX checker accepts but ONNX Runtime cannot load."""
    path = bundle / "tryon_postprocess" / "model.onnx"
    original = onnx.load(str(path))
    node = helper.make_node("NoSuchOp", ["image"], ["tryon_image"], domain="fashionserve.test")
    graph = helper.make_graph([node], "unloadable", list(original.graph.input), list(original.graph.output))
    opsets = [*original.opset_import, helper.make_opsetid("fashionserve.test", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=original.ir_version), str(path))
    manifest["models"]["tryon_postprocess"]["sha256"] = sha256_file(path)


def test_a_version_that_fails_to_load_leaves_the_live_one_serving(
    mlflow_server, client, served, versions, tryon_bundle, references, samples_dir, tmp_path
):
    serve(client, mlflow_server, served, versions["v1"])
    before = listing(served.repository)
    bundle = copy_bundle(tryon_bundle[0], tmp_path / "unloadable", _unloadable)
    version = registry.register_bundle(client, bundle, log=lambda _: None)  # valid ONNX, so it registers
    registry.promote(client, MODEL, version.version)
    try:
        with Traffic(served, samples_dir) as traffic:
            result = sync(mlflow_server, served)
    finally:
        registry.rollback(client, MODEL)
    one_line_error(result, "could not load tryon_postprocess", "NoSuchOp", "keeps serving")
    assert traffic.failures == [] and len(traffic.results) > 0
    assert listing(served.repository) == before
    assert close_to(infer(served, samples_dir), references["v1"])
    assert live_version(client) == versions["v1"]
    assert "up to date" in sync(mlflow_server, served).stdout


def test_expected_failures_are_one_line(mlflow_server, versions, tmp_path):
    one_line_error(
        run_cli("mlflow/promote.py", MODEL, "--version", "1", "--tracking-uri", "http://127.0.0.1:9"),
        "cannot reach MLflow at http://127.0.0.1:9",
    )
    one_line_error(promote(mlflow_server, "--version", "999"), "version 999")
    one_line_error(
        run_cli("mlflow/promote.py", "nope", "--rollback", "--tracking-uri", mlflow_server.url), "'nope'"
    )
    result = run_cli(
        "mlflow/sync.py", "--repository", str(tmp_path / "repo"), "--triton-url", "127.0.0.1:9",
        "--tracking-uri", mlflow_server.url,
    )  # fmt: skip
    one_line_error(result, "cannot reach Triton at 127.0.0.1:9")
    one_line_error(
        run_cli("mlflow/register.py", str(tmp_path / "nothing"), "--tracking-uri", mlflow_server.url),
        "does not exist",
    )


def test_scripts_find_the_mlflow_package_not_their_folder(mlflow_server, versions):
    # Run from inside mlflow/, where the script folder is first on sys.path: `import mlflow` must still
    # be the package (promote needs its client to answer).
    result = subprocess.run(
        [sys.executable, "promote.py", MODEL, "--version", versions["v1"], "--tracking-uri",
         mlflow_server.url],
        cwd=PROJECT_ROOT / "mlflow", capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not (PROJECT_ROOT / "mlflow" / "__init__.py").exists()


def test_mlflow_server_cli_starts_detached_and_stops(tmp_path):
    pid_file = tmp_path / "mlflow.pid"
    result = run_cli(
        "-m", "fashionserve.mlflow_server", "start", "--root", str(tmp_path / "store"), "--detach",
        "--pid-file", str(pid_file),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    url = next(line.split()[-1] for line in result.stdout.splitlines() if "tracking URI" in line)
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        assert response.status == 200
    assert (tmp_path / "store" / "mlflow.db").is_file()
    pid = int(pid_file.read_text())
    result = run_cli("-m", "fashionserve.mlflow_server", "stop", "--pid-file", str(pid_file))
    assert result.returncode == 0, result.stderr
    assert process_stat(pid) is None and not pid_file.exists()
    one_line_error(
        run_cli("-m", "fashionserve.mlflow_server", "stop", "--pid-file", str(pid_file)), "does not exist"
    )
    pid_file.write_text(f"{pid}\n")  # a PID file left behind by a server that is gone
    one_line_error(
        run_cli("-m", "fashionserve.mlflow_server", "stop", "--pid-file", str(pid_file)),
        "removed stale PID file",
    )
    assert not pid_file.exists()
