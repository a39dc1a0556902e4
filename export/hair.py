"""Export the hair pipeline (e4e encoder, StyleGAN2 generator, BiSeNet face parser and the glue steps) to
one bundle of parity-checked ONNX files and a manifest, serving the `hair_transfer` and `hair_edit`
ensembles (registered model `hair`).

Checkpoints in the public layouts: the encoder4editing `e4e_ffhq_encode.pt` (encoder, its StyleGAN2
decoder and the average latent), face-parsing.PyTorch's `79999_iter.pth`, and optionally a rosinality
StyleGAN2 `.pt` (`g_ema`) replacing the e4e decoder.

Examples:
  python export/hair.py --e4e-checkpoint e4e_ffhq_encode.pt --parser-checkpoint 79999_iter.pth --out OUT
  python export/hair.py --random-init --seed 0 --resolution 256 --out work/bundles/hair-demo
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.checkpoints import CheckpointError  # noqa: E402
from fashionserve.cli import UserError, export_parser, parse_export_args, report_written, run  # noqa: E402
from fashionserve.hair.bundle import export_bundle, load_networks  # noqa: E402
from fashionserve.hair.stages import HairConfig, parse_layers  # noqa: E402
from fashionserve.onnx_export import ExportError  # noqa: E402

RANDOM_OUTPUTS = "outputs are noise"


def parse_units(text: str) -> tuple[int, int, int, int]:
    """'1,2,2,1' -> (1, 2, 2, 1)."""
    try:
        first, second, third, fourth = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--encoder-units must be four integers like 3,4,14,3, got {text!r}") from None
    return first, second, third, fourth


def parse_args() -> argparse.Namespace:
    parser, weights = export_parser(
        __doc__, "weights (checkpoints in the public layouts, or random)", RANDOM_OUTPUTS
    )
    weights.add_argument("--e4e-checkpoint", type=Path, help="encoder4editing .pt (e4e_ffhq_encode.pt)")
    weights.add_argument("--parser-checkpoint", type=Path, help="BiSeNet face parser .pth (79999_iter.pth)")
    weights.add_argument(
        "--generator-checkpoint", type=Path, help="rosinality StyleGAN2 .pt (g_ema) replacing the e4e decoder"
    )
    shape = parser.add_argument_group("sizes (defaults: the public configuration)")
    shape.add_argument(
        "--resolution",
        type=int,
        default=1024,
        help="side of the square portraits served (default 1024, FFHQ-aligned crops)",
    )
    shape.add_argument("--generator-size", type=int, help="StyleGAN2 output side (default: --resolution)")
    shape.add_argument("--style-dim", type=int, default=512, help="W dimension (default 512)")
    shape.add_argument("--n-mlp", type=int, default=8, help="mapping network layers (default 8)")
    shape.add_argument("--channel-max", type=int, default=512, help="cap on generator widths (default 512)")
    shape.add_argument("--encoder-size", type=int, default=256, help="e4e input side (default 256)")
    shape.add_argument(
        "--encoder-width", type=int, default=64, help="e4e body width, style_dim / 8 (default 64)"
    )
    shape.add_argument(
        "--encoder-units", help="IR-SE units per e4e body stage, e.g. 1,2,2,1 (default 3,4,14,3)"
    )
    shape.add_argument("--parser-size", type=int, default=512, help="face parser input side (default 512)")
    pipeline = parser.add_argument_group("hair transfer")
    pipeline.add_argument(
        "--hair-layers",
        help="W+ layers taken from the reference, e.g. 4-17 (default: all but the 4 coarse pose layers)",
    )
    pipeline.add_argument(
        "--feather-sigma",
        type=float,
        default=0.0,
        help="gaussian sigma of the mask feathering in parser pixels (default: parser size / 64)",
    )
    return parse_export_args(
        parser, required=("e4e_checkpoint", "parser_checkpoint"), optional=("generator_checkpoint",)
    )


def main() -> None:
    args = parse_args()
    if args.max_batch < 1:
        raise UserError("--max-batch must be at least 1")
    try:
        config = HairConfig(
            image_size=args.resolution, generator_size=args.generator_size or args.resolution,
            style_dim=args.style_dim, n_mlp=args.n_mlp, channel_max=args.channel_max,
            encoder_input_size=args.encoder_size, encoder_base_width=args.encoder_width,
            encoder_stage_units=parse_units(args.encoder_units) if args.encoder_units else None,
            parser_size=args.parser_size,
            hair_layers=parse_layers(args.hair_layers) if args.hair_layers else (),
            feather_sigma=args.feather_sigma,
        )  # fmt: skip
    except ValueError as exc:
        raise UserError(str(exc)) from None
    started = time.monotonic()
    print(f"building networks ({f'random-init, seed {args.seed}' if args.random_init else 'checkpoints'})")
    try:
        pipeline, provenance = load_networks(
            config, args.e4e_checkpoint, args.parser_checkpoint, args.generator_checkpoint, args.seed
        )
    except ValueError as exc:  # a size or width the networks cannot be built with
        raise UserError(str(exc)) from None
    manifest = export_bundle(pipeline, provenance, args.out, max_batch=args.max_batch)
    config = manifest["config"]
    print(f"W+ layers taken from the reference: {config['hair_layers']} of 0..{config['n_latent'] - 1}")
    report_written(args.out, manifest, started, RANDOM_OUTPUTS)


if __name__ == "__main__":
    run(main, expected=(CheckpointError, ExportError))
