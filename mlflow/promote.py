"""Move the `production` alias of a registered model: to a version, or back to its previous holder.

A version whose quality gate failed (a quantized variant missed its thresholds) is refused unless
--force. Every move is recorded in a registered-model tag, so --rollback is exact.

Examples:
  python mlflow/promote.py tryon --version 2
  python mlflow/promote.py tryon --rollback
"""

import argparse
import sys
from pathlib import Path

# Run as a script from a checkout: the project root goes first, and this folder (named like the
# mlflow package) goes away, so `import mlflow` always finds the real package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from fashionserve.cli import add_tracking_uri, command_parser, run  # noqa: E402
from fashionserve.registry import ALIAS, RegistryError, connect, promote, rollback  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.add_argument("model", help="registered model name, e.g. tryon")
    move = parser.add_mutually_exclusive_group(required=True)
    move.add_argument("--version", help="the version to promote")
    move.add_argument("--rollback", action="store_true", help="return the alias to its previous holder")
    parser.add_argument("--force", action="store_true", help="promote even if the quality gate failed")
    parser.add_argument("--alias", default=ALIAS, help="alias to move (default: %(default)s)")
    add_tracking_uri(parser)
    args = parser.parse_args()
    if args.rollback and args.force:
        parser.error("--force applies to --version only")
    return args


def main() -> None:
    args = parse_args()
    client = connect(args.tracking_uri)
    if args.rollback:
        print(rollback(client, args.model, args.alias))
    else:
        print(promote(client, args.model, args.version, args.alias, args.force))


if __name__ == "__main__":
    run(main, expected=(RegistryError,))
