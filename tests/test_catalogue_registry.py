"""The catalogue pipelines through the MLflow registry, as try-on: both bundles (`garment_classifier`,
`fashion_generator`) are registered as their own models, promoted and synced into one real Triton
(explicit model control), and Triton's answers are compared with PyTorch and ONNX Runtime. A generator
version whose quantized variant failed the SWD gate is promoted only with --force.

Small configurations (8-channel classifier, 16x16 generator, random-init), one MLflow and one Triton
for the module; the tests share them and each leaves the fp32 versions promoted and served.
"""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from fashionserve import registry
from fashionserve.catalogue.bundle import (
    CLASSIFIER,
    GENERATOR,
    export_classifier_bundle,
    export_generator_bundle,
    load_fashion_generator,
    load_garment_classifier,
)
from fashionserve.catalogue.networks.classifier import ClassifierConfig
from fashionserve.catalogue.networks.pggan import PGGANConfig
from fashionserve.catalogue.quantize import GeneratorQuantizeOptions, quantize_generator_bundle
from fashionserve.catalogue.samples import draw_product_photo
from fashionserve.catalogue.stages import ClassifierServing, GarmentPreprocess, PGGANPostprocess
from fashionserve.client import TritonModelClient
from fashionserve.launcher import TritonServer
from fashionserve.quantization import open_session
from fashionserve.sync import LIVE_TAG, STATE_FILE, SyncResult, sync_once
from tests import test_mlflow
from tests.conftest import one_line_error, run_cli
from tests.test_faults_sync import STOP_TIMEOUT_S, SyncProcess

CLASSIFIER_CONFIG = ClassifierConfig(width=8, hidden=32)
GENERATOR_CONFIG = PGGANConfig(latent_dim=24, depth_scale0=16, depth_other_scales=(16, 8))  # 16x16
SEED = 3

# The try-on registry tests' module-scoped fixtures (one instance per module; the MLflow server is
# conftest's): its client, and Triton in explicit model control on an empty repository.
client, served = test_mlflow.client, test_mlflow.served


@pytest.fixture(scope="module")
def networks() -> dict[str, torch.nn.Module]:
    """The PyTorch references of both bundles (random-init, seeded)."""
    classifier, classifier_provenance = load_garment_classifier(None, CLASSIFIER_CONFIG, SEED)
    generator, generator_provenance = load_fashion_generator(None, GENERATOR_CONFIG, SEED)
    return {
        CLASSIFIER: (classifier, classifier_provenance),
        GENERATOR: (generator, generator_provenance),
    }


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, networks) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    export_classifier_bundle(*networks[CLASSIFIER], root / CLASSIFIER, log=lambda _: None)
    export_generator_bundle(*networks[GENERATOR], root / GENERATOR, log=lambda _: None)
    return {CLASSIFIER: root / CLASSIFIER, GENERATOR: root / GENERATOR}


@pytest.fixture(scope="module")
def versions(mlflow_server, bundles) -> dict[str, str]:
    """Both bundles registered through the CLI (no --model: the registered model is the pipeline)."""
    registered = {}
    for name, bundle in bundles.items():
        result = run_cli("mlflow/register.py", str(bundle), "--tracking-uri", mlflow_server.url)
        assert result.returncode == 0, result.stderr
        assert "random-init: outputs are noise" in result.stdout
        registered[name] = result.stdout.split(f"registered '{name}' version ")[1].split()[0]
    return registered


def sync(mlflow_server, served, model: str, *extra: str):
    return run_cli(
        "mlflow/sync.py", "--model", model,
        "--repository", str(served.repository), "--triton-url", served.http_url,
        "--tracking-uri", mlflow_server.url, *extra,
    )  # fmt: skip


def promote(mlflow_server, model: str, *args: str):
    return run_cli("mlflow/promote.py", model, *args, "--tracking-uri", mlflow_server.url)


def serve(mlflow_server, served, model: str, version: str, *extra: str) -> None:
    """Promote `version` and sync it, both through the CLIs."""
    promoted = promote(mlflow_server, model, "--version", version)
    assert promoted.returncode == 0, promoted.stderr
    synced = sync(mlflow_server, served, model, *extra)
    assert synced.returncode == 0, synced.stderr


def live_version(client, model: str) -> str | None:
    holders = [v.version for v in client.search_model_versions(f"name='{model}'") if LIVE_TAG in v.tags]
    assert len(holders) <= 1, holders
    return holders[0] if holders else None


def classify(served) -> tuple[list[np.ndarray], list[dict[str, np.ndarray]]]:
    """Drawn product photos of two sizes (one request each) and Triton's answers."""
    photos = [
        np.stack([draw_product_photo(label, 90, 70, label) for label in (0, 1)]),
        draw_product_photo(8, 41, 133, 5)[None],
    ]
    triton = TritonModelClient(served.grpc_url, CLASSIFIER)
    try:
        return photos, [triton.infer({"image": batch}) for batch in photos]
    finally:
        triton.close()


def latents(count: int = 3) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((count, GENERATOR_CONFIG.latent_dim)).astype(np.float32)


def generate(served, z: np.ndarray) -> np.ndarray:
    triton = TritonModelClient(served.http_url, GENERATOR, "http")
    try:
        return triton.infer({"latents": z})["fashion_image"]
    finally:
        triton.close()


def generate_with_onnx_runtime(bundle: Path, network_file: str, z: np.ndarray) -> np.ndarray:
    network = open_session(bundle / network_file)
    postprocess = open_session(bundle / "fashion_generator_postprocess" / "model.onnx")
    return postprocess.run(None, {"image": network.run(None, {"latents": z})[0]})[0]


# ---------------------------------------------------------------------------------------------------


def test_each_pipeline_is_its_own_registered_model_with_tags_and_metrics(client, versions):
    for name, version in versions.items():
        model_version = client.get_model_version(name, version)
        tags = model_version.tags
        assert tags["pipeline"] == name and tags["weights"] == registry.RANDOM_INIT
        assert registry.RANDOM_INIT in tags and tags["seed"] == str(SEED)
        assert tags[registry.GATE_TAG] == "passed" and tags["variants"] == "none (fp32 only)"
        metrics = client.get_run(model_version.run_id).data.metrics
        parity = {k for k in metrics if k.startswith("parity_max_error/")}
        assert parity and all(k.split("/")[1].startswith(name) for k in parity), parity
    assert client.get_model_version(GENERATOR, versions[GENERATOR]).tags["resolution"] == "16x16"
    assert "resolution" not in client.get_model_version(CLASSIFIER, versions[CLASSIFIER]).tags  # any size
    trained = {"models": {}, "training_report": {"accuracy": 0.91, "macro_f1": 0.905}}
    assert registry.bundle_metrics(trained) == {"training/accuracy": 0.91, "training/macro_f1": 0.905}


def test_both_pipelines_are_promoted_synced_and_served_side_by_side(
    mlflow_server, client, served, versions, networks
):
    for name, version in versions.items():
        serve(mlflow_server, served, name, version)
        assert live_version(client, name) == version
    # The classifier's image has dynamic height and width: the post-load check needed a size for them.
    photos, answers = classify(served)
    classifier = torch.nn.Sequential(GarmentPreprocess(), ClassifierServing(networks[CLASSIFIER][0])).eval()
    for batch, answer in zip(photos, answers, strict=True):
        with torch.no_grad():
            probabilities, _ = classifier(torch.from_numpy(batch))
        assert np.allclose(answer["probabilities"], probabilities.numpy(), atol=1e-4)
        assert np.array_equal(answer["label"][:, 0], answer["probabilities"].argmax(1))
    z = latents()
    with torch.no_grad():
        expected = PGGANPostprocess()(networks[GENERATOR][0](torch.from_numpy(z))).numpy()
    images = generate(served, z)
    assert images.shape == (3, 16, 16, 3) and np.abs(images.astype(int) - expected).max() <= 1
    for name in versions:  # a second sync changes nothing
        assert not sync_api(client, served, name).changed


def test_a_model_that_fails_does_not_keep_the_others_from_being_synced(mlflow_server, served, versions):
    """One sync run for several models: the one without a registered version is one `error:` line and
    exit 2; the others are still synced (here: already live, so up to date)."""
    result = sync(mlflow_server, served, "no_such_model", "--model", CLASSIFIER, "--model", GENERATOR)
    one_line_error(result, "'no_such_model'")
    assert [line.split(" version ")[0] for line in result.stdout.splitlines()] == [
        f"up to date: '{CLASSIFIER}'",
        f"up to date: '{GENERATOR}'",
    ], result.stdout


def sync_api(client, served, name: str, variant: str = "fp32") -> SyncResult:
    return sync_once(client, name, served.repository, served.http_url, variant=variant, log=lambda _: None)


def test_an_swd_gate_failed_generator_needs_force_then_serves_its_variant(
    mlflow_server, client, served, versions, bundles, tmp_path
):
    registry.promote(client, GENERATOR, versions[GENERATOR])
    sync_api(client, served, GENERATOR)
    bundle = tmp_path / GENERATOR
    shutil.copytree(bundles[GENERATOR], bundle)
    options = GeneratorQuantizeOptions(
        variants=("int8",), calibration_samples=4, eval_samples=8, max_swd={"int8": 1e-9}
    )
    manifest = quantize_generator_bundle(bundle, options, log=lambda _: None)
    assert not manifest["variants"]["int8"]["passed"]
    model_version = registry.register_bundle(client, bundle, log=lambda _: None)
    version = model_version.version
    assert (
        model_version.tags[registry.GATE_TAG] == "failed" and model_version.tags["variants"] == "int8=failed"
    )
    assert model_version.tags["quality_gate_reason"].startswith("int8: SWDx1e3 ")
    metrics = client.get_run(model_version.run_id).data.metrics
    assert metrics["int8/gate_passed"] == 0.0 and metrics["int8/SWDx1e3_avg"] > 1e-9

    error = one_line_error(promote(mlflow_server, GENERATOR, "--version", version), "--force")
    assert "failed its quality gate (int8: SWDx1e3 " in error and "> 1e-09" in error
    assert client.get_model_version_by_alias(GENERATOR, registry.ALIAS).version == versions[GENERATOR]
    registry.promote(client, GENERATOR, version, force=True)
    try:
        sync_api(client, served, GENERATOR, variant="int8")
        z = latents()
        int8_file = manifest["variants"]["int8"]["networks"]["fashion_generator_network"]["file"]
        served_images = generate(served, z)
        assert np.abs(served_images.astype(int) - generate_with_onnx_runtime(bundle, int8_file, z)).max() <= 1
        fp32_file = manifest["models"]["fashion_generator_network"]["file"]
        assert not np.array_equal(served_images, generate_with_onnx_runtime(bundle, fp32_file, z))
        assert live_version(client, GENERATOR) == version
    finally:
        registry.rollback(client, GENERATOR)
        sync_api(client, served, GENERATOR)
    assert live_version(client, GENERATOR) == versions[GENERATOR]
    assert live_version(client, CLASSIFIER) == versions[CLASSIFIER]  # the other pipeline was untouched


# ---------------------------------------------------------------------------------------------------
# One sync process for both models (as compose and k8s run it)


def served_labels(triton: TritonServer, ensemble: str) -> dict[str, str]:
    """The parameters sync wrote into the loaded ensemble's config, as any client reads them (gRPC)."""
    connection = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        config = connection.get_model_config(ensemble, as_json=True)["config"]
    finally:
        connection.close()
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def test_one_watching_sync_serves_both_models_and_swaps_each_live(
    mlflow_server, client, versions, bundles, tmp_path
):
    """`mlflow/sync.py --model A --model B --watch` on an empty repository: both go live, one state file
    records both, a promotion of one swaps only that one (its answers stay right), SIGTERM stops it."""
    for name, version in versions.items():
        registry.promote(client, name, version)
    (tmp_path / "served").mkdir()
    with TritonServer(repository=tmp_path / "served", model_control="explicit") as triton:
        command = [
            sys.executable, "mlflow/sync.py", "--model", CLASSIFIER, "--model", GENERATOR,
            "--repository", str(triton.repository), "--triton-url", triton.http_url,
            "--tracking-uri", mlflow_server.url, "--watch", "--interval", "1",
        ]  # fmt: skip
        watcher = SyncProcess(command, dict(os.environ))
        try:
            watcher.wait_for(f"live: {GENERATOR} version {versions[GENERATOR]} as Triton version 1")
            assert any(
                f"live: {CLASSIFIER} version {versions[CLASSIFIER]} " in line for line in watcher.lines
            )
            state = json.loads((triton.repository / STATE_FILE).read_text())
            assert {name: entry["mlflow_version"] for name, entry in state.items()} == versions
            assert all(live_version(client, name) == version for name, version in versions.items())
            for name, version in versions.items():  # what the web app's status line reads
                assert served_labels(triton, name) == {
                    "registered_model": name, "registered_version": version, "random_init": "true",
                }  # fmt: skip
            z = latents()
            generated = generate(triton, z)

            # A new classifier version (the same bundle registered again) goes live; the generator stays.
            second = registry.register_bundle(client, bundles[CLASSIFIER], log=lambda _: None).version
            registry.promote(client, CLASSIFIER, second)
            watcher.wait_for(f"live: {CLASSIFIER} version {second} as Triton version 2")
            assert served_labels(triton, CLASSIFIER)["registered_version"] == second
            assert served_labels(triton, GENERATOR)["registered_version"] == versions[GENERATOR]
            state = json.loads((triton.repository / STATE_FILE).read_text())
            assert (state[CLASSIFIER]["triton_version"], state[GENERATOR]["triton_version"]) == (2, 1)
            assert np.array_equal(generate(triton, z), generated)
            photos, answers = classify(triton)
            assert [a["probabilities"].shape[0] for a in answers] == [len(p) for p in photos]
            watcher.process.send_signal(signal.SIGTERM)
            assert watcher.finish(STOP_TIMEOUT_S) == 0
        finally:
            watcher.finish(10)
            registry.promote(client, CLASSIFIER, versions[CLASSIFIER])  # as the other tests left it
    assert watcher.lines[-1].startswith("stopped") and "error" not in "".join(watcher.lines), watcher.lines
