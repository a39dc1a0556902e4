"""Export the garment classifier to a bundle of parity-checked ONNX files and a manifest.

The bundle serves as `garment_classifier`: a uint8 product photo of any size in, the 10 Fashion-MNIST
class probabilities and the label out (resizing to 28x28 gray happens in the graph).

Examples:
  python export/garment_classifier.py --checkpoint work/classifier.pt --out work/bundles/garment_classifier
  python export/garment_classifier.py --random-init --seed 0 --out work/bundles/garment_classifier-demo
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.bundle import RANDOM_INIT  # noqa: E402
from fashionserve.catalogue.bundles import export_classifier_bundle, load_garment_classifier  # noqa: E402
from fashionserve.catalogue.classifier import ClassifierConfig  # noqa: E402
from fashionserve.checkpoints import CheckpointError  # noqa: E402
from fashionserve.cli import run  # noqa: E402
from fashionserve.onnx_export import ExportError  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    weights = parser.add_argument_group("weights")
    weights.add_argument("--checkpoint", type=Path, help="checkpoint written by train/garment_classifier.py")
    weights.add_argument(
        "--random-init",
        action="store_true",
        help=f"seeded random weights: predictions are meaningless, tagged {RANDOM_INIT}",
    )
    weights.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    shape = parser.add_argument_group("architecture for --random-init (a checkpoint carries its own)")
    shape.add_argument("--width", type=int, default=32, help="channels of the first conv block (default 32)")
    shape.add_argument("--hidden", type=int, default=128, help="hidden units of the head (default 128)")
    parser.add_argument(
        "--max-batch", type=int, default=8, help="largest batch the ONNX files accept (default 8)"
    )
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create (must not exist)")
    args = parser.parse_args()
    if args.random_init == (args.checkpoint is not None):
        parser.error("give --checkpoint or --random-init")
    return args


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    config = ClassifierConfig(width=args.width, hidden=args.hidden)
    model, provenance = load_garment_classifier(args.checkpoint, config, args.seed)
    manifest = export_classifier_bundle(model, provenance, args.out, max_batch=args.max_batch)
    tag = f" [{RANDOM_INIT}: predictions are meaningless]" if manifest["random_init"] else ""
    print(f"bundle written to {args.out} in {time.monotonic() - started:.0f}s{tag}")


if __name__ == "__main__":
    run(main, expected=(CheckpointError, ExportError))
