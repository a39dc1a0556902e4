"""FLOPs per stage of one `hair_transfer` (HairFastGAN) at batch 1, and the GPU time they project to.

No GPU is lent to this project's CI, so the issue's target (under 0.3 s per transfer on an A100-class
GPU) is projected, not measured: the PyTorch reference pipeline (random-init weights: FLOPs do not depend
on them) runs one transfer under torch's FlopCounterMode, forward hooks on the stage modules split the
count per stage (a stage run several times per transfer is summed), and each stage's FLOPs are divided by
an A100's dense peak at an assumed share of it. FlopCounterMode counts matrix products and convolutions
(StyleGAN2's modulated convs and blurs included), not element-wise work, which the projection's
efficiency share has to absorb. With --cpu-report (a bench/pipeline.py JSON with a per-stage table),
each stage's measured CPU time gives the FLOP rate this machine reached on it.

Writes <name>.md and <name>.json into --out.

Examples:
  python bench/hair_projection.py                                   # public widths, 1024 px
  python bench/hair_projection.py --cpu-report docs/benchmarks/hair-cpu-1024x1024.json
  python bench/hair_projection.py --resolution 256 --widths tiny --out /tmp/report   # a quick check
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.bench import StageTimer  # noqa: E402
from fashionserve.cli import UserError, run  # noqa: E402
from fashionserve.hair.bundle import load_networks, transfer_inputs  # noqa: E402
from fashionserve.hair.stages import NETWORK_WIDTHS, HairConfig  # noqa: E402

# Dense peak TFLOP/s of an A100 SXM (NVIDIA's A100 datasheet), and the assumed share of it a convolution
# stack sustains under TensorRT: 30 % of peak is a middle figure for batch-1 image networks.
A100_PEAK_TFLOPS = {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0}
ASSUMED_EFFICIENCY = 0.3
TARGET_SECONDS = 0.3  # issue 14: under 0.3 s per transfer on an A100-class GPU
ROOT = Path(__file__).resolve().parents[1]


def stage_flops(config: HairConfig, seed: int) -> tuple[dict[str, float], dict[str, int]]:
    """FLOPs and runs per stage of one transfer at batch 1 (random-init pipeline, drawn portraits)."""
    pipeline, _ = load_networks(config, None, seed)
    pipeline.requires_grad_(False)  # FlopCounterMode's module tracking needs parameters without grad
    counter = FlopCounterMode(display=False)
    meter = StageTimer(pipeline.stages, clock=lambda: float(counter.get_total_flops()))
    with torch.no_grad(), counter:
        pipeline.transfer(*transfer_inputs(config, 1, seed))
    return meter.seconds, meter.calls


def cpu_stage_ms(report: Path) -> dict[str, float]:
    """Per-stage milliseconds at batch 1 of the first backend with a per-stage table in a bench report."""
    try:
        stages = json.loads(report.read_text())["stages"]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"--cpu-report {report}: not a bench/pipeline.py report with stages ({exc})") from exc
    backend = "onnxruntime" if "onnxruntime" in stages else next(iter(stages))
    return {name: entry["ms"] for name, entry in stages[backend].items()}


def projected_ms(flops: float, precision: str) -> float:
    return flops / (A100_PEAK_TFLOPS[precision] * 1e12 * ASSUMED_EFFICIENCY) * 1e3


def write_report(out: Path, name: str, config: HairConfig, flops: dict, calls: dict, cpu: dict) -> Path:
    total = sum(flops.values())
    lines = [
        f"# hair_transfer: FLOPs per stage and A100 projection "
        f"({config.image_size} px, {config.widths} widths)",
        "",
        "Projected, not measured (no GPU here): FLOPs counted by torch's FlopCounterMode on one transfer at",
        f"batch 1, divided by an A100's dense peak at an assumed {ASSUMED_EFFICIENCY:.0%} of it "
        "(`bench/hair_projection.py`).",
        "",
        "| stage | runs | GFLOP | share | A100 fp16 ms | A100 tf32 ms |"
        + (" CPU ms (measured) | CPU GFLOP/s |" if cpu else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if cpu else ""),
    ]
    for stage, count in sorted(flops.items(), key=lambda item: -item[1]):
        row = (
            f"| {stage} | {calls[stage]} | {count / 1e9:.1f} | {count / total:.1%} | "
            f"{projected_ms(count, 'fp16'):.2f} | {projected_ms(count, 'tf32'):.2f} |"
        )
        if cpu:
            ms = cpu.get(stage)
            row += f" {ms:.0f} | {count / 1e9 / (ms / 1e3):.1f} |" if ms else " - | - |"
        lines.append(row)
    fp16, tf32 = projected_ms(total, "fp16"), projected_ms(total, "tf32")
    lines += [
        f"| **transfer** | | **{total / 1e9:.0f}** | 100% | **{fp16:.1f}** | **{tf32:.1f}** |"
        + (f" {sum(cpu.values()):.0f} | |" if cpu else ""),
        "",
        f"Target: under {TARGET_SECONDS} s per transfer. Projection at {ASSUMED_EFFICIENCY:.0%} of peak: "
        f"{fp16:.0f} ms in fp16, {tf32:.0f} ms in TF32 (fp32 without tensor cores: "
        f"{projected_ms(total, 'fp32'):.0f} ms). Not in these figures: element-wise work and the ensemble's "
        "per-step overhead.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    record = {
        "config": config.to_dict(),
        "flops": flops,
        "runs": calls,
        "cpu_ms": cpu,
        "a100_peak_tflops": A100_PEAK_TFLOPS,
        "assumed_efficiency": ASSUMED_EFFICIENCY,
        "projected_ms": {p: projected_ms(total, p) for p in A100_PEAK_TFLOPS},
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--resolution", type=int, default=1024, help="portrait side (default 1024)")
    parser.add_argument("--widths", choices=sorted(NETWORK_WIDTHS), default="public", help="default public")
    parser.add_argument("--seed", type=int, default=0, help="random-init seed (default 0)")
    parser.add_argument("--cpu-report", type=Path, help="a bench/pipeline.py JSON report with stage times")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks", help="report folder")
    parser.add_argument("--name", help="report file stem (default hair-projection-<size>[-tiny])")
    args = parser.parse_args()
    try:
        config = HairConfig(args.resolution, args.widths)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    cpu = cpu_stage_ms(args.cpu_report) if args.cpu_report else {}
    print(f"counting FLOPs of one transfer at {config.image_size} px, {config.widths} widths", flush=True)
    flops, calls = stage_flops(config, args.seed)
    suffix = "" if config.widths == "public" else f"-{config.widths}"
    name = args.name or f"hair-projection-{config.image_size}{suffix}"
    print(write_report(args.out, name, config, flops, calls, cpu).read_text())


if __name__ == "__main__":
    run(main)
