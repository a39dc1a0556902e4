"""Drawn stand-ins for Fashion-MNIST: one jittered silhouette per class, in the dataset's IDX layout.

They exist to prove the training loop, the export and the try-on gate end to end without the real
data (which is never downloaded); a classifier trained on them means nothing on real garments.

    python -m fashionserve.catalogue.samples OUT_DIR [--train 2000 --test 500 --seed 0]
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fashionserve.catalogue.data import SPLITS, write_idx
from fashionserve.cli import command_parser

# Outline of each class in unit coordinates (x, y), top-left origin; Fashion-MNIST label order.
_TORSO_LONG_SLEEVES = [
    (0.35, 0.08), (0.65, 0.08), (0.9, 0.22), (0.97, 0.9), (0.82, 0.9), (0.74, 0.42),
    (0.74, 0.95), (0.26, 0.95), (0.26, 0.42), (0.18, 0.9), (0.03, 0.9), (0.1, 0.22),
]  # fmt: skip
_OUTLINES = {
    0: [(0.35, 0.1), (0.65, 0.1), (0.95, 0.28), (0.85, 0.44), (0.72, 0.36), (0.72, 0.95),
        (0.28, 0.95), (0.28, 0.36), (0.15, 0.44), (0.05, 0.28)],
    1: [(0.3, 0.03), (0.7, 0.03), (0.76, 0.97), (0.56, 0.97), (0.5, 0.3), (0.44, 0.97), (0.24, 0.97)],
    2: _TORSO_LONG_SLEEVES,
    3: [(0.4, 0.03), (0.6, 0.03), (0.63, 0.35), (0.88, 0.97), (0.12, 0.97), (0.37, 0.35)],
    4: _TORSO_LONG_SLEEVES,
    5: [(0.03, 0.78), (0.97, 0.66), (0.97, 0.76), (0.03, 0.88)],
    6: _TORSO_LONG_SLEEVES,
    7: [(0.03, 0.5), (0.45, 0.4), (0.7, 0.58), (0.97, 0.64), (0.97, 0.88), (0.03, 0.88)],
    8: [(0.12, 0.35), (0.88, 0.35), (0.92, 0.95), (0.08, 0.95)],
    9: [(0.3, 0.08), (0.62, 0.08), (0.64, 0.55), (0.97, 0.7), (0.97, 0.92), (0.08, 0.92), (0.14, 0.55)],
}  # fmt: skip
_SUPERSAMPLE = 4


def _silhouette(label: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Float mask in 0..1 of one jittered garment of class `label`, antialiased."""
    big = (width * _SUPERSAMPLE, height * _SUPERSAMPLE)
    canvas = Image.new("L", big, 0)
    draw = ImageDraw.Draw(canvas)
    scale = rng.uniform(0.7, 1.0, size=2)  # per axis: garments of every aspect ratio
    shift = rng.uniform(-0.04, 0.04, size=2)

    def points(outline: list[tuple[float, float]]) -> list[tuple[float, float]]:
        jitter = rng.uniform(-0.03, 0.03, size=(len(outline), 2))
        unit = (np.asarray(outline) - 0.5) * scale + 0.5 + shift + jitter
        return [(x * big[0], y * big[1]) for x, y in unit]

    draw.polygon(points(_OUTLINES[label]), fill=255)
    line = max(1, big[0] // 40)
    if label == 4:  # coat: open front
        draw.line(points([(0.5, 0.12), (0.5, 0.95)]), fill=0, width=line)
    elif label == 6:  # shirt: collar and button placket
        draw.polygon(points([(0.42, 0.08), (0.58, 0.08), (0.5, 0.22)]), fill=0)
        draw.line(points([(0.5, 0.22), (0.5, 0.95)]), fill=90, width=line)
    elif label == 5:  # sandal: straps over the sole
        for x in (0.25, 0.5, 0.75):
            draw.line(points([(x - 0.08, 0.78), (x + 0.08, 0.45)]), fill=255, width=2 * line)
    elif label == 8:  # bag: handle
        box = points([(0.3, 0.1), (0.7, 0.55)])
        draw.arc([*box[0], *box[1]], 180, 360, fill=255, width=2 * line)
    mask = canvas.resize((width, height), Image.BOX)
    return np.asarray(mask, dtype=np.float32) / 255.0


def draw_garment(label: int, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """A Fashion-MNIST-like uint8 [size, size] image: textured garment, bright on black."""
    mask = _silhouette(label, size, size, rng)
    tone = rng.uniform(90, 255) + rng.normal(0, rng.uniform(0, 30), size=mask.shape)
    return (mask * tone).clip(0, 255).astype(np.uint8)


def draw_product_photo(label: int, height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 [H, W, 3] product photo: one coloured garment of class `label` on an off-white background."""
    rng = np.random.default_rng(seed)
    mask = _silhouette(label, height, width, rng)[..., None]
    colour = rng.uniform(20, 140, size=3)
    background = np.full(3, 246.0)
    return (mask * colour + (1 - mask) * background).round().astype(np.uint8)


def draw_set(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` drawn images (classes in turn) and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count, dtype=np.uint8) % 10
    images = np.stack([draw_garment(int(label), rng) for label in labels])
    return images, labels


def write_synthetic_set(root: Path, train: int = 2000, test: int = 500, seed: int = 0) -> None:
    """Write the four IDX files (gzipped, standard names) of a drawn set into `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for (images_stem, labels_stem), count, split_seed in zip(
        SPLITS.values(), (train, test), (seed, seed + 1), strict=True
    ):
        images, labels = draw_set(count, split_seed)
        write_idx(root / f"{images_stem}.gz", images)
        write_idx(root / f"{labels_stem}.gz", labels)


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("out", type=Path, help="folder for the four IDX .gz files")
    parser.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--test", type=int, default=500, help="test images (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="drawing seed (default 0)")
    args = parser.parse_args()
    write_synthetic_set(args.out, args.train, args.test, args.seed)
    print(f"wrote {args.train} training and {args.test} test drawn images to {args.out}")


if __name__ == "__main__":
    main()
