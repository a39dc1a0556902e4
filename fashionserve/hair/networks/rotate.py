"""HairFastGAN pose alignment (`Rotate/rotate_best.pth`): the shape reference's W+ turned toward the
face's pose, module names matching the released file.

Follows AIRI-Institute/HairFastGAN @ 49e98019c9243d1991c19d45764fc3340a498de2, `models/Encoders.py`
(RotateModel, ModulationModule) as `models/Alignment.py` calls it: the first 6 W+ entries of the shape
reference are pixel-normalised (over the 6 entries, StyleGAN2's PixelNorm on dim 1), pass 5 modulation
modules conditioned on the face's first 6 entries, and are added back scaled by 0.1; entries 6+ of the
shape reference pass through unchanged. The result is generated and parsed by the pipeline.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.checkpoints import load_strict, read_checkpoint, state_dict_of

ROTATED_ENTRIES = 6  # W+ entries 0-5 carry pose; upstream slices [:, :6]
MODULATION_MODULES = 5  # the last one has no LeakyReLU
DELTA_SCALE = 0.1  # output = latent + 0.1 * delta
PIXEL_NORM_EPS = 1e-8
LEAKY_SLOPE = 0.01  # nn.LeakyReLU() default, as upstream uses it
LAYER_NORM_EPS = 1e-5


class ModulationModule(nn.Module):
    """fc, LayerNorm over (entries, width) without affine, then x * (1 + gamma(e)) + beta(e) where gamma and
    beta are Linear-LayerNorm-LeakyReLU-Linear MLPs of the conditioning embedding e."""

    def __init__(self, last: bool, width: int = 512, embed: int = 512, hidden: int = 512):
        super().__init__()
        self.last = last
        self.fc = nn.Linear(width, width)
        self.gamma_function = self._mlp(embed, hidden, width)
        self.beta_function = self._mlp(embed, hidden, width)

    @staticmethod
    def _mlp(embed: int, hidden: int, width: int) -> nn.Sequential:
        # Indices 0..3 as upstream's Sequential(Linear, LayerNorm, LeakyReLU, Linear): checkpoint keys.
        return nn.Sequential(
            nn.Linear(embed, hidden),
            nn.LayerNorm([hidden]),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(hidden, width),
        )

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        # LayerNorm over the last two dims (entries, width) without affine: upstream's LayerNorm([6, 512]).
        x = F.layer_norm(self.fc(x), list(x.shape[-2:]), eps=LAYER_NORM_EPS)
        out = x * (1 + self.gamma_function(embedding)) + self.beta_function(embedding)
        return out if self.last else F.leaky_relu(out, LEAKY_SLOPE)


class RotateModel(nn.Module):
    """forward(latent_shape, latent_face) -> the shape reference's W+ in the face's pose, all [N, L, width]
    with L >= 6 (18 for the 1024 generator): entries 0-5 modulated, the rest copied from latent_shape."""

    def __init__(self, width: int = 512):
        super().__init__()
        self.modulation_module_list = nn.ModuleList(
            [
                ModulationModule(i == MODULATION_MODULES - 1, width, width, width)
                for i in range(MODULATION_MODULES)
            ]
        )

    def forward(self, latent_shape: Tensor, latent_face: Tensor) -> Tensor:
        source = latent_shape[:, :ROTATED_ENTRIES]
        condition = latent_face[:, :ROTATED_ENTRIES]
        # PixelNorm on dim 1 of [N, 6, width]: normalises across the 6 entries, as upstream does.
        delta = source * torch.rsqrt(source.pow(2).mean(dim=1, keepdim=True) + PIXEL_NORM_EPS)
        for module in self.modulation_module_list:
            delta = module(delta, condition)
        return torch.cat([source + DELTA_SCALE * delta, latent_shape[:, ROTATED_ENTRIES:]], dim=1)


def load_rotate_checkpoint(path: Path, model: RotateModel | None = None) -> RotateModel:
    """Strictly load `Rotate/rotate_best.pth` ({'model_state_dict': {...}}, as upstream's loader reads it;
    a bare state dict and 'module.' prefixes are accepted too) into `model` (default: public width 512).
    Raises CheckpointError naming missing, unexpected or mis-shaped keys."""
    model = model if model is not None else RotateModel()
    loaded = read_checkpoint(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("model_state_dict"), dict):
        loaded = loaded["model_state_dict"]
    load_strict(model, state_dict_of(loaded, str(path)), f"rotate checkpoint {path}")
    return model.eval()
