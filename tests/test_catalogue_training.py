"""PG-GAN training (tiny networks, a few steps): the critic's zoo layout, minibatch stddev, the
schedule, exact resume, strict loading of every checkpoint into the served generator, the CLI."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fashionserve.catalogue.bundle import load_fashion_generator
from fashionserve.catalogue.data import write_idx
from fashionserve.catalogue.networks.pggan import (
    PGGANConfig,
    PGGANDiscriminator,
    load_pggan_checkpoint,
    minibatch_stddev,
)
from fashionserve.catalogue.pggan_training import (
    HISTORY_FILE,
    RELEASE_FILE,
    TRAINING_FILE,
    PGGANTraining,
    PGGANTrainOptions,
    Phase,
    pad_to_32,
    phase_at,
    schedule,
    to_uint8,
    train_pggan,
)
from fashionserve.catalogue.training import load_classifier, preprocess
from fashionserve.checkpoints import sha256_file
from tests.conftest import PROJECT_ROOT, run_cli

TINY = PGGANTrainOptions(
    depths=(8, 8, 4), latent_dim=8, batch_sizes=(4, 4, 4), fade_images=8, stage_images=12, seed=3
)


def tiny_data(count: int = 24, seed: int = 0) -> torch.Tensor:
    images = np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    return torch.from_numpy(pad_to_32(images))[:, None]


def parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in module.state_dict().items()}


def test_discriminator_has_the_zoo_dnet_layout():
    config = PGGANConfig(latent_dim=8, depth_scale0=8, depth_other_scales=(6, 4), dim_output=1)
    shapes = {key: list(value.shape) for key, value in PGGANDiscriminator(config).state_dict().items()}
    assert shapes == {
        "fromRGBLayers.0.module.weight": [8, 1, 1, 1],
        "fromRGBLayers.0.module.bias": [8],
        "fromRGBLayers.1.module.weight": [6, 1, 1, 1],
        "fromRGBLayers.1.module.bias": [6],
        "fromRGBLayers.2.module.weight": [4, 1, 1, 1],
        "fromRGBLayers.2.module.bias": [4],
        "scaleLayers.0.0.module.weight": [6, 6, 3, 3],  # zoo: new depth -> new depth
        "scaleLayers.0.0.module.bias": [6],
        "scaleLayers.0.1.module.weight": [8, 6, 3, 3],  # then new depth -> previous depth
        "scaleLayers.0.1.module.bias": [8],
        "scaleLayers.1.0.module.weight": [4, 4, 3, 3],
        "scaleLayers.1.0.module.bias": [4],
        "scaleLayers.1.1.module.weight": [6, 4, 3, 3],
        "scaleLayers.1.1.module.bias": [6],
        "groupScaleZero.0.module.weight": [8, 9, 3, 3],  # one more input: the minibatch stddev map
        "groupScaleZero.0.module.bias": [8],
        "groupScaleZero.1.module.weight": [8, 128],
        "groupScaleZero.1.module.bias": [8],
        "decisionLayer.module.weight": [1, 8],
        "decisionLayer.module.bias": [1],
    }
    scores = PGGANDiscriminator(config)(torch.randn(8, 1, 16, 16))
    assert scores.shape == (8, 1)


def test_discriminator_fade_in_starts_from_the_previous_resolution():
    config = PGGANConfig(latent_dim=8, depth_scale0=8, depth_other_scales=(6, 4), dim_output=1)
    grown = PGGANDiscriminator(config)
    previous = PGGANDiscriminator(replace(config, depth_other_scales=(6,)))
    shared = previous.state_dict().keys()
    previous.load_state_dict({key: value for key, value in grown.state_dict().items() if key in shared})
    images = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    grown.alpha = 1.0  # the fade-in's first step: only the half-size path counts
    with torch.no_grad():
        torch.testing.assert_close(grown(images), previous(F.avg_pool2d(images, 2)))
        grown.alpha = 0.5
        half = grown(images)
        grown.alpha = 0.0
        assert not torch.allclose(half, grown(images)) and not torch.allclose(
            half, previous(F.avg_pool2d(images, 2))
        )


def test_minibatch_stddev_matches_the_paper_per_group():
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = minibatch_stddev(x, 4)
    assert torch.equal(out[:, :3], x)
    values = x.numpy().astype(np.float64)
    for group in range(2):
        members = values[4 * group : 4 * group + 4]
        expected = np.sqrt(members.var(axis=0) + 1e-8).mean()  # biased variance, as the official code
        feature = out[4 * group : 4 * group + 4, 3].numpy()
        np.testing.assert_allclose(feature, expected, rtol=1e-5)
    uneven = minibatch_stddev(x[:6], 4)  # 6 does not split into groups of 4: one group
    np.testing.assert_allclose(uneven[:, 3].numpy(), np.sqrt(values[:6].var(axis=0) + 1e-8).mean(), rtol=1e-5)


def test_schedule_fades_in_every_added_resolution_and_reschedules_only_the_rest():
    phases = schedule(TINY)
    assert [(p.resolution, p.fading, p.start, p.images) for p in phases] == [
        (4, False, 0, 12),
        (8, True, 12, 8),
        (8, False, 20, 12),
        (16, True, 32, 8),
        (16, False, 40, 12),
    ]
    assert phase_at(phases, 52) is None
    run = PGGANTraining(TINY)
    run.images = 24  # in the middle of the 8x8 stable phase
    run.stage = 1
    run.reschedule(fade_images=4, stage_images=6)  # the current phase already showed 4 of its 6
    assert [(p.start, p.images) for p in run.phases] == [(0, 12), (12, 8), (20, 6), (26, 4), (30, 6)]
    run.reschedule(fade_images=None, stage_images=2)  # fewer than shown: the current phase ends now
    assert run.phases[2] == Phase(1, False, 20, 4)
    assert [(p.start, p.images) for p in run.phases[3:]] == [(24, 4), (28, 2)]


def test_training_completes_and_every_checkpoint_loads_strictly_into_the_served_generator(tmp_path):
    run = PGGANTraining(TINY)
    data = tiny_data()
    # stop in the middle of the 16x16 fade-in: a zoo checkpoint with alpha > 0
    assert not train_pggan(run, data, tmp_path, max_images=40, log=lambda _: None)
    middle = load_pggan_checkpoint(tmp_path / TRAINING_FILE)
    assert middle.config.resolution == 16 and 0 < middle.config.alpha < 1
    latents = torch.randn(5, TINY.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(middle(latents), run.average(latents), rtol=0, atol=0)

    assert train_pggan(run, data, tmp_path, log=lambda _: None)
    assert run.images >= schedule(TINY)[-1].end
    for name in ("samples_4x4.png", "samples_8x8.png", "samples_16x16.png", HISTORY_FILE):
        assert (tmp_path / name).is_file()
    history = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert history[-1]["images"] == run.images and history[-1]["resolution"] == 16
    release = torch.load(tmp_path / RELEASE_FILE, weights_only=True)
    assert set(release) == {"config", "netG", "netD", "avgG"}  # no optimizer state in what ships
    served, provenance = load_fashion_generator(tmp_path / RELEASE_FILE, PGGANConfig(), seed=0)
    assert served.config.alpha == 0 and served.config.dim_output == 1 and not provenance["random_init"]
    with torch.no_grad():  # equalized LR folded into the served weights: same images
        torch.testing.assert_close(served(latents), run.average(latents), rtol=1e-4, atol=1e-4)


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    data = tiny_data()
    whole = PGGANTraining(TINY)
    train_pggan(whole, data, tmp_path / "whole", log=lambda _: None)
    first = PGGANTraining(TINY)
    train_pggan(first, data, tmp_path / "parts", max_images=16, log=lambda _: None)  # 8x8 fade-in
    resumed = PGGANTraining.from_checkpoint(tmp_path / "parts" / TRAINING_FILE)
    assert resumed.images == 16 and resumed.stage == 1
    train_pggan(resumed, data, tmp_path / "parts", log=lambda _: None)
    for network in ("generator", "discriminator", "average"):
        expected, actual = parameters(getattr(whole, network)), parameters(getattr(resumed, network))
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=f"{network} {key}")


def test_training_moves_the_weights_and_losses_are_finite():
    run = PGGANTraining(TINY)
    before = parameters(run.generator)
    losses = run.step(tiny_data(), alpha=0.0)
    assert all(np.isfinite(value) for value in losses.values())
    assert losses["gradient_penalty"] >= 0
    after = parameters(run.generator)
    assert any(not torch.equal(before[key], after[key]) for key in before)


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28), dtype=np.uint8))
    write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 40, dtype=np.uint8))
    return root


def test_cli_trains_resumes_and_rejects_bad_input(tmp_path, idx_folder):
    out = tmp_path / "run"
    tiny = ["--depths", "8,4", "--batch-sizes", "4,4", "--latent-dim", "8", "--fade-images", "8"]
    first = run_cli(
        "train/fashion_generator.py", "--data", str(idx_folder), "--out", str(out), *tiny,
        "--stage-images", "8", "--minutes", "0.0001",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "continue with --resume" in first.stdout and not (out / RELEASE_FILE).exists()
    again = run_cli("train/fashion_generator.py", "--data", str(idx_folder), "--out", str(out))
    assert again.returncode == 2 and again.stderr.strip().startswith("error:") and "--resume" in again.stderr
    resumed = run_cli(
        "train/fashion_generator.py", "--data", str(idx_folder), "--out", str(out), "--resume",
        "--stage-images", "4",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "8x8 fade-in" in resumed.stdout and (out / RELEASE_FILE).is_file()
    assert load_pggan_checkpoint(out / RELEASE_FILE).config.resolution == 8

    for bad in (["--depths", "8,x"], ["--batch-sizes", "4"], ["--resume"]):
        result = run_cli(
            "train/fashion_generator.py", "--data", str(idx_folder), "--out", str(tmp_path / "b"), *bad
        )
        assert result.returncode == 2, bad
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:"), result.stderr


SHIPPED = PROJECT_ROOT / "models" / "catalogue"


def test_shipped_checkpoints_match_their_sha256_and_load():
    listed = {}
    for line in (SHIPPED / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        listed[name] = digest
    assert set(listed) == {"fashion_generator.pt", "garment_classifier.pt"}
    for name, digest in listed.items():
        assert sha256_file(SHIPPED / name) == digest, name
    generator = load_pggan_checkpoint(SHIPPED / "fashion_generator.pt")
    config = generator.config
    assert (config.resolution, config.dim_output, config.alpha) == (32, 1, 0.0)
    classifier, metadata = load_classifier(SHIPPED / "garment_classifier.pt")
    data = metadata["data"]
    assert data["official_fashion_mnist"] and data["test_images"] == 10_000
    with torch.no_grad():
        images = generator(torch.randn(64, config.latent_dim, generator=torch.Generator().manual_seed(0)))
    pixels = torch.from_numpy(to_uint8(images))
    # trained, not noise: black corners around a garment the classifier recognizes as several classes
    assert pixels[:, :3, :3].float().mean() < 20 and pixels[:, 12:20, 12:20].float().mean() > 60
    garments = preprocess(pixels.numpy())
    assert len(set(classifier(garments).argmax(1).tolist())) >= 4
