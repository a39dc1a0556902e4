"""PG-GAN generator: the zoo's checkpoint layout and math, equalized-LR folding, postprocessing."""

import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fashionserve.catalogue.bundle import load_fashion_generator
from fashionserve.catalogue.networks.pggan import PGGANConfig, PGGANGenerator, load_pggan_checkpoint
from fashionserve.catalogue.stages import PGGANPostprocess
from fashionserve.checkpoints import CheckpointError

# --- A re-typed copy of pytorch_GAN_zoo's generator (models/networks/custom_layers.py and
# progressive_conv_net.py GNet), condensed: the reference our module must equal. ---


class ZooConstrainedLayer(nn.Module):
    def __init__(self, module, equalized=True, initBiasToZero=True):  # noqa: N803 - the zoo's names
        super().__init__()
        self.module = module
        self.equalized = equalized
        if initBiasToZero:
            self.module.bias.data.fill_(0)
        if self.equalized:
            self.module.weight.data.normal_(0, 1)
            self.weight = math.sqrt(2.0 / np.prod(self.module.weight.size()[1:]))

    def forward(self, x):
        x = self.module(x)
        if self.equalized:
            x *= self.weight
        return x


def zoo_conv(previous, channels, kernel, padding=0):
    return ZooConstrainedLayer(nn.Conv2d(previous, channels, kernel, padding=padding))


def zoo_normalize(x, epsilon=1e-8):
    return x * (((x**2).mean(dim=1, keepdim=True) + epsilon).rsqrt())


def zoo_upscale(x, factor=2):
    s = x.size()
    x = x.view(-1, s[1], s[2], 1, s[3], 1)
    x = x.expand(-1, s[1], s[2], factor, s[3], factor)
    return x.contiguous().view(-1, s[1], s[2] * factor, s[3] * factor)


class ZooGNet(nn.Module):
    def __init__(self, dimLatent, depthScale0, dimOutput=3):  # noqa: N803
        super().__init__()
        self.scalesDepth = [depthScale0]
        self.scaleLayers = nn.ModuleList()
        self.toRGBLayers = nn.ModuleList()
        self.formatLayer = ZooConstrainedLayer(nn.Linear(dimLatent, 16 * depthScale0))
        self.groupScale0 = nn.ModuleList([zoo_conv(depthScale0, depthScale0, 3, padding=1)])
        self.toRGBLayers.append(zoo_conv(depthScale0, dimOutput, 1))
        self.dimOutput = dimOutput
        self.alpha = 0
        self.leakyRelu = nn.LeakyReLU(0.2)

    def addScale(self, depthNewScale):  # noqa: N802, N803
        last = self.scalesDepth[-1]
        self.scalesDepth.append(depthNewScale)
        self.scaleLayers.append(nn.ModuleList())
        self.scaleLayers[-1].append(zoo_conv(last, depthNewScale, 3, padding=1))
        self.scaleLayers[-1].append(zoo_conv(depthNewScale, depthNewScale, 3, padding=1))
        self.toRGBLayers.append(zoo_conv(depthNewScale, self.dimOutput, 1))

    def forward(self, x):
        x = zoo_normalize(x)
        x = x.view(-1, x.size(1))
        x = self.leakyRelu(self.formatLayer(x))
        x = x.view(x.size()[0], -1, 4, 4)
        x = zoo_normalize(x)
        for convLayer in self.groupScale0:  # noqa: N806
            x = zoo_normalize(self.leakyRelu(convLayer(x)))
        if self.alpha > 0 and len(self.scaleLayers) == 1:
            y = zoo_upscale(self.toRGBLayers[-2](x))
        for scale, layerGroup in enumerate(self.scaleLayers, 0):  # noqa: N806
            x = zoo_upscale(x)
            for convLayer in layerGroup:  # noqa: N806
                x = zoo_normalize(self.leakyRelu(convLayer(x)))
            if self.alpha > 0 and scale == (len(self.scaleLayers) - 2):
                y = zoo_upscale(self.toRGBLayers[-2](x))
        x = self.toRGBLayers[-1](x)
        if self.alpha > 0:
            x = self.alpha * y + (1.0 - self.alpha) * x
        return x


SMALL_DEPTHS = (16, 16, 8)  # depthScale0 16, then scales of 16 and 8 channels: 16x16 output
LATENT = 24


def zoo_generator(seed: int, alpha: float = 0.0) -> ZooGNet:
    torch.manual_seed(seed)
    net = ZooGNet(LATENT, SMALL_DEPTHS[0])
    for depth in SMALL_DEPTHS[1:]:
        net.addScale(depth)
    with torch.no_grad():  # trained-looking biases (the zoo starts them at 0)
        for name, param in net.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    net.alpha = alpha
    return net.eval()


def save_zoo_checkpoint(path: Path, alpha: float = 0.0, legacy_keys: bool = False) -> tuple[ZooGNet, ZooGNet]:
    """A file as pytorch_GAN_zoo's BaseGAN.save writes it: {'config': <BaseConfig>, 'netG', 'netD',
    'avgG'}, the config pickled as an instance of models.utils.config.BaseConfig."""
    module = types.ModuleType("models.utils.config")

    class BaseConfig:
        pass

    BaseConfig.__module__, BaseConfig.__qualname__ = "models.utils.config", "BaseConfig"
    module.BaseConfig = BaseConfig
    config = BaseConfig()
    config.depthScale0, config.depthOtherScales = SMALL_DEPTHS[0], list(SMALL_DEPTHS[1:])
    config.noiseVectorDim = config.latentVectorDim = LATENT
    config.dimOutput, config.leakyReluLeak, config.alpha = 3, 0.2, alpha
    config.perChannelNormalization = config.equalizedlR = config.initBiasToZero = True
    config.lossCriterion, config.miniBatchStdDev, config.attribKeysOrder = "WGANGP", True, None
    net_g, avg_g = zoo_generator(1, alpha), zoo_generator(2, alpha)

    def state(net: nn.Module) -> dict:
        sd = net.state_dict()
        return {k.replace(".module.", "."): v for k, v in sd.items()} if legacy_keys else sd

    names = ("models", "models.utils", "models.utils.config")
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update({name: types.ModuleType(name) for name in names[:2]}, **{names[2]: module})
    try:
        torch.save({"config": config, "netG": state(net_g), "netD": {}, "avgG": state(avg_g)}, path)
    finally:  # loading must work without the zoo's code
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return net_g, avg_g


def test_default_generator_has_the_zoo_512_state_dict():
    generator = PGGANGenerator()
    state = generator.state_dict()
    assert len(state) == 48 and sum(v.numel() for v in state.values()) == 23_079_800
    assert state["formatLayer.module.weight"].shape == (8192, 512)
    assert state["groupScale0.0.module.weight"].shape == (512, 512, 3, 3)
    assert state["scaleLayers.3.0.module.weight"].shape == (256, 512, 3, 3)
    assert state["scaleLayers.6.1.module.weight"].shape == (32, 32, 3, 3)
    assert state["toRGBLayers.7.module.weight"].shape == (3, 32, 1, 1)
    assert generator.config.resolution == 512


def test_resolution_presets_and_errors():
    config = PGGANConfig.for_resolution(64, max_channels=32, latent_dim=16)
    assert (config.depth_scale0, config.depth_other_scales, config.resolution) == (32, (32, 32, 32, 32), 64)
    for bad in (0, 48, 2048):
        with pytest.raises(ValueError, match="power of two from 4 to 1024"):
            PGGANConfig.for_resolution(bad)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("which", ["avgG", "netG"])
def test_zoo_checkpoint_loads_strictly_and_matches_the_zoo(tmp_path, alpha, which):
    net_g, avg_g = save_zoo_checkpoint(tmp_path / "pgan.pth", alpha)
    reference = {"netG": net_g, "avgG": avg_g}[which]
    ours = load_pggan_checkpoint(tmp_path / "pgan.pth", which).eval()
    assert ours.config == PGGANConfig(
        latent_dim=LATENT, depth_scale0=16, depth_other_scales=(16, 8), alpha=alpha
    )
    latents = torch.randn(3, LATENT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(latents)
        assert torch.allclose(ours(latents), expected, atol=1e-5)
        ours.fold_equalized_lr()
        assert torch.allclose(ours(latents), expected, atol=1e-4)
    assert all(layer.scale == 1.0 for layer in ours.modules() if hasattr(layer, "scale"))


def test_legacy_zoo_keys_load(tmp_path):
    _, avg_g = save_zoo_checkpoint(tmp_path / "old.pth", legacy_keys=True)
    ours = load_pggan_checkpoint(tmp_path / "old.pth").eval()
    latents = torch.randn(2, LATENT)
    with torch.no_grad():
        assert torch.allclose(ours(latents), avg_g(latents), atol=1e-5)


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_pggan_checkpoint(tmp_path / "missing.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a PGAN checkpoint"):
        load_pggan_checkpoint(tmp_path / "other.pth")
    torch.save({"avgG": {}}, tmp_path / "noconfig.pth")
    with pytest.raises(CheckpointError, match="no stored 'config'"):
        load_pggan_checkpoint(tmp_path / "noconfig.pth")
    state = PGGANGenerator(PGGANConfig.for_resolution(8, 8, 8)).state_dict()
    state.pop("toRGBLayers.1.module.bias")
    config = {"latentVectorDim": 8, "depthScale0": 8, "depthOtherScales": [8], "dimOutput": 3}
    torch.save({"config": config, "netG": state}, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match="missing keys: toRGBLayers.1.module.bias"):
        load_pggan_checkpoint(tmp_path / "short.pth", "netG")
    with pytest.raises(CheckpointError, match="no 'avgG' generator"):
        load_pggan_checkpoint(tmp_path / "short.pth")


def test_random_init_is_seeded_and_tagged():
    config = PGGANConfig.for_resolution(8, 8, 8)
    first, provenance = load_fashion_generator(None, config, seed=3)
    second, _ = load_fashion_generator(None, config, seed=3)
    assert provenance == {"weights": "random-init", "random_init": True, "seed": 3}
    latents = torch.randn(1, 8)
    with torch.no_grad():
        assert torch.equal(first(latents), second(latents))


def test_postprocess_maps_minus_one_to_one_onto_uint8_as_the_official_code():
    image = torch.tensor([-1.5, -1.0, 0.0, 0.004, 0.5, 1.0, 2.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = PGGANPostprocess()(image)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 7, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 128, 191, 255, 255]  # round(x * 127.5 + 127.5)
