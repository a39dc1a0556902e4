"""Generate fashion images through Triton (`fashion_generator`) and write them as one contact sheet.

Latent vectors are drawn here from N(0, I) with --seed (the same seed and count give the same images),
or read from a .npy file of shape [count, latent_dim] with --latents.

Examples:
  python client/generate.py --count 8 --seed 1
  python client/generate.py --latents z.npy --out work/results/sheet.png --each work/results/generated
  python client/generate.py --count 32 --scale 4 --classifier garment_classifier --out work/labelled.png
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.catalogue.networks.classifier import CLASSES  # noqa: E402
from fashionserve.cli import UserError, command_parser, output_folder, run  # noqa: E402
from fashionserve.client import DEFAULT_URLS, PROTOCOLS, ClientError, TritonModelClient, save_png  # noqa: E402
from fashionserve.sheets import contact_sheet  # noqa: E402

GAP = 4  # pixels between images on the sheet
SHEET_BACKGROUND = 255


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    latents = parser.add_mutually_exclusive_group()
    latents.add_argument("--count", type=int, default=8, help="images to generate (default 8)")
    latents.add_argument("--latents", type=Path, help=".npy file of latent vectors [count, latent_dim]")
    parser.add_argument("--seed", type=int, default=1, help="seed of the latent vectors (default 1)")
    parser.add_argument("--url", help="Triton address (default 127.0.0.1:8001 for grpc, :8000 for http)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="grpc (default) or http")
    parser.add_argument("--model", default="fashion_generator", help="model name (default fashion_generator)")
    parser.add_argument("--columns", type=int, help="images per sheet row (default: about square)")
    parser.add_argument(
        "--out", type=Path, default=Path("work/results/generated.png"), help="contact sheet PNG to write"
    )
    parser.add_argument(
        "--scale", type=int, default=1, help="enlarge every image this many times on the sheet"
    )
    parser.add_argument(
        "--classifier",
        metavar="MODEL",
        help="also label every image with this served garment classifier (e.g. garment_classifier)",
    )
    parser.add_argument("--each", type=Path, metavar="DIR", help="also write every image as DIR/<index>.png")
    return parser.parse_args()


def read_latents(args: argparse.Namespace, latent_dim: int) -> np.ndarray:
    """The latent vectors asked for, float32 [count, latent_dim]."""
    if args.latents is None:
        if args.count < 1:
            raise UserError("--count must be at least 1")
        return np.random.default_rng(args.seed).standard_normal((args.count, latent_dim)).astype(np.float32)
    try:
        latents = np.load(args.latents, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read latents from {args.latents}: {exc}") from None
    if not isinstance(latents, np.ndarray):
        raise UserError(f"{args.latents}: expected one array (.npy), got an archive of several")
    if latents.ndim != 2 or latents.shape[1] != latent_dim or len(latents) == 0:
        raise UserError(
            f"{args.latents}: expected latents of shape [count, {latent_dim}], got {list(latents.shape)}"
        )
    if not np.issubdtype(latents.dtype, np.number) or np.issubdtype(latents.dtype, np.complexfloating):
        raise UserError(f"{args.latents}: expected real numbers, got {latents.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32's range become inf here
        latents = latents.astype(np.float32)
    if not np.isfinite(latents).all():
        raise UserError(f"{args.latents}: latents hold NaN or infinite values (as float32)")
    return latents


def classify(images: np.ndarray, url: str, protocol: str, model: str) -> list[str]:
    """'<class> <probability>' of every image, as the served garment classifier sees it."""
    client = TritonModelClient(url, model, protocol)
    captions = []
    for image in images:
        (probabilities,) = client.infer({"image": image[None]})["probabilities"]
        best = int(np.argmax(probabilities))
        captions.append(f"{CLASSES[best]} {probabilities[best]:.2f}")
    client.close()
    return captions


def main() -> None:
    args = parse_args()
    if args.scale < 1:
        raise UserError("--scale must be at least 1")
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder; give the .png file of the contact sheet")
    if args.each:
        output_folder(args.each)
    url = args.url or DEFAULT_URLS[args.protocol]
    client = TritonModelClient(url, args.model, args.protocol)
    (latent_spec,) = client.inputs
    latents = read_latents(args, latent_spec.shape[0])
    step = client.max_batch_size or len(latents)
    output = client.outputs[0]
    images = np.concatenate(
        [
            client.infer({latent_spec.name: latents[i : i + step]})[output]
            for i in range(0, len(latents), step)
        ]
    )
    client.close()
    columns = args.columns or math.ceil(math.sqrt(len(images)))
    captions = classify(images, url, args.protocol, args.classifier) if args.classifier else None
    if captions:
        for index, caption in enumerate(captions):
            print(f"{index:4d}: {caption}")
    sheet = contact_sheet(images, max(1, columns), GAP, SHEET_BACKGROUND, args.scale, captions)
    save_png(args.out, sheet)
    if args.each:
        for index, image in enumerate(images):
            save_png(args.each / f"{index:04d}.png", image)
    print(f"wrote {args.out}: {len(images)} images of {images.shape[1]}x{images.shape[2]}")


if __name__ == "__main__":
    run(main, expected=(ClientError,))
