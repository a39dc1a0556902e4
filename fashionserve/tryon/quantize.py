"""Try-on's quantization gate: FP16 and INT8 variants of the two heavy networks (condition and image
generator), judged on the final try-on image.

The variants are built by the shared machinery (`fashionserve.quantization`). Quality gate: the whole
pipeline (the bundle's five stage files chained in ONNX Runtime with the tracked ensemble wiring) runs
in fp32 and with the variant swapped in, on an evaluation set of VITON-HD-layout pairs (a folder, or the
drawn sample set); SSIM and PSNR of the final uint8 images and each network's max/mean abs error go
into the manifest.
"""

import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fashionserve.checkpoints import sha256_file
from fashionserve.onnx_export import run_onnx
from fashionserve.plans import HEAVY_NETWORKS
from fashionserve.quantization import (
    DEFAULT_MAX_EXCLUDED_FRACTION,
    VARIANTS,
    NetworkVariant,
    QuantizationError,
    Thresholds,
    build_network_variant,
    commit_variants,
    default_thresholds,
    image_quality,
    open_session,
    rounded,
)
from fashionserve.tryon.bundle import STAGES, read_manifest, stage_inputs
from fashionserve.tryon.dataset import PAIRS_FILE, load_tryon_inputs, read_pairs
from fashionserve.tryon.samples import write_sample_set

_DRAWN_PAIRS_PER_SEED = 4  # the drawn set has 2 persons x 2 garments

# ---------------------------------------------------------------------------------------------------
# Samples


@dataclass(frozen=True)
class SampleSet:
    """Client inputs (uint8, no batch dimension) of some try-on pairs, and where they came from."""

    source: str
    names: list[str]
    inputs: list[dict[str, np.ndarray]]


def load_samples(
    dataroot: Path | None, height: int, width: int, count: int, offset: int = 0, split: str = "test"
) -> SampleSet:
    """`count` pairs starting at pair `offset`: from the pairs file of a VITON-HD-layout folder, or
    (dataroot None) from the drawn sample set, 4 pairs per seed. The images must be height x width."""
    if count < 1:
        raise QuantizationError(f"sample count must be at least 1, got {count}")
    if dataroot is None:
        return _drawn_samples(height, width, count, offset)
    pairs = read_pairs(dataroot / PAIRS_FILE.format(split=split))
    if not pairs:
        raise QuantizationError(f"{dataroot}: the pairs file lists no pairs")
    chosen = [pairs[(offset + i) % len(pairs)] for i in range(count)]  # wraps round a short list
    inputs = []
    for person, cloth in chosen:
        sample = load_tryon_inputs(dataroot, person, cloth, split=split)
        size = sample["cloth"].shape[:2]
        if size != (height, width):
            raise QuantizationError(
                f"{dataroot}: pair {person} {cloth} is {size[0]}x{size[1]}, "
                f"the bundle expects {height}x{width}"
            )
        inputs.append(sample)
    return SampleSet(str(dataroot), [f"{p} {c}" for p, c in chosen], inputs)


def _drawn_samples(height: int, width: int, count: int, offset: int) -> SampleSet:
    names, inputs = [], []
    with tempfile.TemporaryDirectory(prefix="fashionserve-samples-") as tmp:
        for index in range(offset, offset + count):
            seed, combination = divmod(index, _DRAWN_PAIRS_PER_SEED)
            root = Path(tmp) / f"seed{seed}"
            if not root.exists():
                write_sample_set(root, height=height, width=width, seed=seed)
            persons = sorted({p for p, _ in read_pairs(root / PAIRS_FILE.format(split="test"))})
            person, cloth = persons[combination // 2], persons[combination % 2]
            inputs.append(load_tryon_inputs(root, person, cloth))
            names.append(f"drawn seed {seed}: {person} {cloth}")
    return SampleSet("drawn samples", names, inputs)


def _run_stage(session: ort.InferenceSession, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(output) for output in run_onnx(session, args))


class OnnxPipeline:
    """The bundle's stage files as ONNX Runtime sessions. `stages[name](*tensors)` runs one stage, so
    `fashionserve.tryon.bundle.stage_inputs` chains them with the tracked ensemble wiring."""

    def __init__(self, sessions: dict[str, ort.InferenceSession]):
        self.sessions = sessions
        self.stages = {name: partial(_run_stage, session) for name, session in sessions.items()}

    @classmethod
    def from_bundle(cls, bundle_dir: Path, manifest: dict, arena: bool = False) -> "OnnxPipeline":
        files = {s.name: bundle_dir / manifest["models"][s.name]["file"] for s in STAGES}
        return cls({name: open_session(path, arena) for name, path in files.items()})

    def swapped(self, network: str, session: ort.InferenceSession) -> "OnnxPipeline":
        """The same pipeline with one network replaced."""
        return OnnxPipeline({**self.sessions, network: session})

    def run(self, sample: dict[str, np.ndarray]) -> dict[str, tuple]:
        """Every stage's (inputs, outputs) for one sample (batch of one)."""
        args = tuple(torch.from_numpy(sample[name][None]) for name in STAGES[0].inputs)
        return stage_inputs(self, args)


def final_image(run: dict[str, tuple]) -> np.ndarray:
    """The uint8 try-on image (H, W, 3) of a one-sample run."""
    return run[STAGES[-1].name][1][0][0].numpy()


def pipeline_quality(pipeline: OnnxPipeline, samples: SampleSet, references: list[np.ndarray]) -> dict:
    """Quality of `pipeline`'s final images against the fp32 references of the same samples."""
    return image_quality(references, [final_image(pipeline.run(sample)) for sample in samples.inputs])


def network_errors(session: ort.InferenceSession, network: str, reference_runs: list[dict]) -> dict:
    """Max and mean abs error of a variant network fed the fp32 pipeline's inputs, per output."""
    outputs = next(s for s in STAGES if s.name == network).outputs
    worst: dict[str, float] = dict.fromkeys(outputs, 0.0)
    total: dict[str, float] = dict.fromkeys(outputs, 0.0)
    count: dict[str, int] = dict.fromkeys(outputs, 0)
    for run in reference_runs:
        args, expected = run[network]
        for name, reference, actual in zip(outputs, expected, run_onnx(session, args), strict=True):
            error = np.abs(reference.numpy().astype(np.float64) - actual.astype(np.float64))
            worst[name] = max(worst[name], float(error.max(initial=0.0)))
            total[name] += float(error.sum())
            count[name] += error.size
    return {
        "max_abs_error": worst,
        "mean_abs_error": {name: total[name] / max(count[name], 1) for name in outputs},
    }


# ---------------------------------------------------------------------------------------------------
# Whole bundle


@dataclass(frozen=True)
class QuantizeOptions:
    variants: tuple[str, ...] = VARIANTS
    calibration_dir: Path | None = None  # None: the drawn sample set
    calibration_samples: int = 8
    eval_dir: Path | None = None  # None: same source as calibration, the pairs after the calibration ones
    eval_samples: int = 4
    thresholds: dict[str, Thresholds] = field(
        default_factory=lambda: {v: default_thresholds(v) for v in VARIANTS}
    )
    max_excluded_fraction: float = DEFAULT_MAX_EXCLUDED_FRACTION


def _network_feeds(
    runs: list[dict], network: str, session: ort.InferenceSession
) -> list[dict[str, np.ndarray]]:
    names = [i.name for i in session.get_inputs()]
    return [{n: t.numpy() for n, t in zip(names, run[network][0], strict=True)} for run in runs]


def evaluate_variant(
    pipeline: OnnxPipeline,
    files: dict[str, Path],
    samples: SampleSet,
    reference_runs: list[dict],
    thresholds: Thresholds,
) -> dict:
    """The quality gate for one variant: the pipeline with every network in `files` swapped in against
    the fp32 runs of the same samples. Returns the record stored under manifest['variants'][variant]."""
    sessions = {network: open_session(path) for network, path in files.items()}
    swapped = pipeline
    for network, session in sessions.items():
        swapped = swapped.swapped(network, session)
    quality = pipeline_quality(swapped, samples, [final_image(run) for run in reference_runs])
    misses = thresholds.failures(quality)
    return {
        "passed": not misses,
        "reason": "; ".join(misses),
        "thresholds": {"min_ssim": thresholds.min_ssim, "min_psnr": thresholds.min_psnr},
        "quality": rounded(quality),
        "network_errors": {
            network: {k: rounded(v) for k, v in network_errors(session, network, reference_runs).items()}
            for network, session in sessions.items()
        },
    }


@dataclass
class _References:
    """fp32 runs of the calibration and evaluation samples, shared by every variant."""

    pipeline: OnnxPipeline
    calibration: SampleSet
    evaluation: SampleSet
    calibration_runs: list[dict]
    evaluation_runs: list[dict]

    def calibration_quality(self, network: str, session: ort.InferenceSession) -> dict:
        """Final-image quality on the calibration set with one network swapped."""
        images = [final_image(run) for run in self.calibration_runs]
        return pipeline_quality(self.pipeline.swapped(network, session), self.calibration, images)


def _references(bundle_dir: Path, manifest: dict, options: QuantizeOptions, log: Callable) -> _References:
    height, width = manifest["config"]["height"], manifest["config"]["width"]
    calibration = load_samples(options.calibration_dir, height, width, options.calibration_samples)
    eval_offset = options.calibration_samples if options.eval_dir is None else 0
    eval_dir = options.eval_dir or options.calibration_dir
    evaluation = load_samples(eval_dir, height, width, options.eval_samples, eval_offset)
    overlap = set(calibration.names) & set(evaluation.names)
    if overlap:
        log(f"note: {len(overlap)} evaluation pairs are calibration pairs too (the folder has too few)")
    pipeline = OnnxPipeline.from_bundle(bundle_dir, manifest)
    log(f"fp32 pipeline on {len(calibration.names)} calibration, {len(evaluation.names)} evaluation samples")
    return _References(
        pipeline,
        calibration,
        evaluation,
        [pipeline.run(sample) for sample in _progress(calibration.inputs, "calibration", log)],
        [pipeline.run(sample) for sample in _progress(evaluation.inputs, "evaluation", log)],
    )


def _build_variant(
    variant: str,
    bundle_dir: Path,
    manifest: dict,
    options: QuantizeOptions,
    references: _References,
    work_dir: Path,
    log: Callable[[str], None],
) -> tuple[dict, list[NetworkVariant]]:
    """Build and gate one variant; returns its manifest record and the built files."""
    thresholds = options.thresholds[variant]
    built = []
    for network in HEAVY_NETWORKS:
        log(f"[{variant}] {network}")
        built.append(
            build_network_variant(
                network,
                variant,
                bundle_dir / manifest["models"][network]["file"],
                _network_feeds(references.calibration_runs, network, references.pipeline.sessions[network]),
                partial(references.calibration_quality, network),
                thresholds,
                options.max_excluded_fraction,
                work_dir,
                log,
            )
        )
    log(f"[{variant}] quality gate on {len(references.evaluation.names)} evaluation samples")
    files = {b.network: b.path for b in built}
    gate = evaluate_variant(
        references.pipeline, files, references.evaluation, references.evaluation_runs, thresholds
    )
    errors = gate.pop("network_errors")
    quality = gate["quality"]
    status = "PASS" if gate["passed"] else f"FAIL ({gate['reason']})"
    log(f"[{variant}] gate {status}: SSIM {quality['ssim_mean']:.4f}, PSNR {quality['psnr_mean']:.2f} dB")
    calibration, evaluation = references.calibration, references.evaluation
    record = {
        **gate,
        "calibration": {"source": calibration.source, "samples": len(calibration.names), "method": "minmax"},
        "evaluation": {
            "source": evaluation.source,
            "samples": len(evaluation.names),
            "overlaps_calibration": bool(set(calibration.names) & set(evaluation.names)),
        },
        "weights": manifest.get("weights"),
        "onnxruntime_version": ort.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "networks": {
            b.network: {**b.record, "sha256": sha256_file(b.path), **errors[b.network]} for b in built
        },
    }
    return record, built


def quantize_bundle(bundle_dir: Path, options: QuantizeOptions, log: Callable[[str], None] = print) -> dict:
    """Build every requested variant of the bundle's heavy networks, gate them, and commit files and
    manifest into the bundle. Returns the new manifest; failed variants are recorded, not raised."""
    manifest = read_manifest(bundle_dir)
    for variant in options.variants:
        if variant not in VARIANTS:
            raise QuantizationError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    config = manifest["config"]
    weights = " [random-init weights: the images are noise]" if manifest.get("random_init") else ""
    log(f"bundle {bundle_dir}: {config['height']}x{config['width']}{weights}")
    references = _references(bundle_dir, manifest, options, log)
    work_dir = bundle_dir / ".quantize.partial"  # same file system as the bundle: files move by rename
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir()
    try:
        records, files = {}, {}
        for variant in options.variants:
            records[variant], built = _build_variant(
                variant, bundle_dir, manifest, options, references, work_dir, log
            )
            files.update({b.record["file"]: b.path for b in built})
        return commit_variants(bundle_dir, files, records)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _progress(items: list, what: str, log: Callable[[str], None]) -> Iterator:
    for index, item in enumerate(items, start=1):
        yield item
        log(f"    {what} sample {index}/{len(items)}")
