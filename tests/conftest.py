"""Shared fixtures: a small try-on configuration, its sample set, exported bundle and a running Triton."""

import subprocess
import sys
from pathlib import Path

import pytest

from fashionserve.launcher import TritonServer
from fashionserve.mlflow_server import MlflowServer
from fashionserve.repository import render_repository
from fashionserve.tryon.bundle import export_bundle, load_networks
from fashionserve.tryon.samples import write_sample_set
from fashionserve.tryon.stages import TryonConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Small enough for a 2-core CI machine; same code paths as the public 1024x768 configuration.
TEST_CONFIG = TryonConfig(
    height=256,
    width=192,
    condition_height=128,
    condition_width=96,
    condition_ngf=8,
    image_ngf=8,
    spade_hidden=16,
)
TEST_SEED = 0


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the project's CLI scripts (path relative to the project root) as a user would."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Assert that a CLI failed as expected failures must: exit code 2 and one `error: ` line on stderr,
    no traceback, containing every fragment. Returns the line."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow server (SQLite, local artifacts) on a free loopback port, one per test module."""
    with MlflowServer(root=tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="session")
def samples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("samples")
    write_sample_set(root, height=TEST_CONFIG.height, width=TEST_CONFIG.width)
    return root


@pytest.fixture(scope="session")
def tryon_pipeline():
    pipeline, provenance = load_networks(TEST_CONFIG, None, None, seed=TEST_SEED)
    return pipeline, provenance


@pytest.fixture(scope="session")
def tryon_bundle(tmp_path_factory: pytest.TempPathFactory, tryon_pipeline) -> tuple[Path, dict]:
    pipeline, provenance = tryon_pipeline
    bundle = tmp_path_factory.mktemp("bundles") / "tryon"
    manifest = export_bundle(pipeline, TEST_CONFIG, provenance, bundle, log=lambda _: None)
    return bundle, manifest


@pytest.fixture(scope="session")
def tryon_server(tmp_path_factory: pytest.TempPathFactory, tryon_bundle):
    bundle, manifest = tryon_bundle
    repository = tmp_path_factory.mktemp("triton") / "repository"
    render_repository(bundle, manifest, repository, target="cpu")
    with TritonServer(repository=repository) as server:
        yield server
