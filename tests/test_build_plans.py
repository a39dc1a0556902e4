"""TensorRT plan builder: profile, naming and flag logic without TensorRT; the build itself where it runs."""

import importlib.util
import shutil
from types import SimpleNamespace

import pytest

from fashionserve.plans import (
    HEAVY_NETWORKS,
    Gpu,
    PlanError,
    batch_profile,
    build_bundle_plans,
    local_gpu,
    network_flags,
    plan_file_name,
    profile_shapes,
    read_bundle_manifest,
    record_plan,
)
from fashionserve.repository import RenderError, read_config, render_repository
from tests.conftest import run_cli

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def has_gpu() -> bool:
    try:
        local_gpu()
    except PlanError:
        return False
    return True


def test_batch_profile_spans_one_to_the_bundle_max():
    assert batch_profile(4, None) == (1, 4, 4)
    assert batch_profile(4, 2) == (1, 2, 4)
    for bad in (0, 5):
        with pytest.raises(
            PlanError, match="--opt-batch must be between 1 and the bundle's max batch size 4"
        ):
            batch_profile(4, bad)


def test_profile_shapes_vary_only_the_batch(tryon_bundle):
    _, manifest = tryon_bundle
    shapes = profile_shapes(manifest["models"]["tryon_image_generator"]["inputs"], (1, 2, 4))
    assert shapes["parse"] == ((1, 7, 256, 192), (2, 7, 256, 192), (4, 7, 256, 192))
    assert list(shapes) == ["agnostic", "densepose", "warped_cloth", "parse"]


def test_plan_names_carry_variant_architecture_and_tensorrt_version():
    gpu = Gpu("NVIDIA H100 80GB HBM3", "9.0")
    assert plan_file_name("int8", gpu, "10.13.3.9") == "model.int8.sm90.trt10.13.3.9.plan"
    assert (
        plan_file_name("fp32", Gpu("NVIDIA L4", "8.9"), "11.4.0.106") == "model.fp32.sm89.trt11.4.0.106.plan"
    )


def test_networks_are_strongly_typed_on_10_and_11():
    flags = SimpleNamespace(STRONGLY_TYPED=1)  # the enum member's value in TensorRT 10
    assert network_flags("10.13.3.9", flags) == 1 << 1
    assert network_flags("11.4.0.106", SimpleNamespace()) == 0  # always strongly typed, flag may be gone
    with pytest.raises(PlanError, match="TensorRT 8.6.1 is too old"):
        network_flags("8.6.1", flags)


def test_a_rebuilt_plan_replaces_the_one_of_its_variant_and_architecture():
    def plan(variant: str, capability: str, version: str) -> dict:
        return {"variant": variant, "compute_capability": capability, "tensorrt_version": version}

    manifest = {
        "plans": {"tryon_image_generator": [plan("int8", "9.0", "10.13"), plan("int8", "8.9", "10.13")]}
    }
    updated = record_plan(manifest, "tryon_image_generator", plan("int8", "9.0", "10.14"))
    assert updated["plans"]["tryon_image_generator"] == [
        plan("int8", "8.9", "10.13"),
        plan("int8", "9.0", "10.14"),
    ]
    assert manifest["plans"]["tryon_image_generator"][0]["tensorrt_version"] == "10.13"  # input untouched
    assert record_plan({}, "n", plan("fp32", "9.0", "11.4"))["plans"] == {"n": [plan("fp32", "9.0", "11.4")]}


def test_gpu_target_maps_each_compute_capability_to_its_plan(tryon_bundle, tmp_path):
    bundle = tmp_path / "tryon"
    shutil.copytree(tryon_bundle[0], bundle)
    manifest = read_bundle_manifest(bundle)
    for network in HEAVY_NETWORKS:
        for gpu in (Gpu("NVIDIA H100", "9.0"), Gpu("NVIDIA L4", "8.9")):
            relative = f"{network}/{plan_file_name('fp32', gpu, '10.13.3.9')}"
            (bundle / relative).write_bytes(b"plan for " + gpu.sm.encode())
            entry = {"file": relative, "variant": "fp32", "compute_capability": gpu.compute_capability}
            manifest = record_plan(manifest, network, entry)
    render_repository(bundle, manifest, tmp_path / "gpu", target="gpu")
    config = read_config(tmp_path / "gpu" / "tryon_image_generator" / "config.pbtxt")
    assert config.platform == "tensorrt_plan"
    assert dict(config.cc_model_filenames) == {
        "8.9": "model.fp32.sm89.trt10.13.3.9.plan",
        "9.0": "model.fp32.sm90.trt10.13.3.9.plan",
    }
    version_dir = tmp_path / "gpu" / "tryon_image_generator" / "1"
    assert (version_dir / "model.fp32.sm90.trt10.13.3.9.plan").read_bytes() == b"plan for sm90"
    assert (tmp_path / "gpu" / "tryon_warp" / "1" / "model.onnx").is_file()  # light steps stay ONNX
    with pytest.raises(RenderError, match="the bundle has no int8 variant"):
        render_repository(bundle, manifest, tmp_path / "int8", target="gpu", variant="int8")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_cli_refuses_without_tensorrt_in_one_line(tryon_bundle):
    result = run_cli("export/build_plans.py", str(tryon_bundle[0]), "--variant", "int8")
    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: TensorRT is not installed: run this in the nvcr.io/nvidia/tensorrt"
    )
    assert result.stderr.count("\n") == 1


@pytest.mark.skipif(not HAS_TENSORRT or not has_gpu(), reason="needs TensorRT and an NVIDIA GPU")
def test_builds_strongly_typed_plans_for_the_local_gpu(tryon_bundle, tmp_path):
    bundle = tmp_path / "tryon"
    shutil.copytree(tryon_bundle[0], bundle)
    manifest = build_bundle_plans(bundle, "fp32", opt_batch=2, workspace_gib=2, log=lambda _: None)
    gpu = local_gpu()
    for network in HEAVY_NETWORKS:
        (entry,) = manifest["plans"][network]
        assert entry["compute_capability"] == gpu.compute_capability
        assert entry["batch_profile"] == {"min": 1, "opt": 2, "max": manifest["max_batch_size"]}
        assert (bundle / entry["file"]).stat().st_size > 0
    render_repository(bundle, manifest, tmp_path / "gpu", target="gpu")
