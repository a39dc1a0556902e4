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
from fashionserve.cli import UserError, export_parser, parse_export_args, report_written, run  # noqa: E402
from fashionserve.onnx_export import ExportError  # noqa: E402
from fashionserve.tryon.bundle import export_bundle, load_networks  # noqa: E402
from fashionserve.tryon.stages import TryonConfig, parse_resolution  # noqa: E402

RANDOM_OUTPUTS = "outputs are noise"


def parse_args() -> argparse.Namespace:
    parser, weights = export_parser(
        __doc__, "weights (checkpoints in the official HR-VITON layout, or random)", RANDOM_OUTPUTS
    )
    weights.add_argument("--condition-checkpoint", type=Path, help="condition generator .pth (mtviton.pth)")
    weights.add_argument("--image-checkpoint", type=Path, help="SPADE image generator .pth (gen.pth)")
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
    shape.add_argument("--condition-ngf", type=int, default=96, help="condition generator width (default 96)")
    shape.add_argument("--image-ngf", type=int, default=64, help="image generator width (default 64)")
    shape.add_argument("--spade-hidden", type=int, default=128, help="SPADE hidden channels (default 128)")
    shape.add_argument("--no-occlusion", action="store_true", help="skip the official occlusion handling")
    shape.add_argument("--noise", action="store_true", help="keep SPADE noise (non-deterministic outputs)")
    return parse_export_args(parser, required=("condition_checkpoint", "image_checkpoint"))


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
    report_written(args.out, manifest, started, RANDOM_OUTPUTS)


if __name__ == "__main__":
    run(main, expected=(CheckpointError, ExportError))
