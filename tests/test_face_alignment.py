"""Face alignment on a real photograph (scikit-image's astronaut portrait): landmarks, the FFHQ crop
against a re-typed copy of the public recipe, invariance to rotation and scale, the paste-back, bad
photos, and the hair client end to end through the real Triton on an unaligned photo."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from fashionserve.client import TritonModelClient
from fashionserve.hair.alignment import (
    AlignmentError,
    FaceAligner,
    apply,
    changed_region,
    crop_window,
    feather_width,
    ffhq_alignment,
    paste_back,
    paste_into_photo,
    read_photo,
    warp_to_crop,
)
from fashionserve.hair.bundle import TRANSFER
from tests.conftest import HAIR_CONFIG, one_line_error, run_cli

SIZE = HAIR_CONFIG.image_size  # the side of the crops the tiny hair bundle (conftest's hair_server) takes

ASTRONAUT_FACE = (175, 76, 266, 167)  # dlib's box on skimage.data.astronaut(), left top right bottom


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


def recipe_quad(landmarks: np.ndarray) -> np.ndarray:
    """The FFHQ dataset's `recreate_aligned_images` (as in HairFastGAN's utils/shape_predictor.py), re-typed:
    the quad handed to Pillow's QUAD transform, `quad + 0.5`, from dlib's integer landmarks."""
    lm = landmarks
    eye_left = np.mean(lm[36:42], axis=0)
    eye_right = np.mean(lm[42:48], axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48:60][0] + lm[48:60][6]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    return quad + 0.5


def recipe_to_crop(quad: np.ndarray, points: np.ndarray, size: int) -> np.ndarray:
    """Where photo points land in the size x size crop of `quad` (Pillow's QUAD: corner 0 -> (0, 0),
    corner 1 -> (0, size), corner 3 -> (size, 0))."""
    axes = np.stack([quad[3] - quad[0], quad[1] - quad[0]], axis=1) / size
    return np.linalg.solve(axes, (points - quad[0]).T).T


def eye_centres(landmarks: np.ndarray) -> np.ndarray:
    return np.stack([landmarks[36:42].mean(0), landmarks[42:48].mean(0)])


def test_one_face_with_landmarks_on_the_astronaut(aligner, astronaut):
    faces = aligner.find_faces(astronaut)
    # dlib's HOG detector alone also reports a face on the suit below; the CNN check drops it
    assert len(faces) == 1
    face = faces[0]
    assert np.abs(np.array(face.box) - ASTRONAUT_FACE).max() <= 3
    left, top, right, bottom = face.box
    lm = face.landmarks
    assert lm.shape == (68, 2)
    assert (
        (lm[:, 0] > left - 20) & (lm[:, 0] < right + 20) & (lm[:, 1] > top - 20) & (lm[:, 1] < bottom + 20)
    ).all()
    eyes = eye_centres(lm)
    assert eyes[0, 0] < eyes[1, 0] and abs(eyes[0, 1] - eyes[1, 1]) < 5  # level eyes, left then right
    assert lm[48:60, 1].mean() > eyes[:, 1].mean() + 25  # the mouth below the eyes
    assert lm[8, 1] > lm[48:60, 1].max()  # the chin below the mouth


def test_crop_square_equals_the_public_recipe(aligner, astronaut):
    integer_landmarks = aligner.find_faces(astronaut)[0].landmarks - 0.5  # dlib's integer pixel indices
    cases = [integer_landmarks]
    rng = np.random.default_rng(0)
    wide_mouth = integer_landmarks.copy()
    wide_mouth[48:60, 1] += 40  # a long eye-to-mouth distance: the 1.8 branch of the size rule
    cases += [wide_mouth, integer_landmarks + rng.normal(0, 6, integer_landmarks.shape)]
    for landmarks in cases:
        alignment = ffhq_alignment(landmarks + 0.5)
        assert np.abs(alignment.corners - recipe_quad(landmarks)).max() < 1e-9
        corners = apply(alignment.crop_to_photo(256), np.array([[0, 0], [0, 256], [256, 256], [256, 0.0]]))
        assert np.abs(corners - recipe_quad(landmarks)).max() < 1e-9
        assert np.allclose(alignment.photo_to_crop(256) @ alignment.crop_to_photo(256), np.eye(3))


def test_eye_centres_land_on_the_recipe_positions(aligner, astronaut):
    size = 256
    face = aligner.find_faces(astronaut)[0]
    aligned = aligner.align(astronaut, size, "astronaut")
    assert aligned.crop.shape == (size, size, 3) and aligned.crop.dtype == np.uint8
    assert aligned.faces_found == 1
    # where the recipe puts the eyes: the photo's eye centres through the recipe's quad
    expected = recipe_to_crop(recipe_quad(face.landmarks - 0.5), eye_centres(face.landmarks), size)
    # for this face the eye distance sets the scale: the eyes sit at 3/8 and 5/8 of the width
    assert np.abs(expected[:, 0] - [0.375 * size, 0.625 * size]).max() < 2
    assert np.abs(expected[:, 1] - 0.48 * size).max() < 3  # and a little above the middle
    # the eyes found again on the crop are there
    found = aligner.find_faces(aligned.crop)
    assert len(found) == 1
    assert np.abs(eye_centres(found[0].landmarks) - expected).max() < 3
    # a crop much smaller than the face is made from a shrunk photo (the recipe's first step): same view
    small = warp_to_crop(astronaut, aligned.alignment, 32).astype(int)
    scaled = np.asarray(Image.fromarray(aligned.crop).resize((32, 32), Image.LANCZOS))
    assert np.abs(small - scaled).mean() < 4


def test_rotated_and_scaled_photo_gives_the_same_crop(aligner, astronaut):
    size = 128
    base = aligner.align(astronaut, size, "astronaut")
    angle, scale = 15.0, 1.4
    side = round(512 * scale)
    big = Image.fromarray(astronaut).resize((side, side), Image.LANCZOS)
    turned = big.rotate(angle, Image.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    moved = aligner.align(np.asarray(turned), size, "turned")
    # the rotation (counter-clockwise about the centre, canvas expanded) as a map from the original
    theta = np.deg2rad(angle)
    rotation = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])

    def to_turned(points: np.ndarray) -> np.ndarray:
        return (points * scale - side / 2) @ rotation.T + np.array(turned.size) / 2

    assert moved.alignment.side == pytest.approx(base.alignment.side * scale, rel=0.03)
    corner_error = np.abs(moved.alignment.corners - to_turned(base.alignment.corners)).max()
    assert corner_error < 0.03 * moved.alignment.side
    difference = np.abs(moved.crop.astype(int) - base.crop.astype(int))
    assert difference.mean() < 6, difference.mean()


def test_unedited_crop_pasted_back_reproduces_the_photo(aligner, astronaut):
    size = 256
    aligned = aligner.align(astronaut, size, "astronaut")
    feather = feather_width(size)
    pasted = paste_back(astronaut, aligned.crop, aligned.alignment, crop_window(size, feather))
    rows, cols = np.mgrid[: astronaut.shape[0], : astronaut.shape[1]]
    centres = np.stack([cols.ravel(), rows.ravel()], axis=1) + 0.5
    in_crop = apply(aligned.alignment.photo_to_crop(size), centres).reshape(*astronaut.shape[:2], 2)
    outside = ((in_crop < -1) | (in_crop > size + 1)).any(-1)  # beyond the square (and bilinear reach)
    core = ((in_crop > 2 * feather) & (in_crop < size - 2 * feather)).all(-1)  # off the blend seam
    assert outside.mean() > 0.5 and core.sum() > 10_000
    assert np.array_equal(pasted[outside], astronaut[outside])
    error = np.abs(pasted.astype(int) - astronaut.astype(int))[core]
    assert error.mean() < 4 and np.percentile(error, 99) < 25, (error.mean(), np.percentile(error, 99))
    assert (pasted != astronaut).any(-1)[core].mean() > 0.5  # it did paste


def test_only_pixels_the_server_changed_are_pasted(aligner, astronaut):
    size = 256
    aligned = aligner.align(astronaut, size, "astronaut")
    result = aligned.crop.copy()
    result[10:60, 70:190] = (255, 0, 255)  # "new hair" on top of the head
    feather = feather_width(size)
    mask = changed_region(aligned.crop, result, feather)
    assert mask[10:60, 70:190].min() == 1.0 and mask[100:, :].max() == 0.0 and mask[:, :40].max() == 0.0
    pasted = paste_into_photo(astronaut, aligned.alignment, aligned.crop, result)
    rows, cols = np.mgrid[: astronaut.shape[0], : astronaut.shape[1]]
    centres = np.stack([cols.ravel(), rows.ravel()], axis=1) + 0.5
    u, v = apply(aligned.alignment.photo_to_crop(size), centres).T.reshape(2, *astronaut.shape[:2])
    reach = 2 * feather + 2  # grown by one feather width, faded over another, plus the bilinear reach
    near = (u > 70 - reach) & (u < 190 + reach) & (v > 10 - reach) & (v < 60 + reach)
    assert np.array_equal(pasted[~near], astronaut[~near])
    deep = (u > 75) & (u < 185) & (v > 15) & (v < 55)
    assert deep.sum() > 1000 and np.abs(pasted[deep].astype(int) - (255, 0, 255)).max() <= 2


def test_a_face_at_the_edge_is_padded_like_ffhq(aligner, astronaut):
    corner = astronaut[90:, 185:]  # the square reaches past the top and left edges; a strided view
    aligned = aligner.align(corner, 128, "corner")
    assert (aligned.alignment.corners.min(0) < 0).all()
    crop = aligned.crop.astype(int)
    # the padding is a blurred reflection fading to the median colour, not black
    assert crop[:8, :8].mean() > 60 and crop[:8, :8].std() < 40
    pasted = paste_into_photo(corner, aligned.alignment, aligned.crop, aligned.crop)
    assert np.array_equal(pasted, corner)  # nothing changed, nothing pasted
    # a square entirely outside the photo is no error
    assert np.array_equal(warp_to_crop(corner, aligned.alignment, 16).shape, (16, 16, 3))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds one row of data: decoding it would fail."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def test_read_photo_refuses_large_files_unread_and_honours_exif(tmp_path):
    (tmp_path / "big.png").write_bytes(png_header(8000, 6000))
    with pytest.raises(
        AlignmentError, match=r"big.png is 8000x6000 \(48.0 megapixels\), over the limit of 40"
    ):
        read_photo(tmp_path / "big.png")
    (tmp_path / "huge.png").write_bytes(png_header(30000, 30000))  # over Pillow's own bomb limit too
    with pytest.raises(AlignmentError, match="huge.png is too large"):
        read_photo(tmp_path / "huge.png")
    image = Image.fromarray(data.astronaut()[:, :300])
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: the viewer turns it 90 degrees clockwise
    image.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    photo = read_photo(tmp_path / "turned.jpg")
    assert photo.shape == (300, 512, 3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    astronaut = Image.fromarray(data.astronaut())
    astronaut.save(folder / "astronaut.png")
    astronaut.transpose(Image.FLIP_LEFT_RIGHT).save(folder / "mirrored.png")
    astronaut.resize((700, 700), Image.LANCZOS).rotate(10, Image.BICUBIC).save(folder / "turned.png")
    Image.fromarray(data.coffee()).save(folder / "coffee.png")
    pair = Image.new("RGB", (900, 512), (200, 200, 200))
    pair.paste(astronaut, (0, 0))
    pair.paste(astronaut.resize((360, 360), Image.LANCZOS), (530, 100))
    pair.save(folder / "pair.png")
    (folder / "big.png").write_bytes(png_header(8000, 6000))
    (folder / "notes.png").write_text("not an image")
    return folder


def test_client_transfers_hair_on_unaligned_photos_through_triton(hair_server, photos, aligner, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "client/hair.py", "--face", str(photos / "astronaut.png"), "--shape", str(photos / "mirrored.png"),
        "--color", str(photos / "turned.png"), "--url", hair_server.grpc_url, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "astronaut.png: face 91x91 px" in result.stdout and "found" not in result.stdout
    assert "mirrored.png: face" in result.stdout and "turned.png: face" in result.stdout  # all three aligned
    served = np.asarray(Image.open(out / "astronaut_hair_mirrored_color_turned.png"))
    astronaut = data.astronaut()
    assert served.shape == astronaut.shape
    # the same crops sent by hand, the result pasted with the library: the client's file, bit for bit
    face = aligner.align(astronaut, SIZE, "astronaut")
    shape, color = (
        aligner.align(np.asarray(Image.open(photos / name)), SIZE, name).crop
        for name in ("mirrored.png", "turned.png")
    )
    client = TritonModelClient(hair_server.grpc_url, TRANSFER)
    inputs = {"face": face.crop[None], "shape_reference": shape[None], "color_reference": color[None]}
    crop = client.infer(inputs)["hair_image"][0]
    client.close()
    assert np.array_equal(served, paste_into_photo(astronaut, face.alignment, face.crop, crop))
    assert (crop != face.crop).any(-1).mean() > 0.9  # HairFastGAN regenerates the whole crop
    changed = (served != astronaut).any(-1)
    assert changed.any()
    corners = face.alignment.corners
    rows, cols = np.nonzero(changed)
    assert cols.min() >= corners[:, 0].min() - 1 and cols.max() <= corners[:, 0].max() + 1
    assert rows.min() >= corners[:, 1].min() - 1 and rows.max() <= corners[:, 1].max() + 1
    # several faces: the largest, said so (here in an edit)
    several = run_cli(
        "client/hair.py", "--face", str(photos / "pair.png"), "--strength", "1",
        "--url", hair_server.grpc_url, "--out", str(out),
    )  # fmt: skip
    assert several.returncode == 0, several.stderr
    assert "pair.png: found 2 faces, using the largest: face 91x91 px at (175, 76)" in several.stdout
    assert (out / "pair_edit_sample_1.png").is_file()


def test_client_refuses_bad_photos_in_one_line(hair_server, photos, tmp_path):
    out = tmp_path / "out"
    url = ["--url", hair_server.grpc_url, "--out", str(out)]
    astronaut = str(photos / "astronaut.png")
    shape = ["--shape", astronaut]
    cases = [
        (["--face", str(photos / "coffee.png"), *shape], f"face: no face found in {photos / 'coffee.png'}"),
        (["--face", astronaut, *shape, "--landmark-model", "none.dat"], "landmark model not found: none.dat"),
        (["--face", str(photos / "big.png"), *shape], "8000x6000 (48.0 megapixels), over the limit"),
        (["--face", str(photos / "notes.png"), *shape], "cannot read image"),
        (["--face", astronaut, "--shape", str(photos / "coffee.png")], "shape reference: no face"),
        (["--face", astronaut, *shape, "--color", str(photos / "coffee.png")], "colour reference: no face"),
    ]
    for args, fragment in cases:
        one_line_error(run_cli("client/hair.py", *args, *url), fragment)
    # the astronaut's crop is 174 px across: enlarging it to the 256 px crop is refused at --max-upscale 1
    one_line_error(
        run_cli("client/hair.py", "--face", astronaut, *shape, "--max-upscale", "1", *url),
        "too small: 91x91 px",
        f"need at least {SIZE} px",
    )
    assert not out.exists() or not list(out.iterdir())
