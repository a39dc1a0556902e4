"""Side-by-side CPU benchmark of the try-on pipeline (`tryon`) or of the hair transfer pipeline
(`hair_transfer`, HairFastGAN, --pipeline hair) on this machine, in one run:

  pytorch-eager   the reference implementation (fashionserve TryonPipeline, or HairPipeline.transfer:
                  the hair stage modules chained like the ensemble), torch.inference_mode
  onnxruntime     the bundle's bare stage ONNX files chained in Python, wired like the ensemble,
                  default session options (as the server's python-backend runner uses them)
  onnxruntime-nospin  the same with intra-op thread spinning off (session.intra_op.allow_spinning=0):
                  a spinning pool of the last stage competes with the next stage's threads
  onnxruntime-concurrent  (hair) the same chain, each step started as soon as its inputs are there, as
                  Triton's ensemble scheduler does (hair_transfer embeds its three images at once,
                  computes the shape and colour targets at once, ...)
  triton-<proto>  the ensemble on the embedded Triton (cpu target: python-backend leaves
                  running the same ONNX files with ONNX Runtime), called through tritonclient

Each backend runs in its own process (so its peak memory is its own); the timed calls are spread over
rounds that alternate the backends, so background load on the machine hits all of them alike
(--sequential: one backend process at a time, for memory at 1024x768). Every
call sends the drawn samples (real inputs: try-on pairs, or a face with the next portrait's hairstyle
and the one after's hair colour) at the pipeline's resolution; outputs are checked against PyTorch.

Per stage (hair): after the end-to-end rounds, --stage-calls more calls at batch 1 time every stage:
PyTorch through forward hooks on the stage modules, the bare ONNX Runtime chain around each session
run, Triton from its per-model statistics (compute input + infer + output of each composing model).
A stage that runs several times per transfer (the encoder runs five times) is summed over its runs.

Writes <name>.md, <name>.png and <name>.json into --out.

Examples:
  python bench/pipeline.py                                   # small test configuration (256x192, narrow)
  python bench/pipeline.py --size public --batches 1,2 --iterations 4 --warmup 1 --sequential
  python bench/pipeline.py --bundle work/bundles/tryon --iterations 3 --rounds 3
  python bench/pipeline.py --threads 1     # one intra-op thread in every runtime: steadier on a busy machine
  python bench/pipeline.py --pipeline hair --threads 1     # hair_transfer at the test size (256, tiny)
  python bench/pipeline.py --pipeline hair --size large --batches 1 --iterations 3 --rounds 3 --warmup 1
  python bench/pipeline.py --pipeline hair --bundle work/bundles/hair --torch-weights pipeline.pt
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
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.bench import (  # noqa: E402
    Result,
    StageTimer,
    descendants,
    hair_sample_batches,
    machine,
    peak_rss_mb,
    sample_batches,
    stage_summary,
    write_report,
)
from fashionserve.cli import UserError, command_parser, run  # noqa: E402
from fashionserve.client import PROTOCOLS, ClientError, TritonModelClient  # noqa: E402
from fashionserve.hair.stages import HairConfig  # noqa: E402
from fashionserve.launcher import ServerError, TritonServer  # noqa: E402
from fashionserve.onnx_export import ExportError  # noqa: E402
from fashionserve.repository import (  # noqa: E402
    RenderError,
    ensemble_steps,
    pipeline_ensembles,
    read_config,
    render_repository,
    write_config,
)
from fashionserve.tryon.stages import TryonConfig  # noqa: E402

REFERENCE = "pytorch-eager"
ORT = "onnxruntime"
ORT_NOSPIN = "onnxruntime-nospin"
ORT_CONCURRENT = "onnxruntime-concurrent"
Config = TryonConfig | HairConfig
Batch = dict[str, np.ndarray]
# one call at batch 1 -> (seconds per stage, runs per stage)
StageCall = Callable[[Batch], tuple[dict[str, float], dict[str, int]]]


@dataclass(frozen=True)
class Benchmarked:
    """A pipeline this script benchmarks: the tracked ensemble it times and its size presets."""

    ensemble: str
    config_class: type[TryonConfig] | type[HairConfig]
    sizes: dict[str, Config]
    title: str


PIPELINES = {  # by the bundle manifest's "pipeline"
    "tryon": Benchmarked(
        "tryon",
        TryonConfig,
        {
            # the configuration of the test suite (tests/conftest.py TEST_CONFIG): minutes on 2 cores
            "small": TryonConfig(
                height=256, width=192, condition_height=128, condition_width=96,
                condition_ngf=8, image_ngf=8, spade_hidden=16,
            ),
            "medium": TryonConfig(height=512, width=384),  # public widths, half the resolution
            "public": TryonConfig(),  # HR-VITON's 1024x768: seconds to tens of seconds a call on a CPU
        },
        "Try-on pipeline",
    ),
    "hair": Benchmarked(
        "hair_transfer",
        HairConfig,
        {
            "small": HairConfig(image_size=256, widths="tiny"),  # tests/conftest.py HAIR_CONFIG
            # the released networks' widths with a smaller StyleGAN2 (and FS encoder input)
            "medium": HairConfig(image_size=256),
            "large": HairConfig(image_size=512),
            "public": HairConfig(),  # FFHQ 1024, HairFastGAN's configuration
        },
        "Hair transfer pipeline",
    ),
}  # fmt: skip


class BenchError(Exception):
    """A backend could not be set up or run (one line)."""


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.add_argument(
        "--pipeline",
        choices=PIPELINES,
        default="tryon",
        help="tryon (the tryon ensemble) or hair (the hair_transfer ensemble); default tryon",
    )
    parser.add_argument(
        "--size",
        choices=("small", "medium", "large", "public"),
        default="small",
        help="pipeline to export (random-init): small (the tests' configuration), medium, public; "
        "hair also large (medium: 256 px, large: 512 px, public widths)",
    )
    parser.add_argument("--bundle", type=Path, help="use this exported bundle instead of exporting one")
    parser.add_argument("--seed", type=int, default=0, help="random-init seed of the export (default 0)")
    parser.add_argument(
        "--torch-weights",
        type=Path,
        help="hair: state_dict (torch.save) of the HairPipeline the --bundle was exported from, for "
        "pytorch-eager when the manifest's seed does not rebuild it (e.g. the tests' modified networks)",
    )
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes (default 1,4)")
    parser.add_argument(
        "--iterations", type=int, default=20, help="timed calls per backend and batch (default 20)"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="rounds the timed calls are spread over (default 4)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2, at least 1)")
    parser.add_argument(
        "--stage-calls",
        type=int,
        default=3,
        help="hair: calls at batch 1 timed per stage after the rounds (default 3; 0: no per-stage table)",
    )
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
    parser.add_argument(
        "--name",
        help="report file name stem (default <tryon|hair>-cpu-<H>x<W>[-narrow][-threads<N>])",
    )
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
        or args.stage_calls < 0
    ):
        parser.error(
            "batches, --iterations and --warmup must be at least 1, --rounds 1..--iterations, "
            "--stage-calls at least 0"
        )
    if args.size not in PIPELINES[args.pipeline].sizes:
        parser.error(f"--size {args.size} is not a {args.pipeline} size")
    if args.torch_weights is not None and args.pipeline != "hair":
        parser.error("--torch-weights applies to --pipeline hair")
    return args


def _config(manifest: dict) -> Config:
    config_class = PIPELINES[manifest["pipeline"]].config_class
    names = {f.name for f in fields(config_class)}
    return config_class(**{k: v for k, v in manifest["config"].items() if k in names})


def _contract(manifest: dict, ensemble: str) -> dict:
    """Input and output contract of `ensemble`; a bundle serving several lists each under `ensembles`."""
    return manifest.get("ensembles", {}).get(ensemble, manifest)


def _label(config: Config) -> str:
    """Resolution, and -narrow (try-on) or -tiny (hair) where the networks are narrower than the public
    ones."""
    if isinstance(config, HairConfig):
        tiny = "" if config.widths == "public" else f"-{config.widths}"
        return f"{config.image_size}x{config.image_size}{tiny}"
    narrow = (config.condition_ngf, config.image_ngf) != (96, 64)
    return f"{config.height}x{config.width}" + ("-narrow" if narrow else "")


# Each worker imports only its own runtime (inside these functions), so that its peak memory is what
# that backend needs and not, say, torch loaded into the ONNX Runtime process.
def _hair_weights(manifest: dict):
    """The released files a checkpoint bundle was exported from (HairWeights), None for random-init."""
    from fashionserve.hair.bundle import HairWeights

    if manifest["random_init"]:
        return None
    clip = Path(manifest["checkpoints"]["clip"]["path"])
    return HairWeights(Path(manifest["hairfast_dir"]), clip)


def _pytorch_runner(spec: dict) -> tuple[Callable[[Batch], np.ndarray], dict, StageCall | None]:
    import torch

    manifest = spec["manifest"]
    stage_call = None
    if manifest["pipeline"] == "hair":
        from fashionserve.hair.bundle import load_networks as load_hair

        hair, _ = load_hair(_config(manifest), _hair_weights(manifest), seed=manifest["seed"])
        if spec["torch_weights"]:
            hair.load_state_dict(torch.load(spec["torch_weights"], weights_only=True))
        forward = hair.transfer  # the stages chained like hair_transfer (tests/test_hairfast_transfer.py)
        timer = StageTimer(hair.stages)

        def stage_call(batch: Batch) -> tuple[dict[str, float], dict[str, int]]:
            timer.reset()
            call(batch)
            return timer.seconds, timer.calls
    else:
        from fashionserve.tryon.bundle import load_networks

        keys = ("condition_checkpoint", "image_checkpoint")
        checkpoints = [Path(manifest[k]) if manifest.get(k) else None for k in keys]
        forward, _ = load_networks(_config(manifest), *checkpoints, seed=manifest["seed"])
    # the forward's argument order is the ensemble's input order
    names = [tensor["name"] for tensor in _contract(manifest, spec["ensemble"])["input_contract"]]
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])

    def call(batch: Batch) -> np.ndarray:
        with torch.inference_mode():
            return forward(*(torch.from_numpy(batch[name]) for name in names)).numpy()

    return call, {"torch": torch.__version__, "intra-op threads": torch.get_num_threads()}, stage_call


def _onnxruntime_runner(spec: dict) -> tuple[Callable[[Batch], np.ndarray], dict, StageCall | None]:
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
    steps = ensemble_steps(spec["ensemble"])  # hair_transfer runs preprocess, encoder and parser twice each
    output = _contract(manifest, spec["ensemble"])["output_contract"][0]["name"]
    # session.run releases the GIL, so threads run steps at once (none starts before the first submit)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(steps))

    seconds: dict[str, float] = {}  # per model over the current call (sequential chain only)
    calls: dict[str, int] = {}

    def run_step(step, feeds: Batch) -> Batch:
        session = sessions[step.model_name]
        started = time.perf_counter()
        results = session.run(None, feeds)
        name = step.model_name
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
        calls[name] = calls.get(name, 0) + 1
        return {
            step.output_map[o.name]: r
            for o, r in zip(session.get_outputs(), results, strict=True)
            if o.name in step.output_map  # a step may leave an output unused
        }

    def feeds(step, values: Batch) -> Batch:
        return {i.name: values[step.input_map[i.name]] for i in sessions[step.model_name].get_inputs()}

    def call(batch: Batch) -> np.ndarray:
        values = dict(batch)  # ensemble tensor name -> value
        seconds.clear()
        calls.clear()
        if not spec["concurrent"]:
            for step in steps:
                values.update(run_step(step, feeds(step, values)))
            return values[output]
        waiting, running = list(steps), {}
        while waiting or running:
            for step in [s for s in waiting if all(t in values for t in s.input_map.values())]:
                waiting.remove(step)
                running[pool.submit(run_step, step, feeds(step, values))] = step
            if not running:
                raise BenchError(f"{spec['ensemble']}: steps wait on tensors that no step makes")
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                del running[future]
                values.update(future.result())
        return values[output]

    def stage_call(batch: Batch) -> tuple[dict[str, float], dict[str, int]]:
        call(batch)
        return dict(seconds), dict(calls)

    # steps that overlap have no per-stage time of their own
    staged = spec["manifest"]["pipeline"] == "hair" and not spec["concurrent"]
    return call, {"onnxruntime": ort.__version__}, stage_call if staged else None


def _triton_runner(spec: dict) -> tuple[Callable[[Batch], np.ndarray], dict, StageCall | None]:
    client = TritonModelClient(spec["url"], spec["ensemble"], spec["protocol"])
    output = client.outputs[0]

    def call(batch: Batch) -> np.ndarray:
        return client.infer(batch)[output]

    def stage_call(batch: Batch) -> tuple[dict[str, float], dict[str, int]]:
        """The server's compute time per composing model over one call (its statistics' difference)."""
        before = _model_compute(spec["http_url"])
        call(batch)
        after = _model_compute(spec["http_url"])
        models = [m for m in after if m != spec["ensemble"] and after[m][1] > before.get(m, (0, 0))[1]]
        return (
            {m: (after[m][0] - before.get(m, (0, 0))[0]) / 1e9 for m in models},
            {m: after[m][1] - before.get(m, (0, 0))[1] for m in models},
        )

    return call, {}, stage_call if spec["manifest"]["pipeline"] == "hair" else None


def _model_compute(http_url: str) -> dict[str, tuple[int, int]]:
    """Triton's statistics: model -> (compute input + infer + output nanoseconds of its executions,
    requests). The time comes from the per-execution batch statistics: Triton may run several steps'
    requests to one model as one batched execution, and its per-request statistics would charge that
    execution to each of them."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/stats", timeout=30) as response:
        stats = json.load(response)["model_stats"]
    phases = ("compute_input", "compute_infer", "compute_output")
    totals: dict[str, tuple[int, int]] = {}
    for model in stats:
        ns = sum(int(batch[k]["ns"]) for batch in model.get("batch_stats", []) for k in phases)
        requests = int(model["inference_stats"]["success"]["count"])
        ns_sum, count = totals.get(model["name"], (0, 0))  # several versions: summed
        totals[model["name"]] = (ns_sum + ns, count + requests)
    return totals


RUNNERS = {"pytorch": _pytorch_runner, "onnxruntime": _onnxruntime_runner, "triton": _triton_runner}


def _serve(kind: str, spec: dict, conn: multiprocessing.connection.Connection) -> None:
    """Worker process: set the backend up, then answer (batch, calls) with (latencies, last output, peak)
    and ("stages", calls) with the per-stage summary of that many calls at batch 1 (None: not timed)."""
    try:
        call, notes, stage_call = RUNNERS[kind](spec)
        if spec["manifest"]["pipeline"] == "hair":
            inputs = hair_sample_batches(spec["height"], spec["batches"])
        else:
            inputs = sample_batches(spec["height"], spec["width"], spec["batches"])
        conn.send(("ready", notes))
        while (request := conn.recv()) is not None:
            if request[0] == "stages":
                conn.send(("ok", _stage_summary(stage_call, inputs[1], request[1])))
                continue
            batch, calls = request
            latencies, output = [], None
            for _ in range(calls):
                started = time.perf_counter()
                output = call(inputs[batch])
                latencies.append(time.perf_counter() - started)
            conn.send(("ok", (latencies, output, peak_rss_mb())))
    except Exception as exc:  # any failure ends the benchmark with this one line
        conn.send(("error", f"{kind}: {type(exc).__name__}: {exc}".splitlines()[0]))


def _stage_summary(stage_call: StageCall | None, batch: Batch, calls: int) -> dict | None:
    if stage_call is None:
        return None
    timed = [stage_call(batch) for _ in range(calls)]
    return stage_summary([seconds for seconds, _ in timed], timed[-1][1])


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

    def stages(self, calls: int) -> dict | None:
        """Per-stage summary of `calls` calls at batch 1, or None where the backend has none."""
        self._conn.send(("stages", calls))
        return self._receive()

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(None)
        self._process.join(timeout=30)


def _export_bundle(pipeline: str, size: str, seed: int, bundle: Path) -> dict:
    config = PIPELINES[pipeline].sizes[size]

    def log(line: str) -> None:
        print(f"  {line}", flush=True)

    if pipeline == "hair":
        from fashionserve.hair.bundle import export_bundle as export_hair
        from fashionserve.hair.bundle import load_networks as load_hair

        hair, provenance = load_hair(config, None, seed=seed)
        return export_hair(hair, provenance, bundle, log=log)
    from fashionserve.tryon.bundle import export_bundle, load_networks

    tryon, provenance = load_networks(config, None, None, seed=seed)
    return export_bundle(tryon, config, provenance, bundle, log=log)


def _export(args: argparse.Namespace, tmp: Path) -> tuple[Path, dict]:
    label = _label(PIPELINES[args.pipeline].sizes[args.size])
    print(f"exporting the {args.size} {args.pipeline} pipeline ({label}, random-init seed {args.seed})")
    # in a child process: the export's gigabytes at 1024x768 are returned to the system when it ends
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        manifest = pool.submit(_export_bundle, args.pipeline, args.size, args.seed, tmp / "bundle").result()
    return tmp / "bundle", manifest


def _rounds(iterations: int, rounds: int) -> list[int]:
    return [iterations // rounds + (i < iterations % rounds) for i in range(rounds)]


Measured = dict[tuple[str, int], tuple[list[float], int, float]]


def measure(
    backends: dict[str, tuple[str, dict]], args: argparse.Namespace
) -> tuple[Measured, dict[str, float], dict, dict[str, dict]]:
    """Run every backend (the reference first): (backend, batch) -> (latencies, max and mean
    |output - reference|), peak memory per backend, what the workers report about their runtimes, and
    the per-stage summaries at batch 1 of the backends that time stages."""
    groups = [[name] for name in backends] if args.sequential else [list(backends)]
    references: dict[int, np.ndarray] = {}
    measured: Measured = {}
    peaks: dict[str, float] = {}
    notes: dict = {}
    stages: dict[str, dict] = {}
    for group in groups:
        workers: list[Worker] = []
        try:
            for name in group:
                print(f"starting {name}", flush=True)
                workers.append(Worker(name, *backends[name]))
            measured.update(_measure_together(workers, args, references))
            if args.stage_calls and 1 in args.batches:
                for worker in workers:
                    print(f"per stage: {worker.name} batch 1 x{args.stage_calls}", flush=True)
                    summary = worker.stages(args.stage_calls)
                    if summary:
                        stages[worker.name] = summary
        finally:
            for worker in workers:
                worker.close()
        for worker in workers:
            peaks[worker.name] = worker.peak_mb
            notes.update(worker.notes)
    return measured, peaks, notes, stages


def _measure_together(
    workers: list[Worker], args: argparse.Namespace, references: dict[int, np.ndarray]
) -> Measured:
    diffs: dict[tuple[str, int], tuple[int, float]] = {}
    for batch in args.batches:
        for worker in workers:
            _, output = worker.run(batch, args.warmup)
            reference = references.setdefault(batch, output.astype(np.int16))  # the first backend's
            difference = np.abs(output - reference)
            diffs[worker.name, batch] = int(difference.max()), float(difference.mean())
    latencies: dict[tuple[str, int], list[float]] = {key: [] for key in diffs}
    for index, calls in enumerate(_rounds(args.iterations, args.rounds), start=1):
        for batch in args.batches:
            for worker in workers:
                print(f"round {index}/{args.rounds}: {worker.name} batch {batch} x{calls}", flush=True)
                latencies[worker.name, batch] += worker.run(batch, calls)[0]
    return {key: (latencies[key], *diffs[key]) for key in diffs}


def findings(results: list[Result], triton: str, batches: list[int]) -> list[str]:
    """The goal ratios, worded for the report."""
    by_key = {(r.backend, r.batch): r for r in results}

    def overhead(bare: str, batch: int) -> float:
        return by_key[triton, batch].percentile_ms(50) / by_key[bare, batch].percentile_ms(50) - 1

    def speedup(backend: str, batch: int) -> float:
        return by_key[backend, batch].throughput / by_key[REFERENCE, batch].throughput

    bares = [name for name in (ORT, ORT_NOSPIN, ORT_CONCURRENT) if (name, batches[0]) in by_key]
    lines = []
    for bare in bares:
        values = {b: overhead(bare, b) for b in batches}
        met = batches[0] == 1 and values[1] < 0.10
        listing = "; ".join(f"batch {b}: {value:+.1%}" for b, value in values.items())
        lines.append(
            f"Ensemble overhead over the bare networks ({triton} p50 vs {bare} p50): {listing}. "
            f"Goal < 10% at batch 1: {'met' if met else 'not met'}."
        )
    for backend in bares:
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
            from fashionserve.bundle import read_manifest

            bundle, manifest = args.bundle.resolve(), read_manifest(args.bundle)
            if manifest["pipeline"] != args.pipeline:
                raise UserError(
                    f"{args.bundle} is a {manifest['pipeline']} bundle, not {args.pipeline} "
                    f"(choose it with --pipeline)"
                )
        else:
            bundle, manifest = _export(args, tmp)
        benchmarked = PIPELINES[args.pipeline]
        config = _config(manifest)
        if args.batches[-1] > manifest["max_batch_size"]:
            raise UserError(
                f"batch {args.batches[-1]} exceeds the bundle's max batch {manifest['max_batch_size']}"
            )
        models = render_repository(bundle, manifest, tmp / "repository", target="cpu")
        if args.threads:
            for model in set(models) - set(pipeline_ensembles(manifest)):  # the leaves
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
                "ensemble": benchmarked.ensemble,
                "http_url": server.http_url,
                "torch_weights": str(args.torch_weights) if args.torch_weights else None,
                "height": manifest["config"]["height"],
                "width": manifest["config"]["width"],
                "batches": args.batches,
                "threads": args.threads,
            }
            triton = f"triton-{args.protocol}"
            backends = {
                REFERENCE: ("pytorch", spec),
                ORT: ("onnxruntime", {**spec, "allow_spinning": True, "concurrent": False}),
                ORT_NOSPIN: ("onnxruntime", {**spec, "allow_spinning": False, "concurrent": False}),
            }
            if args.pipeline == "hair":  # independent steps, which the ensemble runs at once
                concurrent_spec = {**spec, "allow_spinning": True, "concurrent": True}
                backends[ORT_CONCURRENT] = ("onnxruntime", concurrent_spec)
            backends[triton] = ("triton", spec)
            measured, peaks, notes, stages = measure(backends, args)
            with urllib.request.urlopen(f"http://{server.http_url}/v2", timeout=10) as response:
                server_version = json.load(response)["version"]
            server_peak = sum(peak_rss_mb(pid) for pid in [server.pid, *descendants(server.pid)])
    peaks[triton] = server_peak  # the server and its python-backend stubs; the client is not counted
    results = [
        Result(name, batch, latencies, peaks[name], max_diff, mean_diff=mean_diff)
        for (name, batch), (latencies, max_diff, mean_diff) in measured.items()
    ]
    label = _label(config)
    threads = f"-threads{args.threads}" if args.threads else ""
    stem = args.name or f"{args.pipeline}-cpu-{label}{threads}"
    settings = {
        "date": datetime.date.today().isoformat(),
        "command": "python bench/pipeline.py " + " ".join(sys.argv[1:]),
        **load_before,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "ensemble": benchmarked.ensemble,
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
    title = f"{benchmarked.title} {label}, CPU ({load_before['cpu']}, {load_before['cores']} cores)"
    lines = findings(results, triton, args.batches)
    if args.pipeline == "hair":
        lines.append(
            "Max abs diff: where the face parser's two best classes nearly tie, ONNX Runtime and PyTorch "
            "may pick different labels, which moves a hair mask by a pixel band; the mean abs diff says "
            "whether the images agree."
        )
    if stages:
        lines.append(
            "Per stage: medians over the per-stage calls; a stage's time sums its runs in one transfer. "
            "Triton's column is the server's compute time per composing model (python-backend leaves: "
            "the ONNX Runtime run plus the stub's tensor transfer); the ensemble's scheduling is the "
            "end-to-end p50 minus the sum."
        )
    if args.iterations < 100:
        lines.append(
            f"p95/p99 of {args.iterations} calls lie between the slowest calls (linear interpolation)."
        )
    lines.append(
        f"Absolute times hold for this machine only ({load_before['cpu']}); ratios are what to quote."
    )
    path = write_report(results, args.out, stem, title, REFERENCE, settings, lines, stages)
    print(path.read_text())


if __name__ == "__main__":
    run(main, expected=(BenchError, ClientError, ServerError, RenderError, ExportError))
