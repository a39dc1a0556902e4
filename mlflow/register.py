"""Register a bundle as the next version of its registered model in MLflow.

The bundle is validated first (manifest, every listed file present with its recorded sha256, ONNX
checker, renders against the Triton configs); a bad bundle is refused and nothing is registered.

Examples:
  python mlflow/register.py work/bundles/tryon-random-init --model tryon
  python mlflow/register.py work/bundles/tryon --tracking-uri http://127.0.0.1:5000
  python mlflow/register.py work/bundles/garment_classifier      # registered model garment_classifier
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
from fashionserve.registry import (  # noqa: E402
    ALIAS,
    GATE_TAG,
    RANDOM_INIT,
    RegistryError,
    connect,
    register_bundle,
)


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.add_argument("bundle", type=Path, metavar="BUNDLE_DIR", help="a bundle written by export/*.py")
    parser.add_argument(
        "--model",
        help="registered model name (default: the bundle's pipeline: tryon, garment_classifier, ...)",
    )
    add_tracking_uri(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    client = connect(args.tracking_uri)
    version = register_bundle(client, args.bundle, args.model)
    tags = version.tags
    gate = tags[GATE_TAG] + (f": {tags['quality_gate_reason']}" if "quality_gate_reason" in tags else "")
    notes = [f"quality gate {gate}"] + ([f"{RANDOM_INIT}: outputs are noise"] if RANDOM_INIT in tags else [])
    print(f"registered '{version.name}' version {version.version} ({', '.join(notes)})")
    print(f"  promote: python mlflow/promote.py {version.name} --version {version.version} (alias '{ALIAS}')")
    print(f"  UI:      {args.tracking_uri.rstrip('/')}/#/models/{version.name}/versions/{version.version}")


if __name__ == "__main__":
    run(main, expected=(RegistryError,))
