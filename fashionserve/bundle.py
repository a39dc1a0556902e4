"""Bundles: one parity-checked ONNX file per Triton model of a pipeline, plus a manifest.

Every pipeline (try-on, garment classifier, fashion generator) is exported the same way: its PyTorch
stage modules run wired like the tracked ensemble config, each stage is exported to ONNX, compared with
PyTorch in ONNX Runtime on the recorded inputs, and described in `manifest.json`. The bundle directory is
assembled under `<out>.partial` and renamed into place, so a failed export leaves nothing behind.
"""

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from fashionserve.checkpoints import sha256_file
from fashionserve.onnx_export import OPSET, ExportError, export_onnx, max_abs_error, run_onnx, tensor_specs
from fashionserve.repository import ensemble_steps

RANDOM_INIT = "random-init"
MANIFEST = "manifest.json"

# (stage name, output name, PyTorch reference, ONNX Runtime result) -> error compared with the tolerance
ParityError = Callable[[str, str, Tensor, np.ndarray], float]
# (batch, seed) -> seeded inputs in the pipeline's client contract
ClientInputs = Callable[[int, int], tuple[Tensor, ...]]
StageRuns = dict[str, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]


@dataclass(frozen=True)
class Stage:
    """One Triton model of a pipeline: ONNX tensor names and the parity tolerance of its outputs."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    tolerance: float  # max parity error allowed per output (see ParityError)
    # (input, axis, name) dimensions besides the batch that stay dynamic in the ONNX file
    dynamic_axes: tuple[tuple[str, int, str], ...] = ()


def _max_abs_error(stage: str, output: str, reference: Tensor, actual: np.ndarray) -> float:
    return max_abs_error(reference, actual)


def record_stage_runs(
    pipeline: str,
    stages: Sequence[Stage],
    modules: Mapping[str, nn.Module],
    client_inputs: tuple[Tensor, ...],
) -> StageRuns:
    """Run the stage modules wired like the tracked ensemble `pipeline` and record every stage's
    (inputs, outputs) by stage name; the first stage's inputs are the client inputs, in order."""
    values = dict(zip(stages[0].inputs, client_inputs, strict=True))  # ensemble tensor name -> value
    steps = {step.model_name: step for step in ensemble_steps(pipeline)}
    recorded = {}
    with torch.no_grad():
        for stage in stages:
            step = steps[stage.name]
            args = tuple(values[step.input_map[name]] for name in stage.inputs)
            outputs = modules[stage.name](*args)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            recorded[stage.name] = (args, outputs)
            values.update(
                {step.output_map[name]: value for name, value in zip(stage.outputs, outputs, strict=True)}
            )
    return recorded


def export_pipeline(
    pipeline: str,
    stages: Sequence[Stage],
    modules: Mapping[str, nn.Module],
    client_inputs: ClientInputs,
    description: dict,
    out_dir: Path,
    max_batch: int,
    parity_batches: tuple[int, ...] = (1, 2),
    log: Callable[[str], None] = print,
    parity_error: ParityError = _max_abs_error,
) -> dict:
    """Export every stage to `out_dir/<stage>/model.onnx`, check ONNX Runtime against PyTorch on seeded
    client inputs at `parity_batches`, write the manifest (`description` supplies architecture, config,
    weights and provenance) and return it. Never leaves a half-written bundle."""
    if out_dir.exists():
        raise ExportError(f"output directory already exists: {out_dir} (choose another or remove it)")
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        runs = [
            record_stage_runs(pipeline, stages, modules, client_inputs(b, 100 + b)) for b in parity_batches
        ]
        models = {}
        for index, stage in enumerate(stages, start=1):
            started = time.monotonic()
            log(f"[{index}/{len(stages)}] exporting {stage.name}")
            models[stage.name] = _export_stage(
                stage, modules[stage.name], runs, tmp_dir, max_batch, parity_error
            )
            errors = models[stage.name]["parity_max_error"]
            worst = max(errors, key=errors.__getitem__)
            log(f"    ok in {time.monotonic() - started:.1f}s, parity {worst}={errors[worst]:.2e}")
        manifest = {
            "pipeline": pipeline,
            **description,
            "opset": OPSET,
            "max_batch_size": max_batch,
            "parity_batches": list(parity_batches),
            "torch_version": torch.__version__,
            "onnxruntime_version": ort.__version__,
            "input_contract": models[stages[0].name]["inputs"],
            "output_contract": models[stages[-1].name]["outputs"],
            "models": models,
        }
        write_manifest(tmp_dir, manifest)
        tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def _export_stage(
    stage: Stage,
    module: nn.Module,
    runs: list[StageRuns],
    bundle_dir: Path,
    max_batch: int,
    parity_error: ParityError,
) -> dict:
    model_dir = bundle_dir / stage.name
    model_dir.mkdir()
    path = model_dir / "model.onnx"
    dynamic_axes: dict[str, dict[int, str]] = {}
    for tensor, axis, name in stage.dynamic_axes:
        dynamic_axes.setdefault(tensor, {})[axis] = name
    export_onnx(
        module,
        runs[-1][stage.name][0],
        path,
        list(stage.inputs),
        list(stage.outputs),
        max_batch,
        dynamic_axes,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors: dict[str, float] = {}
    for run in runs:
        args, expected = run[stage.name]
        for name, reference, actual in zip(stage.outputs, expected, run_onnx(session, args), strict=True):
            errors[name] = max(errors.get(name, 0.0), parity_error(stage.name, name, reference, actual))
    for name, error in errors.items():
        if error > stage.tolerance:
            raise ExportError(
                f"{stage.name}: ONNX Runtime differs from PyTorch on '{name}' by {error:.3g} "
                f"(tolerance {stage.tolerance:g})"
            )
    inputs, outputs = tensor_specs(path)
    return {
        "file": f"{stage.name}/model.onnx",
        "inputs": [s.to_dict() for s in inputs],
        "outputs": [s.to_dict() for s in outputs],
        "parity_max_error": errors,
        "sha256": sha256_file(path),
    }


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
