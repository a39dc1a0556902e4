"""Render a Triton model repository from a bundle and the tracked configs in model_repository/.

  --target cpu  every leaf is a python-backend model running its ONNX file with ONNX Runtime
                (the embedded default)
  --target gpu  configs as tracked: TensorRT plans for the heavy networks, ONNX Runtime for light steps
  --variant     precision of the heavy networks: fp32 (default), or fp16/int8 from export/quantize.py;
                a variant that failed its quality gate is refused unless --force

Example:
  python export/render_repository.py work/bundles/tryon-demo --target cpu --out work/model_repository
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.bundle import read_manifest  # noqa: E402
from fashionserve.cli import command_parser, run  # noqa: E402
from fashionserve.onnx_export import ExportError  # noqa: E402
from fashionserve.repository import PRECISIONS, TARGETS, RenderError, render_repository  # noqa: E402


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("bundle", type=Path, help="bundle directory written by an export/ CLI")
    parser.add_argument("--target", choices=TARGETS, default="cpu", help="cpu (default) or gpu")
    parser.add_argument(
        "--out", type=Path, required=True, help="repository directory to create (must not exist)"
    )
    parser.add_argument(
        "--version", type=int, default=1, help="Triton version number of the models (default 1)"
    )
    parser.add_argument(
        "--variant", choices=PRECISIONS, default="fp32", help="heavy networks' precision (default fp32)"
    )
    parser.add_argument(
        "--force", action="store_true", help="serve a variant even though it failed its quality gate"
    )
    args = parser.parse_args()
    manifest = read_manifest(args.bundle)
    names = render_repository(
        args.bundle,
        manifest,
        args.out,
        target=args.target,
        version=args.version,
        variant=args.variant,
        force=args.force,
    )
    print(f"rendered {args.target} repository {args.out} ({args.variant}): {', '.join(names)}")


if __name__ == "__main__":
    run(main, expected=(RenderError, ExportError))
