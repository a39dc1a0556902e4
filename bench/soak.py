"""Soak benchmark: the embedded stack under a steady Locust load for minutes while the served version
is promoted again and again, so that the live sync loop swaps it under load.

What runs (loopback only, free ports, in a temp folder that is removed at the end):
  MLflow   a real `mlflow server` (SQLite, local artifacts); the catalogue model is exported from its
           shipped checkpoint (models/catalogue/<model>.pt) and registered twice: versions A and B
  Triton   the real tritonserver (explicit model control) serving the folder sync writes
  sync     `mlflow/sync.py --watch`: the live sync loop, serving whatever the alias 'production' names
  Locust   tests/load.py headless: --users closed-loop users on the model's ensemble
Every --promote-every seconds the alias moves to the other version (B, A, B, ...): each move is a real
live swap (a new Triton version loaded beside the live one, then switched to), while requests run.

Every --sample-every seconds it records the requests and failures so far, the latency percentiles of
the interval (p50/p95/p99 of every request that completed in it), the resident memory (VmRSS) of
tritonserver, of its python-backend stubs and of the sync loop, and the promotions and swaps of the
interval. Writes <name>.md (setup, machine, a row per interval, totals, verdict), <name>.png and
<name>.json into --out, each complete or not at all.

Exit status 1 when a request failed or a promotion did not go live before the next one (or the end);
the memory verdict (slope of tritonserver + stubs after the first swap) is reported, not enforced.

Examples:
  python bench/soak.py                                   # 4 users, 5 minutes, a promotion every 30 s
  python bench/soak.py --users 8 --duration 600 --promote-every 20 --out work/soak
  python bench/soak.py --model garment_classifier --batch 4 --out work/soak
"""

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from mlflow.tracking import MlflowClient  # noqa: E402

from fashionserve.bench import PERCENTILES, machine, rss_mb  # noqa: E402
from fashionserve.cli import UserError, command_parser, positive_int, run  # noqa: E402
from fashionserve.client import PROTOCOLS  # noqa: E402
from fashionserve.launcher import ServerError, TritonServer, python_stubs  # noqa: E402
from fashionserve.mlflow_server import MlflowServer  # noqa: E402
from fashionserve.registry import RegistryError, connect, promote, register_bundle  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("fashion_generator", "garment_classifier")  # the catalogue's registered models
LABELS = ("A", "B")  # the two registered versions the alias alternates between
# what `mlflow/sync.py` prints once a version is live (fashionserve.sync.sync_once)
LIVE_LINE = re.compile(r"^live: \S+ version (\d+) as Triton version (\d+) \(([\d.]+) s\)")
START_TIMEOUT_S = 300.0  # bound on the first sync and on Locust's first request
STOP_TIMEOUT_S = 120.0  # bound on the sync loop finishing its step after SIGTERM


@dataclass
class Sample:
    """One interval, ending `t` seconds after the first request."""

    t: float
    requests: int  # completed in the interval
    failures: int
    total_requests: int
    total_failures: int
    latency_ms: dict[str, float | None]  # p50/p95/p99 of the interval's requests (None: no request)
    triton_mb: float
    stubs_mb: float
    stubs: int  # live python-backend stubs of this server
    sync_mb: float
    settled: bool  # every promotion so far had gone live: no version was loading at the sample
    promotions: list[str] = field(default_factory=list)  # MLflow versions promoted in the interval
    swaps: list[str] = field(default_factory=list)  # MLflow versions that went live in the interval

    @property
    def served_mb(self) -> float:
        return self.triton_mb + self.stubs_mb


@dataclass
class Promotion:
    t: float
    version: str
    live_after_s: float | None = None  # None: not live before the next promotion (or the end)


@dataclass
class Swap:
    t: float
    version: str
    triton_version: int
    sync_seconds: float  # as the sync loop reported it: download to live


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.add_argument(
        "--model", choices=MODELS, default=MODELS[0], help="catalogue model (default %(default)s)"
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="checkpoint to export (default: models/catalogue/<model>.pt)"
    )
    parser.add_argument("--bundle", type=Path, help="register this exported bundle instead of exporting one")
    parser.add_argument("--users", type=positive_int, default=4, help="Locust users (default 4)")
    parser.add_argument(
        "--duration", type=positive_int, default=300, metavar="S", help="seconds of load (default 300)"
    )
    parser.add_argument(
        "--promote-every",
        type=positive_int,
        default=30,
        metavar="S",
        help="seconds between promotions (default 30)",
    )
    parser.add_argument(
        "--sample-every", type=positive_int, default=10, metavar="S", help="seconds per interval (default 10)"
    )
    parser.add_argument(
        "--sync-interval", type=float, default=1.0, metavar="S", help="sync loop period (default 1)"
    )
    parser.add_argument("--batch", type=positive_int, default=1, help="samples per request (default 1)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http", help="Locust's (default http)")
    parser.add_argument(
        "--flat-mb-per-min",
        type=float,
        default=1.0,
        help="memory counts as flat below this slope, MiB/min (default 1)",
    )
    parser.add_argument("--note", default="", help="a line about the machine for the report")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="report folder (default docs)")
    parser.add_argument("--name", default="soak", help="report file stem (default soak)")
    args = parser.parse_args()
    if args.duration < 2 * args.promote_every:
        parser.error("--duration must be at least twice --promote-every (one promotion with time to go live)")
    if args.sync_interval <= 0:
        parser.error("--sync-interval must be positive")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        parser.error(f"--name must be a plain file stem, got {args.name!r}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    return args


def log(line: str) -> None:
    print(line, flush=True)


class Watched:
    """A background process whose output lines are collected with the time each arrived."""

    def __init__(self, command: list[str], log_file: Path | None = None):
        self.output = log_file.open("w") if log_file else None
        self.process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self.output or subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = None
        if self.output is None:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def tail(self, count: int = 3) -> str:
        return " | ".join(line for _, line in self.lines[-count:])

    def __enter__(self) -> "Watched":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM (the sync loop then finishes or rolls back its step) and wait, bounded; then SIGKILL."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
        if self.output is not None:
            self.output.close()


def export_bundle(args: argparse.Namespace, dest: Path) -> Path:
    """The catalogue model's bundle from its checkpoint, through the export CLI (as quickstart.sh does)."""
    checkpoint = args.checkpoint or PROJECT_ROOT / "models" / "catalogue" / f"{args.model}.pt"
    if not checkpoint.is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist")
    log(f"exporting {args.model} from {checkpoint}")
    command = [sys.executable, f"export/{args.model}.py", "--checkpoint", str(checkpoint), "--out", str(dest)]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"exporting {checkpoint} failed: {reason}")
    return dest


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise UserError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


class RequestLog:
    """Reads the lines Locust appends to --request-log as they come: (time, latency ms, failed)."""

    def __init__(self, path: Path):
        path.touch()
        self.file = path.open()
        self.pending = ""

    def read(self) -> list[tuple[float, float, bool]]:
        self.pending += self.file.read()
        *complete, self.pending = self.pending.split("\n")
        rows = []
        for line in complete:
            when, latency, failed = line.split()
            rows.append((float(when), float(latency), failed == "1"))
        return rows

    def close(self) -> None:
        self.file.close()


def memory(server: TritonServer, sync: Watched) -> tuple[float, float, int, float]:
    """VmRSS (MiB) of tritonserver, of its stubs together, the number of stubs, and of the sync loop."""
    stubs = 0.0
    count = 0
    for stub in python_stubs():
        if stub.server_pid == server.pid:
            with contextlib.suppress(OSError):  # a stub unloaded while we looked
                stubs += rss_mb(stub.pid)
                count += 1
    return rss_mb(server.pid), stubs, count, rss_mb(sync.process.pid)


def percentiles(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {f"p{q}": None for q in PERCENTILES}
    return {f"p{q}": float(np.percentile(latencies, q)) for q in PERCENTILES}


def slope_mb_per_min(samples: list[Sample], since: float, key: str) -> float | None:
    """Least-squares slope of a memory series over the settled samples from `since` on (None: under 3).
    Mid-swap samples hold the new version's stubs as well, a spike that says nothing about leaks."""
    points = [(s.t / 60.0, getattr(s, key)) for s in samples if s.t >= since and s.settled]
    if len(points) < 3:
        return None
    minutes, values = zip(*points, strict=True)
    return float(np.polyfit(minutes, values, 1)[0])


@dataclass
class Stack:
    """The running MLflow server, Triton and sync loop, and the two registered versions."""

    client: MlflowClient
    versions: dict[str, str]  # label (A, B) -> MLflow version
    server: TritonServer
    sync: Watched
    first_line: int  # the sync loop's first line after version A went live


def start_stack(args: argparse.Namespace, work: Path, stack: contextlib.ExitStack) -> Stack:
    """MLflow with versions A and B registered and A promoted, Triton, and the sync loop serving A."""
    bundle = args.bundle or export_bundle(args, work / "bundle")
    log("starting MLflow (SQLite, local artifacts)")
    mlflow_server = stack.enter_context(MlflowServer(root=work / "mlflow"))
    client = connect(mlflow_server.url)
    versions = {}
    for label in LABELS:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # MLflow's UI links
            version = register_bundle(client, bundle, args.model, log=lambda _: None)
        versions[label] = version.version
        log(f"registered '{args.model}' version {version.version} ({label})")
    promote(client, args.model, versions["A"])
    log("starting Triton (explicit model control)")
    repository = work / "served"
    repository.mkdir()
    server = stack.enter_context(
        TritonServer(repository=repository, model_control="explicit", log_file=work / "triton.log")
    )
    sync_command = [
        sys.executable, "mlflow/sync.py", "--model", args.model, "--repository", str(repository),
        "--triton-url", server.http_url, "--tracking-uri", mlflow_server.url,
        "--watch", "--interval", str(args.sync_interval),
    ]  # fmt: skip
    sync = stack.enter_context(Watched(sync_command))
    log(f"sync loop started (every {args.sync_interval:g} s); waiting for version {versions['A']} to go live")
    wait_for(
        lambda: any(LIVE_LINE.match(line) for _, line in sync.lines) or sync.process.poll() is not None,
        START_TIMEOUT_S,
        "the first sync",
    )
    if sync.process.poll() is not None:
        raise UserError(f"the sync loop exited with {sync.process.returncode}: {sync.tail()}")
    return Stack(client, versions, server, sync, len(sync.lines))


class Recorder:
    """The requests, promotions, swaps and memory of the soak, one Sample per interval."""

    def __init__(self, stack: Stack, requests: RequestLog, start: float):
        self.stack = stack
        self.requests = requests
        self.start = start  # when the first request was sent (Unix time)
        self.pending: list[tuple[float, float, bool]] = []  # read, not yet in an interval
        self.seen_lines = stack.first_line
        self.samples: list[Sample] = []
        self.promotions: list[Promotion] = []
        self.swaps: list[Swap] = []
        self.latencies: list[float] = []  # of every request, for the whole run's percentiles

    def promote(self, now: float, model: str) -> None:
        label = LABELS[len(self.promotions) % 2 == 0]  # B first: A is live
        version = self.stack.versions[label]
        promote(self.stack.client, model, version)
        self.promotions.append(Promotion(now, version))
        log(f"{now:6.1f} s  promoted version {version} ({label})")

    def sample(self, now: float, last: bool) -> Sample:
        """Close the interval ending `now` (the last one takes every request left, Locust's stop included)."""
        self.pending.extend(self.requests.read())
        interval = self.pending if last else [row for row in self.pending if row[0] - self.start <= now]
        self.pending = self.pending[len(interval) :]
        sync = self.stack.sync
        for when, line in sync.lines[self.seen_lines :]:
            if match := LIVE_LINE.match(line):
                self.swaps.append(Swap(when - self.start, match[1], int(match[2]), float(match[3])))
        self.seen_lines = len(sync.lines)
        latencies = [latency for _, latency, _ in interval]
        self.latencies.extend(latencies)
        failures = sum(failed for _, _, failed in interval)
        before = self.samples[-1] if self.samples else None
        previous = before.t if before else 0.0
        triton_mb, stubs_mb, stub_count, sync_mb = memory(self.stack.server, sync)
        live = [swap.version for swap in self.swaps[-1:]]
        sample = Sample(
            t=now,
            requests=len(interval),
            failures=failures,
            total_requests=(before.total_requests if before else 0) + len(interval),
            total_failures=(before.total_failures if before else 0) + failures,
            latency_ms=percentiles(latencies),
            triton_mb=triton_mb,
            stubs_mb=stubs_mb,
            stubs=stub_count,
            sync_mb=sync_mb,
            settled=all(promotion.version in live for promotion in self.promotions[-1:]),
            promotions=[p.version for p in self.promotions if previous < p.t <= now],
            swaps=[s.version for s in self.swaps if previous < s.t <= now],
        )
        self.samples.append(sample)
        p = sample.latency_ms
        latency = "-" if p["p50"] is None else f"{p['p50']:.0f}/{p['p95']:.0f}/{p['p99']:.0f} ms"
        log(
            f"{now:6.1f} s  {sample.total_requests} requests, {sample.total_failures} failed; "
            f"p50/p95/p99 {latency}; tritonserver {triton_mb:.0f} MiB, {stub_count} stubs "
            f"{stubs_mb:.0f} MiB, sync {sync_mb:.0f} MiB"
            + "".join(f"; live: version {v}" for v in sample.swaps)
        )
        return sample

    def match_swaps(self) -> None:
        """Each promotion's delay to the sync loop's line that made it live (before the next one)."""
        for index, promotion in enumerate(self.promotions):
            until = self.promotions[index + 1].t if index + 1 < len(self.promotions) else float("inf")
            live = [s for s in self.swaps if s.version == promotion.version and promotion.t <= s.t < until]
            if live:
                promotion.live_after_s = live[0].t - promotion.t


def soak(args: argparse.Namespace, work: Path) -> dict:
    """Run the stack, the load and the promotions; return every number for the report."""
    with contextlib.ExitStack() as context:
        stack = start_stack(args, work, context)
        requests = context.enter_context(contextlib.closing(RequestLog(work / "requests.log")))
        host = stack.server.http_url if args.protocol == "http" else stack.server.grpc_url
        locust_command = [
            sys.executable, "-m", "locust", "-f", str(PROJECT_ROOT / "tests" / "load.py"), "--headless",
            "--only-summary", "-u", str(args.users), "-r", str(args.users), "-t", f"{args.duration}s",
            "--stop-timeout", "30", "--json-file", str(work / "locust"), "--host", host,
            "--model", args.model, "--protocol", args.protocol, "--batch", str(args.batch),
            "--request-log", str(work / "requests.log"),
        ]  # fmt: skip
        log(f"starting Locust: {args.users} users, {args.duration} s, {args.protocol}, batch {args.batch}")
        locust = context.enter_context(Watched(locust_command, work / "locust.log"))
        first: list[tuple[float, float, bool]] = []
        wait_for(
            lambda: bool(first.extend(requests.read()) or first) or locust.process.poll() is not None,
            START_TIMEOUT_S,
            "Locust's first request",
        )
        if not first:
            reason = (work / "locust.log").read_text().strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"Locust exited with {locust.process.returncode} before a request: {reason[0]}")
        recorder = Recorder(stack, requests, start=first[0][0] - first[0][1] / 1000.0)
        recorder.pending = first
        promotion_times = [k * args.promote_every for k in range(1, args.duration // args.promote_every)]
        log(f"load running; promotions at {', '.join(f'{t} s' for t in promotion_times)}")
        next_sample = args.sample_every
        while True:
            finished = locust.process.poll() is not None
            now = time.time() - recorder.start
            if promotion_times and now >= promotion_times[0]:
                recorder.promote(now, args.model)
                promotion_times.pop(0)
            if now >= next_sample or finished:
                recorder.sample(now, last=finished)
                next_sample += args.sample_every
            if finished:
                break
            time.sleep(0.2)
        if stack.sync.process.poll() is not None:
            raise UserError(f"the sync loop exited with {stack.sync.process.returncode}: {stack.sync.tail()}")
        sync_errors = [line for _, line in stack.sync.lines[stack.first_line :] if line.startswith("error:")]
        stats = locust_totals(work / "locust.json")
        locust_code = locust.process.returncode
        load_average_end = round(os.getloadavg()[0], 2)
    recorder.match_swaps()
    return {
        "samples": recorder.samples,
        "promotions": recorder.promotions,
        "swaps": recorder.swaps,
        "versions": stack.versions,
        "overall_latency_ms": percentiles(recorder.latencies),
        "sync_errors": sync_errors,
        "locust": {"exit_code": locust_code, **stats},
        "load_average_1m_at_end": load_average_end,
    }


def locust_totals(path: Path) -> dict[str, int]:
    """Locust's own request and failure counts, from its final statistics (--json-file)."""
    if not path.is_file():
        return {}
    entries = json.loads(path.read_text())
    return {
        "requests": sum(entry["num_requests"] for entry in entries),
        "failures": sum(entry["num_failures"] for entry in entries),
    }


def verdict(result: dict, args: argparse.Namespace) -> dict:
    samples: list[Sample] = result["samples"]
    promotions: list[Promotion] = result["promotions"]
    swaps: list[Swap] = result["swaps"]
    first_swap = swaps[0].t if swaps else float("inf")
    served = slope_mb_per_min(samples, first_swap, "served_mb")
    delays = [p.live_after_s for p in promotions if p.live_after_s is not None]
    return {
        "requests": samples[-1].total_requests,
        "failures": samples[-1].total_failures,
        "promotions": len(promotions),
        "swaps": len(swaps),
        "promotions_live": len(delays),
        "promotion_to_live_s": {"median": float(np.median(delays)), "max": max(delays)} if delays else None,
        "served_mb_slope_per_min": served,
        "sync_mb_slope_per_min": slope_mb_per_min(samples, first_swap, "sync_mb"),
        "memory_flat": served is not None and abs(served) <= args.flat_mb_per_min,
        "passed": samples[-1].total_failures == 0 and promotions and len(delays) == len(promotions),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _slope(value: float | None) -> str:
    return "not enough samples" if value is None else f"{value:+.2f} MiB/min"


def markdown(result: dict, summary: dict, settings: dict, args: argparse.Namespace) -> str:
    samples: list[Sample] = result["samples"]
    all_latencies = [s.latency_ms for s in samples if s.latency_ms["p50"] is not None]
    first, last = samples[0], samples[-1]
    peak = max(samples, key=lambda s: s.served_mb)
    delays = summary["promotion_to_live_s"]
    title = f"Soak: {args.model} under load, promoted every {args.promote_every} s"
    flat = "flat" if summary["memory_flat"] else "NOT flat"
    lines = [
        f"# {title}",
        "",
        "Written by `python bench/soak.py` (see `--help`); back to [hardening](hardening.md) and the",
        "[benchmarks](benchmarks.md).",
        "",
        f"![{title}]({args.name}.png)",
        "",
        "## Verdict",
        "",
        f"- **Requests: {summary['requests']}, failures: {summary['failures']}** "
        f"({'none failed' if summary['failures'] == 0 else 'SOME FAILED'}; Locust's own count: "
        f"{result['locust'].get('requests', '?')} requests, "
        f"{result['locust'].get('failures', '?')} failures).",
        f"- **Promotions: {summary['promotions']}, went live under load: {summary['promotions_live']}** "
        f"(swaps seen by the sync loop: {summary['swaps']}"
        + (
            f"; promotion to live: median {delays['median']:.1f} s, max {delays['max']:.1f} s"
            if delays
            else ""
        )
        + f"; sync errors: {len(result['sync_errors'])}).",
        f"- **Memory (tritonserver + its python-backend stubs): {flat}**: slope "
        f"{_slope(summary['served_mb_slope_per_min'])} after the first swap (threshold "
        f"{args.flat_mb_per_min:g} MiB/min); {first.served_mb:.0f} MiB at the first sample "
        f"({first.stubs} stubs), {last.served_mb:.0f} MiB at the last ({last.stubs} stubs), peak "
        f"{peak.served_mb:.0f} MiB at {peak.t:.0f} s. The sync loop: "
        f"{_slope(summary['sync_mb_slope_per_min'])} ({first.sync_mb:.0f} -> {last.sync_mb:.0f} MiB).",
        "",
        "Composing models keep their previous version loaded (the two-version window that lets a swap",
        "fail no request), so the stub count grows once, at the first swap, and then stays. A sample taken",
        "while a version loads also holds the new version's stubs (the spikes); the slope is fitted over",
        "the settled samples (every promotion so far live) from the first swap on.",
        "",
        "## Intervals",
        "",
        "| end s | requests | failed | req/s | p50 ms | p95 ms | p99 ms | tritonserver MiB | stubs MiB (n) "
        "| sync MiB | events |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    previous = 0.0
    for s in samples:
        events = [f"promoted v{v}" for v in s.promotions] + [f"live v{v}" for v in s.swaps]
        rate = s.requests / (s.t - previous) if s.t > previous else 0.0
        lines.append(
            f"| {s.t:.0f} | {s.requests} | {s.failures} | {rate:.1f} | {_ms(s.latency_ms['p50'])} "
            f"| {_ms(s.latency_ms['p95'])} | {_ms(s.latency_ms['p99'])} | {s.triton_mb:.0f} "
            f"| {s.stubs_mb:.0f} ({s.stubs}) | {s.sync_mb:.0f} | {', '.join(events)} |"
        )
        previous = s.t
    overall = result["overall_latency_ms"]
    lines.append(
        f"| **total {last.t:.0f}** | **{last.total_requests}** | **{last.total_failures}** "
        f"| {last.total_requests / last.t:.1f} | {_ms(overall['p50'])} | {_ms(overall['p95'])} "
        f"| {_ms(overall['p99'])} | | | | {summary['promotions']} promotions, {summary['swaps']} swaps |"
    )
    worst = max(all_latencies, key=lambda p: p["p99"]) if all_latencies else None
    if worst is not None:
        lines += ["", f"Worst interval p99: {_ms(worst['p99'])} ms."]
    lines += ["", "## Setup and machine", ""]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def plot(result: dict, args: argparse.Namespace, path: Path) -> None:
    """Latency percentiles, throughput and memory over time, promotions and swaps marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    samples: list[Sample] = result["samples"]
    t = [s.t for s in samples]
    figure, (latency, rate, memory_axis) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    for q, style in zip(PERCENTILES, ("-", "--", ":"), strict=True):
        values = [np.nan if s.latency_ms[f"p{q}"] is None else s.latency_ms[f"p{q}"] for s in samples]
        latency.plot(t, values, style, marker=".", label=f"p{q}")
    latency.set_ylabel("latency ms (per interval)")
    latency.legend(fontsize="small", loc="upper left")
    starts = [0.0, *t[:-1]]
    rate.plot(t, [s.requests / (s.t - a) if s.t > a else 0 for s, a in zip(samples, starts, strict=True)],
              marker=".", label="requests/s")  # fmt: skip
    rate.plot(t, [s.failures / (s.t - a) if s.t > a else 0 for s, a in zip(samples, starts, strict=True)],
              marker="x", color="red", label="failures/s")  # fmt: skip
    rate.set_ylabel("per second")
    rate.legend(fontsize="small", loc="upper left")
    memory_axis.plot(t, [s.served_mb for s in samples], marker=".", label="tritonserver + stubs")
    memory_axis.plot(t, [s.triton_mb for s in samples], marker=".", label="tritonserver")
    memory_axis.plot(t, [s.stubs_mb for s in samples], marker=".", label="python-backend stubs")
    memory_axis.plot(t, [s.sync_mb for s in samples], marker=".", label="sync loop")
    memory_axis.set_ylabel("resident memory MiB")
    memory_axis.set_xlabel("seconds since the first request")
    memory_axis.set_ylim(bottom=0)
    memory_axis.legend(fontsize="small", loc="center left")
    for axis in (latency, rate, memory_axis):
        for index, promotion in enumerate(result["promotions"]):
            axis.axvline(promotion.t, color="grey", linestyle="--", linewidth=0.8,
                         label="promotion" if index == 0 and axis is latency else None)  # fmt: skip
        for index, swap in enumerate(result["swaps"]):
            axis.axvline(swap.t, color="green", linestyle=":", linewidth=1.0,
                         label="live (swap done)" if index == 0 and axis is latency else None)  # fmt: skip
        axis.grid(alpha=0.3)
    latency.legend(fontsize="small", loc="upper left", ncols=5)
    figure.suptitle(
        f"Soak: {args.model}, {args.users} users, promotion every {args.promote_every} s "
        f"({samples[-1].total_requests} requests, {samples[-1].total_failures} failed)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_reports(result: dict, summary: dict, settings: dict, args: argparse.Namespace) -> list[Path]:
    """<name>.md, .png and .json into --out: written in a temp folder beside them, then renamed."""
    args.out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.name}-", dir=args.out))
    try:
        plot(result, args, staging / f"{args.name}.png")
        (staging / f"{args.name}.md").write_text(markdown(result, summary, settings, args))
        numbers = {
            "settings": settings,
            "verdict": summary,
            "samples": [asdict(s) for s in result["samples"]],
            "promotions": [asdict(p) for p in result["promotions"]],
            "swaps": [asdict(s) for s in result["swaps"]],
            "sync_errors": result["sync_errors"],
            "locust": result["locust"],
        }
        (staging / f"{args.name}.json").write_text(json.dumps(numbers, indent=2) + "\n")
        written = []
        for suffix in (".json", ".png", ".md"):
            target = args.out / f"{args.name}{suffix}"
            (staging / target.name).replace(target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main() -> int:
    args = parse_args()
    started = datetime.datetime.now(datetime.UTC)
    settings = {
        "model": f"{args.model} (catalogue, real trained weights)"
        if args.bundle is None
        else f"{args.model} (bundle {args.bundle})",
        "users": f"{args.users} (closed loop, tests/load.py, {args.protocol}, batch {args.batch})",
        "duration": f"{args.duration} s of load",
        "promotions": f"every {args.promote_every} s, alias 'production' alternating between two "
        "registered versions; `mlflow/sync.py --watch` every "
        f"{args.sync_interval:g} s swaps the live version",
        "intervals": f"{args.sample_every} s",
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        **{key.replace("_", " "): value for key, value in machine().items()},
    }
    if args.note:
        settings["note"] = args.note
    with tempfile.TemporaryDirectory(prefix="fashionserve-soak-") as tmp:
        result = soak(args, Path(tmp))
    settings["load average 1m at end"] = result["load_average_1m_at_end"]
    summary = verdict(result, args)
    for path in write_reports(result, summary, settings, args):
        log(f"wrote {path}")
    log(
        f"{summary['requests']} requests, {summary['failures']} failed; {summary['promotions_live']} of "
        f"{summary['promotions']} promotions went live; memory slope "
        f"{_slope(summary['served_mb_slope_per_min'])} ({'flat' if summary['memory_flat'] else 'not flat'})"
    )
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    run(main, expected=(ServerError, RegistryError))
