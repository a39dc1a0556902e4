"""The try-on pipeline as PyTorch modules, one per Triton model.

Everything the official HR-VITON test script does between the raw inputs and the saved image lives
here, in the official order and with its constants, so that each stage exports to one ONNX file:

    tryon_preprocess -> tryon_condition_generator -> tryon_warp -> tryon_image_generator -> tryon_postprocess

All interpolations and grid samples use PyTorch's defaults (align_corners=False) like the official code.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.tryon.labels import NUM_CIHP_LABELS, OCCLUDER_13, PARSE_7, PARSE_13, merge_matrix
from fashionserve.tryon.networks.condition_generator import (
    ConditionGenerator,
    flow_divisors,
    identity_grid,
    warp_with_flow,
)
from fashionserve.tryon.networks.image_generator import ImageGenerator

# Upsampling layers the SPADE generator needs so that height/2**n and width/2**n are integers.
_UPSAMPLING_LAYERS = {7: "most", 6: "more", 5: "normal"}

BLUR_KERNEL_SIZE = 15
BLUR_SIGMA = 3.0


@dataclass(frozen=True)
class TryonConfig:
    """Architecture and resolution of a try-on pipeline. Defaults are the public configuration."""

    height: int = 1024
    width: int = 768
    condition_height: int = 256
    condition_width: int = 192
    condition_ngf: int = 96
    image_ngf: int = 64
    spade_hidden: int = 128
    occlusion: bool = True
    noise: bool = False

    def __post_init__(self) -> None:
        self.num_upsampling_layers  # noqa: B018 - raises for a resolution the generator cannot produce
        if self.condition_height % 32 or self.condition_width % 32:
            raise ValueError(
                f"condition resolution {self.condition_height}x{self.condition_width} must be divisible by 32"
            )

    @property
    def num_upsampling_layers(self) -> str:
        """The largest SPADE upsampling count ('most' = 7) that divides the resolution."""
        for layers, name in _UPSAMPLING_LAYERS.items():
            if self.height % 2**layers == 0 and self.width % 2**layers == 0:
                return name
        raise ValueError(f"resolution {self.height}x{self.width} must be divisible by 32 in both sides")

    def to_dict(self) -> dict:
        return {**asdict(self), "num_upsampling_layers": self.num_upsampling_layers}


def parse_resolution(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768), as height x width."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"resolution must look like HEIGHTxWIDTH (e.g. 1024x768), got {text!r}") from None
    return height, width


def _gaussian_taps(size: int, sigma: float) -> Tensor:
    """Sum-normalised 1-D gaussian over offsets -size//2..size//2 (torchgeometry's GaussianBlur kernel)."""
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (taps / taps.sum()).float()


def _to_unit_range(image: Tensor) -> Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    return (image.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


class TryonPreprocess(nn.Module):
    """uint8 client tensors -> normalized full-resolution tensors and the condition generator's inputs."""

    def __init__(self, config: TryonConfig):
        super().__init__()
        self.condition_size = (config.condition_height, config.condition_width)
        self.register_buffer(
            "cihp_labels", torch.arange(NUM_CIHP_LABELS, dtype=torch.uint8).view(1, -1, 1, 1)
        )
        # 20 CIHP labels -> 13 parse channels, as a 1x1 convolution weight.
        merge = torch.tensor(merge_matrix(PARSE_13, NUM_CIHP_LABELS))
        self.register_buffer("merge_20_to_13", merge.view(len(PARSE_13), NUM_CIHP_LABELS, 1, 1))

    def forward(
        self, cloth: Tensor, cloth_mask: Tensor, agnostic: Tensor, densepose: Tensor, parse_agnostic: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        cloth_full = _to_unit_range(cloth)
        cloth_mask_full = (cloth_mask >= 128).float().unsqueeze(1)
        agnostic_full = _to_unit_range(agnostic)
        densepose_full = _to_unit_range(densepose)
        onehot_20 = (parse_agnostic.unsqueeze(1) == self.cihp_labels).float()
        parse_agnostic_13 = F.conv2d(onehot_20, self.merge_20_to_13)

        cloth_down = F.interpolate(cloth_full, size=self.condition_size, mode="bilinear")
        cloth_mask_down = F.interpolate(cloth_mask_full, size=self.condition_size, mode="nearest")
        parse_down = F.interpolate(parse_agnostic_13, size=self.condition_size, mode="nearest")
        densepose_down = F.interpolate(densepose_full, size=self.condition_size, mode="bilinear")
        cloth_input = torch.cat([cloth_down, cloth_mask_down], dim=1)
        pose_input = torch.cat([parse_down, densepose_down], dim=1)
        return cloth_full, cloth_mask_full, agnostic_full, densepose_full, cloth_input, pose_input


class TryonConditionGenerator(nn.Module):
    """The condition generator, returning only what the pipeline uses."""

    def __init__(self, network: ConditionGenerator):
        super().__init__()
        self.network = network

    def forward(self, cloth_input: Tensor, pose_input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        flows, segmentation, _warped_cloth, warped_cloth_mask = self.network(cloth_input, pose_input)
        return flows[-1], segmentation, warped_cloth_mask


class TryonWarp(nn.Module):
    """Segmentation composition, blur, label merge, full-resolution warp and occlusion handling."""

    def __init__(self, config: TryonConfig):
        super().__init__()
        self.size = (config.height, config.width)
        self.occlusion = config.occlusion
        # The flow is in pixels of the condition generator's finest flow grid (half its input size);
        # the official full-resolution warp divides it by the same constants (47.5, 63.5 at 256x192).
        self.flow_divisors = flow_divisors(config.condition_height, config.condition_width)
        self.register_buffer("grid", identity_grid(config.height, config.width))
        taps = _gaussian_taps(BLUR_KERNEL_SIZE, BLUR_SIGMA)
        channels = len(PARSE_13)
        self.register_buffer("blur_vertical", taps.view(1, 1, -1, 1).repeat(channels, 1, 1, 1))
        self.register_buffer("blur_horizontal", taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1))
        # Only the cloth channel (3) of the segmentation is multiplied by the warped cloth mask.
        self.register_buffer("cloth_channel", F.one_hot(torch.tensor(3), channels).float().view(1, -1, 1, 1))
        self.register_buffer("labels_13", torch.arange(channels).view(1, -1, 1, 1))
        merge = torch.tensor(merge_matrix(PARSE_7, channels))
        self.register_buffer("merge_13_to_7", merge.view(len(PARSE_7), channels, 1, 1))
        occluders = torch.tensor([1.0 if c in OCCLUDER_13 else 0.0 for c in range(channels)])
        self.register_buffer("occluders", occluders.view(1, channels, 1, 1))

    def blur(self, x: Tensor) -> Tensor:
        """15x15 sigma-3 gaussian, zero padded, as two depthwise passes (same result as the 2-D kernel)."""
        channels = x.shape[1]
        pad = BLUR_KERNEL_SIZE // 2
        x = F.conv2d(x, self.blur_vertical, padding=(pad, 0), groups=channels)
        return F.conv2d(x, self.blur_horizontal, padding=(0, pad), groups=channels)

    def forward(
        self, flow: Tensor, segmentation: Tensor, warped_cloth_mask: Tensor, cloth: Tensor, cloth_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        # 'warp_grad' composition: cloth channel times the condition generator's soft warped mask.
        composition = 1.0 + self.cloth_channel * (warped_cloth_mask - 1.0)
        segmentation = segmentation * composition
        segmentation = self.blur(F.interpolate(segmentation, size=self.size, mode="bilinear"))
        labels = segmentation.argmax(dim=1, keepdim=True)
        onehot_13 = (labels == self.labels_13).float()
        parse = F.conv2d(onehot_13, self.merge_13_to_7)

        flow = F.interpolate(flow.permute(0, 3, 1, 2), size=self.size, mode="bilinear").permute(0, 2, 3, 1)
        warped = warp_with_flow(torch.cat([cloth, cloth_mask], dim=1), flow, self.grid, self.flow_divisors)
        warped_cloth, warped_mask = warped[:, :3], warped[:, 3:]
        if self.occlusion:
            probabilities = torch.softmax(segmentation, dim=1)
            occluded = (probabilities * self.occluders).sum(dim=1, keepdim=True)
            warped_mask = warped_mask - occluded * warped_mask
            warped_cloth = warped_cloth * warped_mask + (1.0 - warped_mask)
        return parse, warped_cloth


class TryonImageGenerator(nn.Module):
    """The SPADE image generator fed with cat(agnostic, densepose, warped cloth) and the 7-channel parse."""

    def __init__(self, network: ImageGenerator):
        super().__init__()
        self.network = network

    def forward(self, agnostic: Tensor, densepose: Tensor, warped_cloth: Tensor, parse: Tensor) -> Tensor:
        return self.network(torch.cat([agnostic, densepose, warped_cloth], dim=1), parse)


class TryonPostprocess(nn.Module):
    """[-1, 1] N x 3 x H x W -> uint8 N x H x W x 3, truncating like the official save."""

    def forward(self, image: Tensor) -> Tensor:
        pixels = ((image + 1.0) * 0.5 * 255.0).clamp(0.0, 255.0).floor()
        return pixels.permute(0, 2, 3, 1).to(torch.uint8)


def build_networks(config: TryonConfig) -> tuple[ConditionGenerator, ImageGenerator]:
    """Condition and image generator for `config` (freshly initialised)."""
    condition = ConditionGenerator(
        ngf=config.condition_ngf, height=config.condition_height, width=config.condition_width
    )
    image = ImageGenerator(
        ngf=config.image_ngf,
        height=config.height,
        width=config.width,
        num_upsampling_layers=config.num_upsampling_layers,
        spade_hidden=config.spade_hidden,
        noise=config.noise,
    )
    return condition, image


class TryonPipeline(nn.Module):
    """The reference pipeline: the five stages chained in PyTorch, uint8 in, uint8 out."""

    def __init__(self, config: TryonConfig, condition: ConditionGenerator, image: ImageGenerator):
        super().__init__()
        self.stages = nn.ModuleDict(
            {
                "tryon_preprocess": TryonPreprocess(config),
                "tryon_condition_generator": TryonConditionGenerator(condition),
                "tryon_warp": TryonWarp(config),
                "tryon_image_generator": TryonImageGenerator(image),
                "tryon_postprocess": TryonPostprocess(),
            }
        )

    def forward(
        self, cloth: Tensor, cloth_mask: Tensor, agnostic: Tensor, densepose: Tensor, parse_agnostic: Tensor
    ) -> Tensor:
        s = self.stages
        cloth_full, mask_full, agnostic_full, densepose_full, cloth_input, pose_input = s["tryon_preprocess"](
            cloth, cloth_mask, agnostic, densepose, parse_agnostic
        )
        flow, segmentation, warped_mask = s["tryon_condition_generator"](cloth_input, pose_input)
        parse, warped_cloth = s["tryon_warp"](flow, segmentation, warped_mask, cloth_full, mask_full)
        image = s["tryon_image_generator"](agnostic_full, densepose_full, warped_cloth, parse)
        return s["tryon_postprocess"](image)
