"""Locust load test: users that send real inputs to a Triton ensemble through tritonclient.

    locust -f tests/load.py                                   # web UI on http://127.0.0.1:8089
    locust -f tests/load.py --headless -u 4 -r 2 -t 60s --csv work/load/out
    locust -f tests/load.py --headless -u 2 -t 30s --protocol grpc --host 127.0.0.1:8001 --batch 2
    locust -f tests/load.py --headless -u 8 -t 30s --model garment_classifier --batch 4

Every user opens its own connection and sends its next request as soon as the last one returned
(closed loop), so `-u` is the number of concurrent requests. Each call is reported through Locust's
request events (type = protocol, name = `<model> batch=<n>`); a failure carries Triton's error text.
What is sent follows the served model's inputs (read from its metadata):

  tryon                try-on pairs: the drawn sample set at the model's resolution, or the pairs of
                       a VITON-HD folder (--dataroot)
  garment_classifier   product photos: drawn ones (256x192, one per class), or the cloth images of
                       the pairs of a VITON-HD folder (--dataroot)
  fashion_generator    latent vectors drawn from N(0, I) with seed 1, as client/generate.py draws them
  hair_transfer        the drawn sample portraits at the model's size as faces, each with the next
                       one as the hairstyle (shape) reference and the one after as the colour reference
  hair_edit            the drawn sample portraits with client/hair.py's sample direction, strengths
                       spread over [-3, 3]
  web                  not a Triton model: people on the web app (`python -m web`; --host is its
                       URL, default http://127.0.0.1:8080), each sending the pages' requests in turn
                       (--web-pages): try-on with the catalogue's first pair, a hairstyle transfer
                       (face, hairstyle and colour: three different drawn samples) and an edit of one

    locust -f tests/load.py --headless -u 8 -t 60s --model web --host http://127.0.0.1:8080

Options (Locust's custom arguments, also shown in the web UI):
  --model NAME        ensemble to load (default tryon)
  --protocol P        http (default) or grpc
  --batch N           samples per request (default 1; at most the model's max batch)
  --dataroot DIR      VITON-HD-layout folder with <split>_pairs.txt (default: drawn inputs)
  --split NAME        sub-folder of DATAROOT (default test)
  --samples N         inputs held in memory and cycled through (default 10)
  --web-pages LIST    with --model web: which pages' requests to send (default tryon,hair,edit)
  --request-log FILE  append one line per request to FILE: completion time (Unix seconds), latency ms,
                      1 if it failed else 0 (bench/soak.py computes its per-interval percentiles from it)
--host is the Triton address (host:port; an http:// or grpc:// prefix is dropped); without it the
embedded default is used: 127.0.0.1:8000 for http, 127.0.0.1:8001 for grpc (as quickstart.sh starts it).
"""

import argparse
import itertools
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gevent
import gevent.lock
import gevent.monkey
import numpy as np
from locust import HttpUser, User, constant, events, task
from locust.stats import CSV_STATS_INTERVAL_SEC
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `locust` does not put the checkout on the path

from fashionserve.catalogue.samples import draw_product_photo  # noqa: E402
from fashionserve.client import DEFAULT_URLS, PROTOCOLS, ClientError, TritonModelClient  # noqa: E402
from fashionserve.hair.samples import sample_direction, sample_portraits  # noqa: E402
from fashionserve.processes import HOST  # noqa: E402
from fashionserve.tryon.dataset import DatasetError, cloth_files, load_tryon_inputs, read_pairs  # noqa: E402
from fashionserve.tryon.samples import write_sample_set  # noqa: E402

if gevent.monkey.is_module_patched("socket"):
    # grpcio's C core blocks the gevent hub unless told to poll through gevent: without this one gRPC
    # user would stall all others. Only under locust's monkey-patching, and before any channel exists.
    import grpc.experimental.gevent

    grpc.experimental.gevent.init_gevent()

logger = logging.getLogger("fashionserve-load")
Sample = dict[str, np.ndarray]  # one input of the model, without the batch dimension
TRYON_INPUTS = ("cloth", "cloth_mask", "agnostic", "densepose", "parse_agnostic")  # the README's contract
PHOTO_SIZE = (256, 192)  # drawn product photos (the classifier takes any size)
PHOTO_CLASSES = 10
LATENT_SEED = 1  # client/generate.py's default
WEB_MODEL = "web"
WEB_PAGES = ("tryon", "hair", "edit")


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    # Locust serves its web UI (and a master its workers) on every interface by default; this load test
    # is for this machine only, like the Triton it loads. --web-host / --master-bind-host still override.
    parser.set_defaults(web_host=HOST, master_bind_host=HOST)
    group = parser.add_argument_group("fashionserve load test (tests/load.py)")
    group.add_argument("--model", default="tryon", help="ensemble to load (default tryon)")
    group.add_argument("--protocol", choices=PROTOCOLS, default="http", help="http (default) or grpc")
    group.add_argument("--batch", type=int, default=1, help="samples per request (default 1)")
    group.add_argument("--dataroot", default="", help="VITON-HD-layout folder (default: drawn inputs)")
    group.add_argument("--split", default="test", help="sub-folder of --dataroot (default test)")
    group.add_argument("--samples", type=int, default=10, help="inputs held in memory (default 10)")
    group.add_argument(
        "--web-pages",
        default=",".join(WEB_PAGES),
        help=f"with --model {WEB_MODEL}: the pages whose requests to send (default {','.join(WEB_PAGES)})",
    )
    group.add_argument(
        "--request-log",
        default="",
        help="append 'time latency_ms failed' per request to this file (default: none)",
    )


@events.init.add_listener
def _pick_user_class(environment, **_) -> None:
    """`--model web` runs WebUser (people on the web app); any other model, TritonUser."""
    options = environment.parsed_options
    wanted = WebUser if options is not None and options.model == WEB_MODEL else TritonUser
    environment.user_classes[:] = [wanted]


@events.init.add_listener
def _open_request_log(environment, **_) -> None:
    """--request-log: every request's completion time, latency and outcome, one line each, written as it
    completes (line-buffered), so a reader sees the requests of each interval while the test runs."""
    options = environment.parsed_options
    if options is None or not options.request_log:
        return
    log = open(options.request_log, "a", buffering=1)  # noqa: SIM115 (open for the whole test)

    def write(response_time: float, exception: BaseException | None, **_) -> None:
        log.write(f"{time.time():.3f} {response_time:.3f} {int(exception is not None)}\n")

    environment.events.request.add_listener(write)
    environment.events.quitting.add_listener(lambda **_: log.close())


def triton_address(host: str | None, protocol: str) -> str:
    """host:port for tritonclient from Locust's --host (scheme and trailing slash dropped)."""
    if not host:
        return DEFAULT_URLS[protocol]
    return host.split("://", 1)[-1].rstrip("/")


def _pairs(options: argparse.Namespace) -> list[tuple[str, str]]:
    pairs_file = Path(options.dataroot) / f"{options.split}_pairs.txt"
    pairs = read_pairs(pairs_file)[: options.samples]
    if not pairs:
        raise DatasetError(f"no pairs in {pairs_file}")
    return pairs


def tryon_samples(client: TritonModelClient, options: argparse.Namespace) -> list[Sample]:
    """Try-on pairs from DATAROOT, or from the sample set drawn at the model's resolution."""
    if options.dataroot:
        root = Path(options.dataroot)
        return [load_tryon_inputs(root, person, cloth, options.split) for person, cloth in _pairs(options)]
    height, width = next(spec.shape[:2] for spec in client.inputs if spec.name == "cloth")
    with tempfile.TemporaryDirectory(prefix="fashionserve-load-") as tmp:  # nothing stays on disk
        pairs = write_sample_set(Path(tmp), height=height, width=width)
        return [load_tryon_inputs(Path(tmp), person, cloth) for person, cloth in pairs]


def photo_samples(client: TritonModelClient, options: argparse.Namespace) -> list[Sample]:
    """Product photos: the cloth images of DATAROOT's pairs, or drawn ones (one per class)."""
    if not options.dataroot:
        return [
            {"image": draw_product_photo(label, *PHOTO_SIZE, seed=label)} for label in range(PHOTO_CLASSES)
        ]
    photos = []
    for _, cloth in _pairs(options):
        path = cloth_files(Path(options.dataroot) / options.split, cloth)["cloth image"]
        try:
            with Image.open(path) as image:
                photos.append({"image": np.asarray(image.convert("RGB"))})
        except OSError as exc:
            raise DatasetError(f"cannot read cloth image {path}: {exc}") from None
    if options.batch > 1 and len({photo["image"].shape for photo in photos}) > 1:
        raise DatasetError(f"the cloth images under {options.dataroot} differ in size; use --batch 1")
    return photos


def latent_samples(client: TritonModelClient, options: argparse.Namespace) -> list[Sample]:
    """Latent vectors drawn from N(0, I)."""
    if options.dataroot:
        raise ClientError(f"model '{client.model}' takes latent vectors; --dataroot is not used with it")
    (dimension,) = client.inputs[0].shape
    latents = np.random.default_rng(LATENT_SEED).standard_normal((options.samples, dimension))
    return [{"latents": vector} for vector in latents.astype(np.float32)]


def _portraits(client: TritonModelClient, options: argparse.Namespace, name: str) -> list[np.ndarray]:
    """The drawn sample portraits at the size of the model's input `name`."""
    if options.dataroot:
        raise ClientError(f"model '{client.model}' takes drawn portraits; --dataroot is not used with it")
    size = next(spec.shape[0] for spec in client.inputs if spec.name == name)
    return list(sample_portraits(size).values())


def hair_transfer_samples(client: TritonModelClient, options: argparse.Namespace) -> list[Sample]:
    """The drawn sample portraits, each with the next one's hairstyle and the one after's colour."""
    faces = _portraits(client, options, "face")
    shapes, colors = faces[1:] + faces[:1], faces[2:] + faces[:2]
    return [
        {"face": face, "shape_reference": shape, "color_reference": color}
        for face, shape, color in zip(faces, shapes, colors, strict=True)
    ]


def hair_edit_samples(client: TritonModelClient, options: argparse.Namespace) -> list[Sample]:
    """The drawn sample portraits along the sample direction, at strengths spread over [-3, 3]."""
    n_latent, style_dim = next(spec.shape for spec in client.inputs if spec.name == "direction")
    direction = np.repeat(sample_direction(style_dim)[None], n_latent, axis=0)
    strengths = np.linspace(-3.0, 3.0, options.samples, dtype=np.float32)
    portraits = itertools.cycle(_portraits(client, options, "portrait"))
    return [
        {"portrait": next(portraits), "direction": direction, "strength": strength[None]}
        for strength in strengths
    ]


# the inputs a model takes -> where its samples come from
SOURCES: dict[frozenset[str], Callable[[TritonModelClient, argparse.Namespace], list[Sample]]] = {
    frozenset(TRYON_INPUTS): tryon_samples,
    frozenset({"image"}): photo_samples,
    frozenset({"latents"}): latent_samples,
    frozenset({"face", "shape_reference", "color_reference"}): hair_transfer_samples,
    frozenset({"portrait", "direction", "strength"}): hair_edit_samples,
}


def make_batches(samples: list[Sample], batch: int) -> list[dict[str, np.ndarray]]:
    """The distinct requests of `batch` samples each that cycling through `samples` yields."""
    count = len(samples) // math.gcd(len(samples), batch)
    cycle = itertools.cycle(samples)
    chunks = ([next(cycle) for _ in range(batch)] for _ in range(count))
    return [{name: np.stack([sample[name] for sample in chunk]) for name in samples[0]} for chunk in chunks]


_workloads: dict[tuple, list[dict[str, np.ndarray]]] = {}
_workload_lock = gevent.lock.BoundedSemaphore()  # users start together; load the inputs once


def _workload(
    client: TritonModelClient, address: str, options: argparse.Namespace
) -> list[dict[str, np.ndarray]]:
    if options.batch < 1 or options.samples < 1:
        raise ClientError(f"--batch and --samples must be at least 1, got {options.batch}, {options.samples}")
    names = frozenset(spec.name for spec in client.inputs)
    if names not in SOURCES:
        known = "; ".join(", ".join(sorted(inputs)) for inputs in SOURCES)
        raise ClientError(
            f"model '{client.model}' takes inputs {sorted(names)}; this load test sends: {known}"
        )
    key = (address, client.model, options.dataroot, options.split, options.samples, options.batch)
    with _workload_lock:
        if key not in _workloads:
            _workloads[key] = make_batches(SOURCES[names](client, options)[: options.samples], options.batch)
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
            # Close and drop the client now, while gevent's hub runs: tritonclient's __del__ closes the gRPC
            # channel again, and that hangs when it first happens in the garbage collection at exit.
            self.client.close()
            self.client = None


class WebUser(HttpUser):
    """One closed-loop person on the web app (`--model web`): the pages' requests in turn, each reported
    as `POST web /api/...`; a failure carries the app's message."""

    host = "http://127.0.0.1:8080"  # python -m web's default; --host overrides it
    wait_time = constant(0)
    _ids = itertools.count(1)

    def on_start(self) -> None:
        self.user_id = next(self._ids)
        self.completed = self.failed = 0
        pages = [page for page in self.environment.parsed_options.web_pages.split(",") if page]
        config = self.client.get("/api/config", name="web /api/config").json()
        face, shape, color = config["hair_samples"][:3]
        forms = {
            "tryon": ("/api/tryon", {"person": config["persons"][0], "garment": config["garments"][0]}),
            "hair": (
                "/api/hair/transfer",
                {"face_sample": face, "shape_sample": shape, "color_sample": color},
            ),
            "edit": ("/api/hair/edit", {"portrait_sample": face, "direction": "sample", "strength": "1.5"}),
        }
        self.requests = itertools.islice(itertools.cycle([forms[page] for page in pages]), self.user_id, None)

    @task
    def send(self) -> None:
        path, form = next(self.requests)
        fields = {name: (None, value) for name, value in form.items()}
        with self.client.post(path, files=fields, name=f"web {path}", catch_response=True) as response:
            if response.status_code == 200 and response.headers.get("content-type") == "image/png":
                self.completed += 1
                response.success()
            else:
                self.failed += 1
                try:
                    message = response.json()["error"]
                except ValueError:
                    message = response.text[:200]
                response.failure(f"{response.status_code}: {message}")

    def on_stop(self) -> None:
        logger.info("user %d: %d requests completed, %d failed", self.user_id, self.completed, self.failed)
