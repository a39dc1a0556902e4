"""Render a Triton model repository from the tracked configs in `model_repository/` and a bundle.

The tracked configs fix names, wiring, batching and instance groups (written for the `gpu` target at
the public resolution); tensor shapes always come from the bundle's ONNX files. Two targets:

- `gpu`: configs as tracked (TensorRT plans for heavy networks, ONNX Runtime for light steps).
- `cpu`: every leaf becomes a python-backend model running the same ONNX file with ONNX Runtime
  (`fashionserve.runner`); ensembles are identical.

`variant` picks the precision of the heavy networks: fp32 (default), or a variant that
`export/quantize.py` recorded in the manifest (fp16, int8). A variant that failed its quality gate is
refused unless forced. The `gpu` target serves the TensorRT plans `export/build_plans.py` built from
that variant, one per GPU compute capability (`cc_model_filenames`).
"""

import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRACKED_REPOSITORY = PROJECT_ROOT / "model_repository"
TARGETS = ("cpu", "gpu")
PRECISIONS = ("fp32", "fp16", "int8")

_DTYPES = {"uint8": mc.TYPE_UINT8, "float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16, "int64": mc.TYPE_INT64}
_RUNNER_SHIM = (
    "# Generated: serves ../model.onnx-style files with ONNX Runtime.\n"
    "from fashionserve.runner import TritonPythonModel  # noqa: F401\n"
)


class RenderError(Exception):
    """The bundle and the tracked configs do not fit together (one line)."""


def read_config(path: Path) -> mc.ModelConfig:
    """Parse a config.pbtxt."""
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def write_config(config: mc.ModelConfig, path: Path) -> None:
    path.write_text(text_format.MessageToString(config))


def ensemble_steps(pipeline: str, source: Path = TRACKED_REPOSITORY) -> list[mc.ModelEnsembling.Step]:
    """The steps of ensemble `pipeline`, in their tracked order."""
    return list(read_config(source / pipeline / "config.pbtxt").ensemble_scheduling.step)


def pipeline_ensembles(manifest: dict) -> list[str]:
    """The ensembles a bundle serves: those its manifest lists, else the one named after its pipeline."""
    return list(manifest.get("ensembles") or [manifest["pipeline"]])


def _set_tensors(tensors, specs: list[dict], model: str, kind: str) -> None:
    by_name = {spec["name"]: spec for spec in specs}
    declared = {t.name for t in tensors}
    if declared != set(by_name):
        raise RenderError(
            f"{model}: config {kind}s {sorted(declared)} differ from the ONNX {kind}s {sorted(by_name)}"
        )
    for tensor in tensors:
        spec = by_name[tensor.name]
        tensor.data_type = _DTYPES[spec["dtype"]]
        tensor.ClearField("dims")
        tensor.dims.extend(spec["shape"])


def _set_warmup_shapes(config: mc.ModelConfig, specs: list[dict]) -> None:
    """Warmup requests take the bundle's input shapes, like the inputs (the tracked ones are the public
    configuration's)."""
    shapes = {spec["name"]: spec["shape"] for spec in specs}
    for warmup in config.model_warmup:
        for name, data in warmup.inputs.items():
            data.ClearField("dims")
            data.dims.extend(shapes[name])


def _to_cpu(config: mc.ModelConfig) -> None:
    config.ClearField("platform")
    config.backend = "python"
    config.ClearField("instance_group")
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    config.ClearField("model_warmup")
    config.ClearField("optimization")


def variant_files(manifest: dict, variant: str, force: bool = False) -> dict[str, str]:
    """Bundle-relative model file per network for `variant` (only the networks it replaces); refuses a
    variant the bundle lacks, or one that failed its quality gate unless `force`."""
    if variant not in PRECISIONS:
        raise RenderError(f"unknown variant {variant!r}; choose one of {', '.join(PRECISIONS)}")
    if variant == "fp32":
        return {}
    record = manifest.get("variants", {}).get(variant)
    if record is None:
        raise RenderError(f"the bundle has no {variant} variant; make it with export/quantize.py")
    if not record["passed"] and not force:
        raise RenderError(
            f"the {variant} variant failed its quality gate ({record['reason']}); --force serves it anyway"
        )
    return {network: entry["file"] for network, entry in record["networks"].items()}


def variant_plans(manifest: dict, network: str, variant: str) -> dict[str, str]:
    """Compute capability -> bundle-relative TensorRT plan of `network` built from `variant`."""
    plans = manifest.get("plans", {}).get(network, [])
    return {p["compute_capability"]: p["file"] for p in plans if p["variant"] == variant}


def render_repository(
    bundle_dir: Path,
    manifest: dict,
    dest: Path,
    target: str = "cpu",
    version: int = 1,
    source: Path = TRACKED_REPOSITORY,
    variant: str = "fp32",
    force: bool = False,
) -> list[str]:
    """Write the pipeline's ensembles and composing models into `dest` (which must not exist) with the
    bundle's files in version `version`; returns the model names (ensembles first). Written to a temp dir,
    then renamed."""
    if target not in TARGETS:
        raise RenderError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    files = variant_files(manifest, variant, force)
    if dest.exists():
        raise RenderError(f"repository directory already exists: {dest}")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ensembles = pipeline_ensembles(manifest)
        composing = [
            _render_ensemble(bundle_dir, manifest, tmp, target, version, source, ensemble, variant, files)
            for ensemble in ensembles
        ]
        names = list(dict.fromkeys([*ensembles, *(name for names in composing for name in names)]))
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


def _render_ensemble(
    bundle_dir: Path,
    manifest: dict,
    dest: Path,
    target: str,
    version: int,
    source: Path,
    pipeline: str,
    variant: str,
    files: dict[str, str],
) -> list[str]:
    """Write ensemble `pipeline` and those of its composing models not yet in `dest`; returns the
    composing model names."""
    ensemble = read_config(source / pipeline / "config.pbtxt")
    max_batch = manifest["max_batch_size"]
    tensors: dict[str, dict] = {}  # ensemble tensor name -> spec
    for step in ensemble.ensemble_scheduling.step:
        name = step.model_name
        model = manifest["models"].get(name)
        if model is None:
            raise RenderError(f"bundle {bundle_dir} has no model '{name}' that ensemble '{pipeline}' needs")
        specs = {s["name"]: s for s in model["inputs"] + model["outputs"]}
        for key, value in [*step.input_map.items(), *step.output_map.items()]:
            tensors[value] = specs[key]
        if (dest / name).exists():  # an earlier step or ensemble of the bundle uses the same model
            continue
        config = read_config(source / name / "config.pbtxt")
        _set_tensors(config.input, model["inputs"], name, "input")
        _set_tensors(config.output, model["outputs"], name, "output")
        _set_warmup_shapes(config, model["inputs"])
        config.max_batch_size = min(config.max_batch_size, max_batch)
        version_dir = dest / name / str(version)
        version_dir.mkdir(parents=True)
        onnx_file = bundle_dir / files.get(name, model["file"])
        if target == "cpu":
            _to_cpu(config)
            shutil.copyfile(onnx_file, version_dir / "model.onnx")
            (version_dir / "model.py").write_text(_RUNNER_SHIM)
        elif config.platform == "tensorrt_plan":
            plans = variant_plans(manifest, name, variant)
            if not plans:
                raise RenderError(
                    f"{name}: no TensorRT plan of its {variant} model in the bundle; "
                    "build one with export/build_plans.py on the GPU host"
                )
            # one plan per GPU architecture; Triton loads the one of the GPU it runs on
            for capability, plan in sorted(plans.items()):
                shutil.copyfile(bundle_dir / plan, version_dir / Path(plan).name)
                config.cc_model_filenames[capability] = Path(plan).name
        else:
            shutil.copyfile(onnx_file, version_dir / "model.onnx")
        write_config(config, dest / name / "config.pbtxt")
    _set_tensors(
        ensemble.input, [{**tensors[t.name], "name": t.name} for t in ensemble.input], pipeline, "input"
    )
    _set_tensors(
        ensemble.output, [{**tensors[t.name], "name": t.name} for t in ensemble.output], pipeline, "output"
    )
    ensemble.max_batch_size = min([ensemble.max_batch_size, max_batch])
    (dest / pipeline / str(version)).mkdir(parents=True)  # an ensemble needs a version dir too
    write_config(ensemble, dest / pipeline / "config.pbtxt")
    return list(dict.fromkeys(step.model_name for step in ensemble.ensemble_scheduling.step))
