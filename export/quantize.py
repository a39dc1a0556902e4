"""Add FP16 and INT8 Q/DQ variants of the heavy networks to a bundle, gated against fp32.

For each heavy network (tryon_condition_generator, tryon_image_generator) writes model.fp16.onnx and
model.int8.onnx next to its fp32 model.onnx (inputs and outputs stay fp32), then runs the whole pipeline
in ONNX Runtime in fp32 and with each variant swapped in, and records SSIM/PSNR of the final images and
each network's max/mean abs error in the manifest under "variants". Exits 2 with one line when a variant
misses its thresholds (the result is still recorded; such a variant is never served unless forced).

Examples:
  python export/quantize.py work/bundles/tryon-demo
  python export/quantize.py work/bundles/tryon --calibration-dir data/viton-hd --calibration-samples 32
  python export/quantize.py work/bundles/tryon --variants int8 --min-ssim-int8 0.97
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.cli import UserError, run  # noqa: E402
from fashionserve.onnx_export import ExportError  # noqa: E402
from fashionserve.quantization import (  # noqa: E402
    DEFAULT_MAX_EXCLUDED_FRACTION,
    DEFAULT_MIN_PSNR,
    DEFAULT_MIN_SSIM,
    VARIANTS,
    GateFailure,
    QuantizationError,
    QuantizeOptions,
    Thresholds,
    gate_failures,
    quantize_bundle,
    silence_onnxruntime_quantization_logs,
)
from fashionserve.tryon.dataset import DatasetError  # noqa: E402

DRAWN = "samples"


def _folder(text: str) -> Path | None:
    return None if text == DRAWN else Path(text)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path, help="bundle directory written by export/tryon.py")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)",
    )
    data = parser.add_argument_group("calibration and evaluation data")
    data.add_argument(
        "--calibration-dir",
        type=_folder,
        default=None,
        metavar="DIR|samples",
        help="VITON-HD-layout folder (its test_pairs.txt), or 'samples' for the drawn sample set (default)",
    )
    data.add_argument("--calibration-samples", type=int, default=8, help="pairs to calibrate on (default 8)")
    data.add_argument(
        "--eval-dir",
        type=_folder,
        default=None,
        metavar="DIR|samples",
        help="folder for the quality gate (default: the calibration source, the pairs after those)",
    )
    data.add_argument("--eval-samples", type=int, default=4, help="pairs the quality gate runs (default 4)")
    gate = parser.add_argument_group("quality gate (means over the evaluation set, final images vs fp32)")
    for variant in VARIANTS:
        gate.add_argument(
            f"--min-ssim-{variant}",
            type=float,
            default=DEFAULT_MIN_SSIM[variant],
            help=f"lowest SSIM for {variant} (default {DEFAULT_MIN_SSIM[variant]})",
        )
        gate.add_argument(
            f"--min-psnr-{variant}",
            type=float,
            default=DEFAULT_MIN_PSNR[variant],
            help=f"lowest PSNR in dB for {variant} (default {DEFAULT_MIN_PSNR[variant]})",
        )
    parser.add_argument(
        "--max-excluded-fraction",
        type=float,
        default=DEFAULT_MAX_EXCLUDED_FRACTION,
        help="most layers per network that measurement may keep in fp32, as a fraction "
        f"(default {DEFAULT_MAX_EXCLUDED_FRACTION})",
    )
    args = parser.parse_args()
    args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants takes {', '.join(VARIANTS)}; got {', '.join(unknown) or 'none'}")
    if not 0.0 <= args.max_excluded_fraction <= 1.0:
        parser.error("--max-excluded-fraction must be between 0 and 1")
    return args


def main() -> None:
    args = parse_args()
    if not args.bundle.is_dir():
        raise UserError(f"no bundle directory {args.bundle}")
    silence_onnxruntime_quantization_logs()
    options = QuantizeOptions(
        variants=args.variants,
        calibration_dir=args.calibration_dir,
        calibration_samples=args.calibration_samples,
        eval_dir=args.eval_dir,
        eval_samples=args.eval_samples,
        thresholds={
            v: Thresholds(getattr(args, f"min_ssim_{v}"), getattr(args, f"min_psnr_{v}")) for v in VARIANTS
        },
        max_excluded_fraction=args.max_excluded_fraction,
    )
    started = time.monotonic()
    manifest = quantize_bundle(args.bundle, options, log=lambda line: print(line, flush=True))
    print(
        f"variants {', '.join(args.variants)} recorded in {args.bundle} in {time.monotonic() - started:.0f}s"
    )
    failed = gate_failures(manifest, args.variants)
    if failed:
        raise GateFailure(f"{failed} (recorded in {args.bundle}/manifest.json)")


if __name__ == "__main__":
    run(main, expected=(QuantizationError, DatasetError, ExportError))
