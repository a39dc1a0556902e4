"""HairFastGAN shape alignment (`ShapeAdaptor/mask_generator.pth`): CtrlHair's shape branch, the
hair/face mask encoder-decoder, with module names matching the released file.

Follows AIRI-Institute/HairFastGAN @ 49e98019c9243d1991c19d45764fc3340a498de2: `models/Alignment.py`
builds the vendored CtrlHair `shape_branch` Generator (config 054: hair code 16, face code 1024,
positional encoding order 10, CtrlHair LayerNorm in every conv block, 7 levels of 32..2048 channels at
256 px) and calls `get_hair_face_code` / `get_new_shape` (`shape_branch/solver.py`): both 19-class label
maps (CelebAMask-HQ order, hair = 13) are resized to 256 with nearest, one-hot encoded and split into
the hair channel and the 18 others; the face code comes from the face's mask, the hair code (the VAE
mean) from the pose-aligned shape reference's mask; the decoders' logits, hair channel put back at
index 13, go through softmax and argmax into the target label map.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.checkpoints import load_strict, read_state_dict

NUM_CLASSES = 19  # CelebAMask-HQ labels; 255 (unknown) becomes an all-zero one-hot row, as upstream
HAIR_CLASS = 13
LEAKY_SLOPE = 0.2
NORM_EPS = 1e-5


def positional_encoding(size: int, order: int) -> Tensor:
    """[4 * order, size, size]: sin then cos of 2^k * pi * (x, y) for k < order, x along the width and
    y along the height, coordinates k / size (CtrlHair's generate_pos_embedding, computed in float64)."""
    coordinates = torch.arange(size, dtype=torch.float64) / size
    y, x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    grid = torch.stack([x, y])  # [2, size, size]
    frequencies = (2.0 ** torch.arange(order, dtype=torch.float64) * math.pi).view(order, 1, 1, 1)
    angles = frequencies * grid  # [order, 2, size, size]
    return torch.cat([torch.sin(angles), torch.cos(angles)]).reshape(4 * order, size, size).float()


class SampleLayerNorm(nn.Module):
    """CtrlHair's LayerNorm: per sample, (x - mean) / (unbiased std + eps) over all of C, H, W, then a
    per-channel gamma and beta."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        mean = flat.mean(dim=1).view(-1, 1, 1, 1)
        std = flat.std(dim=1).view(-1, 1, 1, 1)
        normalized = (x - mean) / (std + NORM_EPS)
        return normalized * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


class ConvBlock(nn.Module):
    """Conv (zero padding), optional SampleLayerNorm and LeakyReLU(0.2): CtrlHair's Conv2dBlock."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, norm: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=1)
        self.norm = SampleLayerNorm(out_channels) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm is None:
            return x
        return F.leaky_relu(self.norm(x), LEAKY_SLOPE)


class LinearBlock(nn.Module):
    """A plain linear layer under the name `fc` (CtrlHair's LinearBlock without norm or activation)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def level_width(level: int, base: int, max_channels: int) -> int:
    return min(max_channels, base * 2**level)


class MaskEncoder(nn.Module):
    """Mask + positional encoding -> `levels` stride-2 conv blocks -> flatten -> linear code. The VAE
    hair encoder also has `std_out_layer` (kept for strict loading; inference uses the mean only)."""

    def __init__(
        self, in_channels: int, code_dim: int, size: int, levels: int, base: int, max_channels: int,
        order: int, with_std: bool,
    ):  # fmt: skip
        super().__init__()
        blocks, channels = [], in_channels + 4 * order
        for level in range(levels):
            blocks.append(ConvBlock(channels, level_width(level, base, max_channels), 4, 2, norm=True))
            channels = level_width(level, base, max_channels)
        self.layers = nn.Sequential(*blocks)
        flat = (size // 2**levels) ** 2 * channels
        self.out_layer = LinearBlock(flat, code_dim)
        if with_std:
            self.std_out_layer = LinearBlock(flat, code_dim)
        self.register_buffer("position", positional_encoding(size, order), persistent=False)

    def forward(self, mask: Tensor) -> Tensor:
        position = self.position.expand(mask.shape[0], -1, -1, -1)
        return self.out_layer(self.layers(torch.cat([mask, position], dim=1)).flatten(1))


class MaskDecoder(nn.Module):
    """Linear code -> [widest, size / 2^levels, same] -> `levels` x (nearest 2x up, conv block) -> conv."""

    def __init__(
        self, code_dim: int, out_channels: int, size: int, levels: int, base: int, max_channels: int
    ):
        super().__init__()
        self.channels = level_width(levels, base, max_channels)
        self.start = size // 2**levels
        self.in_layer = LinearBlock(code_dim, self.channels * self.start**2)
        blocks: list[nn.Module] = []
        channels = self.channels
        for level in reversed(range(levels)):
            # Index 2k is upstream's nn.Upsample (no weights), 2k + 1 the conv block: checkpoint keys.
            width = level_width(level, base, max_channels)
            blocks += [nn.Upsample(scale_factor=2), ConvBlock(channels, width, 3, 1, norm=True)]
            channels = width
        self.layers = nn.Sequential(*blocks)
        self.out_layer = ConvBlock(channels, out_channels, 3, 1, norm=False)

    def forward(self, code: Tensor) -> Tensor:
        x = self.in_layer(code).reshape(-1, self.channels, self.start, self.start)
        return self.out_layer(self.layers(x))


class ShapeAdaptor(nn.Module):
    """forward(face_mask, shape_mask) -> target label map [N, 1, size, size] int64: the face's face code with
    the shape reference's hair code. Masks are [N, 1, H, W] integer label maps (any H, W; resized with
    nearest to `size`)."""

    def __init__(
        self, size: int = 256, hair_dim: int = 16, face_dim: int = 1024, levels: int = 7, base: int = 32,
        max_channels: int = 2048, order: int = 10,
    ):  # fmt: skip
        super().__init__()
        self.size = size
        encoder = dict(size=size, levels=levels, base=base, max_channels=max_channels, order=order)
        decoder = dict(size=size, levels=levels, base=base, max_channels=max_channels)
        self.hair_encoder = MaskEncoder(1, hair_dim, with_std=True, **encoder)
        self.face_encoder = MaskEncoder(NUM_CLASSES - 1, face_dim, with_std=False, **encoder)
        self.hair_decoder = MaskDecoder(face_dim + hair_dim, 1, **decoder)
        self.face_decoder = MaskDecoder(face_dim, NUM_CLASSES - 1, **decoder)
        classes = torch.arange(NUM_CLASSES, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("classes", classes, persistent=False)

    def split_one_hot(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Label map -> (hair [N, 1, size, size], other 18 classes [N, 18, size, size]) one-hot planes."""
        labels = F.interpolate(mask.float(), size=(self.size, self.size), mode="nearest")
        one_hot = (labels == self.classes).float()
        face = torch.cat([one_hot[:, :HAIR_CLASS], one_hot[:, HAIR_CLASS + 1 :]], dim=1)
        return one_hot[:, HAIR_CLASS : HAIR_CLASS + 1], face

    def decode(self, hair_code: Tensor, face_code: Tensor) -> Tensor:
        """Class probabilities [N, 19, size, size] (softmax) for a hair code and a face code."""
        hair_logit = self.hair_decoder(torch.cat([face_code, hair_code], dim=1))
        face_logit = self.face_decoder(face_code)
        logits = torch.cat([face_logit[:, :HAIR_CLASS], hair_logit, face_logit[:, HAIR_CLASS:]], dim=1)
        return torch.softmax(logits, dim=1)

    def forward(self, face_mask: Tensor, shape_mask: Tensor) -> Tensor:
        _, face = self.split_one_hot(face_mask)
        hair, _ = self.split_one_hot(shape_mask)
        probabilities = self.decode(self.hair_encoder(hair), self.face_encoder(face))
        return probabilities.argmax(dim=1, keepdim=True)


def load_shape_adaptor_checkpoint(path: Path, model: ShapeAdaptor | None = None) -> ShapeAdaptor:
    """Strictly load `ShapeAdaptor/mask_generator.pth` (a bare state dict, as upstream's loader reads it;
    'state_dict' wrappers and 'module.' prefixes are accepted too) into `model` (default: public 256
    configuration). Raises CheckpointError naming missing, unexpected or mis-shaped keys."""
    model = model if model is not None else ShapeAdaptor()
    load_strict(model, read_state_dict(path), f"shape adaptor checkpoint {path}")
    return model.eval()
