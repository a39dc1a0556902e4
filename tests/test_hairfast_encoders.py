"""HairFastGAN networks: the generator's partial synthesis, the FS encoder and the post-process network
against our re-typing of the public code (tests/hairfast_reference.py, AIRI-Institute/HairFastGAN @
49e98019c9243d1991c19d45764fc3340a498de2) on seeded random weights at tiny sizes; public key listings;
strict loading of the released file layouts; ONNX export with a dynamic batch and ORT parity."""

from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from fashionserve.checkpoints import CheckpointError
from fashionserve.hair.networks.feature_style_encoder import (
    FeatureStyleEmbedding,
    FeatureStyleEncoder,
    load_feature_style_encoder,
)
from fashionserve.hair.networks.iresnet import adaptive_average_pool
from fashionserve.hair.networks.post_process import F_START_BLOCK, PostProcess, load_post_process
from fashionserve.hair.networks.stylegan2 import PartialSynthesis, StyleGAN2Generator
from fashionserve.onnx_export import export_onnx, max_abs_error, run_onnx
from tests import hairfast_reference as reference
from tests.test_hair_networks_gan import keys_and_shapes, randomize_zero_initialized
from tests.test_networks import read_listing

NETWORKS = Path(__file__).parent.parent / "fashionserve" / "hair" / "networks"
STYLE_DIM, CONTENT, WIDTH = 16, 16, 8
TINY_BODY = dict(width=WIDTH, units=(1, 2, 2, 1))
REFERENCE_BODY = dict(width=WIDTH, layers=(1, 2, 2, 1), style_dim=STYLE_DIM, content=CONTENT)


def assert_close_scaled(actual: Tensor, expected: Tensor, tolerance: float = 2e-5) -> None:
    """Equal up to `tolerance` times the largest magnitude (the outputs span a few orders of magnitude)."""
    assert actual.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual / scale, expected / scale, atol=tolerance, rtol=0)


def tiny_generator(size: int, seed: int = 0) -> StyleGAN2Generator:
    torch.manual_seed(seed)
    generator = StyleGAN2Generator(size=size, style_dim=STYLE_DIM, channel_max=CONTENT).eval()
    randomize_zero_initialized(generator, seed)
    return generator


def randomize_normalizations(module: nn.Module, seed: int) -> None:
    """Random BatchNorm statistics and affines, PReLU slopes and LayerNorm affines, so that eval-mode
    arithmetic is not an identity anywhere."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor: Tensor, low: float, high: float) -> None:
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)

    with torch.no_grad():
        for child in module.modules():
            if isinstance(child, nn.BatchNorm2d):
                uniform(child.running_mean, -0.3, 0.3)
                uniform(child.running_var, 0.5, 1.5)
                uniform(child.weight, 0.5, 1.2)
                uniform(child.bias, -0.3, 0.3)
            elif isinstance(child, nn.PReLU):
                uniform(child.weight, 0.0, 0.5)
            elif isinstance(child, nn.LayerNorm) and child.weight is not None:
                uniform(child.weight, 0.5, 1.5)
                uniform(child.bias, -0.3, 0.3)


def tiny_fs_encoder(seed: int = 0, n_styles: int = 8) -> tuple[FeatureStyleEncoder, reference.FsEncoderV2]:
    """Ours and the reference with one seeded random state dict and average latent."""
    torch.manual_seed(seed)
    theirs = reference.FsEncoderV2(n_styles=n_styles, **REFERENCE_BODY).eval()
    randomize_normalizations(theirs, seed)
    ours = FeatureStyleEncoder(n_styles, STYLE_DIM, CONTENT, **TINY_BODY).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.set_latent_avg(torch.randn(n_styles, STYLE_DIM))  # distinct per entry: catches mis-broadcasting
    return ours, theirs


def tiny_post_process(seed: int = 0, n_styles: int = 12) -> tuple[PostProcess, reference.PostProcessModel]:
    torch.manual_seed(seed)
    theirs = reference.PostProcessModel(n_styles=n_styles, **REFERENCE_BODY).eval()
    randomize_normalizations(theirs, seed)
    theirs.latent_avg = torch.randn(n_styles, STYLE_DIM)
    ours = PostProcess(n_styles, STYLE_DIM, CONTENT, **TINY_BODY).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.set_latent_avg(theirs.latent_avg)
    return ours, theirs


def noises(generator: StyleGAN2Generator) -> list[Tensor]:
    return [getattr(generator.noises, f"noise_{index}") for index in range(generator.num_layers)]


# --- generator: synthesis from an intermediate block --------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, 3), (3, 3), (4, None), (5, None), (0, None), (0, 0), (2, 4)],
    ids=["F-from-W", "F-from-content", "from-F", "post-process", "full", "block-0", "middle"],
)
def test_partial_synthesis_equals_public_generator_loop(start, end):
    generator = tiny_generator(size=128)
    assert generator.n_blocks == 5
    torch.manual_seed(1)
    w_plus = torch.randn(2, generator.n_latent, STYLE_DIM)
    layer_in = None
    if start > 0:
        side = 2 ** (start + 1)
        layer_in = torch.randn(2, generator.convs[2 * start - 2].conv.weight.shape[2], side, side)
    with torch.no_grad():
        ours = PartialSynthesis(generator, start, end)(w_plus, layer_in)
        expected, _ = reference.generator_forward(
            generator, w_plus, noises(generator), layer_in, start, 8 if end is None else end
        )
    if end is None:
        assert ours.shape == (2, 3, 128, 128)
    else:
        assert ours.shape[2] == 2 ** (end + 2)
    assert_close_scaled(ours, expected)


def test_partial_synthesis_composes_to_the_full_image():
    generator = tiny_generator(size=64)
    w_plus = torch.randn(1, generator.n_latent, STYLE_DIM)
    with torch.no_grad():
        features = generator.features(w_plus, end_block=2)
        # From block 3 the RGB skip restarts (HairFastGAN passes skip=None), so the image differs from the
        # full pass, but the features after block 3 agree.
        torch.testing.assert_close(
            generator.features(w_plus, 3, layer_in=features, start_block=3), generator.features(w_plus, 3)
        )
        assert (generator.synthesis(w_plus, features, 3) - generator(w_plus)).abs().max() > 1e-3


def test_partial_synthesis_rejects_bad_blocks():
    generator = tiny_generator(size=32)
    w_plus, features = torch.randn(1, generator.n_latent, STYLE_DIM), torch.randn(1, CONTENT, 8, 8)
    with pytest.raises(ValueError, match="layer_in is required"):
        generator.synthesis(w_plus, start_block=2)
    with pytest.raises(ValueError, match="layer_in is required"):
        generator.features(w_plus, 1, layer_in=features)
    with pytest.raises(ValueError, match="start_block <= end_block <= 3"):
        generator.features(w_plus, 4)
    with pytest.raises(ValueError, match="start_block <= end_block"):
        generator.features(w_plus, 1, layer_in=features, start_block=2)
    with pytest.raises(ValueError, match="end_block <= 3"):
        PartialSynthesis(generator, 4)


def test_adaptive_average_pool_equals_torch_for_divisible_and_not():
    torch.manual_seed(0)
    for height, width in [(128, 128), (64, 16), (17, 5), (3, 3), (2, 7)]:  # 2 -> 3 overlaps windows
        x = torch.randn(2, 4, height, width)
        torch.testing.assert_close(adaptive_average_pool(x, 3), nn.functional.adaptive_avg_pool2d(x, 3))


# --- FS encoder ---------------------------------------------------------------------------------------


def test_fs_encoder_state_dict_matches_public_listing():
    listing = read_listing(NETWORKS / "feature_style_encoder_state_dict_keys.txt")
    assert list(listing) == ["fs_encoder_v2"] and len(listing["fs_encoder_v2"]) == 517
    with torch.device("meta"):
        encoder = FeatureStyleEncoder()
    assert keys_and_shapes(encoder) == listing["fs_encoder_v2"]
    assert sum(p.numel() for p in encoder.parameters()) == 113_920_704
    assert "latent_avg" not in encoder.state_dict() and encoder.latent_avg.shape == (18, 512)


def test_fs_encoder_equals_public_encoder_and_trainer():
    ours, theirs = tiny_fs_encoder()
    image = torch.rand(2, 3, 1024, 1024) * 2 - 1
    with torch.no_grad():
        w_plus, content = ours(image)
        expected_w_plus, expected_content = reference.fs_encode(theirs, image, ours.latent_avg)
    assert w_plus.shape == (2, 8, STYLE_DIM) and content.shape == (2, CONTENT, 16, 16)
    assert_close_scaled(w_plus, expected_w_plus)
    assert_close_scaled(content, expected_content)
    assert (w_plus - ours.latent_avg).abs().mean() > 1e-2  # the heads contribute, not just the average


def test_fs_embedding_gives_s_and_f_as_embedding_py():
    ours, theirs = tiny_fs_encoder(n_styles=10)
    # 64 px: the public loop returns features only when a block follows end_layer (else the image).
    generator = tiny_generator(size=64)
    image = torch.rand(2, 3, 1024, 1024) * 2 - 1
    with torch.no_grad():
        w_plus, features = FeatureStyleEmbedding(ours, generator)(image)
        expected_w_plus, expected_features = reference.embedding_fs(
            theirs, ours.latent_avg, generator, noises(generator), image
        )
    assert w_plus.shape == (2, 10, STYLE_DIM) and features.shape == (2, CONTENT, 32, 32)
    assert_close_scaled(w_plus, expected_w_plus)
    assert_close_scaled(features, expected_features)


def test_fs_encoder_loads_the_released_layout(tmp_path):
    _, theirs = tiny_fs_encoder(seed=1)
    latent_avg = torch.randn(8, STYLE_DIM)
    torch.save(theirs.state_dict(), tmp_path / "143_enc.pth")  # FSencoder.get_trainer: a bare state dict
    psp = {  # pSp checkpoint: only latent_avg is read
        "state_dict": {"decoder.style.1.weight": torch.zeros(2, 2)},
        "latent_avg": latent_avg,
        "opts": {"encoder_type": "GradualStyleEncoder"},
    }
    torch.save(psp, tmp_path / "psp_ffhq_encode.pt")
    fresh = FeatureStyleEncoder(8, STYLE_DIM, CONTENT, **TINY_BODY)
    loaded = load_feature_style_encoder(tmp_path / "143_enc.pth", tmp_path / "psp_ffhq_encode.pt", fresh)
    assert loaded is fresh and not loaded.training
    for key, value in theirs.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded.latent_avg, latent_avg)


def test_fs_encoder_load_problems_are_named(tmp_path):
    _, theirs = tiny_fs_encoder()
    psp_path = tmp_path / "psp.pt"
    torch.save({"latent_avg": torch.zeros(STYLE_DIM)}, psp_path)

    def message(state: object, psp: object = None) -> str:
        path = tmp_path / "143_enc.pth"
        torch.save(state, path)
        if psp is not None:
            torch.save(psp, psp_path)
        with pytest.raises(CheckpointError) as info:
            load_feature_style_encoder(
                path, psp_path, FeatureStyleEncoder(8, STYLE_DIM, CONTENT, **TINY_BODY)
            )
        assert "\n" not in str(info.value)
        return str(info.value)

    state = theirs.state_dict()
    del state["block_3.0.bn1.running_var"]
    state["content_layer.4.weight"] = torch.zeros(CONTENT, CONTENT, 3, 1)
    state["fc.weight"] = torch.zeros(1)
    text = message(state)
    assert "missing keys: block_3.0.bn1.running_var" in text and "unexpected keys: fc.weight" in text
    assert "content_layer.4.weight (expected [16, 16, 3, 3], got [16, 16, 3, 1])" in text
    assert "not a flat dict of tensors" in message({"state_dict": theirs.state_dict()})
    assert "no 'latent_avg' tensor" in message(theirs.state_dict(), {"state_dict": {}})
    assert "latent_avg must be" in message(theirs.state_dict(), {"latent_avg": torch.zeros(5, STYLE_DIM)})


# --- post-process -------------------------------------------------------------------------------------


def test_post_process_state_dict_matches_public_listing():
    listing = read_listing(NETWORKS / "post_process_state_dict_keys.txt")
    assert list(listing) == ["post_process"] and len(listing["post_process"]) == 777
    with torch.device("meta"):
        module = PostProcess()
    assert keys_and_shapes(module) == listing["post_process"]
    assert sum(p.numel() for p in module.parameters()) == 199_068_096
    assert "latent_avg" not in module.state_dict() and module.latent_avg.shape == (18, 512)


def test_post_process_equals_public_model_and_blending_call():
    ours, theirs = tiny_post_process()
    generator = tiny_generator(size=128)
    face, blended = torch.rand(2, 3, 256, 256) * 2 - 1, torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        w_plus, features = ours(face, blended)
        expected_w_plus, expected_features = theirs(face, blended)
        image = PartialSynthesis(generator, start_block=F_START_BLOCK)(w_plus, features)
        expected_image = reference.blending_post_process(theirs, generator, noises(generator), face, blended)
    assert w_plus.shape == (2, 12, STYLE_DIM) and features.shape == (2, CONTENT, 64, 64)
    assert_close_scaled(w_plus, expected_w_plus)
    assert_close_scaled(features, expected_features)
    assert_close_scaled(image, expected_image)
    # Both images matter: the face's and the blend's styles modulate each other.
    with torch.no_grad():
        swapped, _ = ours(blended, face)
    assert (swapped - w_plus).abs().max() > 1e-3


def post_process_checkpoint(module: nn.Module) -> dict:
    """pp_train.py's save_model layout: model_state_dict, the discriminator and the iteration."""
    return {"model_state_dict": module.state_dict(), "D": {"convs.0.weight": torch.zeros(2)}, "cur_iter": 7}


def test_post_process_loads_the_released_layout(tmp_path):
    _, theirs = tiny_post_process(seed=1)
    torch.save(post_process_checkpoint(theirs), tmp_path / "pp_model.pth")
    for shape in ([STYLE_DIM], [12, STYLE_DIM], [1, 12, STYLE_DIM]):
        torch.save(
            theirs.latent_avg.expand(shape) if len(shape) > 1 else theirs.latent_avg[0], tmp_path / "a.pt"
        )
        fresh = PostProcess(12, STYLE_DIM, CONTENT, **TINY_BODY)
        loaded = load_post_process(tmp_path / "pp_model.pth", tmp_path / "a.pt", fresh)
        assert loaded is fresh and not loaded.training
        expected = theirs.latent_avg if len(shape) > 1 else theirs.latent_avg[0].expand(12, -1)
        assert torch.equal(loaded.latent_avg, expected)
    for key, value in theirs.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_post_process_load_problems_are_named(tmp_path):
    _, theirs = tiny_post_process()
    latent_path = tmp_path / "latent_avg.pt"
    torch.save(torch.zeros(STYLE_DIM), latent_path)

    def message(checkpoint: object, latent_avg: object = None) -> str:
        path = tmp_path / "pp_model.pth"
        torch.save(checkpoint, path)
        if latent_avg is not None:
            torch.save(latent_avg, latent_path)
        with pytest.raises(CheckpointError) as info:
            load_post_process(path, latent_path, PostProcess(12, STYLE_DIM, CONTENT, **TINY_BODY))
        assert "\n" not in str(info.value)
        return str(info.value)

    checkpoint = post_process_checkpoint(theirs)
    del checkpoint["model_state_dict"]["to_feature.res_blocks.res_block_2_1.downsample.0.weight"]
    checkpoint["model_state_dict"]["to_latent"] = torch.zeros(1)
    text = message(checkpoint)
    assert "missing keys: to_feature.res_blocks.res_block_2_1.downsample.0.weight" in text
    assert "unexpected keys: to_latent" in text
    assert "no 'model_state_dict' dict" in message(theirs.state_dict())
    assert "expected a tensor, got dict" in message(post_process_checkpoint(theirs), {"latent_avg": 1})
    assert "latent_avg must be" in message(post_process_checkpoint(theirs), torch.zeros(3, STYLE_DIM))


# --- ONNX export --------------------------------------------------------------------------------------


def check_onnx(module: nn.Module, make_inputs, path: Path, input_names, output_names) -> None:
    """Export with a dynamic batch, then ORT equals PyTorch at batch 1 and 3."""
    module.eval()
    export_onnx(module, make_inputs(2), path, input_names, output_names, max_batch=4)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        inputs = make_inputs(batch)
        with torch.no_grad():
            expected = module(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        actual = run_onnx(session, inputs)
        assert len(actual) == len(expected)
        for want, got in zip(expected, actual, strict=True):
            assert got.shape == tuple(want.shape)
            assert max_abs_error(want, got) < 1e-4 * float(want.abs().max())


def test_fs_embedding_onnx_export_matches_pytorch(tmp_path):
    embedding = FeatureStyleEmbedding(tiny_fs_encoder(n_styles=10)[0], tiny_generator(size=64))
    check_onnx(
        embedding,
        lambda batch: (torch.rand(batch, 3, 1024, 1024) * 2 - 1,),
        tmp_path / "fs.onnx",
        ["image"],
        ["w_plus", "features"],
    )


def test_post_process_onnx_export_matches_pytorch(tmp_path):
    module = tiny_post_process()[0]
    check_onnx(
        module,
        lambda batch: (torch.rand(batch, 3, 256, 256) * 2 - 1, torch.rand(batch, 3, 256, 256) * 2 - 1),
        tmp_path / "pp.onnx",
        ["face", "blended"],
        ["w_plus", "features"],
    )


@pytest.mark.parametrize(("start", "end"), [(0, 3), (4, None)], ids=["F-from-W", "image-from-F"])
def test_partial_synthesis_onnx_export_matches_pytorch(tmp_path, start, end):
    generator = tiny_generator(size=64)

    def inputs(batch: int) -> tuple[Tensor, ...]:
        w_plus = torch.randn(batch, generator.n_latent, STYLE_DIM)
        return (w_plus,) if start == 0 else (w_plus, torch.randn(batch, CONTENT, 32, 32))

    names = ["w_plus"] if start == 0 else ["w_plus", "features"]
    check_onnx(PartialSynthesis(generator, start, end), inputs, tmp_path / "g.onnx", names, ["out"])
