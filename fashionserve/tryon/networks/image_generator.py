"""HR-VITON SPADE image generator ("gen"), with module names matching the public checkpoint.

Test-time configuration of the official code: spectral-normed residual convs (old
`torch.nn.utils.spectral_norm` API, so checkpoints hold weight_orig / weight_u / weight_v) and SPADE
normalisation built on a parameter-free InstanceNorm.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import spectral_norm

from fashionserve.onnx_export import converge_spectral_norms, fold_spectral_norms

UPSAMPLING_LAYERS = {"normal": 5, "more": 6, "most": 7}
FEATURE_CHANNELS = 16  # width of the per-resolution input features conv_1..conv_7


class SPADENorm(nn.Module):
    """InstanceNorm(x [+ noise]) * (1 + gamma(seg)) + beta(seg)."""

    def __init__(self, channels: int, label_channels: int, hidden: int, noise: bool):
        super().__init__()
        self.noise = noise
        # Exists whether or not noise is used, so checkpoints load strictly either way.
        self.noise_scale = nn.Parameter(torch.zeros(channels))
        self.conv_shared = nn.Sequential(
            nn.Conv2d(label_channels, hidden, kernel_size=3, padding=1), nn.ReLU()
        )
        self.conv_gamma = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)
        self.conv_beta = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, seg: Tensor) -> Tensor:
        if self.noise:
            # Same draw order as the official randn(b, w, h, 1): one value per pixel, scaled per channel.
            b, _, h, w = x.shape
            field = torch.randn(b, w, h, 1, dtype=x.dtype, device=x.device).permute(0, 3, 2, 1)
            x = x + field * self.noise_scale.view(1, -1, 1, 1)
        normalized = F.instance_norm(x, eps=1e-5)
        actv = self.conv_shared(seg)
        return normalized * (1 + self.conv_gamma(actv)) + self.conv_beta(actv)


class SPADEResBlock(nn.Module):
    """Residual block with SPADE norms and spectral-normed convs; learned 1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, label_channels: int, hidden: int, noise: bool):
        super().__init__()
        self.learned_shortcut = in_channels != out_channels
        middle = min(in_channels, out_channels)
        self.conv_0 = spectral_norm(nn.Conv2d(in_channels, middle, kernel_size=3, padding=1))
        self.conv_1 = spectral_norm(nn.Conv2d(middle, out_channels, kernel_size=3, padding=1))
        if self.learned_shortcut:
            self.conv_s = spectral_norm(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False))
        self.norm_0 = SPADENorm(in_channels, label_channels, hidden, noise)
        self.norm_1 = SPADENorm(middle, label_channels, hidden, noise)
        if self.learned_shortcut:
            self.norm_s = SPADENorm(in_channels, label_channels, hidden, noise)

    def forward(self, x: Tensor, seg: Tensor) -> Tensor:
        seg = F.interpolate(seg, size=x.shape[2:], mode="nearest")
        # Shortcut first: with noise on, this keeps the official order of random draws.
        shortcut = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return shortcut + dx


class ImageGenerator(nn.Module):
    """HR-VITON SPADE image generator ("gen")."""

    def __init__(
        self,
        input_channels: int = 9,
        label_channels: int = 7,
        ngf: int = 64,
        height: int = 1024,
        width: int = 768,
        num_upsampling_layers: str = "most",
        spade_hidden: int = 128,
        noise: bool = False,
    ):
        super().__init__()
        if num_upsampling_layers not in UPSAMPLING_LAYERS:
            raise ValueError(
                f"num_upsampling_layers must be one of {sorted(UPSAMPLING_LAYERS)}, "
                f"got {num_upsampling_layers!r}"
            )
        factor = 2 ** UPSAMPLING_LAYERS[num_upsampling_layers]
        if height % factor or width % factor:
            raise ValueError(
                f"ImageGenerator with num_upsampling_layers={num_upsampling_layers!r} needs height and width "
                f"divisible by {factor}, got {height}x{width}"
            )
        self.height, self.width = height, width  # output size

        self.conv_0 = nn.Conv2d(input_channels, ngf * 16, kernel_size=3, padding=1)
        for i in range(1, 8):  # conv_7 exists in every mode (the official build always creates it)
            self.add_module(
                f"conv_{i}", nn.Conv2d(input_channels, FEATURE_CHANNELS, kernel_size=3, padding=1)
            )

        def block(in_channels: int, out_channels: int) -> SPADEResBlock:
            return SPADEResBlock(in_channels, out_channels, label_channels, spade_hidden, noise)

        extra = FEATURE_CHANNELS  # every block after the head also reads the input features at its size
        self.head_0 = block(ngf * 16, ngf * 16)
        self.G_middle_0 = block(ngf * 16 + extra, ngf * 16)
        self.G_middle_1 = block(ngf * 16 + extra, ngf * 16)
        self.up_0 = block(ngf * 16 + extra, ngf * 8)
        self.up_1 = block(ngf * 8 + extra, ngf * 4)
        self.up_2 = block(ngf * 4 + extra, ngf * 2)
        self.up_3 = block(ngf * 2 + extra, ngf)
        names = ["head_0", "G_middle_0", "G_middle_1", "up_0", "up_1", "up_2", "up_3"]
        out_channels = ngf
        if num_upsampling_layers == "most":
            self.up_4 = block(ngf + extra, ngf // 2)
            names.append("up_4")
            out_channels = ngf // 2
        self.conv_img = nn.Conv2d(out_channels, 3, kernel_size=3, padding=1)

        # The latent size doubles before every block except G_middle_1 in 'normal' mode. Block k reads
        # conv_k of the input resized to its own resolution; for 'more'/'most' this is exactly the
        # official latent * 2**k sampling. (The official 'normal' path fails on a size mismatch at
        # G_middle_1; here it uses features at the block's actual size instead.)
        self._blocks = names
        self._upsample_before = [
            k > 0 and not (k == 2 and num_upsampling_layers == "normal") for k in range(len(names))
        ]
        size = (height // factor, width // factor)
        self._block_sizes: list[tuple[int, int]] = []
        for upsample in self._upsample_before:
            size = (size[0] * 2, size[1] * 2) if upsample else size
            self._block_sizes.append(size)
        converge_spectral_norms(self)

    def fold_spectral_norm(self) -> None:
        """Plain eval-mode convolutions instead of the spectral-normed ones (in place, idempotent)."""
        fold_spectral_norms(self)

    def forward(self, x: Tensor, segmentation: Tensor) -> Tensor:
        """x: N x input_channels x H' x W', segmentation: N x label_channels x H' x W' (any size; both are
        resized with nearest). Returns N x 3 x height x width in [-1, 1] (tanh)."""
        out = self.head_0(
            self.conv_0(F.interpolate(x, size=self._block_sizes[0], mode="nearest")), segmentation
        )
        for k in range(1, len(self._blocks)):
            if self._upsample_before[k]:
                out = F.interpolate(out, scale_factor=2, mode="nearest")
            features = getattr(self, f"conv_{k}")(F.interpolate(x, size=self._block_sizes[k], mode="nearest"))
            out = getattr(self, self._blocks[k])(torch.cat([out, features], dim=1), segmentation)
        return torch.tanh(self.conv_img(F.leaky_relu(out, 0.2)))
