"""Side-by-side CPU benchmark of the try-on pipeline on this machine, in one run:

  pytorch-eager   the reference implementation (fashionserve TryonPipeline), torch.inference_mode
  onnxruntime     the bundle's bare stage ONNX files chained in Python, wired like the ensemble,
                  default session options (as the server's python-backend runner uses them)
  onnxruntime-nospin  the same with intra-op thread spinning off (session.intra_op.allow_spinning=0):
                  a spinning pool of the last stage competes with the next stage's threads
  triton-<proto>  the `tryon` ensemble on the embedded Triton (cpu target: python-backend leaves
                  running the same ONNX files with ONNX Runtime), called through tritonclient

Each backend runs in its own process (so its peak memory is its own); the timed calls are spread over
rounds that alternate the backends, so background load on the machine hits all of them alike
(--sequential: one backend process at a time, for memory at 1024x768). Every
call sends the drawn sample pairs (real inputs) at the pipeline's resolution; outputs are checked
against PyTorch. Writes <name>.md, <name>.png and <name>.json into --out.

Examples:
  python bench/pipeline.py                                   # small test configuration (256x192, narrow)
  python bench/pipeline.py --size public --batches 1,2 --iterations 4 --warmup 1 --sequential
  python bench/pipeline.py --bundle work/bundles/tryon --iterations 3 --rounds 3
  python bench/pipeline.py --threads 1     # one intra-op thread in every runtime: steadier on a busy machine
"""

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.bench import Result, descendants, machine, peak_rss_mb, sample_batches, write_report  # noqa: E402
from fashionserve.cli import UserError, run  # noqa: E402
from fashionserve.client import PROTOCOLS, ClientError, TritonModelClient  # noqa: E402
from fashionserve.launcher import ServerError, TritonServer  # noqa: E402
from fashionserve.onnx_export import ExportError  # noqa: E402
from fashionserve.repository import (  # noqa: E402
    RenderError,
    ensemble_steps,
    read_config,
    render_repository,
    write_config,
)
from fashionserve.tryon.stages import TryonConfig  # noqa: E402

REFERENCE = "pytorch-eager"
ORT = "onnxruntime"
ORT_NOSPIN = "onnxruntime-nospin"
SIZES = {
    # the configuration of the test suite (tests/conftest.py TEST_CONFIG): minutes on 2 cores
    "small": TryonConfig(
        height=256, width=192, condition_height=128, condition_width=96,
        condition_ngf=8, image_ngf=8, spade_hidden=16,
    ),
    "medium": TryonConfig(height=512, width=384),  # public widths, half the resolution: a quarter of the work
    "public": TryonConfig(),  # HR-VITON's 1024x768: a call takes seconds to tens of seconds on a CPU
}  # fmt: skip
Batch = dict[str, np.ndarray]


class BenchError(Exception):
    """A backend could not be set up or run (one line)."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="small",
        help="pipeline to export (random-init): small, medium or public",
    )
    parser.add_argument("--bundle", type=Path, help="use this exported bundle instead of exporting one")
    parser.add_argument("--seed", type=int, default=0, help="random-init seed of the export (default 0)")
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes (default 1,4)")
    parser.add_argument(
        "--iterations", type=int, default=20, help="timed calls per backend and batch (default 20)"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="rounds the timed calls are spread over (default 4)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2, at least 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads of PyTorch, ONNX Runtime and the Triton leaves (default 0: their own)",
    )
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, default="grpc", help="Triton protocol (default grpc)"
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="one backend process at a time instead of alternating rounds (bounds memory at 1024x768)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="report folder")
    parser.add_argument("--name", help="report file name stem (default tryon-cpu-<H>x<W>[-narrow])")
    args = parser.parse_args()
    try:
        args.batches = sorted({int(b) for b in args.batches.split(",")})
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if (
        args.batches[0] < 1
        or args.iterations < 1
        or args.warmup < 1
        or not 1 <= args.rounds <= args.iterations
    ):
        parser.error("batches, --iterations and --warmup must be at least 1, --rounds 1..--iterations")
    return args


def _config(manifest: dict) -> TryonConfig:
    names = {f.name for f in fields(TryonConfig)}
    return TryonConfig(**{k: v for k, v in manifest["config"].items() if k in names})


# Each worker imports only its own runtime (inside these functions), so that its peak memory is what
# that backend needs and not, say, torch loaded into the ONNX Runtime process.
def _pytorch_runner(spec: dict) -> tuple[Callable[[Batch], np.ndarray], dict]:
    import torch

    from fashionserve.tryon.bundle import load_networks

    manifest = spec["manifest"]
    checkpoints = [manifest.get(k) for k in ("condition_checkpoint", "image_checkpoint")]
    pipeline, _ = load_networks(
        _config(manifest), *(Path(c) if c else None for c in checkpoints), seed=manifest["seed"]
    )
    names = [tensor["name"] for tensor in manifest["input_contract"]]  # the forward's argument order
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])

    def call(batch: Batch) -> np.ndarray:
        with torch.inference_mode():
            return pipeline(*(torch.from_numpy(batch[name]) for name in names)).numpy()

    return call, {"torch": torch.__version__, "intra-op threads": torch.get_num_threads()}


def _onnxruntime_runner(spec: dict) -> tuple[Callable[[Batch], np.ndarray], dict]:
    import onnxruntime as ort

    manifest = spec["manifest"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]  # 0: ONNX Runtime's default (one per physical core)
    if not spec["allow_spinning"]:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {
        name: ort.InferenceSession(
            str(Path(spec["bundle"]) / model["file"]), options, providers=["CPUExecutionProvider"]
        )
        for name, model in manifest["models"].items()
    }
    steps = ensemble_steps(manifest["pipeline"])
    output = manifest["output_contract"][0]["name"]

    def call(batch: Batch) -> np.ndarray:
        values = dict(batch)  # ensemble tensor name -> value
        for step in steps:
            session = sessions[step.model_name]
            feeds = {i.name: values[step.input_map[i.name]] for i in session.get_inputs()}
            results = session.run(None, feeds)
            values.update(
                {step.output_map[o.name]: r for o, r in zip(session.get_outputs(), results, strict=True)}
            )
        return values[output]

    return call, {"onnxruntime": ort.__version__}


def _triton_runner(spec: dict) -> tuple[Callable[[Batch], np.ndarray], dict]:
    client = TritonModelClient(spec["url"], spec["manifest"]["pipeline"], spec["protocol"])
    output = client.outputs[0]
    return (lambda batch: client.infer(batch)[output]), {}


RUNNERS = {"pytorch": _pytorch_runner, "onnxruntime": _onnxruntime_runner, "triton": _triton_runner}


def _serve(kind: str, spec: dict, conn: multiprocessing.connection.Connection) -> None:
    """Worker process: set the backend up, then answer (batch, calls) with (latencies, last output, peak)."""
    try:
        call, notes = RUNNERS[kind](spec)
        inputs = sample_batches(spec["height"], spec["width"], spec["batches"])
        conn.send(("ready", notes))
        while (request := conn.recv()) is not None:
            batch, calls = request
            latencies, output = [], None
            for _ in range(calls):
                started = time.perf_counter()
                output = call(inputs[batch])
                latencies.append(time.perf_counter() - started)
            conn.send(("ok", (latencies, output, peak_rss_mb())))
    except Exception as exc:  # any failure ends the benchmark with this one line
        conn.send(("error", f"{kind}: {type(exc).__name__}: {exc}".splitlines()[0]))


class Worker:
    """One backend in its own (spawned) process."""

    def __init__(self, name: str, kind: str, spec: dict):
        self.name = name
        context = multiprocessing.get_context("spawn")  # fresh interpreter: no memory inherited
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(kind, spec, child), daemon=True)
        self._process.start()
        self.notes = self._receive()
        self.peak_mb = 0.0

    def _died(self) -> BenchError:
        self._process.join(timeout=5)
        # -9 is most often the kernel's OOM killer: --sequential keeps one backend in memory at a time
        return BenchError(f"{self.name}: worker process died (exit code {self._process.exitcode})")

    def _receive(self):
        if not self._conn.poll(3600):
            raise BenchError(f"{self.name}: no answer within an hour")
        try:
            status, payload = self._conn.recv()
        except EOFError:
            raise self._died() from None
        if status == "error":
            raise BenchError(payload)
        return payload

    def run(self, batch: int, calls: int) -> tuple[list[float], np.ndarray]:
        try:
            self._conn.send((batch, calls))
        except OSError:  # broken pipe: the process is gone
            raise self._died() from None
        latencies, output, self.peak_mb = self._receive()
        return latencies, output

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(None)
        self._process.join(timeout=30)


def _export_bundle(size: str, seed: int, bundle: Path) -> dict:
    from fashionserve.tryon.bundle import export_bundle, load_networks

    pipeline, provenance = load_networks(SIZES[size], None, None, seed=seed)
    return export_bundle(
        pipeline, SIZES[size], provenance, bundle, log=lambda line: print(f"  {line}", flush=True)
    )


def _export(args: argparse.Namespace, tmp: Path) -> tuple[Path, dict]:
    config = SIZES[args.size]
    print(
        f"exporting the {args.size} pipeline ({config.height}x{config.width}, random-init seed {args.seed})"
    )
    # in a child process: the export's gigabytes at 1024x768 are returned to the system when it ends
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        manifest = pool.submit(_export_bundle, args.size, args.seed, tmp / "bundle").result()
    return tmp / "bundle", manifest


def _rounds(iterations: int, rounds: int) -> list[int]:
    return [iterations // rounds + (i < iterations % rounds) for i in range(rounds)]


def measure(
    backends: dict[str, tuple[str, dict]], args: argparse.Namespace
) -> tuple[dict[tuple[str, int], tuple[list[float], int]], dict[str, float], dict]:
    """Run every backend (the reference first): (backend, batch) -> (latencies, max |output - reference|),
    peak memory per backend, and what the workers report about their runtimes."""
    groups = [[name] for name in backends] if args.sequential else [list(backends)]
    references: dict[int, np.ndarray] = {}
    measured: dict[tuple[str, int], tuple[list[float], int]] = {}
    peaks: dict[str, float] = {}
    notes: dict = {}
    for group in groups:
        workers: list[Worker] = []
        try:
            for name in group:
                print(f"starting {name}", flush=True)
                workers.append(Worker(name, *backends[name]))
            measured.update(_measure_together(workers, args, references))
        finally:
            for worker in workers:
                worker.close()
        for worker in workers:
            peaks[worker.name] = worker.peak_mb
            notes.update(worker.notes)
    return measured, peaks, notes


def _measure_together(
    workers: list[Worker], args: argparse.Namespace, references: dict[int, np.ndarray]
) -> dict[tuple[str, int], tuple[list[float], int]]:
    diffs: dict[tuple[str, int], int] = {}
    for batch in args.batches:
        for worker in workers:
            _, output = worker.run(batch, args.warmup)
            reference = references.setdefault(batch, output.astype(np.int16))  # the first backend's
            diffs[worker.name, batch] = int(np.abs(output - reference).max())
    latencies: dict[tuple[str, int], list[float]] = {key: [] for key in diffs}
    for index, calls in enumerate(_rounds(args.iterations, args.rounds), start=1):
        for batch in args.batches:
            for worker in workers:
                print(f"round {index}/{args.rounds}: {worker.name} batch {batch} x{calls}", flush=True)
                latencies[worker.name, batch] += worker.run(batch, calls)[0]
    return {key: (latencies[key], diffs[key]) for key in diffs}


def findings(results: list[Result], triton: str, batches: list[int]) -> list[str]:
    """The goal ratios, worded for the report."""
    by_key = {(r.backend, r.batch): r for r in results}

    def overhead(bare: str, batch: int) -> float:
        return by_key[triton, batch].percentile_ms(50) / by_key[bare, batch].percentile_ms(50) - 1

    def speedup(backend: str, batch: int) -> float:
        return by_key[backend, batch].throughput / by_key[REFERENCE, batch].throughput

    lines = []
    for bare in (ORT, ORT_NOSPIN):
        values = {b: overhead(bare, b) for b in batches}
        met = batches[0] == 1 and values[1] < 0.10
        listing = "; ".join(f"batch {b}: {value:+.1%}" for b, value in values.items())
        lines.append(
            f"Ensemble overhead over the bare networks ({triton} p50 vs {bare} p50): {listing}. "
            f"Goal < 10% at batch 1: {'met' if met else 'not met'}."
        )
    for backend in (ORT, ORT_NOSPIN):
        values = {b: speedup(backend, b) for b in batches}
        met = all(value >= 1.5 for value in values.values())
        listing = "; ".join(f"batch {b}: {value:.2f}x" for b, value in values.items())
        lines.append(
            f"{backend} vs PyTorch eager throughput: {listing}. Goal >= 1.5x: {'met' if met else 'not met'}."
        )
    return lines


def main() -> None:
    args = parse_args()
    load_before = machine()
    with tempfile.TemporaryDirectory(prefix="fashionserve-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        if args.bundle is not None:
            from fashionserve.tryon.bundle import read_manifest

            bundle, manifest = args.bundle.resolve(), read_manifest(args.bundle)
        else:
            bundle, manifest = _export(args, tmp)
        config = _config(manifest)
        if args.batches[-1] > manifest["max_batch_size"]:
            raise UserError(
                f"batch {args.batches[-1]} exceeds the bundle's max batch {manifest['max_batch_size']}"
            )
        models = render_repository(bundle, manifest, tmp / "repository", target="cpu")
        if args.threads:
            for model in models[1:]:  # the leaves; the first is the ensemble
                path = tmp / "repository" / model / "config.pbtxt"
                leaf = read_config(path)
                leaf.parameters["intra_op_threads"].string_value = str(args.threads)  # fashionserve.runner
                write_config(leaf, path)
        print("starting Triton")
        with TritonServer(repository=tmp / "repository") as server:
            url = server.grpc_url if args.protocol == "grpc" else server.http_url
            spec = {
                "manifest": manifest,
                "bundle": str(bundle),
                "url": url,
                "protocol": args.protocol,
                "height": config.height,
                "width": config.width,
                "batches": args.batches,
                "threads": args.threads,
            }
            triton = f"triton-{args.protocol}"
            backends = {
                REFERENCE: ("pytorch", spec),
                ORT: ("onnxruntime", {**spec, "allow_spinning": True}),
                ORT_NOSPIN: ("onnxruntime", {**spec, "allow_spinning": False}),
                triton: ("triton", spec),
            }
            measured, peaks, notes = measure(backends, args)
            with urllib.request.urlopen(f"http://{server.http_url}/v2", timeout=10) as response:
                server_version = json.load(response)["version"]
            server_peak = sum(peak_rss_mb(pid) for pid in [server.pid, *descendants(server.pid)])
    peaks[triton] = server_peak  # the server and its python-backend stubs; the client is not counted
    results = [
        Result(name, batch, latencies, peaks[name], diff)
        for (name, batch), (latencies, diff) in measured.items()
    ]
    resolution = f"{config.height}x{config.width}"
    narrow = "" if (config.condition_ngf, config.image_ngf) == (96, 64) else "-narrow"
    threads = f"-threads{args.threads}" if args.threads else ""
    stem = args.name or f"tryon-cpu-{resolution}{narrow}{threads}"
    settings = {
        "date": datetime.date.today().isoformat(),
        "command": "python bench/pipeline.py " + " ".join(sys.argv[1:]),
        **load_before,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "pipeline": ", ".join(f"{key} {value}" for key, value in config.to_dict().items()),
        "weights": manifest["weights"]
        + (" (timing does not depend on weights)" if manifest["random_init"] else ""),
        "timed calls per backend and batch": (
            f"{args.iterations}, backends one after another"
            if args.sequential
            else f"{args.iterations} in {args.rounds} alternating rounds"
        )
        + f", after {args.warmup} warm-up calls; one caller, calls back to back",
        **notes,
        "tritonserver": server_version,
        "intra-op threads asked for": args.threads or "each runtime's default",
        "triton leaves": "python backend, 1 CPU instance each, ONNX Runtime session options as onnxruntime's",
        "peak memory": "VmHWM of the worker process; for Triton the server plus its python-backend stubs",
        "numpy": np.__version__,
    }
    title = f"Try-on pipeline {resolution}{narrow}, CPU ({load_before['cpu']}, {load_before['cores']} cores)"
    lines = findings(results, triton, args.batches)
    if args.iterations < 100:
        lines.append(
            f"p95/p99 of {args.iterations} calls lie between the slowest calls (linear interpolation)."
        )
    lines.append(
        f"Absolute times hold for this machine only ({load_before['cpu']}); ratios are what to quote."
    )
    path = write_report(results, args.out, stem, title, REFERENCE, settings, lines)
    print(path.read_text())


if __name__ == "__main__":
    run(main, expected=(BenchError, ClientError, ServerError, RenderError, ExportError))
