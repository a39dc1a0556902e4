"""FP16/INT8 variants of the tiny try-on and hair bundles: files, exclusions, the quality gate, serving a
variant."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from fashionserve.checkpoints import sha256_file
from fashionserve.client import TritonModelClient
from fashionserve.hair.bundle import EDIT, TRANSFER
from fashionserve.hair.bundle import STAGES as HAIR_STAGES
from fashionserve.hair.quantize import (
    EVALUATION_SEED,
    HairQuantizeOptions,
    final_stage,
    gate,
    onnx_stages,
    pipeline_images,
    portrait_samples,
    quantize_hair_bundle,
)
from fashionserve.hair.quantize import (
    NETWORKS as HAIR_NETWORKS,
)
from fashionserve.launcher import TritonServer
from fashionserve.onnx_export import tensor_specs
from fashionserve.plans import HEAVY_NETWORKS, plan_networks
from fashionserve.quantization import (
    Thresholds,
    build_network_variant,
    convert_fp16,
    default_thresholds,
    exclusion_steps,
    flow_math_nodes,
    image_quality,
)
from fashionserve.repository import RenderError, render_repository
from fashionserve.tryon.bundle import STAGES, read_manifest, write_manifest
from fashionserve.tryon.quantize import (
    OnnxPipeline,
    QuantizeOptions,
    evaluate_variant,
    final_image,
    load_samples,
    quantize_bundle,
)
from tests.conftest import HAIR_CONFIG, TEST_CONFIG, run_cli

SIZE = (TEST_CONFIG.height, TEST_CONFIG.width)


def copy_bundle(source: Path, dest: Path) -> Path:
    """The session bundle is shared: every test that writes works on its own copy."""
    shutil.copytree(source, dest)
    return dest


@pytest.fixture(scope="module")
def quantized(tryon_bundle, tmp_path_factory) -> tuple[Path, dict]:
    bundle = copy_bundle(tryon_bundle[0], tmp_path_factory.mktemp("quantized") / "tryon")
    options = QuantizeOptions(calibration_samples=2, eval_samples=2)
    manifest = quantize_bundle(bundle, options, log=lambda _: None)
    return bundle, manifest


@pytest.fixture(scope="module")
def evaluation(quantized) -> tuple[OnnxPipeline, object, list[dict]]:
    """fp32 ONNX Runtime pipeline, held-out drawn samples and their fp32 runs."""
    bundle, manifest = quantized
    pipeline = OnnxPipeline.from_bundle(bundle, manifest)
    samples = load_samples(None, *SIZE, count=2, offset=8)
    return pipeline, samples, [pipeline.run(sample) for sample in samples.inputs]


def test_variants_sit_next_to_fp32_with_fp32_inputs_and_outputs(quantized):
    bundle, manifest = quantized
    assert read_manifest(bundle) == manifest
    assert not list(bundle.rglob("*.partial"))  # nothing half-written left behind
    for variant in ("fp16", "int8"):
        record = manifest["variants"][variant]
        assert record["passed"], record["reason"]
        assert record["weights"] == "random-init"
        assert record["evaluation"]["overlaps_calibration"] is False
        assert set(record["quality"]) == {"ssim_mean", "ssim_min", "psnr_mean", "psnr_min"}
        for network in HEAVY_NETWORKS:
            entry = record["networks"][network]
            path = bundle / entry["file"]
            assert entry["file"] == f"{network}/model.{variant}.onnx"
            assert entry["sha256"] == sha256_file(path)
            assert tensor_specs(path) == tensor_specs(bundle / network / "model.onnx")
            assert set(entry["max_abs_error"]) == set(next(s for s in STAGES if s.name == network).outputs)
            assert all(0 <= e < 1 for e in entry["mean_abs_error"].values())


def test_int8_is_symmetric_per_channel_qdq(quantized):
    bundle, _ = quantized
    model = onnx.load(str(bundle / "tryon_image_generator" / "model.int8.onnx"))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dequantize and any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    per_channel = 0
    for node in dequantize:
        zero_point = initializers[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any()  # symmetric: TensorRT needs zero 0
        per_channel += zero_point.size > 1
    assert per_channel == sum(n.op_type == "Conv" for n in model.graph.node)  # one per-channel weight each


def test_fp16_keeps_flow_math_and_normalization_fp32(quantized):
    bundle, manifest = quantized
    fp32 = onnx.load(str(bundle / "tryon_condition_generator" / "model.onnx"))
    fp16 = onnx.load(str(bundle / "tryon_condition_generator" / "model.fp16.onnx"))
    flow_nodes = flow_math_nodes(fp32)
    assert any(n.op_type == "Resize" for n in fp32.graph.node if n.name in flow_nodes)  # flow upsampling
    record = manifest["variants"]["fp16"]["networks"]["tryon_condition_generator"]
    assert record["fp32_nodes_by_design"] == flow_nodes
    assert "InstanceNormalization" in record["fp32_op_types"] and "GridSample" in record["fp32_op_types"]
    inferred = onnx.shape_inference.infer_shapes(fp16)
    types = {
        v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]
    }
    grid_inputs = [n.input[1] for n in fp16.graph.node if n.op_type == "GridSample"]
    assert grid_inputs and all(types[name] == onnx.TensorProto.FLOAT for name in grid_inputs)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer)


def test_gate_passes_the_variant_and_fails_it_with_perturbed_weights(quantized, evaluation, tmp_path):
    bundle, manifest = quantized
    pipeline, samples, runs = evaluation
    files = {n: bundle / manifest["variants"]["fp16"]["networks"][n]["file"] for n in HEAVY_NETWORKS}
    thresholds = default_thresholds("fp16")
    assert evaluate_variant(pipeline, files, samples, runs, thresholds)["passed"]

    model = onnx.load(str(files["tryon_image_generator"]))
    rng = np.random.default_rng(0)
    for initializer in model.graph.initializer:
        weights = numpy_helper.to_array(initializer)
        if weights.dtype == np.float16 and weights.ndim == 4:  # convolution kernels
            noise = rng.normal(0.0, 0.3 * float(np.abs(weights).mean()), weights.shape)
            initializer.CopyFrom(
                numpy_helper.from_array((weights + noise).astype(np.float16), initializer.name)
            )
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    result = evaluate_variant(pipeline, {**files, "tryon_image_generator": broken}, samples, runs, thresholds)
    assert not result["passed"]
    assert result["reason"].startswith("SSIM")
    assert result["network_errors"]["tryon_image_generator"]["max_abs_error"]["image"] > 0.1


def test_measured_exclusions_keep_the_most_sensitive_layers_fp32(quantized, evaluation, tmp_path):
    bundle, manifest = quantized
    pipeline, samples, runs = evaluation
    network = "tryon_image_generator"
    inputs = pipeline.sessions[network].get_inputs()
    feeds = [{i.name: t.numpy() for i, t in zip(inputs, run[network][0], strict=True)} for run in runs]
    references = [final_image(run) for run in runs]

    def quality_of(session) -> dict:
        return image_quality(
            references, [final_image(pipeline.swapped(network, session).run(s)) for s in samples.inputs]
        )

    unreachable = Thresholds(min_ssim=1.0, min_psnr=100.0)
    built = build_network_variant(
        network,
        "int8",
        bundle / network / "model.onnx",
        feeds,
        quality_of,
        unreachable,
        0.05,
        tmp_path,
        lambda _: None,
    )
    record = built.record
    assert (
        [s["excluded_layers"] for s in record["exclusion_search"]]
        == exclusion_steps(88, 0.05)
        == [0, 1, 2, 4]
    )
    kept = record["fp32_nodes_by_measurement"]
    assert len(kept) == record["chosen_excluded_layers"] > 0
    assert [k["sqnr_db"] for k in kept] == sorted(k["sqnr_db"] for k in kept)  # least robust first
    model = onnx.load(str(built.path))
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "Conv":
            quantized_input = producers[node.input[0]].op_type == "DequantizeLinear"
            assert quantized_input == (node.name not in {k["node"] for k in kept}), node.name


def test_exclusion_steps_double_up_to_the_budget():
    assert exclusion_steps(100, 0.25) == [0, 1, 2, 4, 8, 16, 25]
    assert exclusion_steps(3, 0.25) == [0]


def test_fp16_excluded_gemm_sharing_its_bias_with_converted_gemms_loads_and_stays_fp32(tmp_path):
    """Like StyleGAN2's modulation Gemms, which all read one bias initializer: excluding one of them
    must give it an fp32 bias while the others read fp16, or ONNX Runtime refuses the model."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    gemms = [
        onnx.helper.make_node("Gemm", ["x", f"w{i}", "bias"], [f"y{i}"], name=f"gemm{i}", transB=1)
        for i in range(3)
    ]
    total = onnx.helper.make_node("Sum", ["y0", "y1", "y2"], ["out"], name="sum")
    graph = onnx.helper.make_graph(
        [*gemms, total],
        "shared_bias",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [2, 4])],
        [*(weight(f"w{i}", 4, 4) for i in range(3)), weight("bias", 4)],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path = tmp_path / "fp16.onnx"
    convert_fp16(model, ["gemm0"], path)

    converted = onnx.load(str(path))
    types = {i.name: i.data_type for i in converted.graph.initializer}
    readers = {node.name: node for node in converted.graph.node}
    assert types[readers["gemm0"].input[2]] == onnx.TensorProto.FLOAT
    assert {types[readers[f"gemm{i}"].input[2]] for i in (1, 2)} == {onnx.TensorProto.FLOAT16}
    x = rng.standard_normal((2, 4)).astype(np.float32)
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fp16 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,), (actual,) = reference.run(None, {"x": x}), fp16.run(None, {"x": x})
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-2, atol=1e-2)


def test_fp16_keeps_a_cast_to_float_of_integer_labels_loadable(tmp_path):
    """Like the hair label maps (int64) cast to float for a nearest resize: the converter retypes the
    Cast's output to fp16 but leaves its `to`, and ONNX Runtime would refuse the model."""
    cast = onnx.helper.make_node("Cast", ["labels"], ["labels_float"], name="cast", to=onnx.TensorProto.FLOAT)
    scale = onnx.helper.make_node("Mul", ["labels_float", "weight"], ["out"], name="mul")
    graph = onnx.helper.make_graph(
        [cast, scale],
        "labels",
        [onnx.helper.make_tensor_value_info("labels", onnx.TensorProto.INT64, [2, 3])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.full((3,), 0.5, np.float32), "weight")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "fp16.onnx"
    convert_fp16(model, [], path)
    labels = np.arange(6).reshape(2, 3)
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"labels": labels})
    np.testing.assert_array_equal(out, labels * 0.5)


def test_samples_from_a_dataset_folder_wrap_round_its_pairs(samples_dir):
    calibration = load_samples(samples_dir, *SIZE, count=3)
    assert calibration.source == str(samples_dir)
    assert calibration.names[0] == calibration.names[2]  # the folder has 2 pairs
    assert calibration.inputs[0]["cloth"].shape == (*SIZE, 3)
    with pytest.raises(Exception, match="the bundle expects 512x384"):
        load_samples(samples_dir, 512, 384, count=1)


def test_render_serves_a_variant_and_refuses_a_failed_one(quantized, tmp_path):
    bundle, manifest = quantized
    render_repository(bundle, manifest, tmp_path / "int8", target="cpu", variant="int8")
    for stage in STAGES:
        served = (tmp_path / "int8" / stage.name / "1" / "model.onnx").read_bytes()
        expected = "model.int8.onnx" if stage.name in HEAVY_NETWORKS else "model.onnx"
        assert served == (bundle / stage.name / expected).read_bytes(), stage.name

    failed = json.loads(json.dumps(manifest))
    failed["variants"]["int8"].update(passed=False, reason="SSIM 0.9 < 0.95")
    with pytest.raises(RenderError, match=r"int8 variant failed its quality gate \(SSIM 0.9 < 0.95\)"):
        render_repository(bundle, failed, tmp_path / "refused", target="cpu", variant="int8")
    assert not (tmp_path / "refused").exists()
    render_repository(bundle, failed, tmp_path / "forced", target="cpu", variant="int8", force=True)
    del failed["variants"]["int8"]
    with pytest.raises(RenderError, match="no int8 variant"):
        render_repository(bundle, failed, tmp_path / "missing", target="cpu", variant="int8")


def test_int8_served_by_triton_is_close_to_fp32(quantized, evaluation, tmp_path):
    bundle, manifest = quantized
    _, samples, runs = evaluation
    repository = tmp_path / "repository"
    render_repository(bundle, manifest, repository, target="cpu", variant="int8")
    batch = {name: np.stack([s[name] for s in samples.inputs]) for name in STAGES[0].inputs}
    with TritonServer(repository=repository) as server:
        client = TritonModelClient(server.grpc_url, "tryon", "grpc")
        served = client.infer(batch)["tryon_image"]
        client.close()
    quality = image_quality([final_image(run) for run in runs], list(served))
    assert quality["ssim_mean"] >= default_thresholds("int8").min_ssim, quality
    assert not np.array_equal(served[0], final_image(runs[0]))  # it is the int8 network that served


def test_cli_records_a_failed_gate_and_exits_2_with_one_line(tryon_bundle, tmp_path):
    bundle = copy_bundle(tryon_bundle[0], tmp_path / "tryon")
    manifest = read_manifest(bundle)
    write_manifest(bundle, {**manifest, "note": "kept"})
    result = run_cli(
        "export/quantize.py", str(bundle), "--variants", "fp16", "--calibration-samples", "1",
        "--eval-samples", "1", "--min-ssim-fp16", "1.01", "--max-excluded-fraction", "0",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: quality gate failed: fp16 (SSIM")
    assert "[fp16] tryon_image_generator" in result.stdout  # progress is shown
    recorded = read_manifest(bundle)
    assert recorded["note"] == "kept" and recorded["variants"]["fp16"]["passed"] is False
    assert (bundle / "tryon_image_generator" / "model.fp16.onnx").is_file()


def test_cli_refuses_a_missing_calibration_folder(tryon_bundle, tmp_path):
    bundle = copy_bundle(tryon_bundle[0], tmp_path / "tryon")
    result = run_cli("export/quantize.py", str(bundle), "--calibration-dir", str(tmp_path / "none"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: missing pairs file") and result.stderr.count("\n") == 1
    result = run_cli("export/quantize.py", str(bundle), "--max-swd-int8", "5")  # a generator option
    assert result.returncode == 2
    assert result.stderr == f"error: --max-swd-int8 does not apply to a tryon bundle ({bundle})\n"


def perturbed(model_path: Path, dest: Path, scale: float = 0.3) -> Path:
    """A copy of an ONNX file with noise (`scale` times each tensor's mean magnitude) on every weight
    matrix and kernel: a variant gone wrong."""
    model = onnx.load(str(model_path))
    rng = np.random.default_rng(0)
    for initializer in model.graph.initializer:
        weights = numpy_helper.to_array(initializer)
        if weights.dtype in (np.float16, np.float32) and weights.ndim >= 2:
            noise = rng.normal(0.0, scale * float(np.abs(weights).mean()), weights.shape)
            initializer.CopyFrom(
                numpy_helper.from_array((weights + noise).astype(weights.dtype), initializer.name)
            )
    onnx.save(model, str(dest))
    return dest


# Each network's variants cost a whole-pipeline run or more (see fashionserve/hair/quantize.py): the test
# quantizes one network of each kind, used by both ensembles (e4e, the generator) or by the transfer only.
HAIR_TEST_NETWORKS = ("hair_encoder", "hair_generator", "hair_final_synthesis")


@pytest.fixture(scope="module")
def hair_quantized(hair_bundle, tmp_path_factory) -> tuple[Path, dict]:
    bundle = copy_bundle(hair_bundle[0], tmp_path_factory.mktemp("quantized") / "hair")
    options = HairQuantizeOptions(calibration_samples=2, eval_samples=2, networks=HAIR_TEST_NETWORKS)
    return bundle, quantize_hair_bundle(bundle, options, log=lambda _: None)


def test_hair_variants_cover_the_tensorrt_networks_and_the_gate_reads_each_ensembles_image(hair_bundle):
    assert list(HAIR_NETWORKS) == plan_networks(hair_bundle[1])
    assert final_stage(TRANSFER) == "hair_final_synthesis" and final_stage(EDIT) == "hair_composite"


def test_hair_variants_replace_the_heavy_networks_with_fp32_inputs_and_outputs(hair_quantized):
    bundle, manifest = hair_quantized
    assert read_manifest(bundle) == manifest
    assert not list(bundle.rglob("*.partial"))
    for variant in ("fp16", "int8"):
        record = manifest["variants"][variant]
        assert record["passed"], record["reason"]
        assert record["weights"] == "random-init" and record["evaluation"]["samples"] == 2
        assert list(record["networks"]) == list(HAIR_TEST_NETWORKS)
        for network, entry in record["networks"].items():
            path = bundle / entry["file"]
            assert entry["file"] == f"{network}/model.{variant}.onnx" and entry["sha256"] == sha256_file(path)
            assert tensor_specs(path) == tensor_specs(bundle / network / "model.onnx")
            assert entry["chosen_excluded_layers"] == 0  # every variant met its threshold unaided


@pytest.mark.parametrize("ensemble, network", [(TRANSFER, "hair_final_synthesis"), (EDIT, "hair_generator")])
def test_hair_gate_passes_the_variant_and_fails_it_with_perturbed_weights(
    hair_quantized, tmp_path, ensemble, network
):
    """On each ensemble's images alone, a broken network fails the gate: the last synthesis through the
    transfer's images, the generator through the edit's. (The random-init transfer images hardly depend
    on e4e or the generator: broken, they still pass; a trained model's would not.)"""
    bundle, manifest = hair_quantized
    files = {n: bundle / e["file"] for n, e in manifest["variants"]["fp16"]["networks"].items()}
    samples = [s for s in portrait_samples(HAIR_CONFIG, 4, EVALUATION_SEED) if s[0] == ensemble]
    references = pipeline_images(onnx_stages(bundle, manifest), samples)
    thresholds = default_thresholds("fp16")
    quality, failures = gate(bundle, manifest, files, samples, references, thresholds)
    assert not failures and quality["ssim_mean"] < 1.0, quality  # the fp16 networks ran

    broken = {**files, network: perturbed(files[network], tmp_path / "broken.onnx")}
    quality, failures = gate(bundle, manifest, broken, samples, references, thresholds)
    assert failures and failures[0].startswith("SSIM"), quality


def test_hair_render_serves_the_variant_networks(hair_quantized, tmp_path):
    bundle, manifest = hair_quantized
    render_repository(bundle, manifest, tmp_path / "int8", target="cpu", variant="int8")
    for stage in HAIR_STAGES:
        served = (tmp_path / "int8" / stage.name / "1" / "model.onnx").read_bytes()
        expected = "model.int8.onnx" if stage.name in HAIR_TEST_NETWORKS else "model.onnx"
        assert served == (bundle / stage.name / expected).read_bytes(), stage.name


def test_hair_cli_refuses_the_dataset_options(hair_bundle):
    result = run_cli("export/quantize.py", str(hair_bundle[0]), "--calibration-dir", "data/viton-hd")
    assert result.returncode == 2
    assert result.stderr == f"error: --calibration-dir does not apply to a hair bundle ({hair_bundle[0]})\n"
