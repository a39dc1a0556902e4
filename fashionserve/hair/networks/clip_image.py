"""CLIP ViT-B/32 image encoder with HairFastGAN's preprocessing; module names match OpenAI's `ViT-B-32.pt`.

HairFastGAN's colour step (AIRI-Institute/HairFastGAN @ 49e98019, models/Encoders.py ClipBlendingModel)
embeds two 256 x 256 images in [-1, 1] with `clip.load("ViT-B/32")` (openai/CLIP @ a1d07173):
`get_image_embed` average-pools them to 224 x 224 with AdaptiveAvgPool2d (not CLIP's own bicubic resize
and centre crop), maps them to [0, 1], normalizes with CLIP's mean/std and calls `encode_image`.
`ClipImageEncoder` is that computation; its state dict equals the `visual.*` entries of OpenAI's file.

The arithmetic is CLIP's VisionTransformer: 32 x 32 patches by a strided convolution without bias, a
class token and learned positional embeddings, LayerNorm before and after the transformer, residual
blocks of multi-head self-attention and a QuickGELU MLP, the class token projected to 512. Attention is
written out (batch-first, one matmul per product) instead of nn.MultiheadAttention, so that it exports to
plain ONNX operators; its parameters keep nn.MultiheadAttention's names (`in_proj_weight`, ...).
LayerNorm computes in float32 whatever the input dtype, as CLIP's does: upstream runs the tower in
float16 on CUDA (clip.load keeps its fp16 conversion off the CPU); exported graphs are float32.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.checkpoints import (
    CheckpointError,
    is_torchscript_archive,
    load_strict,
    read_checkpoint,
    read_torchscript_state_dict,
    state_dict_of,
)

# torchvision Normalize constants of CLIP's preprocessing, as HairFastGAN writes them.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
QUICK_GELU_SCALE = 1.702  # x * sigmoid(1.702 x) approximates GELU
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which CLIP keeps
HAIRFAST_IMAGE_SIZE = 256  # HairFastGAN embeds its `image_norm_256` images
VISUAL_PREFIX = "visual."  # the image tower's entries in OpenAI's checkpoints


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype (CLIP's `LayerNorm`)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)


class ClipAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameters (packed q/k/v projection
    `in_proj_weight` [3W, W] and `in_proj_bias`, then `out_proj`), on batch-first tokens [B, L, W]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        # [B, L, 3W] -> three [B, heads, L, W / heads]
        q, k, v = (
            F.linear(x, self.in_proj_weight, self.in_proj_bias)
            .reshape(batch, tokens, 3, self.heads, -1)
            .permute(2, 0, 3, 1, 4)
        )
        scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        attended = torch.matmul(scores.softmax(dim=-1), v)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, tokens, width))


class ClipMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ClipResidualBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = ClipAttention(width, heads)
        self.ln_1 = Float32LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = ClipMLP(width)
        self.ln_2 = Float32LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ClipTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ClipResidualBlock(width, heads) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class ClipVisionTransformer(nn.Module):
    """CLIP's image tower: normalized images [B, 3, R, R] -> embeddings [B, output_dim]. Defaults are
    ViT-B/32 (R 224, patch 32, width 768, 12 layers of 12 heads, output 512)."""

    def __init__(
        self,
        resolution: int = 224,
        patch_size: int = 32,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        output_dim: int = 512,
    ):
        super().__init__()
        if resolution % patch_size:
            raise ValueError(f"resolution {resolution} is not a multiple of patch size {patch_size}")
        self.resolution = resolution
        scale = width**-0.5
        # Registration order as in CLIP (own parameters first in state_dict(), then the submodules).
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((resolution // patch_size) ** 2 + 1, width)
        )
        self.ln_pre = Float32LayerNorm(width, eps=LAYER_NORM_EPS)
        self.transformer = ClipTransformer(width, layers, heads)
        self.ln_post = Float32LayerNorm(width, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, image: Tensor) -> Tensor:
        x = self.conv1(image.to(self.conv1.weight.dtype))  # encode_image casts to the weights' dtype
        x = x.flatten(2).transpose(1, 2)  # [B, grid * grid, width]
        class_token = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([class_token, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class ClipImagePreprocess(nn.Module):
    """HairFastGAN's `get_image_embed` input path: images in [-1, 1] [B, 3, H, W] -> adaptive average
    pooling to resolution x resolution -> [0, 1] -> (x - CLIP_MEAN) / CLIP_STD."""

    def __init__(self, resolution: int = 224):
        super().__init__()
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(image, (self.resolution, self.resolution))
        return (pooled * 0.5 + 0.5 - self.mean) / self.std


class ClipImageEncoder(nn.Module):
    """HairFastGAN's CLIP image embedding: images in [-1, 1] [B, 3, H, W] (H = W = 256 upstream) ->
    [B, output_dim]. State dict = the `visual.*` entries of an OpenAI CLIP checkpoint."""

    def __init__(
        self,
        resolution: int = 224,
        patch_size: int = 32,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        output_dim: int = 512,
    ):
        super().__init__()
        self.preprocess = ClipImagePreprocess(resolution)
        self.visual = ClipVisionTransformer(resolution, patch_size, width, layers, heads, output_dim)
        self.output_dim = output_dim

    def forward(self, image: Tensor) -> Tensor:
        return self.visual(self.preprocess(image))


def read_clip_state_dict(path: Path) -> dict[str, Tensor]:
    """All tensors of an OpenAI CLIP checkpoint as `clip.load` reads them: a TorchScript archive (the
    published `ViT-B-32.pt`; read without TorchScript, see checkpoints.read_torchscript_state_dict) or a
    torch.save'd state dict (read with weights_only)."""
    if is_torchscript_archive(path):
        return read_torchscript_state_dict(path)
    return state_dict_of(read_checkpoint(path), str(path))


def load_clip_image_encoder(path: Path, encoder: ClipImageEncoder | None = None) -> ClipImageEncoder:
    """Strictly load the `visual.*` entries of an OpenAI CLIP checkpoint into `encoder` (default: ViT-B/32)
    as float32; the text tower's entries are not used. Raises CheckpointError naming missing, unexpected
    and mis-shaped keys."""
    encoder = encoder if encoder is not None else ClipImageEncoder()
    state_dict = read_clip_state_dict(path)
    visual = {key: value for key, value in state_dict.items() if key.startswith(VISUAL_PREFIX)}
    if not visual:
        raise CheckpointError(f"{path}: no {VISUAL_PREFIX}* entries: not an OpenAI CLIP checkpoint")
    load_strict(encoder, visual, f"CLIP checkpoint {path} ({VISUAL_PREFIX}*)")
    return encoder.float().eval()
