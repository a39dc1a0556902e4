"""The catalogue pipelines as a user runs them: train on a drawn IDX set, export both bundles from
checkpoints, serve them through the real Triton (cpu target) next to try-on, call the clients, and gate
try-on garments. Triton's answers are compared with the PyTorch reference."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from fashionserve.bundle import read_manifest
from fashionserve.catalogue.networks.classifier import CLASSES
from fashionserve.catalogue.networks.pggan import load_pggan_checkpoint
from fashionserve.catalogue.samples import draw_product_photo, write_synthetic_set
from fashionserve.catalogue.stages import ClassifierServing, GarmentPreprocess, PGGANPostprocess
from fashionserve.catalogue.training import load_classifier
from fashionserve.client import ClientError, TritonModelClient
from fashionserve.launcher import TritonServer
from fashionserve.plans import HEAVY_NETWORKS, plan_networks, record_plan
from fashionserve.repository import RenderError, read_config, render_repository
from tests.conftest import one_line_error, run_cli
from tests.test_catalogue_generator import LATENT, save_zoo_checkpoint

TROUSER, T_SHIRT = CLASSES.index("Trouser"), CLASSES.index("T-shirt/top")
PERSON = "00001_00"


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> dict:
    """Train (drawn set), then export both pipelines from checkpoints with the CLIs."""
    root = tmp_path_factory.mktemp("catalogue")
    write_synthetic_set(root / "data", train=1000, test=300, seed=0)
    training = run_cli(
        "train/garment_classifier.py", "--data", str(root / "data"), "--out", str(root / "classifier.pt"),
        "--epochs", "4", "--batch-size", "64", "--width", "8", "--hidden", "32",
        "--report-json", str(root / "report.json"),
    )  # fmt: skip
    assert training.returncode == 0, training.stderr
    exported = run_cli(
        "export/garment_classifier.py", "--checkpoint", str(root / "classifier.pt"),
        "--out", str(root / "garment_classifier"),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    save_zoo_checkpoint(root / "pgan.pth")
    generated = run_cli(
        "export/fashion_generator.py", "--checkpoint", str(root / "pgan.pth"),
        "--out", str(root / "fashion_generator"),
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    return {"root": root, "training": training, "exported": exported, "generated": generated}


@pytest.fixture(scope="module")
def server(catalogue, tryon_bundle, tmp_path_factory):
    """One Triton serving try-on, the garment classifier and the fashion generator (cpu target)."""
    staging, repository = tmp_path_factory.mktemp("rendered"), tmp_path_factory.mktemp("triton") / "repo"
    repository.mkdir()
    bundles = [
        tryon_bundle[0],
        catalogue["root"] / "garment_classifier",
        catalogue["root"] / "fashion_generator",
    ]
    for bundle in bundles:
        names = render_repository(bundle, read_manifest(bundle), staging / bundle.name, target="cpu")
        for name in names:
            shutil.move(staging / bundle.name / name, repository / name)
    with TritonServer(repository=repository) as triton:
        yield triton


def test_training_reports_per_class_scores_and_writes_a_checkpoint(catalogue):
    out = catalogue["training"].stdout
    assert "1000 training, 300 test images" in out and "NOT the official Fashion-MNIST files" in out
    for name in CLASSES:
        assert name in out
    assert "macro avg" in out and "epoch 4/4" in out
    report = json.loads((catalogue["root"] / "report.json").read_text())["report"]
    assert report["macro_f1"] > 0.8  # the loop learns; the drawn set says nothing about real garments
    _, metadata = load_classifier(catalogue["root"] / "classifier.pt")
    assert metadata["data"]["official_fashion_mnist"] is False and metadata["options"]["epochs"] == 4


def test_bundles_record_their_provenance_and_contracts(catalogue):
    root = catalogue["root"]
    classifier = read_manifest(root / "garment_classifier")
    assert classifier["weights"] == "checkpoint" and classifier["random_init"] is False
    assert classifier["classes"] == list(CLASSES) and classifier["upper_body_classes"] == [0, 2, 4, 6]
    assert classifier["input_contract"] == [{"name": "image", "dtype": "uint8", "shape": [-1, -1, 3]}]
    assert classifier["training_report"]["macro_f1"] > 0.8
    generator = read_manifest(root / "fashion_generator")
    assert generator["config"]["resolution"] == 16 and generator["generator"] == "avgG"
    assert generator["input_contract"] == [{"name": "latents", "dtype": "float32", "shape": [LATENT]}]
    assert generator["output_contract"] == [{"name": "fashion_image", "dtype": "uint8", "shape": [16, 16, 3]}]
    assert "[2/2] exporting fashion_generator_postprocess" in catalogue["generated"].stdout


def test_gpu_target_serves_the_generator_as_a_plan_and_the_classifier_with_onnx_runtime(
    catalogue, tryon_bundle, tmp_path
):
    assert plan_networks(tryon_bundle[1]) == list(HEAVY_NETWORKS)
    classifier = catalogue["root"] / "garment_classifier"
    assert plan_networks(read_manifest(classifier)) == []
    render_repository(classifier, read_manifest(classifier), tmp_path / "classifier", target="gpu")
    preprocess = read_config(tmp_path / "classifier" / "garment_classifier_preprocess" / "config.pbtxt")
    assert preprocess.platform == "onnxruntime_onnx" and list(preprocess.input[0].dims) == [-1, -1, 3]
    generator = tmp_path / "fashion_generator"
    shutil.copytree(catalogue["root"] / "fashion_generator", generator)
    manifest = read_manifest(generator)
    assert plan_networks(manifest) == ["fashion_generator_network"]
    with pytest.raises(RenderError, match="fashion_generator_network: no TensorRT plan"):
        render_repository(generator, manifest, tmp_path / "unplanned", target="gpu")
    plan = "fashion_generator_network/model.fp32.sm90.trt10.13.3.9.plan"
    (generator / plan).write_bytes(b"plan")
    manifest = record_plan(
        manifest, "fashion_generator_network", {"file": plan, "variant": "fp32", "compute_capability": "9.0"}
    )
    render_repository(generator, manifest, tmp_path / "gpu", target="gpu")
    config = read_config(tmp_path / "gpu" / "fashion_generator_network" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and dict(config.cc_model_filenames) == {"9.0": Path(plan).name}
    assert list(config.output[0].dims) == [3, 16, 16]  # shapes come from the bundle, not the tracked 512
    assert list(config.model_warmup[0].inputs["latents"].dims) == [LATENT]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_classifier_through_triton_equals_pytorch(catalogue, server, protocol):
    model, _ = load_classifier(catalogue["root"] / "classifier.pt")
    reference = torch.nn.Sequential(GarmentPreprocess(), ClassifierServing(model)).eval()
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = TritonModelClient(url, "garment_classifier", protocol)
    for label, (height, width), batch in ((TROUSER, (300, 200), 1), (T_SHIRT, (97, 131), 2)):
        photos = np.stack([draw_product_photo(label, height, width, seed) for seed in range(batch)])
        outputs = client.infer({"image": photos})
        with torch.no_grad():
            probabilities, labels = reference(torch.from_numpy(photos))
        assert np.allclose(outputs["probabilities"], probabilities.numpy(), atol=1e-4)
        assert np.array_equal(outputs["label"], labels.numpy())
        assert outputs["label"][0, 0] == label
    client.close()


def test_classifier_rejects_bad_inputs_and_keeps_serving(server):
    client = TritonModelClient(server.grpc_url, "garment_classifier")
    with pytest.raises(ClientError, match="input 'image': expected dtype uint8, got float32"):
        client.infer({"image": np.zeros((1, 28, 28, 3), np.float32)})
    raw = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("image", [1, 28, 28, 4], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, 28, 28, 4), np.uint8))
    with pytest.raises(InferenceServerException, match="image"):
        raw.infer("garment_classifier", [tensor])
    assert client.infer({"image": draw_product_photo(T_SHIRT, 64, 48, 0)[None]})["label"].shape == (1, 1)
    client.close()


def test_generator_through_triton_equals_pytorch(catalogue, server):
    network = load_pggan_checkpoint(catalogue["root"] / "pgan.pth").eval()
    network.fold_equalized_lr()
    latents = np.random.default_rng(4).standard_normal((3, LATENT)).astype(np.float32)
    client = TritonModelClient(server.http_url, "fashion_generator", "http")
    images = client.infer({"latents": latents})["fashion_image"]
    with torch.no_grad():
        expected = PGGANPostprocess()(network(torch.from_numpy(latents))).numpy()
    assert images.dtype == np.uint8 and images.shape == (3, 16, 16, 3)
    assert np.abs(images.astype(int) - expected).max() <= 1  # rounding at .5 may differ
    client.close()


def test_generate_cli_writes_a_reproducible_contact_sheet(server, tmp_path):
    args = ["client/generate.py", "--count", "5", "--seed", "1", "--url", server.grpc_url]
    first = run_cli(*args, "--out", str(tmp_path / "a.png"), "--each", str(tmp_path / "each"))
    assert first.returncode == 0, first.stderr
    assert f"wrote {tmp_path / 'a.png'}: 5 images of 16x16" in first.stdout
    sheet = np.asarray(Image.open(tmp_path / "a.png"))
    assert sheet.shape == (2 * 16 + 3 * 4, 3 * 16 + 4 * 4, 3)  # 3 columns, 2 rows, 4-pixel gaps
    assert np.array_equal(sheet[4:20, 4:20], np.asarray(Image.open(tmp_path / "each" / "0000.png")))
    second = run_cli(*args, "--out", str(tmp_path / "b.png"))
    assert second.returncode == 0 and np.array_equal(sheet, np.asarray(Image.open(tmp_path / "b.png")))
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, LATENT + 1), np.float32))
    error = one_line_error(run_cli("client/generate.py", "--latents", str(wrong), "--url", server.grpc_url))
    assert f"expected latents of shape [count, {LATENT}], got [2, {LATENT + 1}]" in error


def test_generate_cli_labels_every_image_with_the_served_classifier(server, tmp_path):
    args = [
        "client/generate.py",
        "--count",
        "3",
        "--columns",
        "3",
        "--seed",
        "1",
        "--url",
        server.grpc_url,
        "--scale",
        "3",
    ]
    result = run_cli(*args, "--classifier", "garment_classifier", "--out", str(tmp_path / "labelled.png"))
    assert result.returncode == 0, result.stderr
    labels = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("   ")]
    assert len(labels) == 3 and all(label.rsplit(" ", 1)[0] in CLASSES for label in labels)
    sheet = np.asarray(Image.open(tmp_path / "labelled.png"))
    assert sheet.shape == (48 + 14 + 2 * 4, 3 * 48 + 4 * 4, 3)  # 3x enlarged, one caption strip
    caption = sheet[4 + 48 : 4 + 48 + 14, 4 : 4 + 48]
    assert (caption < 128).any() and (caption == 255).any()  # dark text on the white background
    assert run_cli(*args, "--out", str(tmp_path / "plain.png")).returncode == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain.png"))[4:52, 4:52], sheet[4:52, 4:52])


def test_classify_cli_names_class_confidence_and_group(server, tmp_path):
    Image.fromarray(draw_product_photo(TROUSER, 240, 180, 7)).save(tmp_path / "trousers.png")
    result = run_cli(
        "client/classify.py", str(tmp_path / "trousers.png"), "--top", "2", "--url", server.grpc_url
    )
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path / 'trousers.png'}: Trouser 0." in result.stdout and "(not upper-body)" in result.stdout
    assert "error: image not found" in one_line_error(run_cli("client/classify.py", str(tmp_path / "x.png")))


def garment_files(samples_dir: Path, folder: Path, label: int) -> list[str]:
    """Explicit-file arguments of one try-on pair: a sample person and a drawn garment of `label`."""
    photo = draw_product_photo(label, 256, 192, 11)
    mask = (np.abs(photo.astype(int) - 246).sum(-1) > 0).astype(np.uint8) * 255
    Image.fromarray(photo).save(folder / "garment.png")
    Image.fromarray(mask).save(folder / "garment_mask.png")
    split = samples_dir / "test"
    return [
        "--person-image", str(split / "image" / f"{PERSON}.jpg"),
        "--parse", str(split / "image-parse-v3" / f"{PERSON}.png"),
        "--keypoints", str(split / "openpose_json" / f"{PERSON}_keypoints.json"),
        "--densepose", str(split / "image-densepose" / f"{PERSON}.jpg"),
        "--parse-agnostic", str(split / "image-parse-agnostic-v3.2" / f"{PERSON}.png"),
        "--cloth", str(folder / "garment.png"), "--cloth-mask", str(folder / "garment_mask.png"),
    ]  # fmt: skip


def test_tryon_gate_refuses_trousers_unless_overridden(server, samples_dir, tmp_path):
    files = garment_files(samples_dir, tmp_path, TROUSER)
    out = tmp_path / "results"
    refused = run_cli("client/tryon.py", *files, "--url", server.grpc_url, "--out", str(out))
    error = one_line_error(refused)
    assert f"the garment of {PERSON}_garment looks like Trouser (confidence 0." in error
    assert "not an upper-body garment" in error and "--no-gate" in error
    assert not list(out.glob("*.png"))
    forced = run_cli("client/tryon.py", *files, "--no-gate", "--url", server.grpc_url, "--out", str(out))
    assert forced.returncode == 0, forced.stderr
    assert "gate:" not in forced.stdout and (out / f"{PERSON}_garment.png").is_file()


def test_tryon_gate_lets_a_top_through(server, samples_dir, tmp_path):
    files = garment_files(samples_dir, tmp_path, T_SHIRT)
    result = run_cli("client/tryon.py", *files, "--url", server.grpc_url, "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert f"gate: the garment of {PERSON}_garment looks like T-shirt/top (confidence" in result.stdout
    assert (tmp_path / "out" / f"{PERSON}_garment.png").is_file()


def test_tryon_without_a_served_classifier_skips_the_gate(tryon_server, samples_dir, tmp_path):
    files = garment_files(samples_dir, tmp_path, TROUSER)
    result = run_cli(
        "client/tryon.py", *files, "--url", tryon_server.grpc_url, "--out", str(tmp_path / "out")
    )
    assert result.returncode == 0, result.stderr
    assert "gate: garment_classifier is not served here; garments are not checked" in result.stdout
    assert (tmp_path / "out" / f"{PERSON}_garment.png").is_file()


def test_generator_variants_are_gated_by_swd(catalogue, tmp_path):
    bundle = tmp_path / "fashion_generator"
    shutil.copytree(catalogue["root"] / "fashion_generator", bundle)
    args = ["export/quantize.py", str(bundle), "--calibration-samples", "4", "--eval-samples", "8"]
    passed = run_cli(*args, "--max-swd-fp16", "1000", "--max-swd-int8", "1000")
    assert passed.returncode == 0, passed.stderr
    variants = read_manifest(bundle)["variants"]
    for variant in ("fp16", "int8"):
        record = variants[variant]
        assert record["passed"] and record["thresholds"] == {"max_swd_x1e3_avg": 1000.0}
        assert {"SWDx1e3_16", "SWDx1e3_avg", "ssim_mean"} <= set(record["quality"])
        assert (bundle / record["networks"]["fashion_generator_network"]["file"]).is_file()
    failed = run_cli(*args, "--variants", "int8", "--max-swd-int8", "1e-9")
    error = one_line_error(failed)
    assert error.startswith("error: quality gate failed: int8 (SWDx1e3 ") and "> 1e-09" in error
    manifest = read_manifest(bundle)
    assert manifest["variants"]["fp16"]["passed"] and not manifest["variants"]["int8"]["passed"]
    with pytest.raises(RenderError, match="the int8 variant failed its quality gate"):
        render_repository(bundle, manifest, tmp_path / "refused", target="cpu", variant="int8")
    render_repository(bundle, manifest, tmp_path / "forced", target="cpu", variant="int8", force=True)
    served = tmp_path / "forced" / "fashion_generator_network" / "1" / "model.onnx"
    assert served.read_bytes() == (bundle / "fashion_generator_network" / "model.int8.onnx").read_bytes()


def test_classifier_variants_are_gated_by_top1_agreement_and_probability_error(catalogue, tmp_path):
    bundle = tmp_path / "garment_classifier"
    shutil.copytree(catalogue["root"] / "garment_classifier", bundle)
    args = ["export/quantize.py", str(bundle), "--calibration-samples", "16", "--eval-samples", "40"]
    passed = run_cli(*args)
    assert passed.returncode == 0, passed.stderr
    assert "[int8] gate PASS: top-1 agreement " in passed.stdout
    manifest = read_manifest(bundle)
    for variant in ("fp16", "int8"):
        record = manifest["variants"][variant]
        assert record["passed"] and record["evaluation"] == {
            "source": "drawn product photos", "samples": 40, "seed": 16
        }  # fmt: skip
        assert record["quality"]["top1_agreement"] >= record["thresholds"]["min_top1_agreement"]
        assert 0 < record["quality"]["max_probability_error"] <= record["thresholds"]["max_probability_error"]
        network = record["networks"]["garment_classifier_network"]
        assert (bundle / network["file"]).is_file() and network["file"].endswith(f"model.{variant}.onnx")
    render_repository(bundle, manifest, tmp_path / "int8", target="cpu", variant="int8")
    served = tmp_path / "int8" / "garment_classifier_network" / "1" / "model.onnx"
    assert served.read_bytes() == (bundle / "garment_classifier_network" / "model.int8.onnx").read_bytes()
    error = one_line_error(run_cli(*args, "--variants", "int8", "--max-probability-error-int8", "0"))
    assert error.startswith("error: quality gate failed: int8 (probability error ") and "> 0)" in error
    assert not read_manifest(bundle)["variants"]["int8"]["passed"]
    error = one_line_error(run_cli("export/quantize.py", str(bundle), "--max-swd-int8", "5"))
    assert error == f"error: --max-swd-int8 does not apply to a garment_classifier bundle ({bundle})"


def test_quantize_refuses_a_pipeline_it_does_not_know(catalogue, tmp_path):
    manifest = read_manifest(catalogue["root"] / "garment_classifier")
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "pipeline": "makeup"}))
    error = one_line_error(run_cli("export/quantize.py", str(tmp_path)))
    assert error == (
        f"error: {tmp_path} is a 'makeup' bundle; "
        "quantize.py knows tryon, fashion_generator, garment_classifier, hair"
    )


def test_quantize_refuses_a_bundle_with_missing_files(catalogue, tmp_path):
    manifest = read_manifest(catalogue["root"] / "garment_classifier")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))  # the manifest without its ONNX files
    error = one_line_error(run_cli("export/quantize.py", str(tmp_path)))
    assert error == (
        f"error: {tmp_path} is incomplete: garment_classifier_preprocess/model.onnx is missing "
        "(export the bundle again)"
    )
