"""Latent directions for `hair_edit`: an InterFaceGAN-style boundary in W space, spread over the W+
layers the served model takes."""

import numpy as np


def per_layer_direction(direction: np.ndarray, n_latent: int, style_dim: int) -> np.ndarray:
    """float32 [n_latent, style_dim] from a direction of shape [style_dim] or [1, style_dim] (the same
    for every W+ layer) or [n_latent, style_dim] / [1, n_latent, style_dim] (one per layer). Raises
    ValueError naming the shapes the model takes, or non-finite values."""
    if not np.issubdtype(direction.dtype, np.floating):
        raise ValueError(f"holds {direction.dtype}, expected floats")
    if direction.shape in ((style_dim,), (1, style_dim)):
        direction = np.repeat(direction.reshape(1, style_dim), n_latent, axis=0)
    elif direction.shape in ((n_latent, style_dim), (1, n_latent, style_dim)):
        direction = direction.reshape(n_latent, style_dim)
    else:
        raise ValueError(
            f"has shape {list(direction.shape)}; the served model takes "
            f"[{style_dim}], [1, {style_dim}] or [{n_latent}, {style_dim}]"
        )
    if not np.isfinite(direction).all():
        raise ValueError("holds NaN or infinite values")
    return direction.astype(np.float32)
