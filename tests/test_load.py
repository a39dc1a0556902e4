"""Locust smoke tests: `tests/load.py` run headless for a few seconds against the embedded Triton.

Locust runs in a subprocess: importing it here would gevent-monkey-patch the pytest process.
"""

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

LOCUSTFILE = PROJECT_ROOT / "tests" / "load.py"
USERS = 2


def run_locust(tmp_path: Path, host: str, *options: str, run_time: str = "8s") -> subprocess.CompletedProcess:
    """Headless Locust on the try-on load test; CSV files go to tmp_path/out_*.csv."""
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        *("-u", str(USERS), "-r", str(USERS), "-t", run_time),
        *("--csv", str(tmp_path / "out"), "--host", host),
        *options,
    ]
    # cwd elsewhere: the locustfile must find the project by itself, as from any directory
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=90, check=False)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.parametrize(
    ("protocol", "batch"),
    [("http", 1), ("grpc", 2)],
)
def test_headless_run_has_no_failures(tmp_path: Path, tryon_server, protocol: str, batch: int) -> None:
    host = tryon_server.http_url if protocol == "http" else tryon_server.grpc_url
    result = run_locust(tmp_path, host, "--protocol", protocol, "--batch", str(batch))
    assert result.returncode == 0, result.stderr[-3000:]

    stats = {row["Name"]: row for row in read_csv(tmp_path / "out_stats.csv")}
    row = stats[f"tryon batch={batch}"]
    assert row["Type"] == protocol
    assert int(row["Failure Count"]) == 0
    assert int(row["Request Count"]) >= USERS
    assert read_csv(tmp_path / "out_failures.csv") == []
    # Locust keeps no per-user counts; each user logs its own when it stops.
    counts = dict(re.findall(r"user (\d+): (\d+) requests completed, 0 failed", result.stderr))
    assert sorted(counts) == [str(n) for n in range(1, USERS + 1)], result.stderr[-3000:]
    assert all(int(count) >= 1 for count in counts.values())


def test_unknown_model_is_one_failure_per_user_with_the_reason(tmp_path: Path, tryon_server) -> None:
    result = run_locust(tmp_path, tryon_server.http_url, "--model", "no_such_model", run_time="60s")
    assert result.returncode == 1
    failures = read_csv(tmp_path / "out_failures.csv")
    assert [(f["Name"], f["Occurrences"]) for f in failures] == [("setup", str(USERS))]
    assert "model 'no_such_model'" in failures[0]["Error"]
    assert "Traceback" not in result.stderr
