"""BiSeNet face parser: public checkpoint layout, strict loading, module math, masks, ONNX parity."""

from pathlib import Path

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.checkpoints import CheckpointError
from fashionserve.hair.networks.parser import (
    CELEBAMASK_CLASSES,
    FACE_CLASSES,
    HAIR_CLASS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_CLASSES,
    AttentionRefinementModule,
    FaceParser,
    FeatureFusionModule,
    hair_and_face_masks,
    load_face_parser_checkpoint,
    normalize_images,
)
from fashionserve.onnx_export import export_onnx, max_abs_error, run_onnx, tensor_specs

LISTING = (
    Path(__file__).parent.parent / "fashionserve" / "hair" / "networks" / "face_parser_state_dict_keys.txt"
)


def read_listing() -> list[tuple[str, list[int]]]:
    """The public key/shape listing: [(key, shape)] in file order."""
    entries = []
    for line in LISTING.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split()
            entries.append((key, [int(d) for d in shape.strip("[]").split(",") if d]))
    return entries


def randomize_batch_norms(module: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that tests see BN's eval-mode math
    (fresh BNs are the identity up to eps)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            count = layer.num_features
            layer.running_mean.copy_(torch.randn(count, generator=generator) * 0.1)
            layer.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            layer.weight.data.copy_(torch.rand(count, generator=generator) + 0.5)
            layer.bias.data.copy_(torch.randn(count, generator=generator) * 0.1)
            layer.num_batches_tracked.fill_(79999)


@pytest.fixture(scope="module")
def parser() -> FaceParser:
    torch.manual_seed(0)
    network = FaceParser()
    randomize_batch_norms(network, seed=0)
    return network.eval()


def batch_norm_by_hand(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
    return (x - bn.running_mean.view(1, -1, 1, 1)) * scale + bn.bias.view(1, -1, 1, 1)


def pointwise_by_hand(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """A bias-free 1x1 convolution as a channel matrix product."""
    return torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], x)


def upsample_align_corners_by_hand(x: Tensor, height: int, width: int) -> Tensor:
    """Bilinear resize where the corner pixels of input and output coincide: output pixel i samples
    input coordinate i * (size_in - 1) / (size_out - 1)."""

    def weights(size_in: int, size_out: int) -> Tensor:
        position = torch.arange(size_out, dtype=torch.float64) * (size_in - 1) / (size_out - 1)
        low = position.floor().long().clamp(max=size_in - 2)
        fraction = position - low
        matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
        matrix[torch.arange(size_out), low] = 1 - fraction
        matrix[torch.arange(size_out), low + 1] += fraction
        return matrix

    rows, cols = weights(x.shape[2], height), weights(x.shape[3], width)
    return torch.einsum("yh,nchw,xw->ncyx", rows, x.double(), cols).float()


def test_state_dict_matches_public_listing(parser):
    listing = read_listing()
    assert len(listing) == 191
    assert [(key, list(value.shape)) for key, value in parser.state_dict().items()] == listing
    tracked = [key for key, _ in listing if key.endswith("num_batches_tracked")]
    assert len(tracked) == 31
    assert all(parser.state_dict()[key].dtype == torch.int64 for key in tracked)


def test_class_constants():
    assert len(CELEBAMASK_CLASSES) == NUM_CLASSES == 19
    assert CELEBAMASK_CLASSES[0] == "background" and CELEBAMASK_CLASSES[HAIR_CLASS] == "hair"
    assert HAIR_CLASS == 17
    assert [CELEBAMASK_CLASSES[label] for label in FACE_CLASSES] == [
        "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "nose", "mouth", "u_lip", "l_lip",
    ]  # fmt: skip
    assert FaceParser().conv_out.conv_out.out_channels == NUM_CLASSES


def test_normalize_images_uses_imagenet_statistics():
    images = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(2, 3, 4, 4).clone()
    assert torch.equal(normalize_images(images), torch.zeros(2, 3, 4, 4))
    ones = normalize_images(torch.ones(1, 3, 1, 1)).flatten()
    expected = [(1 - mean) / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(ones, torch.tensor(expected))


@pytest.mark.parametrize("height,width", [(64, 64), (64, 96)])
def test_output_is_class_logits_at_input_size(parser, height, width):
    with torch.no_grad():
        logits = parser(torch.randn(2, 3, height, width))
    assert logits.shape == (2, NUM_CLASSES, height, width)
    assert torch.isfinite(logits).all()


def test_attention_refinement_math():
    torch.manual_seed(1)
    module = AttentionRefinementModule(6, 4)
    randomize_batch_norms(module, seed=1)
    module.eval()
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        feat = F.relu(batch_norm_by_hand(F.conv2d(x, module.conv.conv.weight, padding=1), module.conv.bn))
        pooled = feat.mean(dim=(2, 3), keepdim=True)
        attention = torch.sigmoid(
            batch_norm_by_hand(pointwise_by_hand(pooled, module.conv_atten), module.bn_atten)
        )
        torch.testing.assert_close(module(x), feat * attention, atol=1e-6, rtol=1e-5)


def test_feature_fusion_math():
    torch.manual_seed(2)
    module = FeatureFusionModule(8, 8)
    randomize_batch_norms(module, seed=2)
    module.eval()
    spatial, context = torch.randn(2, 3, 4, 6), torch.randn(2, 5, 4, 6)
    with torch.no_grad():
        joined = torch.cat([spatial, context], dim=1)
        feat = F.relu(batch_norm_by_hand(pointwise_by_hand(joined, module.convblk.conv), module.convblk.bn))
        pooled = feat.mean(dim=(2, 3), keepdim=True)
        hidden = F.relu(pointwise_by_hand(pooled, module.conv1))
        attention = torch.sigmoid(pointwise_by_hand(hidden, module.conv2))
        torch.testing.assert_close(module(spatial, context), feat * (1 + attention), atol=1e-6, rtol=1e-5)


def test_forward_wiring_matches_the_public_data_flow(parser):
    """Recompute the main output from the submodules: nearest 2x upsampling in the context path, the
    raw 1/8 ResNet features as the spatial input of the fusion, the main head only, and a corner-aligned
    bilinear upsampling of the 1/8 logits."""
    x = torch.randn(1, 3, 64, 96)
    cp = parser.cp
    with torch.no_grad():
        feat8, feat16, feat32 = cp.resnet(x)
        assert feat8.shape[2:] == (8, 12) and feat16.shape[2:] == (4, 6) and feat32.shape[2:] == (2, 3)
        global_context = cp.conv_avg(feat32.mean(dim=(2, 3), keepdim=True))
        summed32 = cp.arm32(feat32) + global_context
        up32 = cp.conv_head32(summed32.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
        summed16 = cp.arm16(feat16) + up32
        up16 = cp.conv_head16(summed16.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
        low_res = parser.conv_out(parser.ffm(feat8, up16))
        expected = upsample_align_corners_by_hand(low_res, 64, 96)
        torch.testing.assert_close(parser(x), expected, atol=1e-5, rtol=1e-4)
        # The half-pixel convention (align_corners=False) would give a visibly different map.
        half_pixel = F.interpolate(low_res, size=(64, 96), mode="bilinear", align_corners=False)
        assert (half_pixel - expected).abs().max() > 10 * (parser(x) - expected).abs().max()


def test_hair_and_face_masks_follow_argmax():
    labels = torch.tensor([[0, 17, 1, 7], [6, 13, 18, 10]])
    logits = F.one_hot(labels, NUM_CLASSES).permute(2, 0, 1).unsqueeze(0).float()
    hair, face = hair_and_face_masks(logits)
    assert hair.shape == face.shape == (1, 1, 2, 4) and hair.dtype == torch.float32
    assert hair[0, 0].tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]
    assert face[0, 0].tolist() == [[0, 0, 1, 0], [1, 1, 0, 1]]  # ear (7) and hat (18) are not face


def test_strict_load_of_public_layout_round_trips(parser, tmp_path):
    original = parser.state_dict()
    path = tmp_path / "79999_iter.pth"
    # A file's key order need not be the registration order.
    torch.save(dict(reversed(list(original.items()))), path)
    loaded_parser = load_face_parser_checkpoint(path)
    assert not loaded_parser.training
    loaded = loaded_parser.state_dict()
    assert list(loaded) == list(original)
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded_parser(x), parser(x))


def test_checkpoint_without_batch_counters_loads(parser, tmp_path):
    """A file from before torch 0.4.1 has no num_batches_tracked at all: accepted, as torch accepts it."""
    state = {key: value for key, value in parser.state_dict().items() if "num_batches_tracked" not in key}
    assert len(state) == 160
    path = tmp_path / "old_torch.pth"
    torch.save(state, path)
    loaded = load_face_parser_checkpoint(path).state_dict()
    assert torch.equal(loaded["conv_out.conv_out.weight"], state["conv_out.conv_out.weight"])
    assert int(loaded["cp.resnet.bn1.num_batches_tracked"]) == 0

    state["ffm.convblk.bn.num_batches_tracked"] = torch.tensor(5)  # only some counters: a damaged file
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys: cp\.resnet\.bn1\.num_batches_tracked"):
        load_face_parser_checkpoint(path)


def test_wrong_checkpoints_name_the_keys(parser, tmp_path):
    state = dict(parser.state_dict())
    del state["cp.arm16.bn_atten.running_var"]
    state["cp.sp.conv1.conv.weight"] = torch.zeros(64, 3, 7, 7)  # a spatial path the public file lacks
    state["conv_out.conv_out.weight"] = torch.zeros(20, 256, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_face_parser_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "missing keys: cp.arm16.bn_atten.running_var" in message
    assert "unexpected keys: cp.sp.conv1.conv.weight" in message
    assert "conv_out.conv_out.weight (expected [19, 256, 1, 1], got [20, 256, 1, 1])" in message

    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_face_parser_checkpoint(tmp_path / "absent.pth")


@pytest.fixture(scope="module")
def onnx_path(parser, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("parser") / "face_parser.onnx"
    export_onnx(
        parser,
        (torch.randn(1, 3, 64, 64),),
        path,
        input_names=["image"],
        output_names=["logits"],
        max_batch=4,
        dynamic_axes={"image": {2: "height", 3: "width"}},
    )
    return path


def test_onnx_has_dynamic_batch_and_size(onnx_path):
    inputs, outputs = tensor_specs(onnx_path)
    assert [spec.to_dict() for spec in inputs] == [
        {"name": "image", "dtype": "float32", "shape": [3, -1, -1]}
    ]
    assert [spec.to_dict() for spec in outputs] == [
        {"name": "logits", "dtype": "float32", "shape": [NUM_CLASSES, -1, -1]}
    ]


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (3, 3, 96, 64)], ids=["1x64x64", "3x96x64"])
def test_onnx_runtime_matches_pytorch(parser, onnx_path, shape):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = parser(x)
    (actual,) = run_onnx(session, (x,))
    assert actual.shape == tuple(reference.shape)
    scale = float(reference.abs().max())
    assert max_abs_error(reference, actual) <= 1e-4 * max(scale, 1.0)
