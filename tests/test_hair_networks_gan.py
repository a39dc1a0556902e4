"""Hair GANs: StyleGAN2 generator and e4e encoder; public key layout, arithmetic against straightforward
re-computations, strict checkpoint loading and ONNX export parity."""

import argparse
import math
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fashionserve.checkpoints import CheckpointError
from fashionserve.hair.networks.encoder import Encoder4Editing, load_e4e_checkpoint
from fashionserve.hair.networks.stylegan2 import (
    Blur,
    EqualLinear,
    FusedLeakyReLU,
    ModulatedConv2d,
    StyleGAN2Generator,
    Upsample,
    load_stylegan2_checkpoint,
)
from fashionserve.onnx_export import export_onnx, max_abs_error, run_onnx
from tests.test_networks import read_listing

HAIR = Path(__file__).parent.parent / "fashionserve" / "hair" / "networks"
SMALL_GENERATOR = dict(size=32, style_dim=16, channel_max=16)


def keys_and_shapes(module: torch.nn.Module) -> list[tuple[str, list[int]]]:
    return [(key, list(value.shape)) for key, value in module.state_dict().items()]


def reference_upfirdn2d(x: Tensor, kernel: Tensor, up: int, pad: tuple[int, int]) -> Tensor:
    """upfirdn2d by its definition: insert up-1 zeros after every sample, zero-pad (pad0 before, pad1
    after) on both axes, then true convolution (flipped kernel) summed tap by tap, no downsampling."""
    batch, channels, height, width = x.shape
    stuffed = x.new_zeros(batch, channels, height * up, width * up)
    stuffed[:, :, ::up, ::up] = x
    padded = x.new_zeros(batch, channels, height * up + sum(pad), width * up + sum(pad))
    padded[:, :, pad[0] : pad[0] + height * up, pad[0] : pad[0] + width * up] = stuffed
    taps = kernel.shape[0]
    out_h, out_w = padded.shape[2] - taps + 1, padded.shape[3] - taps + 1
    out = x.new_zeros(batch, channels, out_h, out_w)
    flipped = kernel.flip(0, 1)
    for row in range(taps):
        for col in range(taps):
            out += flipped[row, col] * padded[:, :, row : row + out_h, col : col + out_w]
    return out


def reference_modulated_conv(conv: ModulatedConv2d, x: Tensor, w: Tensor) -> Tensor:
    """The reference's per-sample formulation: weight' = weight / sqrt(fan_in) * style, demodulated by
    rsqrt(sum weight'^2 + 1e-8), one ordinary convolution per sample (upsampling: transposed conv with
    stride 2, then the [1,3,3,1] filter times 4 with pad (1, 1))."""
    out_channels, in_channels, k = conv.weight.shape[1], conv.weight.shape[2], conv.weight.shape[3]
    style = w @ (conv.modulation.weight / math.sqrt(w.shape[1])).t() + conv.modulation.bias
    outputs = []
    for sample in range(x.shape[0]):
        weight = conv.weight[0] / math.sqrt(in_channels * k * k) * style[sample].view(1, -1, 1, 1)
        if conv.demodulate:
            weight = weight / torch.sqrt(weight.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        if conv.upsample:
            out = F.conv_transpose2d(x[sample : sample + 1], weight.transpose(0, 1), stride=2)
            taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
            out = reference_upfirdn2d(out, torch.outer(taps, taps) / 64 * 4, up=1, pad=(1, 1))
        else:
            out = F.conv2d(x[sample : sample + 1], weight, padding=k // 2)
        assert out.shape[1] == out_channels
        outputs.append(out)
    return torch.cat(outputs)


def leaky(x: Tensor) -> Tensor:
    return torch.where(x >= 0, x, 0.2 * x) * math.sqrt(2)


def reference_synthesis(generator: StyleGAN2Generator, w_plus: Tensor) -> Tensor:
    """Synthesis wired by hand from the parameters: conv1 at 4 px with latent 0 and noise 0, to_rgb1 with
    latent 1, then per resolution an upsampling conv, a conv and a to_rgb whose skip is the previous RGB
    upsampled with the FIR filter (pad (2, 1), kernel times 4)."""

    def styled(conv, x, latent, noise):
        out = reference_modulated_conv(conv.conv, x, latent) + conv.noise.weight * noise
        return leaky(out + conv.activate.bias.view(1, -1, 1, 1))

    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    upsample_kernel = torch.outer(taps, taps) / 64 * 4
    noises = [getattr(generator.noises, f"noise_{i}") for i in range(generator.num_layers)]
    x = generator.input.input.repeat(w_plus.shape[0], 1, 1, 1)
    x = styled(generator.conv1, x, w_plus[:, 0], noises[0])
    rgb = reference_modulated_conv(generator.to_rgb1.conv, x, w_plus[:, 1]) + generator.to_rgb1.bias
    for level in range(len(generator.to_rgbs)):
        index = 2 * level + 1
        x = styled(generator.convs[index - 1], x, w_plus[:, index], noises[index])
        x = styled(generator.convs[index], x, w_plus[:, index + 1], noises[index + 1])
        to_rgb = generator.to_rgbs[level]
        rgb = (
            reference_modulated_conv(to_rgb.conv, x, w_plus[:, index + 2])
            + to_rgb.bias
            + reference_upfirdn2d(rgb, upsample_kernel, up=2, pad=(2, 1))
        )
    return rgb


def randomize_zero_initialized(module: torch.nn.Module, seed: int) -> None:
    """Give the zero/one-initialized parameters (biases, noise strengths) random values so that tests see
    every term of the arithmetic."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith(("bias", "noise.weight")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3 + parameter)


def small_generator(seed: int = 0, **options) -> StyleGAN2Generator:
    torch.manual_seed(seed)
    generator = StyleGAN2Generator(**{**SMALL_GENERATOR, **options}).eval()
    randomize_zero_initialized(generator, seed)
    return generator


# --- StyleGAN2 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1024, 256])
def test_generator_state_dict_matches_public_listing(size):
    listing = read_listing(HAIR / "stylegan2_state_dict_keys.txt")
    assert sorted(listing) == ["g_ema_1024", "g_ema_256"]
    assert len(listing["g_ema_1024"]) == 171 and len(listing["g_ema_256"]) == 135
    with torch.device("meta"):  # shapes only
        generator = StyleGAN2Generator(size=size)
    assert keys_and_shapes(generator) == listing[f"g_ema_{size}"]
    assert generator.n_latent == {1024: 18, 256: 14}[size]
    assert sum(p.numel() for p in generator.parameters()) == {1024: 30_370_060, 256: 30_034_338}[size]


def test_fir_kernels_are_the_normalized_1331_filter():
    generator = StyleGAN2Generator(**SMALL_GENERATOR)
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    expected = torch.outer(taps, taps) / 16  # sums to 4 after 2x upsampling
    state = generator.state_dict()
    kernels = [key for key in state if key.endswith("kernel")]
    assert len(kernels) == 2 * 3  # one upsampling conv and one RGB upsample per level above 4 px
    for key in kernels:
        assert torch.equal(state[key], expected), key


def test_blur_and_upsample_equal_upfirdn2d_by_definition():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6)
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = torch.outer(taps, taps) / 64
    upsampled = Upsample()(x)
    assert upsampled.shape == (2, 3, 10, 12)
    torch.testing.assert_close(upsampled, reference_upfirdn2d(x, kernel * 4, up=2, pad=(2, 1)))
    for pad, gain in [((1, 1), 4.0), ((2, 1), 1.0), ((1, 2), 1.0)]:
        blurred = Blur(pad=pad, gain=gain)(x)
        torch.testing.assert_close(blurred, reference_upfirdn2d(x, kernel * gain, up=1, pad=pad))
    # A constant image stays constant away from the borders after 2x upsampling (kernel sum 4 = gain).
    torch.testing.assert_close(Upsample()(torch.ones(1, 1, 6, 6))[..., 2:-2, 2:-2], torch.ones(1, 1, 8, 8))


@pytest.mark.parametrize("style_scale", [1.0, 1e-4], ids=["normal", "tiny-style-eps-matters"])
@pytest.mark.parametrize(
    ("kernel_size", "demodulate", "upsample"),
    [(3, True, False), (3, True, True), (1, False, False)],
    ids=["conv", "upsampling-conv", "to-rgb"],
)
def test_modulated_conv_equals_per_sample_convolution(kernel_size, demodulate, upsample, style_scale):
    torch.manual_seed(0)
    conv = ModulatedConv2d(5, 4, kernel_size, style_dim=6, demodulate=demodulate, upsample=upsample)
    with torch.no_grad():
        conv.modulation.bias.mul_(style_scale)
        conv.modulation.weight.mul_(style_scale)
    x, w = torch.randn(3, 5, 7, 7), torch.randn(3, 6)
    with torch.no_grad():
        out = conv(x, w)
        expected = reference_modulated_conv(conv, x, w)
    assert out.shape == (3, 4, 14, 14) if upsample else (3, 4, 7, 7)
    scale = expected.abs().max()
    torch.testing.assert_close(out / scale, expected / scale, atol=2e-6, rtol=0)


def test_equal_linear_and_activation_constants():
    torch.manual_seed(0)
    linear = EqualLinear(8, 3, bias_init=0.5, lr_mul=0.01, activation=True)
    x = torch.randn(4, 8)
    # Stored weights are N(0, 1) / lr_mul; the effective weight is stored * lr_mul / sqrt(in_dim).
    assert 50 < linear.weight.std() < 200
    expected = x @ (linear.weight * 0.01 / math.sqrt(8)).t() + 0.5 * 0.01
    torch.testing.assert_close(linear(x), leaky(expected))
    plain = EqualLinear(8, 3, bias_init=1.0)
    torch.testing.assert_close(plain(x), x @ (plain.weight / math.sqrt(8)).t() + 1.0)

    activation = FusedLeakyReLU(2)
    with torch.no_grad():
        activation.bias.copy_(torch.tensor([0.0, 1.0]))
    out = activation(torch.tensor([[[[-1.0]], [[-3.0]]], [[[2.0]], [[0.5]]]]))
    expected = torch.tensor([[-0.2, -0.4], [2.0, 1.5]]) * math.sqrt(2)
    torch.testing.assert_close(out.flatten(1), expected)


def test_mapping_is_pixel_norm_then_eight_scaled_layers():
    generator = small_generator()
    z = torch.randn(3, 16) * 5
    x = z / torch.sqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
    for layer in list(generator.style)[1:]:
        x = leaky(x @ (layer.weight * 0.01 / 4).t() + layer.bias * 0.01)  # lr_mul 0.01, sqrt(16) = 4
    assert len(generator.style) == 9
    with torch.no_grad():
        torch.testing.assert_close(generator.mapping(z), x)


@pytest.mark.parametrize("options", [{}, {"channel_multiplier": 1, "size": 16}], ids=["32px", "16px-cm1"])
def test_synthesis_equals_hand_wired_reference(options):
    generator = small_generator(**options)
    w_plus = torch.randn(2, generator.n_latent, 16)
    with torch.no_grad():
        image = generator(w_plus)
        expected = reference_synthesis(generator, w_plus)
    assert image.shape == (2, 3, generator.size, generator.size)
    scale = expected.abs().max()
    torch.testing.assert_close(image / scale, expected / scale, atol=1e-5, rtol=0)


def test_synthesis_is_deterministic_per_sample_and_uses_the_noise_buffers():
    generator = small_generator()
    w_plus = torch.randn(3, generator.n_latent, 16)
    with torch.no_grad():
        batch = generator.synthesis(w_plus)
        torch.testing.assert_close(generator(w_plus[1:2]), batch[1:2], atol=1e-5, rtol=0)
        assert torch.equal(generator(w_plus), batch)
        generator.noises.noise_4.add_(1.0)  # 16 px, second conv
        changed = generator(w_plus)
    assert (changed - batch).abs().max() > 1e-3


def test_mean_latent_is_seeded():
    generator = small_generator()
    first, again, other = (
        generator.mean_latent(64, seed=3),
        generator.mean_latent(64, seed=3),
        generator.mean_latent(64),
    )
    assert first.shape == (1, 16) and torch.equal(first, again) and not torch.equal(first, other)


def test_generator_rejects_bad_sizes():
    for size in (4, 48, 2048):
        with pytest.raises(ValueError, match="power of two from 8 to 1024"):
            StyleGAN2Generator(size=size)


def test_stylegan2_checkpoint_in_rosinality_layout_loads_strictly(tmp_path):
    original = small_generator(seed=1)
    path = tmp_path / "stylegan2.pt"
    torch.save(
        {
            "g": original.state_dict(),
            "d": {"convs.0.0.weight": torch.zeros(1)},
            "g_ema": original.state_dict(),
            "g_optim": {"state": {}, "param_groups": [{"lr": 0.002}]},
            "args": argparse.Namespace(size=32, channel_multiplier=2),  # rosinality's train.py stores it
        },
        path,
    )
    fresh = small_generator(seed=2)
    assert not torch.equal(fresh.conv1.conv.weight, original.conv1.conv.weight)  # the load must change it
    loaded = load_stylegan2_checkpoint(path, fresh)
    assert loaded is fresh and not loaded.training
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    bare = tmp_path / "bare.pt"
    torch.save(original.state_dict(), bare)
    assert torch.equal(
        load_stylegan2_checkpoint(bare, small_generator(seed=3)).input.input, original.input.input
    )


def test_stylegan2_checkpoint_mismatch_names_keys(tmp_path):
    state = small_generator().state_dict()
    del state["noises.noise_2"]
    state["convs.0.conv.extra"] = torch.zeros(1)
    state["to_rgbs.1.conv.weight"] = torch.zeros(1, 3, 8, 1, 1)
    path = tmp_path / "bad.pt"
    torch.save({"g_ema": state}, path)
    with pytest.raises(CheckpointError) as info:
        load_stylegan2_checkpoint(path, small_generator())
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "missing keys: noises.noise_2" in message
    assert "unexpected keys: convs.0.conv.extra" in message
    assert "to_rgbs.1.conv.weight (expected [1, 3, 16, 1, 1], got [1, 3, 8, 1, 1])" in message
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_stylegan2_checkpoint(tmp_path / "text.pt", small_generator())


def test_generator_onnx_export_matches_pytorch_with_dynamic_batch(tmp_path):
    generator = small_generator()
    path = tmp_path / "stylegan2.onnx"
    example = torch.randn(2, generator.n_latent, 16)
    export_onnx(generator, (example,), path, ["w_plus"], ["image"], max_batch=4)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        w_plus = torch.randn(batch, generator.n_latent, 16)
        with torch.no_grad():
            expected = generator(w_plus)
        (actual,) = run_onnx(session, (w_plus,))
        assert actual.shape == (batch, 3, 32, 32)
        assert max_abs_error(expected, actual) < 1e-4 * float(expected.abs().max())


# --- e4e encoder -------------------------------------------------------------------------------------

SMALL_ENCODER = dict(size=32, style_dim=128, input_size=64, base_width=16, stage_units=(1, 2, 2, 1))


def small_encoder(seed: int = 0) -> Encoder4Editing:
    """Random weights, BatchNorm statistics and PReLU slopes, so eval-mode arithmetic is not an identity."""
    torch.manual_seed(seed)
    encoder = Encoder4Editing(**SMALL_ENCODER).eval()
    with torch.no_grad():
        for name, tensor in encoder.state_dict().items():
            if name.endswith(("running_mean", "bias")) or (tensor.dim() == 1 and name.endswith("weight")):
                tensor.uniform_(-0.5, 0.5)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
        encoder.set_latent_avg(torch.randn(128))
    return encoder


def test_encoder_state_dict_matches_public_listing():
    listing = read_listing(HAIR / "e4e_state_dict_keys.txt")
    assert list(listing) == ["encoder"] and len(listing["encoder"]) == 621
    with torch.device("meta"):  # shapes only: the public encoder has 267M parameters
        encoder = Encoder4Editing()
    assert keys_and_shapes(encoder) == listing["encoder"]
    assert sum(p.numel() for p in encoder.parameters()) == 267_136_704
    assert encoder.n_latent == 18 and encoder.taps == (6, 20, 23)  # e4e's fixed body indices
    assert "latent_avg" not in encoder.state_dict() and encoder.latent_avg.shape == (18, 512)


def test_encoder_equals_hand_wired_fpn_and_deltas():
    encoder = small_encoder()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        w_plus = encoder(x)
        features = encoder.input_layer(x)
        taps = {}
        for index, unit in enumerate(encoder.body):
            features = unit(features)
            taps[index] = features
        c1, c2, c3 = taps[2], taps[4], taps[5]  # ends of stages 2, 3, 4 for units (1, 2, 2, 1)
        assert (c1.shape[2], c2.shape[2], c3.shape[2]) == (16, 8, 4)  # input / 4, / 8, / 16

        def merge(top: Tensor, lateral: Tensor) -> Tensor:
            return F.interpolate(top, size=lateral.shape[2:], mode="bilinear", align_corners=True) + lateral

        middle = merge(c3, encoder.latlayer1(c2))
        fine = merge(middle, encoder.latlayer2(c1))
        base = encoder.styles[0](c3)
        sources = [c3] * 3 + [middle] * 4 + [fine]
        expected = [base] + [base + encoder.styles[i](sources[i]) for i in range(1, 8)]
        expected = torch.stack(expected, dim=1) + encoder.latent_avg
    assert w_plus.shape == (2, 8, 128)
    torch.testing.assert_close(w_plus, expected)
    assert (w_plus - encoder.latent_avg).abs().mean() > 1e-3


def test_ir_se_unit_and_style_block_arithmetic():
    encoder = small_encoder()
    unit = encoder.body[0]  # 16 -> 16 channels, stride 2: max-pool(1, 2) shortcut
    x = torch.randn(1, 16, 8, 8)
    res = unit.res_layer
    with torch.no_grad():
        out = res[4](res[3](res[2](res[1](res[0](x)))))
        gate = torch.sigmoid(res[5].fc2(torch.relu(res[5].fc1(out.mean(dim=(2, 3), keepdim=True)))))
        torch.testing.assert_close(unit(x), out * gate + x[:, :, ::2, ::2])
        block = encoder.styles[0]  # 4x4 -> 1x1: two stride-2 convs with leaky ReLU 0.01
        features = torch.randn(2, 128, 4, 4)
        hidden = features
        for conv in (block.convs[0], block.convs[2]):
            hidden = F.leaky_relu(conv(hidden), 0.01)
        expected = hidden.flatten(1) @ (block.linear.weight / math.sqrt(128)).t() + block.linear.bias
        torch.testing.assert_close(block(features), expected)
    assert len(block.convs) == 4


def test_encoder_latent_avg_shapes_and_validation():
    encoder = small_encoder()
    average = torch.randn(128)
    for shape in ([128], [1, 128], [8, 128]):
        encoder.set_latent_avg(average.expand(shape) if len(shape) > 1 else average)
        assert torch.equal(encoder.latent_avg, average.expand(8, 128))
    for bad in (torch.zeros(7, 128), torch.zeros(8, 64), torch.zeros(1, 1, 128)):
        with pytest.raises(ValueError, match="latent_avg"):
            encoder.set_latent_avg(bad)
    with pytest.raises(ValueError, match="num_layers must be one of"):
        Encoder4Editing(num_layers=100)
    with pytest.raises(ValueError, match="style_dim must equal"):
        Encoder4Editing(style_dim=256)
    with pytest.raises(ValueError, match="input_size must be a power of two"):
        Encoder4Editing(input_size=192)
    with pytest.raises(ValueError, match="base_width must be a multiple of 16"):
        Encoder4Editing(base_width=8, style_dim=64)


def e4e_checkpoint(encoder: Encoder4Editing, generator: StyleGAN2Generator, **extra) -> dict:
    """A dict in the public e4e layout: pSp's state_dict (encoder.* and decoder.*), latent_avg, opts."""
    state = {f"encoder.{key}": value for key, value in encoder.state_dict().items()}
    state |= {f"decoder.{key}": value for key, value in generator.state_dict().items()}
    latent_avg = encoder.latent_avg.clone()
    opts = {"encoder_type": "Encoder4Editing", "stylegan_size": 32, "start_from_latent_avg": True}
    return {"state_dict": state, "latent_avg": latent_avg, "opts": opts} | extra


def test_e4e_checkpoint_loads_encoder_generator_and_latent_avg(tmp_path):
    encoder, generator = small_encoder(seed=1), small_generator(seed=1, style_dim=128)
    path = tmp_path / "e4e.pt"
    training_state = {  # what e4e's coach adds with save_training_data: ignored by the loader
        "global_step": 1000,
        "best_val_loss": 0.25,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        "discriminator_state_dict": {"w_discriminator.0.weight": torch.zeros(2, 2)},
    }
    torch.save(e4e_checkpoint(encoder, generator, **training_state), path)
    fresh_encoder, fresh_generator = small_encoder(seed=2), small_generator(seed=2, style_dim=128)
    assert not torch.equal(fresh_encoder.latent_avg, encoder.latent_avg)
    loaded_encoder, loaded_generator = load_e4e_checkpoint(path, fresh_encoder, fresh_generator)
    assert loaded_encoder is fresh_encoder and loaded_generator is fresh_generator
    assert not loaded_encoder.training and not loaded_generator.training
    for original, loaded in ((encoder, loaded_encoder), (generator, loaded_generator)):
        for key, value in original.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded_encoder.latent_avg, encoder.latent_avg)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded_generator(loaded_encoder(x)), generator(encoder(x)))


def test_e4e_checkpoint_problems_are_named(tmp_path):
    encoder, generator = small_encoder(), small_generator(style_dim=128)

    def message(checkpoint: dict) -> str:
        path = tmp_path / "e4e.pt"
        torch.save(checkpoint, path)
        with pytest.raises(CheckpointError) as info:
            load_e4e_checkpoint(path, small_encoder(), small_generator(style_dim=128))
        assert "\n" not in str(info.value) and str(path) in str(info.value)
        return str(info.value)

    checkpoint = e4e_checkpoint(encoder, generator)
    del checkpoint["state_dict"]["decoder.noises.noise_0"]
    checkpoint["state_dict"]["encoder.styles.0.linear.weight"] = torch.zeros(128, 64)
    text = message(checkpoint)
    assert "(encoder.*)" in text and "styles.0.linear.weight (expected [128, 128], got [128, 64])" in text

    checkpoint = e4e_checkpoint(encoder, generator)
    del checkpoint["state_dict"]["decoder.noises.noise_0"]
    assert "(decoder.*)" in (text := message(checkpoint)) and "missing keys: noises.noise_0" in text

    checkpoint = e4e_checkpoint(encoder, generator)
    checkpoint["state_dict"]["discriminator.weight"] = torch.zeros(1)
    assert "outside encoder.* and decoder.*: discriminator.weight" in message(checkpoint)

    checkpoint = e4e_checkpoint(encoder, generator)
    del checkpoint["latent_avg"]
    assert "without a 'latent_avg' tensor" in message(checkpoint)
    assert "latent_avg must be" in message(e4e_checkpoint(encoder, generator, latent_avg=torch.zeros(5, 128)))
    assert "not an e4e checkpoint" in message({"g_ema": generator.state_dict()})


def test_encoder_onnx_export_matches_pytorch_with_dynamic_batch(tmp_path):
    encoder = small_encoder()
    path = tmp_path / "e4e.onnx"
    export_onnx(encoder, (torch.rand(2, 3, 64, 64) * 2 - 1,), path, ["image"], ["w_plus"], max_batch=4)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.rand(batch, 3, 64, 64) * 2 - 1
        with torch.no_grad():
            expected = encoder(x)
        (actual,) = run_onnx(session, (x,))
        assert actual.shape == (batch, 8, 128)
        assert max_abs_error(expected, actual) < 1e-4 * float(expected.abs().max())
