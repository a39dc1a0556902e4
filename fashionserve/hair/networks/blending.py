"""HairFastGAN's colour blending: CLIP-conditioned modulation of the face's S layers 6-17.

Follows AIRI-Institute/HairFastGAN @ 49e98019 (models/Encoders.py ClipBlendingModel, ModulationModule;
models/Blending.py Blending.blend_images up to S_blend; utils/image_utils.py DilateErosion):

- hair masks (binary, 256 x 256) are dilated / eroded `smooth` (5) times with a 3 x 3 cross;
- the face image keeps the pixels outside the dilated hair of the face, of the colour reference and of
  the target hair shape (HM_X from the colour shape alignment); the colour image keeps its eroded hair;
- both masked images are embedded by CLIP ViT-B/32 (clip_image.ClipImageEncoder);
- `BlendingEncoder` (the trained part, Blending/checkpoint.pth `model_state_dict`) maps
  S_face[6:], S_color[6:] and the two embeddings to S_face[6:] + 0.1 * delta: delta starts as the pixel
  norm of S_face[6:] taken over the LAYER axis (rosinality's PixelNorm normalizes dim 1, which is the
  layer axis of a [B, 12, 512] latent) and passes five modulation modules (Linear, LayerNorm over the
  whole [12, 512] latent, then x * (1 + gamma(c)) + beta(c) with c = [S_color, embed_face, embed_color]
  per layer, leaky ReLU 0.01 except after the last);
- S_blend = [S_face[:6], blended layers 6-17]; the generator runs it from the aligned F tensor.

Not here (pipeline decisions): upstream skips blending and keeps S_face when face, shape and colour are
the same image, and the generator / post-processing passes that follow.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.checkpoints import CheckpointError, load_strict, read_checkpoint, state_dict_of
from fashionserve.hair.networks.clip_image import ClipImageEncoder, load_clip_image_encoder
from fashionserve.hair.networks.stylegan2 import pixel_norm

BLEND_START_LAYER = 6  # S layers 0-5 (coarse: pose, shape) stay the face's; 6-17 are blended
N_LATENT = 18  # W+ / S layers of the 1024 px StyleGAN2
NUM_MODULATIONS = 5
DELTA_SCALE = 0.1  # output = latent + 0.1 * delta
LAYER_NORM_EPS = 1e-5  # torch default, kept by the public modules
LEAKY_SLOPE = 0.01  # nn.LeakyReLU default, used by the public modules
SMOOTH_STEPS = 5  # hair_swap.py --smooth: dilation / erosion steps
CLIP_MODEL_NAME = "ViT-B/32"  # the only CLIP the released checkpoint names (its default)


class ModulationModule(nn.Module):
    """x -> LayerNorm_[layers, latent](fc(x)) * (1 + gamma(c)) + beta(c), leaky ReLU unless `last`.
    gamma and beta: Linear(condition, middle), LayerNorm(middle), leaky ReLU, Linear(middle, latent)."""

    def __init__(
        self, layers: int, condition_dim: int, middle: int, latent_dim: int = 512, last: bool = False
    ):
        super().__init__()
        self.normalized_shape = (layers, latent_dim)
        self.last = last
        self.fc = nn.Linear(latent_dim, latent_dim)
        self.gamma_function = self._condition_mlp(condition_dim, middle, latent_dim)
        self.beta_function = self._condition_mlp(condition_dim, middle, latent_dim)

    @staticmethod
    def _condition_mlp(condition_dim: int, middle: int, latent_dim: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(condition_dim, middle),
            nn.LayerNorm(middle, eps=LAYER_NORM_EPS),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(middle, latent_dim),
        )

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        x = F.layer_norm(self.fc(x), self.normalized_shape, eps=LAYER_NORM_EPS)
        out = x * (1 + self.gamma_function(condition)) + self.beta_function(condition)
        return out if self.last else F.leaky_relu(out, LEAKY_SLOPE)


class BlendingEncoder(nn.Module):
    """The trained part of ClipBlendingModel (state dict = Blending/checkpoint.pth `model_state_dict`):
    (S_face[:, 6:], S_color[:, 6:] [B, layers, latent], embed_face, embed_color [B, embed]) ->
    blended S layers [B, layers, latent]. Defaults are the public configuration."""

    def __init__(
        self,
        layers: int = N_LATENT - BLEND_START_LAYER,
        latent_dim: int = 512,
        embed_dim: int = 512,
        middle: int = 1024,
    ):
        super().__init__()
        self.layers = layers
        condition_dim = latent_dim + 2 * embed_dim
        self.modulation_module_list = nn.ModuleList(
            ModulationModule(layers, condition_dim, middle, latent_dim, last=index == NUM_MODULATIONS - 1)
            for index in range(NUM_MODULATIONS)
        )

    def forward(
        self, latent_face: Tensor, latent_color: Tensor, embed_face: Tensor, embed_color: Tensor
    ) -> Tensor:
        per_layer = (-1, self.layers, -1)
        condition = torch.cat(
            (
                latent_color,
                embed_face.unsqueeze(1).expand(per_layer),
                embed_color.unsqueeze(1).expand(per_layer),
            ),
            dim=-1,
        )
        delta = pixel_norm(latent_face)  # rosinality's PixelNorm: over dim 1, here the layer axis
        for module in self.modulation_module_list:
            delta = module(delta, condition)
        return latent_face + DELTA_SCALE * delta


class HairMaskMorphology(nn.Module):
    """DilateErosion: `steps` dilations or erosions of binary masks [B, 1, H, W] with a 3 x 3 cross and
    zero padding (so erosion also eats in from the border). Upstream thresholds the convolution at > 0
    and == 5; here at > 0.5 and > 4.5, the same on 0/1 sums and safe from rounding in fast convolutions."""

    def __init__(self, steps: int = SMOOTH_STEPS):
        super().__init__()
        self.steps = steps
        cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("cross", cross.view(1, 1, 3, 3), persistent=False)
        self.full_sum = float(cross.sum())  # a pixel survives erosion when its whole cross is hair

    def _repeat(self, mask: Tensor, threshold: float) -> Tensor:
        for _ in range(self.steps):
            mask = (F.conv2d(mask, self.cross, padding=1) > threshold).to(mask.dtype)
        return mask

    def dilate(self, mask: Tensor) -> Tensor:
        return self._repeat(mask, 0.5)

    def erode(self, mask: Tensor) -> Tensor:
        return self._repeat(mask, self.full_sum - 0.5)


class ColorBlending(nn.Module):
    """Blending.blend_images up to S_blend. Inputs: S of the face and of the colour reference
    [B, 18, 512]; their images in [-1, 1] [B, 3, 256, 256] (`image_norm_256`); binary hair masks
    [B, 1, 256, 256] of the face, of the colour reference and of the target hair shape (HM_X). Output:
    S_blend [B, 18, 512] (layers 0-5 the face's)."""

    def __init__(
        self,
        clip: ClipImageEncoder | None = None,
        encoder: BlendingEncoder | None = None,
        smooth: int = SMOOTH_STEPS,
        blend_start: int = BLEND_START_LAYER,
    ):
        super().__init__()
        self.clip = clip if clip is not None else ClipImageEncoder()
        self.encoder = encoder if encoder is not None else BlendingEncoder(embed_dim=self.clip.output_dim)
        self.morphology = HairMaskMorphology(smooth)
        self.blend_start = blend_start

    def forward(
        self,
        latent_face: Tensor,
        latent_color: Tensor,
        face_image: Tensor,
        color_image: Tensor,
        face_hair: Tensor,
        color_hair: Tensor,
        target_hair: Tensor,
    ) -> Tensor:
        dilate = self.morphology.dilate
        outside_hair = (1 - dilate(face_hair)) * (1 - dilate(color_hair)) * (1 - dilate(target_hair))
        hair_core = self.morphology.erode(color_hair)
        # One CLIP pass over both masked images (batch 2B), split back per image.
        embeds = self.clip(torch.cat((face_image * outside_hair, color_image * hair_core)))
        batch = latent_face.shape[0]
        start = self.blend_start
        blended = self.encoder(
            latent_face[:, start:], latent_color[:, start:], embeds[:batch], embeds[batch:]
        )
        return torch.cat((latent_face[:, :start], blended), dim=1)


def load_blending_checkpoint(path: Path, encoder: BlendingEncoder | None = None) -> BlendingEncoder:
    """Strictly load Blending/checkpoint.pth (a dict whose `model_state_dict` is the BlendingEncoder's
    state dict; an optional `clip` entry names the CLIP model, ViT-B/32 if absent) into `encoder`
    (default: the public configuration). The public training script removes the frozen CLIP
    (`clip_model.*`) before saving; such entries here are unexpected keys. Raises CheckpointError."""
    encoder = encoder if encoder is not None else BlendingEncoder()
    loaded = read_checkpoint(path)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("model_state_dict"), dict):
        raise CheckpointError(f"{path}: not a HairFastGAN blending checkpoint (no 'model_state_dict' dict)")
    clip_name = loaded.get("clip", CLIP_MODEL_NAME)
    if clip_name != CLIP_MODEL_NAME:
        raise CheckpointError(
            f"{path}: the checkpoint was trained with CLIP {clip_name!r}, not {CLIP_MODEL_NAME}"
        )
    state_dict = state_dict_of(loaded["model_state_dict"], f"{path} (model_state_dict)")
    load_strict(encoder, state_dict, f"blending checkpoint {path} (model_state_dict)")
    return encoder.eval()


def load_color_blending(
    blending_path: Path, clip_path: Path, network: ColorBlending | None = None
) -> ColorBlending:
    """The colour step from HairFastGAN's `Blending/checkpoint.pth` and OpenAI's `ViT-B-32.pt`, strictly
    loaded into `network` (default: the public configuration)."""
    network = network if network is not None else ColorBlending()
    load_clip_image_encoder(clip_path, network.clip)
    load_blending_checkpoint(blending_path, network.encoder)
    return network.eval()
