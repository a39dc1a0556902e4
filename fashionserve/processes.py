"""What the embedded servers (Triton, MLflow) share: loopback ports, process groups, and the
`start`/`stop` command-line conventions (foreground until Ctrl-C or `--detach`, PID files)."""

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from fashionserve.cli import silence_stdout

HOST = "127.0.0.1"
POLL_S = 0.2
GROUP_GRACE_S = 10.0  # python-backend stubs exit about 0.5 s after their server


class ServerError(Exception):
    """A server could not be started or stopped (one line, for the user)."""


def port_is_free(port: int) -> bool:
    """Whether `port` on HOST can be bound now."""
    with socket.socket() as sock:
        # Servers bind with SO_REUSEADDR; so must this check, or TIME_WAIT leftovers would read as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_ports(count: int) -> list[int]:
    """`count` distinct ports on HOST that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:  # all held open at once, so the kernel hands out distinct ports
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


def process_status(pid: int) -> tuple[str, str, int, int] | None:
    """(command name, state letter, parent PID, process group) of a process, zombies included; None if
    there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid, pgid = stat[stat.rindex(")") + 2 :].split()[:3]
    return stat[stat.index("(") + 1 : stat.rindex(")")], state, int(ppid), int(pgid)


def process_stat(pid: int) -> tuple[str, int] | None:
    """(command name, process group) of a live process; None if there is none (zombies count as gone)."""
    status = process_status(pid)
    return None if status is None or status[1] in "ZX" else (status[0], status[3])


def process_ids() -> list[int]:
    """Every PID in /proc now."""
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _group_members(pgid: int) -> list[int]:
    return [pid for pid in process_ids() if (stat := process_stat(pid)) is not None and stat[1] == pgid]


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def reap_group(pgid: int) -> None:
    """Wait for what is left of a stopped server's process group, then SIGKILL stragglers.

    Helpers (python-backend stubs, uvicorn workers) notice on their own, a moment later, that their
    server is gone; callers expect no process left behind once stop returns.
    """
    if wait_until(lambda: not _group_members(pgid), GROUP_GRACE_S):
        return
    for pid in _group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _group_members(pgid), GROUP_GRACE_S)


class ManagedServer(Protocol):
    """What `serve` needs of a server object (TritonServer, MlflowServer)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def running(self) -> bool: ...

    log_file: Path | None

    def start(self) -> object: ...

    def detach(self) -> int: ...

    def stop(self, timeout: float = 30.0) -> None: ...


def serve(
    server: ManagedServer, name: str, pid_file: Path | None, detach: bool, announce: Callable[[], None]
) -> int:
    """The `start` command: start `server`, write its PID file, `announce` its endpoints, then return
    (`detach`) or stay in the foreground until Ctrl-C or SIGTERM, stopping it on the way out."""
    # SIGTERM behaves like Ctrl-C, so either one ends in stop() instead of orphaning the server; SIGINT is
    # set too because a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server.start()
    if pid_file:
        try:
            pid_file.parent.mkdir(parents=True, exist_ok=True)
            pid_file.write_text(f"{server.pid}\n")
        except OSError as exc:
            server.stop()
            raise ServerError(f"cannot write PID file {pid_file}: {exc.strerror}") from None
    try:
        announce()
    except BrokenPipeError:  # e.g. `start --detach | head -1`: the server is up, the rest goes unread
        silence_stdout()
    if detach:
        server.detach()
        return 0
    try:
        while server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"stopping {name}", flush=True)
        return 0
    finally:
        server.stop()
        if pid_file:
            pid_file.unlink(missing_ok=True)
    raise ServerError(f"{name} exited unexpectedly (log: {server.log_file})")


def stop_by_pid_file(pid_file: Path, name: str, stop_pid: Callable[[int], None]) -> int:
    """The `stop` command: stop the server whose PID `pid_file` holds and remove the file (also when it
    is stale, i.e. that process is gone)."""
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        raise ServerError(f"PID file {pid_file} does not exist; is the server running?") from None
    if not text.isdigit():
        raise ServerError(f"PID file {pid_file} does not hold a PID: {text[:40]!r}")
    pid = int(text)
    try:
        stop_pid(pid)
    except ServerError as exc:
        if process_stat(pid) is None:
            pid_file.unlink()  # stale: nothing left to stop with it
            raise ServerError(f"{exc} (removed stale PID file {pid_file})") from None
        raise
    pid_file.unlink(missing_ok=True)
    print(f"stopped {name} PID {pid}")
    return 0
