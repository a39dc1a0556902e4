"""Train the garment classifier on Fashion-MNIST from its standard IDX files (nothing downloads).

DATA holds train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
t10k-labels-idx1-ubyte.gz (or the same names without .gz). Prints per-class precision, recall and F1 on
the test split and writes a checkpoint that export/garment_classifier.py turns into a bundle.

Examples:
  python train/garment_classifier.py --data ~/fashion-mnist --out work/classifier.pt
  python -m fashionserve.catalogue.samples work/fmnist-drawn && \\
      python train/garment_classifier.py --data work/fmnist-drawn --epochs 3 --out work/classifier-drawn.pt
"""

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.catalogue.data import DataError, load_split, official_files  # noqa: E402
from fashionserve.catalogue.networks.classifier import ClassifierConfig  # noqa: E402
from fashionserve.catalogue.training import (  # noqa: E402
    TrainOptions,
    format_report,
    save_checkpoint,
    train,
)
from fashionserve.cli import UserError, command_parser, run  # noqa: E402

TARGET_MACRO_F1 = 0.93  # the source paper's average precision/recall/F1


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    defaults = TrainOptions()
    parser.add_argument("--data", type=Path, required=True, help="folder holding the four IDX files")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=f"default {defaults.epochs}")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help=f"default {defaults.batch_size}"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=defaults.learning_rate,
        help=f"initial SGD learning rate, cosine-decayed to 0 (default {defaults.learning_rate})",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"default {defaults.seed}")
    parser.add_argument("--width", type=int, default=32, help="channels of the first conv block (default 32)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden units of the head (default 128)")
    parser.add_argument("--limit", type=int, help="use only the first N training images (quick runs)")
    parser.add_argument("--report-json", type=Path, help="also write the report as JSON here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.epochs < 1 or args.batch_size < 2:
        raise UserError("--epochs must be at least 1 and --batch-size at least 2")
    if not args.data.is_dir():
        raise UserError(f"data folder not found: {args.data}")
    train_images, train_labels = load_split(args.data, "train")
    test_images, test_labels = load_split(args.data, "test")
    if args.limit:
        train_images, train_labels = train_images[: args.limit], train_labels[: args.limit]
    official = official_files(args.data)
    print(
        f"{len(train_images)} training, {len(test_images)} test images from {args.data} "
        f"({'the official Fashion-MNIST files' if official else 'NOT the official Fashion-MNIST files'})"
    )
    options = TrainOptions(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed
    )
    config = ClassifierConfig(width=args.width, hidden=args.hidden)
    started = time.monotonic()
    model, report = train(train_images, train_labels, test_images, test_labels, config, options)
    seconds = time.monotonic() - started
    print(format_report(report))
    verdict = "meets" if report["macro_f1"] >= TARGET_MACRO_F1 else "misses"
    scope = "" if official else " (on these files, not the official test set)"
    print(f"macro F1 {report['macro_f1']:.4f} {verdict} the target {TARGET_MACRO_F1}{scope}")
    details = {
        "data": {
            "folder": str(args.data),
            "official_fashion_mnist": official,
            "train_images": len(train_images),
            "test_images": len(test_images),
        },
        "options": asdict(options),
        "train_seconds": round(seconds, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.out, model, report, details)
    if args.report_json:
        args.report_json.write_text(json.dumps({"report": report, **details}, indent=2) + "\n")
    print(f"checkpoint written to {args.out} (trained in {seconds:.0f}s)")


if __name__ == "__main__":
    run(main, expected=(DataError,))
