"""Build TensorRT plans of the heavy networks on the GPU host, and render the gpu target's repository.

Run it where TensorRT is installed, in the nvcr.io/nvidia/tensorrt:<YY.MM>-py3 image of the same YY.MM as
the Triton image (a plan only loads in the TensorRT version that built it, on the GPU architecture it was
built for). Each heavy network's chosen ONNX variant (fp32 by default, or fp16 / int8 from
export/quantize.py; a variant that failed its quality gate only with --force) is parsed as a strongly
typed network (no fp16/int8 builder flags: precision is in the ONNX file) with one optimization profile
for batch 1..the bundle's max batch. Plans are written next to the ONNX files, named by variant, compute
capability and TensorRT version, and listed in the manifest; --out then renders the gpu repository, whose
configs map each compute capability to its plan (cc_model_filenames).

Example (on the GPU host):
  python export/build_plans.py work/bundles/tryon --variant int8 --opt-batch 2 --out work/model_repository
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.cli import command_parser, run  # noqa: E402
from fashionserve.plans import PlanError, build_bundle_plans  # noqa: E402
from fashionserve.repository import PRECISIONS, RenderError, render_repository  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.add_argument("bundle", type=Path, help="bundle directory (export/tryon.py, export/quantize.py)")
    parser.add_argument(
        "--variant", choices=PRECISIONS, default="fp32", help="ONNX variant to build from (default fp32)"
    )
    parser.add_argument("--force", action="store_true", help="build from a variant that failed its gate")
    parser.add_argument(
        "--opt-batch", type=int, help="batch size TensorRT tunes for (default: the bundle's max batch size)"
    )
    parser.add_argument(
        "--workspace-gib", type=float, default=8.0, help="TensorRT builder workspace in GiB (default 8)"
    )
    parser.add_argument("--out", type=Path, help="render the gpu repository into this new directory")
    parser.add_argument("--version", type=int, default=1, help="Triton version number (default 1)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not args.bundle.is_dir():
        raise PlanError(f"no bundle directory {args.bundle}")
    if args.out is not None and args.out.exists():
        raise PlanError(f"repository directory already exists: {args.out}")
    log = lambda line: print(line, flush=True)  # noqa: E731
    manifest = build_bundle_plans(
        args.bundle, args.variant, args.force, args.opt_batch, args.workspace_gib, log
    )
    if args.out is not None:
        names = render_repository(
            args.bundle,
            manifest,
            args.out,
            target="gpu",
            version=args.version,
            variant=args.variant,
            force=args.force,
        )
        print(f"rendered gpu repository {args.out} ({args.variant}): {', '.join(names)}")


if __name__ == "__main__":
    run(main, expected=(PlanError, RenderError))
