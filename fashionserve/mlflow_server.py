"""Embedded MLflow: `mlflow server` with a SQLite registry and local artifacts on a loopback port.

    python -m fashionserve.mlflow_server start --root DIR [--port N] [--detach --pid-file FILE]
    python -m fashionserve.mlflow_server stop --pid-file FILE

`DIR` holds `mlflow.db` and `artifacts/`; clients upload and download artifacts through the server
(`mlflow-artifacts:/`), so they need no access to DIR. Same conventions as the Triton launcher: free
loopback port by default, own process group (a Ctrl-C meant for the parent never kills it half-way),
stopped by `stop()`, `__exit__`, an atexit hook, or by PID.
"""

import argparse
import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fashionserve.cli import run
from fashionserve.processes import (
    HOST,
    POLL_S,
    ServerError,
    free_ports,
    port_is_free,
    process_stat,
    reap_group,
    serve,
    stop_by_pid_file,
    wait_until,
)

_PORT_ATTEMPTS = 3  # an auto-picked port can be taken before uvicorn binds it
_PORT_IN_USE = "address already in use"


def _server_environment() -> dict[str, str]:
    env = dict(os.environ)
    # The job runner (GenAI evaluation jobs) would add seven huey worker processes; the registry
    # does not use it.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env.pop("MLFLOW_TRACKING_URI", None)  # the server's own store comes from its arguments only
    return env


def _is_healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    with contextlib.suppress(urllib.error.URLError, OSError):
        with opener.open(f"{url}/health", timeout=2.0) as response:
            return response.status == 200
    return False


@dataclass
class MlflowServer:
    """One `mlflow server` on loopback; use as a context manager or call start()/stop()."""

    root: Path  # holds mlflow.db (registry and runs) and artifacts/
    port: int | None = None  # None: pick a free loopback port at start (then set here)
    log_file: Path | None = None  # default: root/mlflow-server.log
    ready_timeout: float = 60.0
    _process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def url(self) -> str:
        """Tracking URI for clients (also the UI)."""
        if self.port is None:
            raise ServerError("the MLflow server has not been started, so it has no port yet")
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> "MlflowServer":
        """Start the server and wait until /health answers 200."""
        if self._process is not None:
            raise ServerError(f"this MLflow server is already running (PID {self._process.pid})")
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        if self.log_file is None:
            self.log_file = self.root / "mlflow-server.log"
        auto = self.port is None
        if not auto and not port_is_free(self.port):
            raise ServerError(f"port {self.port} on {HOST} is already in use (wanted for MLflow)")
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            if auto:
                self.port = free_ports(1)[0]
            self._launch()
            try:
                self._wait_ready()
                return self
            except ServerError as exc:
                if not (auto and _PORT_IN_USE in str(exc)) or attempt == _PORT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        assert self.log_file is not None
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            f"--backend-store-uri=sqlite:///{self.root / 'mlflow.db'}",
            f"--artifacts-destination={self.root / 'artifacts'}",
            f"--host={HOST}",
            f"--port={self.port}",
            "--workers=1",  # one uvicorn worker is plenty for a registry and spares the 2-core machines
        ]
        with open(self.log_file, "ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_server_environment(),
                # Not the project root: there the `mlflow/` CLI folder would sit first on sys.path.
                cwd=self.root,
                start_new_session=True,
            )
        atexit.register(self.stop)

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout
        try:
            while not _is_healthy(self.url):
                code = self._process.poll()
                if code is not None:
                    self.stop()
                    raise ServerError(f"mlflow server exited with code {code}: {self._last_error()}")
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"mlflow server was not ready within {self.ready_timeout:g} s (log: {self.log_file})"
                    )
                time.sleep(POLL_S)
        except BaseException:  # including Ctrl-C: never leave a half-started server behind
            self.stop()
            raise

    def _last_error(self) -> str:
        assert self.log_file is not None
        lines = [
            line.strip() for line in self.log_file.read_text(errors="replace").splitlines() if line.strip()
        ]
        errors = [line for line in lines if "error" in line.lower()]  # the port-in-use line says error too
        return f"{(errors or lines or ['no output'])[-1][:300]} (log: {self.log_file})"

    def detach(self) -> int:
        """Leave the server running when this process exits (no atexit stop); returns its PID."""
        if self._process is None:
            raise ServerError("the MLflow server has not been started")
        atexit.unregister(self.stop)
        return self._process.pid

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group (the CLI and its uvicorn worker), SIGKILL after `timeout`."""
        process = self._process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reap_group(process.pid)
        self._process = None
        atexit.unregister(self.stop)


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    """Stop an MLflow server started elsewhere (e.g. a detached one) by its PID and process group."""
    stat = process_stat(pid)
    if stat is None:
        raise ServerError(f"no process with PID {pid} is running")
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if stat[1] != pid or b"mlflow" not in cmdline[:4]:
        raise ServerError(f"PID {pid} is not an MLflow server started by this launcher; not signalling it")
    os.killpg(pid, signal.SIGTERM)
    if not wait_until(lambda: process_stat(pid) is None, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    reap_group(pid)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fashionserve.mlflow_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start mlflow server and wait until it is healthy")
    start.add_argument(
        "--root", type=Path, required=True, metavar="DIR", help="folder for mlflow.db and artifacts/"
    )
    start.add_argument("--port", type=int, metavar="N", help=f"port on {HOST} (default: a free one)")
    start.add_argument(
        "--ready-timeout", type=float, default=60.0, metavar="S", help="seconds to wait (default 60)"
    )
    start.add_argument("--detach", action="store_true", help="return once ready and leave the server running")
    start.add_argument("--pid-file", type=Path, metavar="FILE", help="write the server PID here")
    stop = commands.add_parser("stop", help="stop a server started with --detach")
    stop.add_argument("--pid-file", type=Path, required=True, help="the PID file written by `start`")
    return parser.parse_args(argv)


def _start(args: argparse.Namespace) -> int:
    server = MlflowServer(root=args.root, port=args.port, ready_timeout=args.ready_timeout)

    def announce() -> None:
        print(f"mlflow server ready, PID {server.pid}", flush=True)
        print(f"  UI and tracking URI  {server.url}", flush=True)
        print(f"  store                {server.root}", flush=True)
        print(f"  log                  {server.log_file}", flush=True)

    return serve(server, "mlflow server", args.pid_file, args.detach, announce)


def _stop(args: argparse.Namespace) -> int:
    return stop_by_pid_file(args.pid_file, "mlflow server", stop_pid)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    return _start(args) if args.command == "start" else _stop(args)


if __name__ == "__main__":
    run(main, expected=(ServerError,))
