"""HairFastGAN alignment networks (pose: rotate, shape: CtrlHair shape adaptor, inpainting: SEAN) against
our re-typing of the public inference path (tests/hairfast_align_reference.py, HairFastGAN @ 49e9801) on
seeded random weights; public key layouts; strict loaders in the public files' wrapping; the SEAN mean
style code folder; ONNX export with a dynamic batch."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.checkpoints import CheckpointError
from fashionserve.hair.networks.rotate import RotateModel, load_rotate_checkpoint
from fashionserve.hair.networks.sean import (
    MEAN_STYLE_CODES,
    SEANGenerator,
    SEANInpainter,
    find_mean_style_codes,
    load_mean_style_codes,
    load_sean_checkpoint,
    load_sean_inpainter,
    one_hot_labels,
)
from fashionserve.hair.networks.shape_adaptor import ShapeAdaptor, load_shape_adaptor_checkpoint
from fashionserve.onnx_export import export_onnx, max_abs_error, run_onnx
from tests import hairfast_align_reference as ref
from tests.test_networks import read_listing

LISTING = (
    Path(__file__).parent.parent / "fashionserve" / "hair" / "networks" / "hairfast_align_state_dict_keys.txt"
)
TINY_SHAPE = dict(size=32, hair_dim=4, face_dim=8, levels=3, base=4, max_channels=16)
TINY_SHAPE_REF = dict(img_size=32, hair_dim=4, face_dim=8, layer_num=3, base=4, max_channel=16)
TINY_SEAN = dict(ngf=2, crop_size=32, style_length=8, spade_hidden=4, zencoder_ngf=2)
TINY_SEAN_REF = dict(ngf=2, crop_size=32, style_length=8, nhidden=4, zencoder_ngf=2)
CLASSES = 19
SEAN_SIZE = 32
# Upstream's Zencoder builds InstanceNorm2d(64) for 256 channels (no weights, so harmless); the reference
# keeps that, and torch warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:input's size at dim=1 does not match num_features")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: on the shared 2-core machine thread hand-offs cost far more than they save."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def keys_and_shapes(module: nn.Module) -> list[tuple[str, list[int]]]:
    return [(key, list(value.shape)) for key, value in module.state_dict().items()]


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> dict[str, Tensor]:
    """Seeded random weights for every float entry (zero-initialised ones included), positive batch-norm
    variances, and spectral-norm u/v converged by power iteration (so sigma = u . W v is meaningful).
    Returns the state dict, to be loaded into the reference too."""
    generator = torch.Generator().manual_seed(seed)
    state = module.state_dict()
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
        elif key.endswith(("weight_u", "weight_v")):
            continue
        else:
            fan_in = value[0].numel() if value.dim() > 1 else 1
            scale = 1.0 / fan_in**0.5 if value.dim() > 1 else 0.5
            value.copy_(torch.randn(value.shape, generator=generator) * scale)
    for name, sub in module.named_modules():
        if hasattr(sub, "weight_orig"):
            matrix = sub.weight_orig.flatten(1)
            u = F.normalize(torch.randn(matrix.shape[0], generator=generator), dim=0)
            for _ in range(30):
                v = F.normalize(matrix.t() @ u, dim=0)
                u = F.normalize(matrix @ v, dim=0)
            state[f"{name}.weight_u"].copy_(u)
            state[f"{name}.weight_v"].copy_(v)
    module.load_state_dict(state)
    return state


def random_labels(batch: int, size: int, seed: int, absent: tuple[int, ...] = ()) -> Tensor:
    """[batch, 1, size, size] int64 label maps of blocky regions over the 19 classes, minus `absent`."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([c for c in range(CLASSES) if c not in absent])
    coarse = allowed[torch.randint(len(allowed), (batch, 1, size // 4, size // 4), generator=generator)]
    return F.interpolate(coarse.float(), size=(size, size), mode="nearest").long()


# --- key layouts ---------------------------------------------------------------------------------------

PUBLIC = {
    "rotate": (RotateModel, 70, 6_576_640),
    "shape_adaptor": (ShapeAdaptor, 126, 240_954_899),
    "sean_generator": (SEANGenerator, 982, 267_043_339),
}


@pytest.mark.parametrize("section", sorted(PUBLIC))
def test_public_configuration_has_the_released_keys_and_shapes(section):
    listing = read_listing(LISTING)
    assert sorted(listing) == sorted(PUBLIC)
    cls, entries, numel = PUBLIC[section]
    with torch.device("meta"):  # shapes only
        module = cls()
    assert keys_and_shapes(module) == listing[section]
    assert len(listing[section]) == entries
    assert sum(v.numel() for v in module.state_dict().values()) == numel


# --- pose: rotate ----------------------------------------------------------------------------------------


def test_rotate_matches_reference():
    ours, reference = RotateModel().eval(), ref.RotateModel().eval()
    reference.load_state_dict(randomize(ours, seed=1))
    generator = torch.Generator().manual_seed(2)
    w_face, w_shape = torch.randn(2, 2, 18, 512, generator=generator)
    with torch.no_grad():
        expected = ref.rotate_stage(reference, w_face, w_shape)
        actual = ours(w_shape, w_face)
    assert actual.shape == (2, 18, 512)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(actual[:, 6:], w_shape[:, 6:])
    assert (actual[:, :6] - w_shape[:, :6]).abs().max() > 1e-3  # the modulation does something


# --- shape: CtrlHair shape adaptor ----------------------------------------------------------------------


def test_positional_encoding_matches_ctrlhair():
    from fashionserve.hair.networks.shape_adaptor import positional_encoding

    torch.testing.assert_close(
        positional_encoding(16, 10), ref.generate_pos_embedding(16, 10), rtol=0, atol=1e-6
    )


def test_shape_adaptor_matches_reference():
    ours, reference = ShapeAdaptor(**TINY_SHAPE).eval(), ref.ShapeGenerator(**TINY_SHAPE_REF).eval()
    reference.load_state_dict(randomize(ours, seed=3))
    # Masks at 64 px (resized to 32 by both), class 13 (hair) absent from the face's mask: the hair
    # then comes from the shape reference only.
    face = random_labels(2, 64, seed=4, absent=(13,))
    shape = random_labels(2, 64, seed=5)
    face[0, 0, :8] = 255  # upstream's "unknown" label: an all-zero one-hot row
    with torch.no_grad():
        target = ours(face, shape)
        hair, _ = ours.split_one_hot(shape)
        _, face_planes = ours.split_one_hot(face)
        probabilities = ours.decode(ours.hair_encoder(hair), ours.face_encoder(face_planes))
        for i in range(2):
            expected = ref.shape_stage(reference, face[i : i + 1].clone(), shape[i : i + 1].clone())
            assert torch.equal(target[i : i + 1], expected)
            face_code, _ = ref.get_hair_face_code(reference, face[i, 0].clone())
            _, hair_code = ref.get_hair_face_code(reference, shape[i, 0].clone())
            expected_p = reference.forward_decode_by_code(hair_code, face_code)
            torch.testing.assert_close(probabilities[i : i + 1], expected_p, rtol=1e-4, atol=1e-6)
    assert target.shape == (2, 1, 32, 32) and target.dtype == torch.int64
    assert len(target.unique()) > 1


# --- inpainting: SEAN -----------------------------------------------------------------------------------


def sean_pair(seed: int, noise: bool) -> tuple[SEANGenerator, ref.SPADEGenerator]:
    ours = SEANGenerator(noise=noise, **TINY_SEAN).eval()
    reference = ref.SPADEGenerator(**TINY_SEAN_REF).eval()
    reference.load_state_dict(randomize(ours, seed))
    return ours, reference


def test_masked_mean_pooling_equals_the_per_class_loop():
    ours, reference = sean_pair(seed=6, noise=False)
    images = torch.rand(3, 3, SEAN_SIZE, SEAN_SIZE, generator=torch.Generator().manual_seed(7)) * 2 - 1
    labels = torch.cat(
        [
            random_labels(1, SEAN_SIZE, 8),
            random_labels(1, SEAN_SIZE, 9, absent=(1, 2, 13, 17)),
            torch.zeros(1, 1, SEAN_SIZE, SEAN_SIZE).long(),
        ]
    )
    with torch.no_grad():
        codes = ours.encode_styles(images, one_hot_labels(labels, CLASSES))
        expected = ref.encode_sean(reference, images, labels)
    torch.testing.assert_close(codes, expected, rtol=1e-5, atol=1e-6)
    absent = (codes == 0).all(dim=-1)
    assert absent[1, [1, 2, 13, 17]].all() and absent[2, 1:].all() and not absent[0].any()


def test_inpainter_batch_equals_upstream_loops_with_mean_codes_for_absent_classes():
    """Batch of 2 (face, shape reference) decoded on one target mask vs upstream's encode_sean +
    two decode_sean calls; classes absent from an image take the mean codes. Noise scales are zeroed
    so one batched call and two single ones see the same (zero) noise."""
    ours, reference = sean_pair(seed=10, noise=True)
    with torch.no_grad():
        for module in (ours, reference):
            for name, param in module.named_parameters():
                if name.endswith("noise_var"):
                    param.zero_()
    mean_codes = torch.randn(CLASSES, 8, generator=torch.Generator().manual_seed(11))
    inpainter = SEANInpainter(ours, mean_codes).eval()
    images = torch.rand(2, 3, SEAN_SIZE, SEAN_SIZE, generator=torch.Generator().manual_seed(12)) * 2 - 1
    labels = torch.cat(
        [random_labels(1, SEAN_SIZE, 13, absent=(4, 5, 13)), random_labels(1, SEAN_SIZE, 14, absent=(0, 13))]
    )
    target = random_labels(1, SEAN_SIZE, 15)
    assert {0, 4, 5, 13} <= set(target.unique().tolist())  # absent classes are exercised
    with torch.no_grad():
        actual = inpainter(images, labels, target.expand(2, -1, -1, -1))
        expected = ref.inpaint_stage(reference, images, labels, target, mean_codes)
    torch.testing.assert_close(actual, torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_inpainter_noise_follows_upstream_draws():
    """With noise on and the same seed, one sample draws exactly upstream's per-ACE noise fields."""
    ours, reference = sean_pair(seed=16, noise=True)
    mean_codes = torch.randn(CLASSES, 8, generator=torch.Generator().manual_seed(17))
    inpainter = SEANInpainter(ours, mean_codes).eval()
    image = torch.rand(1, 3, SEAN_SIZE, SEAN_SIZE, generator=torch.Generator().manual_seed(18)) * 2 - 1
    labels, target = random_labels(1, SEAN_SIZE, 19, absent=(13,)), random_labels(1, SEAN_SIZE, 20)
    with torch.no_grad():
        code = ref.encode_sean(reference, image, labels)
        torch.manual_seed(21)
        expected = ref.decode_sean(reference, code, target, mean_codes)
        torch.manual_seed(21)
        actual = inpainter(image, labels, target)[0]
        torch.manual_seed(22)
        other = inpainter(image, labels, target)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert (other - actual).abs().max() > 1e-4  # the noise matters with these weights


def test_spectral_norms_are_converged_at_construction():
    """A fresh SEAN's eval-mode sigma = u . (W v) is each weight's largest singular value, so random-init
    weights are scaled like trained ones (random u, v made the tiny SEAN's output a saturated +-1)."""
    torch.manual_seed(26)
    generator = SEANGenerator(noise=False, **TINY_SEAN)
    layers = [layer for layer in generator.modules() if hasattr(layer, "weight_orig")]
    assert layers
    for layer in layers:
        matrix = layer.weight_orig.detach().flatten(1)
        sigma = layer.weight_u @ matrix @ layer.weight_v
        torch.testing.assert_close(sigma, torch.linalg.matrix_norm(matrix, ord=2), rtol=0.05, atol=0)


def test_fold_spectral_norm_keeps_the_output():
    ours, _ = sean_pair(seed=23, noise=False)
    segmentation = one_hot_labels(random_labels(2, SEAN_SIZE, 24), CLASSES)
    codes = torch.randn(2, CLASSES, 8, generator=torch.Generator().manual_seed(25))
    with torch.no_grad():
        before = ours(segmentation, codes)
        ours.fold_spectral_norm()
        after = ours(segmentation, codes)
    assert not any(key.endswith("weight_orig") for key in ours.state_dict())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    other = SEANGenerator(noise=False, **TINY_SEAN)
    other.fold_spectral_norm()
    other.load_state_dict(ours.state_dict())  # a folded state dict loads into a folded generator


# --- SEAN mean style codes ------------------------------------------------------------------------------


def write_mean_codes(folder: Path, codes: np.ndarray) -> None:
    for label, code in enumerate(codes):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        np.save(folder / str(label) / "ACE.npy", code)


def test_mean_style_codes_found_in_a_hairfast_checkout(tmp_path):
    checkout = tmp_path / "HairFastGAN"
    codes = np.random.default_rng(0).standard_normal((CLASSES, 512)).astype(np.float32)
    write_mean_codes(checkout / MEAN_STYLE_CODES, codes)
    (checkout / "pretrained_models").mkdir()
    folder = checkout / MEAN_STYLE_CODES
    for given in (checkout / "pretrained_models", checkout, folder):
        assert find_mean_style_codes(given) == folder
    assert torch.equal(load_mean_style_codes(folder), torch.from_numpy(codes))
    with pytest.raises(CheckpointError, match="not found; looked in .*elsewhere"):
        find_mean_style_codes(tmp_path / "elsewhere")


def test_mean_style_codes_errors_name_the_file(tmp_path):
    codes = np.zeros((CLASSES, 512), dtype=np.float32)
    write_mean_codes(tmp_path, codes)
    np.save(tmp_path / "7" / "ACE.npy", np.zeros(256, dtype=np.float32))
    with pytest.raises(CheckpointError, match=r"7/ACE.npy: expected 512 float values, got float32 \[256\]"):
        load_mean_style_codes(tmp_path)
    (tmp_path / "7" / "ACE.npy").unlink()
    with pytest.raises(CheckpointError, match=r"mean style code missing: .*7/ACE.npy"):
        load_mean_style_codes(tmp_path)
    (tmp_path / "7" / "ACE.npy").write_bytes(b"not numpy")
    with pytest.raises(CheckpointError, match=r"7/ACE.npy: not a readable .npy file"):
        load_mean_style_codes(tmp_path)


# --- strict loaders -------------------------------------------------------------------------------------


def assert_same_entries(module: nn.Module, state: dict[str, Tensor]) -> None:
    loaded = module.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_loaders_accept_the_public_wrapping(tmp_path):
    rotate = RotateModel(width=16)
    state = randomize(rotate, seed=26)
    torch.save({"model_state_dict": state}, tmp_path / "rotate_best.pth")
    loaded = load_rotate_checkpoint(tmp_path / "rotate_best.pth", RotateModel(width=16))
    assert_same_entries(loaded, state)

    shape = ShapeAdaptor(**TINY_SHAPE)
    state = randomize(shape, seed=27)
    torch.save(state, tmp_path / "mask_generator.pth")
    loaded = load_shape_adaptor_checkpoint(tmp_path / "mask_generator.pth", ShapeAdaptor(**TINY_SHAPE))
    assert_same_entries(loaded, state)

    sean = SEANGenerator(**TINY_SEAN)
    state = randomize(sean, seed=28)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "latest_net_G.pth")
    write_mean_codes(tmp_path / "codes", np.ones((CLASSES, 8), dtype=np.float32))
    inpainter = load_sean_inpainter(
        tmp_path / "latest_net_G.pth", tmp_path / "codes", SEANGenerator(**TINY_SEAN)
    )
    assert_same_entries(inpainter.generator, state)
    assert torch.equal(inpainter.mean_style_codes, torch.ones(CLASSES, 8))


def test_loaders_name_missing_unexpected_and_misshaped_keys(tmp_path):
    state = SEANGenerator(**TINY_SEAN).state_dict()
    del state["up_1.ace_0.fc_mu3.weight"]
    state["up_1.ace_0.fc_mu19.weight"] = torch.zeros(8, 8)
    state["conv_img.weight"] = torch.zeros(3, 4, 3, 3)
    torch.save(state, tmp_path / "latest_net_G.pth")
    with pytest.raises(CheckpointError) as error:
        load_sean_checkpoint(tmp_path / "latest_net_G.pth", SEANGenerator(**TINY_SEAN))
    message = str(error.value)
    assert "missing keys: up_1.ace_0.fc_mu3.weight" in message
    assert "unexpected keys: up_1.ace_0.fc_mu19.weight" in message
    assert "conv_img.weight (expected [3, 2, 3, 3], got [3, 4, 3, 3])" in message

    torch.save({"model_state_dict": {"fc.weight": torch.zeros(1)}}, tmp_path / "rotate_best.pth")
    with pytest.raises(
        CheckpointError, match="rotate checkpoint .*missing keys: modulation_module_list.0.fc"
    ):
        load_rotate_checkpoint(tmp_path / "rotate_best.pth")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_shape_adaptor_checkpoint(tmp_path / "absent.pth", ShapeAdaptor(**TINY_SHAPE))


# --- ONNX -----------------------------------------------------------------------------------------------


def export_and_compare(module: nn.Module, inputs: tuple[Tensor, ...], names, path: Path) -> onnx.ModelProto:
    """Export with batch 2 (batch 1 would be specialised), run ONNX Runtime at the inputs' batch (3) and
    compare with PyTorch."""
    export_onnx(module, tuple(t[:2] for t in inputs), path, names, ["output"], max_batch=4)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = module(*inputs)
    (actual,) = run_onnx(session, inputs)
    assert actual.shape == tuple(expected.shape)
    if expected.dtype == torch.int64:
        assert np.array_equal(actual, expected.numpy())
    else:
        assert max_abs_error(expected, actual) < 1e-4
    return onnx.load(str(path))


def test_rotate_and_shape_adaptor_export_with_dynamic_batch(tmp_path):
    rotate = RotateModel().eval()
    randomize(rotate, seed=29)
    latents = tuple(torch.randn(2, 3, 18, 512, generator=torch.Generator().manual_seed(30)))
    export_and_compare(rotate, latents, ["latent_shape", "latent_face"], tmp_path / "rotate.onnx")

    shape = ShapeAdaptor(**TINY_SHAPE).eval()
    randomize(shape, seed=31)
    masks = (random_labels(3, 32, 32), random_labels(3, 32, 33))
    export_and_compare(shape, masks, ["face_mask", "shape_mask"], tmp_path / "shape.onnx")


def test_sean_inpainter_exports_with_dynamic_batch(tmp_path):
    """Noise on (RandomNormalLike in the graph) with zero noise scales so ONNX Runtime must match; 5
    classes instead of 19 to keep the export quick (the graph repeats per class)."""
    classes = 5
    generator = SEANGenerator(label_nc=classes, noise=True, **TINY_SEAN).eval()
    randomize(generator, seed=34)
    with torch.no_grad():
        for name, param in generator.named_parameters():
            if name.endswith("noise_var"):
                param.zero_()
    generator.fold_spectral_norm()
    inpainter = SEANInpainter(generator, torch.randn(classes, 8)).eval()
    images = torch.rand(3, 3, SEAN_SIZE, SEAN_SIZE, generator=torch.Generator().manual_seed(35)) * 2 - 1
    labels = random_labels(3, SEAN_SIZE, 36, absent=tuple(range(2, CLASSES))) * 2  # 0 and 2: 1, 3, 4 absent
    target = random_labels(3, SEAN_SIZE, 37, absent=tuple(range(classes, CLASSES)))
    inputs = (images, labels, target)
    model = export_and_compare(
        inpainter, inputs, ["image", "labels", "target_labels"], tmp_path / "sean.onnx"
    )
    assert "RandomNormalLike" in {node.op_type for node in model.graph.node}
