"""Test reference: our re-typing of HairFastGAN's public inference code for its encoders and generator calls.

Source: github AIRI-Institute/HairFastGAN @ 49e98019c9243d1991c19d45764fc3340a498de2 (MIT):
- `models/stylegan2/model.py` Generator.forward (start_layer / end_layer / layer_in);
- `models/FeatureStyleEncoder/nets/feature_style_encoder.py` fs_encoder_v2, `arcface/iresnet.py`,
  `trainer.py` (Trainer.get_image / test: downscale twice, + dlatent_avg), `models/Embedding.py`;
- `models/Net.py` FeatureEncoderMult, IResNet; `models/Encoders.py` ModulationModule, FeatureiResnet,
  PostProcessModel; `models/Blending.py` (how PostProcess is called).

Written plainly as the public code is structured (module classes, children slicing, per-layer loops), not
as our modules are, so that tests compare two independent formulations. Departures, all for tests only:
the public hard-coded widths (64-512 body, 512 style/content channels, 18 styles) are parameters so tests
run tiny; file loading (`torch.load` of ArcFace / pSp / latent_avg files) is left out, the tests load
state dicts and the average latent themselves; noise is passed explicitly (the public code draws fresh
noise per call unless `noise` is given).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.test_hair_networks_gan import leaky, reference_modulated_conv, reference_upfirdn2d

# --- models/stylegan2/model.py: Generator.forward with input_is_latent=True and one W+ style ---------


def _styled_conv(conv, x: Tensor, latent: Tensor, noise: Tensor) -> Tensor:
    out = reference_modulated_conv(conv.conv, x, latent) + conv.noise.weight * noise
    return leaky(out + conv.activate.bias.view(1, -1, 1, 1))


def _to_rgb(to_rgb, x: Tensor, latent: Tensor, skip: Tensor | None) -> Tensor:
    out = reference_modulated_conv(to_rgb.conv, x, latent) + to_rgb.bias
    if skip is not None:
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        out = out + reference_upfirdn2d(skip, torch.outer(taps, taps) / 64 * 4, up=2, pad=(2, 1))
    return out


def generator_forward(
    generator,
    latent: Tensor,
    noise: list[Tensor],
    layer_in: Tensor | None = None,
    start_layer: int = 0,
    end_layer: int = 8,
) -> tuple[Tensor, Tensor | None]:
    """The public loop: block 0 only when start_layer == 0; the block equal to start_layer reads
    layer_in and gets the caller's skip (None); past end_layer return (out, skip); after the last block
    return (image, None). Arithmetic per layer by the hand-wired per-sample formulas."""
    skip = None
    out = generator.input.input.repeat(latent.shape[0], 1, 1, 1)
    if start_layer == 0:
        out = _styled_conv(generator.conv1, out, latent[:, 0], noise[0])
        skip = _to_rgb(generator.to_rgb1, out, latent[:, 1], None)
    if end_layer == 0:
        return out, skip
    i = 1
    current_layer = 1
    for conv1, conv2, noise1, noise2, to_rgb in zip(
        generator.convs[::2], generator.convs[1::2], noise[1::2], noise[2::2], generator.to_rgbs, strict=False
    ):
        if current_layer < start_layer:
            pass
        elif current_layer == start_layer:
            out = _styled_conv(conv1, layer_in, latent[:, i], noise1)
            out = _styled_conv(conv2, out, latent[:, i + 1], noise2)
            skip = _to_rgb(to_rgb, out, latent[:, i + 2], skip)  # the caller's skip: None here
        elif current_layer > end_layer:
            return out, skip
        else:
            out = _styled_conv(conv1, out, latent[:, i], noise1)
            out = _styled_conv(conv2, out, latent[:, i + 1], noise2)
            skip = _to_rgb(to_rgb, out, latent[:, i + 2], skip)
        current_layer += 1
        i += 2
    return skip, None


# --- arcface/iresnet.py (= models/Net.py IResNet) ----------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return out


class IResNet(nn.Module):
    """iresnet with the public [3, 4, 14, 3] (iresnet50) as `layers`; `width` 64 public."""

    fc_scale = 7 * 7

    def __init__(self, layers=(3, 4, 14, 3), width: int = 64, num_features: int = 512):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(width, layers[0], stride=2)
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(8 * width, eps=1e-05)
        self.dropout = nn.Dropout(p=0, inplace=True)
        self.fc = nn.Linear(8 * width * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes, eps=1e-05)
            )
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(IBasicBlock(self.inplanes, planes))
        return nn.Sequential(*layers)


# --- nets/feature_style_encoder.py: fs_encoder_v2; trainer.py: the inference wrapper ------------------


def _content(in_channels: int, out_channels: int, stride) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(in_channels, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True),
        nn.Conv2d(in_channels, out_channels, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False),
        nn.BatchNorm2d(out_channels, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True),
        nn.PReLU(num_parameters=out_channels),
        nn.Conv2d(out_channels, out_channels, kernel_size=(3, 3), stride=stride, padding=(1, 1), bias=False),
        nn.BatchNorm2d(out_channels, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True),
    )


class FsEncoderV2(nn.Module):
    """fs_encoder_v2 as the FS trainer builds it (stride = (fs_stride, fs_stride) = (2, 2) from 001.yaml)."""

    def __init__(
        self, n_styles=18, layers=(3, 4, 14, 3), width=64, style_dim=512, content=512, stride=(2, 2)
    ):
        super().__init__()
        resnet50 = IResNet(layers, width)  # the public code loads backbone.pth here; 143_enc.pth overrides it
        self.conv = nn.Sequential(*list(resnet50.children())[:3])
        self.block_1 = list(resnet50.children())[3]
        self.block_2 = list(resnet50.children())[4]
        self.block_3 = list(resnet50.children())[5]
        self.block_4 = list(resnet50.children())[6]
        self.content_layer = _content(4 * width, content, stride)
        self.avg_pool = nn.AdaptiveAvgPool2d((3, 3))
        self.styles = nn.ModuleList()
        for _ in range(n_styles):
            self.styles.append(nn.Linear(15 * width * 9, style_dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        latents = []
        features = []
        x = self.conv(x)
        x = self.block_1(x)
        features.append(self.avg_pool(x))
        x = self.block_2(x)
        features.append(self.avg_pool(x))
        x = self.block_3(x)
        content = self.content_layer(x)
        features.append(self.avg_pool(x))
        x = self.block_4(x)
        features.append(self.avg_pool(x))
        x = torch.cat(features, dim=1)
        x = x.view(x.size(0), -1)
        for i in range(len(self.styles)):
            latents.append(self.styles[i](x))
        out = torch.stack(latents, dim=1)
        return out, content


def downscale(x: Tensor, scale_times: int = 1, mode: str = "bilinear") -> Tensor:
    for _ in range(scale_times):
        x = F.interpolate(x, scale_factor=0.5, mode=mode)
    return x


def fs_encode(enc: FsEncoderV2, image_normalized: Tensor, dlatent_avg: Tensor) -> tuple[Tensor, Tensor]:
    """Trainer.test(img, return_latent=True)[2:] as Embedding reads it: w_recon and fea. The trainer's
    scale is log2(resolution / enc_resolution) = log2(1024 / 256) = 2 halvings."""
    scale = int(math.log2(1024 / 256))
    w_recon, fea = enc(downscale(image_normalized, scale, "bilinear"))
    w_recon = w_recon + dlatent_avg
    return w_recon, fea


def embedding_fs(enc, dlatent_avg, generator, noise, image_normalized: Tensor) -> tuple[Tensor, Tensor]:
    """Embedding.embedding_images, FS part: latent_S and latent_F (generator start_layer=3, end_layer=3)."""
    latent_S, latent = fs_encode(enc, image_normalized, dlatent_avg)
    latent_F, _ = generator_forward(generator, latent_S, noise, layer_in=latent, start_layer=3, end_layer=3)
    return latent_S, latent_F


# --- models/Net.py FeatureEncoderMult(fs_layers=[9]); models/Encoders.py --------------------------------


class FeatureEncoderMult(FsEncoderV2):
    """FeatureEncoder with fs_layers=(9,), ranks=None: max(fs_layers) > 7, so shift = scale = 2 and the
    content layer reads block_2 with kernel fs_kernals[7] = (3, 3) and stride fs_strides[7] = (1, 1)."""

    def __init__(self, fs_layers=(9,), **kwargs):
        super().__init__(stride=(1, 1), **kwargs)
        width, content = kwargs.get("width", 64), kwargs.get("content", 512)
        self.fs_layers = fs_layers
        self.content_layer = nn.ModuleList()
        for _ in fs_layers:
            self.content_layer.append(
                nn.Sequential(
                    nn.BatchNorm2d(
                        4 * width // 2, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True
                    ),
                    nn.Conv2d(
                        4 * width // 2, content, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False
                    ),
                    nn.BatchNorm2d(content, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True),
                    nn.PReLU(num_parameters=content),
                    nn.Conv2d(
                        content, content, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False
                    ),
                    nn.BatchNorm2d(content, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True),
                )
            )

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        # x = transform_to_256(x): torchvision Resize((256, 256)) returns a 256 x 256 input unchanged and
        # every public caller passes 256 x 256 images, so it is left out (tests run smaller inputs).
        features = []
        content = []
        x = self.conv(x)
        x = self.block_1(x)
        features.append(self.avg_pool(x))
        x = self.block_2(x)
        if max(self.fs_layers) > 7:
            for layer in self.content_layer:
                content.append(layer(x))
        features.append(self.avg_pool(x))
        x = self.block_3(x)
        features.append(self.avg_pool(x))
        x = self.block_4(x)
        features.append(self.avg_pool(x))
        x = torch.cat(features, dim=1)
        x = x.view(x.size(0), -1)
        latents = [self.styles[i](x) for i in range(len(self.styles))]
        return torch.stack(latents, dim=1), content


class PixelNorm(nn.Module):
    def forward(self, input: Tensor) -> Tensor:
        return input * torch.rsqrt(torch.mean(input**2, dim=1, keepdim=True) + 1e-8)


class ModulationModule(nn.Module):
    def __init__(self, layernum: int, last: bool = False, inp: int = 512, middle: int = 512, dim: int = 512):
        super().__init__()
        self.layernum = layernum
        self.last = last
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm([self.layernum, dim], elementwise_affine=False)
        self.gamma_function = nn.Sequential(
            nn.Linear(inp, middle), nn.LayerNorm([middle]), nn.LeakyReLU(), nn.Linear(middle, dim)
        )
        self.beta_function = nn.Sequential(
            nn.Linear(inp, middle), nn.LayerNorm([middle]), nn.LeakyReLU(), nn.Linear(middle, dim)
        )
        self.leakyrelu = nn.LeakyReLU()

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        x = self.fc(x)
        x = self.norm(x)
        gamma = self.gamma_function(embedding)
        beta = self.beta_function(embedding)
        out = x * (1 + gamma) + beta
        if not self.last:
            out = self.leakyrelu(out)
        return out


class FeatureiResnet(nn.Module):
    def __init__(self, blocks, inplanes: int = 1024):
        super().__init__()
        self.res_blocks = {}
        for n, block in enumerate(blocks, start=1):
            planes, num_blocks = block
            for k in range(1, num_blocks + 1):
                downsample = None
                if inplanes != planes:
                    downsample = nn.Sequential(
                        conv1x1(inplanes, planes, 1), nn.BatchNorm2d(planes, eps=1e-05)
                    )
                self.res_blocks[f"res_block_{n}_{k}"] = IBasicBlock(inplanes, planes, 1, downsample)
                inplanes = planes
        self.res_blocks = nn.ModuleDict(self.res_blocks)

    def forward(self, x: Tensor) -> Tensor:
        for module in self.res_blocks.values():
            x = module(x)
        return x


class PostProcessModel(nn.Module):
    """PostProcessModel with the public [[1024, 2], [768, 2], [512, 2]] as (2c, 3c/2, c) for content c."""

    def __init__(self, n_styles=18, layers=(3, 4, 14, 3), width=64, style_dim=512, content=512):
        super().__init__()
        self.encoder_face = FeatureEncoderMult(
            fs_layers=[9], n_styles=n_styles, layers=layers, width=width, style_dim=style_dim, content=content
        )
        self.latent_avg = torch.zeros(style_dim)  # public: torch.load('.../PostProcess/latent_avg.pt')
        self.to_feature = FeatureiResnet(
            [[2 * content, 2], [3 * content // 2, 2], [content, 2]], inplanes=2 * content
        )
        self.to_latent_1 = nn.ModuleList(
            [ModulationModule(n_styles, i == 4, style_dim, style_dim, style_dim) for i in range(5)]
        )
        self.to_latent_2 = nn.ModuleList(
            [ModulationModule(n_styles, i == 4, style_dim, style_dim, style_dim) for i in range(5)]
        )
        self.pixelnorm = PixelNorm()

    def forward(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        s_face, [f_face] = self.encoder_face(source)
        s_hair, [f_hair] = self.encoder_face(target)
        dt_latent_face = self.pixelnorm(s_face)
        dt_latent_hair = self.pixelnorm(s_hair)
        for mod_module in self.to_latent_1:
            dt_latent_face = mod_module(dt_latent_face, s_hair)
        for mod_module in self.to_latent_2:
            dt_latent_hair = mod_module(dt_latent_hair, s_face)
        finall_s = self.latent_avg + 0.1 * (dt_latent_face + dt_latent_hair)
        cat_f = torch.cat((f_face, f_hair), dim=1)
        finall_f = self.to_feature(cat_f)
        return finall_s, finall_f


def blending_post_process(post_process, generator, noise, I_1: Tensor, I_blend_256: Tensor) -> Tensor:
    """Blending.blend_images, post-process part: S_final, F_final, then the generator from start_layer=5."""
    S_final, F_final = post_process(I_1, I_blend_256)
    I_final, _ = generator_forward(generator, S_final, noise, layer_in=F_final, start_layer=5, end_layer=8)
    return I_final
