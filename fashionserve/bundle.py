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
from tritonclient.grpc import model_config_pb2 as mc

from fashionserve.checkpoints import sha256_file
from fashionserve.onnx_export import OPSET, ExportError, export_onnx, max_abs_error, run_onnx, tensor_specs
from fashionserve.repository import TRACKED_REPOSITORY, read_config

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
    """Run the stage modules wired like the tracked ensemble `pipeline` (its steps in order; the client
    inputs in the order of the ensemble's inputs) and record every stage's (inputs, outputs) by stage
    name. A model that several steps use (e.g. one encoder for two images) is recorded once, its calls
    concatenated along the batch: every stage treats the samples of a batch independently."""
    ensemble = read_config(TRACKED_REPOSITORY / pipeline / "config.pbtxt")
    _refuse_unused_tensors(pipeline, ensemble)
    values = dict(zip([t.name for t in ensemble.input], client_inputs, strict=True))  # tensor -> value
    by_name = {stage.name: stage for stage in stages}
    calls: dict[str, list[tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]] = {}
    with torch.no_grad():
        for step in ensemble.ensemble_scheduling.step:
            stage = by_name[step.model_name]
            args = tuple(values[step.input_map[name]] for name in stage.inputs)
            outputs = modules[stage.name](*args)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            calls.setdefault(stage.name, []).append((args, outputs))
            values.update(
                {
                    step.output_map[name]: value
                    for name, value in zip(stage.outputs, outputs, strict=True)
                    if name in step.output_map  # a step may leave an output unused
                }
            )
    return {
        name: (_concatenate([a for a, _ in runs]), _concatenate([o for _, o in runs]))
        for name, runs in calls.items()
    }


def _refuse_unused_tensors(pipeline: str, ensemble: mc.ModelConfig) -> None:
    """Triton refuses to load an ensemble with a step output that nothing reads: fail here first, where
    the PyTorch wiring tests run in seconds."""
    read = {t.name for t in ensemble.output}
    read.update(v for step in ensemble.ensemble_scheduling.step for v in step.input_map.values())
    for step in ensemble.ensemble_scheduling.step:
        for tensor in step.output_map.values():
            if tensor not in read:
                raise ValueError(f"ensemble {pipeline}: tensor {tensor!r} of {step.model_name} is never read")


def _concatenate(calls: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    return calls[0] if len(calls) == 1 else tuple(torch.cat(tensors) for tensors in zip(*calls, strict=True))


def ensemble_contract(ensemble: str, models: Mapping[str, dict]) -> dict:
    """The client contract of a tracked ensemble (its inputs and outputs, in config order) from the
    tensor specs of the exported models its steps map them to."""
    config = read_config(TRACKED_REPOSITORY / ensemble / "config.pbtxt")
    specs = {}  # ensemble tensor name -> spec
    for step in config.ensemble_scheduling.step:
        model = models[step.model_name]
        for kind, mapping in (("inputs", step.input_map), ("outputs", step.output_map)):
            by_name = {spec["name"]: spec for spec in model[kind]}
            specs.update({value: {**by_name[key], "name": value} for key, value in mapping.items()})
    return {
        "input_contract": [specs[t.name] for t in config.input],
        "output_contract": [specs[t.name] for t in config.output],
    }


def export_pipeline(
    pipeline: str,
    stages: Sequence[Stage],
    modules: Mapping[str, nn.Module],
    client_inputs: ClientInputs | Mapping[str, ClientInputs],
    description: dict,
    out_dir: Path,
    max_batch: int,
    parity_batches: tuple[int, ...] = (1, 2),
    log: Callable[[str], None] = print,
    parity_error: ParityError = _max_abs_error,
) -> dict:
    """Export every stage to `out_dir/<stage>/model.onnx`, check ONNX Runtime against PyTorch on seeded
    client inputs at `parity_batches`, write the manifest (`description` supplies architecture, config,
    weights and provenance) and return it. Never leaves a half-written bundle.

    A pipeline is served by the tracked ensemble of its name, or, when `client_inputs` maps ensemble
    names to their inputs, by several ensembles sharing the stages (the manifest lists them under
    `ensembles`; its top-level contract is the first one's)."""
    if out_dir.exists():
        raise ExportError(f"output directory already exists: {out_dir} (choose another or remove it)")
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        inputs_by_ensemble = (
            client_inputs if isinstance(client_inputs, Mapping) else {pipeline: client_inputs}
        )
        runs = [
            record_stage_runs(ensemble, stages, modules, inputs(b, 100 + b))
            for ensemble, inputs in inputs_by_ensemble.items()
            for b in parity_batches
        ]
        models = {}
        for index, stage in enumerate(stages, start=1):
            started = time.monotonic()
            log(f"[{index}/{len(stages)}] exporting {stage.name}")
            models[stage.name] = _export_stage(
                stage,
                modules[stage.name],
                [r for r in runs if stage.name in r],
                tmp_dir,
                max_batch,
                parity_error,
            )
            errors = models[stage.name]["parity_max_error"]
            worst = max(errors, key=errors.__getitem__)
            log(f"    ok in {time.monotonic() - started:.1f}s, parity {worst}={errors[worst]:.2e}")
        contracts = {name: ensemble_contract(name, models) for name in inputs_by_ensemble}
        manifest = {
            "pipeline": pipeline,
            **description,
            "opset": OPSET,
            "max_batch_size": max_batch,
            "parity_batches": list(parity_batches),
            "torch_version": torch.__version__,
            "onnxruntime_version": ort.__version__,
            **next(iter(contracts.values())),
            "ensembles": contracts,
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
    # trace with the largest recorded batch the ONNX file accepts (a stage several steps use records
    # several times the batch: its first max_batch samples then)
    largest = max((run[stage.name][0] for run in runs), key=lambda args: len(args[0]))
    export_onnx(
        module,
        tuple(tensor[:max_batch] for tensor in largest),
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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_spec_problem(spec: object) -> str | None:
    if not isinstance(spec, dict):
        return f"a tensor must be an object, got {type(spec).__name__}"
    if not isinstance(spec.get("name"), str) or not isinstance(spec.get("dtype"), str):
        return "a tensor needs a string 'name' and 'dtype'"
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        return f"tensor '{spec['name']}': 'shape' must be a list of integers"
    return None


def manifest_problem(manifest: object) -> str | None:
    """What makes `manifest` unusable (a field missing or of the wrong JSON type), or None: every later
    step (render, quantize, register) indexes these fields without checking them again."""
    if not isinstance(manifest, dict):
        return f"the manifest must be a JSON object, got {type(manifest).__name__}"
    if not isinstance(manifest.get("pipeline"), str):
        return "'pipeline' must be a string"
    if not _is_int(manifest.get("max_batch_size")) or manifest["max_batch_size"] < 1:
        return "'max_batch_size' must be a positive integer"
    for field, kinds in (("ensembles", (dict, list)), ("variants", (dict,)), ("plans", (dict,))):
        if field in manifest and not isinstance(manifest[field], kinds):
            return f"'{field}' has the wrong JSON type ({type(manifest[field]).__name__})"
    if "config" in manifest and not isinstance(manifest["config"], dict):
        return "'config' must be an object"
    models = manifest.get("models")
    if not isinstance(models, dict) or not models:
        return "'models' must be a non-empty object"
    for name, model in models.items():
        if not isinstance(model, dict) or not isinstance(model.get("file"), str):
            return f"model '{name}' must be an object with a string 'file'"
        for kind in ("inputs", "outputs"):
            if not isinstance(model.get(kind), list):
                return f"model '{name}': '{kind}' must be a list"
            problem = next(filter(None, map(_tensor_spec_problem, model[kind])), None)
            if problem:
                return f"model '{name}': {problem}"
    return None


def read_manifest(bundle_dir: Path) -> dict:
    """The manifest of an exported bundle, its fields checked (ExportError naming the first problem)."""
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise ExportError(f"not a bundle (no {MANIFEST}): {bundle_dir}")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ExportError(f"{path}: not valid JSON ({type(exc).__name__})") from None
    problem = manifest_problem(manifest)
    if problem:
        raise ExportError(f"{path}: {problem}")
    return manifest
