"""Faults on the request path and in process hygiene (issue 13), against the real Triton (cpu target):
crafted requests, non-finite inputs, a python stub that dies, a server killed with SIGKILL, and the CLIs
fed hostile files. Every loop is bounded. docs/hardening.md maps each case to what it guarantees."""

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fashionserve import launcher
from fashionserve.bundle import read_manifest
from fashionserve.client import ClientError, TritonModelClient
from fashionserve.launcher import TritonServer, python_stubs
from fashionserve.processes import process_stat, wait_until
from fashionserve.repository import render_repository
from tests.conftest import PROJECT_ROOT, run_cli

CLASSIFIER_MODELS = ("garment_classifier", "garment_classifier_preprocess", "garment_classifier_network")
LATENT_DIM = 16
RECOVERY_S = 60.0  # a reload of the tiny preprocess model takes about 2 s; the machine is shared
STUB_EXIT_S = 20.0


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line of a failed CLI run (exit 2, no traceback)."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    """Tiny random-init bundles of both catalogue pipelines, exported with the CLIs."""
    root = tmp_path_factory.mktemp("fault-bundles")
    exported = run_cli(
        "export/garment_classifier.py", "--random-init", "--width", "4", "--hidden", "8",
        "--out", str(root / "garment_classifier"),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    generated = run_cli(
        "export/fashion_generator.py", "--random-init", "--resolution", "8", "--max-channels", "8",
        "--latent-dim", str(LATENT_DIM), "--out", str(root / "fashion_generator"),
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    return root


def render(bundles: Path, names: tuple[str, ...], repository: Path) -> Path:
    """One cpu-target repository holding the models of the bundles `names`."""
    repository.mkdir(parents=True)
    for name in names:
        staging = repository.parent / f"{repository.name}-{name}"
        for model in render_repository(bundles / name, read_manifest(bundles / name), staging, target="cpu"):
            shutil.move(staging / model, repository / model)
        shutil.rmtree(staging)
    return repository


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    """Both catalogue pipelines in explicit model control, as quickstart.sh and sync.py run Triton."""
    repository = render(
        bundles, ("garment_classifier", "fashion_generator"), tmp_path_factory.mktemp("faults") / "repo"
    )
    with TritonServer(repository, model_control="explicit", load_models=["*"]) as triton:
        yield triton


@pytest.fixture
def classifier_repository(bundles, tmp_path) -> Path:
    """A repository of its own, so reaping its stubs cannot touch another server's."""
    return render(bundles, ("garment_classifier",), tmp_path / "repo")


def crafted_infer(url: str, model: str, name: str, shape: list[int], datatype: str, data: bytes) -> tuple:
    """A binary-data HTTP inference request with any declared shape (tritonclient refuses to build
    ones whose shape and data disagree); returns (status, body)."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": shape,
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(data)},
                }
            ]
        }
    ).encode()
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/infer",
        data=header + data,
        headers={
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def classify_ok(url: str) -> bool:
    photo = np.full((1, 32, 24, 3), 200, np.uint8)
    status, _ = crafted_infer(url, "garment_classifier", "image", list(photo.shape), "UINT8", photo.tobytes())
    return status == 200


@pytest.mark.parametrize(
    "shape", [[1, 2**62, 0, 3], [1, 2**40, 2**40, 3]], ids=["zero-bytes-huge-dim", "product-overflows"]
)
def test_overflowing_shape_does_not_take_the_model_down_for_good(server, shape):
    # Triton lets a zero-byte (or overflowing) shape through to the python stub, which dies building
    # the numpy array; the watchdog must reload the model so that later requests are served again.
    assert classify_ok(server.http_url)
    status, body = crafted_infer(server.http_url, "garment_classifier", "image", shape, "UINT8", b"")
    assert status != 200, body
    assert wait_until(lambda: classify_ok(server.http_url), RECOVERY_S), "the classifier never recovered"
    if b"not healthy" in body:  # the stub died: the watchdog reloaded its model
        assert "garment_classifier_preprocess" in server.reloaded


@pytest.mark.parametrize(
    "model, name, shape, datatype, payload, expected",
    [
        ("garment_classifier", "image", [1, 0, 5, 3], "UINT8", b"", "every dimension must be at least 1"),
        (
            "garment_classifier",
            "image",
            [1, 2049, 2048, 3],  # one row more than the tracked limit of 2048x2048 RGB
            "UINT8",
            bytes(2049 * 2048 * 3),
            "more than this model's limit of 12582912",
        ),
        (
            "fashion_generator",
            "latents",
            [1, LATENT_DIM],
            "FP32",
            np.full((1, LATENT_DIM), np.nan, np.float32).tobytes(),
            "input 'latents' holds NaN or infinite values",
        ),
        (
            "fashion_generator",
            "latents",
            [1, LATENT_DIM],
            "FP32",
            np.array([[np.inf] + [0.0] * (LATENT_DIM - 1)], np.float32).tobytes(),
            "input 'latents' holds NaN or infinite values",
        ),
    ],
    ids=["empty-dimension", "over-the-pixel-limit", "nan-latents", "inf-latent"],
)
def test_runner_refuses_bad_input_and_keeps_serving(server, model, name, shape, datatype, payload, expected):
    stubs_before = {s.pid for s in python_stubs() if s.server_pid == server.pid}
    status, body = crafted_infer(server.http_url, model, name, shape, datatype, payload)
    assert status != 200 and expected in body.decode(), body
    assert {s.pid for s in python_stubs() if s.server_pid == server.pid} == stubs_before  # none died
    assert classify_ok(server.http_url)
    latents = np.random.default_rng(1).standard_normal((1, LATENT_DIM)).astype(np.float32)
    status, body = crafted_infer(
        server.http_url, "fashion_generator", "latents", [1, LATENT_DIM], "FP32", latents.tobytes()
    )
    assert status == 200, body


def stubs_of(pid: int) -> list[int]:
    return [stub.pid for stub in python_stubs() if stub.server_pid == pid]


def test_stubs_die_with_a_server_killed_by_sigkill(classifier_repository):
    server = TritonServer(classifier_repository).start()
    try:
        pid = server.pid
        assert len(stubs_of(pid)) == 2
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not stubs_of(pid), STUB_EXIT_S), (
            f"stubs outlived their server: {stubs_of(pid)}"
        )
    finally:
        server.stop()


def test_a_start_reaps_orphaned_stubs_of_its_repository(classifier_repository):
    old = TritonServer(classifier_repository, watch_stubs=False).start()
    pid = old.detach()
    orphans = stubs_of(pid)
    assert len(orphans) == 2
    for stub in orphans:  # stopped stubs cannot notice by themselves that their server is gone
        os.kill(stub, signal.SIGSTOP)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    time.sleep(1.0)
    assert all(process_stat(stub) for stub in orphans)  # the fault this test is about
    with TritonServer(classifier_repository):
        assert not any(process_stat(stub) for stub in orphans)


def test_detached_start_survives_a_closed_stdout(classifier_repository, tmp_path):
    pid_file = tmp_path / "triton.pid"
    command = [
        sys.executable, "-m", "fashionserve.launcher", "start", "--repository", str(classifier_repository),
        "--free-ports", "--detach", "--pid-file", str(pid_file),
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # as `... | head -0` would
    try:
        stderr = process.communicate(timeout=180)[1].decode()
        assert process.returncode == 0 and "Traceback" not in stderr, stderr
        pid = int(pid_file.read_text())
        assert process_stat(pid)[0] == "tritonserver"
    finally:
        if pid_file.exists():
            stopped = run_cli("-m", "fashionserve.launcher", "stop", "--pid-file", str(pid_file))
            assert stopped.returncode == 0, stopped.stderr


def test_launcher_cli_serves_on_the_default_ports_unless_told_otherwise():
    parse = launcher._parse_args
    assert launcher.requested_ports(parse(["start", "--repository", "r"])) == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    free = launcher.requested_ports(
        parse(["start", "--repository", "r", "--free-ports", "--grpc-port", "9001"])
    )
    assert free == {"http": None, "grpc": 9001, "metrics": None}


def test_locust_web_ui_binds_loopback_by_default():
    # In a child process: the locustfile monkey-patches with gevent when imported.
    code = (
        "import sys; sys.path.insert(0, '.'); import tests.load; "
        "from locust.argument_parser import parse_options; "
        "o = parse_options(['-f', 'tests/load.py']); print(o.web_host, o.master_bind_host)"
    )
    result = run_cli("-c", code, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].split() == ["127.0.0.1", "127.0.0.1"]


# --- CLIs fed hostile files: one `error:` line, exit 2, nothing written ---------------------------------


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header claims width x height (a decompression bomb as far as a reader that
    trusts the header can tell)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR crc over type + data
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "size",
    [(20000, 20000), (10000, 10000), (9000, 9000)],
    ids=["pillow-error", "pillow-warning", "over-ours"],
)
def test_classify_refuses_a_decompression_bomb(server, tmp_path, size):
    bomb = png_claiming(tmp_path / "bomb.png", *size)
    line = one_line_error(run_cli("client/classify.py", str(bomb), "--url", server.grpc_url))
    assert str(bomb) in line and "refused before decoding" in line


def test_tryon_refuses_a_decompression_bomb_garment(tryon_server, samples_dir, tmp_path):
    test = samples_dir / "test"
    bomb = png_claiming(tmp_path / "cloth.png", 30000, 30000)
    result = run_cli(
        "client/tryon.py", "--url", tryon_server.grpc_url, "--out", str(tmp_path / "out"), "--no-gate",
        "--person-image", str(test / "image" / "00001_00.jpg"),
        "--agnostic", str(test / "image" / "00001_00.jpg"),
        "--densepose", str(test / "image-densepose" / "00001_00.jpg"),
        "--parse-agnostic", str(test / "image-parse-agnostic-v3.2" / "00001_00.png"),
        "--cloth", str(bomb), "--cloth-mask", str(test / "cloth-mask" / "00001_00.jpg"),
    )  # fmt: skip
    assert str(bomb) in one_line_error(result)
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize(
    "keypoints, expected",
    [
        ({"people": [{"pose_keypoints_2d": [float("nan")] * 75}]}, "holds NaN or infinite values"),
        ({"people": [{"pose_keypoints_2d": [1e400] * 75}]}, "holds NaN or infinite values"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ({"people": [{"pose_keypoints_2d": [[0, 0, 0]] * 25}]}, "got an array of shape [25, 3]"),
    ],
    ids=["nan", "infinite", "deeply-nested", "nested-25x3"],
)
def test_tryon_refuses_bad_keypoints(tryon_server, samples_dir, tmp_path, keypoints, expected):
    data = shutil.copytree(samples_dir, tmp_path / "data")
    path = data / "test" / "openpose_json" / "00001_00_keypoints.json"
    path.write_text(keypoints if isinstance(keypoints, str) else json.dumps(keypoints))
    out = tmp_path / "out"
    result = run_cli(
        "client/tryon.py", "--dataroot", str(data), "--pair", "00001_00.jpg", "00001_00.jpg",
        "--url", tryon_server.grpc_url, "--out", str(out), "--no-gate",
    )  # fmt: skip
    line = one_line_error(result)
    assert expected in line and str(path) in line
    assert not list(out.glob("*.png"))


def test_generate_refuses_non_finite_latents(server, tmp_path):
    latents = np.zeros((2, LATENT_DIM), np.float64)
    latents[1, 3] = 1e300  # finite as float64, infinite once sent as float32
    np.save(tmp_path / "z.npy", latents)
    out = tmp_path / "sheet.png"
    line = one_line_error(
        run_cli(
            "client/generate.py",
            "--latents",
            str(tmp_path / "z.npy"),
            "--url",
            server.grpc_url,
            "--out",
            str(out),
        )
    )
    assert "NaN or infinite" in line
    assert not out.exists() and not list(tmp_path.glob("*.tmp.png"))


@pytest.mark.parametrize(
    "command",
    [
        ("client/tryon.py", "--dataroot", "{data}", "--out", "{file}"),
        ("client/hair.py", "--out", "{file}"),
        ("client/generate.py", "--out", "{folder}"),
        ("client/generate.py", "--each", "{file}"),
    ],
    ids=["tryon-out-file", "hair-out-file", "generate-out-folder", "generate-each-file"],
)
def test_clients_refuse_a_file_where_a_folder_goes_and_the_reverse(tmp_path, command):
    existing = tmp_path / "existing"
    existing.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    args = [a.format(data=tmp_path, file=existing, folder=folder) for a in command]
    # Checked before anything else: no server is needed (none listens on port 1).
    line = one_line_error(run_cli(*args, "--url", "127.0.0.1:1"))
    assert str(existing) in line or str(folder) in line
    assert existing.read_text() == "keep me" and not any(folder.iterdir())


def test_export_refuses_a_flat_classifier_state_dict(tmp_path):
    checkpoint = tmp_path / "flat.pt"
    torch.save({"conv.weight": torch.zeros(2, 1, 3, 3)}, checkpoint)
    line = one_line_error(
        run_cli("export/garment_classifier.py", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"))
    )
    assert "bare state dict" in line
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "command",
    [
        ("export/tryon.py", "--random-init", "--condition-ngf", "-2"),
        ("export/garment_classifier.py", "--random-init", "--width", "-1"),
        ("export/fashion_generator.py", "--random-init", "--max-channels", "0"),
    ],
    ids=["tryon", "garment-classifier", "fashion-generator"],
)
def test_export_refuses_non_positive_widths(tmp_path, command):
    result = run_cli(*command, "--out", str(tmp_path / "bundle"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "error: argument" in result.stderr and "expected a positive integer" in result.stderr
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize(
    "change",
    [
        lambda m: {**m, "models": []},
        lambda m: {**m, "max_batch_size": "8"},
        lambda m: {**m, "models": {k: {**v, "inputs": {}} for k, v in m["models"].items()}},
        lambda m: {**m, "variants": ["fp16"]},
    ],
    ids=["models-list", "batch-string", "inputs-object", "variants-list"],
)
def test_render_refuses_manifest_fields_of_the_wrong_type(bundles, tmp_path, change):
    bundle = shutil.copytree(bundles / "garment_classifier", tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(change(manifest)))
    out = tmp_path / "repo"
    line = one_line_error(
        run_cli("export/render_repository.py", str(bundle), "--target", "cpu", "--out", str(out))
    )
    assert "manifest.json" in line
    assert not out.exists() and not out.with_name("repo.partial").exists()


def test_one_grpc_client_sees_the_pixel_limit(server):
    # The shared client layer reports the runner's refusal as one line, naming the model and tensor.
    client = TritonModelClient(server.grpc_url, "garment_classifier", "grpc")
    try:
        with pytest.raises(ClientError, match=r"garment_classifier_preprocess: input 'image': \d+ elements"):
            client.infer({"image": np.zeros((1, 4096, 4096, 3), np.uint8)})
    finally:
        client.close()
