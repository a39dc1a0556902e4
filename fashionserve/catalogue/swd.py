"""Multi-scale sliced Wasserstein distance (SWD) of the PG-GAN paper, as its official code computes it
(tkarras/progressive_growing_of_gans, metrics/sliced_wasserstein.py):

1. images as float32 on the 0..255 scale, NCHW RGB (grayscale tiled to 3 channels);
2. a Laplacian pyramid per minibatch (5x5 binomial kernel, scipy `mirror` borders, zero-insert
   upsampling), from full size halving while the side is >= 16; the last level is the low-pass image;
3. 128 random 7x7 patches per image and level (centres keep the patch inside), 147 values each;
4. per level and per set: subtract the per-channel mean and divide by the per-channel std over all
   descriptors, flatten;
5. 4 repeats of 128 random unit directions: project both sets, sort, mean |difference|; average the
   repeats; report x1e3 per level (`SWDx1e3_<size>`) and their plain mean (`SWDx1e3_avg`).

One deliberate difference: the official code draws patch positions and directions unseeded. Here they
come from `seed`, and both sets use the same patch positions (the sets must be equally large, as the
official code also requires), so identical sets score exactly 0 and a paired comparison (fp32 against
quantized samples of the same latents) is not drowned in sampling noise.
"""

import numpy as np
import scipy.ndimage

NHOOD_SIZE = 7
NHOODS_PER_IMAGE = 128
DIR_REPEATS = 4
DIRS_PER_REPEAT = 128
MIN_RESOLUTION = 16
MINIBATCH = 16  # the official minibatch at 512x512: clip(8192 // 512, 4, 256)
_KERNEL = (np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0).astype(np.float32)[None, None]


class SWDError(ValueError):
    """Image sets SWD cannot compare (one line)."""


def pyramid_resolutions(size: int) -> list[int]:
    """Level sizes: `size` halving while >= 16 (512 -> 512, 256, 128, 64, 32, 16)."""
    sizes = []
    while size >= MIN_RESOLUTION:
        sizes.append(size)
        size //= 2
    return sizes


def _pyr_down(images: np.ndarray) -> np.ndarray:
    return scipy.ndimage.convolve(images, _KERNEL, mode="mirror")[:, :, ::2, ::2]


def _pyr_up(images: np.ndarray) -> np.ndarray:
    n, c, h, w = images.shape
    spread = np.zeros((n, c, h * 2, w * 2), images.dtype)
    spread[:, :, ::2, ::2] = images
    return scipy.ndimage.convolve(spread, _KERNEL * 4.0, mode="mirror")


def laplacian_pyramid(images: np.ndarray, levels: int) -> list[np.ndarray]:
    """Band-pass levels of float32 NCHW images, finest first; the last level is the low-pass image."""
    pyramid = [images.astype(np.float32)]
    for _ in range(1, levels):
        pyramid.append(_pyr_down(pyramid[-1]))
        pyramid[-2] -= _pyr_up(pyramid[-1])
    return pyramid


def _patches(level: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """NHOODS_PER_IMAGE random NHOOD_SIZE^2 patches per image -> [N * NHOODS_PER_IMAGE, C, 7, 7]."""
    n, c, h, w = level.shape
    half = NHOOD_SIZE // 2
    count = n * NHOODS_PER_IMAGE
    image = (np.arange(count) // NHOODS_PER_IMAGE)[:, None, None, None]
    channel = np.arange(c)[None, :, None, None]
    offsets = np.arange(-half, half + 1)
    y = rng.integers(half, h - half, size=(count, 1, 1, 1)) + offsets[None, None, :, None]
    x = rng.integers(half, w - half, size=(count, 1, 1, 1)) + offsets[None, None, None, :]
    return level[image, channel, y, x]


def _normalize(descriptors: list[np.ndarray]) -> np.ndarray:
    desc = np.concatenate(descriptors, axis=0)
    desc -= desc.mean(axis=(0, 2, 3), keepdims=True)
    # a constant channel (e.g. grayscale tiled, or a flat level) has std 0: leave it at 0, not NaN
    std = desc.std(axis=(0, 2, 3), keepdims=True)
    desc /= np.where(std > 0, std, 1.0)
    return desc.reshape(desc.shape[0], -1)


def sliced_wasserstein(
    a: np.ndarray, b: np.ndarray, rng: np.random.Generator, repeats: int = DIR_REPEATS
) -> float:
    """Mean over `repeats` x DIRS_PER_REPEAT random unit directions of the 1-D Wasserstein-1 distance
    between the projections of point sets `a` and `b` ([points, dims], equally many points)."""
    if a.ndim != 2 or a.shape != b.shape:
        raise SWDError(f"point sets must have the same [points, dims] shape, got {a.shape} and {b.shape}")
    results = []
    for _ in range(repeats):
        directions = rng.standard_normal((a.shape[1], DIRS_PER_REPEAT))
        directions /= np.sqrt(np.square(directions).sum(axis=0, keepdims=True))
        directions = directions.astype(np.float32)
        projected_a = np.sort(a @ directions, axis=0)
        projected_b = np.sort(b @ directions, axis=0)
        results.append(np.abs(projected_a - projected_b).mean())
    return float(np.mean(results))


def _as_nchw(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] or [N, H, W] -> float32 [N, 3, H, W] on the 0..255 scale."""
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise SWDError(f"images must be [N, H, W, 3] or [N, H, W], got shape {list(images.shape)}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)


def _descriptors(images: np.ndarray, levels: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    per_level: list[list[np.ndarray]] = [[] for _ in range(levels)]
    for start in range(0, len(images), MINIBATCH):
        pyramid = laplacian_pyramid(_as_nchw(images[start : start + MINIBATCH]), levels)
        for index, level in enumerate(pyramid):
            per_level[index].append(_patches(level, rng))
    return [_normalize(d) for d in per_level]


def swd(images_a: np.ndarray, images_b: np.ndarray, seed: int = 0) -> dict[str, float]:
    """SWD x1e3 between two equally large sets of uint8 images of one size: {'SWDx1e3_<size>': ...,
    'SWDx1e3_avg': ...}, finest level first."""
    if images_a.shape != images_b.shape:
        raise SWDError(
            f"both sets need the same shape (count and size), got {list(images_a.shape)} "
            f"and {list(images_b.shape)}"
        )
    height, width = images_a.shape[1:3]
    sizes = pyramid_resolutions(min(height, width))
    if not sizes or height % 2 ** (len(sizes) - 1) or width % 2 ** (len(sizes) - 1):
        raise SWDError(
            f"images of {height}x{width}: both sides must be at least {MIN_RESOLUTION} and halve evenly "
            "down to the coarsest level"
        )
    # same seed for both sets: identical patch positions (see the module docstring)
    desc_a = _descriptors(images_a, len(sizes), seed)
    desc_b = _descriptors(images_b, len(sizes), seed)
    rng = np.random.default_rng([seed, 1])
    distances = [sliced_wasserstein(a, b, rng) * 1e3 for a, b in zip(desc_a, desc_b, strict=True)]
    values = {f"SWDx1e3_{size}": d for size, d in zip(sizes, distances, strict=True)}
    return {**values, "SWDx1e3_avg": float(np.mean(distances))}
