"""The `hair` registered model: one bundle serving two ensembles, registered, promoted and synced into a
real Triton (explicit model control) from a real `mlflow server`; v1 then v2 swap in for both ensembles.

v1 is the session's tiny HairFastGAN bundle; v2 is the same bundle with a retrained (here: re-initialised)
e4e encoder, which both ensembles run (it shows in hair_edit's images), and post-process, which shows in
hair_transfer's: the two stages are re-exported in place, so that both outputs visibly change without a
second full export."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fashionserve import registry
from fashionserve.bundle import read_manifest, write_manifest
from fashionserve.checkpoints import sha256_file
from fashionserve.client import TritonModelClient
from fashionserve.hair.bundle import (
    EDIT,
    PIPELINE,
    STAGES,
    TRANSFER,
    edit_inputs,
    stage_runs,
    transfer_inputs,
)
from fashionserve.hair.stages import HairPipeline
from fashionserve.launcher import TritonServer
from fashionserve.onnx_export import export_onnx, max_abs_error, run_onnx
from fashionserve.sync import LIVE_TAG, STATE_FILE
from tests.conftest import HAIR_CONFIG, hair_test_pipeline, run_cli

ENSEMBLES = {
    TRANSFER: (transfer_inputs, ("face", "shape_reference", "color_reference")),
    EDIT: (edit_inputs, ("portrait", "direction", "strength")),
}
ENCODER = "hair_encoder"
RETRAINED = {ENCODER: "e4e", "hair_post_process": "post_process"}  # stage -> its network


def with_retrained_networks(bundle: Path, dest: Path, seed: int) -> HairPipeline:
    """Copy `bundle` to `dest` with the RETRAINED networks taken from seed `seed`'s pipeline and their
    stages re-exported in place (parity and sha256 recorded in the manifest); returns the PyTorch pipeline
    that `dest` serves."""
    shutil.copytree(bundle, dest)
    pipeline, retrained = hair_test_pipeline()[0], hair_test_pipeline(seed)[0]
    for network in RETRAINED.values():
        source, target = getattr(retrained.networks, network), getattr(pipeline.networks, network)
        target.load_state_dict(source.state_dict())
        for name, buffer in source.named_buffers():  # the non-persistent ones too (the average latents)
            target.get_buffer(name).copy_(buffer)
    runs = stage_runs(pipeline, TRANSFER, transfer_inputs(HAIR_CONFIG, 2, seed))
    manifest = read_manifest(dest)
    batch = manifest["max_batch_size"]
    for stage in (s for s in STAGES if s.name in RETRAINED):
        args = tuple(tensor[:batch] for tensor in runs[stage.name][0])
        expected = runs[stage.name][1]
        path = dest / manifest["models"][stage.name]["file"]
        module = pipeline.stages[stage.name]
        export_onnx(module, args, path, list(stage.inputs), list(stage.outputs), batch)
        actual = run_onnx(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), args)
        errors = {
            n: max_abs_error(e[:batch], a) for n, e, a in zip(stage.outputs, expected, actual, strict=True)
        }
        assert max(errors.values()) <= stage.tolerance, (stage.name, errors)
        manifest["models"][stage.name].update(sha256=sha256_file(path), parity_max_error=errors)
    write_manifest(dest, manifest)
    return pipeline


@pytest.fixture(scope="module")
def bundles(hair_bundle, hair_pipeline, tmp_path_factory) -> dict[str, tuple[Path, HairPipeline]]:
    """v1 and v2: (bundle, PyTorch reference)."""
    v2 = tmp_path_factory.mktemp("hair-v2") / "hair"
    return {
        "v1": (hair_bundle[0], hair_pipeline),
        "v2": (v2, with_retrained_networks(hair_bundle[0], v2, seed=1)),
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """Triton on an empty repository, models loaded only through the repository API."""
    with TritonServer(repository=tmp_path_factory.mktemp("served"), model_control="explicit") as server:
        yield server


def infer_both(served) -> dict[str, np.ndarray]:
    outputs = {}
    for ensemble, (make_inputs, names) in ENSEMBLES.items():
        client = TritonModelClient(served.grpc_url, ensemble)
        inputs = make_inputs(HAIR_CONFIG, 2, 3)
        outputs[ensemble] = client.infer({n: t.numpy() for n, t in zip(names, inputs, strict=True)})
        client.close()
    return {ensemble: output["hair_image"] for ensemble, output in outputs.items()}


def references(pipeline: HairPipeline) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {
            TRANSFER: pipeline.transfer(*transfer_inputs(HAIR_CONFIG, 2, 3)).numpy(),
            EDIT: pipeline.edit(*edit_inputs(HAIR_CONFIG, 2, 3)).numpy(),
        }


def close_to(served_output: np.ndarray, reference: np.ndarray) -> bool:
    difference = np.abs(served_output.astype(np.int16) - reference.astype(np.int16))
    return difference.mean() < 0.5 and (difference > 8).mean() < 0.01  # a parser label may flip near ties


def sync(mlflow_server, served) -> subprocess.CompletedProcess:
    return run_cli(
        "mlflow/sync.py", "--model", PIPELINE, "--repository", str(served.repository),
        "--triton-url", served.http_url, "--tracking-uri", mlflow_server.url,
    )  # fmt: skip


def test_register_promote_and_sync_swap_both_ensembles(mlflow_server, bundles, served):
    client = registry.connect(mlflow_server.url)
    versions = {}
    for label, (bundle, _) in bundles.items():
        result = run_cli("mlflow/register.py", str(bundle), "--tracking-uri", mlflow_server.url)
        assert result.returncode == 0, result.stderr
        versions[label] = result.stdout.split(f"registered '{PIPELINE}' version ")[1].split()[0]
    tags = client.get_model_version(PIPELINE, versions["v1"]).tags
    assert (
        tags["pipeline"] == PIPELINE and tags["resolution"] == "256x256" and tags["weights"] == "random-init"
    )
    assert tags["architecture"] == "hairfastgan"
    run = client.get_run(client.get_model_version(PIPELINE, versions["v1"]).run_id)
    assert run.data.params["config.widths"] == "tiny"
    configs = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model_repository")}
    assert {TRANSFER, EDIT, *(stage.name for stage in STAGES)} == configs

    expected = {label: references(pipeline) for label, (_, pipeline) in bundles.items()}
    for label in ("v1", "v2"):
        registry.promote(client, PIPELINE, versions[label])
        result = sync(mlflow_server, served)
        assert result.returncode == 0, result.stderr
        outputs = infer_both(served)
        other = "v2" if label == "v1" else "v1"
        for ensemble in ENSEMBLES:
            assert close_to(outputs[ensemble], expected[label][ensemble]), (label, ensemble)
            assert not close_to(outputs[ensemble], expected[other][ensemble]), (label, ensemble)  # swapped
    state = json.loads((served.repository / STATE_FILE).read_text())[PIPELINE]
    assert list(state["ensembles"]) == [TRANSFER, EDIT] and state["mlflow_version"] == versions["v2"]
    live = state["triton_version"]
    assert sorted(p.name for p in (served.repository / TRANSFER).iterdir() if p.name.isdigit()) == [str(live)]
    assert sorted(int(p.name) for p in (served.repository / ENCODER).iterdir() if p.name.isdigit()) == [
        live - 1,
        live,
    ]  # the previous version stays until no request can use it
    again = sync(mlflow_server, served)
    assert again.returncode == 0 and "up to date: 'hair' version" in again.stdout, again.stderr
    assert client.get_model_version(PIPELINE, versions["v2"]).tags[LIVE_TAG] == "true"
