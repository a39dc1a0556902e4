"""HairFastGAN's FS encoder: an aligned portrait -> S (W+, 18 x 512) and F (512 x 32 x 32).

Read from AIRI-Institute/HairFastGAN @ 49e98019c9243d1991c19d45764fc3340a498de2: `models/Embedding.py`
normalizes the 1024 px [0, 1] image to [-1, 1] and calls the FS trainer's `test(img, return_latent=True)`
(`models/FeatureStyleEncoder/trainer.py`); that halves the image twice with bilinear interpolation
(1024 -> 256, `downscale`, resolution / enc_resolution = 4), runs `fs_encoder_v2`
(`nets/feature_style_encoder.py`, an iresnet50 body, `fs_stride` 2) and adds `dlatent_avg`, the pSp
checkpoint's `latent_avg` (`FeatureStyleEncoder/psp_ffhq_encode.pt`). The content map (512 x 16 x 16) then
goes through the generator's block 3 (`start_layer=3, end_layer=3, layer_in=...`) to give F.

Files: `143_enc.pth` is a bare fs_encoder_v2 state dict (loaded with a strict `load_state_dict`); the
public constructor first loads `backbone.pth` (ArcFace iresnet50) into the body, but 143_enc.pth then
overwrites every tensor, so backbone.pth is not needed. The trainer's other files (pSp decoder weights,
BiSeNet) serve only its training losses and its unused reconstruction image.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.checkpoints import CheckpointError, load_strict, read_checkpoint, state_dict_of
from fashionserve.hair.networks.iresnet import IRESNET50_UNITS, IResNetStyleEncoder, content_head
from fashionserve.hair.networks.stylegan2 import StyleGAN2Generator, expand_latent_avg

INPUT_HALVINGS = 2  # trainer scale = log2(resolution 1024 / enc_resolution 256)
CONTENT_STRIDE = 2  # 001.yaml fs_stride: the content map is the body's 32 x 32 stage halved to 16 x 16
F_BLOCK = 3  # generator block that turns the content map into F (HairFastGAN start_layer = end_layer = 3)


class FeatureStyleEncoder(IResNetStyleEncoder):
    """`fs_encoder_v2` plus the trainer's input downscaling and average latent; state_dict keys equal
    `143_enc.pth`'s. The average latent is the non-persistent buffer `latent_avg` [n_styles, style_dim]
    (not in that file: `load_feature_style_encoder` takes it from the pSp checkpoint, random-init leaves
    it zero).

    forward: image [N, 3, 1024, 1024] in [-1, 1] -> (S [N, n_styles, style_dim] with the average latent
    added, content [N, content_channels, 16, 16]). Any size divisible by 64 works (tests run smaller).
    Knobs for tiny tests: `width` (64), `units` (iresnet50), `content_channels` (512), `style_dim` (512),
    `input_halvings` (2; smaller portraits need fewer to reach the encoder's 256 px).
    """

    def __init__(
        self,
        n_styles: int = 18,
        style_dim: int = 512,
        content_channels: int = 512,
        width: int = 64,
        units: tuple[int, int, int, int] = IRESNET50_UNITS,
        input_halvings: int = INPUT_HALVINGS,
    ):
        super().__init__(
            content_head(4 * width, content_channels, CONTENT_STRIDE), n_styles, style_dim, width, units
        )
        self.input_halvings = input_halvings  # the trainer's log2(resolution / 256); 0 for 256 px portraits
        self.register_buffer("latent_avg", torch.zeros(n_styles, style_dim), persistent=False)

    def set_latent_avg(self, latent_avg: Tensor) -> None:
        """Set the average latent ([style_dim], [1, style_dim], [n_styles, style_dim] or with a leading 1)."""
        self.latent_avg.copy_(expand_latent_avg(latent_avg, self.n_styles, self.style_dim))

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        x = image
        for _ in range(self.input_halvings):
            # Exactly what the trainer's `downscale` does (a 2 x 2 mean per output pixel).
            x = F.interpolate(x, scale_factor=0.5, mode="bilinear")
        styles, stages = self.encode(x)
        return styles + self.latent_avg, self.content_layer(stages[2])


class FeatureStyleEmbedding(nn.Module):
    """Embedding.py's FS step as one module: image [N, 3, 1024, 1024] in [-1, 1] -> (S [N, 18, 512],
    F [N, 512, 32, 32]), F being the generator's block 3 run on the encoder's content map with S."""

    def __init__(self, encoder: FeatureStyleEncoder, generator: StyleGAN2Generator):
        super().__init__()
        self.encoder = encoder
        self.generator = generator

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        w_plus, content = self.encoder(image)
        return w_plus, self.generator.features(w_plus, F_BLOCK, layer_in=content, start_block=F_BLOCK)


def load_feature_style_encoder(
    encoder_path: Path, psp_path: Path, encoder: FeatureStyleEncoder | None = None
) -> FeatureStyleEncoder:
    """Strictly load `FeatureStyleEncoder/143_enc.pth` (a bare state dict) into `encoder` (default: the
    public configuration) and its average latent from `FeatureStyleEncoder/psp_ffhq_encode.pt`
    (`latent_avg`). Raises CheckpointError naming missing, unexpected and mis-shaped keys."""
    encoder = encoder if encoder is not None else FeatureStyleEncoder()
    state_dict = state_dict_of(read_checkpoint(encoder_path), str(encoder_path))
    load_strict(encoder, state_dict, f"FS encoder checkpoint {encoder_path}")
    psp = read_checkpoint(psp_path)
    latent_avg = psp.get("latent_avg") if isinstance(psp, dict) else None
    if not torch.is_tensor(latent_avg):
        raise CheckpointError(f"{psp_path}: no 'latent_avg' tensor (expected the pSp checkpoint)")
    try:
        encoder.set_latent_avg(latent_avg)
    except ValueError as exc:
        raise CheckpointError(f"{psp_path}: {exc}") from exc
    return encoder.eval()
