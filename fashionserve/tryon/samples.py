"""A tiny VITON-HD-layout test set made from drawings, for tests and demos without the real dataset.

Everything is drawn in reference coordinates of a 1024x768 (H x W) image and scaled to the requested
size, so the same persons and garments come out at 1024x768, 512x384 or 256x192. Each person's parse
map is drawn first and the person image is coloured from it, so labels and pixels agree; keypoints
are the joints the limbs are drawn through. Person 00001_00 wears garment 00001_00 and so on, as in
VITON-HD; the pairs file holds the two unpaired (swapped) pairs.
"""

import colorsys
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fashionserve.tryon.agnostic import parse_agnostic_map
from fashionserve.tryon.dataset import PAIRS_FILE, cloth_files, person_files

REF_HEIGHT, REF_WIDTH = 1024, 768
MIN_HEIGHT, MIN_WIDTH = 64, 48
PERSON_BACKGROUND = (232, 230, 226)
CLOTH_BACKGROUND = (246, 246, 246)  # what VITON-HD cloth images sit on

Colour = tuple[int, int, int]
Point = tuple[float, float]

# CIHP labels used by the drawing
HAIR, UPPER, PANTS, NECK, FACE = 2, 5, 9, 10, 13
LEFT_ARM, RIGHT_ARM, LEFT_LEG, RIGHT_LEG, LEFT_SHOE, RIGHT_SHOE = 14, 15, 16, 17, 18, 19

# LIP/CIHP colour palette, so the P-mode parse PNGs look like the dataset's when viewed
PARSE_PALETTE = (
    (0, 0, 0), (128, 0, 0), (255, 0, 0), (0, 85, 0), (170, 0, 51), (255, 85, 0), (0, 0, 85),
    (0, 119, 221), (85, 85, 0), (0, 85, 85), (85, 51, 0), (52, 86, 128), (0, 128, 0), (0, 0, 255),
    (51, 170, 221), (0, 255, 255), (85, 255, 170), (170, 255, 85), (255, 255, 0), (255, 170, 0),
)  # fmt: skip

# BODY_25 limbs drawn in the rendered pose image
POSE_LIMBS = (
    (1, 8), (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (8, 9), (9, 10), (10, 11), (8, 12), (12, 13),
    (13, 14), (1, 0), (0, 15), (15, 17), (0, 16), (16, 18), (14, 19), (19, 20), (14, 21), (11, 22),
    (22, 23), (11, 24),
)  # fmt: skip

# DensePose-like body parts: colour per part index 1..12 (0 = not the body)
DENSEPOSE_COLOURS = np.array(
    [
        (0, 0, 0), (70, 40, 160), (250, 220, 40), (40, 110, 230), (60, 170, 220), (30, 200, 160),
        (90, 220, 110), (160, 230, 60), (210, 200, 50), (240, 150, 40), (230, 90, 60), (200, 50, 110),
        (150, 40, 150),
    ],
    dtype=np.float32,
)  # fmt: skip


@dataclass(frozen=True)
class Garment:
    """A top: base colour, pattern accent colour, pattern kind ('stripes' or 'dots'), sleeves or not."""

    colour: Colour
    accent: Colour
    pattern: str
    sleeves: bool


@dataclass(frozen=True)
class Person:
    """A frontal pose in reference pixels: body centre x and (elbow, wrist) per arm, relative to it.

    'right' is the person's right, drawn on the image's left as in a frontal photo.
    """

    centre_x: float
    right_arm: tuple[Point, Point]
    left_arm: tuple[Point, Point]
    skin: Colour
    hair: Colour
    pants: Colour
    shoes: Colour


GARMENTS = (
    Garment(colour=(196, 42, 52), accent=(245, 235, 225), pattern="stripes", sleeves=True),
    Garment(colour=(32, 118, 158), accent=(245, 205, 60), pattern="dots", sleeves=False),
)
PERSONS = (
    # arms hanging down, slightly away from the body
    Person(
        centre_x=384,
        right_arm=((-160, 455), (-185, 590)),
        left_arm=((160, 455), (185, 590)),
        skin=(224, 178, 150),
        hair=(70, 45, 30),
        pants=(44, 62, 112),
        shoes=(30, 30, 34),
    ),
    # right arm held out, left hand resting on the hip
    Person(
        centre_x=400,
        right_arm=((-205, 430), (-262, 540)),
        left_arm=((205, 440), (112, 575)),
        skin=(176, 124, 92),
        hair=(20, 18, 18),
        pants=(188, 168, 128),
        shoes=(120, 60, 40),
    ),
)


class _Scale:
    """Maps reference coordinates (1024x768 image) to the output size."""

    def __init__(self, height: int, width: int) -> None:
        self.sx, self.sy = width / REF_WIDTH, height / REF_HEIGHT
        self.size = (width, height)

    def point(self, x: float, y: float) -> Point:
        return x * self.sx, y * self.sy

    def box(self, x: float, y: float, rx: float, ry: float) -> tuple[float, float, float, float]:
        """Bounding box of an ellipse centred on (x, y) with half-axes rx, ry."""
        return (x - rx) * self.sx, (y - ry) * self.sy, (x + rx) * self.sx, (y + ry) * self.sy

    def width(self, ref_width: float) -> int:
        return max(1, round(ref_width * self.sx))

    def limb(self, draw: ImageDraw.ImageDraw, points: list[Point], ref_width: float, fill: int) -> None:
        """A thick line through reference points with round joints and ends."""
        draw.line([self.point(*p) for p in points], fill, width=self.width(ref_width))
        for x, y in points:
            draw.ellipse(self.box(x, y, ref_width / 2, ref_width / 2), fill, fill)


def _body_keypoints(person: Person) -> np.ndarray:
    """BODY_25 joints (25, 2) of a person in reference pixels."""
    relative = {
        0: (0, 185), 1: (0, 300), 2: (-120, 305), 3: person.right_arm[0], 4: person.right_arm[1],
        5: (120, 305), 6: person.left_arm[0], 7: person.left_arm[1], 8: (0, 600), 9: (-58, 600),
        10: (-62, 765), 11: (-66, 915), 12: (58, 600), 13: (62, 765), 14: (66, 915), 15: (-22, 165),
        16: (22, 165), 17: (-60, 172), 18: (60, 172), 19: (52, 966), 20: (88, 962), 21: (70, 942),
        22: (-52, 966), 23: (-88, 962), 24: (-70, 942),
    }  # fmt: skip
    points = np.array([relative[i] for i in range(25)], dtype=np.float64)
    points[:, 0] += person.centre_x
    return points


def _joints(keypoints: np.ndarray, *indices: int) -> list[Point]:
    return [(float(keypoints[i, 0]), float(keypoints[i, 1])) for i in indices]


def _hand(keypoints: np.ndarray, elbow: int, wrist: int) -> np.ndarray:
    """Centre of the hand: a little past the wrist, along the forearm."""
    forearm = keypoints[wrist] - keypoints[elbow]
    return keypoints[wrist] + forearm / np.linalg.norm(forearm) * 26


def _pattern(kind: str, height: int, width: int, scale: _Scale) -> np.ndarray:
    """(H, W) bool: where the accent colour goes, in reference units so it scales with the image."""
    ys, xs = np.mgrid[0:height, 0:width]
    ys, xs = ys / scale.sy, xs / scale.sx
    if kind == "stripes":
        return (ys % 36) < 10
    if kind == "dots":
        return ((xs % 48) - 24) ** 2 + ((ys % 48) - 24) ** 2 < 9**2
    raise ValueError(f"unknown pattern {kind!r}")


def _draw_parse(person: Person, garment: Garment, keypoints: np.ndarray, scale: _Scale) -> np.ndarray:
    """CIHP label map of a person, drawn back to front."""
    cx = person.centre_x
    parse = Image.new("L", scale.size, 0)
    draw = ImageDraw.Draw(parse)

    def at(*relative: Point) -> list[Point]:
        return [(cx + x, y) for x, y in relative]

    # long hair behind the head and shoulders
    draw.ellipse(scale.box(cx, 165, 88, 100), HAIR, HAIR)
    draw.rectangle((*scale.point(cx - 88, 165), *scale.point(cx + 88, 285)), HAIR, HAIR)
    draw.rectangle((*scale.point(cx - 30, 225), *scale.point(cx + 30, 310)), NECK, NECK)
    # legs, then pants to below the knee, then shoes
    scale.limb(draw, _joints(keypoints, 9, 10, 11), 70, RIGHT_LEG)
    scale.limb(draw, _joints(keypoints, 12, 13, 14), 70, LEFT_LEG)
    draw.rectangle((*scale.point(cx - 108, 580), *scale.point(cx + 108, 650)), PANTS, PANTS)
    for side in (-1, 1):
        draw.line([scale.point(*p) for p in at((side * 58, 600), (side * 64, 800))], PANTS, scale.width(104))
    for ankle, label in ((11, RIGHT_SHOE), (14, LEFT_SHOE)):
        x, y = keypoints[ankle]
        outward = -4 if label == RIGHT_SHOE else 4
        draw.ellipse(scale.box(x + outward, y + 33, 44, 24), label, label)
    # top
    if garment.sleeves:
        torso = at((-40, 292), (-128, 302), (-116, 615), (116, 615), (128, 302), (40, 292))
        neckline = (cx, 296, 40, 24)
    else:
        torso = at(
            (-40, 292), (-104, 298), (-112, 400), (-116, 615), (116, 615), (112, 400), (104, 298), (40, 292)
        )
        neckline = (cx, 300, 46, 40)
    draw.polygon([scale.point(*p) for p in torso], UPPER, UPPER)
    draw.ellipse(scale.box(*neckline), NECK, NECK)
    # arms (after the top, so a hand can rest on it) with hands a little past the wrist
    for chain, label in (((2, 3, 4), RIGHT_ARM), ((5, 6, 7), LEFT_ARM)):
        scale.limb(draw, _joints(keypoints, *chain), 58, label)
        hand = _hand(keypoints, chain[1], chain[2])
        draw.ellipse(scale.box(hand[0], hand[1], 30, 30), label, label)
        if garment.sleeves:
            shoulder = keypoints[chain[0]]
            sleeve_end = shoulder + (keypoints[chain[1]] - shoulder) * 0.45
            scale.limb(draw, [tuple(shoulder), tuple(sleeve_end)], 86, UPPER)
    # face with a fringe over the forehead
    draw.ellipse(scale.box(cx, 170, 58, 76), FACE, FACE)
    draw.chord(scale.box(cx, 140, 66, 58), 180, 360, HAIR, HAIR)
    return np.array(parse)


def _person_image(
    person: Person, garment: Garment, parse: np.ndarray, keypoints: np.ndarray, scale: _Scale
) -> np.ndarray:
    """RGB person image coloured from its parse map, plus a few face details."""
    height, width = parse.shape
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[0] = PERSON_BACKGROUND
    colours[[NECK, FACE, LEFT_ARM, RIGHT_ARM, LEFT_LEG, RIGHT_LEG]] = person.skin
    colours[HAIR], colours[PANTS] = person.hair, person.pants
    colours[[LEFT_SHOE, RIGHT_SHOE]] = person.shoes
    colours[UPPER] = garment.colour
    image = colours[parse]
    accent = (parse == UPPER) & _pattern(garment.pattern, height, width, scale)
    image[accent] = garment.accent

    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    for eye in (15, 16):
        x, y = keypoints[eye]
        draw.ellipse(scale.box(x, y + 3, 8, 5), (40, 30, 30), (40, 30, 30))
    cx = person.centre_x
    draw.line([scale.point(cx, 180), scale.point(cx - 4, 198)], (170, 120, 100), scale.width(3))
    draw.line([scale.point(cx - 16, 214), scale.point(cx + 16, 214)], (170, 60, 70), scale.width(5))
    return np.array(picture)


def _cloth(garment: Garment, scale: _Scale) -> tuple[np.ndarray, np.ndarray]:
    """Flat-lay garment image on the VITON-HD cloth background, and its 0/255 mask."""
    mask = Image.new("L", scale.size, 0)
    draw = ImageDraw.Draw(mask)
    if garment.sleeves:
        outline = [
            (324, 232), (214, 272), (128, 432), (190, 468), (244, 382), (244, 822),
            (524, 822), (524, 382), (578, 468), (640, 432), (554, 272), (444, 232),
        ]  # fmt: skip
        neck = (384, 232, 62, 44)
    else:
        outline = [
            (318, 232), (262, 244), (248, 392), (244, 822), (524, 822), (520, 392), (506, 244), (450, 232),
        ]  # fmt: skip
        neck = (384, 236, 66, 72)
    draw.polygon([scale.point(*p) for p in outline], 255, 255)
    draw.ellipse(scale.box(*neck), 0, 0)
    mask_array = np.array(mask)

    height, width = mask_array.shape
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = CLOTH_BACKGROUND
    inside = mask_array > 0
    image[inside] = garment.colour
    image[inside & _pattern(garment.pattern, height, width, scale)] = garment.accent
    return image, mask_array


def _densepose(parse: np.ndarray, keypoints: np.ndarray, scale: _Scale) -> np.ndarray:
    """DensePose-like colouring: body parts in fixed colours, shaded top to bottom within each part."""
    parts = Image.new("L", scale.size, 0)
    draw = ImageDraw.Draw(parts)
    cx = keypoints[1, 0]  # the neck is on the body's centre line

    draw.polygon([scale.point(*p) for p in _joints(keypoints, 2, 5, 12, 9)], 1, 1)
    draw.rectangle((*scale.point(cx - 120, 225), *scale.point(cx + 120, 320)), 1, 1)
    draw.ellipse(scale.box(cx, 170, 62, 80), 2, 2)
    for part, chain, limb_width in (
        (3, (2, 3), 80), (4, (5, 6), 80), (5, (3, 4), 64), (6, (6, 7), 64), (7, (9, 10), 110),
        (8, (12, 13), 110), (9, (10, 11), 80), (10, (13, 14), 80),
    ):  # fmt: skip
        scale.limb(draw, _joints(keypoints, *chain), limb_width, part)
    for part, chain in ((5, (3, 4)), (6, (6, 7))):  # hands belong to the lower arm
        hand = _hand(keypoints, *chain)
        draw.ellipse(scale.box(hand[0], hand[1], 34, 34), part, part)
    for part, ankle in ((11, 11), (12, 14)):
        x, y = keypoints[ankle]
        draw.ellipse(scale.box(x, y + 33, 50, 30), part, part)
    # DensePose only covers the visible person, and not the hair
    part_map = np.where((parse > 0) & (parse != HAIR), np.array(parts), 0)

    rows = np.arange(part_map.shape[0], dtype=np.float32)[:, None]
    shade = np.zeros(part_map.shape, dtype=np.float32)
    for part in range(1, len(DENSEPOSE_COLOURS)):
        ys = np.nonzero((part_map == part).any(axis=1))[0]
        if ys.size:
            shade = np.where(part_map == part, 0.45 + 0.55 * (rows - ys[0]) / max(1, ys[-1] - ys[0]), shade)
    return (DENSEPOSE_COLOURS[part_map] * shade[..., None]).round().astype(np.uint8)


def _pose_image(keypoints: np.ndarray, scale: _Scale) -> np.ndarray:
    """OpenPose-style skeleton rendering on black (as with --disable_blending)."""
    image = Image.new("RGB", scale.size, (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for i, (a, b) in enumerate(POSE_LIMBS):
        colour = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(i / len(POSE_LIMBS), 1.0, 0.9))
        draw.line([tuple(keypoints[a]), tuple(keypoints[b])], colour, scale.width(8))
    radius = 5 * scale.sx
    for x, y in keypoints:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), (255, 255, 255))
    return np.array(image)


def _save_labels(labels: np.ndarray, path: Path) -> None:
    image = Image.fromarray(labels)
    image.putpalette([c for colour in PARSE_PALETTE for c in colour])  # L -> P, values kept
    image.save(path)


def _jitter(rng: np.random.Generator, person: Person, garment: Garment) -> tuple[Person, Garment]:
    """Small seed-dependent changes of position, arm joints and colours."""

    def move(point: Point) -> Point:
        dx, dy = rng.uniform(-8, 8, size=2)
        return point[0] + dx, point[1] + dy

    def tint(colour: Colour) -> Colour:
        return tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in colour)

    person = replace(
        person,
        centre_x=person.centre_x + rng.uniform(-12, 12),
        right_arm=(move(person.right_arm[0]), move(person.right_arm[1])),
        left_arm=(move(person.left_arm[0]), move(person.left_arm[1])),
        skin=tint(person.skin),
        pants=tint(person.pants),
    )
    return person, replace(garment, colour=tint(garment.colour), accent=tint(garment.accent))


def write_sample_set(
    root: Path, height: int = 1024, width: int = 768, seed: int = 0
) -> list[tuple[str, str]]:
    """Write 2 persons and 2 garments in the VITON-HD layout under root; returns the (person, cloth) pairs.

    Writes root/test_pairs.txt and, under root/test: image, image-parse-v3, image-parse-agnostic-v3.2,
    openpose_json, openpose_img, image-densepose, cloth and cloth-mask files. The same arguments give
    the same files. Existing files of the same names are overwritten; nothing else is touched.
    """
    if height < MIN_HEIGHT or width < MIN_WIDTH:
        raise ValueError(f"size {height}x{width} is too small: at least {MIN_HEIGHT}x{MIN_WIDTH}")
    scale = _Scale(height, width)
    rng = np.random.default_rng(seed)
    split_dir = root / "test"
    names = [f"{i:05d}_00.jpg" for i in range(1, len(PERSONS) + 1)]

    for name, base_person, base_garment in zip(names, PERSONS, GARMENTS, strict=True):
        person, garment = _jitter(rng, base_person, base_garment)
        files = {**person_files(split_dir, name), **cloth_files(split_dir, name)}
        for path in files.values():
            path.parent.mkdir(parents=True, exist_ok=True)

        ref_keypoints = _body_keypoints(person)
        parse = _draw_parse(person, garment, ref_keypoints, scale)
        # rounded like OpenPose's JSON, so the parse-agnostic map matches what a reader of the JSON gets
        keypoints = (ref_keypoints * (scale.sx, scale.sy)).round(3)
        image = _person_image(person, garment, parse, ref_keypoints, scale)
        cloth, cloth_mask = _cloth(garment, scale)

        Image.fromarray(image).save(files["person image"], quality=95)
        _save_labels(parse, files["parse map"])
        _save_labels(parse_agnostic_map(parse, keypoints), files["parse-agnostic map"])
        confidence = np.linspace(0.95, 0.8, 25)  # plausible, fixed OpenPose confidences
        values = np.column_stack([keypoints, confidence.round(3)]).ravel()
        pose = {"version": 1.3, "people": [{"person_id": [-1], "pose_keypoints_2d": values.tolist()}]}
        files["pose keypoints"].write_text(json.dumps(pose))
        Image.fromarray(_pose_image(keypoints, scale)).save(files["pose image"])
        Image.fromarray(_densepose(parse, ref_keypoints, scale)).save(files["densepose image"], quality=95)
        Image.fromarray(cloth).save(files["cloth image"], quality=95)
        Image.fromarray(cloth_mask).save(files["cloth mask"], quality=95)

    # unpaired: each person with the other person's garment
    pairs = [(person, cloth) for person, cloth in zip(names, names[1:] + names[:1], strict=True)]
    (root / PAIRS_FILE.format(split="test")).write_text("".join(f"{p} {c}\n" for p, c in pairs))
    return pairs
