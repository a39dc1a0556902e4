"""StyleGAN2 generator in plain PyTorch, with module names matching rosinality's `g_ema` checkpoints.

The arithmetic follows rosinality/stylegan2-pytorch `model.py` (equalized learning rate, mapping network
with lr_mul 0.01, weight demodulation with eps 1e-8, leaky ReLU 0.2 scaled by sqrt(2), the [1, 3, 3, 1]
FIR filter on every upsampling) without its custom CUDA ops: the FIR filters are depthwise convolutions
and transposed convolutions, so the graph exports to ONNX with a dynamic batch and runs anywhere.
Synthesis is deterministic: per-layer noise is the stored `noises.noise_i` buffers (randomize_noise off).

Partial synthesis follows HairFastGAN's copy of the generator (AIRI-Institute/HairFastGAN
`models/stylegan2/model.py` @ 49e98019c9243d1991c19d45764fc3340a498de2, `forward(start_layer, end_layer,
layer_in)`): "block" b is that code's "layer" b. Block 0 is the 4 px constant, conv1 and to_rgb1; block
b >= 1 is the b-th resolution level (8 px, 16 px, ... size), an upsampling conv, a conv and a to_rgb reading
W+ entries 2b-1, 2b, 2b+1 and noises 2b-1, 2b. Starting at block b >= 1 feeds `layer_in` (the block's input
features, 2**(b+1) px) to its upsampling conv and starts the RGB skip afresh at that block's to_rgb, as the
public code does (its `skip` argument stays None). HairFastGAN's F tensor is the output of block 3
(512 x 32 x 32 at 1024 px); it regenerates from blocks 4 and 5.
"""

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.checkpoints import load_strict, read_checkpoint, state_dict_of
from fashionserve.onnx_export import rsqrt_with_epsilon

BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)
LEAKY_SLOPE = 0.2
ACTIVATION_GAIN = math.sqrt(2.0)  # keeps the activation variance of leaky ReLU 0.2 near 1
DEMODULATION_EPS = 1e-8
PIXEL_NORM_EPS = 1e-8
MAPPING_LR_MUL = 0.01
MAX_SIZE = 1024  # the reference channel table ends at 1024


def blur_kernel(gain: float = 1.0) -> Tensor:
    """Separable 4x4 FIR kernel from BLUR_TAPS, normalized to sum `gain` (4 after a 2x upsampling,
    which keeps the mean of the zero-stuffed signal)."""
    taps = torch.tensor(BLUR_TAPS)
    kernel = torch.outer(taps, taps)
    return kernel * (gain / kernel.sum())


def fused_leaky_relu(x: Tensor, bias: Tensor) -> Tensor:
    """Per-channel bias (dim 1), leaky ReLU 0.2, times sqrt(2): rosinality's FusedLeakyReLU."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    return F.leaky_relu(x + bias.view(shape), LEAKY_SLOPE) * ACTIVATION_GAIN


def pixel_norm(x: Tensor) -> Tensor:
    """x / sqrt(mean(x^2 over dim 1) + 1e-8); on a [N, L, C] W+ latent dim 1 is the layer axis."""
    return x * rsqrt_with_epsilon(x.square().mean(dim=1, keepdim=True), PIXEL_NORM_EPS)


class PixelNorm(nn.Module):
    """rosinality's PixelNorm: `pixel_norm` as a module."""

    def forward(self, x: Tensor) -> Tensor:
        return pixel_norm(x)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate: weight stored as N(0, 1) / lr_mul and scaled by
    lr_mul / sqrt(in_dim) at run time, bias scaled by lr_mul; optional fused leaky ReLU."""

    def __init__(
        self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0, activation: bool = False
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class Blur(nn.Module):
    """FIR filter with zero padding (pad0 before, pad1 after, both axes) as a depthwise convolution:
    rosinality's upfirdn2d with up = down = 1."""

    def __init__(self, pad: tuple[int, int], gain: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", blur_kernel(gain))
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        x = F.pad(x, (self.pad[0], self.pad[1], self.pad[0], self.pad[1]))
        # The kernel is symmetric, so correlation (conv2d) equals upfirdn2d's true convolution.
        return F.conv2d(x, self.kernel.expand(channels, 1, -1, -1), groups=channels)


class Upsample(nn.Module):
    """2x upsampling with the FIR filter: rosinality's upfirdn2d(up=2, pad=(2, 1)), written as a depthwise
    transposed convolution with stride 2 whose padding 1 crops the same border."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", blur_kernel(gain=4.0))

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        weight = self.kernel.expand(channels, 1, -1, -1)
        return F.conv_transpose2d(x, weight, stride=2, padding=1, groups=channels)


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution (optionally demodulated, optionally 2x upsampling).

    The reference folds each sample's style into the weights and runs a grouped convolution with
    groups=batch. Here the style scales the input channels and the demodulation scales the output
    channels instead (the reference's own `fused=False` form, mathematically identical): the weights stay
    shared, so the ONNX graph has ordinary Conv nodes and a truly dynamic batch.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size))
        if upsample:
            # Transposed conv (stride 2) of a 3x3 kernel gives 2H+1; pad (1, 1) and the 4x4 filter give 2H.
            self.blur = Blur(pad=(1, 1), gain=4.0)
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1.0)
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.padding = kernel_size // 2
        self.demodulate = demodulate
        self.upsample = upsample

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        style = self.modulation(w)  # [N, in]
        weight = self.weight[0] * self.scale  # [out, in, k, k]
        x = x * style[:, :, None, None]
        if self.upsample:
            out = self.blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2))
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # 1 / ||weight * style|| per sample and output channel: sum_i style_i^2 * sum_k weight_oik^2.
            squared_norm = style.square() @ weight.square().sum(dim=(2, 3)).t()  # [N, out]
            out = out * rsqrt_with_epsilon(squared_norm, DEMODULATION_EPS)[:, :, None, None]
        return out


class NoiseInjection(nn.Module):
    """Adds weight * noise; the noise image is given (the generator's stored buffer)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, noise: Tensor) -> Tensor:
        return x + self.weight * noise


class FusedLeakyReLU(nn.Module):
    """Learned per-channel bias, then leaky ReLU 0.2 times sqrt(2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return fused_leaky_relu(x, self.bias)


class ConstantInput(nn.Module):
    """The learned 4x4 constant that synthesis starts from, repeated over the batch."""

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch_like: Tensor) -> Tensor:
        return self.input.expand(batch_like.shape[0], -1, -1, -1)


class StyledConv(nn.Module):
    """Modulated 3x3 convolution, noise, bias and activation."""

    def __init__(self, in_channels: int, out_channels: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x: Tensor, w: Tensor, noise: Tensor) -> Tensor:
        return self.activate(self.noise(self.conv(x, w), noise))


class ToRGB(nn.Module):
    """Modulated 1x1 convolution to RGB (not demodulated) plus bias, added to the upsampled skip image."""

    def __init__(self, in_channels: int, style_dim: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, w: Tensor, skip: Tensor | None = None) -> Tensor:
        out = self.conv(x, w) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


def expand_latent_avg(latent_avg: Tensor, n_latent: int, style_dim: int) -> Tensor:
    """An average latent as W+ [n_latent, style_dim]: accepts [style_dim], [1, style_dim],
    [n_latent, style_dim] or [1, n_latent, style_dim] (the shapes that broadcast onto a W+ batch);
    anything else raises ValueError."""
    latent_avg = latent_avg.detach().float()
    if latent_avg.dim() == 3 and latent_avg.shape[0] == 1:
        latent_avg = latent_avg[0]
    if latent_avg.dim() == 1:
        latent_avg = latent_avg.unsqueeze(0)
    if latent_avg.dim() != 2 or latent_avg.shape[0] not in (1, n_latent) or latent_avg.shape[1] != style_dim:
        raise ValueError(
            f"latent_avg must be [{style_dim}], [1, {style_dim}], [{n_latent}, {style_dim}] or "
            f"[1, {n_latent}, {style_dim}], got {list(latent_avg.shape)}"
        )
    return latent_avg.expand(n_latent, -1).clone()


def channel_width(resolution: int, channel_multiplier: int, channel_max: int) -> int:
    """Feature channels at a resolution: the reference table (512 up to 32 px, then 256 * multiplier at
    64 px, halving with every doubling), capped at channel_max."""
    return min(channel_max, 512, 16384 * channel_multiplier // resolution)


class StyleGAN2Generator(nn.Module):
    """rosinality's `Generator` (state_dict keys and shapes of `g_ema`), synthesis from W+ only.

    Weights are drawn like the reference (N(0, 1) weights, zero biases, modulation bias 1, zero noise
    strength, N(0, 1) noise buffers): seed torch before constructing for reproducible random-init.
    `channel_max` caps every width (512 = public) so tests can run small.
    """

    def __init__(
        self,
        size: int = 1024,
        style_dim: int = 512,
        n_mlp: int = 8,
        channel_multiplier: int = 2,
        channel_max: int = 512,
    ):
        super().__init__()
        log_size = int(math.log2(size)) if size > 0 else 0
        if not 8 <= size <= MAX_SIZE or 2**log_size != size:
            raise ValueError(f"size must be a power of two from 8 to {MAX_SIZE}, got {size}")
        self.size = size
        self.style_dim = style_dim
        self.n_latent = 2 * log_size - 2
        self.num_layers = 2 * (log_size - 2) + 1  # styled convs, each with its noise buffer

        def width(resolution: int) -> int:
            return channel_width(resolution, channel_multiplier, channel_max)

        self.style = nn.Sequential(
            PixelNorm(),
            *(
                EqualLinear(style_dim, style_dim, lr_mul=MAPPING_LR_MUL, activation=True)
                for _ in range(n_mlp)
            ),
        )
        self.input = ConstantInput(width(4))
        self.conv1 = StyledConv(width(4), width(4), style_dim)
        self.to_rgb1 = ToRGB(width(4), style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        for level in range(3, log_size + 1):
            in_channels, out_channels = width(2 ** (level - 1)), width(2**level)
            self.convs.append(StyledConv(in_channels, out_channels, style_dim, upsample=True))
            self.convs.append(StyledConv(out_channels, out_channels, style_dim))
            self.to_rgbs.append(ToRGB(out_channels, style_dim))
        self.noises = nn.Module()
        for index in range(self.num_layers):
            resolution = 2 ** ((index + 5) // 2)  # 4, 8, 8, 16, 16, ...
            self.noises.register_buffer(f"noise_{index}", torch.randn(1, 1, resolution, resolution))

    def mapping(self, z: Tensor) -> Tensor:
        """Z [N, style_dim] -> W [N, style_dim] (pixel norm, then the MLP)."""
        return self.style(z)

    @torch.no_grad()
    def mean_latent(self, n_samples: int = 4096, seed: int = 0) -> Tensor:
        """Average W of n_samples seeded N(0, 1) z vectors, [1, style_dim] (truncation centre)."""
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(n_samples, self.style_dim, generator=generator).to(self.input.input.device)
        return self.mapping(z).mean(dim=0, keepdim=True)

    @property
    def n_blocks(self) -> int:
        """Resolution blocks after the 4 px block 0 (8 at 1024 px): the last block index."""
        return len(self.to_rgbs)

    def _run_blocks(
        self, w_plus: Tensor, layer_in: Tensor | None, start_block: int, end_block: int
    ) -> tuple[Tensor, Tensor]:
        """Blocks start_block..end_block: (features after end_block, RGB skip accumulated since start)."""
        if not 0 <= start_block <= end_block <= self.n_blocks:
            raise ValueError(
                f"need 0 <= start_block <= end_block <= {self.n_blocks}, got {start_block} and {end_block}"
            )
        if (layer_in is None) != (start_block == 0):
            raise ValueError("layer_in is required when (and only when) start_block > 0")
        noises = [getattr(self.noises, f"noise_{index}") for index in range(self.num_layers)]
        skip = None
        if start_block == 0:
            out = self.conv1(self.input(w_plus), w_plus[:, 0], noises[0])
            skip = self.to_rgb1(out, w_plus[:, 1])
        else:
            out = layer_in
        for block in range(max(start_block, 1), end_block + 1):
            first = 2 * block - 1  # latent and noise index of this block's upsampling conv
            out = self.convs[first - 1](out, w_plus[:, first], noises[first])
            out = self.convs[first](out, w_plus[:, first + 1], noises[first + 1])
            skip = self.to_rgbs[block - 1](out, w_plus[:, first + 2], skip)
        return out, skip

    def synthesis(self, w_plus: Tensor, layer_in: Tensor | None = None, start_block: int = 0) -> Tensor:
        """W+ [N, n_latent, style_dim] -> image [N, 3, size, size], about [-1, 1]. Deterministic.
        With start_block b >= 1, `layer_in` [N, C, 2**(b+1), 2**(b+1)] replaces the output of block b-1
        (HairFastGAN: start_layer=b, end_layer=8 at 1024 px)."""
        return self._run_blocks(w_plus, layer_in, start_block, self.n_blocks)[1]

    def features(
        self, w_plus: Tensor, end_block: int, layer_in: Tensor | None = None, start_block: int = 0
    ) -> Tensor:
        """Features after block `end_block` [N, C, 2**(end_block+2), same] (HairFastGAN's intermediate
        output: start_layer=start_block, end_layer=end_block; F is end_block 3)."""
        return self._run_blocks(w_plus, layer_in, start_block, end_block)[0]

    def forward(self, w_plus: Tensor) -> Tensor:
        return self.synthesis(w_plus)


class PartialSynthesis(nn.Module):
    """One fixed slice of the generator as a module (for export): forward(w_plus[, layer_in]) runs blocks
    start_block..end_block and returns the features after end_block, or with end_block None the image."""

    def __init__(self, generator: StyleGAN2Generator, start_block: int = 0, end_block: int | None = None):
        super().__init__()
        last = generator.n_blocks if end_block is None else end_block
        if not 0 <= start_block <= last <= generator.n_blocks:
            raise ValueError(f"need 0 <= start_block <= end_block <= {generator.n_blocks}")
        self.generator = generator
        self.start_block = start_block
        self.end_block = end_block

    def forward(self, w_plus: Tensor, layer_in: Tensor | None = None) -> Tensor:
        if self.end_block is None:
            return self.generator.synthesis(w_plus, layer_in, self.start_block)
        return self.generator.features(w_plus, self.end_block, layer_in, self.start_block)


def load_stylegan2_checkpoint(path: Path, generator: StyleGAN2Generator | None = None) -> StyleGAN2Generator:
    """Strictly load a rosinality checkpoint (a dict whose `g_ema` is the generator; training checkpoints'
    `args` Namespace is allowed) or a bare generator state dict into `generator` (default: the public
    1024 px configuration). Raises CheckpointError naming missing, unexpected and mis-shaped keys."""
    generator = generator if generator is not None else StyleGAN2Generator()
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = read_checkpoint(path)
    if isinstance(loaded, dict) and "g_ema" in loaded:
        state_dict = state_dict_of(loaded["g_ema"], f"{path} (g_ema)")
    else:
        state_dict = state_dict_of(loaded, str(path))
    load_strict(generator, state_dict, f"StyleGAN2 checkpoint {path}")
    return generator.eval()
