"""Locust load test: users that send real try-on inputs to a Triton ensemble through tritonclient.

    locust -f tests/load.py                                   # web UI on http://localhost:8089
    locust -f tests/load.py --headless -u 4 -r 2 -t 60s --csv work/load/out
    locust -f tests/load.py --headless -u 2 -t 30s --protocol grpc --host 127.0.0.1:8001 --batch 2

Every user opens its own connection and sends its next request as soon as the last one returned
(closed loop), so `-u` is the number of concurrent requests. Each call is reported through Locust's
request events (type = protocol, name = `<model> batch=<n>`); a failure carries Triton's error text.

Options (Locust's custom arguments, also shown in the web UI):
  --model NAME        ensemble to load (default tryon)
  --protocol P        http (default) or grpc
  --batch N           pairs per request (default 1; at most the model's max batch)
  --dataroot DIR      VITON-HD-layout folder with <split>_pairs.txt; default: the drawn sample set,
                      generated in memory at the served model's resolution (read from its metadata)
  --split NAME        sub-folder of DATAROOT (default test)
  --max-pairs N       pairs of DATAROOT held in memory and cycled through (default 8)
--host is the Triton address (host:port; an http:// or grpc:// prefix is dropped); without it the
embedded default is used: 127.0.0.1:8000 for http, 127.0.0.1:8001 for grpc (as quickstart.sh starts it).
"""

import itertools
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import gevent
import gevent.lock
import gevent.monkey
import numpy as np
from locust import User, constant, events, task
from locust.stats import CSV_STATS_INTERVAL_SEC

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `locust` does not put the checkout on the path

from fashionserve.client import DEFAULT_URLS, PROTOCOLS, ClientError, TritonModelClient  # noqa: E402
from fashionserve.tryon.bundle import STAGES  # noqa: E402
from fashionserve.tryon.dataset import DatasetError, load_tryon_inputs, read_pairs  # noqa: E402
from fashionserve.tryon.samples import write_sample_set  # noqa: E402

if gevent.monkey.is_module_patched("socket"):
    # grpcio's C core blocks the gevent hub unless told to poll through gevent: without this one gRPC
    # user would stall all others. Only under locust's monkey-patching, and before any channel exists.
    import grpc.experimental.gevent

    grpc.experimental.gevent.init_gevent()

logger = logging.getLogger("tryon-load")
TRYON_INPUTS = STAGES[0].inputs
Batch = dict[str, np.ndarray]


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    group = parser.add_argument_group("try-on load test (tests/load.py)")
    group.add_argument("--model", default="tryon", help="ensemble to load (default tryon)")
    group.add_argument("--protocol", choices=PROTOCOLS, default="http", help="http (default) or grpc")
    group.add_argument("--batch", type=int, default=1, help="pairs per request (default 1)")
    group.add_argument(
        "--dataroot",
        default="",
        help="VITON-HD-layout folder; default: the drawn sample set at the model's resolution",
    )
    group.add_argument("--split", default="test", help="sub-folder of --dataroot (default test)")
    group.add_argument(
        "--max-pairs", type=int, default=8, help="pairs of --dataroot held in memory (default 8)"
    )


def triton_address(host: str | None, protocol: str) -> str:
    """host:port for tritonclient from Locust's --host (scheme and trailing slash dropped)."""
    if not host:
        return DEFAULT_URLS[protocol]
    return host.split("://", 1)[-1].rstrip("/")


def _load_pairs(client: TritonModelClient, dataroot: str, split: str, max_pairs: int) -> list[Batch]:
    """Inputs of one pair each, from DATAROOT or from the sample set drawn at the model's resolution."""
    if dataroot:
        root = Path(dataroot)
        pairs = read_pairs(root / f"{split}_pairs.txt")[:max_pairs]
        if not pairs:
            raise DatasetError(f"no pairs in {root / f'{split}_pairs.txt'}")
        return [load_tryon_inputs(root, person, cloth, split) for person, cloth in pairs]
    height, width = next(spec.shape[:2] for spec in client.inputs if spec.name == "cloth")
    with tempfile.TemporaryDirectory(prefix="tryon-load-") as tmp:  # nothing stays on disk
        pairs = write_sample_set(Path(tmp), height=height, width=width)
        return [load_tryon_inputs(Path(tmp), person, cloth) for person, cloth in pairs]


def make_batches(pairs: list[Batch], batch: int) -> list[Batch]:
    """The distinct requests of `batch` pairs each that cycling through `pairs` yields."""
    count = len(pairs) // math.gcd(len(pairs), batch)
    cycle = itertools.cycle(pairs)
    chunks = ([next(cycle) for _ in range(batch)] for _ in range(count))
    return [{name: np.stack([pair[name] for pair in chunk]) for name in TRYON_INPUTS} for chunk in chunks]


_workloads: dict[tuple, list[Batch]] = {}
_workload_lock = gevent.lock.BoundedSemaphore()  # users start together; load the inputs once


def _workload(client: TritonModelClient, address: str, options) -> list[Batch]:
    if options.batch < 1:
        raise ClientError(f"--batch must be at least 1, got {options.batch}")
    if options.max_pairs < 1:
        raise ClientError(f"--max-pairs must be at least 1, got {options.max_pairs}")
    names = {spec.name for spec in client.inputs}
    if names != set(TRYON_INPUTS):
        raise ClientError(
            f"model '{client.model}' takes inputs {sorted(names)}; this load test sends the try-on "
            f"contract {sorted(TRYON_INPUTS)}"
        )
    key = (address, client.model, options.dataroot, options.split, options.max_pairs, options.batch)
    with _workload_lock:
        if key not in _workloads:
            pairs = _load_pairs(client, options.dataroot, options.split, options.max_pairs)
            _workloads[key] = make_batches(pairs, options.batch)
    return _workloads[key]


class TritonUser(User):
    """One closed-loop client of the ensemble (its own connection)."""

    wait_time = constant(0)  # the next request goes out as soon as the last one returned
    _ids = itertools.count(1)
    _quit_scheduled = False

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.user_id = next(self._ids)
        self.protocol = options.protocol
        self.request_name = f"{options.model} batch={options.batch}"
        self.completed = self.failed = 0
        self.client: TritonModelClient | None = None
        address = triton_address(self.host, self.protocol)
        try:
            self.client = TritonModelClient(address, options.model, self.protocol)
            batches = _workload(self.client, address, options)
            # validate here so that a data/model mismatch is one setup failure, not one per request
            self.client.validate(batches[0])
        except (ClientError, DatasetError) as exc:
            self._setup_failed(exc)
            return
        self.batches = itertools.islice(itertools.cycle(batches), self.user_id % len(batches), None)

    def _setup_failed(self, exc: Exception) -> None:
        logger.error("user %d: %s", self.user_id, exc)
        self.environment.events.request.fire(
            request_type=self.protocol,
            name="setup",
            response_time=0,
            response_length=0,
            exception=exc,
            context={},
        )
        if self.environment.parsed_options.headless and not TritonUser._quit_scheduled:
            # Nothing would work for the rest of --run-time either. Quit after the CSV writer's next
            # pass, so that --csv holds this failure too (Locust writes it every second, not at exit).
            TritonUser._quit_scheduled = True
            gevent.spawn_later(2 * CSV_STATS_INTERVAL_SEC, self.environment.runner.quit)
        self.stop()  # ends this user before its first task, without the traceback an exception would log

    @task
    def infer(self) -> None:
        batch = next(self.batches)
        started = time.perf_counter()
        length, exception = 0, None
        try:
            outputs = self.client.infer(batch)
            length = sum(output.nbytes for output in outputs.values())
        except Exception as exc:  # report every call: a dead server raises socket errors, not ClientError
            exception = exc
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=self.request_name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length,
            exception=exception,
            context={"user": self.user_id},
        )
        if exception is None:
            self.completed += 1
        else:
            self.failed += 1

    def on_stop(self) -> None:
        if self.client is not None:
            logger.info(
                "user %d: %d requests completed, %d failed", self.user_id, self.completed, self.failed
            )
            self.client.close()
