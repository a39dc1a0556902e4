"""Try-on data side: drawn sample set, agnostic drawing, parse-agnostic map, pairs file and input loading."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashionserve.tryon.agnostic import GRAY, agnostic_person_image, parse_agnostic_map
from fashionserve.tryon.dataset import (
    DatasetError,
    cloth_files,
    load_tryon_inputs,
    person_files,
    read_pairs,
)
from fashionserve.tryon.samples import CLOTH_BACKGROUND, PERSON_BACKGROUND, write_sample_set

REPO = Path(__file__).resolve().parents[1]
SIZES = [(256, 192), (1024, 768)]
PAIRS = [("00001_00.jpg", "00002_00.jpg"), ("00002_00.jpg", "00001_00.jpg")]
PERSONS = ["00001_00.jpg", "00002_00.jpg"]


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def sample_set(request, tmp_path_factory) -> tuple[Path, int, int, list[tuple[str, str]]]:
    height, width = request.param
    root = tmp_path_factory.mktemp(f"samples{height}")
    return root, height, width, write_sample_set(root, height, width)


@pytest.fixture
def small_set(tmp_path) -> Path:
    """A 256x192 set of its own, for tests that damage files."""
    write_sample_set(tmp_path, 256, 192)
    return tmp_path


def _keypoints(root: Path, person: str) -> np.ndarray:
    data = json.loads(person_files(root / "test", person)["pose keypoints"].read_text())
    return np.array(data["people"][0]["pose_keypoints_2d"]).reshape(25, 3)


def _parse(root: Path, person: str) -> np.ndarray:
    return np.array(Image.open(person_files(root / "test", person)["parse map"]))


# --- sample set ---------------------------------------------------------------------------------------


def test_sample_set_has_every_file_and_unpaired_pairs(sample_set):
    root, _, _, pairs = sample_set
    assert pairs == PAIRS
    assert (root / "test_pairs.txt").read_text() == "00001_00.jpg 00002_00.jpg\n00002_00.jpg 00001_00.jpg\n"
    assert read_pairs(root / "test_pairs.txt") == PAIRS
    for person in PERSONS:
        files = {**person_files(root / "test", person), **cloth_files(root / "test", person)}
        assert len(files) == 8
        for what, path in files.items():
            assert path.is_file() and path.stat().st_size > 0, what
    names = sorted(p.relative_to(root / "test").as_posix() for p in (root / "test").rglob("*"))
    assert "openpose_json/00001_00_keypoints.json" in names
    assert "openpose_img/00002_00_rendered.png" in names
    assert "image-parse-agnostic-v3.2/00001_00.png" in names


def test_sample_set_sizes_modes_and_labels(sample_set):
    root, height, width, _ = sample_set
    for person in PERSONS:
        for what, path in {
            **person_files(root / "test", person),
            **cloth_files(root / "test", person),
        }.items():
            if path.suffix == ".json":
                continue
            image = Image.open(path)
            assert image.size == (width, height), what
            if what in ("parse map", "parse-agnostic map"):
                assert image.mode == "P", what
                assert int(np.array(image).max()) <= 19, what
        labels = set(np.unique(_parse(root, person)).tolist())
        assert {0, 2, 5, 9, 10, 13, 14, 15, 16, 17, 18, 19} <= labels
        assert labels <= set(range(20))


def test_garment_region_is_labelled_upper_clothes(sample_set):
    """Label 5 pixels show the person's own garment (the same-named cloth), others do not."""
    root, _, _, _ = sample_set
    for person in PERSONS:
        files = {**person_files(root / "test", person), **cloth_files(root / "test", person)}
        image = np.array(Image.open(files["person image"]).convert("RGB")).astype(int)
        cloth = np.array(Image.open(files["cloth image"]).convert("RGB")).astype(int)
        cloth_mask = np.array(Image.open(files["cloth mask"]).convert("L")) >= 128
        parse = _parse(root, person)
        garment = np.median(cloth[cloth_mask], axis=0)
        worn = image[parse == 5]
        assert worn.shape[0] > 0.05 * parse.size
        assert np.abs(np.median(worn, axis=0) - garment).max() <= 12
        # most label-5 pixels are garment coloured (base or pattern), and the rest of the image is not
        assert (np.abs(worn - garment).max(axis=1) <= 40).mean() > 0.6
        others = image[(parse != 5) & (parse != 0)]
        assert (np.abs(others - garment).max(axis=1) <= 40).mean() < 0.05
        assert np.abs(np.median(image[parse == 0], axis=0) - PERSON_BACKGROUND).max() <= 3
        # VITON-HD cloth images sit on (246, 246, 246)
        assert np.abs(cloth[~cloth_mask] - CLOTH_BACKGROUND).mean() < 2


def test_keypoints_lie_on_the_drawn_body_parts(sample_set):
    root, height, width, _ = sample_set
    expected = {  # BODY_25 index -> CIHP labels it may lie on
        0: {13}, 1: {10, 5}, 2: {5, 15}, 3: {15}, 4: {15}, 5: {5, 14}, 6: {14}, 7: {14}, 8: {5, 9},
        9: {5, 9}, 10: {9}, 11: {17, 19}, 12: {5, 9}, 13: {9}, 14: {16, 18}, 15: {13}, 16: {13},
    }  # fmt: skip
    for person in PERSONS:
        keypoints = _keypoints(root, person)
        assert np.all((keypoints[:, 2] > 0) & (keypoints[:, 2] <= 1))
        parse = _parse(root, person)
        for index, labels in expected.items():
            x, y = keypoints[index, :2]
            assert 0 <= x < width and 0 <= y < height
            assert parse[int(round(y)), int(round(x))] in labels, (person, index)
        # image left is the person's right
        assert keypoints[2, 0] < keypoints[1, 0] < keypoints[5, 0]


def test_sample_set_is_deterministic_and_seeded(tmp_path):
    for name in ("a", "b", "c"):
        write_sample_set(tmp_path / name, 256, 192, seed=1 if name == "c" else 0)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 17
    for path in files:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path
    image = Path("test/image/00001_00.jpg")
    assert (tmp_path / "a" / image).read_bytes() != (tmp_path / "c" / image).read_bytes()


def test_write_sample_set_rejects_tiny_sizes(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        write_sample_set(tmp_path, 32, 24)


# --- parse-agnostic map ---------------------------------------------------------------------------------


def test_stored_parse_agnostic_drops_garment_neck_and_arms(sample_set):
    root, _, _, _ = sample_set
    for person in PERSONS:
        parse = _parse(root, person)
        stored = np.array(Image.open(person_files(root / "test", person)["parse-agnostic map"]))
        assert np.array_equal(stored, parse_agnostic_map(parse, _keypoints(root, person)[:, :2]))
        assert not np.isin(stored, (5, 6, 7, 10)).any()
        # arms mostly removed; face, hair, pants, legs, shoes untouched
        for arm in (14, 15):
            assert (stored == arm).sum() < 0.25 * (parse == arm).sum()
        kept = ~np.isin(parse, (5, 6, 7, 10, 14, 15))
        assert np.array_equal(stored[kept], parse[kept])


def test_parse_agnostic_arm_radius_scales_with_width():
    """Official constants at width 768 (radius 150 at the elbow), halved at width 384."""
    keypoints = np.zeros((25, 2))
    keypoints[[2, 5, 6, 7]] = [(300, 300), (460, 300), (460, 500), (460, 700)]
    parse = np.full((1024, 768), 14, dtype=np.uint8)
    parse[100:120, 100:120] = 13
    parse[120:140, 100:120] = 10
    full = parse_agnostic_map(parse, keypoints)
    assert full[500, 580] == 0  # 120 px from the elbow, inside the 150 px circle
    assert full[500, 650] == 14  # 190 px away
    assert full[735, 460] == 0 and full[745, 460] == 14  # 40 px circle at the wrist
    assert full[110, 110] == 13 and full[130, 110] == 0

    half = parse_agnostic_map(parse[::2, ::2].copy(), keypoints / 2)
    assert half[250, 290] == 0  # 60 px from the elbow, inside the scaled 75 px circle
    assert half[250, 325] == 14  # 95 px: would be removed with the unscaled 150 px radius


# --- agnostic person image ------------------------------------------------------------------------------


def test_sample_agnostic_grays_torso_and_keeps_head_and_background(sample_set):
    root, height, width, _ = sample_set
    for person in PERSONS:
        inputs = load_tryon_inputs(root, person, person)
        agnostic = inputs["agnostic"]
        image = np.array(Image.open(person_files(root / "test", person)["person image"]).convert("RGB"))
        parse = _parse(root, person)
        keypoints = _keypoints(root, person)[:, :2]
        is_gray = np.all(agnostic == GRAY, axis=2)

        # chest: the whole box between the shoulders' and hips' heights is gray
        neck, hip = keypoints[1], keypoints[8]
        x0, x1 = int(neck[0] - 0.05 * width), int(neck[0] + 0.05 * width)
        y0, y1 = int(neck[1] + 0.05 * height), int(hip[1] - 0.05 * height)
        assert is_gray[y0:y1, x0:x1].all()
        assert is_gray[parse == 5].mean() > 0.97
        assert is_gray[parse == 10].all()
        # head and lower body are the original pixels
        for labels in ((13,), (9, 16, 17, 18, 19)):
            keep = np.isin(parse, labels)
            assert np.array_equal(agnostic[keep], image[keep])
        # every change is gray paint, and the background away from the body is untouched
        changed = np.any(agnostic != image, axis=2)
        assert changed.sum() > 0.1 * parse.size
        assert is_gray[changed].all()
        # Nothing is drawn beyond 10r of the upper-body joints (the neck box reaches 9r up, other shapes
        # 6r; the hips are spread to shoulder width about their midpoint): outside that box is unchanged.
        shoulder_width = np.linalg.norm(keypoints[5] - keypoints[2])
        r = int(shoulder_width / 16) + 1
        hip_mid = (keypoints[9] + keypoints[12]) / 2
        hips = hip_mid + [[-shoulder_width / 2, 0], [shoulder_width / 2, 0]]
        joints = np.vstack([keypoints[1:8], hips])
        x0, y0 = np.floor(joints.min(axis=0) - 10 * r).astype(int).clip(0)
        x1, y1 = np.ceil(joints.max(axis=0) + 10 * r).astype(int)
        outside = np.ones((height, width), dtype=bool)
        outside[y0:y1, x0:x1] = False
        assert outside.mean() > 0.3
        assert np.array_equal(agnostic[outside], image[outside])


def _synthetic_pose() -> np.ndarray:
    """Shoulders 160 px apart (r = int(160 / 16) + 1 = 11), hips 40 px apart, left arm straight down."""
    keypoints = np.zeros((25, 2))
    keypoints[[1, 2, 5, 9, 12]] = [(380, 300), (300, 300), (460, 300), (360, 600), (400, 600)]
    keypoints[[3, 4, 6, 7]] = [(290, 420), (290, 540), (470, 420), (470, 540)]
    return keypoints


def test_agnostic_geometry_matches_the_official_constants():
    image = np.zeros((1024, 768, 3), dtype=np.uint8)
    image[:] = (10, 200, 30)
    parse = np.zeros((1024, 768), dtype=np.uint8)
    keypoints = _synthetic_pose()
    out = agnostic_person_image(image, parse, keypoints)
    gray = lambda x, y: tuple(out[y, x]) == GRAY  # noqa: E731

    # neck box: x = 380 +- 5r = 325..435, up to 9r = 99 px above the neck joint
    assert gray(328, 205) and not gray(322, 205)
    assert gray(380, 205) and not gray(380, 195)
    # hips spread to shoulder width (300 and 460), hip ellipse half-width 3r = 33 -> up to x = 493
    assert gray(490, 600) and not gray(500, 600)
    assert np.array_equal(keypoints, _synthetic_pose())  # the caller's keypoints are not moved
    assert np.array_equal(out[0, 0], image[0, 0])


def test_agnostic_pastes_back_arm_outside_skeleton_head_and_lower_body():
    image = np.zeros((1024, 768, 3), dtype=np.uint8)
    image[:] = (10, 200, 30)
    parse = np.zeros((1024, 768), dtype=np.uint8)
    parse[570:600, 455:485] = 14  # left hand just past the wrist (470, 540)
    parse[240:260, 370:390] = 13  # face inside the neck box
    parse[550:570, 370:390] = 9  # pants inside the torso polygon
    parse[450:470, 370:390] = 5  # garment
    out = agnostic_person_image(image, parse, _synthetic_pose())
    original = tuple(image[0, 0])
    # the arm skeleton ends with a 4r = 44 px circle at the wrist, the gray drawing with 5r = 55 px
    assert tuple(out[590, 470]) == original  # 50 px below the wrist: restored
    assert tuple(out[580, 470]) == GRAY  # 40 px: inside the skeleton, stays gray
    assert tuple(out[250, 380]) == original
    assert tuple(out[560, 380]) == original
    assert tuple(out[460, 380]) == GRAY


def test_agnostic_works_at_other_sizes_and_checks_inputs():
    image = np.full((512, 384, 3), 200, dtype=np.uint8)
    parse = np.zeros((512, 384), dtype=np.uint8)
    out = agnostic_person_image(image, parse, _synthetic_pose() / 2)
    assert out.shape == (512, 384, 3) and out.dtype == np.uint8
    assert tuple(out[225, 190]) == GRAY
    with pytest.raises(ValueError, match="keypoints"):
        agnostic_person_image(image, parse, np.zeros((18, 2)))
    with pytest.raises(ValueError, match="image"):
        agnostic_person_image(image[:-1], parse, _synthetic_pose())


# --- pairs file and loading -----------------------------------------------------------------------------


def test_read_pairs_skips_blank_lines_and_names_a_malformed_line(tmp_path):
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("a.jpg b.jpg\n\n  c.jpg\td.jpg  \n")
    assert read_pairs(pairs_file) == [("a.jpg", "b.jpg"), ("c.jpg", "d.jpg")]
    pairs_file.write_text("a.jpg b.jpg\n\nc.jpg\n")
    with pytest.raises(
        DatasetError, match=r"pairs\.txt:3: expected '<person> <cloth>', got 1 fields"
    ) as info:
        read_pairs(pairs_file)
    assert "\n" not in str(info.value)
    with pytest.raises(DatasetError, match="missing pairs file"):
        read_pairs(tmp_path / "nope.txt")


@pytest.mark.parametrize("height,width", SIZES)
def test_load_tryon_inputs_contract(tmp_path, height, width):
    write_sample_set(tmp_path, height, width)
    inputs = load_tryon_inputs(tmp_path, *PAIRS[0])
    shapes = {"cloth": 3, "cloth_mask": 2, "agnostic": 3, "densepose": 3, "parse_agnostic": 2}
    assert list(inputs) == list(shapes)
    for name, ndim in shapes.items():
        array = inputs[name]
        assert array.dtype == np.uint8, name
        assert array.shape == ((height, width, 3) if ndim == 3 else (height, width)), name
    # the unpaired cloth is the other person's garment; its mask is a raw 0..255 JPEG mask
    cloth = np.array(Image.open(tmp_path / "test/cloth/00002_00.jpg").convert("RGB"))
    assert np.array_equal(inputs["cloth"], cloth)
    mask = inputs["cloth_mask"] >= 128
    assert 0.1 < mask.mean() < 0.5
    assert inputs["parse_agnostic"].max() <= 19 and not np.isin(inputs["parse_agnostic"], (5, 6, 7, 10)).any()


def test_load_tryon_inputs_uses_a_given_agnostic_image(small_set):
    ready = small_set / "agnostic.png"
    Image.new("RGB", (192, 256), (1, 2, 3)).save(ready)
    inputs = load_tryon_inputs(small_set, *PAIRS[0], agnostic=ready)
    assert np.all(inputs["agnostic"] == (1, 2, 3))
    Image.new("RGB", (96, 128)).save(ready)
    with pytest.raises(DatasetError, match=r"agnostic image .*expected size 256x192 .*got 128x96"):
        load_tryon_inputs(small_set, *PAIRS[0], agnostic=ready)


@pytest.mark.parametrize(
    "what,relative",
    [
        ("cloth mask", "cloth-mask/00002_00.jpg"),
        ("pose keypoints", "openpose_json/00001_00_keypoints.json"),
        ("parse map", "image-parse-v3/00001_00.png"),
        ("densepose image", "image-densepose/00001_00.jpg"),
        ("person image", "image/00001_00.jpg"),
    ],
)
def test_load_tryon_inputs_missing_file(small_set, what, relative):
    path = small_set / "test" / relative
    path.unlink()
    with pytest.raises(DatasetError) as info:
        load_tryon_inputs(small_set, *PAIRS[0])
    assert str(info.value) == f"missing {what}: {path}"


@pytest.mark.parametrize(
    "relative", ["image-parse-agnostic-v3.2/00001_00.png", "image-parse-v3/00001_00.png"]
)
def test_load_tryon_inputs_rejects_labels_above_19(small_set, relative):
    path = small_set / "test" / relative
    labels = np.array(Image.open(path))
    labels[10, 10] = 25
    bad = Image.fromarray(labels)
    bad.putpalette(Image.open(path).getpalette())
    bad.save(path)
    with pytest.raises(DatasetError, match=r"expected CIHP labels 0\.\.19, got label 25") as info:
        load_tryon_inputs(small_set, *PAIRS[0])
    assert str(path) in str(info.value)


def test_load_tryon_inputs_rejects_inconsistent_size_and_colour_label_maps(small_set):
    densepose = small_set / "test/image-densepose/00001_00.jpg"
    Image.open(densepose).resize((96, 128)).save(densepose)
    with pytest.raises(DatasetError, match=r"densepose image .*expected size 256x192 .*got 128x96"):
        load_tryon_inputs(small_set, *PAIRS[0])

    parse = small_set / "test/image-parse-agnostic-v3.2/00002_00.png"
    Image.open(parse).convert("RGB").save(parse)
    with pytest.raises(DatasetError, match="expected a P or L mode label PNG, got mode RGB"):
        load_tryon_inputs(small_set, *PAIRS[1])


def test_load_tryon_inputs_rejects_bad_keypoints(small_set):
    path = small_set / "test/openpose_json/00001_00_keypoints.json"
    path.write_text(json.dumps({"people": []}))
    with pytest.raises(DatasetError, match="cannot read pose keypoints"):
        load_tryon_inputs(small_set, *PAIRS[0])
    path.write_text(json.dumps({"people": [{"pose_keypoints_2d": [1.0] * 54}]}))  # COCO-18, not BODY_25
    with pytest.raises(DatasetError, match="expected 75 values"):
        load_tryon_inputs(small_set, *PAIRS[0])


# --- CLI ------------------------------------------------------------------------------------------------


def test_make_samples_cli(tmp_path):
    script = REPO / "client" / "make_samples.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "set"), "--height", "256", "--width", "192"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 17 files" in done.stdout
    assert "00001_00.jpg 00002_00.jpg" in done.stdout
    assert Image.open(tmp_path / "set/test/image/00002_00.jpg").size == (192, 256)

    bad = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "bad"), "--height", "10"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "too small" in bad.stderr
    assert "Traceback" not in bad.stderr
