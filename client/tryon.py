"""Virtual try-on through Triton: send person/garment pairs to the `tryon` ensemble, write PNGs.

Inputs come from a folder in VITON-HD layout (`DATAROOT/test/image`, `cloth`, `cloth-mask`,
`image-parse-v3`, `image-parse-agnostic-v3.2`, `openpose_json`, `image-densepose`) with a pairs file
or --pair names. The agnostic person image is drawn here, as the official loader does, from the person
image, its parse map and its BODY_25 keypoints. Inputs are checked against the served model (size,
dtype, label range) before anything is sent; --resize scales them to the model's resolution instead.

Examples:
  python client/tryon.py --dataroot work/samples --out work/results
  python client/tryon.py --dataroot DATA --pair 00006_00.jpg 01430_00.jpg --protocol http --url 127.0.0.1:8000
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.cli import UserError, run  # noqa: E402
from fashionserve.client import DEFAULT_URLS, PROTOCOLS, ClientError, TritonModelClient  # noqa: E402
from fashionserve.tryon.dataset import DatasetError, load_tryon_inputs, read_pairs  # noqa: E402

IMAGE_INPUTS = ("cloth", "agnostic", "densepose")  # resized bilinear; the others are masks/labels (nearest)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataroot", type=Path, required=True, help="folder in VITON-HD layout")
    parser.add_argument("--split", default="test", help="sub-folder of DATAROOT (default test)")
    parser.add_argument("--pairs", type=Path, help="pairs file (default DATAROOT/<split>_pairs.txt)")
    parser.add_argument(
        "--pair",
        nargs=2,
        action="append",
        metavar=("PERSON", "CLOTH"),
        help="a pair by file names, e.g. 00001_00.jpg 00002_00.jpg (repeatable; overrides --pairs)",
    )
    parser.add_argument("--url", help="Triton address (default 127.0.0.1:8001 for grpc, :8000 for http)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="grpc (default) or http")
    parser.add_argument("--model", default="tryon", help="ensemble name (default tryon)")
    parser.add_argument("--batch", type=int, default=1, help="pairs per request (default 1)")
    parser.add_argument("--resize", action="store_true", help="resize inputs to the model's resolution")
    parser.add_argument("--out", type=Path, required=True, help="folder for <person>_<cloth>.png results")
    return parser.parse_args()


def _resize(name: str, array: np.ndarray, height: int, width: int) -> np.ndarray:
    if array.shape[:2] == (height, width):
        return array
    resample = Image.BILINEAR if name in IMAGE_INPUTS else Image.NEAREST
    return np.asarray(Image.fromarray(array).resize((width, height), resample))


def main() -> None:
    args = parse_args()
    if args.batch < 1:
        raise UserError("--batch must be at least 1")
    pairs = args.pair or read_pairs(args.pairs or args.dataroot / f"{args.split}_pairs.txt")
    if not pairs:
        raise UserError("no pairs to run")
    client = TritonModelClient(args.url or DEFAULT_URLS[args.protocol], args.model, args.protocol)
    height, width = next(s.shape[:2] for s in client.inputs if s.name == "cloth")
    args.out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(pairs), args.batch):
        chunk = pairs[start : start + args.batch]
        samples = []
        for person, cloth in chunk:
            sample = load_tryon_inputs(args.dataroot, person, cloth, split=args.split)
            if args.resize:
                sample = {name: _resize(name, array, height, width) for name, array in sample.items()}
            samples.append(sample)
        batch = {name: np.stack([s[name] for s in samples]) for name in samples[0]}
        outputs = client.infer(batch)
        for (person, cloth), image in zip(chunk, outputs["tryon_image"], strict=True):
            path = args.out / f"{Path(person).stem}_{Path(cloth).stem}.png"
            tmp = path.with_suffix(".tmp.png")
            Image.fromarray(image).save(tmp)
            tmp.replace(path)  # never leave a half-written PNG behind
            print(f"wrote {path}")
    client.close()


if __name__ == "__main__":
    run(main, expected=(ClientError, DatasetError))
