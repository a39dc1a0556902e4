"""The embedded Triton launcher against the real `tritonserver` binary, on tiny python-backend models."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from fashionserve import launcher
from fashionserve.launcher import ServerError, TritonServer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 60.0
CLI_TIMEOUT = 90.0

CONFIG = """\
backend: "python"
max_batch_size: 8
input [{ name: "X", data_type: TYPE_FP32, dims: [ 3 ] }]
output [{ name: "Y", data_type: TYPE_FP32, dims: [ 3 ] }]
dynamic_batching {}
instance_group [{ kind: KIND_CPU, count: 1 }]
"""
# Imports fashionserve and onnxruntime to prove the server sees the project root and the venv.
ADD_ONE = """\
import numpy as np
import onnxruntime  # noqa: F401
import triton_python_backend_utils as pb_utils

import fashionserve  # noqa: F401


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", (x + 1).astype(np.float32))]))
        return responses
"""
FAILING = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("weights file missing: w42.bin")

    def execute(self, requests):
        return []
"""
SLOW = """\
import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(120)

    def execute(self, requests):
        return []
"""


def make_repository(root: Path, models: dict[str, str], configs: dict[str, str] | None = None) -> Path:
    """A model repository with one python-backend model per entry of `models` (name -> model.py)."""
    root.mkdir(parents=True)
    for name, source in models.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text((configs or {}).get(name, CONFIG))
        (root / name / "1" / "model.py").write_text(source)
    return root


def processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `text`: tritonserver and its stubs."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if text in cmdline and stat[stat.rindex(")") + 2] not in "ZX":
            found.append(int(entry.name))
    return found


def port_is_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return make_repository(tmp_path / "repo", {"add_one": ADD_ONE})


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path):
    """Kill anything a failed test left running on this test's repositories (the tests assert on it)."""
    yield
    for pid in processes_mentioning(str(tmp_path)):
        os.kill(pid, signal.SIGKILL)


def add_one_http(url: str, batch: np.ndarray) -> np.ndarray:
    client = httpclient.InferenceServerClient(url)
    try:
        inputs = [httpclient.InferInput("X", list(batch.shape), "FP32")]
        inputs[0].set_data_from_numpy(batch)
        return client.infer("add_one", inputs).as_numpy("Y")
    finally:
        client.close()


def test_start_infer_stop(repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # fashionserve must be importable in the server whatever the caller's cwd
    server = TritonServer(repository, ready_timeout=READY_TIMEOUT)
    started = time.monotonic()
    with server:
        print(f"start-to-ready {time.monotonic() - started:.2f} s")
        pid, http_port = server.pid, server.http_port
        assert pid is not None and server.running
        assert re.fullmatch(r"127\.0\.0\.1:\d+", server.http_url)
        batch = np.array([[1.0, 2.0, 3.0], [-1.5, 0.0, 10.0]], dtype=np.float32)
        np.testing.assert_array_equal(add_one_http(server.http_url, batch), batch + 1)
        assert server.log_file is not None and "READY" in server.log_file.read_text()
    assert server.pid is None and not server.running
    assert not Path(f"/proc/{pid}").exists()
    assert processes_mentioning(str(repository)) == []
    assert port_is_closed(http_port)
    server.stop()  # idempotent


def test_two_servers_get_different_ports(repository: Path) -> None:
    with (
        TritonServer(repository, ready_timeout=READY_TIMEOUT) as first,
        TritonServer(repository, ready_timeout=READY_TIMEOUT) as second,
    ):
        ports = {first.http_port, first.grpc_port, first.metrics_port}
        ports |= {second.http_port, second.grpc_port, second.metrics_port}
        assert len(ports) == 6 and first.pid != second.pid
        batch = np.array([[0.5, 1.5, 2.5]], dtype=np.float32)
        np.testing.assert_array_equal(add_one_http(first.http_url, batch), batch + 1)
        client = grpcclient.InferenceServerClient(second.grpc_url)
        inputs = [grpcclient.InferInput("X", [1, 3], "FP32")]
        inputs[0].set_data_from_numpy(batch)
        np.testing.assert_array_equal(client.infer("add_one", inputs).as_numpy("Y"), batch + 1)
        client.close()
    assert processes_mentioning(str(repository)) == []


def test_model_failing_to_initialize(tmp_path: Path) -> None:
    repository = make_repository(tmp_path / "repo", {"add_one": ADD_ONE, "broken_model": FAILING})
    server = TritonServer(repository, ready_timeout=READY_TIMEOUT)
    with pytest.raises(ServerError) as raised:
        server.start()
    message = str(raised.value)
    assert "broken_model" in message and "weights file missing: w42.bin" in message
    assert str(server.log_file) in message and "\n" not in message
    assert server.pid is None
    assert processes_mentioning(str(repository)) == []


def test_unparsable_config_names_the_model(tmp_path: Path) -> None:
    repository = make_repository(
        tmp_path / "repo", {"garbled": ADD_ONE}, {"garbled": "max_batch_size: eight\n"}
    )
    with pytest.raises(
        ServerError, match=r"Poll failed for model directory 'garbled'.*failed to read text proto"
    ):
        TritonServer(repository, ready_timeout=READY_TIMEOUT).start()
    assert processes_mentioning(str(repository)) == []


def test_ready_timeout_stops_the_server(tmp_path: Path) -> None:
    repository = make_repository(tmp_path / "repo", {"slow_model": SLOW})
    server = TritonServer(repository, ready_timeout=2.0)
    with pytest.raises(ServerError, match=r"not ready within 2 s \(log: .*tritonserver\.log\)"):
        server.start()
    assert server.pid is None
    assert processes_mentioning(str(repository)) == []


def test_taken_port_is_refused_before_starting(repository: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ServerError, match=rf"port {port} .*already in use"):
            TritonServer(repository, grpc_port=port, ready_timeout=READY_TIMEOUT).start()
    assert processes_mentioning(str(repository)) == []


def test_retries_when_a_picked_port_is_taken_before_triton_binds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository = make_repository(tmp_path / "empty", {})  # no models: quick to start and stop
    real_free_ports = launcher.free_ports
    picks: list[list[int]] = []
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        stolen = holder.getsockname()[1]

        def free_ports(count: int) -> list[int]:
            # First pick: HTTP on a port someone else holds, as if they had taken it meanwhile.
            picks.append([stolen, *real_free_ports(count - 1)] if not picks else real_free_ports(count))
            return picks[-1]

        monkeypatch.setattr(launcher, "free_ports", free_ports)
        with TritonServer(repository, ready_timeout=READY_TIMEOUT) as server:
            assert len(picks) == 2 and server.http_port != stolen
            client = httpclient.InferenceServerClient(server.http_url)
            assert client.is_server_ready()
            client.close()
    assert processes_mentioning(str(repository)) == []


def test_explicit_mode_loads_only_requested_models(tmp_path: Path) -> None:
    # `broken_model` would make the server exit if it were loaded.
    repository = make_repository(tmp_path / "repo", {"add_one": ADD_ONE, "broken_model": FAILING})
    server = TritonServer(
        repository, model_control="explicit", load_models=["add_one"], ready_timeout=READY_TIMEOUT
    )
    with server:
        client = httpclient.InferenceServerClient(server.http_url)
        states = {model["name"]: model.get("state") for model in client.get_model_repository_index()}
        client.close()
        assert states == {"add_one": "READY", "broken_model": None}
        batch = np.array([[7.0, 8.0, 9.0]], dtype=np.float32)
        np.testing.assert_array_equal(add_one_http(server.http_url, batch), batch + 1)


def test_load_models_need_explicit_mode(repository: Path) -> None:
    with pytest.raises(ServerError, match="explicit"):
        TritonServer(repository, load_models=["add_one"]).start()


def launcher_cli(*args: str | Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fashionserve.launcher", *map(str, args)]
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT)


def test_cli_detach_then_stop(repository: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "triton.pid"
    started = launcher_cli(
        "start", "--repository", repository, "--free-ports", "--detach", "--pid-file", pid_file
    )
    assert started.returncode == 0, started.stderr
    pid = int(pid_file.read_text())
    assert f"PID {pid}" in started.stdout
    http_url = re.search(r"HTTP\s+http://(127\.0\.0\.1:\d+)", started.stdout).group(1)
    assert re.search(r"gRPC\s+127\.0\.0\.1:\d+", started.stdout)
    assert re.search(r"metrics\s+http://127\.0\.0\.1:\d+/metrics", started.stdout)
    # The launcher has exited; the detached server keeps serving.
    batch = np.array([[1.0, 1.0, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(add_one_http(http_url, batch), batch + 1)

    stopped = launcher_cli("stop", "--pid-file", pid_file)
    assert stopped.returncode == 0, stopped.stderr
    assert processes_mentioning(str(repository)) == []
    assert not pid_file.exists()

    again = launcher_cli("stop", "--pid-file", pid_file)
    assert again.returncode == 2
    assert again.stderr.startswith("error: PID file") and again.stderr.count("\n") == 1


def test_cli_stop_refuses_a_pid_that_is_not_tritonserver(tmp_path: Path) -> None:
    pid_file = tmp_path / "other.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # this pytest process: alive, but not a tritonserver
    result = launcher_cli("stop", "--pid-file", pid_file)
    assert result.returncode == 2
    assert "not tritonserver" in result.stderr and "Traceback" not in result.stderr


def test_cli_expected_failure_is_one_line(tmp_path: Path) -> None:
    result = launcher_cli("start", "--repository", tmp_path / "missing")
    assert result.returncode == 2
    assert result.stderr == f"error: model repository {tmp_path / 'missing'} is not a directory\n"
