"""Multi-scale sliced Wasserstein distance (SWD, the PG-GAN paper's metric) between two image sets.

Each set is a folder of images (PNG/JPEG, sorted by name, all one size) or a .npy array of uint8
[N, H, W, 3] / [N, H, W]. Both sets must hold images of the same size; the first --count images of
each are compared (default: as many as the smaller set has). Prints SWDx1e3 per Laplacian level (full
size halving down to 16) and their average, as the official code reports them; lower is closer.

Examples:
  python bench/swd.py work/real work/generated
  python bench/swd.py fp32.npy int8.npy --seed 0 --json work/swd.json
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.catalogue.swd import SWDError, swd  # noqa: E402
from fashionserve.cli import UserError, command_parser, run  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_set(path: Path, count: int | None) -> np.ndarray:
    """uint8 images from a folder or a .npy file."""
    if path.suffix == ".npy":
        try:
            images = np.load(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {path}: {exc}") from None
        if images.dtype != np.uint8:
            raise UserError(f"{path}: expected uint8 images, got {images.dtype}")
        return images[:count]
    if not path.is_dir():
        raise UserError(f"not a folder or .npy file: {path}")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise UserError(f"no images in {path}")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(np.asarray(image.convert("RGB")))
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{file}: not a readable image ({exc})") from None
    sizes = {image.shape for image in images}
    if len(sizes) > 1:
        raise UserError(f"{path}: images of different sizes {sorted(sizes)}; SWD compares one size")
    return np.stack(images)


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("first", type=Path, help="image folder or .npy file (e.g. the real images)")
    parser.add_argument("second", type=Path, help="image folder or .npy file (e.g. the generated images)")
    parser.add_argument("--count", type=int, help="images per set (default: the smaller set's size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of patches and directions (default 0)")
    parser.add_argument("--json", type=Path, help="also write the values as JSON here")
    args = parser.parse_args()
    first, second = read_set(args.first, args.count), read_set(args.second, args.count)
    count = min(len(first), len(second))
    values = swd(first[:count], second[:count], seed=args.seed)
    print(f"SWD x1e3 over {count} images per set ({first.shape[1]}x{first.shape[2]}):")
    for name, value in values.items():
        print(f"  {name:<14} {value:10.4f}")
    if args.json:
        args.json.write_text(json.dumps({"images": count, "seed": args.seed, **values}, indent=2) + "\n")


if __name__ == "__main__":
    run(main, expected=(SWDError,))
