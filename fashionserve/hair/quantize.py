"""FP16 and INT8 Q/DQ variants of the HairFastGAN networks, gated on the images users get: the final
`hair_image` of both ensembles (hair_transfer's last synthesis, hair_edit's composite), variant against
fp32, on drawn portraits (samples alternate the two ensembles).

The variants are built by the shared machinery (`fashionserve.quantization`: onnxconverter float16, ONNX
Runtime static int8 Q/DQ, layers kept in fp32 by measured sensitivity until the calibration images reach
the thresholds), one network at a time with the others in fp32; the gate then runs both ensembles with all
the variant networks. The manifest gets the usual `variants` record, so `--variant` rendering, the plan
builder and the registry's quality gate treat them like the try-on ones; a failed variant is recorded and
never served unless forced.

Which networks (`NETWORKS`): exactly the stages the gpu target serves as TensorRT plans (their tracked
configs' platform, `fashionserve.plans.plan_networks`), where the convolutions, attention and modulated
convolutions are: e4e, the FS encoder, the parser (and its pass over generated images), the four StyleGAN2
synthesis stages, the shape adaptor, SEAN inpainting, the CLIP colour blend and the post-process. The
light steps (resizing, label maps, masks, mixing, the rotate MLP, the edit offset, the composite) stay
ONNX Runtime fp32 on every target, so a variant of them would never be served. What a network's variant
costs is dominated by the run of both ensembles that judges it, not by the network: on the tiny test
bundle (256 px, 2 calibration + 2 evaluation portraits, the shared 2-core machine under load) building and
judging one network's variant took 6-20 s, the whole list with both variants about 5.5 minutes
(docs/quantization.md, "Hair"); the tests therefore quantize three of them (`HairQuantizeOptions.networks`)
and check that the full list is the plan list.
"""

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from fashionserve.bundle import read_manifest, record_stage_runs
from fashionserve.checkpoints import sha256_file
from fashionserve.hair.bundle import EDIT, PIPELINE, STAGES, TRANSFER, edit_inputs, transfer_inputs
from fashionserve.hair.stages import HairConfig
from fashionserve.onnx_export import run_onnx
from fashionserve.quantization import (
    DEFAULT_MAX_EXCLUDED_FRACTION,
    VARIANTS,
    QuantizationError,
    Thresholds,
    build_network_variant,
    commit_variants,
    default_thresholds,
    image_quality,
    open_session,
)
from fashionserve.repository import TRACKED_REPOSITORY, read_config

NETWORKS = (
    "hair_encoder", "hair_fs_encoder", "hair_parser", "hair_w_features", "hair_generator",
    "hair_generated_labels", "hair_shape_target", "hair_inpaint", "hair_color_blend", "hair_blend_synthesis",
    "hair_post_process", "hair_final_synthesis",
)  # fmt: skip
CALIBRATION_SEED, EVALUATION_SEED = 1000, 2000

Sample = tuple[str, tuple[Tensor, ...]]  # (ensemble, its client inputs at batch 1)


@dataclass(frozen=True)
class HairQuantizeOptions:
    variants: tuple[str, ...] = VARIANTS
    calibration_samples: int = 8
    eval_samples: int = 8
    thresholds: dict[str, Thresholds] = field(
        default_factory=lambda: {variant: default_thresholds(variant) for variant in VARIANTS}
    )
    max_excluded_fraction: float = DEFAULT_MAX_EXCLUDED_FRACTION
    networks: tuple[str, ...] = NETWORKS


def config_from_manifest(manifest: dict) -> HairConfig:
    """The HairConfig a bundle was exported with (its manifest's `config`)."""
    names = {f.name for f in fields(HairConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in manifest["config"].items() if k in names}
    return HairConfig(**values)


class _OnnxStage:
    """An ONNX Runtime session called like a stage module (torch tensors in, a tuple of them out)."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.from_numpy(output) for output in run_onnx(self.session, args))


def portrait_samples(config: HairConfig, count: int, seed: int) -> list[Sample]:
    """Drawn portraits, alternately through hair_transfer and hair_edit."""
    return [
        (TRANSFER, transfer_inputs(config, 1, seed + i))
        if i % 2 == 0
        else (EDIT, edit_inputs(config, 1, seed + i))
        for i in range(count)
    ]


def final_stage(ensemble: str, output: str = "hair_image") -> str:
    """The stage whose step gives the tracked `ensemble` its `output` (hair_transfer: the last synthesis;
    hair_edit: the composite)."""
    config = read_config(TRACKED_REPOSITORY / ensemble / "config.pbtxt")
    (stage,) = [s.model_name for s in config.ensemble_scheduling.step if output in s.output_map.values()]
    return stage


FINAL_STAGES = {ensemble: final_stage(ensemble) for ensemble in (TRANSFER, EDIT)}


def _runs(stages: dict, samples: list[Sample]) -> list[dict]:
    return [record_stage_runs(ensemble, STAGES, stages, inputs) for ensemble, inputs in samples]


def final_images(samples: list[Sample], runs: list[dict]) -> list[np.ndarray]:
    """The `hair_image` each sample's ensemble returns (batch 1: its only image)."""
    return [
        run[FINAL_STAGES[ensemble]][1][0][0].numpy() for (ensemble, _), run in zip(samples, runs, strict=True)
    ]


def pipeline_images(stages: dict, samples: list[Sample]) -> list[np.ndarray]:
    """Run each sample through its ensemble's stages; its final image."""
    return final_images(samples, _runs(stages, samples))


def onnx_stages(bundle_dir: Path, manifest: dict, files: dict[str, Path] | None = None) -> dict:
    """Every stage of the bundle as ONNX Runtime sessions: fp32, or the given file where `files` names
    one (a variant)."""
    files = files or {}
    return {
        name: _OnnxStage(open_session(files.get(name, bundle_dir / model["file"])))
        for name, model in manifest["models"].items()
    }


def gate(
    bundle_dir: Path,
    manifest: dict,
    files: dict[str, Path],
    samples: list[Sample],
    references: list[np.ndarray],
    thresholds: Thresholds,
) -> tuple[dict, list[str]]:
    """The quality gate: every sample's final image with the variant `files` swapped in for their fp32
    networks, against its fp32 image (`references`); (quality, why it fails: empty when it passes)."""
    quality = image_quality(references, pipeline_images(onnx_stages(bundle_dir, manifest, files), samples))
    return quality, thresholds.failures(quality)


def quantize_hair_bundle(
    bundle_dir: Path, options: HairQuantizeOptions, log: Callable[[str], None] = print
) -> dict:
    """Build, gate and commit every requested variant of the networks; returns the new manifest.
    Failed variants are recorded, not raised."""
    manifest = read_manifest(bundle_dir)
    if manifest.get("pipeline") != PIPELINE:
        raise QuantizationError(f"{bundle_dir} is a '{manifest.get('pipeline')}' bundle, not {PIPELINE}")
    unknown = [v for v in options.variants if v not in VARIANTS]
    if unknown:
        raise QuantizationError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    missing = [n for n in options.networks if n not in manifest["models"]]
    if missing:
        raise QuantizationError(f"{bundle_dir} has no network {missing[0]!r} (exported before HairFastGAN?)")
    config = config_from_manifest(manifest)
    fp32 = onnx_stages(bundle_dir, manifest)
    calibration = portrait_samples(config, options.calibration_samples, CALIBRATION_SEED)
    evaluation = portrait_samples(config, options.eval_samples, EVALUATION_SEED)
    weights = " [random-init weights: the images are noise]" if manifest.get("random_init") else ""
    log(f"fp32 images of {len(calibration)} calibration and {len(evaluation)} evaluation portraits{weights}")
    calibration_runs = _runs(fp32, calibration)
    calibration_images = final_images(calibration, calibration_runs)
    evaluation_images = pipeline_images(fp32, evaluation)
    inputs = {stage.name: stage.inputs for stage in STAGES}

    work_dir = bundle_dir / ".quantize.partial"  # same file system as the bundle: files move by rename
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir()
    try:
        records, files = {}, {}
        for variant in options.variants:
            thresholds = options.thresholds[variant]
            built = {}
            for network in options.networks:
                log(f"[{variant}] {network}")
                feeds = [  # the network's inputs in every calibration run that uses it
                    {name: arg.numpy() for name, arg in zip(inputs[network], run[network][0], strict=True)}
                    for run in calibration_runs
                    if network in run
                ]

                def quality_of(session: ort.InferenceSession, network: str = network) -> dict:
                    stages = {**fp32, network: _OnnxStage(session)}
                    return image_quality(calibration_images, pipeline_images(stages, calibration))

                built[network] = build_network_variant(
                    network,
                    variant,
                    bundle_dir / manifest["models"][network]["file"],
                    feeds,
                    quality_of,
                    thresholds,
                    options.max_excluded_fraction,
                    work_dir,
                    log,
                )
            variant_files = {n: b.path for n, b in built.items()}
            quality, failures = gate(
                bundle_dir, manifest, variant_files, evaluation, evaluation_images, thresholds
            )
            log(f"[{variant}] gate {'FAIL: ' + '; '.join(failures) if failures else 'PASS'}")
            records[variant] = {
                "passed": not failures,
                "reason": "; ".join(failures),
                "thresholds": asdict(thresholds),
                "quality": quality,
                "calibration": {"source": "drawn portraits", "samples": len(calibration), "method": "minmax"},
                "evaluation": {
                    "source": "drawn portraits",
                    "samples": len(evaluation),
                    "seed": EVALUATION_SEED,
                },
                "weights": manifest.get("weights"),
                "onnxruntime_version": ort.__version__,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "networks": {n: {**b.record, "sha256": sha256_file(b.path)} for n, b in built.items()},
            }
            files.update({b.record["file"]: b.path for b in built.values()})
        return commit_variants(bundle_dir, files, records)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
