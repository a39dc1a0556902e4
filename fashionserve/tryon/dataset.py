"""VITON-HD layout: pairs file, per-sample file names and loading of the try-on server's inputs."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from fashionserve.cli import UserError
from fashionserve.client import open_image
from fashionserve.tryon.agnostic import agnostic_person_image
from fashionserve.tryon.labels import NUM_CIHP_LABELS

PAIRS_FILE = "{split}_pairs.txt"
IMAGE_INPUTS = ("cloth", "agnostic", "densepose")  # resized bilinear; the others are masks/labels (nearest)


class DatasetError(Exception):
    """A dataset file is missing, unreadable or inconsistent; the message is one line."""


def person_files(split_dir: Path, person: str) -> dict[str, Path]:
    """Files of one person image under <dataroot>/<split>, named as the official test loader names them.

    person is the name from the pairs file (e.g. 00001_00.jpg). Keys are what each file holds.
    """
    stem = Path(person).stem
    return {
        "person image": split_dir / "image" / person,
        "parse map": split_dir / "image-parse-v3" / f"{stem}.png",
        "parse-agnostic map": split_dir / "image-parse-agnostic-v3.2" / f"{stem}.png",
        "pose keypoints": split_dir / "openpose_json" / f"{stem}_keypoints.json",
        "pose image": split_dir / "openpose_img" / f"{stem}_rendered.png",
        "densepose image": split_dir / "image-densepose" / person,
    }


def cloth_files(split_dir: Path, cloth: str) -> dict[str, Path]:
    """Files of one garment under <dataroot>/<split>; cloth is the name from the pairs file."""
    return {"cloth image": split_dir / "cloth" / cloth, "cloth mask": split_dir / "cloth-mask" / cloth}


def read_pairs(pairs_file: Path) -> list[tuple[str, str]]:
    """(person, cloth) file names, one pair per line; blank lines are skipped."""
    if not pairs_file.is_file():
        raise DatasetError(f"missing pairs file: {pairs_file}")
    try:
        text = pairs_file.read_text()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{pairs_file}: not a text file: {exc}") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            got = f"got {len(fields)} fields: {line.strip()!r}"
            raise DatasetError(f"{pairs_file}:{number}: expected '<person> <cloth>', {got}")
        pairs.append((fields[0], fields[1]))
    return pairs


def _open(what: str, path: Path) -> Image.Image:
    if not path.is_file():
        raise DatasetError(f"missing {what}: {path}")
    try:
        return open_image(path, what)  # refuses decompression bombs before decoding
    except UserError as exc:
        raise DatasetError(str(exc)) from None


def _check_size(what: str, path: Path, array: np.ndarray, size: tuple[int, ...]) -> None:
    if array.shape[:2] != size:
        raise DatasetError(
            f"{what} {path}: expected size {size[0]}x{size[1]} (the person image's), "
            f"got {array.shape[0]}x{array.shape[1]}"
        )


def _pixels(what: str, path: Path, mode: str, size: tuple[int, ...]) -> np.ndarray:
    """Image converted to mode ('RGB' or 'L') as a uint8 array of the given height and width."""
    array = np.array(_open(what, path).convert(mode))
    _check_size(what, path, array, size)
    return array


def _labels(what: str, path: Path, size: tuple[int, ...]) -> np.ndarray:
    """CIHP label map (H, W) of the given height and width."""
    image = _open(what, path)
    # Label PNGs hold indices (P mode, as CIHP_PGN writes them) or plain gray values; anything else
    # would be a colour rendering whose values are not labels.
    if image.mode not in ("P", "L"):
        raise DatasetError(f"{what} {path}: expected a P or L mode label PNG, got mode {image.mode}")
    labels = np.array(image, dtype=np.uint8)
    _check_size(what, path, labels, size)
    if labels.max() >= NUM_CIHP_LABELS:
        raise DatasetError(
            f"{what} {path}: expected CIHP labels 0..{NUM_CIHP_LABELS - 1}, got label {labels.max()}"
        )
    return labels


def _keypoints(path: Path) -> np.ndarray:
    """BODY_25 x, y of the first person in an OpenPose JSON file; confidences are dropped."""
    if not path.is_file():
        raise DatasetError(f"missing pose keypoints: {path}")
    try:
        people = json.loads(path.read_text())["people"]
        values = np.asarray(people[0]["pose_keypoints_2d"], dtype=np.float64)
    except (ValueError, KeyError, IndexError, TypeError, RecursionError) as exc:  # RecursionError: nesting
        detail = "nested too deeply" if isinstance(exc, RecursionError) else f"{type(exc).__name__}: {exc}"
        raise DatasetError(f"cannot read pose keypoints: {path}: {detail}") from None
    if values.shape != (75,):
        got = f"{values.size} values" if values.ndim == 1 else f"an array of shape {list(values.shape)}"
        raise DatasetError(
            f"pose keypoints {path}: expected 75 values in a flat list (BODY_25 x,y,c), got {got}"
        )
    if not np.isfinite(values).all():
        raise DatasetError(f"pose keypoints {path}: holds NaN or infinite values")
    return values.reshape(25, 3)[:, :2]


def load_tryon_inputs(
    dataroot: Path, person: str, cloth: str, split: str = "test", agnostic: Path | None = None
) -> dict[str, np.ndarray]:
    """The try-on server's inputs for one pair of a VITON-HD-layout folder (see load_tryon_files)."""
    split_dir = dataroot / split
    return load_tryon_files({**person_files(split_dir, person), **cloth_files(split_dir, cloth)}, agnostic)


def load_tryon_files(files: dict[str, Path], agnostic: Path | None = None) -> dict[str, np.ndarray]:
    """The try-on server's inputs from explicit files, all uint8 at the person image's size (H, W).

    `files` has the keys of person_files and cloth_files (the pose image is not needed).
    Returns cloth (H,W,3), cloth_mask (H,W) raw mask values, and the person's inputs (see
    load_person_files). Files are not resized: sizes must already agree.
    """
    person = load_person_files(files, agnostic)
    size = person["agnostic"].shape[:2]
    return {
        "cloth": _pixels("cloth image", files["cloth image"], "RGB", size),
        "cloth_mask": _pixels("cloth mask", files["cloth mask"], "L", size),
        **person,
    }


def load_person_files(files: dict[str, Path], agnostic: Path | None = None) -> dict[str, np.ndarray]:
    """The person's half of the try-on inputs, uint8 at the person image's size (H, W): agnostic (H,W,3)
    (drawn from image, parse map and keypoints unless a ready agnostic image is given), densepose
    (H,W,3) and parse_agnostic (H,W) CIHP labels. `files` has the keys of person_files."""
    image = np.array(_open("person image", files["person image"]).convert("RGB"))
    size = image.shape[:2]
    if agnostic is None:
        parse = _labels("parse map", files["parse map"], size)
        agnostic_image = agnostic_person_image(image, parse, _keypoints(files["pose keypoints"]))
    else:
        agnostic_image = _pixels("agnostic image", agnostic, "RGB", size)
    return {
        "agnostic": agnostic_image,
        "densepose": _pixels("densepose image", files["densepose image"], "RGB", size),
        "parse_agnostic": _labels("parse-agnostic map", files["parse-agnostic map"], size),
    }


def resize_inputs(inputs: dict[str, np.ndarray], height: int, width: int) -> dict[str, np.ndarray]:
    """The try-on inputs of one pair scaled to height x width: images bilinear, masks and label maps
    nearest (a label must stay a label)."""
    resized = {}
    for name, array in inputs.items():
        if array.shape[:2] != (height, width):
            resample = Image.BILINEAR if name in IMAGE_INPUTS else Image.NEAREST
            array = np.asarray(Image.fromarray(array).resize((width, height), resample))
        resized[name] = array
    return resized
