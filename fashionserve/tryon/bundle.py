"""Export the try-on pipeline into a bundle: one ONNX file per stage, parity-checked, plus a manifest."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fashionserve.bundle import (  # noqa: F401 - read_manifest/write_manifest: imported from here by users
    Stage,
    export_pipeline,
    read_manifest,
    record_stage_runs,
    write_manifest,
)
from fashionserve.checkpoints import load_strict, read_state_dict, sha256_file
from fashionserve.cli import RANDOM_INIT
from fashionserve.onnx_export import max_abs_error
from fashionserve.tryon.stages import TryonConfig, TryonPipeline, build_networks

ENSEMBLE = "tryon"

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
    return record_stage_runs(ENSEMBLE, STAGES, pipeline.stages, client_inputs)


def _parity_error(stage: str, output: str, reference: torch.Tensor, actual: np.ndarray) -> float:
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
    label = f" [{RANDOM_INIT}]" if provenance["random_init"] else ""
    log(f"reference pipeline {config.height}x{config.width}{label}: recording stage inputs")
    description = {
        "architecture": "hr-viton",
        "config": config.to_dict(),
        "weights": RANDOM_INIT if provenance["random_init"] else "checkpoint",
        **provenance,
    }
    return export_pipeline(
        ENSEMBLE,
        STAGES,
        pipeline.stages,
        lambda batch, seed: random_client_inputs(config, batch, seed),
        description,
        out_dir,
        max_batch,
        parity_batches,
        log,
        _parity_error,
    )
