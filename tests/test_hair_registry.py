"""The `hair` registered model: one bundle serving two ensembles, registered, promoted and synced into a
real Triton (explicit model control) from a real `mlflow server`; v1 then v2 swap in for both ensembles.

v1 and v2 are small networks in the public checkpoint layouts (different seeds, parsers that find hair),
so their outputs differ visibly."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fashionserve import registry
from fashionserve.client import TritonModelClient
from fashionserve.hair.bundle import (
    EDIT,
    PIPELINE,
    TRANSFER,
    edit_inputs,
    export_bundle,
    load_networks,
    transfer_inputs,
)
from fashionserve.launcher import TritonServer
from fashionserve.sync import LIVE_TAG, STATE_FILE
from tests.conftest import run_cli
from tests.test_hair_pipeline import CONFIG, INPUTS, write_checkpoints

ENSEMBLES = {TRANSFER: transfer_inputs, EDIT: edit_inputs}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """v1 and v2: (bundle, PyTorch reference) exported from checkpoints of seeds 1 and 2."""
    root = tmp_path_factory.mktemp("hair-bundles")
    made = {}
    for label, seed in (("v1", 1), ("v2", 2)):
        checkpoints = write_checkpoints(root / f"checkpoints-{label}", seed)
        pipeline, provenance = load_networks(CONFIG, *checkpoints, None, seed=0)
        export_bundle(pipeline, provenance, root / f"hair-{label}", log=lambda _: None)
        made[label] = (root / f"hair-{label}", pipeline)
    return made


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """Triton on an empty repository, models loaded only through the repository API."""
    with TritonServer(repository=tmp_path_factory.mktemp("served"), model_control="explicit") as server:
        yield server


def infer_both(served) -> dict[str, np.ndarray]:
    outputs = {}
    for ensemble, make_inputs in ENSEMBLES.items():
        client = TritonModelClient(served.grpc_url, ensemble)
        inputs = make_inputs(CONFIG, 2, 3)
        outputs[ensemble] = client.infer(
            {n: t.numpy() for n, t in zip(INPUTS[ensemble], inputs, strict=True)}
        )
        client.close()
    return {ensemble: output["hair_image"] for ensemble, output in outputs.items()}


def references(pipeline) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {
            TRANSFER: pipeline.transfer(*transfer_inputs(CONFIG, 2, 3)).numpy(),
            EDIT: pipeline.edit(*edit_inputs(CONFIG, 2, 3)).numpy(),
        }


def close_to(served_output: np.ndarray, reference: np.ndarray) -> bool:
    difference = np.abs(served_output.astype(np.int16) - reference.astype(np.int16))
    return difference.mean() < 0.5 and (difference > 8).mean() < 0.01


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
    assert tags["pipeline"] == PIPELINE and tags["resolution"] == "64x64" and tags["weights"] == "checkpoint"
    assert tags["architecture"] == "e4e+stylegan2+bisenet"
    run = client.get_run(client.get_model_version(PIPELINE, versions["v1"]).run_id)
    assert run.data.params["config.hair_layers"] == "[4, 5, 6, 7]"
    configs = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model_repository")}
    assert {TRANSFER, EDIT, "hair_encoder", "hair_mix", "hair_edit_latent"} <= configs

    expected = {label: references(pipeline) for label, (_, pipeline) in bundles.items()}
    for label in ("v1", "v2"):
        registry.promote(client, PIPELINE, versions[label])
        result = sync(mlflow_server, served)
        assert result.returncode == 0, result.stderr
        outputs = infer_both(served)
        for ensemble in ENSEMBLES:
            assert close_to(outputs[ensemble], expected[label][ensemble]), (label, ensemble)
    assert not np.array_equal(expected["v1"][TRANSFER], expected["v2"][TRANSFER])  # the swap is visible
    state = json.loads((served.repository / STATE_FILE).read_text())[PIPELINE]
    assert list(state["ensembles"]) == [TRANSFER, EDIT] and state["mlflow_version"] == versions["v2"]
    live = state["triton_version"]
    assert sorted(p.name for p in (served.repository / TRANSFER).iterdir() if p.name.isdigit()) == [str(live)]
    assert sorted(
        int(p.name) for p in (served.repository / "hair_encoder").iterdir() if p.name.isdigit()
    ) == [
        live - 1,
        live,
    ]  # the previous version stays until no request can use it
    again = sync(mlflow_server, served)
    assert again.returncode == 0 and "up to date: 'hair' version" in again.stdout, again.stderr
    assert client.get_model_version(PIPELINE, versions["v2"]).tags[LIVE_TAG] == "true"
