"""Export the HR-VITON try-on pipeline to a bundle of parity-checked ONNX files and a manifest.

Examples:
  python export/tryon.py --condition-checkpoint mtviton.pth --image-checkpoint gen.pth --out OUT
  python export/tryon.py --random-init --seed 0 --resolution 512x384 --out work/bundles/tryon-demo
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.checkpoints import CheckpointError  # noqa: E402
from fashionserve.cli import UserError, positive_int, run  # noqa: E402
from fashionserve.onnx_export import ExportError  # noqa: E402
from fashionserve.tryon.bundle import RANDOM_INIT, export_bundle, load_networks  # noqa: E402
from fashionserve.tryon.stages import TryonConfig, parse_resolution  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    weights = parser.add_argument_group("weights (checkpoints in the official HR-VITON layout, or random)")
    weights.add_argument("--condition-checkpoint", type=Path, help="condition generator .pth (mtviton.pth)")
    weights.add_argument("--image-checkpoint", type=Path, help="SPADE image generator .pth (gen.pth)")
    weights.add_argument(
        "--random-init",
        action="store_true",
        help=f"seeded random weights instead of checkpoints: outputs are noise, tagged {RANDOM_INIT}",
    )
    weights.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    shape = parser.add_argument_group("architecture (defaults: the public configuration)")
    shape.add_argument(
        "--resolution",
        default="1024x768",
        help="HEIGHTxWIDTH of the images: 1024x768 (default), 512x384 or 256x192",
    )
    shape.add_argument(
        "--condition-resolution",
        default="256x192",
        help="HEIGHTxWIDTH the condition generator runs at (default 256x192, as trained)",
    )
    shape.add_argument(
        "--condition-ngf", type=positive_int, default=96, help="condition generator width (default 96)"
    )
    shape.add_argument(
        "--image-ngf", type=positive_int, default=64, help="image generator width (default 64)"
    )
    shape.add_argument(
        "--spade-hidden", type=positive_int, default=128, help="SPADE hidden channels (default 128)"
    )
    shape.add_argument("--no-occlusion", action="store_true", help="skip the official occlusion handling")
    shape.add_argument("--noise", action="store_true", help="keep SPADE noise (non-deterministic outputs)")
    parser.add_argument(
        "--max-batch", type=positive_int, default=4, help="largest batch the ONNX files accept (default 4)"
    )
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create (must not exist)")
    args = parser.parse_args()
    if args.random_init and (args.condition_checkpoint or args.image_checkpoint):
        parser.error("--random-init and checkpoints exclude each other")
    if not args.random_init and not (args.condition_checkpoint and args.image_checkpoint):
        parser.error("give both --condition-checkpoint and --image-checkpoint, or --random-init")
    return args


def main() -> None:
    args = parse_args()
    try:
        height, width = parse_resolution(args.resolution)
        condition_height, condition_width = parse_resolution(args.condition_resolution)
        config = TryonConfig(
            height=height, width=width, condition_height=condition_height, condition_width=condition_width,
            condition_ngf=args.condition_ngf, image_ngf=args.image_ngf, spade_hidden=args.spade_hidden,
            occlusion=not args.no_occlusion, noise=args.noise,
        )  # fmt: skip
    except ValueError as exc:
        raise UserError(str(exc)) from None
    started = time.monotonic()
    print(f"building networks ({f'random-init, seed {args.seed}' if args.random_init else 'checkpoints'})")
    pipeline, provenance = load_networks(config, args.condition_checkpoint, args.image_checkpoint, args.seed)
    manifest = export_bundle(pipeline, config, provenance, args.out, max_batch=args.max_batch)
    tag = f" [{RANDOM_INIT}: outputs are noise]" if manifest["random_init"] else ""
    print(f"bundle written to {args.out} in {time.monotonic() - started:.0f}s{tag}")


if __name__ == "__main__":
    run(main, expected=(CheckpointError, ExportError))
