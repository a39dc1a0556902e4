"""What the two catalogue export CLIs (export/garment_classifier.py, export/fashion_generator.py)
share: the weights and bundle options, the weights check and the closing line."""

import argparse
import time
from pathlib import Path

from fashionserve.bundle import RANDOM_INIT
from fashionserve.cli import positive_int


def export_parser(
    description: str, checkpoint_help: str, random_outputs: str, max_batch: int
) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """The parser with --checkpoint / --random-init / --seed (group "weights", returned so a CLI can add
    its own), --max-batch and --out. `random_outputs` says what random weights produce."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    weights = parser.add_argument_group("weights")
    weights.add_argument("--checkpoint", type=Path, help=checkpoint_help)
    weights.add_argument(
        "--random-init",
        action="store_true",
        help=f"seeded random weights: {random_outputs}, tagged {RANDOM_INIT}",
    )
    weights.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    parser.add_argument(
        "--max-batch",
        type=positive_int,
        default=max_batch,
        help=f"largest batch the ONNX files accept (default {max_batch})",
    )
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create (must not exist)")
    return parser, weights


def parse_export_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parsed arguments; exactly one of --checkpoint and --random-init."""
    args = parser.parse_args()
    if args.random_init == (args.checkpoint is not None):
        parser.error("give --checkpoint or --random-init")
    return args


def report_written(out: Path, manifest: dict, started: float, random_outputs: str) -> None:
    tag = f" [{RANDOM_INIT}: {random_outputs}]" if manifest["random_init"] else ""
    print(f"bundle written to {out} in {time.monotonic() - started:.0f}s{tag}")
