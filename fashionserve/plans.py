"""TensorRT plans for the `gpu` target, built on the GPU host from a bundle's ONNX files.

Precision lives in the ONNX file (fp32, or the fp16 / int8 Q/DQ variants of export/quantize.py): the
network is parsed strongly typed (TensorRT 10.x: the STRONGLY_TYPED flag; 11.x: always), and no
`--fp16/--int8` builder flag is ever set. A plan only runs on the GPU architecture and the TensorRT
version that built it, so its file name says both (`model.int8.sm90.trt10.13.3.9.plan`) and the manifest
lists one plan per (variant, compute capability); the rendered config maps each compute capability to
its file (`cc_model_filenames`).

This module imports neither torch nor onnxruntime: it runs in the `nvcr.io/nvidia/tensorrt` image.
"""

import ctypes
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fashionserve.repository import TRACKED_REPOSITORY, read_config, variant_files

HEAVY_NETWORKS = ("tryon_condition_generator", "tryon_image_generator")  # try-on's tensorrt_plan networks
MANIFEST = "manifest.json"
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


class PlanError(Exception):
    """An expected failure (no TensorRT, no GPU, a bad option, a build error): one line for the user."""


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "9.0"

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")


def plan_file_name(variant: str, gpu: Gpu, tensorrt_version: str) -> str:
    """File name of a plan: which ONNX variant, for which GPU architecture, by which TensorRT."""
    return f"model.{variant}.{gpu.sm}.trt{tensorrt_version}.plan"


def batch_profile(max_batch: int, opt_batch: int | None) -> tuple[int, int, int]:
    """(min, opt, max) batch of the optimization profile: 1..max_batch, opt defaulting to max."""
    if max_batch < 1:
        raise PlanError(f"the bundle's max batch size must be at least 1, got {max_batch}")
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise PlanError(
            f"--opt-batch must be between 1 and the bundle's max batch size {max_batch}, got {opt}"
        )
    return 1, opt, max_batch


def profile_shapes(inputs: list[dict], batch: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per input: (min, opt, max) full shapes; only the batch dimension varies."""
    return {spec["name"]: tuple((b, *spec["shape"]) for b in batch) for spec in inputs}


def network_flags(tensorrt_version: str, creation_flags: object) -> int:
    """`create_network` flags for a strongly typed network: TensorRT 11 has no other kind (and may lack
    the flag), 10.x needs STRONGLY_TYPED; older versions are refused."""
    major = int(tensorrt_version.split(".")[0])
    if major >= 11:
        return 0
    if major == 10:
        return 1 << int(creation_flags.STRONGLY_TYPED)
    raise PlanError(f"TensorRT {tensorrt_version} is too old: strongly typed networks need 10.x or later")


def record_plan(manifest: dict, network: str, entry: dict) -> dict:
    """`manifest` with `entry` listed under plans[network], replacing the plan of the same variant and
    compute capability (built by another TensorRT, or before a rebuild)."""
    plans = {k: list(v) for k, v in manifest.get("plans", {}).items()}
    kept = [
        p
        for p in plans.get(network, [])
        if (p["variant"], p["compute_capability"]) != (entry["variant"], entry["compute_capability"])
    ]
    plans[network] = [*kept, entry]
    return {**manifest, "plans": plans}


def require_tensorrt() -> str:
    """The installed TensorRT's version, or a PlanError saying where to run."""
    if importlib.util.find_spec("tensorrt") is None:
        raise PlanError(
            "TensorRT is not installed: run this in the nvcr.io/nvidia/tensorrt:<YY.MM>-py3 image "
            "of the Triton image's YY.MM, on the GPU host"
        )
    import tensorrt

    return tensorrt.__version__


def local_gpu(device: int = 0) -> Gpu:
    """Name and compute capability of a local NVIDIA GPU, read through the driver (libcuda)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise PlanError("no NVIDIA driver (libcuda.so.1) here: build plans on the GPU host") from None
    count = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        raise PlanError("no usable NVIDIA GPU here (the driver reports none): build plans on the GPU host")
    if not 0 <= device < count.value:
        raise PlanError(f"GPU {device} does not exist; this host has {count.value}")
    handle = ctypes.c_int()
    major, minor = ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGet(ctypes.byref(handle), device)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle)
    cuda.cuDeviceGetName(name, len(name), handle)
    return Gpu(name.value.decode(), f"{major.value}.{minor.value}")


def build_plan(onnx_path: Path, shapes: dict, workspace_gib: float) -> bytes:
    """Serialized TensorRT engine of a strongly typed network parsed from `onnx_path`, one profile."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt.__version__, trt.NetworkDefinitionCreationFlag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        reason = str(parser.get_error(0)) if parser.num_errors else "unknown parser error"
        raise PlanError(f"TensorRT cannot parse {onnx_path}: {reason.splitlines()[0]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (smallest, optimal, largest) in shapes.items():
        profile.set_shape(name, smallest, optimal, largest)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise PlanError(f"TensorRT could not build {onnx_path} (see its log above)")
    return bytes(plan)


def read_bundle_manifest(bundle_dir: Path) -> dict:
    """The bundle manifest, read without the export stack (no torch in the TensorRT image)."""
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise PlanError(f"not a bundle (no {MANIFEST}): {bundle_dir}")
    return json.loads(path.read_text())


def write_bundle_manifest(bundle_dir: Path, manifest: dict) -> None:
    """Replace the manifest atomically, like fashionserve.tryon.bundle.write_manifest (which needs torch)."""
    tmp = bundle_dir / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(bundle_dir / MANIFEST)


def plan_networks(manifest: dict, source: Path = TRACKED_REPOSITORY) -> list[str]:
    """The bundle's networks that the tracked gpu configs serve as TensorRT plans, in bundle order."""
    return [
        name
        for name in manifest["models"]
        if read_config(source / name / "config.pbtxt").platform == "tensorrt_plan"
    ]


def build_bundle_plans(
    bundle_dir: Path,
    variant: str = "fp32",
    force: bool = False,
    opt_batch: int | None = None,
    workspace_gib: float = 8.0,
    log: Callable[[str], None] = print,
) -> dict:
    """Build a plan of each heavy network (`plan_networks`) from its `variant` ONNX for the local GPU, write
    them into the bundle next to the ONNX and list them in the manifest; returns the new manifest."""
    tensorrt_version = require_tensorrt()
    gpu = local_gpu()
    manifest = read_bundle_manifest(bundle_dir)
    files = variant_files(manifest, variant, force)
    batch = batch_profile(manifest["max_batch_size"], opt_batch)
    log(f"TensorRT {tensorrt_version} on {gpu.name} (compute capability {gpu.compute_capability})")
    for network in plan_networks(manifest):
        onnx_file = files.get(network, manifest["models"][network]["file"])
        started = datetime.now(UTC)
        log(f"building {network} from {onnx_file}, batch {batch[0]}..{batch[2]} (opt {batch[1]})")
        shapes = profile_shapes(manifest["models"][network]["inputs"], batch)
        plan = build_plan(bundle_dir / onnx_file, shapes, workspace_gib)
        relative = f"{network}/{plan_file_name(variant, gpu, tensorrt_version)}"
        staged = bundle_dir / (relative + ".partial")
        staged.write_bytes(plan)
        staged.replace(bundle_dir / relative)
        entry = {
            "file": relative,
            "variant": variant,
            "onnx": onnx_file,
            "compute_capability": gpu.compute_capability,
            "gpu": gpu.name,
            "tensorrt_version": tensorrt_version,
            "batch_profile": dict(zip(("min", "opt", "max"), batch, strict=True)),
            "built": started.isoformat(timespec="seconds"),
        }
        manifest = record_plan(manifest, network, entry)
        write_bundle_manifest(bundle_dir, manifest)
        seconds = (datetime.now(UTC) - started).total_seconds()
        log(f"    {relative} ({len(plan) / 2**20:.1f} MiB) in {seconds:.0f}s")
    return manifest
