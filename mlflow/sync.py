"""Make Triton serve the version the `production` alias points at (one shot, or --watch).

The version is downloaded, validated again, written into the served repository as a new numeric
Triton version (copied aside, then renamed) and loaded through Triton's repository API (Triton must
run with explicit model control on --repository). The live version keeps serving until the new one
is ready and answered a real request; a version that fails to load never replaces it. The live
MLflow version gets the tag triton.live. Nothing changes when Triton already serves the alias.

Examples:
  python -m fashionserve.launcher start --repository work/served --model-control explicit --detach \\
      --pid-file work/triton.pid
  python mlflow/sync.py --repository work/served --triton-url 127.0.0.1:8000
  python mlflow/sync.py --repository work/served --triton-url 127.0.0.1:8000 --watch --interval 10
  python mlflow/sync.py --repository /models --triton-url triton:8000 --target gpu --plans /plans --watch
  python mlflow/sync.py --model fashion_generator --repository work/served --triton-url 127.0.0.1:8000
"""

import argparse
import signal
import sys
import time
from pathlib import Path

# Run as a script from a checkout: the project root goes first, and this folder (named like the
# mlflow package) goes away, so `import mlflow` always finds the real package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from fashionserve.cli import add_tracking_uri, command_parser, run  # noqa: E402
from fashionserve.registry import ALIAS, RegistryError, connect  # noqa: E402
from fashionserve.repository import PRECISIONS, TARGETS  # noqa: E402
from fashionserve.sync import SyncResult, sync_once  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.add_argument(
        "--model",
        default="tryon",
        help="registered model = pipeline: tryon (default), hair, garment_classifier, fashion_generator",
    )
    parser.add_argument("--alias", default=ALIAS, help="alias to serve (default: %(default)s)")
    parser.add_argument(
        "--repository", type=Path, required=True, metavar="DIR", help="the folder Triton serves"
    )
    parser.add_argument(
        "--triton-url", default="127.0.0.1:8000", help="Triton HTTP address (default: %(default)s)"
    )
    parser.add_argument("--target", choices=TARGETS, default="cpu", help="cpu (python backend) or gpu")
    parser.add_argument(
        "--variant", choices=PRECISIONS, default="fp32", help="precision of the heavy networks"
    )
    parser.add_argument(
        "--plans",
        type=Path,
        metavar="DIR",
        help="gpu target: plan store the plan builder (deploy/plan_builder.py) wrote TensorRT plans into",
    )
    add_tracking_uri(parser)
    parser.add_argument("--watch", action="store_true", help="keep reconciling until stopped (Ctrl-C)")
    parser.add_argument(
        "--interval", type=float, default=10.0, metavar="S", help="--watch period (default 10)"
    )
    parser.add_argument(
        "--load-timeout", type=float, default=600.0, metavar="S", help="seconds one Triton load may take"
    )
    args = parser.parse_args()
    if args.interval <= 0:
        parser.error("--interval must be positive")
    if args.plans is not None and args.target != "gpu":
        parser.error("--plans applies to --target gpu only")
    return args


def _log(line: str) -> None:
    print(line, flush=True)


def sync(args: argparse.Namespace) -> SyncResult:
    return sync_once(
        connect(args.tracking_uri),
        args.model,
        args.repository,
        args.triton_url,
        alias=args.alias,
        target=args.target,
        variant=args.variant,
        load_timeout=args.load_timeout,
        log=_log,
        plans=args.plans,
    )


def main() -> None:
    args = parse_args()
    if not args.watch:
        result = sync(args)
        if not result.changed:
            _log(f"up to date: '{args.model}' version {result.mlflow_version} is live as Triton version "
                 f"{result.triton_version}")  # fmt: skip
        return
    # SIGTERM (a container stop) ends the loop like Ctrl-C; a swap in progress is undone, not left half.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    _log(f"watching '{args.model}' alias '{args.alias}' every {args.interval:g} s (Ctrl-C stops)")
    while True:
        try:
            sync(args)
        except RegistryError as exc:  # report and keep watching: the next round may succeed
            print(f"error: {exc}", file=sys.stderr, flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    run(main, expected=(RegistryError,))
