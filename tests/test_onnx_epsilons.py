"""Every tiny epsilon that guards a division or an rsqrt in our networks survives ONNX export.

torch's dynamo exporter with optimize=True dropped the Add of 1e-8 in PG-GAN's pixel norm (commit
8aa1d05): the exported graph then computed rsqrt(0) for an all-zero latent, and the served image was
NaN. Each case exports one module with a guard through `export_onnx` (tiny sizes) and feeds it inputs
that make the guarded quantity exactly zero (all-zero latents or styles, constant feature maps):
ONNX Runtime must answer finite values equal to PyTorch's. Each case also checks that its input does
hit the guard: without the epsilon, PyTorch itself gives NaN or infinity there.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from fashionserve.catalogue.bundle import load_fashion_generator
from fashionserve.catalogue.networks.pggan import PGGANConfig
from fashionserve.hair.networks.blending import BlendingEncoder
from fashionserve.hair.networks.clip_image import Float32LayerNorm
from fashionserve.hair.networks.rotate import RotateModel
from fashionserve.hair.networks.shape_adaptor import SampleLayerNorm
from fashionserve.hair.networks.stylegan2 import ModulatedConv2d, PixelNorm
from fashionserve.onnx_export import export_onnx, run_onnx
from fashionserve.tryon.networks.image_generator import SPADENorm

BATCH = 2
WIDTH = 8  # latent / style width of the tiny modules


@dataclass
class Case:
    """A module with an epsilon guard, inputs that zero the guarded quantity, and what that quantity
    is without the guard (to show the input reaches it)."""

    module: nn.Module
    inputs: tuple[Tensor, ...]  # the guarded quantity is exactly zero for these
    names: list[str]
    unguarded: Callable[[], Tensor]  # the guarded expression with the epsilon left out, on `inputs`


def _rsqrt_of_mean_square(x: Tensor) -> Tensor:
    return torch.rsqrt(x.square().mean(dim=1, keepdim=True))


def _random(*shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def pggan_pixel_norm() -> Case:
    """The catalogue generator (pixel norm on the latent and after every conv): all-zero latents."""
    network, _ = load_fashion_generator(None, PGGANConfig(latent_dim=WIDTH, depth_scale0=8), seed=0)
    latents = torch.zeros(BATCH, WIDTH)
    return Case(network, (latents,), ["latents"], lambda: _rsqrt_of_mean_square(latents))


def stylegan2_pixel_norm() -> Case:
    """StyleGAN2's PixelNorm (the mapping network; HairFast's post-process on its W+ styles): zeros."""
    x = torch.zeros(BATCH, 4, WIDTH)
    return Case(PixelNorm(), (x,), ["x"], lambda: _rsqrt_of_mean_square(x))


def stylegan2_demodulation() -> Case:
    """ModulatedConv2d's weight demodulation with an all-zero style (zero modulation layer)."""
    conv = ModulatedConv2d(4, 4, 3, WIDTH)
    with torch.no_grad():
        conv.modulation.weight.zero_()
        conv.modulation.bias.zero_()
    x, w = _random(BATCH, 4, 8, 8), _random(BATCH, WIDTH)

    def unguarded() -> Tensor:
        style = conv.modulation(w)
        weight = conv.weight[0] * conv.scale
        return torch.rsqrt(style.square() @ weight.square().sum(dim=(2, 3)).t())

    return Case(conv, (x, w), ["x", "w"], unguarded)


def blending_pixel_norm() -> Case:
    """HairFast's blending encoder: pixel norm of S_face over the layer axis, S_face all zero."""
    encoder = BlendingEncoder(layers=2, latent_dim=WIDTH, embed_dim=4, middle=8)
    latent_face = torch.zeros(BATCH, 2, WIDTH)
    inputs = (latent_face, _random(BATCH, 2, WIDTH), _random(BATCH, 4), _random(BATCH, 4))
    names = ["latent_face", "latent_color", "embed_face", "embed_color"]
    return Case(encoder, inputs, names, lambda: _rsqrt_of_mean_square(latent_face))


def rotate_pixel_norm() -> Case:
    """HairFast's rotate encoder: pixel norm of the shape reference's first 6 W+ entries, all zero."""
    latent_shape = torch.zeros(BATCH, 7, WIDTH)
    inputs = (latent_shape, _random(BATCH, 7, WIDTH))
    return Case(
        RotateModel(width=WIDTH), inputs, ["latent_shape", "latent_face"],
        lambda: _rsqrt_of_mean_square(latent_shape[:, :6]),
    )  # fmt: skip


def shape_adaptor_layer_norm() -> Case:
    """CtrlHair's per-sample LayerNorm ((x - mean) / (std + 1e-5)): a constant feature map."""
    norm = SampleLayerNorm(4)
    with torch.no_grad():
        norm.gamma.copy_(_random(4))
        norm.beta.copy_(_random(4) + 5)
    x = torch.full((BATCH, 4, 8, 8), 0.5)
    flat = x.flatten(1)
    return Case(norm, (x,), ["x"], lambda: (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True))


def spade_instance_norm() -> Case:
    """The try-on image generator's SPADE norm (instance norm, eps 1e-5): a constant feature map."""
    norm = SPADENorm(4, label_channels=3, hidden=8, noise=False)
    x = torch.full((BATCH, 4, 8, 8), 2.0)
    return Case(
        norm, (x, _random(BATCH, 3, 8, 8)), ["x", "seg"],
        lambda: (x - x.mean(dim=(2, 3), keepdim=True)) / x.var(dim=(2, 3), keepdim=True).sqrt(),
    )  # fmt: skip


def clip_layer_norm() -> Case:
    """CLIP's float32 LayerNorm (eps 1e-5): constant tokens."""
    norm = Float32LayerNorm(WIDTH, eps=1e-5)
    x = torch.full((BATCH, 3, WIDTH), -1.5)
    return Case(
        norm, (x,), ["x"], lambda: (x - x.mean(-1, keepdim=True)) / x.var(-1, keepdim=True).sqrt()
    )  # fmt: skip


CASES = {
    "pggan-pixel-norm": pggan_pixel_norm,
    "stylegan2-pixel-norm": stylegan2_pixel_norm,
    "stylegan2-demodulation": stylegan2_demodulation,
    "blending-pixel-norm": blending_pixel_norm,
    "rotate-pixel-norm": rotate_pixel_norm,
    "shape-adaptor-layer-norm": shape_adaptor_layer_norm,
    "spade-instance-norm": spade_instance_norm,
    "clip-layer-norm": clip_layer_norm,
}


@pytest.mark.parametrize("name", CASES)
def test_epsilon_guard_survives_onnx_export(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    case = CASES[name]()
    case.module.eval()
    with torch.no_grad():
        assert not torch.isfinite(case.unguarded()).all(), "the input does not reach the guard"
        expected = case.module(*case.inputs)
    assert torch.isfinite(expected).all()
    path = tmp_path / f"{name}.onnx"
    export_onnx(case.module, case.inputs, path, case.names, ["out"], max_batch=BATCH)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = run_onnx(session, case.inputs)
    assert np.isfinite(actual).all(), f"{name}: the exported graph lost its epsilon"
    np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-4, atol=1e-5)
