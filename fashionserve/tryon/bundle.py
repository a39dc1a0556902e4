"""Export the try-on pipeline into a bundle: one ONNX file per stage, parity-checked, plus a manifest."""

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fashionserve.checkpoints import load_strict, read_state_dict, sha256_file
from fashionserve.onnx_export import OPSET, ExportError, export_onnx, max_abs_error, run_onnx, tensor_specs
from fashionserve.repository import ensemble_steps
from fashionserve.tryon.stages import TryonConfig, TryonPipeline, build_networks

RANDOM_INIT = "random-init"
MANIFEST = "manifest.json"
ENSEMBLE = "tryon"


@dataclass(frozen=True)
class Stage:
    """One Triton model of the pipeline: ONNX tensor names and the parity tolerance of its outputs."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    tolerance: float  # max abs error allowed per output (for 'parse': fraction of pixels whose label differs)


STAGES: tuple[Stage, ...] = (
    Stage(
        "tryon_preprocess",
        ("cloth", "cloth_mask", "agnostic", "densepose", "parse_agnostic"),
        (
            "cloth_normalized",
            "cloth_mask_binary",
            "agnostic_normalized",
            "densepose_normalized",
            "cloth_input",
            "pose_input",
        ),
        1e-5,
    ),
    Stage(
        "tryon_condition_generator",
        ("cloth_input", "pose_input"),
        ("flow", "segmentation", "warped_cloth_mask"),
        2e-3,
    ),
    Stage(
        "tryon_warp",
        ("flow", "segmentation", "warped_cloth_mask", "cloth", "cloth_mask"),
        ("parse", "warped_cloth"),
        1e-3,
    ),
    Stage("tryon_image_generator", ("agnostic", "densepose", "warped_cloth", "parse"), ("image",), 5e-3),
    Stage("tryon_postprocess", ("image",), ("tryon_image",), 1.0),
)


def random_client_inputs(config: TryonConfig, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Seeded random uint8 tensors in the client contract (cloth, cloth_mask, agnostic, densepose, parse)."""
    generator = torch.Generator().manual_seed(seed)
    size = (batch, config.height, config.width)

    def image() -> torch.Tensor:
        return torch.randint(0, 256, (*size, 3), generator=generator, dtype=torch.uint8)

    cloth_mask = torch.randint(0, 2, size, generator=generator, dtype=torch.uint8) * 255
    parse = torch.randint(0, 20, size, generator=generator, dtype=torch.uint8)
    return image(), cloth_mask, image(), image(), parse


def stage_inputs(pipeline: TryonPipeline, client_inputs: tuple[torch.Tensor, ...]) -> dict[str, tuple]:
    """Run the reference pipeline wired like the tracked `tryon` ensemble config and record every
    stage's (inputs, outputs) by stage name."""
    values = dict(zip(STAGES[0].inputs, client_inputs, strict=True))  # ensemble tensor name -> value
    steps = {step.model_name: step for step in ensemble_steps(ENSEMBLE)}
    recorded = {}
    with torch.no_grad():
        for stage in STAGES:
            step = steps[stage.name]
            args = tuple(values[step.input_map[name]] for name in stage.inputs)
            outputs = pipeline.stages[stage.name](*args)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            recorded[stage.name] = (args, outputs)
            values.update(
                {step.output_map[name]: value for name, value in zip(stage.outputs, outputs, strict=True)}
            )
    return recorded


def _parity_error(stage: Stage, output: str, reference: torch.Tensor, actual: np.ndarray) -> float:
    if output == "parse":  # argmax after the blur: near-ties may flip a label, so count flipped pixels
        return float((reference.argmax(1).numpy() != actual.argmax(1)).mean())
    return max_abs_error(reference, actual)


def load_networks(
    config: TryonConfig, condition_checkpoint: Path | None, image_checkpoint: Path | None, seed: int
) -> tuple[TryonPipeline, dict]:
    """Reference pipeline with the user's checkpoints (strict) or seeded random weights, plus provenance."""
    torch.manual_seed(seed)
    condition, image = build_networks(config)
    provenance: dict = {"random_init": condition_checkpoint is None, "seed": seed}
    if condition_checkpoint is not None and image_checkpoint is not None:
        load_strict(condition, read_state_dict(condition_checkpoint), "condition generator checkpoint")
        load_strict(image, read_state_dict(image_checkpoint), "image generator checkpoint")
        provenance.update(
            condition_checkpoint=str(condition_checkpoint),
            condition_checkpoint_sha256=sha256_file(condition_checkpoint),
            image_checkpoint=str(image_checkpoint),
            image_checkpoint_sha256=sha256_file(image_checkpoint),
        )
    image.fold_spectral_norm()
    pipeline = TryonPipeline(config, condition, image).eval()
    return pipeline, provenance


def export_bundle(
    pipeline: TryonPipeline,
    config: TryonConfig,
    provenance: dict,
    out_dir: Path,
    max_batch: int = 4,
    parity_batches: tuple[int, ...] = (1, 2),
    log: Callable[[str], None] = print,
) -> dict:
    """Export every stage to `out_dir/<stage>/model.onnx`, check ONNX Runtime against PyTorch on
    `parity_batches` (seeded random client inputs), write the manifest and return it.
    The bundle is assembled in a temp dir and renamed into place: never half-written."""
    if out_dir.exists():
        raise ExportError(f"output directory already exists: {out_dir} (choose another or remove it)")
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        manifest = _export_into(pipeline, config, provenance, tmp_dir, max_batch, parity_batches, log)
        tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def _export_into(
    pipeline: TryonPipeline,
    config: TryonConfig,
    provenance: dict,
    bundle_dir: Path,
    max_batch: int,
    parity_batches: tuple[int, ...],
    log: Callable[[str], None],
) -> dict:
    label = f" [{RANDOM_INIT}]" if provenance["random_init"] else ""
    log(f"reference pipeline {config.height}x{config.width}{label}: recording stage inputs")
    runs = [stage_inputs(pipeline, random_client_inputs(config, b, seed=100 + b)) for b in parity_batches]
    models = {}
    for index, stage in enumerate(STAGES, start=1):
        started = time.monotonic()
        log(f"[{index}/{len(STAGES)}] exporting {stage.name}")
        model_dir = bundle_dir / stage.name
        model_dir.mkdir()
        path = model_dir / "model.onnx"
        example_args = runs[-1][stage.name][0]
        export_onnx(
            pipeline.stages[stage.name],
            example_args,
            path,
            list(stage.inputs),
            list(stage.outputs),
            max_batch,
        )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        errors: dict[str, float] = {}
        for run in runs:
            args, expected = run[stage.name]
            for name, reference, actual in zip(stage.outputs, expected, run_onnx(session, args), strict=True):
                errors[name] = max(errors.get(name, 0.0), _parity_error(stage, name, reference, actual))
        worst = max(errors, key=errors.__getitem__)
        for name, error in errors.items():
            if error > stage.tolerance:
                raise ExportError(
                    f"{stage.name}: ONNX Runtime differs from PyTorch on '{name}' by {error:.3g} "
                    f"(tolerance {stage.tolerance:g})"
                )
        inputs, outputs = tensor_specs(path)
        models[stage.name] = {
            "file": f"{stage.name}/model.onnx",
            "inputs": [s.to_dict() for s in inputs],
            "outputs": [s.to_dict() for s in outputs],
            "parity_max_error": errors,
            "sha256": sha256_file(path),
        }
        log(f"    ok in {time.monotonic() - started:.1f}s, parity {worst}={errors[worst]:.2e}")
    manifest = {
        "pipeline": ENSEMBLE,
        "architecture": "hr-viton",
        "config": config.to_dict(),
        "weights": RANDOM_INIT if provenance["random_init"] else "checkpoint",
        **provenance,
        "opset": OPSET,
        "max_batch_size": max_batch,
        "parity_batches": list(parity_batches),
        "torch_version": torch.__version__,
        "onnxruntime_version": ort.__version__,
        "input_contract": models[STAGES[0].name]["inputs"],
        "output_contract": models[STAGES[-1].name]["outputs"],
        "models": models,
    }
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_manifest(bundle_dir: Path, manifest: dict) -> None:
    """Replace a bundle's manifest atomically (temp file, then rename): readers see the old or the new."""
    tmp = bundle_dir / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(bundle_dir / MANIFEST)


def read_manifest(bundle_dir: Path) -> dict:
    """The manifest of an exported bundle."""
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise ExportError(f"not a bundle (no {MANIFEST}): {bundle_dir}")
    return json.loads(path.read_text())
