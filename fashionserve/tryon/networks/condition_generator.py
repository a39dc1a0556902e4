"""HR-VITON condition generator ("tocg"), with module names matching the public checkpoint.

It predicts a garment flow pyramid from a cloth and a person representation, warps the cloth with the
finest flow and predicts the 13-class try-on segmentation. Only the test-time configuration of the
official code is implemented: BatchNorm2d, 'T1' warp feature, 'relu' output layer, bilinear upsampling.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_LEVELS = 5  # encoder stages; the coarsest feature map is (height / 32) x (width / 32)


class ResBlock(nn.Module):
    """`scale` changes resolution/width, then output = ReLU(r + block(r)) with r = scale(x)."""

    def __init__(self, in_channels: int, out_channels: int, scale: Literal["down", "up", "same"]):
        super().__init__()
        if scale == "down":
            # No bias: every conv here is followed by BatchNorm in the official (BatchNorm2d) build.
            self.scale = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        elif scale == "up":
            self.scale = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear"),
                nn.Conv2d(in_channels, out_channels, kernel_size=1),
            )
        elif scale == "same":
            self.scale = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            raise ValueError(f"ResBlock scale must be 'down', 'up' or 'same', got {scale!r}")
        self.block = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        residual = self.scale(x)
        return F.relu(residual + self.block(residual))


def identity_grid(height: int, width: int) -> Tensor:
    """1 x H x W x 2 float32 sampling grid with (x, y) in [-1, 1] built with linspace like the
    official make_grid (corner-aligned), although grid_sample is then called with align_corners=False."""
    grid_x = (
        torch.linspace(-1.0, 1.0, width, dtype=torch.float32).view(1, 1, width, 1).expand(1, height, width, 1)
    )
    grid_y = (
        torch.linspace(-1.0, 1.0, height, dtype=torch.float32)
        .view(1, height, 1, 1)
        .expand(1, height, width, 1)
    )
    return torch.cat([grid_x, grid_y], dim=3)


def flow_divisors(height: int, width: int) -> tuple[float, float]:
    """Pixel-to-grid divisors (x, y) of a flow warping an H x W map, as the official code computes them
    ((size / 2 - 1) / 2; e.g. 47.5 and 63.5 at 256 x 192)."""
    return (width / 2 - 1.0) / 2.0, (height / 2 - 1.0) / 2.0


def warp_with_flow(features: Tensor, flow: Tensor, grid: Tensor, divisors: tuple[float, float]) -> Tensor:
    """Sample `features` at grid + flow (flow NHWC in pixels of the flow grid)."""
    flow_norm = torch.cat([flow[..., 0:1] / divisors[0], flow[..., 1:2] / divisors[1]], dim=3)
    return F.grid_sample(
        features, flow_norm + grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def _upsample_flow(flow: Tensor) -> Tensor:
    """2x bilinear upsampling of an NHWC flow; values are not rescaled (as in the official code)."""
    return F.interpolate(flow.permute(0, 3, 1, 2), scale_factor=2, mode="bilinear").permute(0, 2, 3, 1)


class ConditionGenerator(nn.Module):
    """HR-VITON condition generator ("tocg"): predicts segmentation and garment flow."""

    def __init__(
        self,
        cloth_channels: int = 4,
        pose_channels: int = 16,
        segmentation_channels: int = 13,
        ngf: int = 96,
        height: int = 256,
        width: int = 192,
    ):
        super().__init__()
        factor = 2**NUM_LEVELS
        if height % factor or width % factor:
            raise ValueError(
                f"ConditionGenerator height and width must be divisible by {factor}, got {height}x{width}"
            )
        self.height, self.width = height, width
        widths = [ngf, ngf * 2, ngf * 4, ngf * 4, ngf * 4]  # encoder output channels per level

        def encoder(in_channels: int) -> nn.Sequential:
            ins = [in_channels, *widths[:-1]]
            return nn.Sequential(*(ResBlock(i, o, "down") for i, o in zip(ins, widths, strict=True)))

        self.ClothEncoder = encoder(cloth_channels)
        self.PoseEncoder = encoder(pose_channels)
        self.conv = ResBlock(ngf * 4, ngf * 8, "same")
        # Decoder stage i > 0 reads cat(x, pose feature, warped cloth feature T1 [ngf * 4 channels]).
        self.SegDecoder = nn.Sequential(
            ResBlock(ngf * 8, ngf * 4, "up"),
            ResBlock(ngf * 4 * 2 + ngf * 4, ngf * 4, "up"),
            ResBlock(ngf * 4 * 2 + ngf * 4, ngf * 2, "up"),
            ResBlock(ngf * 2 * 2 + ngf * 4, ngf, "up"),
            ResBlock(ngf * 2 + ngf * 4, ngf, "up"),
        )
        self.out_layer = ResBlock(ngf + cloth_channels + pose_channels, segmentation_channels, "same")
        # 1x1 lateral convs for the cloth (conv1) and person (conv2) pyramids, finest level first.
        # conv2's result never reaches an output in the official forward; it is kept for strict loading.
        self.conv1 = nn.Sequential(*(nn.Conv2d(w, ngf * 4, kernel_size=1) for w in widths[:4]))
        self.conv2 = nn.Sequential(*(nn.Conv2d(w, ngf * 4, kernel_size=1) for w in widths[:4]))
        self.flow_conv = nn.ModuleList(
            nn.Conv2d(ngf * 8, 2, kernel_size=3, padding=1) for _ in range(NUM_LEVELS)
        )
        # bottleneck[k] maps the decoder output of level k (channels ngf*4, ngf*4, ngf*2, ngf) to ngf * 4.
        self.bottleneck = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(c, ngf * 4, kernel_size=3, padding=1), nn.ReLU())
                for c in (ngf * 4, ngf * 4, ngf * 2, ngf)
            )
        )
        # Warp grids and divisors for the decoder levels 1..4 and the final full-size warp. Grids are
        # float32 constants (not computed from traced sizes) so the exported graph has no float64 grid.
        sizes = [
            (height // 2 ** (NUM_LEVELS - i), width // 2 ** (NUM_LEVELS - i)) for i in range(1, NUM_LEVELS)
        ]
        sizes.append((height, width))
        self._divisors = [flow_divisors(h, w) for h, w in sizes]
        for index, (h, w) in enumerate(sizes):
            self.register_buffer(f"grid_{index}", identity_grid(h, w), persistent=False)

    def _grid(self, index: int) -> Tensor:
        return getattr(self, f"grid_{index}")

    def forward(self, cloth_input: Tensor, pose_input: Tensor) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """Returns (flow_list, segmentation, warped_cloth, warped_cloth_mask) exactly like the official
        forward: flow_list = 5 NHWC flows (last one at height/2 x width/2), segmentation
        N x 13 x H x W (ReLU'd), warped cloth N x 3 x H x W, warped cloth mask N x 1 x H x W."""
        expected = (self.height, self.width)
        for name, tensor in (("cloth_input", cloth_input), ("pose_input", pose_input)):
            if tuple(tensor.shape[-2:]) != expected:
                raise ValueError(f"{name} must be {expected[0]}x{expected[1]}, got {tuple(tensor.shape)}")

        cloth_features, pose_features = [], []
        cloth, pose = cloth_input, pose_input
        for level in range(NUM_LEVELS):
            cloth = self.ClothEncoder[level](cloth)
            pose = self.PoseEncoder[level](pose)
            cloth_features.append(cloth)
            pose_features.append(pose)

        # Coarsest level: initial flow from both pyramids' top features.
        t1 = cloth_features[-1]
        flow = self.flow_conv[0](torch.cat([t1, pose_features[-1]], dim=1)).permute(0, 2, 3, 1)
        flows = [flow]
        x = self.SegDecoder[0](self.conv(pose_features[-1]))

        for i in range(1, NUM_LEVELS):
            k = NUM_LEVELS - 1 - i  # encoder level with the current resolution
            t1 = F.interpolate(t1, scale_factor=2, mode="bilinear") + self.conv1[k](cloth_features[k])
            flow = _upsample_flow(flow)
            warped_t1 = warp_with_flow(t1, flow, self._grid(i - 1), self._divisors[i - 1])
            residual = self.flow_conv[i](torch.cat([warped_t1, self.bottleneck[i - 1](x)], dim=1))
            flow = flow + residual.permute(0, 2, 3, 1)
            flows.append(flow)
            x = self.SegDecoder[i](torch.cat([x, pose_features[k], warped_t1], dim=1))

        warped_input = warp_with_flow(
            cloth_input, _upsample_flow(flow), self._grid(NUM_LEVELS - 1), self._divisors[-1]
        )
        segmentation = self.out_layer(torch.cat([x, pose_input, warped_input], dim=1))
        return flows, segmentation, warped_input[:, :-1], warped_input[:, -1:]
