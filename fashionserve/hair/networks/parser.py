"""BiSeNet face parser (19 CelebAMask-HQ classes), with module names matching the public checkpoint.

The layout is that of zllrunning/face-parsing.PyTorch, whose `79999_iter.pth` is the widely used
checkpoint: a ResNet-18 context path with attention refinement on the 1/16 and 1/32 features, the raw
1/8 ResNet features standing in for BiSeNet's spatial path (that repository builds no spatial path), a
feature fusion module and three output heads. Only the main head is used at inference; the two auxiliary
heads (`conv_out16`, `conv_out32`, training-time deep supervision) are kept so that the state dict, and
therefore strict loading, matches the public file.

Input: RGB in [0, 1] normalized with the ImageNet mean/std, H and W multiples of 32 (the public model
runs at 512 x 512). Output: per-pixel logits over CELEBAMASK_CLASSES at the input size.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.checkpoints import load_strict, read_state_dict

# Label order of CelebAMask-HQ as the public training script numbers its mask files (background = 0).
CELEBAMASK_CLASSES: tuple[str, ...] = (
    "background",
    "skin",
    "l_brow",
    "r_brow",
    "l_eye",
    "r_eye",
    "eye_g",  # eyeglasses
    "l_ear",
    "r_ear",
    "ear_r",  # earring
    "nose",
    "mouth",  # inner mouth between the lips
    "u_lip",
    "l_lip",
    "neck",
    "neck_l",  # necklace
    "cloth",
    "hair",
    "hat",
)
NUM_CLASSES = len(CELEBAMASK_CLASSES)
HAIR_CLASS = CELEBAMASK_CLASSES.index("hair")

# The face region kept from the user's photo when a new hairstyle is composited: skin, brows, eyes,
# eyeglasses (worn on the face; the hair generator cannot redraw them), nose, mouth and lips. Ears and
# earrings are left out because a new hairstyle decides whether they are covered; neck, necklace, cloth
# and hat are not face.
FACE_CLASSES: tuple[int, ...] = tuple(
    CELEBAMASK_CLASSES.index(name)
    for name in ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "nose", "mouth", "u_lip", "l_lip")
)

# Input normalization of the public test script (torchvision's ImageNet statistics) and its input size.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
INPUT_SIZE = 512
SIZE_MULTIPLE = 32  # the coarsest ResNet feature is 1/32 of the input


class ConvBNReLU(nn.Module):
    """Bias-free convolution, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: ReLU(shortcut(x) + BN(conv(ReLU(BN(conv(x)))))); 1x1 projection shortcut
    when the width or the stride changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if in_channels != out_channels or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels)
    )


class ResNet18(nn.Module):
    """ResNet-18 trunk without the classifier; returns the 1/8, 1/16 and 1/32 features."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 2)
        self.layer4 = _stage(256, 512, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinementModule(nn.Module):
    """feat = ConvBNReLU(x); feat * sigmoid(BN(conv1x1(global_mean(feat)))), a channel attention."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels)
        self.conv_atten = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.conv(x)
        attention = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * attention


class ContextPath(nn.Module):
    """ResNet-18 features refined top-down: the 1/32 features plus their global context, upsampled
    (nearest) and merged into the 1/16 ones, then upsampled to 1/8. Returns (raw 1/8 ResNet features,
    refined 1/8 context, refined 1/16 context)."""

    def __init__(self):
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, kernel_size=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        global_context = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))  # broadcasts like a 1x1 upsample
        feat32_sum = self.arm32(feat32) + global_context
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, size=feat16.shape[2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, size=feat8.shape[2:], mode="nearest"))
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    """feat = ConvBNReLU(concat); feat + feat * sigmoid(conv1x1(ReLU(conv1x1(global_mean(feat)))))."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_channels, out_channels, kernel_size=1)
        self.conv1 = nn.Conv2d(out_channels, out_channels // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels // 4, out_channels, 1, bias=False)

    def forward(self, spatial: Tensor, context: Tensor) -> Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        attention = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat + feat * attention


class BiSeNetOutput(nn.Module):
    """ConvBNReLU then a bias-free 1x1 classifier."""

    def __init__(self, in_channels: int, mid_channels: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, mid_channels)
        self.conv_out = nn.Conv2d(mid_channels, n_classes, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.conv(x))


class FaceParser(nn.Module):
    """BiSeNet face parsing; `forward` returns the main head's logits at the input size."""

    def __init__(self, n_classes: int = NUM_CLASSES):
        super().__init__()
        self.n_classes = n_classes
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        # Auxiliary training heads on the 1/8 and 1/16 context; never run, kept for the checkpoint layout.
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, 3, H, W] ImageNet-normalized RGB, H and W multiples of 32 -> [N, n_classes, H, W]."""
        feat8, context8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(feat8, context8))
        # align_corners=True as in the public model: the logits are resampled exactly as it trained them.
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)


def normalize_images(images: Tensor) -> Tensor:
    """[N, 3, H, W] RGB in [0, 1] -> the parser's ImageNet-normalized input."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def hair_and_face_masks(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Parser logits [N, C, H, W] -> (hair mask, face mask), each [N, 1, H, W] float 0/1 from the
    per-pixel argmax; the face mask is the union of FACE_CLASSES."""
    labels = logits.argmax(dim=1, keepdim=True)
    hair = labels == HAIR_CLASS
    face = torch.zeros_like(hair)
    for label in FACE_CLASSES:
        face = face | (labels == label)
    return hair.float(), face.float()


def _add_batch_counters_if_all_absent(state_dict: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Files written before torch 0.4.1 have no BatchNorm `num_batches_tracked`; torch's BatchNorm loader
    fills them in for such files, and so does this (the counter plays no part at inference). A file that
    lacks only some of them is damaged and still fails the strict load."""
    counters = [key for key in expected if key.endswith(".num_batches_tracked")]
    if not any(key in state_dict for key in counters):
        state_dict.update({key: torch.zeros((), dtype=torch.long) for key in counters})


def load_face_parser_checkpoint(path: Path) -> FaceParser:
    """A FaceParser (eval mode) with the weights of a checkpoint in the public `79999_iter.pth` layout
    (a bare state dict; 'module.' prefixes and {'state_dict': ...} wrappers accepted), loaded strictly.
    Raises CheckpointError naming missing, unexpected and mis-shaped keys."""
    parser = FaceParser()
    state_dict = read_state_dict(Path(path))
    _add_batch_counters_if_all_absent(state_dict, parser.state_dict())
    load_strict(parser, state_dict, f"face parser checkpoint {path}")
    return parser.eval()
