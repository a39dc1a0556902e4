"""GPU benchmark of the PyTorch try-on pipeline (TryonPipeline, random-init weights) on one CUDA device:

  cuda-fp32-eager       the reference: eager fp32 (cuDNN TF32 convolutions as PyTorch defaults them)
  cuda-fp16-autocast    eager under torch.autocast(float16)
  cuda-fp32-cudagraphs  torch.compile(mode="reduce-overhead"): Inductor kernels replayed as CUDA graphs
  cuda-fp16-cudagraphs  the same under autocast(float16)

Inputs are the drawn sample pairs (uint8, already on the device); a call ends when its output is ready
(synchronized). Needs only PyTorch, numpy, pillow and matplotlib. The report (<name>.md/.png/.json in
--out) is rewritten after each variant, so a run cut short keeps what it measured.

Example:
  python bench/gpu.py --size public --batches 1,4 --iterations 20
"""

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.bench import Result, machine, sample_batches, write_report  # noqa: E402
from fashionserve.cli import UserError, command_parser, run  # noqa: E402
from fashionserve.tryon.stages import TryonConfig, TryonPipeline, build_networks  # noqa: E402

REFERENCE = "cuda-fp32-eager"
VARIANTS = ("cuda-fp32-eager", "cuda-fp16-autocast", "cuda-fp32-cudagraphs", "cuda-fp16-cudagraphs")
INPUTS = ("cloth", "cloth_mask", "agnostic", "densepose", "parse_agnostic")  # TryonPipeline.forward order
SIZES = {
    "small": TryonConfig(
        height=256, width=192, condition_height=128, condition_width=96,
        condition_ngf=8, image_ngf=8, spade_hidden=16,
    ),
    "public": TryonConfig(),
}  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.add_argument("--size", choices=SIZES, default="public", help="pipeline size (default public)")
    parser.add_argument("--seed", type=int, default=0, help="random-init seed (default 0)")
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes (default 1,4)")
    parser.add_argument("--iterations", type=int, default=20, help="timed calls per variant and batch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3, at least 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="report folder")
    parser.add_argument("--name", help="report file name stem (default tryon-gpu-<H>x<W>)")
    args = parser.parse_args()
    try:
        args.batches = sorted({int(b) for b in args.batches.split(",")})
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if REFERENCE not in args.variants:
        args.variants.insert(0, REFERENCE)  # the ratios and output differences are taken against it
    if args.batches[0] < 1 or args.iterations < 1 or args.warmup < 1:
        parser.error("batches, --iterations and --warmup must be at least 1")
    return args


def build_pipeline(config: TryonConfig, seed: int) -> TryonPipeline:
    """The random-init reference pipeline, as fashionserve.tryon.bundle.load_networks builds it (that
    module also imports ONNX Runtime and tritonclient, which a GPU box need not have)."""
    torch.manual_seed(seed)
    condition, image = build_networks(config)
    image.fold_spectral_norm()
    return TryonPipeline(config, condition, image).eval()


def variant_call(name: str, pipeline: TryonPipeline) -> Callable[..., torch.Tensor]:
    fp16 = "fp16" in name
    model = (
        torch.compile(pipeline, mode="reduce-overhead", dynamic=False) if "cudagraphs" in name else pipeline
    )

    def call(*inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
            output = model(*inputs)
            # cudagraph outputs live in a pool the next replay overwrites: keep a copy
            return output.clone()

    return call


def time_calls(
    call: Callable[..., torch.Tensor], inputs: tuple, calls: int
) -> tuple[list[float], torch.Tensor]:
    latencies, output = [], None
    for _ in range(calls):
        torch.cuda.synchronize()
        started = time.perf_counter()
        output = call(*inputs)
        torch.cuda.synchronize()
        latencies.append(time.perf_counter() - started)
    return latencies, output


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise UserError("no CUDA device visible to PyTorch")
    torch.backends.cudnn.benchmark = True  # fixed shapes per batch: let cuDNN pick its fastest kernels
    config = SIZES[args.size]
    device = torch.cuda.get_device_name()
    pipeline = build_pipeline(config, args.seed).cuda()
    batches = {
        b: tuple(torch.from_numpy(batch[name]).cuda() for name in INPUTS)
        for b, batch in sample_batches(config.height, config.width, args.batches).items()
    }
    resolution = f"{config.height}x{config.width}"
    stem = args.name or f"tryon-gpu-{resolution}" + ("" if args.size == "public" else "-narrow")
    title = f"Try-on pipeline {resolution} ({args.size}), PyTorch on {device}"
    settings = {
        "date": datetime.date.today().isoformat(),
        "command": "python bench/gpu.py " + " ".join(sys.argv[1:]),
        "gpu": device,
        **machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn.benchmark": True,
        "pipeline": ", ".join(f"{key} {value}" for key, value in config.to_dict().items()),
        "weights": f"random-init seed {args.seed} (timing does not depend on weights)",
        "timed calls per variant and batch": f"{args.iterations} after {args.warmup} warm-up calls, "
        "inputs on the device, synchronized after each call",
        "peak memory": "torch.cuda.max_memory_allocated over the variant's warm-up and timed calls "
        "(cuDNN benchmark trials and compilation included)",
        "numpy": np.__version__,
    }
    results: list[Result] = []
    references: dict[int, torch.Tensor] = {}
    for name in args.variants:
        torch.cuda.reset_peak_memory_stats()
        call = variant_call(name, pipeline)
        for batch, inputs in batches.items():
            started = time.perf_counter()
            _, output = time_calls(call, inputs, args.warmup)
            warmup_s = time.perf_counter() - started  # includes compilation for the compiled variants
            latencies, _ = time_calls(call, inputs, args.iterations)
            references.setdefault(batch, output.to(torch.int16))
            diff = int((output.to(torch.int16) - references[batch]).abs().max())
            peak = torch.cuda.max_memory_allocated() / 2**20
            results.append(Result(name, batch, latencies, peak, diff, {"warmup_s": round(warmup_s, 1)}))
            print(
                f"{name} batch {batch}: p50 {results[-1].percentile_ms(50):.1f} ms, warm-up {warmup_s:.1f}s"
            )
        findings = [
            f"{r.backend} batch {r.batch}: {r.throughput / base.throughput:.2f}x the fp32 eager throughput; "
            f"warm-up (incl. compilation) {r.notes['warmup_s']} s"
            for r in results
            for base in results
            if base.backend == REFERENCE and base.batch == r.batch and r.backend != REFERENCE
        ]
        findings.append(f"Absolute times hold for the {device} only; ratios are what to quote.")
        path = write_report(results, args.out, stem, title, REFERENCE, settings, findings)
    print(path.read_text())


if __name__ == "__main__":
    run(main)
