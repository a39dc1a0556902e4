"""Locust smoke tests: `tests/load.py` run headless for a few seconds against the embedded Triton.

Locust runs in a subprocess: importing it here would gevent-monkey-patch the pytest process.
"""

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fashionserve.bundle import read_manifest
from fashionserve.catalogue.bundle import (
    export_classifier_bundle,
    export_generator_bundle,
    load_fashion_generator,
    load_garment_classifier,
)
from fashionserve.catalogue.networks.classifier import ClassifierConfig
from fashionserve.catalogue.networks.pggan import PGGANConfig
from fashionserve.launcher import TritonServer
from fashionserve.repository import render_repository
from tests.conftest import PROJECT_ROOT
from tests.test_web import running_web

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
        # let a user finish its request in flight at the time limit, so its on_stop logs its count
        *("--stop-timeout", "30"),
        *options,
    ]
    # cwd elsewhere: the locustfile must find the project by itself, as from any directory
    return subprocess.run(
        command,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def catalogue_server(tmp_path_factory: pytest.TempPathFactory, hair_bundle):
    """Triton serving small random-init garment classifier, fashion generator and hair (transfer, edit)
    pipelines."""
    root = tmp_path_factory.mktemp("load-catalogue")
    classifier, provenance = load_garment_classifier(None, ClassifierConfig(width=8, hidden=32), seed=0)
    export_classifier_bundle(classifier, provenance, root / "garment_classifier", log=lambda _: None)
    config = PGGANConfig.for_resolution(16, max_channels=32, latent_dim=32)
    generator, provenance = load_fashion_generator(None, config, seed=0)
    export_generator_bundle(generator, provenance, root / "fashion_generator", log=lambda _: None)
    repository = root / "repository"
    repository.mkdir()
    for bundle in (root / "garment_classifier", root / "fashion_generator", hair_bundle[0]):
        staging = root / "rendered" / bundle.name
        for name in render_repository(bundle, read_manifest(bundle), staging, target="cpu"):
            shutil.move(staging / name, repository / name)
    with TritonServer(repository=repository) as server:
        yield server


def assert_clean_run(result: subprocess.CompletedProcess, tmp_path: Path, protocol: str, name: str) -> None:
    """Exit 0, no failure in the CSV files, and every user completed at least one request."""
    assert result.returncode == 0, result.stderr[-3000:]
    stats = {row["Name"]: row for row in read_csv(tmp_path / "out_stats.csv")}
    row = stats[name]
    assert row["Type"] == protocol
    assert int(row["Failure Count"]) == 0
    assert int(row["Request Count"]) >= USERS
    assert read_csv(tmp_path / "out_failures.csv") == []
    # Locust keeps no per-user counts; each user logs its own when it stops.
    counts = dict(re.findall(r"user (\d+): (\d+) requests completed, 0 failed", result.stderr))
    assert sorted(counts) == [str(n) for n in range(1, USERS + 1)], result.stderr[-3000:]
    assert all(int(count) >= 1 for count in counts.values())


# gRPC runs under gevent: it once hung at exit (a client closed a second time by garbage collection at
# interpreter exit, fixed in TritonUser.on_stop), which this case would catch as a timeout.
@pytest.mark.parametrize(("protocol", "batch", "folder"), [("http", 1, False), ("grpc", 2, True)])
def test_tryon_headless_run_has_no_failures(
    tmp_path: Path, tryon_server, samples_dir: Path, protocol: str, batch: int, folder: bool
) -> None:
    """Drawn samples over HTTP; a VITON-HD-layout folder over gRPC with batch 2."""
    host = tryon_server.http_url if protocol == "http" else tryon_server.grpc_url
    data = ("--dataroot", str(samples_dir)) if folder else ()
    result = run_locust(tmp_path, host, "--protocol", protocol, "--batch", str(batch), *data)
    assert_clean_run(result, tmp_path, protocol, f"tryon batch={batch}")


# A request that completes after the run time (in --stop-timeout) is logged by its user but not counted
# in the CSV files: the run must be long enough for each user to complete one. A tiny hair transfer of
# two images takes 6-13 s here (2 users, 2 shared cores).
@pytest.mark.parametrize(
    ("model", "folder", "run_time"),
    [
        ("garment_classifier", False, "5s"),
        ("garment_classifier", True, "5s"),
        ("fashion_generator", False, "5s"),
        ("hair_transfer", False, "30s"),
        ("hair_edit", False, "5s"),
    ],
)
def test_catalogue_headless_run_has_no_failures(
    tmp_path: Path, catalogue_server, samples_dir: Path, model: str, folder: bool, run_time: str
) -> None:
    """Drawn photos or a VITON-HD folder's cloth images for the classifier; latents for the generator;
    drawn portraits for the hair ensembles (three each for the transfer)."""
    data = ("--dataroot", str(samples_dir)) if folder else ()
    result = run_locust(
        tmp_path, catalogue_server.http_url, "--model", model, "--batch", "2", *data, run_time=run_time
    )
    assert_clean_run(result, tmp_path, "http", f"{model} batch=2")


def test_unknown_model_is_one_failure_per_user_with_the_reason(tmp_path: Path, tryon_server) -> None:
    result = run_locust(tmp_path, tryon_server.http_url, "--model", "no_such_model", run_time="60s")
    assert result.returncode == 1
    failures = read_csv(tmp_path / "out_failures.csv")
    assert [(f["Name"], f["Occurrences"]) for f in failures] == [("setup", str(USERS))]
    assert "model 'no_such_model'" in failures[0]["Error"]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("server", "page", "route", "run_time"),
    [
        ("tryon_server", "tryon", "/api/tryon", "8s"),
        ("catalogue_server", "hair", "/api/hair/transfer", "30s"),
    ],
    ids=["tryon", "hair"],
)
def test_web_headless_run_has_no_failures(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    samples_dir: Path,
    server: str,
    page: str,
    route: str,
    run_time: str,
) -> None:
    """People on the web app's try-on or hairstyle page (`--model web`), through python -m web to Triton."""
    triton = request.getfixturevalue(server)
    log = tmp_path / "web.log"
    with running_web(log, "--triton", triton.grpc_url, "--dataroot", str(samples_dir)) as url:
        result = run_locust(tmp_path, url, "--model", "web", "--web-pages", page, run_time=run_time)
    assert_clean_run(result, tmp_path, "POST", f"web {route}")
