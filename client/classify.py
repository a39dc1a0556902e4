"""Classify garment photos through Triton (`garment_classifier`): Fashion-MNIST class and confidence.

Photos of any size are sent as they are (the server trims, resizes to 28x28 and converts to gray),
one request per photo.

Examples:
  python client/classify.py work/samples/test/cloth/00001_00.jpg
  python client/classify.py photos/*.jpg --top 3 --protocol http --url 127.0.0.1:8000
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.catalogue.gate import GATE_MODEL  # noqa: E402
from fashionserve.catalogue.networks.classifier import CLASSES, UPPER_BODY  # noqa: E402
from fashionserve.cli import UserError, command_parser, run  # noqa: E402
from fashionserve.client import DEFAULT_URLS, PROTOCOLS, ClientError, TritonModelClient  # noqa: E402


def read_photo(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from None


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("images", type=Path, nargs="+", help="garment photos (PNG, JPEG, ...)")
    parser.add_argument("--top", type=int, default=1, help="classes to list per photo (default 1)")
    parser.add_argument("--url", help="Triton address (default 127.0.0.1:8001 for grpc, :8000 for http)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="grpc (default) or http")
    parser.add_argument("--model", default=GATE_MODEL, help=f"model name (default {GATE_MODEL})")
    args = parser.parse_args()
    photos = [(path, read_photo(path)) for path in args.images]
    client = TritonModelClient(args.url or DEFAULT_URLS[args.protocol], args.model, args.protocol)
    for path, photo in photos:
        (probabilities,) = client.infer({"image": photo[None]})["probabilities"]
        ranked = np.argsort(-probabilities)[: max(1, args.top)]
        listing = ", ".join(f"{CLASSES[k]} {probabilities[k]:.3f}" for k in ranked)
        group = "upper-body" if ranked[0] in UPPER_BODY else "not upper-body"
        print(f"{path}: {listing} ({group})")
    client.close()


if __name__ == "__main__":
    run(main, expected=(ClientError,))
