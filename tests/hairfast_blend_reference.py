"""Test reference: our re-typing of the public inference path of HairFastGAN's colour step.

Re-typed, not imported (neither package is installed here), from:
- openai/CLIP clip/model.py @ a1d071733d7111c9c014f024669f959182114e33 (the commit HairFastGAN pins;
  model.py is unchanged up to d05afc436d78f1c48dc0dbf8e5980a9d471f35f6): LayerNorm (fp32 compute),
  QuickGELU, ResidualAttentionBlock on nn.MultiheadAttention in sequence-first layout, VisionTransformer,
  CLIP.encode_image (input cast to the weights' dtype), convert_weights (what becomes fp16 on CUDA);
- AIRI-Institute/HairFastGAN @ 49e98019c9243d1991c19d45764fc3340a498de2: models/Encoders.py
  (ModulationModule, ClipBlendingModel with `clip.load` replaced by an injected CLIP image tower),
  models/stylegan2/model.py PixelNorm, utils/image_utils.py DilateErosion, models/Blending.py
  Blending.blend_images up to S_blend.
The public structure is kept on purpose (sequence-first attention, torchvision-free Normalize written out)
so that the comparison with fashionserve's modules tests our rewrite, not a copy of it.
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# torchvision Normalize arguments in ClipBlendingModel.transform
NORMALIZE_MEAN = (0.48145466, 0.4578275, 0.40821073)
NORMALIZE_STD = (0.26862954, 0.26130258, 0.27577711)


# --- openai/CLIP clip/model.py ---------------------------------------------------------------------------
class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor):
        orig_type = x.dtype
        ret = super().forward(x.type(torch.float32))
        return ret.type(orig_type)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(d_model, d_model * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(d_model * 4, d_model)),
                ]
            )
        )
        self.ln_2 = LayerNorm(d_model)

    def forward(self, x: torch.Tensor):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=None)[0]  # visual tower: no mask
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor):
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(
        self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int
    ):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width)
        )
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1)
        x = x.permute(0, 2, 1)
        zeros = torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([self.class_embedding.to(x.dtype) + zeros, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_post(x[:, 0, :])
        return x @ self.proj


class CLIPImageTower(nn.Module):
    """The part of CLIP that encode_image uses: `visual` and the dtype cast of the input."""

    def __init__(self, visual: VisionTransformer):
        super().__init__()
        self.visual = visual

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, image):
        return self.visual(image.type(self.dtype))


def convert_weights(model: nn.Module):
    """CLIP's fp16 conversion (applied by clip.load; undone by model.float() only on device 'cpu')."""

    def to_fp16(layer):
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            layer.weight.data = layer.weight.data.half()
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.half()
        if isinstance(layer, nn.MultiheadAttention):
            for attr in [
                *[f"{s}_proj_weight" for s in ["in", "q", "k", "v"]],
                "in_proj_bias",
                "bias_k",
                "bias_v",
            ]:
                tensor = getattr(layer, attr)
                if tensor is not None:
                    tensor.data = tensor.data.half()
        for name in ["text_projection", "proj"]:
            if hasattr(layer, name):
                attr = getattr(layer, name)
                if attr is not None:
                    attr.data = attr.data.half()

    model.apply(to_fp16)


# --- HairFastGAN models/stylegan2/model.py, models/Encoders.py -----------------------------------------
class PixelNorm(nn.Module):
    def forward(self, input):
        return input * torch.rsqrt(torch.mean(input**2, dim=1, keepdim=True) + 1e-8)


class ModulationModule(nn.Module):
    def __init__(self, layernum, last=False, inp=512, middle=512, latent=512):
        super().__init__()
        self.layernum = layernum
        self.last = last
        self.fc = nn.Linear(latent, latent)
        self.norm = nn.LayerNorm([self.layernum, latent], elementwise_affine=False)
        self.gamma_function = nn.Sequential(
            nn.Linear(inp, middle), nn.LayerNorm([middle]), nn.LeakyReLU(), nn.Linear(middle, latent)
        )
        self.beta_function = nn.Sequential(
            nn.Linear(inp, middle), nn.LayerNorm([middle]), nn.LeakyReLU(), nn.Linear(middle, latent)
        )
        self.leakyrelu = nn.LeakyReLU()

    def forward(self, x, embedding):
        x = self.fc(x)
        x = self.norm(x)
        gamma = self.gamma_function(embedding)
        beta = self.beta_function(embedding)
        out = x * (1 + gamma) + beta
        if not self.last:
            out = self.leakyrelu(out)
        return out


class ClipBlendingModel(nn.Module):
    """ClipBlendingModel with the CLIP model passed in (upstream: clip.load(...)); `latent`, `embed`,
    `layers`, `middle` and the pooled size are parameters here only so that tests run small (upstream:
    512, 512, 12, 1024, 224)."""

    def __init__(self, clip_model, latent=512, embed=512, layers=12, middle=1024, resolution=224):
        super().__init__()
        self.layers = layers
        self.pixelnorm = PixelNorm()
        self.clip_model = clip_model
        self.mean = torch.tensor(NORMALIZE_MEAN).view(-1, 1, 1)
        self.std = torch.tensor(NORMALIZE_STD).view(-1, 1, 1)
        self.face_pool = torch.nn.AdaptiveAvgPool2d((resolution, resolution))
        self.modulation_module_list = nn.ModuleList(
            [
                ModulationModule(layers, i == 4, inp=latent + 2 * embed, middle=middle, latent=latent)
                for i in range(5)
            ]
        )

    def get_image_embed(self, image_tensor):
        resized_tensor = self.face_pool(image_tensor)
        renormed_tensor = (resized_tensor * 0.5 + 0.5 - self.mean) / self.std  # T.Normalize
        return self.clip_model.encode_image(renormed_tensor)

    def forward(self, latent_face, latent_color, target_face, hair_color):
        embed_face = self.get_image_embed(target_face).unsqueeze(1).expand(-1, self.layers, -1)
        embed_color = self.get_image_embed(hair_color).unsqueeze(1).expand(-1, self.layers, -1)
        latent_in = torch.cat((latent_color, embed_face, embed_color), dim=-1)
        dt_latent = self.pixelnorm(latent_face)
        for modulation_module in self.modulation_module_list:
            dt_latent = modulation_module(dt_latent, latent_in)
        return latent_face + 0.1 * dt_latent


# --- HairFastGAN utils/image_utils.py, models/Blending.py -----------------------------------------------
class DilateErosion:
    def __init__(self, dilate_erosion=5):
        self.dilate_erosion = dilate_erosion
        self.weight = torch.Tensor([[False, True, False], [True, True, True], [False, True, False]]).float()[
            None, None, ...
        ]

    def hair_from_mask(self, mask):
        # .float() before the resize: CPU nearest resize takes no int64 (upstream ran on CUDA); the
        # label maps are already 256 x 256 upstream, so the resize is the identity there and here.
        mask = torch.where(mask == 13, torch.ones_like(mask), torch.zeros_like(mask)).float()
        mask = F.interpolate(mask, size=(mask.shape[-2], mask.shape[-1]), mode="nearest")
        return self.mask(mask)

    def mask(self, mask):
        masks = mask.clone().repeat(*([2] + [1] * (len(mask.shape) - 1))).float()
        sum_w = self.weight.sum().item()
        n = len(mask)
        for _ in range(self.dilate_erosion):
            masks = F.conv2d(masks, self.weight, bias=None, stride=1, padding="same", dilation=1, groups=1)
            masks[:n] = (masks[:n] > 0).float()
            masks[n:] = (masks[n:] == sum_w).float()
        return masks[:n], masks[n:]


@torch.inference_mode()
def blend_latents(blending_encoder, face, color, face_labels, color_labels, hair_target, smooth=5):
    """Blending.blend_images up to S_blend, for one face/colour pair (batch 1 as upstream).
    face/color: dicts with 'S' [1,18,512] and 'image_norm_256' [1,3,256,256]; *_labels: CelebA label maps
    [1,1,256,256] (hair = 13); hair_target: HM_X [1,1,256,256] from the colour shape module."""
    dilate_erosion = DilateErosion(dilate_erosion=smooth)
    I_1, I_3 = face["image_norm_256"], color["image_norm_256"]
    mask_de = dilate_erosion.hair_from_mask(torch.cat([face_labels, color_labels], dim=0))
    HM_1D, _ = mask_de[0][0].unsqueeze(0), mask_de[1][0].unsqueeze(0)
    HM_3D, HM_3E = mask_de[0][1].unsqueeze(0), mask_de[1][1].unsqueeze(0)
    latent_S_1, latent_S_3 = face["S"], color["S"]
    HM_XD, _ = dilate_erosion.mask(hair_target)
    target_mask = (1 - HM_1D) * (1 - HM_3D) * (1 - HM_XD)
    S_blend_6_18 = blending_encoder(latent_S_1[:, 6:], latent_S_3[:, 6:], I_1 * target_mask, I_3 * HM_3E)
    return torch.cat((latent_S_1[:, :6], S_blend_6_18), dim=1)
