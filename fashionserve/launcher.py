"""Embedded Triton: start the `tritonserver` binary shipped in the nvidia-pytriton wheel on loopback ports.

    python -m fashionserve.launcher start --repository DIR [--detach --pid-file FILE] [--free-ports]
    python -m fashionserve.launcher stop --pid-file FILE

Python-backend `model.py` files import `fashionserve` and `onnxruntime`, so the server runs with this
interpreter's venv and the project root importable (see `_server_environment`). It runs in its own
session, so a Ctrl-C meant for the parent never kills it half-way; `stop()`, `__exit__` and an atexit
hook stop it instead.

While the launching process lives, a watchdog thread looks after the python-backend stubs: Triton 2.51
neither restarts a stub that died nor marks its model unready, so the watchdog reloads that model
(explicit model control); and when the server itself dies (e.g. kill -9) it takes the stubs down with
it. Stubs of earlier servers of the same repository whose server is gone are killed at start.
The command line serves on 8000/8001/8002 unless told otherwise (`--free-ports` picks free ones).
"""

import argparse
import atexit
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from fashionserve.cli import run
from fashionserve.processes import (
    GROUP_GRACE_S,
    HOST,
    POLL_S,
    ServerError,
    free_ports,
    port_is_free,
    process_ids,
    process_stat,
    process_status,
    reap_group,
    serve,
    stop_by_pid_file,
    wait_until,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_CONTROL_MODES = ("none", "explicit")
_PORT_ATTEMPTS = 3  # auto-picked ports can be taken by another process before Triton binds them
# Lines of Triton's log that carry why it could not start, most specific first.
_FAILURE_PATTERNS = (
    re.compile(r"failed to load '[^']+' version \d+: .*"),
    re.compile(r"Poll failed for model directory '[^']+': .*"),
    re.compile(r"failed to poll model '[^']+': .*"),
    re.compile(r"failed to start \w+ service: .*"),
)
_CREATING_SERVER = re.compile(r"error: creating server: .*")
_PORT_IN_USE = re.compile(r"Socket '[^']*:(\d+)' already in use")
_MAX_REASONS = 3
_MAX_REASON_CHARS = 300
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # Triton's own defaults, on HOST
STUB_COMMAND = "triton_python_b"  # the kernel's 15-character name of triton_python_backend_stub
WATCH_S = 1.0  # how often the watchdog looks at the stubs


class _PortInUse(ServerError):
    """Triton lost the race for a port between picking and binding it."""

    def __init__(self, message: str, port: int):
        super().__init__(message)
        self.port = port


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")  # locates the wheel without importing its Python API
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed (pip install -r requirements.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def _tritonserver_binary() -> Path:
    binary = _pytriton_root() / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServerError(f"tritonserver binary not found at {binary}")
    return binary


def _bundled_libraries() -> Path:
    return _pytriton_root().parents[1] / "nvidia_pytriton.libs"


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def backend_directory() -> Path:
    """A `--backend-directory` whose `python/` holds the python backend and the stub for this interpreter.

    Assembled once (symlinks into the wheel) per interpreter version and wheel location, then reused.
    """
    root = _pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": root / "python_backend_stubs" / version / "triton_python_backend_stub",
    }
    for source in sources.values():
        if not source.is_file():
            raise ServerError(
                f"nvidia-pytriton has no python backend for Python {version}: {source} is missing"
            )
    # Keyed by the wheel's location too: two venvs with the same Python must not share links.
    key = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    target = _cache_home() / "fashionserve" / "triton-backends" / f"py{version}-{key}"

    def complete() -> bool:
        return all(
            (target / "python" / name).is_symlink() and os.readlink(target / "python" / name) == str(source)
            for name, source in sources.items()
        )

    if complete():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build aside and rename into place, so a concurrent launcher never sees a half-built folder.
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
    (staging / "python").mkdir()
    for name, source in sources.items():
        (staging / "python" / name).symlink_to(source)
    try:
        staging.rename(target)
    except OSError:  # exists: built by a concurrent launcher, or an incomplete leftover
        if not complete():
            shutil.rmtree(target)
            staging.rename(target)
            return target
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _prepend(env: dict[str, str], variable: str, *entries: Path | str) -> None:
    current = [entry for entry in env.get(variable, "").split(os.pathsep) if entry]
    env[variable] = os.pathsep.join(dict.fromkeys([*map(str, entries), *current]))


def _server_environment() -> dict[str, str]:
    """The server's environment. The stub embeds Python in isolated mode, so PYTHONPATH is ignored:
    it finds this venv's site-packages by looking up `python3` on PATH (then pyvenv.cfg), and imports
    `fashionserve` through the '' entry of sys.path, i.e. the server's cwd (the project root)."""
    env = dict(os.environ)
    _prepend(env, "PATH", Path(sys.executable).parent)
    libraries: list[Path | str] = [_bundled_libraries()]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        # The stub links libpython3.X; make it load this interpreter's, not whatever the system has.
        libraries.append(sysconfig.get_config_var("LIBDIR"))
    _prepend(env, "LD_LIBRARY_PATH", *libraries)
    return env


def _clean_reason(text: str) -> str:
    # Triton quotes its messages and escapes newlines; keep the first line only.
    reason = text.split("\\n", 1)[0].rstrip().rstrip('"').rstrip()
    return reason if len(reason) <= _MAX_REASON_CHARS else reason[: _MAX_REASON_CHARS - 3] + "..."


def _failure_reasons(log: str) -> list[str]:
    """Why Triton failed to start, from its log: the first few specific reasons, else its exit error."""
    reasons: list[str] = []
    for line in log.splitlines():
        for pattern in _FAILURE_PATTERNS:
            match = pattern.search(line)
            if match:
                reasons.append(_clean_reason(match.group(0)))
                break
    if not reasons:
        reasons = [
            _clean_reason(m.group(0)) for line in log.splitlines() if (m := _CREATING_SERVER.search(line))
        ]
    return list(dict.fromkeys(reasons))[:_MAX_REASONS]


@dataclass(frozen=True)
class PythonStub:
    """A live python-backend stub process, from its command line."""

    pid: int
    server_pid: int  # the tritonserver it serves (argument 5 of the stub's command line)
    model_file: Path  # <repository>/<model>/<version>/model.py

    @property
    def model(self) -> str:
        return self.model_file.parent.parent.name

    @property
    def version(self) -> str:
        return self.model_file.parent.name


def python_stubs() -> list[PythonStub]:
    """Every live python-backend stub on this machine (zombies have no command line left)."""
    stubs = []
    for pid in process_ids():
        status = process_status(pid)
        if status is None or status[0] != STUB_COMMAND or status[1] in "ZX":
            continue
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(arguments) > 5 and arguments[5].isdigit():
            stubs.append(PythonStub(pid, int(arguments[5]), Path(os.fsdecode(arguments[1]))))
    return stubs


def reap_orphaned_stubs(repository: Path) -> list[int]:
    """SIGKILL the stubs of `repository`'s models whose tritonserver is gone (they can outlive a server
    killed with SIGKILL, 100-250 MB each); returns their PIDs."""
    root = Path(repository).resolve()
    orphans = [
        stub.pid
        for stub in python_stubs()
        if stub.model_file.is_relative_to(root)
        and (process_stat(stub.server_pid) or ("",))[0] != "tritonserver"
    ]
    for pid in orphans:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(process_stat(pid) for pid in orphans), GROUP_GRACE_S)
    return orphans


def _http_post(url: str, timeout: float) -> bytes:
    """POST an empty JSON object and return the response body; a non-2xx answer raises HTTPError."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    with opener.open(urllib.request.Request(url, data=b"{}", method="POST"), timeout=timeout) as response:
        return response.read()


@dataclass
class TritonServer:
    """One tritonserver process on loopback ports; use as a context manager or call start()/stop()."""

    repository: Path
    http_port: int | None = None  # None: pick a free loopback port at start (then set here)
    grpc_port: int | None = None
    metrics_port: int | None = None
    model_control: str = "none"  # "none" | "explicit"
    load_models: Sequence[str] = ()  # explicit mode: models to load at start ("*": all)
    log_file: Path | None = None  # stdout+stderr of the server; default: a file in a fresh temp dir
    ready_timeout: float = 120.0
    watch_stubs: bool = True  # run the stub watchdog (see the module docstring)
    extra_args: Sequence[str] = ()  # more tritonserver options (e.g. the restricted APIs compose sets)
    reloaded: list[str] = field(default_factory=list, init=False)  # models the watchdog reloaded
    _process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _watchdog: threading.Thread | None = field(default=None, init=False, repr=False)
    _stop_watching: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        """Whether the server process started by start() is still alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def http_url(self) -> str:
        return self._url(self.http_port)

    @property
    def grpc_url(self) -> str:
        return self._url(self.grpc_port)

    @property
    def metrics_url(self) -> str:
        return self._url(self.metrics_port)

    def _url(self, port: int | None) -> str:
        if port is None:
            raise ServerError("the server has not been started, so it has no port yet")
        return f"{HOST}:{port}"

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> "TritonServer":
        """Start the server and wait until /v2/health/ready answers 200 (all models loaded)."""
        if self._process is not None:
            raise ServerError(f"this server is already running (PID {self._process.pid})")
        self._validate()
        names = ("http_port", "grpc_port", "metrics_port")
        auto = [name for name in names if getattr(self, name) is None]
        chosen = [(name, getattr(self, name)) for name in names if name not in auto]
        if len({port for _, port in chosen}) < len(chosen):
            raise ServerError(f"the HTTP, gRPC and metrics ports must differ: {dict(chosen)}")
        for name, port in chosen:
            if not port_is_free(port):
                raise ServerError(
                    f"port {port} on {HOST} is already in use (wanted as {name.replace('_', ' ')})"
                )
        if self.log_file is None:
            self.log_file = Path(tempfile.mkdtemp(prefix="fashionserve-triton-")) / "tritonserver.log"
        reap_orphaned_stubs(self.repository)
        taken = {port for _, port in chosen}
        attempts_left = _PORT_ATTEMPTS
        try:
            while True:
                free = iter(port for port in free_ports(len(auto) + len(taken)) if port not in taken)
                for name in auto:
                    setattr(self, name, next(free))
                try:
                    self._launch()
                    self._wait_ready()
                    self._start_watchdog()
                    return self
                except _PortInUse as exc:
                    attempts_left -= 1
                    lost_race = exc.port in {getattr(self, name) for name in auto}
                    if not lost_race or attempts_left == 0:
                        raise ServerError(str(exc)) from None
        except BaseException:
            for name in auto:  # so that a later start() picks free ports again
                setattr(self, name, None)
            raise

    def _validate(self) -> None:
        if not Path(self.repository).is_dir():
            raise ServerError(f"model repository {self.repository} is not a directory")
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ServerError(
                f"model control must be one of {', '.join(MODEL_CONTROL_MODES)}, not {self.model_control!r}"
            )
        if self.load_models and self.model_control != "explicit":
            raise ServerError("models to load at start need model control 'explicit'")
        if "*" in self.load_models and len(self.load_models) > 1:
            raise ServerError("'*' (load all models) must be the only model to load")

    def _launch(self) -> None:
        command = [
            str(_tritonserver_binary()),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={backend_directory()}",
            f"--model-control-mode={self.model_control}",
            *(f"--load-model={model}" for model in self.load_models),
            # Triton binds 0.0.0.0 unless told otherwise; this server is for this machine only.
            f"--http-address={HOST}",
            f"--http-port={self.http_port}",
            f"--grpc-address={HOST}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={HOST}",
            f"--metrics-port={self.metrics_port}",
            *self.extra_args,
        ]
        assert self.log_file is not None
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # No --log-file: stdout+stderr also carry "error: creating server" and protobuf parse errors.
        with open(self.log_file, "wb") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_server_environment(),
                cwd=PROJECT_ROOT,
                start_new_session=True,
            )
        atexit.register(self.stop)

    def _wait_ready(self) -> None:
        assert self._process is not None and self.log_file is not None
        deadline = time.monotonic() + self.ready_timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            while True:
                code = self._process.poll()
                if code is not None:
                    self._raise_failure(f"tritonserver exited with code {code}")
                with contextlib.suppress(urllib.error.URLError, OSError):
                    with opener.open(url, timeout=2.0) as response:
                        if response.status == 200:
                            return
                # A failed model makes Triton exit (--exit-on-error), but only after unloading the
                # others; the reason is already in the log, so stop waiting now.
                if _failure_reasons(self._read_log()):
                    self._raise_failure("tritonserver failed to start")
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"tritonserver was not ready within {self.ready_timeout:g} s (log: {self.log_file})"
                    )
                time.sleep(POLL_S)
        except BaseException:  # including Ctrl-C: never leave a half-started server behind
            self.stop()
            raise

    def _start_watchdog(self) -> None:
        if not self.watch_stubs:
            return
        assert self._process is not None
        self._stop_watching = threading.Event()
        self._watchdog = threading.Thread(
            target=self._watch, args=(self._process, self._stop_watching), name="stub-watchdog", daemon=True
        )
        self._watchdog.start()

    def _watch(self, process: subprocess.Popen, stopped: threading.Event) -> None:
        """Until stop(): reload the models whose stub died; once the server is gone, kill its stubs."""
        seen_dead: set[int] = set()
        while not stopped.wait(WATCH_S):
            if process.poll() is not None:  # reaps it, so its stubs see their server gone
                reap_group(process.pid)
                return
            # Triton never reaps a stub that crashed: a new zombie child means one died.
            dead = {
                pid
                for pid in process_ids()
                if (status := process_status(pid)) and status[1] == "Z" and status[2] == process.pid
            }
            if dead - seen_dead and not stopped.is_set():
                for model in self._models_without_stub(process.pid):
                    self._reload(model)
            seen_dead = dead

    def _models_without_stub(self, server_pid: int) -> list[str]:
        """Python-backend models Triton reports READY although no live stub serves that version."""
        try:
            index = json.loads(_http_post(f"http://{self.http_url}/v2/repository/index", timeout=10.0))
        except (urllib.error.URLError, OSError, ValueError):
            return []
        served = {(stub.model, stub.version) for stub in python_stubs() if stub.server_pid == server_pid}
        root = Path(self.repository)
        return sorted(
            {
                entry["name"]
                for entry in index
                if entry.get("state") == "READY"
                and (root / entry["name"] / str(entry.get("version")) / "model.py").is_file()
                and (entry["name"], str(entry.get("version"))) not in served
            }
        )

    def _reload(self, model: str) -> None:
        """Reload a model whose stub died: unload, then load (a plain load of an unchanged model is a
        no-op). Model control 'none' has no load API: then only a warning is left to give."""
        if self.model_control != "explicit":
            print(
                f"warning: the python-backend stub of model '{model}' died; Triton cannot reload it in "
                "model control 'none': restart the server (or start it with --model-control explicit)",
                file=sys.stderr,
                flush=True,
            )
            return
        base = f"http://{self.http_url}/v2/repository/models/{model}"
        try:
            _http_post(f"{base}/unload", timeout=60.0)
            _http_post(f"{base}/load", timeout=self.ready_timeout)
        except (urllib.error.URLError, OSError) as exc:
            print(f"warning: could not reload model '{model}': {exc}", file=sys.stderr, flush=True)
            return
        self.reloaded.append(model)
        print(f"reloaded model '{model}': its python-backend stub had died", file=sys.stderr, flush=True)

    def _read_log(self) -> str:
        assert self.log_file is not None
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _raise_failure(self, default: str) -> NoReturn:
        log = self._read_log()
        reasons = _failure_reasons(log)
        message = f"{'; '.join(reasons) if reasons else default} (log: {self.log_file})"
        port = next((int(m.group(1)) for r in reasons if (m := _PORT_IN_USE.search(r))), None)
        if port is not None:
            raise _PortInUse(message, port)
        raise ServerError(message)

    def detach(self) -> int:
        """Leave the server running when this process exits (no atexit stop); returns its PID."""
        if self._process is None:
            raise ServerError("the server has not been started")
        atexit.unregister(self.stop)
        return self._process.pid

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server (Triton drains in-flight requests), SIGKILL it after `timeout`; idempotent."""
        process = self._process
        if process is None:
            return
        self._stop_watching.set()
        process.send_signal(signal.SIGTERM)  # a no-op if it already exited and was reaped
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            # Not reaped yet, so its PID is still its own group id: take its python-backend stubs too.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reap_group(process.pid)
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        # Only now: if a second Ctrl-C interrupts the waits, the atexit hook still stops it.
        self._process = None
        atexit.unregister(self.stop)


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    """Stop a tritonserver started elsewhere (e.g. a detached one) by its PID: SIGTERM, then SIGKILL."""
    stat = process_stat(pid)
    if stat is None:
        raise ServerError(f"no process with PID {pid} is running")
    name, pgid = stat
    if name != "tritonserver":
        raise ServerError(f"PID {pid} is {name!r}, not tritonserver; not signalling it")
    os.kill(pid, signal.SIGTERM)
    if not wait_until(lambda: process_stat(pid) is None, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not wait_until(lambda: process_stat(pid) is None, GROUP_GRACE_S):
            raise ServerError(f"tritonserver PID {pid} did not exit after SIGKILL")
    if pgid == pid:  # a group of its own, as the launcher starts it: its stubs are in there
        reap_group(pgid)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fashionserve.launcher",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start tritonserver and wait until it is ready")
    start.add_argument(
        "--repository", type=Path, required=True, metavar="DIR", help="model repository folder to serve"
    )
    for protocol, port in DEFAULT_PORTS.items():
        start.add_argument(
            f"--{protocol}-port",
            type=int,
            metavar="N",
            help=f"{protocol} port on {HOST} (default {port}, or a free one with --free-ports)",
        )
    start.add_argument(
        "--free-ports",
        action="store_true",
        help="pick free ports for those not given (e.g. tests, or a second server next to the first)",
    )
    start.add_argument(
        "--model-control",
        choices=MODEL_CONTROL_MODES,
        default="none",
        help="none: load every model of the repository (default); explicit: only --load-model ones",
    )
    start.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="MODEL",
        help="with --model-control explicit: a model to load at start (repeatable; '*' for all)",
    )
    start.add_argument(
        "--log-file", type=Path, metavar="FILE", help="server log (default: a file in a new temp folder)"
    )
    start.add_argument(
        "--ready-timeout", type=float, default=120.0, metavar="S", help="seconds to wait (default 120)"
    )
    start.add_argument("--detach", action="store_true", help="return once ready and leave the server running")
    start.add_argument(
        "--pid-file", type=Path, metavar="FILE", help="write the server PID here (for `stop --pid-file`)"
    )
    stop = commands.add_parser("stop", help="stop a server started with --detach")
    stop.add_argument(
        "--pid-file",
        type=Path,
        required=True,
        metavar="FILE",
        help="the PID file written by `start --pid-file`",
    )
    stop.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="SIGKILL after S seconds (default 30)"
    )
    return parser.parse_args(argv)


def _print_endpoints(server: TritonServer) -> None:
    print(f"tritonserver ready, PID {server.pid}", flush=True)
    print(f"  HTTP     http://{server.http_url}", flush=True)
    print(f"  gRPC     {server.grpc_url}", flush=True)
    print(f"  metrics  http://{server.metrics_url}/metrics", flush=True)
    print(f"  log      {server.log_file}", flush=True)


def requested_ports(args: argparse.Namespace) -> dict[str, int | None]:
    """Port per protocol: as given, else Triton's default, else (--free-ports) None for a free one."""
    return {
        protocol: getattr(args, f"{protocol}_port") or (None if args.free_ports else default)
        for protocol, default in DEFAULT_PORTS.items()
    }


def _start(args: argparse.Namespace) -> int:
    ports = requested_ports(args)
    server = TritonServer(
        repository=args.repository,
        http_port=ports["http"],
        grpc_port=ports["grpc"],
        metrics_port=ports["metrics"],
        model_control=args.model_control,
        load_models=args.load_model,
        log_file=args.log_file,
        ready_timeout=args.ready_timeout,
    )
    return serve(server, "tritonserver", args.pid_file, args.detach, lambda: _print_endpoints(server))


def _stop(args: argparse.Namespace) -> int:
    return stop_by_pid_file(args.pid_file, "tritonserver", lambda pid: stop_pid(pid, args.timeout))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    return _start(args) if args.command == "start" else _stop(args)


if __name__ == "__main__":
    run(main, expected=(ServerError,))
