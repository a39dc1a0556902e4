"""Export the garment classifier to a bundle of parity-checked ONNX files and a manifest.

The bundle serves as `garment_classifier`: a uint8 product photo of any size in, the 10 Fashion-MNIST
class probabilities and the label out (resizing to 28x28 gray happens in the graph).

Examples:
  python export/garment_classifier.py --checkpoint work/classifier.pt --out work/bundles/garment_classifier
  python export/garment_classifier.py --random-init --seed 0 --out work/bundles/garment_classifier-demo
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.catalogue.bundle import export_classifier_bundle, load_garment_classifier  # noqa: E402
from fashionserve.catalogue.networks.classifier import ClassifierConfig  # noqa: E402
from fashionserve.checkpoints import CheckpointError  # noqa: E402
from fashionserve.cli import export_parser, parse_export_args, report_written, run  # noqa: E402
from fashionserve.onnx_export import ExportError  # noqa: E402

RANDOM_OUTPUTS = "predictions are meaningless"


def main() -> None:
    parser, weights = export_parser(__doc__, "weights", RANDOM_OUTPUTS, max_batch=8)
    weights.add_argument("--checkpoint", type=Path, help="checkpoint written by train/garment_classifier.py")
    shape = parser.add_argument_group("architecture for --random-init (a checkpoint carries its own)")
    shape.add_argument("--width", type=int, default=32, help="channels of the first conv block (default 32)")
    shape.add_argument("--hidden", type=int, default=128, help="hidden units of the head (default 128)")
    args = parse_export_args(parser, required=("checkpoint",))
    started = time.monotonic()
    config = ClassifierConfig(width=args.width, hidden=args.hidden)
    model, provenance = load_garment_classifier(args.checkpoint, config, args.seed)
    manifest = export_classifier_bundle(model, provenance, args.out, max_batch=args.max_batch)
    report_written(args.out, manifest, started, RANDOM_OUTPUTS)


if __name__ == "__main__":
    run(main, expected=(CheckpointError, ExportError))
