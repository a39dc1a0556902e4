"""The try-on pipeline: stage parity, the Triton ensemble against the PyTorch reference, bad inputs."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from fashionserve.cli import RANDOM_INIT
from fashionserve.client import ClientError, TritonModelClient
from fashionserve.onnx_export import OPSET, run_onnx
from fashionserve.tryon.bundle import STAGES, stage_inputs
from fashionserve.tryon.dataset import load_tryon_inputs, read_pairs
from fashionserve.tryon.stages import TryonWarp
from tests.conftest import TEST_CONFIG


def sample_batch(samples_dir) -> dict[str, np.ndarray]:
    """The sample pairs as one batch in the client contract."""
    pairs = read_pairs(samples_dir / "test_pairs.txt")
    samples = [load_tryon_inputs(samples_dir, person, cloth) for person, cloth in pairs]
    return {name: np.stack([s[name] for s in samples]) for name in samples[0]}


def as_args(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(batch[name]) for name in STAGES[0].inputs)


def test_manifest_records_contract_and_provenance(tryon_bundle):
    _, manifest = tryon_bundle
    assert manifest["weights"] == RANDOM_INIT and manifest["random_init"] is True
    assert manifest["opset"] == OPSET
    assert [m for m in manifest["models"]] == [s.name for s in STAGES]
    contract = {s["name"]: (s["dtype"], s["shape"]) for s in manifest["input_contract"]}
    assert contract == {
        "cloth": ("uint8", [256, 192, 3]),
        "cloth_mask": ("uint8", [256, 192]),
        "agnostic": ("uint8", [256, 192, 3]),
        "densepose": ("uint8", [256, 192, 3]),
        "parse_agnostic": ("uint8", [256, 192]),
    }
    assert manifest["output_contract"] == [{"name": "tryon_image", "dtype": "uint8", "shape": [256, 192, 3]}]
    for stage in STAGES:
        errors = manifest["models"][stage.name]["parity_max_error"]
        assert set(errors) == set(stage.outputs)
        assert all(0 <= e <= stage.tolerance for e in errors.values())


def test_tracked_wiring_equals_reference_pipeline(tryon_pipeline, samples_dir):
    pipeline, _ = tryon_pipeline
    args = as_args(sample_batch(samples_dir))
    recorded = stage_inputs(pipeline, args)
    with torch.no_grad():
        reference = pipeline(*args)
    assert torch.equal(recorded["tryon_postprocess"][1][0], reference)


def test_every_stage_matches_pytorch_on_sample_inputs(tryon_bundle, tryon_pipeline, samples_dir):
    bundle, _ = tryon_bundle
    pipeline, _ = tryon_pipeline
    recorded = stage_inputs(pipeline, as_args(sample_batch(samples_dir)))
    for stage in STAGES:
        session = ort.InferenceSession(
            str(bundle / stage.name / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        args, expected = recorded[stage.name]
        for name, reference, actual in zip(stage.outputs, expected, run_onnx(session, args), strict=True):
            assert actual.shape == tuple(reference.shape), (stage.name, name)
            if name == "parse":
                flipped = (reference.argmax(1).numpy() != actual.argmax(1)).mean()
                assert flipped <= 1e-3, (stage.name, name, flipped)
            else:
                error = np.abs(reference.double().numpy() - actual.astype(np.float64)).max()
                assert error <= stage.tolerance, (stage.name, name, error)


def test_warp_follows_the_official_constants():
    warp = TryonWarp(TEST_CONFIG)
    taps = warp.blur_vertical[0].flatten()
    assert taps.shape == (15,)
    assert taps[7].item() == pytest.approx(0.134598, abs=1e-6)  # sigma 3 centre tap
    assert taps[0].item() == pytest.approx(0.008847, abs=1e-6)
    # flow divisors (W - 1) / 2 and (H - 1) / 2 of the flow grid (64x48 at a 128x96 condition size)
    assert warp.flow_divisors == (23.5, 31.5)
    # identity grid as the official make_grid: linspace(-1, 1) on both axes, (x, y) order
    assert warp.grid[0, 0, 0].tolist() == [-1.0, -1.0]
    assert warp.grid[0, -1, -1].tolist() == [1.0, 1.0]
    assert warp.grid[0, 0, 1, 0].item() == pytest.approx(-1 + 2 / (TEST_CONFIG.width - 1))


def test_ensemble_equals_reference_pipeline_for_a_batch_of_two(tryon_server, tryon_pipeline, samples_dir):
    pipeline, _ = tryon_pipeline
    batch = sample_batch(samples_dir)
    assert len(batch["cloth"]) == 2
    client = TritonModelClient(tryon_server.grpc_url, "tryon", "grpc")
    served = client.infer(batch)["tryon_image"]
    client.close()
    with torch.no_grad():
        reference = pipeline(*as_args(batch)).numpy()
    assert served.dtype == np.uint8 and served.shape == (2, 256, 192, 3)
    difference = np.abs(served.astype(np.int16) - reference.astype(np.int16))
    assert difference.mean() < 0.5, difference.mean()
    assert (difference > 8).mean() < 0.01  # a few pixels may move where a label flips at a region border
    assert not np.array_equal(served[0], served[1])  # two different pairs give two different images


def test_http_and_grpc_agree(tryon_server, samples_dir):
    batch = {name: array[:1] for name, array in sample_batch(samples_dir).items()}
    outputs = []
    for protocol, url in (("grpc", tryon_server.grpc_url), ("http", tryon_server.http_url)):
        client = TritonModelClient(url, "tryon", protocol)
        outputs.append(client.infer(batch)["tryon_image"])
        client.close()
    assert np.array_equal(outputs[0], outputs[1])


def raw_infer(url: str, model: str, output: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Send to `model` over HTTP without client-side validation, as a foreign client would; returns
    `output`."""
    client = httpclient.InferenceServerClient(url)
    tensors = []
    for name, array in inputs.items():
        tensor = httpclient.InferInput(
            name, list(array.shape), "UINT8" if array.dtype == np.uint8 else "FP32"
        )
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    try:
        return client.infer(model, tensors).as_numpy(output)
    finally:
        client.close()


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda b: {**b, "cloth": b["cloth"][:, :100]}, "cloth"),
        (lambda b: {**b, "densepose": b["densepose"].astype(np.float32)}, "densepose"),
        (
            lambda b: {**b, "parse_agnostic": np.full_like(b["parse_agnostic"], 25)},
            "values up to 25, expected 0..19",
        ),
    ],
    ids=["wrong-shape", "wrong-dtype", "label-out-of-range"],
)
def test_server_rejects_bad_input_and_keeps_serving(tryon_server, samples_dir, change, expected):
    batch = {name: array[:1] for name, array in sample_batch(samples_dir).items()}
    with pytest.raises(InferenceServerException) as error:
        raw_infer(tryon_server.http_url, "tryon", "tryon_image", change(batch))
    assert expected in error.value.message()
    assert raw_infer(tryon_server.http_url, "tryon", "tryon_image", batch).shape == (1, 256, 192, 3)


def test_client_validates_before_sending(tryon_server, samples_dir):
    batch = {name: array[:1] for name, array in sample_batch(samples_dir).items()}
    client = TritonModelClient(tryon_server.grpc_url, "tryon", "grpc")
    with pytest.raises(
        ClientError, match=r"input 'cloth': expected shape \[batch, 256, 192, 3\], got \[1, 100, 192, 3\]"
    ):
        client.infer({**batch, "cloth": batch["cloth"][:, :100]})
    with pytest.raises(ClientError, match="input 'cloth_mask': expected dtype uint8, got float32"):
        client.infer({**batch, "cloth_mask": batch["cloth_mask"].astype(np.float32)})
    with pytest.raises(ClientError, match="batch 5 is outside 1..4"):
        client.infer({name: np.concatenate([array] * 5) for name, array in batch.items()})
    client.close()
    with pytest.raises(ClientError, match="model 'nope'"):
        TritonModelClient(tryon_server.grpc_url, "nope", "grpc")
