"""client/hair.py as a user runs it, against the tiny hair bundle served by the real Triton: transfers of
the sample portraits and of explicit files (face and shape; face, shape and colour), edits with a direction
file, and bad input refused in one line before anything is sent or written. (Unaligned photos through the
client: tests/test_face_alignment.py.)"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fashionserve.client import TritonModelClient
from fashionserve.hair.bundle import EDIT, TRANSFER
from fashionserve.hair.samples import SAMPLE_PORTRAITS, draw_portrait, sample_direction, sample_portraits
from tests.conftest import HAIR_CONFIG, one_line_error, run_cli

SIZE = HAIR_CONFIG.image_size
N_LATENT, STYLE_DIM = HAIR_CONFIG.n_latent, HAIR_CONFIG.style_dim


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


def served_transfer(server, face: np.ndarray, shape: np.ndarray, color: np.ndarray) -> np.ndarray:
    """`hair_transfer` called directly (batch 1) with crops assembled by hand."""
    client = TritonModelClient(server.grpc_url, TRANSFER)
    inputs = {"face": face[None], "shape_reference": shape[None], "color_reference": color[None]}
    image = client.infer(inputs)["hair_image"][0]
    client.close()
    return image


def written(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Aligned square crops as files: three drawn portraits at the served size, one at twice the size."""
    folder = tmp_path_factory.mktemp("crops")
    for index, name in enumerate(("me", "style", "blond")):
        Image.fromarray(draw_portrait(index, SIZE, seed=3)).save(folder / f"{name}.png")
    Image.fromarray(draw_portrait(2, 2 * SIZE, seed=3)).save(folder / "big_blond.png")
    return folder


def test_help_names_the_modes_and_their_options():
    result = run_cli("client/hair.py", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--face", "--shape", "--color", "--direction", "--strength", "--aligned", "--resize"):
        assert option in result.stdout, option


def test_client_transfers_the_sample_portraits(hair_server, tmp_path):
    out = tmp_path / "samples"
    result = run_cli("client/hair.py", "--url", hair_server.grpc_url, "--batch", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    # each sample takes the next one's hairstyle and the one after's colour
    names = [s.name for s in SAMPLE_PORTRAITS]
    shapes, colors = names[1:] + names[:1], names[2:] + names[:2]
    expected = {
        f"{face}_hair_{shape}_color_{color}.png": (face, shape, color)
        for face, shape, color in zip(names, shapes, colors, strict=True)
    }
    assert written(out) == sorted(expected)
    assert result.stdout.count("wrote ") == len(expected)
    samples = sample_portraits(SIZE)
    for file, (face, shape, color) in expected.items():
        image = read_png(out / file)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        # sent in batches of two and one: equal to a batch of one up to rounding
        alone = served_transfer(hair_server, samples[face], samples[shape], samples[color])
        difference = np.abs(image.astype(int) - alone.astype(int))
        assert difference.mean() < 0.5 and (difference > 8).mean() < 0.01, file
        assert not np.array_equal(image, samples[face])


def test_client_transfers_a_face_with_a_shape_reference(hair_server, crops, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "client/hair.py", "--aligned", "--face", str(crops / "me.png"), "--shape", str(crops / "style.png"),
        "--url", hair_server.grpc_url, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert written(out) == ["me_hair_style.png"]
    me, style = read_png(crops / "me.png"), read_png(crops / "style.png")
    # without --color the colour comes from the shape reference
    expected = served_transfer(hair_server, me, style, style)
    assert np.array_equal(read_png(out / "me_hair_style.png"), expected)
    assert not np.array_equal(expected, me)


def test_client_transfers_with_a_colour_reference_over_http(hair_server, crops, tmp_path):
    out = tmp_path / "out"
    args = [
        "--aligned", "--face", str(crops / "me.png"), "--shape", str(crops / "style.png"),
        "--color", str(crops / "big_blond.png"),
    ]  # fmt: skip
    refused = run_cli("client/hair.py", *args, "--url", hair_server.grpc_url, "--out", str(out))
    line = one_line_error(refused, "colour reference: ", "big_blond.png is 512x512")
    assert f"the server takes {SIZE}x{SIZE} crops (--resize scales it)" in line
    assert written(out) == []
    result = run_cli(
        "client/hair.py", *args, "--resize", "--protocol", "http", "--url", hair_server.http_url,
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert written(out) == ["me_hair_style_color_big_blond.png"]
    me, style = read_png(crops / "me.png"), read_png(crops / "style.png")
    with Image.open(crops / "big_blond.png") as big:
        blond = np.asarray(big.resize((SIZE, SIZE), Image.LANCZOS))
    expected = served_transfer(hair_server, me, style, blond)
    assert np.array_equal(read_png(out / "me_hair_style_color_big_blond.png"), expected)
    # the shape and the colour reference go to different inputs: swapped, the result differs
    assert not np.array_equal(expected, served_transfer(hair_server, me, blond, style))


def test_client_takes_one_reference_for_all_faces_or_one_per_face(hair_server, crops, tmp_path):
    out = tmp_path / "out"
    faces, shape = [str(crops / "me.png"), str(crops / "blond.png")], str(crops / "style.png")
    result = run_cli(
        "client/hair.py", "--aligned", "--face", *faces, "--shape", shape, "--color", *faces[::-1],
        "--batch", "2", "--url", hair_server.grpc_url, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert written(out) == ["blond_hair_style_color_me.png", "me_hair_style_color_blond.png"]
    me, style, blond = (read_png(crops / f"{name}.png") for name in ("me", "style", "blond"))
    for file, face, color in (
        ("me_hair_style_color_blond.png", me, blond),
        ("blond_hair_style_color_me.png", blond, me),
    ):
        difference = np.abs(
            read_png(out / file).astype(int) - served_transfer(hair_server, face, style, color)
        )
        assert difference.mean() < 0.5 and (difference > 8).mean() < 0.01, file


def test_client_edits_with_a_direction_file(hair_server, hair_pipeline, crops, tmp_path):
    direction = sample_direction(STYLE_DIM, seed=5)
    np.save(tmp_path / "bangs.npy", direction[None])  # InterFaceGAN's [1, style_dim] layout
    out = tmp_path / "out"
    result = run_cli(
        "client/hair.py", "--aligned", "--face", str(crops / "me.png"),
        "--direction", str(tmp_path / "bangs.npy"), "--strength", "1.5",
        "--url", hair_server.grpc_url, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert written(out) == ["me_edit_bangs_1.5.png"]
    served = read_png(out / "me_edit_bangs_1.5.png").astype(int)
    me = read_png(crops / "me.png")
    with torch.no_grad():
        expected = hair_pipeline.edit(
            torch.from_numpy(me)[None],
            torch.from_numpy(np.repeat(direction[None], N_LATENT, axis=0))[None],
            torch.tensor([[1.5]]),
        )[0].numpy()
    difference = np.abs(served - expected)
    assert difference.mean() < 0.5 and (difference > 8).mean() < 0.01, difference.mean()
    assert (served != me).any(-1).mean() > 0.02  # the edit changed something
    # one direction per layer, [n_latent, style_dim]: the same edit
    np.save(tmp_path / "layers.npy", np.repeat(direction[None], N_LATENT, axis=0))
    layers = run_cli(
        "client/hair.py", "--aligned", "--face", str(crops / "me.png"),
        "--direction", str(tmp_path / "layers.npy"), "--strength", "1.5",
        "--url", hair_server.grpc_url, "--out", str(out),
    )  # fmt: skip
    assert layers.returncode == 0, layers.stderr
    assert np.array_equal(read_png(out / "me_edit_layers_1.5.png"), served)


def test_client_edits_the_samples_with_the_sample_direction(hair_server, tmp_path):
    out = tmp_path / "out"
    result = run_cli("client/hair.py", "--strength", "-2", "--url", hair_server.grpc_url, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert written(out) == sorted(f"{s.name}_edit_sample_-2.png" for s in SAMPLE_PORTRAITS)


def test_client_refuses_bad_input_in_one_line_before_writing(hair_server, crops, tmp_path):
    Image.new("RGB", (SIZE, SIZE - 8)).save(tmp_path / "wide.png")
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "me.png")  # another face named like crops/me.png
    (tmp_path / "notes.png").write_text("not an image")
    np.save(tmp_path / "bad.npy", np.zeros((3, STYLE_DIM), np.float32))
    (tmp_path / "text.npy").write_text("not numpy")
    me, style = str(crops / "me.png"), str(crops / "style.png")
    out = tmp_path / "out"
    served = ["--aligned", "--url", hair_server.grpc_url, "--out", str(out)]
    cases = [
        (["--face", str(tmp_path / "nope.png"), "--shape", style], "face: image not found"),
        (
            ["--face", me, "--shape", style, "--color", str(tmp_path / "nope.png")],
            "colour reference: image not",
        ),
        (
            ["--face", me, "--shape", str(tmp_path / "wide.png")],
            f"shape reference: {tmp_path / 'wide.png'} is",
        ),
        (["--face", str(tmp_path / "wide.png"), "--shape", style], f"is {SIZE}x{SIZE - 8}, not square"),
        (["--face", str(tmp_path / "notes.png"), "--shape", style], "cannot read image"),
        (["--face", me, "--direction", str(tmp_path / "nope.npy")], "direction not found"),
        (["--face", me, "--direction", str(tmp_path / "bad.npy")], f"has shape [3, {STYLE_DIM}]"),
        (["--face", me, "--direction", str(tmp_path / "text.npy")], "cannot read direction"),
        (["--face", me, "--strength", "nan"], "--strength must be a finite number"),
        (["--model", "nope"], "model 'nope'"),
        (["--model", TRANSFER, "--strength", "1"], f"not the {EDIT} inputs"),
        (["--model", EDIT], f"not the {TRANSFER} inputs"),
        (["--batch", "5"], f"--batch 5 is over the largest batch of '{TRANSFER}': 4"),
        (["--face", me, str(tmp_path / "me.png"), "--shape", style], "two results would be written to"),
    ]
    for args, fragment in cases:
        one_line_error(run_cli("client/hair.py", *args, *served), fragment)
    assert written(out) == []  # nothing was written, not even a partial file
    down = run_cli("client/hair.py", "--url", "127.0.0.1:9", "--out", str(out))
    one_line_error(down, "cannot reach Triton at 127.0.0.1:9")
    (tmp_path / "file").write_text("")
    not_a_folder = run_cli("client/hair.py", "--url", hair_server.grpc_url, "--out", str(tmp_path / "file"))
    one_line_error(not_a_folder, "exists and is not a folder")
    assert written(out) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--face", "f.png", "--shape", "s.png", "--strength", "1"], "exclude each other"),
        (["--face", "f.png"], "--face needs --shape"),
        (["--face", "f.png", "--color", "c.png"], "--face needs --shape"),
        (["--shape", "s.png"], "--shape and --color need --face"),
        (
            ["--face", "a.png", "b.png", "--shape", "s.png", "--color", "1.png", "2.png", "3.png"],
            "one per face (2), not 3",
        ),
        (["--resize"], "--resize only applies to --aligned"),
        (["--batch", "0"], "--batch must be at least 1"),
        (["--max-upscale", "0"], "--max-upscale must be positive"),
        (["--face", "f.png", "--reference", "r.png"], "unrecognized arguments: --reference"),
    ],
    ids=[
        "transfer-and-edit",
        "no-shape",
        "colour-no-shape",
        "no-face",
        "count",
        "resize",
        "batch",
        "upscale",
        "old-flag",
    ],
)
def test_client_refuses_bad_option_combinations(args, message, tmp_path):
    result = run_cli("client/hair.py", *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "error: " in last and message in last, result.stderr  # argparse's usage line, then the error
    assert not (tmp_path / "out").exists()
