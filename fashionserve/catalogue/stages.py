"""The catalogue pipelines' serving modules around the networks: the garment preprocessing that turns a
product photo of any size into a Fashion-MNIST-like 28x28 image, the classifier's served outputs, and the
generator's postprocessing.

Fashion-MNIST was made from product photos by (its README): trimming the edges close to the corner
colour (within 5% of the largest RGB distance), resizing the longest edge to 28 by subsampling,
extending the shorter edge to 28 with the image centred, negating, and converting to grayscale. The
preprocessing below does the same steps with static output shapes, so it exports to one ONNX graph
with dynamic height and width:
- background = per-channel median of the border pixels (robust to a garment touching a corner);
- foreground = pixels farther than 5% of the RGB diagonal from the background; its bounding box is
  the trim (the whole image when nothing stands out);
- gray levels are stretched so the background maps to 0 and the opposite extreme to 255, which is the
  negation for a white background and the identity for a Fashion-MNIST image (black background);
- the box is scaled so its longest side spans 28 pixels and placed at a whole-pixel offset in the
  centre; every output pixel averages an 8x8 grid of nearest-neighbour samples (a box filter against
  aliasing on large photos, and an exact copy when the scale is 1, as for Fashion-MNIST itself).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.catalogue.networks.classifier import IMAGE_SIZE, GarmentClassifier

SUPERSAMPLE = 8
TRIM_DISTANCE = 0.05 * 255.0 * math.sqrt(3.0)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's "L" mode


class GarmentPreprocess(nn.Module):
    """uint8 [N, H, W, 3] RGB product images -> float [N, 1, 28, 28] in 0..1, garment bright on black."""

    def forward(self, image: Tensor) -> Tensor:
        x = image.float()
        height, width = x.shape[1], x.shape[2]
        border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], dim=1)  # [N, 2H+2W, 3]
        background = border.sort(dim=1).values[:, border.shape[1] // 2]  # [N, 3] per-channel median
        distance = (x - background[:, None, None]).square().sum(-1).sqrt()
        foreground = (distance > TRIM_DISTANCE).float()  # [N, H, W]
        top, bottom = _extent(foreground.amax(2))
        left, right = _extent(foreground.amax(1))

        luma = torch.tensor(LUMA)
        gray = x @ luma  # [N, H, W]
        background_gray = background @ luma  # [N]
        bright = background_gray > 127.5
        span = torch.where(bright, background_gray, 255.0 - background_gray).clamp(min=1.0)
        offset = gray - background_gray[:, None, None]
        signed = torch.where(bright[:, None, None], -offset, offset)
        stretched = (signed / span[:, None, None]).clamp(0.0, 1.0)

        box_height, box_width = bottom - top, right - left
        step = torch.maximum(box_height, box_width) / IMAGE_SIZE  # source pixels per output pixel
        samples = (torch.arange(IMAGE_SIZE * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE
        src_y, inside_y = _sample_positions(samples, top, bottom, box_height, step)
        src_x, inside_x = _sample_positions(samples, left, right, box_width, step)
        size = samples.shape[0]
        grid = torch.stack(
            [
                (2.0 * src_x / width - 1.0)[:, None, :].expand(-1, size, -1),
                (2.0 * src_y / height - 1.0)[:, :, None].expand(-1, -1, size),
            ],
            dim=-1,
        )
        sampled = F.grid_sample(
            stretched[:, None], grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
        sampled = sampled * (inside_y[:, None, :, None] * inside_x[:, None, None, :])
        return F.avg_pool2d(sampled, SUPERSAMPLE)


def _extent(present: Tensor) -> tuple[Tensor, Tensor]:
    """[N, L] 0/1 -> (first, last + 1) of the ones as float pixel edges; (0, L) when there are none."""
    length = present.shape[1]
    first = present.argmax(1)  # the first maximum: the first one, or 0 when all are zero
    last = length - 1 - present.flip(1).argmax(1)
    return first.float(), (last + 1).float()


def _sample_positions(
    samples: Tensor, start: Tensor, end: Tensor, extent: Tensor, step: Tensor
) -> tuple[Tensor, Tensor]:
    """Source coordinates of the output samples along one axis, and whether each lies in the box."""
    offset = torch.floor((IMAGE_SIZE - extent / step) / 2.0)  # centring, in whole output pixels
    source = start[:, None] + (samples[None] - offset[:, None]) * step[:, None]
    inside = ((source >= start[:, None]) & (source < end[:, None])).float()
    return source, inside


class ClassifierServing(nn.Module):
    """The served network: class probabilities [N, 10] and the most likely label [N, 1] (int64)."""

    def __init__(self, classifier: GarmentClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, garment: Tensor) -> tuple[Tensor, Tensor]:
        probabilities = self.classifier(garment).softmax(1)
        return probabilities, probabilities.argmax(1, keepdim=True)


class PGGANPostprocess(nn.Module):
    """[-1, 1] NCHW -> uint8 HWC RGB, as the official code: x * 127.5 + 127.5, rounded, saturated. A
    grayscale generator's single channel is repeated into three, so every served image is RGB."""

    def forward(self, image: Tensor) -> Tensor:
        pixels = (image * 127.5 + 127.5).round().clamp(0.0, 255.0)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return pixels.to(torch.uint8).permute(0, 2, 3, 1)
