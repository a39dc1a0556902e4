"""Add FP16 and INT8 Q/DQ variants of a bundle's networks, each gated against fp32.

What is quantized and how the gate judges it follows the bundle's pipeline (its manifest):
  tryon               the two heavy networks (tryon_condition_generator, tryon_image_generator); the
                      whole pipeline runs in fp32 and with each variant on calibration/evaluation pairs;
                      gate: SSIM/PSNR of the final images (plus each network's max/mean abs error)
  fashion_generator   the generator network; gate: multi-scale SWD between fp32 and variant images of
                      the same seeded latents
  garment_classifier  the classifier network; gate: top-1 agreement with fp32 and the largest class
                      probability difference on drawn product photos of several sizes
  hair                the twelve networks the gpu target serves as TensorRT plans (e4e and FS
                      encoders, face parser, StyleGAN2 synthesis stages, shape adaptor, SEAN inpainting,
                      colour blending, post-process); both ensembles run in fp32 and with each
                      variant on drawn portraits (samples alternate hair_transfer and hair_edit); gate:
                      SSIM/PSNR of each sample's final hair_image
Variant files sit next to each fp32 model.onnx (inputs and outputs stay fp32); the results are recorded
in the manifest under "variants". A variant that misses its thresholds is recorded all the same, the
command exits 2 with one line, and it is never served unless forced. Options of another pipeline are
refused.

Examples:
  python export/quantize.py work/bundles/tryon-demo
  python export/quantize.py work/bundles/tryon --calibration-dir data/viton-hd --calibration-samples 32
  python export/quantize.py work/bundles/tryon --variants int8 --min-ssim-int8 0.97
  python export/quantize.py work/bundles/fashion_generator --variants int8 --max-swd-int8 15
  python export/quantize.py work/bundles/garment_classifier
  python export/quantize.py work/bundles/hair --variants fp16
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.bundle import read_manifest  # noqa: E402
from fashionserve.catalogue.bundle import CLASSIFIER, GENERATOR  # noqa: E402
from fashionserve.catalogue.quantize import (  # noqa: E402
    DEFAULT_MAX_PROBABILITY_ERROR,
    DEFAULT_MAX_SWD,
    DEFAULT_MIN_TOP1_AGREEMENT,
    ClassifierQuantizeOptions,
    GeneratorQuantizeOptions,
    quantize_classifier_bundle,
    quantize_generator_bundle,
)
from fashionserve.cli import UserError, command_parser, run  # noqa: E402
from fashionserve.hair.bundle import PIPELINE as HAIR  # noqa: E402
from fashionserve.hair.quantize import HairQuantizeOptions, quantize_hair_bundle  # noqa: E402
from fashionserve.onnx_export import ExportError  # noqa: E402
from fashionserve.quantization import (  # noqa: E402
    DEFAULT_MAX_EXCLUDED_FRACTION,
    DEFAULT_MIN_PSNR,
    DEFAULT_MIN_SSIM,
    VARIANTS,
    GateFailure,
    QuantizationError,
    Thresholds,
    gate_failures,
    silence_onnxruntime_quantization_logs,
)
from fashionserve.tryon.bundle import ENSEMBLE as TRYON  # noqa: E402
from fashionserve.tryon.dataset import DatasetError  # noqa: E402
from fashionserve.tryon.quantize import QuantizeOptions, quantize_bundle  # noqa: E402

DRAWN = "samples"
PIPELINES = (TRYON, GENERATOR, CLASSIFIER, HAIR)
DEFAULTS = {
    TRYON: QuantizeOptions(),
    GENERATOR: GeneratorQuantizeOptions(),
    CLASSIFIER: ClassifierQuantizeOptions(),
    HAIR: HairQuantizeOptions(),
}


# Per-variant gate thresholds of each pipeline: (option prefix, metavar, what it bounds, defaults).
THRESHOLDS = {
    TRYON: (
        ("min-ssim", "X", "lowest SSIM", DEFAULT_MIN_SSIM),
        ("min-psnr", "DB", "lowest PSNR in dB", DEFAULT_MIN_PSNR),
    ),
    GENERATOR: (("max-swd", "X", "largest SWDx1e3 average", DEFAULT_MAX_SWD),),
    CLASSIFIER: (
        (
            "min-top1-agreement",
            "X",
            "lowest fraction of photos with fp32's top-1 class",
            DEFAULT_MIN_TOP1_AGREEMENT,
        ),
        ("max-probability-error", "X", "largest class probability difference", DEFAULT_MAX_PROBABILITY_ERROR),
    ),
}
GROUPS = {
    TRYON: "tryon and hair (means over the evaluation samples, final images vs fp32)",
    GENERATOR: "fashion_generator (fp32 vs variant images of the same latents)",
    CLASSIFIER: "garment_classifier (fp32 vs variant on drawn product photos)",
}
# The pipeline-specific options (argparse dests, all None unless given); the rest apply to every pipeline.
PIPELINE_OPTIONS = {
    pipeline: {
        *extra,
        *(f"{prefix.replace('-', '_')}_{v}" for prefix, *_ in THRESHOLDS[pipeline] for v in VARIANTS),
    }
    for pipeline, extra in (
        (TRYON, ("calibration_dir", "eval_dir", "max_excluded_fraction")),
        (GENERATOR, ("seed", "max_excluded_fraction")),
        (CLASSIFIER, ("seed",)),
    )
}
# hair is gated like try-on (SSIM/PSNR of the final images), on drawn portraits only
PIPELINE_OPTIONS[HAIR] = PIPELINE_OPTIONS[TRYON] - {"calibration_dir", "eval_dir"}


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.add_argument("bundle", type=Path, help="bundle directory written by export/*.py")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)",
    )
    samples = " / ".join(f"{DEFAULTS[p].calibration_samples}" for p in PIPELINES)
    parser.add_argument(
        "--calibration-samples",
        type=int,
        metavar="N",
        help=f"pairs / latents / photos / portraits to calibrate on (default {samples})",
    )
    samples = " / ".join(f"{DEFAULTS[p].eval_samples}" for p in PIPELINES)
    parser.add_argument(
        "--eval-samples",
        type=int,
        metavar="N",
        help=f"pairs / latents / photos / portraits the gate compares (default {samples})",
    )
    parser.add_argument(
        "--max-excluded-fraction",
        type=float,
        metavar="F",
        help="tryon, fashion_generator, hair: most layers per network that measurement may keep in fp32, "
        f"as a fraction (default {DEFAULT_MAX_EXCLUDED_FRACTION})",
    )
    groups = {pipeline: parser.add_argument_group(title) for pipeline, title in GROUPS.items()}
    groups[TRYON].add_argument(
        "--calibration-dir",
        metavar="DIR|samples",
        help="tryon only: VITON-HD-layout folder (its test_pairs.txt), or 'samples' for the drawn sample set "
        "(default)",
    )
    groups[TRYON].add_argument(
        "--eval-dir",
        metavar="DIR|samples",
        help="tryon only: folder for the quality gate (default: the calibration source, the pairs after "
        "those)",
    )
    for pipeline, thresholds in THRESHOLDS.items():
        for prefix, metavar, bounds, defaults in thresholds:
            for variant in VARIANTS:
                groups[pipeline].add_argument(
                    f"--{prefix}-{variant}",
                    type=float,
                    metavar=metavar,
                    help=f"{bounds} for {variant} (default {defaults[variant]})",
                )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="fashion_generator, garment_classifier: seed of latents or photos (and SWD patches) (default 0)",
    )
    args = parser.parse_args()
    args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants takes {', '.join(VARIANTS)}; got {', '.join(unknown) or 'none'}")
    for name in ("calibration_samples", "eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_excluded_fraction is not None and not 0.0 <= args.max_excluded_fraction <= 1.0:
        parser.error("--max-excluded-fraction must be between 0 and 1")
    return args


def _given(args: argparse.Namespace, name: str, default):
    value = getattr(args, name)
    return default if value is None else value


def _per_variant_values(
    args: argparse.Namespace, prefix: str, defaults: dict[str, float]
) -> dict[str, float]:
    return {v: _given(args, f"{prefix}_{v}", defaults[v]) for v in VARIANTS}


def _log(line: str) -> None:
    print(line, flush=True)


def _folder(text: str | None) -> Path | None:
    return None if text in (None, DRAWN) else Path(text)


def _refuse_foreign_options(args: argparse.Namespace, pipeline: str) -> None:
    """An option of another pipeline would be silently ignored: refuse it instead."""
    foreign = set().union(*PIPELINE_OPTIONS.values()) - PIPELINE_OPTIONS[pipeline]
    given = sorted(name for name in foreign if getattr(args, name) is not None)
    if given:
        option = "--" + given[0].replace("_", "-")
        raise UserError(f"{option} does not apply to a {pipeline} bundle ({args.bundle})")


def quantize(args: argparse.Namespace, pipeline: str) -> dict:
    """Quantize the bundle with its pipeline's method and gate; returns the new manifest."""
    defaults = DEFAULTS[pipeline]
    ssim_psnr = {
        v: Thresholds(
            _given(args, f"min_ssim_{v}", DEFAULT_MIN_SSIM[v]),
            _given(args, f"min_psnr_{v}", DEFAULT_MIN_PSNR[v]),
        )
        for v in VARIANTS
    }
    if pipeline == HAIR:
        options = HairQuantizeOptions(
            variants=args.variants,
            calibration_samples=_given(args, "calibration_samples", defaults.calibration_samples),
            eval_samples=_given(args, "eval_samples", defaults.eval_samples),
            thresholds=ssim_psnr,
            max_excluded_fraction=_given(args, "max_excluded_fraction", defaults.max_excluded_fraction),
        )
        return quantize_hair_bundle(args.bundle, options, log=_log)
    if pipeline == TRYON:
        options = QuantizeOptions(
            variants=args.variants,
            calibration_dir=_folder(args.calibration_dir),
            calibration_samples=_given(args, "calibration_samples", defaults.calibration_samples),
            eval_dir=_folder(args.eval_dir),
            eval_samples=_given(args, "eval_samples", defaults.eval_samples),
            thresholds=ssim_psnr,
            max_excluded_fraction=_given(args, "max_excluded_fraction", defaults.max_excluded_fraction),
        )
        return quantize_bundle(args.bundle, options, log=_log)
    if pipeline == GENERATOR:
        options = GeneratorQuantizeOptions(
            variants=args.variants,
            calibration_samples=_given(args, "calibration_samples", defaults.calibration_samples),
            eval_samples=_given(args, "eval_samples", defaults.eval_samples),
            seed=_given(args, "seed", defaults.seed),
            max_swd=_per_variant_values(args, "max_swd", DEFAULT_MAX_SWD),
            max_excluded_fraction=_given(args, "max_excluded_fraction", defaults.max_excluded_fraction),
        )
        return quantize_generator_bundle(args.bundle, options, log=_log)
    options = ClassifierQuantizeOptions(
        variants=args.variants,
        calibration_samples=_given(args, "calibration_samples", defaults.calibration_samples),
        eval_samples=_given(args, "eval_samples", defaults.eval_samples),
        seed=_given(args, "seed", defaults.seed),
        min_top1_agreement=_per_variant_values(args, "min_top1_agreement", DEFAULT_MIN_TOP1_AGREEMENT),
        max_probability_error=_per_variant_values(
            args, "max_probability_error", DEFAULT_MAX_PROBABILITY_ERROR
        ),
    )
    return quantize_classifier_bundle(args.bundle, options, log=_log)


def main() -> None:
    args = parse_args()
    if not args.bundle.is_dir():
        raise UserError(f"no bundle directory {args.bundle}")
    manifest = read_manifest(args.bundle)
    pipeline = manifest.get("pipeline")
    if pipeline not in PIPELINES:
        raise UserError(f"{args.bundle} is a '{pipeline}' bundle; quantize.py knows {', '.join(PIPELINES)}")
    missing = [
        m["file"] for m in manifest.get("models", {}).values() if not (args.bundle / m["file"]).is_file()
    ]
    if missing:
        raise UserError(f"{args.bundle} is incomplete: {missing[0]} is missing (export the bundle again)")
    _refuse_foreign_options(args, pipeline)
    silence_onnxruntime_quantization_logs()
    started = time.monotonic()
    manifest = quantize(args, pipeline)
    print(
        f"{pipeline} variants {', '.join(args.variants)} recorded in {args.bundle} "
        f"in {time.monotonic() - started:.0f}s"
    )
    failed = gate_failures(manifest, args.variants)
    if failed:
        raise GateFailure(f"{failed} (recorded in {args.bundle}/manifest.json)")


if __name__ == "__main__":
    run(main, expected=(QuantizationError, DatasetError, ExportError))
