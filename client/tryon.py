"""Virtual try-on through Triton: send person/garment pairs to the `tryon` ensemble, write PNGs.

Inputs come either from a folder in VITON-HD layout (`DATAROOT/test/image`, `cloth`, `cloth-mask`,
`image-parse-v3`, `image-parse-agnostic-v3.2`, `openpose_json`, `image-densepose`) with a pairs file
or --pair names, or from explicit files (--person-image ... --cloth-mask) for one pair. The agnostic
person image is drawn here, as the official loader does, from the person image, its parse map and its
BODY_25 keypoints, unless ready agnostic images are given (--agnostic-dir, or --agnostic).
Inputs are checked against the served model (size, dtype, batch, label range) before anything is
sent; --resize scales them to the model's resolution instead of refusing them.

Garment gate: when the server also serves `garment_classifier`, every garment photo is classified first
and a garment confidently classified as not upper-body (trousers, dresses, shoes, bags) is refused,
naming the predicted class and confidence; --no-gate skips the check.

Examples:
  python client/tryon.py --dataroot work/samples --out work/results
  python client/tryon.py --dataroot DATA --pair 00006_00.jpg 01430_00.jpg --protocol http --url 127.0.0.1:8000
  python client/tryon.py --person-image p.jpg --parse p.png --keypoints p_keypoints.json --densepose d.jpg \
      --parse-agnostic pa.png --cloth c.jpg --cloth-mask cm.jpg --out work/results
"""

import argparse
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.catalogue.gate import DEFAULT_THRESHOLD, GATE_MODEL, classify  # noqa: E402
from fashionserve.cli import UserError, command_parser, output_folder, run  # noqa: E402
from fashionserve.client import DEFAULT_URLS, PROTOCOLS, ClientError, TritonModelClient, save_png  # noqa: E402
from fashionserve.tryon.dataset import (  # noqa: E402
    DatasetError,
    load_tryon_files,
    load_tryon_inputs,
    read_pairs,
    resize_inputs,
)

# option -> the dataset file key it fills
EXPLICIT_FILES = {
    "person-image": "person image",
    "parse": "parse map",
    "keypoints": "pose keypoints",
    "densepose": "densepose image",
    "parse-agnostic": "parse-agnostic map",
    "cloth": "cloth image",
    "cloth-mask": "cloth mask",
}


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    folder = parser.add_argument_group("inputs from a VITON-HD-layout folder")
    folder.add_argument("--dataroot", type=Path, help="folder in VITON-HD layout")
    folder.add_argument("--split", default="test", help="sub-folder of DATAROOT (default test)")
    folder.add_argument("--pairs", type=Path, help="pairs file (default DATAROOT/<split>_pairs.txt)")
    folder.add_argument(
        "--pair",
        nargs=2,
        action="append",
        metavar=("PERSON", "CLOTH"),
        help="a pair by file names, e.g. 00001_00.jpg 00002_00.jpg (repeatable; overrides --pairs)",
    )
    folder.add_argument(
        "--agnostic-dir",
        type=Path,
        help="ready agnostic images named like the person images (e.g. DATAROOT/test/agnostic-v3.2)",
    )
    files = parser.add_argument_group("inputs from explicit files (one pair)")
    for option, what in EXPLICIT_FILES.items():
        files.add_argument(f"--{option}", type=Path, metavar="PATH", help=what)
    files.add_argument(
        "--agnostic", type=Path, metavar="PATH", help="a ready agnostic person image (optional)"
    )
    parser.add_argument("--url", help="Triton address (default 127.0.0.1:8001 for grpc, :8000 for http)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="grpc (default) or http")
    parser.add_argument("--model", default="tryon", help="ensemble name (default tryon)")
    parser.add_argument("--batch", type=int, default=1, help="pairs per request (default 1)")
    parser.add_argument("--resize", action="store_true", help="resize inputs to the model's resolution")
    parser.add_argument("--out", type=Path, required=True, help="folder for <person>_<cloth>.png results")
    gate = parser.add_argument_group(f"garment gate (when the server serves {GATE_MODEL})")
    gate.add_argument(
        "--gate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="refuse garments classified as not upper-body (default on; --no-gate overrides)",
    )
    gate.add_argument(
        "--gate-threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"confidence from which a not-upper-body verdict refuses (default {DEFAULT_THRESHOLD})",
    )
    args = parser.parse_args()
    explicit = {key: getattr(args, option.replace("-", "_")) for option, key in EXPLICIT_FILES.items()}
    if args.dataroot is None and not any(explicit.values()):
        parser.error("give --dataroot, or the explicit files --person-image ... --cloth-mask")
    if args.dataroot is not None and any(explicit.values()):
        parser.error("--dataroot and explicit files exclude each other")
    if args.dataroot is None:
        optional = ("parse map", "pose keypoints") if args.agnostic else ()
        missing = [f"--{o}" for o, key in EXPLICIT_FILES.items() if not explicit[key] and key not in optional]
        if missing:
            parser.error(f"explicit files missing: {', '.join(missing)}")
    args.files = explicit
    return args


def iter_samples(args: argparse.Namespace) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(output name, inputs) for every pair asked for, loaded one at a time."""
    if args.dataroot is None:
        yield (
            f"{args.files['person image'].stem}_{args.files['cloth image'].stem}",
            load_tryon_files(args.files, agnostic=args.agnostic),
        )
        return
    pairs = args.pair or read_pairs(args.pairs or args.dataroot / f"{args.split}_pairs.txt")
    if not pairs:
        raise UserError("no pairs to run")
    for person, cloth in pairs:
        agnostic = None if args.agnostic_dir is None else args.agnostic_dir / person
        name = f"{Path(person).stem}_{Path(cloth).stem}"
        yield name, load_tryon_inputs(args.dataroot, person, cloth, args.split, agnostic)


def open_gate(args: argparse.Namespace, client: TritonModelClient) -> TritonModelClient | None:
    """A client of the garment classifier when the gate is on and the server has it, else None."""
    if not args.gate:
        return None
    if not client.server_has(GATE_MODEL):
        print(f"gate: {GATE_MODEL} is not served here; garments are not checked")
        return None
    return TritonModelClient(args.url or DEFAULT_URLS[args.protocol], GATE_MODEL, args.protocol)


def check_garments(gate: TritonModelClient, chunk: list[tuple[str, dict]], threshold: float) -> None:
    """Classify each pair's garment photo; refuse the first one that is not an upper-body garment."""
    for name, sample in chunk:
        (verdict,) = classify(gate, sample["cloth"][None])
        found = f"the garment of {name} looks like {verdict.name} (confidence {verdict.confidence:.2f})"
        if verdict.refused(threshold):
            reason = f"{found}, not an upper-body garment the try-on model can dress"
            raise UserError(f"{reason}; --no-gate tries anyway")
        print(f"gate: {found}: ok")


def main() -> None:
    args = parse_args()
    if args.batch < 1:
        raise UserError("--batch must be at least 1")
    output_folder(args.out)
    samples = iter_samples(args)
    client = TritonModelClient(args.url or DEFAULT_URLS[args.protocol], args.model, args.protocol)
    cloth = next((spec for spec in client.inputs if spec.name == "cloth"), None)
    if cloth is None:
        raise UserError(f"model '{client.model}' is not a try-on ensemble (it takes no 'cloth' input)")
    height, width = cloth.shape[:2]
    gate = open_gate(args, client)
    while chunk := list(itertools.islice(samples, args.batch)):
        if gate is not None:
            check_garments(gate, chunk, args.gate_threshold)
        if args.resize:
            chunk = [(n, resize_inputs(s, height, width)) for n, s in chunk]
        batch = {name: np.stack([s[name] for _, s in chunk]) for name in chunk[0][1]}
        outputs = client.infer(batch)
        for (name, _), image in zip(chunk, outputs["tryon_image"], strict=True):
            path = args.out / f"{name}.png"
            save_png(path, image)
            print(f"wrote {path}")
    client.close()
    if gate is not None:
        gate.close()


if __name__ == "__main__":
    run(main, expected=(ClientError, DatasetError))
