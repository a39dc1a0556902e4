"""Shared fixtures: small try-on and hair configurations, their exported bundles and running Tritons, an
MLflow server."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fashionserve.hair import bundle as hair_bundle_module
from fashionserve.hair.networks.parser import CELEBAMASK_CLASSES, HAIR_CLASS
from fashionserve.hair.stages import HairConfig, HairPipeline
from fashionserve.launcher import TritonServer
from fashionserve.mlflow_server import MlflowServer
from fashionserve.repository import render_repository
from fashionserve.tryon.bundle import export_bundle, load_networks
from fashionserve.tryon.samples import write_sample_set
from fashionserve.tryon.stages import TryonConfig
from tests.test_hair_networks_gan import randomize_zero_initialized

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

# The hair pipeline at 256 px with tiny widths: the same stages and spatial sizes as the public 1024.
HAIR_CONFIG = HairConfig(image_size=256, widths="tiny")
HAIR_SEED = 0


def hair_test_pipeline(seed: int = HAIR_SEED) -> tuple[HairPipeline, dict]:
    """The random-init tiny hair pipeline, with a face parser that finds hair: the two classes its untrained
    head picks most on drawn portraits are swapped onto hair and skin, so that masks, shapes and blends
    have something to work on (an all-background parse would hide wiring mistakes). The generator's biases
    and noise strengths (zero at init) are random too, so that its images are not flat grey."""
    pipeline, provenance = hair_bundle_module.load_networks(HAIR_CONFIG, None, seed)
    randomize_zero_initialized(pipeline.networks.generator, seed)
    parser = pipeline.networks.parser
    with torch.no_grad():
        _, _, _, parser_input = pipeline.stages["hair_preprocess"](
            hair_bundle_module.portraits(HAIR_CONFIG, 3, 0)
        )
        counts = np.bincount(parser(parser_input).argmax(1).flatten(), minlength=len(CELEBAMASK_CLASSES))
        first, second = np.argsort(counts)[::-1][:2]
        head = parser.conv_out.conv_out.weight
        for source, target in ((first, HAIR_CLASS), (second, CELEBAMASK_CLASSES.index("skin"))):
            head[[source, target]] = head[[target, source]].clone()
    return pipeline, {**provenance, "parser": "hair and skin rows swapped in (tests)"}


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


@pytest.fixture(scope="session")
def hair_pipeline() -> HairPipeline:
    return hair_test_pipeline()[0]


@pytest.fixture(scope="session")
def hair_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tiny hair bundle (both ensembles), exported once per session (about a minute)."""
    pipeline, provenance = hair_test_pipeline()
    bundle = tmp_path_factory.mktemp("bundles") / "hair"
    manifest = hair_bundle_module.export_bundle(pipeline, provenance, bundle, log=lambda _: None)
    return bundle, manifest


@pytest.fixture(scope="session")
def hair_server(tmp_path_factory: pytest.TempPathFactory, hair_bundle):
    repository = tmp_path_factory.mktemp("triton") / "repository"
    render_repository(*hair_bundle, repository, target="cpu")
    # 21 python-backend models load one stub each: on a busy 2-core machine that took over 120 s
    with TritonServer(repository=repository, ready_timeout=300) as server:
        yield server
