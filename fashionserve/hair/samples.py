"""Drawn sample portraits and a sample latent direction, for the quick start and tests (no photos).

The portraits are square, face-aligned like FFHQ crops (eyes a little above the centre, chin near the
bottom fifth), each with a distinct hairstyle and hair colour, so a hair transfer between two of them
has something to move. They are drawings: a random-init pipeline returns noise for them, and a trained
one sees them as far from its training faces.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

REF_SIZE = 1024  # drawings are made in the coordinates of a 1024x1024 FFHQ crop, then scaled
MIN_SIZE = 16

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class SamplePortrait:
    name: str
    style: str  # "short", "long" or "bangs"
    hair: Colour
    skin: Colour
    background: Colour
    clothes: Colour


SAMPLE_PORTRAITS = (
    SamplePortrait("short_black", "short", (28, 24, 24), (226, 182, 152), (188, 205, 222), (60, 90, 140)),
    SamplePortrait("long_blond", "long", (226, 196, 120), (240, 200, 176), (214, 208, 196), (150, 40, 60)),
    SamplePortrait("bangs_red", "bangs", (168, 62, 30), (196, 142, 110), (200, 220, 200), (40, 120, 90)),
)


def _tint(rng: np.random.Generator, colour: Colour, amount: int = 10) -> Colour:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def draw_portrait(index: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 size x size x 3 drawing of sample portrait `index` (modulo the number of samples); the seed
    varies colours slightly. Same arguments, same pixels."""
    if size < MIN_SIZE:
        raise ValueError(f"portrait size {size} is too small: at least {MIN_SIZE}")
    sample = SAMPLE_PORTRAITS[index % len(SAMPLE_PORTRAITS)]
    rng = np.random.default_rng(seed * len(SAMPLE_PORTRAITS) + index)
    hair, skin = _tint(rng, sample.hair), _tint(rng, sample.skin)
    scale = size / REF_SIZE

    def box(cx: float, cy: float, rx: float, ry: float) -> tuple[float, float, float, float]:
        return (cx - rx) * scale, (cy - ry) * scale, (cx + rx) * scale, (cy + ry) * scale

    image = Image.new("RGB", (size, size), _tint(rng, sample.background))
    draw = ImageDraw.Draw(image)
    if sample.style == "long":  # hair falling behind the head to the shoulders
        draw.rounded_rectangle(box(512, 560, 300, 380), radius=260 * scale, fill=hair)
    draw.ellipse(box(512, 1180, 500, 280), fill=_tint(rng, sample.clothes))  # shoulders
    draw.rectangle(box(512, 860, 105, 120), fill=skin)  # neck
    draw.ellipse(box(512, 400, 262, 232), fill=hair)  # skull
    draw.ellipse(box(300, 560, 34, 62), fill=skin)  # ears
    draw.ellipse(box(724, 560, 34, 62), fill=skin)
    draw.ellipse(box(512, 560, 222, 300), fill=skin)  # face
    hairline = 425 if sample.style == "bangs" else 350  # the lower edge of the hair over the forehead
    draw.chord(box(512, hairline, 236, hairline - 200), 180, 360, fill=hair)
    for x in (420, 604):
        draw.ellipse(box(x, 490, 34, 16), fill=(250, 250, 250))
        draw.ellipse(box(x, 490, 14, 14), fill=(60, 40, 30))
        draw.line(
            [((x - 40) * scale, 445 * scale), ((x + 40) * scale, 440 * scale)],
            fill=hair,
            width=max(1, round(12 * scale)),
        )
    draw.line(
        [(512 * scale, 520 * scale), (500 * scale, 620 * scale)],
        fill=(170, 120, 100),
        width=max(1, round(8 * scale)),
    )
    draw.chord(box(512, 700, 70, 34), 0, 180, fill=(170, 60, 70))  # mouth
    return np.array(image)


def sample_portraits(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every sample portrait by name, at `size`."""
    return {s.name: draw_portrait(i, size, seed) for i, s in enumerate(SAMPLE_PORTRAITS)}


def sample_direction(style_dim: int, seed: int = 0) -> np.ndarray:
    """A seeded unit vector of `style_dim` floats, in the shape of an InterFaceGAN boundary. It is NOT a
    semantic direction (no hair colour, no bangs): it shows the edit path works; pass a real one."""
    vector = np.random.default_rng(seed).standard_normal(style_dim)
    return (vector / np.linalg.norm(vector)).astype(np.float32)
