"""The iresnet (ArcFace "improved ResNet") body that HairFastGAN's two image encoders share.

Both the FS encoder (`fs_encoder_v2`, FeatureStyleEncoder/143_enc.pth) and the post-process face encoder
(`FeatureEncoderMult`, PostProcess/pp_model.pth) take an iresnet50's stem and four stages (module names
`conv`, `block_1`..`block_4`), pool every stage output to 3 x 3, concatenate (64 + 128 + 256 + 512 = 960
channels, x 9) and read each W+ entry with its own linear head (`styles.i`); they differ only in the
content (F) head. Read from AIRI-Institute/HairFastGAN @ 49e98019c9243d1991c19d45764fc3340a498de2
(`models/FeatureStyleEncoder/arcface/iresnet.py`, `nets/feature_style_encoder.py`, `models/Net.py`).
"""

import torch
from torch import Tensor, nn

IRESNET50_UNITS = (3, 4, 14, 3)  # basic blocks per stage
STAGE_WIDTHS = (1, 2, 4, 8)  # stage channels in units of the stem width (64 public: 64 ... 512)
POOLED_SIZE = 3  # every stage output is adaptive-average-pooled to 3 x 3 for the style heads
BN_EPS = 1e-5


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN, conv3x3, BN, PReLU, conv3x3 (carrying the stride), BN, plus the
    input (through a 1x1 conv + BN `downsample` when the stride or the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.prelu = nn.PReLU(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels, stride)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, eps=BN_EPS),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


def iresnet_stage(in_channels: int, out_channels: int, units: int) -> nn.Sequential:
    """One stage: a stride-2 block, then units - 1 stride-1 blocks."""
    blocks = [IBasicBlock(in_channels, out_channels, stride=2)]
    blocks += [IBasicBlock(out_channels, out_channels) for _ in range(units - 1)]
    return nn.Sequential(*blocks)


def adaptive_average_matrix(size: int, out_size: int) -> Tensor:
    """[out_size, size] rows averaging the windows adaptive average pooling uses: row i covers
    floor(i * size / out_size) up to ceil((i + 1) * size / out_size)."""
    matrix = torch.zeros(out_size, size)
    for row in range(out_size):
        start, end = row * size // out_size, -(-(row + 1) * size // out_size)
        matrix[row, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_average_pool(x: Tensor, out_size: int) -> Tensor:
    """adaptive_avg_pool2d(x, out_size) as two matrix products. Same result; the exporter decomposes
    non-divisible adaptive pooling (128 -> 3 at 256 px) into thousands of Gather and Add nodes, while this
    is two MatMul nodes with constant matrices (the spatial size is static)."""
    rows = adaptive_average_matrix(x.shape[-2], out_size).to(x)
    cols = adaptive_average_matrix(x.shape[-1], out_size).to(x)
    return rows @ x @ cols.t()


def content_head(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """The F head of both encoders: BN, conv3x3, BN, PReLU, conv3x3 (stride), BN."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels, eps=BN_EPS),
        conv3x3(in_channels, out_channels),
        nn.BatchNorm2d(out_channels, eps=BN_EPS),
        nn.PReLU(out_channels),
        conv3x3(out_channels, out_channels, stride),
        nn.BatchNorm2d(out_channels, eps=BN_EPS),
    )


class IResNetStyleEncoder(nn.Module):
    """Stem, four iresnet stages, `content_layer` (given by the subclass: registered between the stages and
    the heads, as in the public modules, so state_dict order matches) and one linear head per W+ entry.

    `width` (64 public) and `units` (iresnet50's (3, 4, 14, 3)) are knobs for tiny tests.
    """

    def __init__(
        self,
        content_layer: nn.Module,
        n_styles: int = 18,
        style_dim: int = 512,
        width: int = 64,
        units: tuple[int, int, int, int] = IRESNET50_UNITS,
    ):
        super().__init__()
        widths = [width * factor for factor in STAGE_WIDTHS]
        self.conv = nn.Sequential(conv3x3(3, width), nn.BatchNorm2d(width, eps=BN_EPS), nn.PReLU(width))
        self.block_1 = iresnet_stage(width, widths[0], units[0])
        self.block_2 = iresnet_stage(widths[0], widths[1], units[1])
        self.block_3 = iresnet_stage(widths[1], widths[2], units[2])
        self.block_4 = iresnet_stage(widths[2], widths[3], units[3])
        self.content_layer = content_layer
        pooled = sum(widths) * POOLED_SIZE**2  # 960 * 9 public
        self.styles = nn.ModuleList(nn.Linear(pooled, style_dim) for _ in range(n_styles))
        self.n_styles = n_styles
        self.style_dim = style_dim
        self.widths = widths

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x [N, 3, H, W] in [-1, 1] -> (styles [N, n_styles, style_dim], the four stage outputs)."""
        x = self.conv(x)
        stages = []
        for stage in (self.block_1, self.block_2, self.block_3, self.block_4):
            x = stage(x)
            stages.append(x)
        pooled = torch.cat([adaptive_average_pool(out, POOLED_SIZE) for out in stages], dim=1).flatten(1)
        styles = torch.stack([head(pooled) for head in self.styles], dim=1)
        return styles, stages
