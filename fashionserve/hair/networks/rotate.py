"""HairFastGAN pose alignment (`Rotate/rotate_best.pth`): the shape reference's W+ turned toward the
face's pose, module names matching the released file.

Follows AIRI-Institute/HairFastGAN @ 49e98019c9243d1991c19d45764fc3340a498de2, `models/Encoders.py`
(RotateModel, ModulationModule) as `models/Alignment.py` calls it: the first 6 W+ entries of the shape
reference are pixel-normalised (over the 6 entries, StyleGAN2's PixelNorm on dim 1), pass 5 modulation
modules conditioned on the face's first 6 entries, and are added back scaled by 0.1; entries 6+ of the
shape reference pass through unchanged. The result is generated and parsed by the pipeline. The
modulation modules are the blending network's (same public class, there with 12 layers).
"""

from pathlib import Path

import torch
from torch import Tensor, nn

from fashionserve.checkpoints import load_strict, read_checkpoint, state_dict_of
from fashionserve.hair.networks.blending import DELTA_SCALE, NUM_MODULATIONS, ModulationModule
from fashionserve.hair.networks.stylegan2 import pixel_norm

ROTATED_ENTRIES = 6  # W+ entries 0-5 carry pose; upstream slices [:, :6]


class RotateModel(nn.Module):
    """forward(latent_shape, latent_face) -> the shape reference's W+ in the face's pose, all [N, L, width]
    with L >= 6 (18 for the 1024 generator): entries 0-5 modulated, the rest copied from latent_shape."""

    def __init__(self, width: int = 512):
        super().__init__()
        self.modulation_module_list = nn.ModuleList(
            ModulationModule(ROTATED_ENTRIES, width, width, width, last=index == NUM_MODULATIONS - 1)
            for index in range(NUM_MODULATIONS)
        )

    def forward(self, latent_shape: Tensor, latent_face: Tensor) -> Tensor:
        source = latent_shape[:, :ROTATED_ENTRIES]
        condition = latent_face[:, :ROTATED_ENTRIES]
        # PixelNorm on dim 1 of [N, 6, width]: normalises across the 6 entries, as upstream does.
        delta = pixel_norm(source)
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
