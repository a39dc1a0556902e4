"""Side-by-side CPU benchmark of the try-on pipeline on this machine, in one run:

  pytorch-eager   the reference implementation (fashionserve TryonPipeline), torch.inference_mode
  onnxruntime     the bundle's bare stage ONNX files chained in Python, wired like the ensemble,
                  default session options (as the server's python-backend runner uses them)
  onnxruntime-nospin  the same with intra-op thread spinning off (session.intra_op.allow_spinning=0):
                  a spinning pool of the last stage competes with the next stage's threads
  triton-<proto>  the `tryon` ensemble on the embedded Triton (cpu target: python-backend leaves
                  running the same ONNX files with ONNX Runtime), called through tritonclient

Each backend runs in its own process (so its peak memory is its own); the timed calls are spread over
rounds that alternate the backends, so background load on the machine hits all of them alike. Every
call sends the drawn sample pairs (real inputs) at the pipeline's resolution; outputs are checked
against PyTorch. Writes <name>.md, <name>.png and <name>.json into --out.

Examples:
  python bench/pipeline.py                                   # small test configuration (256x192, narrow)
  python bench/pipeline.py --size public --batches 1,2 --iterations 3 --rounds 3 --warmup 1
  python bench/pipeline.py --bundle work/bundles/tryon --iterations 3 --rounds 3
"""

import argparse
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
from fashionserve.repository import RenderError, ensemble_steps, render_repository  # noqa: E402
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
        "--size", choices=SIZES, default="small", help="pipeline to export (random-init): small or public"
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
        "--protocol", choices=PROTOCOLS, default="grpc", help="Triton protocol (default grpc)"
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

    def call(batch: Batch) -> np.ndarray:
        with torch.inference_mode():
            return pipeline(*(torch.from_numpy(batch[name]) for name in names)).numpy()

    return call, {"torch": torch.__version__, "intra-op threads": torch.get_num_threads()}


def _onnxruntime_runner(spec: dict) -> tuple[Callable[[Batch], np.ndarray], dict]:
    import onnxruntime as ort

    manifest = spec["manifest"]
    options = ort.SessionOptions()
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

    def _receive(self):
        if not self._conn.poll(3600):
            raise BenchError(f"{self.name}: no answer within an hour")
        try:
            status, payload = self._conn.recv()
        except EOFError:
            raise BenchError(
                f"{self.name}: worker process died (exit code {self._process.exitcode})"
            ) from None
        if status == "error":
            raise BenchError(payload)
        return payload

    def run(self, batch: int, calls: int) -> tuple[list[float], np.ndarray]:
        self._conn.send((batch, calls))
        latencies, output, self.peak_mb = self._receive()
        return latencies, output

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(None)
        self._process.join(timeout=30)


def _export(args: argparse.Namespace, tmp: Path) -> tuple[Path, dict]:
    from fashionserve.tryon.bundle import export_bundle, load_networks

    config = SIZES[args.size]
    print(
        f"exporting the {args.size} pipeline ({config.height}x{config.width}, random-init seed {args.seed})"
    )
    pipeline, provenance = load_networks(config, None, None, seed=args.seed)
    bundle = tmp / "bundle"
    manifest = export_bundle(pipeline, config, provenance, bundle, log=lambda line: print(f"  {line}"))
    return bundle, manifest


def _rounds(iterations: int, rounds: int) -> list[int]:
    return [iterations // rounds + (i < iterations % rounds) for i in range(rounds)]


def measure(
    workers: list[Worker], args: argparse.Namespace
) -> dict[tuple[str, int], tuple[list, int | None]]:
    """(backend, batch) -> (latencies, max |output - reference|)."""
    diffs: dict[tuple[str, int], int | None] = {}
    for batch in args.batches:
        reference = None
        for worker in workers:
            _, output = worker.run(batch, args.warmup)
            if worker.name == REFERENCE:
                reference = output.astype(np.int16)
            diffs[worker.name, batch] = None if reference is None else int(np.abs(output - reference).max())
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
        render_repository(bundle, manifest, tmp / "repository", target="cpu")
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
            }
            triton = f"triton-{args.protocol}"
            kinds = {
                REFERENCE: ("pytorch", {}),
                ORT: ("onnxruntime", {"allow_spinning": True}),
                ORT_NOSPIN: ("onnxruntime", {"allow_spinning": False}),
                triton: ("triton", {}),
            }
            workers: list[Worker] = []
            try:
                for name, (kind, extra) in kinds.items():
                    print(f"starting {name}")
                    workers.append(Worker(name, kind, {**spec, **extra}))
                measured = measure(workers, args)
            finally:
                for worker in workers:
                    worker.close()
            with urllib.request.urlopen(f"http://{server.http_url}/v2", timeout=10) as response:
                server_version = json.load(response)["version"]
            server_peak = sum(peak_rss_mb(pid) for pid in [server.pid, *descendants(server.pid)])
    peaks = {worker.name: worker.peak_mb for worker in workers}
    peaks[triton] = server_peak  # the server and its python-backend stubs; the client is not counted
    results = [
        Result(name, batch, latencies, peaks[name], diff)
        for (name, batch), (latencies, diff) in measured.items()
    ]
    notes = {key: value for worker in workers for key, value in worker.notes.items()}
    resolution = f"{config.height}x{config.width}"
    narrow = "" if (config.condition_ngf, config.image_ngf) == (96, 64) else "-narrow"
    stem = args.name or f"tryon-cpu-{resolution}{narrow}"
    settings = {
        "date": datetime.date.today().isoformat(),
        "command": "python bench/pipeline.py " + " ".join(sys.argv[1:]),
        **load_before,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "pipeline": ", ".join(f"{key} {value}" for key, value in config.to_dict().items()),
        "weights": manifest["weights"]
        + (" (timing does not depend on weights)" if manifest["random_init"] else ""),
        "timed calls per backend and batch": f"{args.iterations} in {args.rounds} alternating rounds, "
        f"after {args.warmup} warm-up calls; one caller, calls back to back",
        **notes,
        "tritonserver": server_version,
        "triton leaves": "python backend, 1 CPU instance each, ONNX Runtime default session options",
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
