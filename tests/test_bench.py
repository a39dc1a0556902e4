"""bench/pipeline.py as a user runs it, on the test bundles with one timed call per backend and batch."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fashionserve.hair.bundle import load_networks, transfer_inputs
from fashionserve.hair.stages import HairConfig
from fashionserve.repository import ensemble_steps
from tests.conftest import run_cli

BACKENDS = ("pytorch-eager", "onnxruntime", "onnxruntime-nospin", "triton-grpc")
HAIR_BACKENDS = (*BACKENDS, "onnxruntime-concurrent")  # hair_transfer has steps that can run at once


def test_pipeline_benchmark_writes_table_plot_and_numbers(tmp_path: Path, tryon_bundle) -> None:
    bundle, _ = tryon_bundle
    out = tmp_path / "report"
    args = ("--bundle", str(bundle), "--batches", "1,2", "--iterations", "1", "--rounds", "1")
    args += ("--warmup", "1", "--threads", "1")  # --threads also sets the Triton leaves' intra_op_threads
    result = run_cli("bench/pipeline.py", *args, "--out", str(out), "--name", "smoke", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    numbers = json.loads((out / "smoke.json").read_text())
    rows = {(r["backend"], r["batch"]): r for r in numbers["results"]}
    assert set(rows) == {(backend, batch) for backend in BACKENDS for batch in (1, 2)}
    for row in rows.values():
        assert row["iterations"] == 1 and row["throughput_images_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert row["max_diff"] <= 2  # every backend computes the same images (uint8 levels)
    assert numbers["settings"]["weights"].startswith("random-init")
    assert numbers["settings"]["intra-op threads asked for"] == 1 == numbers["settings"]["intra-op threads"]

    report = (out / "smoke.md").read_text()
    assert all(f"| {backend} | 1 |" in report for backend in BACKENDS)
    assert "Ensemble overhead over the bare networks" in report and "Goal >= 1.5x" in report
    assert (out / "smoke.png").read_bytes().startswith(b"\x89PNG")


def test_hair_benchmark_compares_every_backend_with_pytorch_per_stage_and_end_to_end(
    tmp_path: Path, hair_bundle, hair_pipeline
) -> None:
    """--pipeline hair on the session's tiny bundle (its PyTorch weights passed along, since the tests
    modify the random-init networks): the bare ONNX Runtime chain and the ensemble must compute PyTorch's
    images from the drawn portraits, and every stage of hair_transfer gets a time in each backend."""
    bundle, manifest = hair_bundle
    weights = tmp_path / "pipeline.pt"
    torch.save(hair_pipeline.state_dict(), weights)
    out = tmp_path / "report"
    args = ("--pipeline", "hair", "--bundle", str(bundle), "--torch-weights", str(weights))
    args += ("--batches", "1", "--iterations", "1", "--rounds", "1", "--warmup", "1", "--stage-calls", "1")
    result = run_cli("bench/pipeline.py", *args, "--threads", "1", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    stem = "hair-cpu-256x256-tiny-threads1"  # the default name
    numbers = json.loads((out / f"{stem}.json").read_text())
    rows = {(r["backend"], r["batch"]): r for r in numbers["results"]}
    assert set(rows) == {(backend, 1) for backend in HAIR_BACKENDS}
    for row in rows.values():
        assert row["iterations"] == 1 and row["throughput_images_per_s"] > 0 and row["peak_memory_mb"] > 0
        # a parser label may flip at a near tie (a band of pixels differs); the images must agree
        assert row["mean_diff"] < 0.5, row
    assert numbers["settings"]["ensemble"] == "hair_transfer"
    assert "image_size 256, widths tiny" in numbers["settings"]["pipeline"]

    steps = Counter(step.model_name for step in ensemble_steps("hair_transfer"))
    stages = numbers["stages"]
    assert set(stages) == {"pytorch-eager", "onnxruntime", "onnxruntime-nospin", "triton-grpc"}
    for backend, per_stage in stages.items():
        assert {name: s["calls"] for name, s in per_stage.items()} == steps, backend
        assert all(s["ms"] > 0 for s in per_stage.values()), backend
    report = (out / f"{stem}.md").read_text()
    assert report.startswith("# Hair transfer pipeline 256x256-tiny, CPU")
    assert "| hair_encoder | 5 |" in report and "**sum of stages**" in report
    assert "mean abs diff |" in report and "Goal < 10% at batch 1" in report
    assert (out / f"{stem}.png").read_bytes().startswith(b"\x89PNG")


def test_pipeline_benchmark_bundle_of_another_pipeline_is_one_line(tmp_path: Path, tryon_bundle) -> None:
    bundle, _ = tryon_bundle
    args = ("--pipeline", "hair", "--bundle", str(bundle), "--out", str(tmp_path))
    result = run_cli("bench/pipeline.py", *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {bundle} is a tryon bundle, not hair (choose it with --pipeline)"
    ]
    assert not list(tmp_path.iterdir())


def test_pipeline_benchmark_missing_bundle_is_one_line(tmp_path: Path) -> None:
    result = run_cli("bench/pipeline.py", "--bundle", str(tmp_path / "nope"), "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: not a bundle (no manifest.json): {tmp_path / 'nope'}"
    ]
    assert not list(tmp_path.iterdir())


def test_hair_projection_counts_every_transfer_step_and_projects_from_the_counts(tmp_path: Path) -> None:
    """bench/hair_projection.py at the test size: every hair_transfer step is counted (runs = the
    ensemble's steps of that model), e4e's five runs are five times one counted call, and the A100
    figures follow from the FLOPs; a stage time from --cpu-report becomes that stage's FLOP rate."""
    cpu_report = tmp_path / "cpu.json"
    encoder_time = {"hair_encoder": {"calls": 5, "ms": 100.0}}
    cpu_report.write_text(json.dumps({"stages": {"onnxruntime": encoder_time}}))
    args = ("--resolution", "256", "--widths", "tiny", "--cpu-report", str(cpu_report), "--name", "p")
    result = run_cli("bench/hair_projection.py", *args, "--out", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "p.json").read_text())
    assert record["runs"] == dict(Counter(step.model_name for step in ensemble_steps("hair_transfer")))

    pipeline, _ = load_networks(HairConfig(256, "tiny"), None, 0)
    pipeline.requires_grad_(False)
    with torch.no_grad():
        face = transfer_inputs(HairConfig(256, "tiny"), 1, 0)[0]
        encoder_input = pipeline.stages["hair_preprocess"](face)[1]
        with FlopCounterMode(display=False) as counter:
            pipeline.stages["hair_encoder"](encoder_input)
    assert record["flops"]["hair_encoder"] == 5 * counter.get_total_flops()
    total = sum(record["flops"].values())
    assert record["projected_ms"]["fp16"] == pytest.approx(total / (312e12 * 0.3) * 1e3)
    report = (tmp_path / "p.md").read_text()
    rate = record["flops"]["hair_encoder"] / 1e9 / 0.1
    assert f"| hair_encoder | 5 | {record['flops']['hair_encoder'] / 1e9:.1f} |" in report
    assert f"| 100 | {rate:.1f} |" in report

    missing = run_cli("bench/hair_projection.py", "--cpu-report", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope.json" in missing.stderr
