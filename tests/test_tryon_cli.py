"""The try-on CLIs as a user runs them: export, render, client. Expected failures are one line, exit 2."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fashionserve.repository import RenderError, read_config, render_repository
from fashionserve.tryon.stages import build_networks
from tests.conftest import TEST_CONFIG, one_line_error, run_cli

SMALL_ARCH = [
    "--resolution", "256x192", "--condition-resolution", "128x96",
    "--condition-ngf", "8", "--image-ngf", "8", "--spade-hidden", "16",
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """Small-architecture checkpoints in the official layout (spectral norm as weight_orig/u/v)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(7)
    condition, image = build_networks(TEST_CONFIG)
    torch.save(condition.state_dict(), folder / "mtviton.pth")
    torch.save(image.state_dict(), folder / "gen.pth")
    return folder / "mtviton.pth", folder / "gen.pth"


def test_export_from_checkpoints_records_their_hashes(tmp_path, checkpoints):
    condition, image = checkpoints
    out = tmp_path / "bundle"
    result = run_cli(
        "export/tryon.py",
        "--condition-checkpoint",
        str(condition),
        "--image-checkpoint",
        str(image),
        *SMALL_ARCH,
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "[5/5] exporting tryon_postprocess" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["random_init"] is False and manifest["weights"] == "checkpoint"
    assert len(manifest["condition_checkpoint_sha256"]) == 64
    assert all((out / name / "model.onnx").is_file() for name in manifest["models"])
    assert not list(tmp_path.glob("*.partial"))


def test_export_names_mismatched_checkpoint_keys(tmp_path, checkpoints):
    condition, image = checkpoints
    state = torch.load(condition)
    state["extra.weight"] = torch.zeros(1)
    del state["flow_conv.0.bias"]
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    out = tmp_path / "bundle"
    result = run_cli(
        "export/tryon.py",
        "--condition-checkpoint",
        str(broken),
        "--image-checkpoint",
        str(image),
        *SMALL_ARCH,
        "--out",
        str(out),
    )
    one_line_error(result, "flow_conv.0.bias", "extra.weight")
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_export_rejects_missing_checkpoint_and_bad_arguments(tmp_path):
    missing = tmp_path / "nope.pth"
    result = run_cli(
        "export/tryon.py",
        "--condition-checkpoint",
        str(missing),
        "--image-checkpoint",
        str(missing),
        "--out",
        str(tmp_path / "b"),
    )
    one_line_error(result, str(missing))
    result = run_cli(
        "export/tryon.py", "--random-init", "--resolution", "250x190", "--out", str(tmp_path / "b")
    )
    one_line_error(result, "250x190")
    result = run_cli("export/tryon.py", "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "--random-init" in result.stderr
    assert not (tmp_path / "b").exists()


def test_render_targets(tmp_path, tryon_bundle):
    bundle, manifest = tryon_bundle
    names = render_repository(bundle, manifest, tmp_path / "cpu", target="cpu", version=3)
    assert names[0] == "tryon" and len(names) == 6
    image_generator = read_config(tmp_path / "cpu" / "tryon_image_generator" / "config.pbtxt")
    assert image_generator.backend == "python" and not image_generator.platform
    assert image_generator.instance_group[0].kind == image_generator.instance_group[0].KIND_CPU
    assert not image_generator.model_warmup
    assert list(image_generator.input[0].dims) == [3, 256, 192]
    assert (tmp_path / "cpu" / "tryon_image_generator" / "3" / "model.onnx").is_file()
    ensemble = read_config(tmp_path / "cpu" / "tryon" / "config.pbtxt")
    assert [list(t.dims) for t in ensemble.output] == [[256, 192, 3]]
    with pytest.raises(RenderError, match="no TensorRT plan"):
        render_repository(bundle, manifest, tmp_path / "gpu", target="gpu")
    assert not (tmp_path / "gpu").exists() and not (tmp_path / "gpu.partial").exists()
    with pytest.raises(RenderError, match="already exists"):
        render_repository(bundle, manifest, tmp_path / "cpu", target="cpu")


def test_client_writes_pngs_for_the_sample_pairs(tmp_path, tryon_server, samples_dir):
    out = tmp_path / "results"
    result = run_cli(
        "client/tryon.py",
        "--dataroot",
        str(samples_dir),
        "--url",
        tryon_server.grpc_url,
        "--batch",
        "2",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    written = sorted(out.glob("*.png"))
    assert len(written) == 2 and result.stdout.count("wrote ") == 2
    assert np.asarray(Image.open(written[0])).shape == (256, 192, 3)


def test_client_resizes_only_when_asked(tmp_path, tryon_server, samples_dir):
    big = tmp_path / "big"
    run = run_cli("client/make_samples.py", str(big), "--height", "512", "--width", "384")
    assert run.returncode == 0, run.stderr
    args = ["client/tryon.py", "--dataroot", str(big), "--url", tryon_server.http_url, "--protocol", "http"]
    result = run_cli(*args, "--out", str(tmp_path / "a"))
    one_line_error(result, "input 'cloth': expected shape [batch, 256, 192, 3], got [1, 512, 384, 3]")
    result = run_cli(*args, "--resize", "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "b").glob("*.png"))) == 2


def test_client_errors_are_one_line(tmp_path, tryon_server, samples_dir):
    result = run_cli(
        "client/tryon.py",
        "--dataroot",
        str(samples_dir),
        "--url",
        tryon_server.grpc_url,
        "--pair",
        "00001_00.jpg",
        "missing_00.jpg",
        "--out",
        str(tmp_path),
    )
    one_line_error(result, "missing_00")
    result = run_cli(
        "client/tryon.py", "--dataroot", str(samples_dir), "--url", "127.0.0.1:9", "--out", str(tmp_path)
    )
    one_line_error(result, "cannot reach Triton at 127.0.0.1:9")
    result = run_cli(
        "client/tryon.py",
        "--dataroot",
        str(samples_dir),
        "--url",
        tryon_server.grpc_url,
        "--model",
        "nope",
        "--out",
        str(tmp_path),
    )
    one_line_error(result, "nope")


def test_client_explicit_files_equal_the_folder_mode(tmp_path, tryon_server, samples_dir):
    test = samples_dir / "test"
    common = [
        "--url", tryon_server.grpc_url,
        "--person-image", str(test / "image" / "00001_00.jpg"),
        "--densepose", str(test / "image-densepose" / "00001_00.jpg"),
        "--parse-agnostic", str(test / "image-parse-agnostic-v3.2" / "00001_00.png"),
        "--cloth", str(test / "cloth" / "00002_00.jpg"),
        "--cloth-mask", str(test / "cloth-mask" / "00002_00.jpg"),
    ]  # fmt: skip
    pose = [
        "--parse", str(test / "image-parse-v3" / "00001_00.png"),
        "--keypoints", str(test / "openpose_json" / "00001_00_keypoints.json"),
    ]  # fmt: skip
    drawn = run_cli("client/tryon.py", *common, *pose, "--out", str(tmp_path / "a"))
    assert drawn.returncode == 0, drawn.stderr
    folder = run_cli("client/tryon.py", "--dataroot", str(samples_dir), "--url", tryon_server.grpc_url,
                     "--pair", "00001_00.jpg", "00002_00.jpg", "--out", str(tmp_path / "b"))  # fmt: skip
    assert folder.returncode == 0, folder.stderr
    name = "00001_00_00002_00.png"
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "a" / name)), np.asarray(Image.open(tmp_path / "b" / name))
    )

    # a ready agnostic image replaces the parse map and keypoints
    agnostic = tmp_path / "agnostic.png"
    Image.new("RGB", (192, 256), (128, 128, 128)).save(agnostic)
    ready = run_cli("client/tryon.py", *common, "--agnostic", str(agnostic), "--out", str(tmp_path / "c"))
    assert ready.returncode == 0, ready.stderr
    assert not np.array_equal(
        np.asarray(Image.open(tmp_path / "c" / name)), np.asarray(Image.open(tmp_path / "a" / name))
    )

    incomplete = run_cli("client/tryon.py", *common, "--out", str(tmp_path / "d"))
    assert incomplete.returncode == 2 and "explicit files missing: --parse, --keypoints" in incomplete.stderr
