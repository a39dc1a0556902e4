"""FP16 and INT8 Q/DQ variants of a bundle's networks: the machinery every pipeline's gate uses.

- FP16: onnxconverter-common's float16 conversion, inputs/outputs kept fp32. Normalization statistics,
  grid/flow math and argmax/softmax stay fp32 by design; more layers stay fp32 where measurement says so.
- INT8: ONNX Runtime static quantization in Q/DQ form, int8 symmetric activations and per-channel
  symmetric weights (what TensorRT needs), calibrated with min/max ranges on each network's real
  inputs (the pipeline's fp32 stages before it, run on calibration samples).
- Per-layer exclusions by measurement: every candidate layer gets a sensitivity (the signal-to-noise
  ratio of its own tensors in the lower precision, measured on the calibration set); the most sensitive
  layers go back to fp32 in growing steps until the pipeline's quality on the calibration set meets
  the variant's thresholds (or the exclusion budget is spent).

Each pipeline's `quantize` module supplies the samples, the quality measure and the gate
(`fashionserve.tryon.quantize`, `fashionserve.hair.quantize`, `fashionserve.catalogue.quantize`).
A bundle is only ever updated through `commit_variants` (files renamed into place, manifest last).
"""

import copy
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxconverter_common import float16
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.qdq_loss_debug import compute_weight_error, create_weight_matching
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fashionserve.bundle import read_manifest, write_manifest

VARIANTS = ("fp16", "int8")
DEFAULT_MIN_SSIM = {"fp16": 0.98, "int8": 0.95}
DEFAULT_MIN_PSNR = {"fp16": 30.0, "int8": 25.0}
DEFAULT_MAX_EXCLUDED_FRACTION = 0.25
PSNR_CAP_DB = 100.0  # PSNR of identical images is infinite; JSON has no infinity
SQNR_CAP_DB = 999.0
MEASURE_BUDGET_BYTES = 1 << 30  # intermediate tensors handed back per run while measuring sensitivity

# Kept in fp32 by design (FP16): normalization statistics, sampling/flow math, argmax and softmax;
# onnxconverter-common's own block list (ops without fp16 kernels) stays in too.
FP16_BLOCKED_OP_TYPES = (
    "InstanceNormalization",
    "BatchNormalization",
    "LayerNormalization",
    "GridSample",
    "ArgMax",
    "Softmax",
)
INT8_OP_TYPES = ("Conv",)  # TensorRT's int8 speed comes from convolutions; everything else stays float


class QuantizationError(Exception):
    """An expected failure (bad sample folder, unknown variant, ...): one line for the user."""


class GateFailure(QuantizationError):
    """A variant missed its quality thresholds (it is recorded in the manifest all the same)."""


def gate_failures(manifest: dict, variants: Iterable[str]) -> str:
    """One line naming the variants of `variants` that failed the gate, or '' when all passed."""
    records = manifest.get("variants", {})
    failed = [f"{v} ({records[v]['reason']})" for v in variants if v in records and not records[v]["passed"]]
    return "quality gate failed: " + ", ".join(failed) if failed else ""


@dataclass(frozen=True)
class Thresholds:
    """What a variant must reach against fp32 on the final images (means over the evaluation set)."""

    min_ssim: float
    min_psnr: float

    def failures(self, quality: dict) -> list[str]:
        """Why `quality` misses these thresholds (empty when it passes)."""
        reasons = []
        if quality["ssim_mean"] < self.min_ssim:
            reasons.append(f"SSIM {quality['ssim_mean']:.4f} < {self.min_ssim:g}")
        if quality["psnr_mean"] < self.min_psnr:
            reasons.append(f"PSNR {quality['psnr_mean']:.2f} dB < {self.min_psnr:g} dB")
        return reasons


def default_thresholds(variant: str) -> Thresholds:
    return Thresholds(DEFAULT_MIN_SSIM[variant], DEFAULT_MIN_PSNR[variant])


def variant_file(network: str, variant: str) -> str:
    """Bundle-relative path of a network's variant, next to its fp32 model.onnx."""
    return f"{network}/model.{variant}.onnx"


# ---------------------------------------------------------------------------------------------------
# The pipeline in ONNX Runtime


def open_session(path: Path | str, arena: bool = False) -> ort.InferenceSession:
    """A CPU session; without `arena` it hands memory back after each run (several models of 1024x768
    stay open at once here; timings want the arena, as served models have it)."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.log_severity_level = 3  # ORT's own warnings (e.g. about unused initializers) are not ours
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def image_quality(references: list[np.ndarray], images: list[np.ndarray]) -> dict[str, float]:
    """SSIM and PSNR of uint8 images against their fp32 references (mean and worst)."""
    pairs = list(zip(references, images, strict=True))
    ssim = [structural_similarity(r, i, channel_axis=-1, data_range=255) for r, i in pairs]
    psnr = [_psnr(r, i) for r, i in pairs]
    return {
        "ssim_mean": float(np.mean(ssim)),
        "ssim_min": float(np.min(ssim)),
        "psnr_mean": float(np.mean(psnr)),
        "psnr_min": float(np.min(psnr)),
    }


def _psnr(reference: np.ndarray, image: np.ndarray) -> float:
    if np.array_equal(reference, image):
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, float(peak_signal_noise_ratio(reference, image, data_range=255)))


# ---------------------------------------------------------------------------------------------------
# Building one variant of one network


def _finite_db(value: float) -> float:
    return float(max(-SQNR_CAP_DB, min(SQNR_CAP_DB, value)))


def _sqnr_db(signal: float, noise: float) -> float:
    if not math.isfinite(noise):
        return -SQNR_CAP_DB  # overflowed: the most sensitive there is
    if noise == 0.0:
        return SQNR_CAP_DB
    return _finite_db(10.0 * math.log10(max(signal, 1e-30) / noise))


def _float_outputs(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    return {
        v.name
        for v in [*inferred.graph.value_info, *inferred.graph.output]
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output}


def flow_math_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes computing a GridSample's sampling grid from the last convolution on (flow upsampling,
    scaling, accumulation): sub-pixel offsets that fp16 rounding would move."""
    producers = _producers(model)
    found: dict[str, None] = {}
    pending = [n.input[1] for n in model.graph.node if n.op_type == "GridSample"]
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.op_type == "Conv" or node.name in found:
            continue
        found[node.name] = None
        pending.extend(node.input)
    return list(found)


def _detach_graph_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of `model` where every graph output is renamed inside the graph and copied out by an
    Identity. The fp16 converter retypes a graph output written by a kept-fp32 node to fp16
    (keep_io_types then misses it: the try-on flow, read by other nodes too, or the face parser's
    logits, written by a blocked Resize); the Identity avoids that."""
    model = copy.deepcopy(model)
    del model.graph.value_info[:]  # the converter infers types afresh; stale ones would contradict it
    for output in model.graph.output:
        inner = output.name + "__inner"
        for node in model.graph.node:
            node.input[:] = [inner if name == output.name else name for name in node.input]
            node.output[:] = [inner if name == output.name else name for name in node.output]
        model.graph.node.append(onnx.helper.make_node("Identity", [inner], [output.name], name=inner))
    return model


def _split_shared_initializers(model: onnx.ModelProto, excluded_nodes: list[str]) -> None:
    """Give kept-fp32 nodes their own copy of every float initializer that converted nodes read too.
    The converter keeps an initializer fp32 when any kept-fp32 node reads it and does not cast it for
    its other readers, which then mix fp16 and fp32 (e.g. StyleGAN2's modulation biases, all ones at
    init, exported as one initializer read by every modulation Gemm)."""
    blocked_op_types = set(_fp16_blocked_op_types())
    excluded = set(excluded_nodes)

    def is_blocked(node: onnx.NodeProto) -> bool:
        return node.name in excluded or node.op_type in blocked_op_types

    floats = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    read_by_converted = {n for node in model.graph.node if not is_blocked(node) for n in node.input}
    copies: dict[str, str] = {}
    for node in model.graph.node:
        if not is_blocked(node):
            continue
        for index, name in enumerate(node.input):
            if name not in floats or name not in read_by_converted:
                continue
            if name not in copies:
                copy_proto = copy.deepcopy(floats[name])
                copy_proto.name = copies[name] = name + "__fp32"
                model.graph.initializer.append(copy_proto)
            node.input[index] = copies[name]


def _collapse_cast_round_trips(model: onnx.ModelProto) -> None:
    """Let every Cast-to-fp32 read the fp32 tensor directly where it only undoes a Cast-to-fp16 (through
    Identity nodes), then drop nodes nobody reads. The converter casts around each kept-fp32 node, so
    without this a tensor passed between two kept-fp32 nodes would still be rounded to fp16."""
    producers = _producers(model)
    for node in model.graph.node:
        if node.op_type != "Cast" or _cast_target(node) != onnx.TensorProto.FLOAT:
            continue
        source = producers.get(node.input[0])
        while source is not None and source.op_type == "Identity":
            source = producers.get(source.input[0])
        if (
            source is not None
            and source.op_type == "Cast"
            and _cast_target(source) == onnx.TensorProto.FLOAT16
        ):
            node.input[0] = source.input[0]  # the converter only casts float tensors to fp16
    _drop_unread_nodes(model)


def _cast_target(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _drop_unread_nodes(model: onnx.ModelProto) -> None:
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):  # the converter leaves the nodes topologically sorted
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))


def _fp16_blocked_op_types() -> list[str]:
    return sorted({*float16.DEFAULT_OP_BLOCK_LIST, *FP16_BLOCKED_OP_TYPES})


def convert_fp16(model: onnx.ModelProto, excluded_nodes: list[str], out_path: Path) -> None:
    """FP16 copy of `model` with fp32 inputs/outputs; blocked op types and `excluded_nodes` stay fp32."""
    # The converter retypes a Cast-to-fp32's output as fp16 but leaves its `to` (e.g. integer labels to
    # float for a nearest resize), so ONNX Runtime refuses the model: such Casts stay fp32, as written.
    casts_to_fp32 = [
        n.name for n in model.graph.node if n.op_type == "Cast" and _cast_target(n) == onnx.TensorProto.FLOAT
    ]
    kept = [*excluded_nodes, *(name for name in casts_to_fp32 if name not in excluded_nodes)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns once per tiny weight it rounds to its minimum (1e-7)
        detached = _detach_graph_outputs(model)
        _split_shared_initializers(detached, kept)
        converted = float16.convert_float_to_float16(
            detached,
            keep_io_types=True,
            op_block_list=_fp16_blocked_op_types(),
            node_block_list=kept,
        )
    _collapse_cast_round_trips(converted)
    onnx.save(converted, str(out_path))


class _FeedReader(CalibrationDataReader):
    """Calibration feeds, readable a range at a time (ONNX Runtime's strided min/max calibration)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._pending = iter(feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pending = iter(self._feeds[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._pending, None)


def quantize_int8(
    model_path: Path,
    feeds: list[dict[str, np.ndarray]],
    excluded_nodes: list[str],
    out_path: Path,
    cache: Path,
) -> None:
    """INT8 Q/DQ copy of the model at `model_path`: convolutions with per-channel symmetric int8 weights
    and symmetric int8 activations (zero point 0, as TensorRT requires), min/max calibrated on `feeds`.
    Calibration ranges are kept in `cache` so later calls with other exclusions skip calibration."""
    quantize_static(
        str(model_path),
        str(out_path),
        _FeedReader(feeds),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(INT8_OP_TYPES),
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded_nodes,
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            # bias stays float: TensorRT fuses a float bias; an int32 Q/DQ bias is not what it expects
            "QuantizeBias": False,
            # ranges of one sample at a time, merged: at 1024x768 one sample's tensors take gigabytes
            "CalibStridedMinMax": 1,
        },
        calibration_cache_path=str(cache),
    )


def _tensor_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes per sample of each float tensor whose shape inference knows (the batch dimension is 1)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    sizes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        sizes[value.name] = 4 * math.prod(d.dim_value if d.HasField("dim_value") else 1 for d in dims)
    return sizes


def _chunks(pairs: dict[str, tuple[str, str | None]], sizes: dict[str, int], budget: int) -> Iterator[dict]:
    """Split `pairs` so that the tensors one run must hand back stay within `budget` bytes per sample."""
    chunk: dict[str, tuple[str, str | None]] = {}
    used = 0
    for key, pair in pairs.items():
        cost = sum(sizes.get(name, 0) for name in pair if name is not None)
        if chunk and used + cost > budget:
            yield chunk
            chunk, used = {}, 0
        chunk[key] = pair
        used += cost
    if chunk:
        yield chunk


def _accumulate_sqnr(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    pairs: dict[str, tuple[str, str | None]],
    optimize: bool,
    budget: int = MEASURE_BUDGET_BYTES,
) -> dict[str, float]:
    """SQNR (dB) per key over all feeds, for pairs (signal tensor, noisy tensor); a noisy tensor None
    means the signal's own fp16 round trip. Runs the model once per chunk of tensors: at 1024x768 all
    intermediate tensors of one sample would not fit in memory at once."""
    signal = dict.fromkeys(pairs, 0.0)
    noise = dict.fromkeys(pairs, 0.0)
    for chunk in _chunks(pairs, _tensor_bytes(model), budget):
        names = sorted({n for pair in chunk.values() for n in pair if n is not None})
        session = _session_with_outputs(model, names, optimize)
        for feed in feeds:
            values = dict(zip(names, session.run(names, feed), strict=True))
            for key, (clean, noisy) in chunk.items():
                s, n = _signal_and_noise(values[clean], None if noisy is None else values[noisy])
                signal[key] += s
                noise[key] += n
        del session  # release its buffers before the next chunk's session
    return {key: _sqnr_db(signal[key], noise[key]) for key in pairs}


def _signal_and_noise(
    clean: np.ndarray, noisy: np.ndarray | None, block: int = 1 << 22
) -> tuple[float, float]:
    """Sum of squares of `clean` and of `clean - noisy` (noisy None: its fp16 round trip), in float64,
    a block at a time so a 1024x768 activation needs no full-size float64 copies."""
    flat = clean.reshape(-1)
    other = None if noisy is None else noisy.reshape(-1)
    signal = noise = 0.0
    for start in range(0, flat.size, block):
        x = flat[start : start + block].astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            y = x.astype(np.float16) if other is None else other[start : start + block]
            difference = x - y.astype(np.float64)
        signal += float(np.dot(x, x))
        noise += float(np.dot(difference, difference))
    return signal, noise


def _session_with_outputs(model: onnx.ModelProto, names: list[str], optimize: bool) -> ort.InferenceSession:
    """A session of `model` that also hands back the float tensors `names`."""
    model = copy.deepcopy(model)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    if not optimize:  # keep every Q/DQ node as written, so measured tensors are what the model computes
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False  # an arena would keep this run's peak until the session goes
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def fp16_sensitivity(
    model: onnx.ModelProto, candidates: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Per candidate node: SQNR (dB) of its float outputs rounded to fp16 (overflow gives the minimum)."""
    floats = _float_outputs(model)
    by_name = {n.name: n for n in model.graph.node}
    pairs = {}
    for name in candidates:
        outputs = [o for o in by_name[name].output if o in floats]
        for output in outputs:
            pairs[f"{name}\0{output}"] = (output, None)
    per_tensor = _accumulate_sqnr(model, feeds, pairs, optimize=True)
    return _min_per_node(per_tensor)


def int8_sensitivity(
    float_path: Path, qdq_path: Path, candidates: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Per candidate node: the lowest SQNR (dB) among its quantized input/output activations (before vs
    after their Q/DQ pair, measured in the Q/DQ model) and its quantized weight."""
    qdq = onnx.load(str(qdq_path))
    producers = _producers(qdq)
    # Q/DQ pairs on activations: (tensor before quantization, tensor after dequantization)
    activation_pairs = {}
    for node in qdq.graph.node:
        source = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if source is not None and source.op_type == "QuantizeLinear":
            activation_pairs[source.input[0]] = node.output[0]
    by_name = {n.name: n for n in onnx.load(str(float_path)).graph.node}
    pairs = {}
    for name in candidates:
        node = by_name[name]
        for tensor in (node.input[0], *node.output):
            if tensor in activation_pairs:
                pairs[f"{name}\0{tensor}"] = (tensor, activation_pairs[tensor])
    scores = _accumulate_sqnr(qdq, feeds, pairs, optimize=False)
    weights = compute_weight_error(create_weight_matching(str(float_path), str(qdq_path)))
    for name in candidates:
        weight = by_name[name].input[1]
        if weight in weights:
            scores[f"{name}\0{weight}"] = _finite_db(weights[weight])
    return _min_per_node(scores)


def _min_per_node(per_tensor: dict[str, float]) -> dict[str, float]:
    nodes: dict[str, float] = {}
    for key, value in per_tensor.items():
        node = key.split("\0", 1)[0]
        nodes[node] = min(nodes.get(node, SQNR_CAP_DB), value)
    return nodes


def exclusion_steps(candidates: int, max_fraction: float) -> list[int]:
    """How many of the most sensitive layers to exclude at each try: 0, 1, 2, 4, ... up to the budget."""
    budget = int(candidates * max_fraction)
    steps = [0]
    while steps[-1] < budget:
        steps.append(min(budget, max(1, steps[-1] * 2)))
    return steps


@dataclass
class NetworkVariant:
    """One built variant of one network (the file is in a work directory until committed)."""

    network: str
    variant: str
    path: Path
    record: dict = field(default_factory=dict)


def build_network_variant(
    network: str,
    variant: str,
    fp32_path: Path,
    feeds: list[dict[str, np.ndarray]],
    quality_of: Callable[[ort.InferenceSession], dict],
    thresholds: Thresholds,
    max_excluded_fraction: float,
    work_dir: Path,
    log: Callable[[str], None],
) -> NetworkVariant:
    """Build `variant` of one network: the first candidate (fewest layers kept fp32 by measurement) whose
    pipeline quality on the calibration set (`quality_of`) meets `thresholds`, else the best one.
    Sensitivity is measured only when the variant with no measured exclusions falls short."""
    model = onnx.load(str(fp32_path))
    out = work_dir / f"{network}.{variant}.onnx"
    cache = work_dir / f"{network}.calibration.json"

    if variant == "fp16":
        design = flow_math_nodes(model)
        blocked = set(_fp16_blocked_op_types())
        candidates = [n.name for n in model.graph.node if n.name not in design and n.op_type not in blocked]

        def build(excluded: list[str]) -> None:
            convert_fp16(model, design + excluded, out)

        def measure() -> dict[str, float]:
            return fp16_sensitivity(model, candidates, feeds)

        tool = f"onnxconverter-common {version('onnxconverter-common')} float16 (keep_io_types)"
        excluded_op_types = _fp16_blocked_op_types()
    elif variant == "int8":
        design = []
        candidates = [n.name for n in model.graph.node if n.op_type in INT8_OP_TYPES]

        def build(excluded: list[str]) -> None:
            quantize_int8(fp32_path, feeds, excluded, out, cache)

        def measure() -> dict[str, float]:
            return int8_sensitivity(fp32_path, out, candidates, feeds)

        tool = (
            f"onnxruntime {ort.__version__} quantize_static: QDQ, int8 symmetric activations, per-channel "
            f"symmetric int8 weights, min/max calibration, ops {list(INT8_OP_TYPES)}"
        )
        excluded_op_types = []
    else:
        raise QuantizationError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")

    started = time.monotonic()
    build([])
    quality = quality_of(open_session(out))
    search = [_search_step(0, quality, thresholds, log)]
    sensitivity: dict[str, float] = {}
    chosen = 0
    if thresholds.failures(quality):  # only then is it worth measuring which layers to keep fp32
        log(f"    sensitivity of {len(candidates)} layers on {len(feeds)} calibration samples")
        sensitivity = measure()
        ranked = sorted(candidates, key=lambda name: sensitivity.get(name, SQNR_CAP_DB))
        best = (quality["ssim_mean"], 0)  # (SSIM, excluded layers) of the best candidate so far
        for count in exclusion_steps(len(ranked), max_excluded_fraction)[1:]:
            build(ranked[:count])
            quality = quality_of(open_session(out))
            search.append(_search_step(count, quality, thresholds, log))
            if not thresholds.failures(quality):
                best = (quality["ssim_mean"], count)
                break
            best = max(best, (quality["ssim_mean"], count))
        chosen = best[1]
        if chosen != search[-1]["excluded_layers"]:  # none met the thresholds: keep the best one
            build(ranked[:chosen])
        excluded = ranked[:chosen]
    else:
        excluded = []
    record = {
        "file": variant_file(network, variant),
        "tool": tool,
        "fp32_op_types": excluded_op_types,
        "fp32_nodes_by_design": design,
        "fp32_nodes_by_measurement": [
            {"node": name, "sqnr_db": round(sensitivity.get(name, SQNR_CAP_DB), 2)} for name in excluded
        ],
        "candidate_layers": len(candidates),
        "sensitivity_measured": bool(sensitivity),
        "exclusion_search": search,
        "chosen_excluded_layers": chosen,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    return NetworkVariant(network, variant, out, record)


def _search_step(count: int, quality: dict, thresholds: Thresholds, log: Callable[[str], None]) -> dict:
    misses = thresholds.failures(quality)
    verdict = "; ".join(misses) if misses else "meets thresholds"
    log(f"    {count:3d} layers kept fp32: SSIM {quality['ssim_mean']:.4f}, {verdict}")
    return {"excluded_layers": count, **rounded(quality)}


def rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: float(f"{value:.6g}") for key, value in values.items()}


def commit_variants(bundle_dir: Path, files: dict[str, Path], variants: dict[str, dict]) -> dict:
    """Move built variant files into the bundle and record `variants` in its manifest, so that at every
    moment the manifest only names files that hold what it says: first a manifest without the variants
    being replaced (and without plans built from them), then the files (each a rename), then the
    manifest with the new records (written to a temp file and renamed)."""
    manifest = read_manifest(bundle_dir)
    kept = {k: v for k, v in manifest.get("variants", {}).items() if k not in variants}
    plans = {
        network: [p for p in entries if p.get("variant") not in variants]
        for network, entries in manifest.get("plans", {}).items()
    }
    if kept != manifest.get("variants", {}) or plans != manifest.get("plans", {}):
        write_manifest(bundle_dir, {**manifest, "variants": kept, "plans": plans})
    for relative, source in files.items():
        destination = bundle_dir / relative
        staged = destination.with_name(destination.name + ".partial")
        shutil.move(source, staged)  # a rename when `source` is on the bundle's file system
        staged.replace(destination)
    updated = {**manifest, "variants": {**kept, **variants}, "plans": plans}
    write_manifest(bundle_dir, updated)
    return updated


def silence_onnxruntime_quantization_logs() -> None:
    """quantize_static logs advice (pre-processing, ...) at warning level on the root logger."""
    logging.getLogger().setLevel(logging.ERROR)
