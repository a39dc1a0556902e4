"""Export the hair pipeline (HairFastGAN's networks and the glue between them) to one bundle of
parity-checked ONNX files and a manifest, serving the `hair_transfer` and `hair_edit` ensembles
(registered model `hair`).

Weights: HairFastGAN's `pretrained_models/` folder as its README downloads it (StyleGAN/ffhq.pt,
encoder4editing/, FeatureStyleEncoder/, BiSeNet/, Rotate/, ShapeAdaptor/, sean_checkpoints/, Blending/,
PostProcess/), OpenAI's CLIP `ViT-B-32.pt` (the colour step's image encoder) and SEAN's mean style codes
(`models/sean_codes/styles_test/mean_style_code/median` of a HairFastGAN checkout; found beside
`pretrained_models/` when it sits in the checkout). Nothing is downloaded.

Examples:
  python export/hair.py --hairfast-dir HairFastGAN/pretrained_models --clip-checkpoint ViT-B-32.pt --out OUT
  python export/hair.py --random-init --seed 0 --resolution 256 --widths tiny --out work/bundles/hair-demo
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.checkpoints import CheckpointError  # noqa: E402
from fashionserve.cli import (  # noqa: E402
    UserError,  # noqa: E402
    export_parser,
    parse_export_args,
    positive_int,
    report_written,
    run,
)
from fashionserve.hair.bundle import HairWeights, export_bundle, load_networks  # noqa: E402
from fashionserve.hair.stages import NETWORK_WIDTHS, HairConfig  # noqa: E402
from fashionserve.onnx_export import ExportError  # noqa: E402

RANDOM_OUTPUTS = "outputs are noise"


def parse_args() -> argparse.Namespace:
    parser, weights = export_parser(__doc__, "weights (the released files, or random)", RANDOM_OUTPUTS)
    weights.add_argument("--hairfast-dir", type=Path, help="HairFastGAN's pretrained_models/ folder")
    weights.add_argument("--clip-checkpoint", type=Path, help="OpenAI's CLIP ViT-B-32.pt")
    weights.add_argument(
        "--sean-codes",
        type=Path,
        help="folder of SEAN's mean style codes (<class>/ACE.npy; default: found from --hairfast-dir)",
    )
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument(
        "--resolution",
        type=positive_int,
        default=1024,
        help="side of the portraits and of the generator (default 1024, the released files' size)",
    )
    sizes.add_argument(
        "--widths",
        choices=sorted(NETWORK_WIDTHS),
        default="public",
        help="network widths: public (default, the released files') or tiny (tests)",
    )
    return parse_export_args(parser, required=("hairfast_dir", "clip_checkpoint"), optional=("sean_codes",))


def main() -> None:
    args = parse_args()
    try:
        config = HairConfig(image_size=args.resolution, widths=args.widths)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    weights = (
        None if args.random_init else HairWeights(args.hairfast_dir, args.clip_checkpoint, args.sean_codes)
    )
    started = time.monotonic()
    print(f"building networks ({f'random-init, seed {args.seed}' if args.random_init else 'released files'})")
    pipeline, provenance = load_networks(config, weights, args.seed)
    manifest = export_bundle(pipeline, provenance, args.out, max_batch=args.max_batch)
    report_written(args.out, manifest, started, RANDOM_OUTPUTS)


if __name__ == "__main__":
    run(main, expected=(CheckpointError, ExportError))
