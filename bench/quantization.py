"""Latency and throughput of the try-on networks and pipeline in fp32, fp16 and int8, in one run.

ONNX Runtime on the CPU (default): for each size (`test`: the test suite's configuration, `public`:
HR-VITON's 1024x768) it exports a random-init bundle into --work (or reuses one there), adds the fp16
and int8 variants with export/quantize.py's code and quality gate, then times each heavy network and
the whole pipeline (the five stage files chained as the ensemble wires them) per variant, on the drawn
sample pairs. It rewrites the CPU section of docs/quantization.md.

--cuda: PyTorch on this machine's GPU, fp32 and fp16 (autocast), the baseline for TensorRT; it rewrites
the CUDA section instead. It needs only torch (no ONNX Runtime, no export tools).

Random-init weights: the images are noise, so the quality numbers describe the mechanics, not a real
model's quality; the timings do not depend on the weights.

Examples:
  python bench/quantization.py                      # both sizes, CPU
  python bench/quantization.py --sizes test --iterations 10
  python bench/quantization.py --cuda --batches 1,4
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.cli import command_parser, run  # noqa: E402
from fashionserve.tryon.dataset import PAIRS_FILE, load_tryon_inputs, read_pairs  # noqa: E402
from fashionserve.tryon.samples import write_sample_set  # noqa: E402
from fashionserve.tryon.stages import TryonConfig  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOC = PROJECT_ROOT / "docs" / "quantization.md"
SIZES = {
    "test": TryonConfig(
        height=256, width=192, condition_height=128, condition_width=96,
        condition_ngf=8, image_ngf=8, spade_hidden=16,
    ),
    "public": TryonConfig(),
}  # fmt: skip
NETWORKS = ("tryon_condition_generator", "tryon_image_generator")
PIPELINE = "whole pipeline"


def machine() -> str:
    """One line: CPU model, cores, memory, OS, Python."""
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.platform()}, "
        f"Python {platform.python_version()}"
    )


def timed(
    call: Callable[[], object], iterations: int, warmup: int, sync: Callable[[], None] = lambda: None
) -> float:
    """Median wall time of `call` in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    sync()
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def sample_batch(config: TryonConfig, batch: int) -> dict[str, np.ndarray]:
    """`batch` drawn sample pairs (real-looking inputs) at the configuration's size, stacked."""
    with tempfile.TemporaryDirectory() as tmp:
        write_sample_set(Path(tmp), height=config.height, width=config.width)
        pairs = read_pairs(Path(tmp) / PAIRS_FILE.format(split="test"))
        samples = [load_tryon_inputs(Path(tmp), person, cloth) for person, cloth in pairs]
    return {name: np.stack([samples[i % len(samples)][name] for i in range(batch)]) for name in samples[0]}


def write_section(doc: Path, section: str, text: str) -> None:
    """Replace the text between `<!-- bench:SECTION:start -->` and its end marker in `doc`."""
    start, end = f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"
    content = doc.read_text() if doc.is_file() else ""
    if start in content and end in content:
        before, rest = content.split(start, 1)
        after = rest.split(end, 1)[1]
    else:
        before, after = content + "\n", "\n"
    doc.write_text(f"{before}{start}\n{text.strip()}\n{end}{after}")


# ---------------------------------------------------------------------------------------------------
# ONNX Runtime, CPU


def _bundle(size: str, work: Path, log: Callable[[str], None]) -> Path:
    """A random-init bundle of `size` with both variants, made once under `work` and reused after."""
    from fashionserve.tryon.bundle import export_bundle, load_networks, read_manifest
    from fashionserve.tryon.quantize import QuantizeOptions, quantize_bundle

    bundle = work / f"tryon-{size}"
    if not bundle.is_dir():
        log(f"exporting the {size} bundle (random-init) to {bundle}")
        pipeline, provenance = load_networks(SIZES[size], None, None, seed=0)
        export_bundle(pipeline, SIZES[size], provenance, bundle, parity_batches=(1,), log=log)
    if set(read_manifest(bundle).get("variants", {})) != {"fp16", "int8"}:
        log(f"adding fp16 and int8 variants to {bundle}")
        samples = 4 if size == "test" else 2  # a 1024x768 pipeline call takes tens of seconds on a CPU
        quantize_bundle(bundle, QuantizeOptions(calibration_samples=samples, eval_samples=samples), log=log)
    return bundle


def bench_onnxruntime(
    size: str, work: Path, batches: tuple[int, int], iterations: int, warmup: int, log: Callable[[str], None]
) -> list[dict]:
    """Rows: network or pipeline, variant, latency at batches[0], throughput at batches[1]. The timed
    calls run in rounds that alternate the variants, so background load hits them alike."""
    import torch

    from fashionserve.quantization import open_session
    from fashionserve.tryon.bundle import STAGES, read_manifest, stage_inputs
    from fashionserve.tryon.quantize import OnnxPipeline

    bundle = _bundle(size, work, log)
    manifest = read_manifest(bundle)
    fp32 = OnnxPipeline.from_bundle(bundle, manifest, arena=True)
    inputs = {b: sample_batch(SIZES[size], b) for b in batches}
    args = {b: tuple(torch.from_numpy(inputs[b][name]) for name in STAGES[0].inputs) for b in batches}
    recorded = {b: stage_inputs(fp32, a) for b, a in args.items()}
    calls: dict[tuple[str, str, int], Callable[[], object]] = {}
    for variant in ("fp32", "fp16", "int8"):
        pipeline = fp32
        for network in NETWORKS:
            if variant != "fp32":
                entry = manifest["variants"][variant]["networks"][network]
                pipeline = pipeline.swapped(network, open_session(bundle / entry["file"], arena=True))
            session = pipeline.sessions[network]
            for b in batches:
                feeds = {
                    i.name: t.numpy()
                    for i, t in zip(session.get_inputs(), recorded[b][network][0], strict=True)
                }
                calls[(network, variant, b)] = partial(session.run, None, feeds)
        for b in batches:
            calls[(PIPELINE, variant, b)] = partial(stage_inputs, pipeline, args[b])
    times: dict[tuple[str, str, int], list[float]] = {key: [] for key in calls}
    for round_ in range(warmup + iterations):
        for key, call in calls.items():
            started = time.perf_counter()
            call()
            if round_ >= warmup:
                times[key].append(time.perf_counter() - started)
        log(f"{size}: round {round_ + 1}/{warmup + iterations}" + (" (warm-up)" if round_ < warmup else ""))
    rows = []
    for (what, variant, b), measured in times.items():
        if b != batches[0]:
            continue
        record = manifest.get("variants", {}).get(variant, {}) if what == PIPELINE else {}
        latency = statistics.median(measured)
        throughput = batches[1] / statistics.median(times[(what, variant, batches[1])])
        rows.append(_row(size, what, variant, latency, throughput, record, iterations))
    return rows


def _row(
    size: str, what: str, variant: str, latency: float, throughput: float, record: dict, iterations: int
) -> dict:
    quality = record.get("quality", {})
    return {
        "size": size,
        "calls": iterations,
        "what": what,
        "variant": variant,
        "latency_ms": latency * 1000,
        "throughput": throughput,
        "ssim": quality.get("ssim_mean"),
        "psnr": quality.get("psnr_mean"),
    }


def cpu_report(rows: list[dict], batches: tuple, warmup: int, started: str, load: tuple) -> str:
    import onnxruntime as ort
    import torch

    lines = [
        f"Measured {started} with `python bench/quantization.py` (ONNX Runtime {ort.__version__}, "
        f"CPUExecutionProvider, default threads; torch {torch.__version__} for the export).",
        "",
        f"- machine: {machine()}",
        f"- load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f} (other jobs share it)",
        f"- latency: median of N calls at batch {batches[0]} after {warmup} warm-up; "
        f"throughput: images/s at batch {batches[1]}, median of N calls (N per row)",
        "- inputs: the drawn sample pairs; weights: **random-init** (outputs are noise: SSIM/PSNR describe "
        "the mechanics, not a trained model's quality)",
        "- SSIM / PSNR: the quality gate's numbers (final images vs fp32 on the evaluation pairs); "
        "sizes: test = 256x192 narrow (the test suite's), public = 1024x768 (HR-VITON's)",
        "",
        "| size | network | variant | latency ms | images/s | vs fp32 | SSIM | PSNR dB | N |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = {(r["size"], r["what"]): r["latency_ms"] for r in rows if r["variant"] == "fp32"}
    for r in sorted(rows, key=lambda r: (list(SIZES).index(r["size"]), r["what"] == PIPELINE, r["what"])):
        speedup = base[(r["size"], r["what"])] / r["latency_ms"]
        ssim = f"{r['ssim']:.4f}" if r["ssim"] is not None else "-"
        psnr = f"{r['psnr']:.1f}" if r["psnr"] is not None else "-"
        lines.append(
            f"| {r['size']} | {r['what']} | {r['variant']} | {r['latency_ms']:.1f} | {r['throughput']:.2f} "
            f"| {speedup:.2f}x | {ssim} | {psnr} | {r['calls']} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# PyTorch, CUDA


def bench_cuda(batches: tuple[int, int], iterations: int, warmup: int, log: Callable[[str], None]) -> str:
    """PyTorch CUDA fp32 vs fp16 (autocast) of the public configuration (random-init)."""
    import torch

    from fashionserve.tryon.stages import TryonPipeline, build_networks

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible to PyTorch")
    config = SIZES["public"]
    torch.manual_seed(0)
    condition, image = build_networks(config)
    image.fold_spectral_norm()
    pipeline = TryonPipeline(config, condition, image).eval().cuda()
    rows = []
    for batch in batches:
        client = tuple(
            torch.from_numpy(array).cuda() for array in sample_batch(config, batch).values()
        )  # cloth, cloth_mask, agnostic, densepose, parse_agnostic: the order of STAGES[0].inputs
        with torch.inference_mode():
            stages = pipeline.stages
            prep = stages["tryon_preprocess"](*client)
            cond_args = prep[4:]
            flow, segmentation, warped_mask = stages["tryon_condition_generator"](*cond_args)
            parse, warped_cloth = stages["tryon_warp"](flow, segmentation, warped_mask, prep[0], prep[1])
            image_args = (prep[2], prep[3], warped_cloth, parse)
            calls = {
                "tryon_condition_generator": partial(stages["tryon_condition_generator"], *cond_args),
                "tryon_image_generator": partial(stages["tryon_image_generator"], *image_args),
                PIPELINE: partial(pipeline, *client),
            }
            reference = pipeline(*client)
            for precision in ("fp32", "fp16"):
                with torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
                    for what, call in calls.items():
                        seconds = timed(call, iterations, warmup, torch.cuda.synchronize)
                        rows.append((what, precision, batch, seconds))
                        log(f"cuda {precision} {what} batch {batch}: {seconds * 1000:.1f} ms")
                    if precision == "fp16":
                        output = pipeline(*client)
                        difference = (output.float() - reference.float()).abs()
                        psnr = 10 * np.log10(255.0**2 / max(float((difference**2).mean()), 1e-12))
                        rows.append(("fp16 vs fp32 final image", precision, batch, psnr))
    name = torch.cuda.get_device_name()
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `python bench/quantization.py --cuda`: "
        f"PyTorch {torch.__version__} on **{name}** (CUDA {torch.version.cuda}), public configuration "
        f"1024x768, random-init weights, drawn sample pairs; median of {iterations} calls after {warmup} "
        "warm-up, synchronized; fp32 = PyTorch's defaults (cuDNN may use TF32 for convolutions), "
        "fp16 = `torch.autocast(float16)` around the call (the PyTorch baseline for TensorRT plans).",
        "",
        "| network | precision | batch | latency ms | images/s |",
        "|---|---|---:|---:|---:|",
    ]
    for what, precision, batch, value in rows:
        if what.startswith("fp16 vs"):
            continue
        lines.append(f"| {what} | {precision} | {batch} | {value * 1000:.1f} | {batch / value:.1f} |")
    psnrs = [f"batch {b}: {v:.1f} dB" for what, _, b, v in rows if what.startswith("fp16 vs")]
    lines += ["", f"PSNR of the fp16 pipeline's final images against fp32 on the GPU: {', '.join(psnrs)}."]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.add_argument("--sizes", default="test,public", help="comma-separated: test, public (default both)")
    parser.add_argument("--batches", default="1,2", help="LATENCY_BATCH,THROUGHPUT_BATCH (default 1,2)")
    parser.add_argument(
        "--iterations", type=int, help="timed calls per measurement (default 10 test, 2 public)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument("--work", type=Path, default=PROJECT_ROOT / "work" / "bench", help="bundles go here")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"markdown file to update (default {DOC})")
    parser.add_argument(
        "--cuda", action="store_true", help="PyTorch CUDA fp32/fp16 instead of ONNX Runtime CPU"
    )
    parser.add_argument(
        "--section", help="marker name of the doc section to rewrite (default: cpu, or cuda with --cuda)"
    )
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    if len(batches) != 2 or min(batches) < 1:
        parser.error("--batches takes two positive sizes, e.g. 1,2")
    args.batches = batches
    args.sizes = tuple(s for s in args.sizes.split(",") if s)
    if not set(args.sizes) <= set(SIZES):
        parser.error(f"--sizes takes {', '.join(SIZES)}")
    return args


def main() -> None:
    args = parse_args()
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.cuda:
        iterations = args.iterations or 10
        report = bench_cuda(args.batches, iterations, max(args.warmup, 3), log)
        write_section(args.doc, args.section or "cuda", report)
    else:
        from fashionserve.quantization import silence_onnxruntime_quantization_logs

        silence_onnxruntime_quantization_logs()
        started, load = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", os.getloadavg()[0]
        args.work.mkdir(parents=True, exist_ok=True)
        rows = []
        for size in args.sizes:
            iterations = args.iterations or (10 if size == "test" else 2)
            rows += bench_onnxruntime(size, args.work, args.batches, iterations, args.warmup, log)
        report = cpu_report(rows, args.batches, args.warmup, started, (load, os.getloadavg()[0]))
        write_section(args.doc, args.section or "cpu", report)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    run(main)
