"""Make Triton serve the version the `production` alias points at (one shot, or --watch), for one
registered model or several (--model, repeated: one process, one state file, each model swapped on its
own, in the order given).

The version is downloaded, validated again, written into the served repository as a new numeric
Triton version (copied aside, then renamed) and loaded through Triton's repository API (Triton must
run with explicit model control on --repository). The live version keeps serving until the new one
is ready and answered a real request; a version that fails to load never replaces it. The live
MLflow version gets the tag triton.live. Nothing changes when Triton already serves the alias.

Safe to kill or stop at any moment: a swap a killed sync left half done is finished or rolled back by
the next sync before anything else, and SIGTERM / Ctrl-C wait until the step in progress is finished or
rolled back (Triton serves one version), then exit. A Triton whose model control needs an admin key
(--http-restricted-api=model-repository:fashionserve-admin-key=KEY) gets it from $TRITON_ADMIN_KEY.

Examples:
  python -m fashionserve.launcher start --repository work/served --model-control explicit --detach \\
      --pid-file work/triton.pid
  python mlflow/sync.py --repository work/served --triton-url 127.0.0.1:8000
  python mlflow/sync.py --repository work/served --triton-url 127.0.0.1:8000 --watch --interval 10
  python mlflow/sync.py --repository /models --triton-url triton:8000 --target gpu --plans /plans --watch
  python mlflow/sync.py --model fashion_generator --repository work/served --triton-url 127.0.0.1:8000
  python mlflow/sync.py --model tryon --model garment_classifier --model fashion_generator \\
      --repository /models --triton-url triton:8000 --watch
"""

import argparse
import os
import signal
import sys
from pathlib import Path

# Run as a script from a checkout: the project root goes first, and this folder (named like the
# mlflow package) goes away, so `import mlflow` always finds the real package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from mlflow.tracking import MlflowClient  # noqa: E402

from fashionserve.cli import add_tracking_uri, command_parser, run  # noqa: E402
from fashionserve.registry import ALIAS, RegistryError, connect, first_line  # noqa: E402
from fashionserve.repository import PRECISIONS, TARGETS  # noqa: E402
from fashionserve.sync import (  # noqa: E402
    ADMIN_KEY_ENV,
    SyncResult,
    SyncStopped,
    request_stop,
    stop_requested,
    sync_once,
)


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="MODEL",
        help="registered model = pipeline: tryon (default), hair, garment_classifier, fashion_generator; "
        "repeat it to serve several",
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
    args.models = list(dict.fromkeys(args.models or ["tryon"]))
    if args.interval <= 0:
        parser.error("--interval must be positive")
    if args.plans is not None and args.target != "gpu":
        parser.error("--plans applies to --target gpu only")
    return args


def _log(line: str) -> None:
    print(line, flush=True)


def sync(args: argparse.Namespace, client: MlflowClient, model: str) -> SyncResult:
    return sync_once(
        client,
        model,
        args.repository,
        args.triton_url,
        alias=args.alias,
        target=args.target,
        variant=args.variant,
        load_timeout=args.load_timeout,
        log=_log,
        plans=args.plans,
        admin_key=os.environ.get(ADMIN_KEY_ENV) or None,
    )


def sync_all(args: argparse.Namespace, watching: bool) -> int:
    """One round: each model in turn, so a model that fails does not keep the others from being served;
    returns how many failed (each reported as an `error:` line). MLflow out of reach fails the round
    (RegistryError); a stop request ends it at the next safe point of a model's sync (SyncStopped)."""
    client = connect(args.tracking_uri)
    failed = 0
    for model in args.models:
        try:
            result = sync(args, client, model)
        except SyncStopped:  # a RegistryError too, but it ends the round
            raise
        except RegistryError as exc:
            failed += 1
            print(f"error: {first_line(exc)}", file=sys.stderr, flush=True)
            continue
        if not result.changed and not watching:
            _log(
                f"up to date: '{model}' version {result.mlflow_version} is live as Triton version "
                f"{result.triton_version}"
            )
    return failed


def main() -> int:
    args = parse_args()
    # SIGTERM (a container stop) and Ctrl-C wait for the swap step in progress: it is finished or rolled
    # back, so Triton serves one version when this exits. A second signal does not cut that short.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: request_stop())
    if not args.watch:
        return 2 if sync_all(args, watching=False) else 0
    names = ", ".join(f"'{model}'" for model in args.models)
    _log(f"watching {names} alias '{args.alias}' every {args.interval:g} s (Ctrl-C stops)")
    while True:
        try:
            sync_all(args, watching=True)
        except SyncStopped as exc:
            _log(str(exc))
            return 0
        except RegistryError as exc:  # report and keep watching: the next round may succeed
            print(f"error: {first_line(exc)}", file=sys.stderr, flush=True)
        if stop_requested(wait=args.interval):
            _log("stopped")
            return 0


if __name__ == "__main__":
    run(main, expected=(RegistryError,))
