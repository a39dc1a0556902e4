"""How close a fashion generator's images are to real Fashion-MNIST garments.

- SWD (`swd.py`, the PG-GAN paper's metric) between generated and real images, on the 32x32 padded
  images the generator was trained on (levels 32 and 16).
- An FID-style distance: the Frechet distance between Gaussians fitted to the garment classifier's
  penultimate features (its 128 hidden units) of the two sets. FID proper uses Inception-v3 features,
  whose weights are not available offline here; numbers are comparable only with each other.
- The class shares of the generated images as the classifier sees them (real test images: 10% each).

The classifier sees the central 28x28 of every 32x32 image: for a real image exactly its Fashion-MNIST
original (the padding undone), for a generated one the same window. (The served preprocessing, which
trims to the garment and rescales, gives the same for real images but costs far more on 10,000.)
"""

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from fashionserve.catalogue.networks.classifier import CLASSES, IMAGE_SIZE, GarmentClassifier
from fashionserve.catalogue.networks.pggan import PGGANGenerator
from fashionserve.catalogue.pggan_training import to_uint8

_BATCH = 500


@torch.no_grad()
def generate(generator: PGGANGenerator, count: int, seed: int) -> np.ndarray:
    """uint8 [count, R, R] gray images from N(0, I) latents drawn with `seed`."""
    generator.eval()
    rng = torch.Generator().manual_seed(seed)
    latents = torch.randn(count, generator.config.latent_dim, generator=rng)
    return np.concatenate([to_uint8(generator(latents[i : i + _BATCH])) for i in range(0, count, _BATCH)])


def garments(images: np.ndarray) -> Tensor:
    """uint8 [N, 32, 32] -> classifier inputs float [N, 1, 28, 28] in 0..1: the central window."""
    margin = (images.shape[1] - IMAGE_SIZE) // 2
    window = images[:, margin : margin + IMAGE_SIZE, margin : margin + IMAGE_SIZE]
    return torch.from_numpy(np.ascontiguousarray(window)).float()[:, None] / 255.0


@torch.no_grad()
def embeddings(model: GarmentClassifier, garments: Tensor) -> np.ndarray:
    model.eval()
    chunks = [model.embedding(garments[i : i + _BATCH]) for i in range(0, len(garments), _BATCH)]
    return torch.cat(chunks).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to feature sets [N, D]."""
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    root = root.real  # rounding leaves a tiny imaginary part
    return float(np.square(mean_a - mean_b).sum() + np.trace(cov_a + cov_b - 2.0 * root))


@torch.no_grad()
def class_shares(model: GarmentClassifier, garments: Tensor) -> dict[str, float]:
    """Fraction of the images the classifier assigns to each class."""
    model.eval()
    labels = torch.cat([model(garments[i : i + _BATCH]).argmax(1) for i in range(0, len(garments), _BATCH)])
    counts = np.bincount(labels.numpy(), minlength=len(CLASSES))
    return {name: float(count / len(labels)) for name, count in zip(CLASSES, counts, strict=True)}
