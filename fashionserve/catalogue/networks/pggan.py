"""Progressive-growing GAN generator at its final resolution, in the pytorch_GAN_zoo `PGAN` layout.

Our own code; `state_dict` keys and shapes equal the zoo's `GNet` (`formatLayer.module.weight`,
`groupScale0.0.module.*`, `scaleLayers.<i>.<j>.module.*`, `toRGBLayers.<k>.module.*`), so the `netG` or
`avgG` entry of a zoo checkpoint loads strictly, with the architecture read from the checkpoint's stored
config. The zoo's math: pixel norm on the latent and after every conv, LeakyReLU(0.2), nearest x2
upsampling, a linear 1x1 toRGB (tanh only for the zoo's MSE/DCGAN losses), and equalized learning rate:
weights stored N(0, 1) and every layer's *output* (bias included) multiplied by sqrt(2 / fan_in) at run
time. `fold_equalized_lr` moves that constant into the weights and biases for export. A checkpoint saved
in the middle of a fade-in (alpha > 0) blends the upsampled previous-scale output as the zoo does.
"""

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.checkpoints import CheckpointError, load_strict
from fashionserve.onnx_export import rsqrt_with_epsilon

DEPTH_SCALES = (512, 512, 512, 512, 256, 128, 64, 32, 16)  # zoo default depths for 4x4 ... 1024x1024
ZOO_CONFIG_CLASS = "models.utils.config.BaseConfig"  # what a zoo checkpoint pickles as its config
_TANH_LOSSES = ("MSE", "DCGAN")  # zoo losses whose generator ends in tanh; WGANGP (default) is linear
GENERATOR_KEYS = ("avgG", "netG")  # the EMA generator first: it is what the zoo samples with
_PIXEL_NORM_EPSILON = 1e-8


@dataclass(frozen=True)
class PGGANConfig:
    """Generator architecture. Defaults: the zoo's 512x512 configuration (scale 0 + 7 added scales)."""

    latent_dim: int = 512
    depth_scale0: int = 512
    depth_other_scales: tuple[int, ...] = DEPTH_SCALES[1:8]
    dim_output: int = 3
    leaky_relu_leak: float = 0.2
    pixel_norm: bool = True
    equalized_lr: bool = True
    alpha: float = 0.0
    tanh: bool = False

    @property
    def resolution(self) -> int:
        return 4 * 2 ** len(self.depth_other_scales)

    @classmethod
    def for_resolution(cls, resolution: int, max_channels: int = 512, latent_dim: int = 512) -> "PGGANConfig":
        """The zoo's default depths up to `resolution` (a power of two, 4..1024), capped at `max_channels`."""
        scales = int(math.log2(resolution)) - 2 if resolution >= 4 else -1
        if scales < 0 or 4 * 2**scales != resolution or scales >= len(DEPTH_SCALES):
            raise ValueError(f"resolution must be a power of two from 4 to 1024, got {resolution}")
        depths = tuple(min(d, max_channels) for d in DEPTH_SCALES[: scales + 1])
        return cls(latent_dim=latent_dim, depth_scale0=depths[0], depth_other_scales=depths[1:])

    @classmethod
    def from_zoo(cls, config: Mapping) -> "PGGANConfig":
        """The architecture from a zoo checkpoint's stored config (attribute names as the zoo's)."""
        required = ("latentVectorDim", "depthScale0", "depthOtherScales", "dimOutput")
        missing = [key for key in required if key not in config]
        if missing:
            raise CheckpointError(f"the checkpoint's config lacks {', '.join(missing)}")
        return cls(
            latent_dim=int(config["latentVectorDim"]),
            depth_scale0=int(config["depthScale0"]),
            depth_other_scales=tuple(int(d) for d in config["depthOtherScales"]),
            dim_output=int(config["dimOutput"]),
            leaky_relu_leak=float(config.get("leakyReluLeak", 0.2)),
            pixel_norm=bool(config.get("perChannelNormalization", True)),
            equalized_lr=bool(config.get("equalizedlR", True)),
            alpha=float(config.get("alpha", 0.0)),
            tanh=config.get("lossCriterion", "WGANGP") in _TANH_LOSSES,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "depth_other_scales": list(self.depth_other_scales)}


class EqualizedLayer(nn.Module):
    """A conv/linear layer whose output is scaled by He's constant (zoo `ConstrainedLayer`); the
    wrapped layer sits under `.module` as in the zoo's keys."""

    def __init__(self, module: nn.Conv2d | nn.Linear, equalized: bool):
        super().__init__()
        self.module = module
        self.scale = 1.0
        if equalized:  # zoo initialization: weights N(0, 1), biases 0, constant applied at run time
            nn.init.normal_(module.weight)
            nn.init.zeros_(module.bias)
            self.scale = math.sqrt(2.0 / module.weight[0].numel())

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x) * self.scale if self.scale != 1.0 else self.module(x)

    @torch.no_grad()
    def fold(self) -> None:
        """Move the run-time constant into weight and bias (the zoo scales the bias too)."""
        self.module.weight.mul_(self.scale)
        self.module.bias.mul_(self.scale)
        self.scale = 1.0


def _pixel_norm(x: Tensor) -> Tensor:
    return x * rsqrt_with_epsilon(x.square().mean(dim=1, keepdim=True), _PIXEL_NORM_EPSILON)


def _upscale(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class PGGANGenerator(nn.Module):
    """Latents [N, latent_dim] ~ N(0, I) -> images [N, dim_output, R, R], nominally in [-1, 1]."""

    def __init__(self, config: PGGANConfig = PGGANConfig()):
        super().__init__()
        self.config = config
        eq = config.equalized_lr
        depths = (config.depth_scale0, *config.depth_other_scales)
        # camelCase attribute names: they are the zoo's state_dict keys
        self.formatLayer = EqualizedLayer(nn.Linear(config.latent_dim, 16 * depths[0]), eq)
        self.groupScale0 = nn.ModuleList([EqualizedLayer(nn.Conv2d(depths[0], depths[0], 3, padding=1), eq)])
        self.scaleLayers = nn.ModuleList(
            nn.ModuleList(
                [
                    EqualizedLayer(nn.Conv2d(previous, depth, 3, padding=1), eq),
                    EqualizedLayer(nn.Conv2d(depth, depth, 3, padding=1), eq),
                ]
            )
            for previous, depth in zip(depths, depths[1:], strict=False)
        )
        self.toRGBLayers = nn.ModuleList(
            EqualizedLayer(nn.Conv2d(depth, config.dim_output, 1), eq) for depth in depths
        )

    def _activate(self, x: Tensor) -> Tensor:
        x = F.leaky_relu(x, self.config.leaky_relu_leak)
        return _pixel_norm(x) if self.config.pixel_norm else x

    def forward(self, latents: Tensor) -> Tensor:
        config = self.config
        x = _pixel_norm(latents) if config.pixel_norm else latents
        x = self._activate(self.formatLayer(x).reshape(-1, config.depth_scale0, 4, 4))
        x = self._activate(self.groupScale0[0](x))
        fade = None
        if config.alpha > 0 and len(self.scaleLayers) == 1:
            fade = _upscale(self.toRGBLayers[-2](x))
        for index, group in enumerate(self.scaleLayers):
            x = _upscale(x)
            for conv in group:
                x = self._activate(conv(x))
            if config.alpha > 0 and index == len(self.scaleLayers) - 2:
                fade = _upscale(self.toRGBLayers[-2](x))
        x = self.toRGBLayers[-1](x)
        if fade is not None:
            x = config.alpha * fade + (1.0 - config.alpha) * x
        return torch.tanh(x) if config.tanh else x

    def fold_equalized_lr(self) -> None:
        """Fold every layer's equalized-LR constant into its weights (outputs unchanged)."""
        for layer in self.modules():
            if isinstance(layer, EqualizedLayer):
                layer.fold()


def minibatch_stddev(x: Tensor, group_size: int = 4) -> Tensor:
    """The paper's minibatch standard deviation: within each group of `group_size` consecutive samples,
    the std of every feature (biased, as the official code), averaged to one number, appended as one
    more constant feature map. A batch that does not split evenly forms one group."""
    batch, channels, height, width = x.shape
    group = min(group_size, batch)
    if batch % group:
        group = batch
    grouped = x.reshape(batch // group, group, channels, height, width)
    std = (grouped.var(dim=1, unbiased=False) + _PIXEL_NORM_EPSILON).sqrt()  # [G, C, H, W]
    feature = std.mean(dim=(1, 2, 3)).repeat_interleave(group)  # [N]
    return torch.cat([x, feature[:, None, None, None].expand(-1, 1, height, width)], dim=1)


class PGGANDiscriminator(nn.Module):
    """The critic of progressive growing, in the pytorch_GAN_zoo `DNet` layout (`fromRGBLayers.<k>`,
    `scaleLayers.<i>.<j>`, `groupScaleZero.{0,1}`, `decisionLayer`, each `.module.*`): images
    [N, dim_output, R, R] -> scores [N, 1]. Mirrors the generator: 1x1 fromRGB, per added scale two 3x3
    convs and 2x2 average pooling, then minibatch stddev (groups of `minibatch_group`; None: off), a 3x3
    conv and a 4x4 dense layer at 4x4, no normalization. `alpha` > 0 blends in the fromRGB of the
    half-size image (fade-in, zoo convention: 1 = old path only)."""

    def __init__(self, config: PGGANConfig, minibatch_group: int | None = 4):
        super().__init__()
        self.config = config
        self.minibatch_group = minibatch_group
        self.alpha = 0.0
        eq = config.equalized_lr
        depths = (config.depth_scale0, *config.depth_other_scales)
        self.fromRGBLayers = nn.ModuleList(
            EqualizedLayer(nn.Conv2d(config.dim_output, depth, 1), eq) for depth in depths
        )
        self.scaleLayers = nn.ModuleList(
            nn.ModuleList(
                [
                    EqualizedLayer(nn.Conv2d(depth, depth, 3, padding=1), eq),
                    EqualizedLayer(nn.Conv2d(depth, previous, 3, padding=1), eq),
                ]
            )
            for previous, depth in zip(depths, depths[1:], strict=False)
        )
        entry = depths[0] + (0 if minibatch_group is None else 1)
        self.groupScaleZero = nn.ModuleList(
            [
                EqualizedLayer(nn.Conv2d(entry, depths[0], 3, padding=1), eq),
                EqualizedLayer(nn.Linear(16 * depths[0], depths[0]), eq),
            ]
        )
        self.decisionLayer = EqualizedLayer(nn.Linear(depths[0], 1), eq)

    def _activate(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.config.leaky_relu_leak)

    def forward(self, images: Tensor) -> Tensor:
        x = self._activate(self.fromRGBLayers[-1](images))
        for index, group in enumerate(reversed(self.scaleLayers)):
            for conv in group:
                x = self._activate(conv(x))
            x = F.avg_pool2d(x, 2)
            if index == 0 and self.alpha > 0:
                old = self._activate(self.fromRGBLayers[-2](F.avg_pool2d(images, 2)))
                x = self.alpha * old + (1.0 - self.alpha) * x
        if self.minibatch_group is not None:
            x = minibatch_stddev(x, self.minibatch_group)
        x = self._activate(self.groupScaleZero[0](x))
        x = self._activate(self.groupScaleZero[1](x.flatten(1)))
        return self.decisionLayer(x)


class ZooConfig:
    """Stand-in for the zoo's pickled `BaseConfig` (an attribute bag), so that a zoo checkpoint loads
    with `weights_only=True` without the zoo's code."""


def _legacy_key(key: str, expected: Mapping[str, Tensor]) -> str:
    """Old zoo files store `<layer>.weight` for `<layer>.module.weight` (the zoo's own compat rule)."""
    head, _, leaf = key.rpartition(".")
    modern = f"{head}.module.{leaf}"
    return modern if key not in expected and modern in expected else key


def load_pggan_checkpoint(path: Path, generator: str = "avgG") -> PGGANGenerator:
    """The generator of a zoo-layout checkpoint ({'config', 'netG', 'avgG', ...}), built from its stored
    config (the zoo's pickled BaseConfig or a plain dict) and loaded strictly; `generator` picks avgG
    (the moving average the zoo samples with) or netG."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if generator not in GENERATOR_KEYS:
        raise CheckpointError(f"generator must be one of {', '.join(GENERATOR_KEYS)}, got {generator!r}")
    try:
        with torch.serialization.safe_globals([(ZooConfig, ZOO_CONFIG_CLASS)]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, ...)
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {detail})"
        ) from exc
    if not isinstance(loaded, dict) or not any(key in loaded for key in GENERATOR_KEYS):
        raise CheckpointError(f"{path}: not a PGAN checkpoint (expected a dict with 'netG' or 'avgG')")
    if generator not in loaded:
        raise CheckpointError(f"{path}: the checkpoint has no '{generator}' generator")
    stored = loaded.get("config")
    if isinstance(stored, ZooConfig):
        stored = vars(stored)
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: the checkpoint has no stored 'config' to build the generator from")
    network = PGGANGenerator(PGGANConfig.from_zoo(stored))
    expected = network.state_dict()
    state_dict = {_legacy_key(key, expected): value for key, value in loaded[generator].items()}
    load_strict(network, state_dict, f"{path.name} ({generator})")
    return network
