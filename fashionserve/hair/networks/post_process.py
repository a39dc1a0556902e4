"""HairFastGAN's post-process (refinement) network: the face image and the blended image -> S_final (W+)
and F_final (512 x 64 x 64), from which the generator regenerates starting at block 5.

Read from AIRI-Institute/HairFastGAN @ 49e98019c9243d1991c19d45764fc3340a498de2: `models/Encoders.py`
PostProcessModel, `models/Net.py` FeatureEncoderMult(fs_layers=[9]) and IResNet, `models/Blending.py`
(the call: source = the face's 256 px normalized image, target = the blended 1024 px generator output
bicubic-downsampled to 256 px; then `generator(start_layer=5, end_layer=8, layer_in=F_final)`).

- `encoder_face` (FeatureEncoderMult with fs_layers [9]): the iresnet50 style encoder; its content (F)
  head reads the second stage (128 x 64 x 64 at 256 px) with stride 1, giving 512 x 64 x 64, the input of
  generator block 5. Both images go through it.
- S: pixel norm (over dim 1, the W+ entries, as the public PixelNorm does on [N, 18, 512]) of each
  image's styles, five ModulationModules each conditioned on the other image's styles, summed, times 0.1,
  plus the average latent from `PostProcess/latent_avg.pt`.
- F: the two content maps concatenated (1024 channels) through six IBasicBlocks (1024, 1024, 768, 768,
  512, 512 channels; `to_feature.res_blocks.res_block_{stage}_{unit}`).

Files: `pp_model.pth` is {'model_state_dict': ..., plus training entries such as the discriminator 'D' and
'cur_iter'}; only model_state_dict is read, strictly. `latent_avg.pt` is a bare tensor. The public
constructor also loads ArcFace's `backbone_ir50.pth` into encoder_face before pp_model.pth overwrites every
tensor: not needed.
"""

from pathlib import Path

import torch
from torch import Tensor, nn

from fashionserve.checkpoints import CheckpointError, load_strict, read_checkpoint, state_dict_of
from fashionserve.hair.networks.blending import ModulationModule
from fashionserve.hair.networks.iresnet import (
    IRESNET50_UNITS,
    IBasicBlock,
    IResNetStyleEncoder,
    content_head,
)
from fashionserve.hair.networks.stylegan2 import PixelNorm, expand_latent_avg

F_START_BLOCK = 5  # the generator block F_final feeds (HairFastGAN start_layer=5)
MODULATION_DEPTH = 5  # ModulationModules per branch; the last has no activation
DELTA_SCALE = 0.1  # S_final = latent_avg + 0.1 * (face delta + hair delta)
UNITS_PER_WIDTH = 2  # to_feature: two IBasicBlocks at each of 2c, 3c/2 and c channels


class PostProcessEncoder(IResNetStyleEncoder):
    """FeatureEncoderMult(fs_layers=[9]): styles [N, n_styles, style_dim] without an average latent, and
    the content map from the second stage (stride 1: the input size / 4, 64 x 64 at 256 px).
    `content_layer` is a one-entry ModuleList, as in the public module (keys content_layer.0.*)."""

    def __init__(
        self,
        n_styles: int = 18,
        style_dim: int = 512,
        content_channels: int = 512,
        width: int = 64,
        units: tuple[int, int, int, int] = IRESNET50_UNITS,
    ):
        content = nn.ModuleList([content_head(2 * width, content_channels, stride=1)])
        super().__init__(content, n_styles, style_dim, width, units)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        styles, stages = self.encode(image)
        return styles, self.content_layer[0](stages[1])


class FeatureIResNet(nn.Module):
    """Stride-1 IBasicBlocks in a ModuleDict named res_block_{stage}_{unit} (public FeatureiResnet)."""

    def __init__(self, in_channels: int, widths: tuple[int, ...]):
        super().__init__()
        self.res_blocks = nn.ModuleDict()
        for stage, width in enumerate(widths, start=1):
            for unit in range(1, UNITS_PER_WIDTH + 1):
                self.res_blocks[f"res_block_{stage}_{unit}"] = IBasicBlock(in_channels, width)
                in_channels = width

    def forward(self, x: Tensor) -> Tensor:
        for block in self.res_blocks.values():
            x = block(x)
        return x


class PostProcess(nn.Module):
    """PostProcessModel; state_dict keys equal pp_model.pth's `model_state_dict`. The average latent is the
    non-persistent buffer `latent_avg` [n_styles, style_dim] (latent_avg.pt; random-init leaves it zero).

    forward(face, blended): both [N, 3, 256, 256] in [-1, 1] -> (S_final [N, n_styles, style_dim],
    F_final [N, content_channels, 64, 64]). The public encoder first resizes its input to 256 x 256, a
    no-op for the 256 px images it is always given; this module takes any size divisible by 16 as is.
    Knobs for tiny tests: `width` (64), `units` (iresnet50), `content_channels` (512), `style_dim` (512).
    """

    def __init__(
        self,
        n_styles: int = 18,
        style_dim: int = 512,
        content_channels: int = 512,
        width: int = 64,
        units: tuple[int, int, int, int] = IRESNET50_UNITS,
    ):
        super().__init__()
        self.encoder_face = PostProcessEncoder(n_styles, style_dim, content_channels, width, units)
        c = content_channels
        self.to_feature = FeatureIResNet(2 * c, (2 * c, 3 * c // 2, c))
        self.to_latent_1 = self._modulations(n_styles, style_dim)
        self.to_latent_2 = self._modulations(n_styles, style_dim)
        self.pixel_norm = PixelNorm()
        self.register_buffer("latent_avg", torch.zeros(n_styles, style_dim), persistent=False)
        self.n_styles = n_styles
        self.style_dim = style_dim

    @staticmethod
    def _modulations(n_styles: int, style_dim: int) -> nn.ModuleList:
        return nn.ModuleList(
            ModulationModule(n_styles, style_dim, style_dim, style_dim, last=index == MODULATION_DEPTH - 1)
            for index in range(MODULATION_DEPTH)
        )

    def set_latent_avg(self, latent_avg: Tensor) -> None:
        """Set the average latent ([style_dim], [1, style_dim], [n_styles, style_dim] or with a leading 1)."""
        self.latent_avg.copy_(expand_latent_avg(latent_avg, self.n_styles, self.style_dim))

    def forward(self, face: Tensor, blended: Tensor) -> tuple[Tensor, Tensor]:
        styles_face, content_face = self.encoder_face(face)
        styles_hair, content_hair = self.encoder_face(blended)
        delta_face, delta_hair = self.pixel_norm(styles_face), self.pixel_norm(styles_hair)
        for modulation in self.to_latent_1:
            delta_face = modulation(delta_face, styles_hair)
        for modulation in self.to_latent_2:
            delta_hair = modulation(delta_hair, styles_face)
        w_plus = self.latent_avg + DELTA_SCALE * (delta_face + delta_hair)
        return w_plus, self.to_feature(torch.cat((content_face, content_hair), dim=1))


def load_post_process(
    checkpoint_path: Path, latent_avg_path: Path, module: PostProcess | None = None
) -> PostProcess:
    """Strictly load `PostProcess/pp_model.pth` (its 'model_state_dict') into `module` (default: the public
    configuration) and the average latent from `PostProcess/latent_avg.pt` (a tensor). Raises
    CheckpointError naming missing, unexpected and mis-shaped keys."""
    module = module if module is not None else PostProcess()
    loaded = read_checkpoint(checkpoint_path)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("model_state_dict"), dict):
        raise CheckpointError(
            f"{checkpoint_path}: not a post-process checkpoint (no 'model_state_dict' dict)"
        )
    state_dict = state_dict_of(loaded["model_state_dict"], f"{checkpoint_path} (model_state_dict)")
    load_strict(module, state_dict, f"post-process checkpoint {checkpoint_path}")
    latent_avg = read_checkpoint(latent_avg_path)
    if not torch.is_tensor(latent_avg):
        raise CheckpointError(f"{latent_avg_path}: expected a tensor, got {type(latent_avg).__name__}")
    try:
        module.set_latent_avg(latent_avg)
    except ValueError as exc:
        raise CheckpointError(f"{latent_avg_path}: {exc}") from exc
    return module.eval()
