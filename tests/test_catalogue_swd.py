"""Sliced Wasserstein distance: hand-checkable cases of every step, and the CLI."""

import json

import numpy as np
import pytest
from PIL import Image

from fashionserve.catalogue.swd import (
    DIRS_PER_REPEAT,
    SWDError,
    laplacian_pyramid,
    pyramid_resolutions,
    sliced_wasserstein,
    swd,
)
from tests.conftest import run_cli


def textures(count: int, size: int, seed: int) -> np.ndarray:
    """Smooth random colour textures, uint8 [N, size, size, 3]."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, size // 4, size // 4, 3)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR)) for c in coarse])


def test_levels_halve_from_full_size_down_to_16():
    assert pyramid_resolutions(512) == [512, 256, 128, 64, 32, 16]
    assert pyramid_resolutions(64) == [64, 32, 16]
    assert pyramid_resolutions(8) == []


def test_laplacian_pyramid_of_a_constant_image_is_zero_but_the_low_pass():
    images = np.full((2, 3, 32, 32), 77.0, np.float32)
    levels = laplacian_pyramid(images, 3)
    assert [level.shape[-1] for level in levels] == [32, 16, 8]
    assert all(np.allclose(level, 0.0, atol=1e-4) for level in levels[:-1])  # band-pass: nothing
    assert np.allclose(levels[-1], 77.0)  # the kernel sums to 1


def test_sliced_wasserstein_of_a_shift_is_the_mean_projected_shift():
    """Sorting keeps a translation, so SW(A, A + d) = mean over directions u of |d . u| exactly."""
    rng = np.random.default_rng(0)
    points = rng.standard_normal((500, 6)).astype(np.float32)
    shift = np.float32([3, 0, 0, 0, 0, 0])
    directions = np.random.default_rng(5).standard_normal((6, DIRS_PER_REPEAT))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    expected = np.abs(shift @ directions).mean()
    got = sliced_wasserstein(points, points + shift, np.random.default_rng(5), repeats=1)
    assert got == pytest.approx(expected, rel=1e-4)
    assert sliced_wasserstein(points, points, np.random.default_rng(5)) == 0.0
    distances = [sliced_wasserstein(points, points + k * shift, np.random.default_rng(5)) for k in (1, 2, 4)]
    assert distances[1] == pytest.approx(2 * distances[0], rel=1e-4)  # linear in the shift
    assert distances[2] == pytest.approx(4 * distances[0], rel=1e-4)


def test_identical_sets_score_zero_and_noise_scores_monotonically():
    images = textures(8, 64, seed=0)
    same = swd(images, images.copy())
    assert list(same) == ["SWDx1e3_64", "SWDx1e3_32", "SWDx1e3_16", "SWDx1e3_avg"]
    assert all(value == 0.0 for value in same.values())
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(images.shape)
    scores = [
        swd(images, (images + sigma * noise).clip(0, 255).astype(np.uint8))["SWDx1e3_avg"]
        for sigma in (2, 8, 32)
    ]
    assert 0 < scores[0] < scores[1] < scores[2]


def test_grayscale_sets_and_bad_shapes():
    images = textures(4, 32, seed=2)[..., 0]
    assert swd(images, images)["SWDx1e3_avg"] == 0.0
    with pytest.raises(SWDError, match="same shape"):
        swd(images, images[:3])
    with pytest.raises(SWDError, match="at least 16"):
        swd(images[:, :8, :8], images[:, :8, :8])


def test_cli_compares_two_folders(tmp_path):
    images = textures(6, 32, seed=3)
    for name, batch in (("a", images), ("b", 255 - images)):
        (tmp_path / name).mkdir()
        for index, image in enumerate(batch):
            Image.fromarray(image).save(tmp_path / name / f"{index}.png")
    result = run_cli(
        "bench/swd.py", str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(tmp_path / "s.json")
    )
    assert result.returncode == 0, result.stderr
    assert "SWD x1e3 over 6 images per set (32x32)" in result.stdout and "SWDx1e3_avg" in result.stdout
    values = json.loads((tmp_path / "s.json").read_text())
    assert values["images"] == 6 and values["SWDx1e3_avg"] > 0
    missing = run_cli("bench/swd.py", str(tmp_path / "a"), str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: not a folder or .npy file")
