"""encoder4editing (e4e) image encoder into StyleGAN2's W+ space, module names matching `e4e_ffhq_encode.pt`.

Follows omertov/encoder4editing `Encoder4Editing` at inference (all progressive stages on): an IR-SE-50
body, three feature maps tapped from it (c1 at 1/4, c2 at 1/8, c3 at 1/16 of the input), an FPN merge
(bilinear, align_corners=True), one `GradualStyleBlock` per W+ entry: entry 0 is the base code w0, every
other entry i is w0 + delta_i; 0-2 read c3, 3-6 the c3+c2 merge, 7+ the c3+c2+c1 merge. The output adds
the average latent as e4e's pSp wrapper does (`start_from_latent_avg`).
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.checkpoints import CheckpointError, load_strict, read_checkpoint, state_dict_of
from fashionserve.hair.networks.stylegan2 import EqualLinear, StyleGAN2Generator

IR_SE_UNITS = {50: (3, 4, 14, 3)}  # bottleneck units per body stage; e4e taps stage ends 2, 3, 4
STAGE_WIDTHS = (1, 2, 4, 8)  # body stage depths in units of base_width (64 public: 64 ... 512)
SE_REDUCTION = 16
COARSE_STYLES, MIDDLE_STYLES = 3, 7  # W+ entries below 3 read c3, below 7 the middle merge


class SEModule(nn.Module):
    """Squeeze-and-excitation: channel gates from global average pooling, two bias-free 1x1 convs."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class BottleneckIRSE(nn.Module):
    """ArcFace IR-SE unit: BN, 3x3 conv, PReLU, 3x3 conv (carries the stride), BN, SE; plus a shortcut
    that subsamples (MaxPool2d(1, stride)) or projects (1x1 conv + BN) when the depth changes."""

    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, SE_REDUCTION),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class GradualStyleBlock(nn.Module):
    """Stride-2 3x3 convs with leaky ReLU 0.01 down to 1x1, then an equalized linear layer."""

    def __init__(self, in_channels: int, out_channels: int, spatial: int):
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(int(math.log2(spatial))):
            layers += [
                nn.Conv2d(in_channels if index == 0 else out_channels, out_channels, 3, 2, 1),
                nn.LeakyReLU(),
            ]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.convs(x).flatten(1))


def upsample_add(x: Tensor, lateral: Tensor) -> Tensor:
    """FPN merge: x resized bilinearly (align_corners=True, as e4e) to the lateral map, plus it."""
    return F.interpolate(x, size=lateral.shape[2:], mode="bilinear", align_corners=True) + lateral


class Encoder4Editing(nn.Module):
    """e4e `Encoder4Editing` (mode ir_se); `state_dict` equals the `encoder.*` entries of the public
    checkpoint without the prefix. The average latent is the non-persistent buffer `latent_avg`
    [n_latent, style_dim]: it is not part of that state dict; `load_e4e_checkpoint` fills it from the
    checkpoint's own `latent_avg` entry, random-init leaves it zero (or use `set_latent_avg`, e.g. with
    `StyleGAN2Generator.mean_latent()`).

    Test knobs: `base_width` (64 public) scales the body, `stage_units` overrides the IR-SE-50 unit counts,
    `input_size` (256 public, a power of two) sets the tapped map sizes. `style_dim` must equal the
    body's last depth (8 * base_width) as in e4e, where both are 512.
    """

    def __init__(
        self,
        size: int = 1024,
        style_dim: int = 512,
        num_layers: int = 50,
        input_size: int = 256,
        base_width: int = 64,
        stage_units: tuple[int, int, int, int] | None = None,
    ):
        super().__init__()
        if num_layers not in IR_SE_UNITS:
            # e4e taps fixed body indices (6, 20, 23) that are stage ends only for IR-SE-50.
            raise ValueError(f"num_layers must be one of {sorted(IR_SE_UNITS)}, got {num_layers}")
        if base_width % SE_REDUCTION != 0:
            raise ValueError(
                f"base_width must be a multiple of {SE_REDUCTION} (SE reduction), got {base_width}"
            )
        if input_size < 32 or input_size & (input_size - 1):
            # Style blocks halve input / 16 (or / 8, / 4) down to exactly 1x1.
            raise ValueError(f"input_size must be a power of two of at least 32, got {input_size}")
        widths = [base_width * factor for factor in STAGE_WIDTHS]
        if style_dim != widths[-1]:
            raise ValueError(f"style_dim must equal 8 * base_width = {widths[-1]}, got {style_dim}")
        units = stage_units or IR_SE_UNITS[num_layers]
        self.input_size = input_size
        self.n_latent = 2 * int(math.log2(size)) - 2
        self.style_dim = style_dim

        self.input_layer = nn.Sequential(
            nn.Conv2d(3, base_width, 3, 1, 1, bias=False), nn.BatchNorm2d(base_width), nn.PReLU(base_width)
        )
        body: list[nn.Module] = []
        in_channels = base_width
        for depth, count in zip(widths, units, strict=True):
            for unit in range(count):
                body.append(BottleneckIRSE(in_channels, depth, stride=2 if unit == 0 else 1))
                in_channels = depth
        self.body = nn.Sequential(*body)
        ends = [sum(units[: stage + 1]) - 1 for stage in range(4)]
        self.taps = (ends[1], ends[2], ends[3])  # c1, c2, c3; (6, 20, 23) for IR-SE-50

        self.styles = nn.ModuleList()
        for index in range(self.n_latent):
            # Feature map sizes: c3 is input/16, the middle merge input/8, the fine merge input/4.
            spatial = input_size // (16 if index < COARSE_STYLES else 8 if index < MIDDLE_STYLES else 4)
            self.styles.append(GradualStyleBlock(widths[3], style_dim, spatial))
        self.latlayer1 = nn.Conv2d(widths[2], widths[3], kernel_size=1)
        self.latlayer2 = nn.Conv2d(widths[1], widths[3], kernel_size=1)
        self.register_buffer("latent_avg", torch.zeros(self.n_latent, style_dim), persistent=False)

    def set_latent_avg(self, latent_avg: Tensor) -> None:
        """Set the average latent from [style_dim], [1, style_dim] or [n_latent, style_dim] (e4e stores
        the last: the generator's mean W repeated per entry)."""
        latent_avg = latent_avg.detach().float()
        if latent_avg.dim() == 1:
            latent_avg = latent_avg.unsqueeze(0)
        if latent_avg.dim() != 2 or latent_avg.shape[0] not in (1, self.n_latent):
            raise ValueError(
                f"latent_avg must be [{self.style_dim}], [1, {self.style_dim}] or "
                f"[{self.n_latent}, {self.style_dim}], got {list(latent_avg.shape)}"
            )
        if latent_avg.shape[1] != self.style_dim:
            raise ValueError(f"latent_avg has {latent_avg.shape[1]} channels, expected {self.style_dim}")
        self.latent_avg.copy_(latent_avg.expand(self.n_latent, -1))

    def forward(self, x: Tensor) -> Tensor:
        """x [N, 3, input_size, input_size] in [-1, 1] -> W+ [N, n_latent, style_dim] (average included)."""
        x = self.input_layer(x)
        features = []
        for index, unit in enumerate(self.body):
            x = unit(x)
            if index in self.taps:
                features.append(x)
        c1, c2, c3 = features
        middle = upsample_add(c3, self.latlayer1(c2))
        fine = upsample_add(middle, self.latlayer2(c1))
        base = self.styles[0](c3)
        codes = [base]
        for index in range(1, self.n_latent):
            source = c3 if index < COARSE_STYLES else middle if index < MIDDLE_STYLES else fine
            codes.append(base + self.styles[index](source))
        return torch.stack(codes, dim=1) + self.latent_avg


def load_e4e_checkpoint(
    path: Path, encoder: Encoder4Editing | None = None, generator: StyleGAN2Generator | None = None
) -> tuple[Encoder4Editing, StyleGAN2Generator]:
    """Strictly load an e4e checkpoint (`state_dict` with `encoder.*` and `decoder.*` entries, `latent_avg`,
    `opts`) into `encoder` and `generator` (default: the public FFHQ configurations, 1024 px). Raises
    CheckpointError naming missing, unexpected or mis-shaped keys, or a missing/mis-shaped latent_avg."""
    encoder = encoder if encoder is not None else Encoder4Editing()
    generator = generator if generator is not None else StyleGAN2Generator()
    loaded = read_checkpoint(path)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not an e4e checkpoint (no 'state_dict' dict)")
    state_dict = state_dict_of(loaded["state_dict"], f"{path} (state_dict)")
    parts: dict[str, dict[str, Tensor]] = {"encoder": {}, "decoder": {}}
    strays = []
    for key, value in state_dict.items():
        prefix, _, rest = key.partition(".")
        if prefix in parts:
            parts[prefix][rest] = value
        else:
            strays.append(key)
    if strays:
        raise CheckpointError(
            f"{path}: state_dict entries outside encoder.* and decoder.*: {', '.join(strays[:5])}"
        )
    load_strict(encoder, parts["encoder"], f"e4e checkpoint {path} (encoder.*)")
    load_strict(generator, parts["decoder"], f"e4e checkpoint {path} (decoder.*)")
    latent_avg = loaded.get("latent_avg")
    if not torch.is_tensor(latent_avg):
        raise CheckpointError(f"{path}: e4e checkpoint without a 'latent_avg' tensor")
    try:
        encoder.set_latent_avg(latent_avg)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return encoder.eval(), generator.eval()
