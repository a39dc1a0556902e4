"""Export the PG-GAN fashion generator to a bundle of parity-checked ONNX files and a manifest.

The checkpoint is a pytorch_GAN_zoo PGAN file ({'config', 'netG', 'avgG', ...}); the architecture is
read from its stored config. Equalized learning rate is folded into the weights before export.
The bundle serves as `fashion_generator`: latent vectors in, uint8 HWC RGB images out.

Examples:
  python export/fashion_generator.py --checkpoint fashion_s7_i96000.pth --out work/bundles/fashion_generator
  python export/fashion_generator.py --random-init --seed 0 --resolution 128 --out work/bundles/generator-demo
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.catalogue.bundle import export_generator_bundle, load_fashion_generator  # noqa: E402
from fashionserve.catalogue.networks.pggan import GENERATOR_KEYS, PGGANConfig  # noqa: E402
from fashionserve.checkpoints import CheckpointError  # noqa: E402
from fashionserve.cli import UserError, export_parser, parse_export_args, report_written, run  # noqa: E402
from fashionserve.onnx_export import ExportError  # noqa: E402

RANDOM_OUTPUTS = "images are noise"


def main() -> None:
    parser, weights = export_parser(__doc__, "weights", RANDOM_OUTPUTS, max_batch=4)
    weights.add_argument("--checkpoint", type=Path, help="pytorch_GAN_zoo PGAN checkpoint (.pth / .pt)")
    weights.add_argument(
        "--generator",
        choices=GENERATOR_KEYS,
        default="avgG",
        help="which generator of the checkpoint: avgG (moving average, default) or netG",
    )
    shape = parser.add_argument_group("architecture for --random-init (a checkpoint carries its own)")
    shape.add_argument("--resolution", type=int, default=512, help="output size, 4..1024 (default 512)")
    shape.add_argument(
        "--max-channels", type=int, default=512, help="cap on every scale's depth (default 512)"
    )
    shape.add_argument("--latent-dim", type=int, default=512, help="latent vector size (default 512)")
    args = parse_export_args(parser, required=("checkpoint",))
    try:
        config = PGGANConfig.for_resolution(args.resolution, args.max_channels, args.latent_dim)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    started = time.monotonic()
    network, provenance = load_fashion_generator(args.checkpoint, config, args.seed, args.generator)
    resolution = network.config.resolution
    print(
        f"generator {resolution}x{resolution}, latent {network.config.latent_dim} ({provenance['weights']})"
    )
    manifest = export_generator_bundle(network, provenance, args.out, max_batch=args.max_batch)
    report_written(args.out, manifest, started, RANDOM_OUTPUTS)


if __name__ == "__main__":
    run(main, expected=(CheckpointError, ExportError))
