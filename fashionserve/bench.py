"""What the benchmark scripts in `bench/` share: latency statistics, the machine record, the markdown
table and the matplotlib plots. Imports neither ONNX Runtime nor tritonclient, so the GPU script runs
where only PyTorch is installed."""

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fashionserve.hair.samples import draw_portrait
from fashionserve.tryon.dataset import load_tryon_inputs
from fashionserve.tryon.samples import write_sample_set

PERCENTILES = (50, 95, 99)


def sample_batches(height: int, width: int, batches: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """Real client inputs (the drawn sample pairs, cycled) at height x width, one request per batch size."""
    with tempfile.TemporaryDirectory(prefix="fashionserve-bench-") as tmp:
        pairs = write_sample_set(Path(tmp), height=height, width=width)
        samples = [load_tryon_inputs(Path(tmp), person, cloth) for person, cloth in pairs]
    return {
        batch: {
            name: np.stack([samples[i % len(samples)][name] for i in range(batch)]) for name in samples[0]
        }
        for batch in batches
    }


def hair_sample_batches(size: int, batches: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """`hair_transfer` client inputs at size x size, one request per batch size: drawn sample portraits
    (cycled) as faces, each with the next sample's hairstyle and the one after's hair colour (three
    different images: every step of the transfer does its full work)."""

    def portraits(offset: int, batch: int) -> np.ndarray:
        return np.stack([draw_portrait(i + offset, size) for i in range(batch)])

    return {
        batch: {
            "face": portraits(0, batch),
            "shape_reference": portraits(1, batch),
            "color_reference": portraits(2, batch),
        }
        for batch in batches
    }


class StageTimer:
    """Wall-clock seconds per stage of a PyTorch pipeline over one call, from forward hooks on its stage
    modules (name -> module, e.g. HairPipeline.stages): a stage run several times in a call is summed
    (`calls` counts them); a stage module called inside another stage counts in the outer one.
    `synchronize` runs before each clock read (torch.cuda.synchronize for GPU work); another `clock`
    measures something else per stage (e.g. a FlopCounterMode's running total: `seconds` are then FLOPs)."""

    def __init__(
        self,
        stages: Mapping[str, Any],
        synchronize: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.synchronize, self.clock = synchronize, clock
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._depth, self._started = 0, 0.0
        for name, module in stages.items():
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(lambda *_, name=name: self._leave(name))

    def reset(self) -> None:
        self.seconds, self.calls = {}, {}

    def _enter(self, *_) -> None:
        if self._depth == 0:
            self.synchronize()
            self._started = self.clock()
        self._depth += 1

    def _leave(self, name: str) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - self._started
            self.calls[name] = self.calls.get(name, 0) + 1


def stage_summary(per_call: list[dict[str, float]], calls: dict[str, int]) -> dict[str, dict]:
    """Per-call stage seconds (one dict per timed call) -> stage -> {calls per pipeline call, median ms}."""
    return {
        name: {"calls": calls[name], "ms": float(np.median([c.get(name, 0.0) for c in per_call])) * 1000.0}
        for name in calls
    }


def stage_table(stages: dict[str, dict[str, dict]]) -> str:
    """backend -> stage -> {calls, ms}: one row per stage (in the first backend's order), one column of
    median milliseconds per backend, and the totals."""
    backends = list(stages)
    names = list(dict.fromkeys(name for backend in backends for name in stages[backend]))
    lines = [
        "| stage | calls per request | " + " | ".join(f"{b} ms" for b in backends) + " |",
        "|---|---:|" + "---:|" * len(backends),
    ]
    for name in names:
        calls = next(stages[b][name]["calls"] for b in backends if name in stages[b])
        cells = [_fmt(stages[b][name]["ms"]) if name in stages[b] else "-" for b in backends]
        lines.append(f"| {name} | {calls} | " + " | ".join(cells) + " |")
    totals = [_fmt(sum(s["ms"] for s in stages[b].values())) for b in backends]
    lines.append("| **sum of stages** | | " + " | ".join(totals) + " |")
    return "\n".join(lines)


@dataclass
class Result:
    """One backend at one batch size: per-call wall-clock latencies and memory."""

    backend: str
    batch: int
    latencies_s: list[float]
    peak_memory_mb: float  # peak RSS of the process (tree) running it, or peak GPU memory for CUDA runs
    max_diff: int | None = None  # largest |difference| of the output image from the reference, uint8 levels
    notes: dict = field(default_factory=dict)
    # mean |difference| from the reference, uint8 levels: where a few pixels may differ by a lot (a parser
    # label flipping at a near tie), the max alone does not say whether the images agree
    mean_diff: float | None = None

    @property
    def throughput(self) -> float:
        """Images per second over the timed calls (one caller, calls back to back)."""
        return self.batch * len(self.latencies_s) / sum(self.latencies_s)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) * 1000.0

    def summary(self) -> dict:
        return {
            **{k: v for k, v in asdict(self).items() if k != "latencies_s"},
            "iterations": len(self.latencies_s),
            "throughput_images_per_s": self.throughput,
            **{f"p{q}_ms": self.percentile_ms(q) for q in PERCENTILES},
            "latencies_ms": [round(s * 1000.0, 3) for s in self.latencies_s],
        }


def _status_mb(pid: int | str, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024.0
    raise OSError(f"no {field} in /proc/{pid}/status")


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident memory (VmHWM) of one process, in MiB (Linux /proc)."""
    return _status_mb(pid, "VmHWM")


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory now (VmRSS) of one process, in MiB (Linux /proc)."""
    return _status_mb(pid, "VmRSS")


def descendants(pid: int) -> list[int]:
    """PIDs of all live descendants of `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # the field after the ')' that ends the command name: state, then the parent's PID
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited while we looked
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def machine() -> dict:
    """CPU, cores, memory, OS and Python of this machine."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def markdown_table(results: list[Result], reference: str) -> str:
    """One row per (backend, batch): throughput (and its ratio to `reference` at the same batch),
    latency percentiles, peak memory and the output's largest difference from the reference."""
    base = {r.batch: r.throughput for r in results if r.backend == reference}
    with_mean = any(r.mean_diff is not None for r in results)  # a column only where it was measured
    header = (
        "| backend | batch | calls | images/s | vs " + reference + " | p50 ms | p95 ms | p99 ms "
        "| peak memory MiB | max abs diff vs " + reference + " |" + (" mean abs diff |" if with_mean else "")
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if with_mean else "")]
    for r in sorted(results, key=lambda r: r.batch):
        ratio = f"{r.throughput / base[r.batch]:.2f}x" if r.batch in base else "-"
        diff = "-" if r.max_diff is None else str(r.max_diff)
        p50, p95, p99 = (_fmt(r.percentile_ms(q)) for q in PERCENTILES)
        mean = "" if not with_mean else " - |" if r.mean_diff is None else f" {r.mean_diff:.3f} |"
        lines.append(
            f"| {r.backend} | {r.batch} | {len(r.latencies_s)} | {_fmt(r.throughput)} | {ratio} "
            f"| {p50} | {p95} | {p99} | {r.peak_memory_mb:.0f} | {diff} |{mean}"
        )
    return "\n".join(lines)


def plot(results: list[Result], title: str, path: Path) -> None:
    """Two panels: throughput per backend and batch; p50 latency with p95/p99 marks."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r.backend for r in results))
    batches = sorted({r.batch for r in results})
    by_key = {(r.backend, r.batch): r for r in results}
    width = 0.8 / len(backends)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, backend in enumerate(backends):
        xs, throughput, p50, p95, p99 = [], [], [], [], []
        for position, batch in enumerate(batches):
            result = by_key.get((backend, batch))
            if result is None:
                continue
            xs.append(position + (index - (len(backends) - 1) / 2) * width)
            throughput.append(result.throughput)
            p50.append(result.percentile_ms(50))
            p95.append(result.percentile_ms(95))
            p99.append(result.percentile_ms(99))
        left.bar(xs, throughput, width, label=backend)
        bars = right.bar(xs, p50, width, label=f"{backend} p50")
        colour = bars.patches[0].get_facecolor() if bars.patches else None
        right.scatter(xs, p95, marker="_", s=200, color=colour, zorder=3)
        right.scatter(xs, p99, marker="x", s=30, color=colour, zorder=3)
    for axis, label in (
        (left, "images / s (higher is better)"),
        (right, "latency ms: bar p50, - p95, x p99"),
    ):
        axis.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        axis.set_ylabel(label)
        axis.grid(axis="y", alpha=0.3)
    left.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(
    results: list[Result],
    out_dir: Path,
    stem: str,
    title: str,
    reference: str,
    settings: dict,
    findings: list[str],
    stages: dict[str, dict[str, dict]] | None = None,
) -> Path:
    """`<stem>.md` (table, findings, per-stage table when `stages` is given, settings), `<stem>.json`
    (all numbers) and `<stem>.png` in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(results, title, out_dir / f"{stem}.png")
    settings_lines = "\n".join(f"- {key}: {value}" for key, value in settings.items())
    per_stage = (
        f"\nPer stage at batch 1 (median ms per request):\n\n{stage_table(stages)}\n" if stages else ""
    )
    text = (
        f"# {title}\n\n![{title}]({stem}.png)\n\n{markdown_table(results, reference)}\n\n"
        + "".join(f"- {line}\n" for line in findings)
        + per_stage
        + f"\nSettings and machine:\n\n{settings_lines}\n"
    )
    path = out_dir / f"{stem}.md"
    path.write_text(text)
    numbers = {"settings": settings, "results": [r.summary() for r in results]}
    if stages:
        numbers["stages"] = stages
    (out_dir / f"{stem}.json").write_text(json.dumps(numbers, indent=2) + "\n")
    return path
