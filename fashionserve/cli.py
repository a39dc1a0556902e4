"""What every CLI shares: expected failures end as one line on stderr and exit code 2, and the options
several CLIs take (the export CLIs' weights and bundle options, the MLflow tracking URI).

Imports neither torch nor MLflow, so every CLI can use it.
"""

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

RANDOM_INIT = "random-init"  # the tag of bundles, files and registry versions made from random weights
DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"


class UserError(Exception):
    """A failure the user can fix (bad argument, missing file); shown as one line."""


def run(main: Callable[[], int | None], expected: tuple[type[BaseException], ...] = ()) -> None:
    """Call `main` and exit with its status; expected errors print `error: <message>` and exit 2."""
    try:
        sys.exit(main() or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (UserError, FileNotFoundError, *expected) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def command_parser(description: str | None) -> argparse.ArgumentParser:
    """A CLI's parser whose --help shows its module docstring (examples included) as written."""
    return argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_tracking_uri(parser: argparse.ArgumentParser) -> None:
    """--tracking-uri, defaulting to $MLFLOW_TRACKING_URI or the embedded server's address."""
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
        help="MLflow server (default: $MLFLOW_TRACKING_URI or %(default)s)",
    )


def export_parser(
    description: str, weights_title: str, random_outputs: str, max_batch: int = 4
) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """An export CLI's parser: the group "weights" (returned, for the CLI's checkpoint options) with
    --random-init and --seed, then --max-batch and --out. `random_outputs` says what random weights give."""
    parser = command_parser(description)
    weights = parser.add_argument_group(weights_title)
    weights.add_argument(
        "--random-init",
        action="store_true",
        help=f"seeded random weights instead of checkpoints: {random_outputs}, tagged {RANDOM_INIT}",
    )
    weights.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=max_batch,
        help=f"largest batch the ONNX files accept (default {max_batch})",
    )
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create (must not exist)")
    return parser, weights


def parse_export_args(
    parser: argparse.ArgumentParser, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> argparse.Namespace:
    """Parsed arguments of an export CLI: either --random-init or every checkpoint option in `required`
    (attribute names, e.g. "condition_checkpoint"); those in `optional` go only with checkpoints."""
    args = parser.parse_args()
    flags = [f"--{name.replace('_', '-')}" for name in required]
    given = [getattr(args, name) is not None for name in required + optional]
    if args.random_init and any(given):
        parser.error("--random-init and checkpoints exclude each other")
    if not args.random_init and not all(given[: len(required)]):
        checkpoints = f"both {flags[0]} and {flags[1]}," if len(flags) == 2 else " and ".join(flags)
        parser.error(f"give {checkpoints} or --random-init")
    return args


def report_written(out: Path, manifest: dict, started: float, random_outputs: str) -> None:
    """The closing line of an export CLI."""
    tag = f" [{RANDOM_INIT}: {random_outputs}]" if manifest["random_init"] else ""
    print(f"bundle written to {out} in {time.monotonic() - started:.0f}s{tag}")
