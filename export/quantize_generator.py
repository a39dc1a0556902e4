"""Add FP16 and INT8 Q/DQ variants of the fashion generator network to its bundle, gated by SWD.

The generator makes images from the same seeded N(0, I) evaluation latents in fp32 and in each variant;
the multi-scale SWD between the two sets (x1e3, averaged over the Laplacian levels) must stay at or below
the variant's limit. The result (SWD per level, SSIM/PSNR, the layers kept in fp32) is recorded in the
manifest under "variants"; a variant over its limit is recorded, exits 2 with one line, and is never
served unless forced (export/render_repository.py --variant int8 --force).

Examples:
  python export/quantize_generator.py work/bundles/fashion_generator
  python export/quantize_generator.py work/bundles/fashion_generator --variants int8 --max-swd-int8 15
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.catalogue.quantize import (  # noqa: E402
    DEFAULT_MAX_SWD,
    GeneratorQuantizeOptions,
    quantize_generator_bundle,
)
from fashionserve.cli import UserError, run  # noqa: E402
from fashionserve.onnx_export import ExportError  # noqa: E402
from fashionserve.quantization import (  # noqa: E402
    DEFAULT_MAX_EXCLUDED_FRACTION,
    VARIANTS,
    GateFailure,
    QuantizationError,
    gate_failures,
    silence_onnxruntime_quantization_logs,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path, help="bundle directory written by export/fashion_generator.py")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}"
    )
    parser.add_argument("--calibration-samples", type=int, default=16, help="latents to calibrate on (16)")
    parser.add_argument("--eval-samples", type=int, default=32, help="latents the SWD gate compares (32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of latents, patches and directions (0)")
    for variant in VARIANTS:
        parser.add_argument(
            f"--max-swd-{variant}",
            type=float,
            default=DEFAULT_MAX_SWD[variant],
            help=f"largest SWDx1e3 average for {variant} (default {DEFAULT_MAX_SWD[variant]})",
        )
    parser.add_argument(
        "--max-excluded-fraction",
        type=float,
        default=DEFAULT_MAX_EXCLUDED_FRACTION,
        help=f"most layers kept in fp32 by measurement, a fraction (default {DEFAULT_MAX_EXCLUDED_FRACTION})",
    )
    args = parser.parse_args()
    args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants takes {', '.join(VARIANTS)}; got {', '.join(unknown) or 'none'}")
    if args.calibration_samples < 1 or args.eval_samples < 1:
        parser.error("--calibration-samples and --eval-samples must be at least 1")
    if not 0.0 <= args.max_excluded_fraction <= 1.0:
        parser.error("--max-excluded-fraction must be between 0 and 1")
    return args


def main() -> None:
    args = parse_args()
    if not args.bundle.is_dir():
        raise UserError(f"no bundle directory {args.bundle}")
    silence_onnxruntime_quantization_logs()
    options = GeneratorQuantizeOptions(
        variants=args.variants,
        calibration_samples=args.calibration_samples,
        eval_samples=args.eval_samples,
        seed=args.seed,
        max_swd={v: getattr(args, f"max_swd_{v}") for v in VARIANTS},
        max_excluded_fraction=args.max_excluded_fraction,
    )
    started = time.monotonic()
    manifest = quantize_generator_bundle(args.bundle, options)
    print(f"variants recorded in {args.bundle / 'manifest.json'} in {time.monotonic() - started:.0f}s")
    failed = gate_failures(manifest, args.variants)
    if failed:
        raise GateFailure(failed)


if __name__ == "__main__":
    run(main, expected=(QuantizationError, ExportError))
