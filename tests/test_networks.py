"""HR-VITON networks: checkpoint layout, strict loading, spectral-norm folding, shapes and warping."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fashionserve.checkpoints import CheckpointError, load_strict, read_state_dict, sha256_file
from fashionserve.tryon.networks.condition_generator import ConditionGenerator, flow_divisors
from fashionserve.tryon.networks.image_generator import ImageGenerator

LISTING = Path(__file__).parent.parent / "fashionserve" / "tryon" / "networks" / "hrviton_state_dict_keys.txt"
NETWORKS = {"tocg": ConditionGenerator, "gen": ImageGenerator}


def read_listing(path: Path = LISTING) -> dict[str, list[tuple[str, list[int]]]]:
    """Sections of an official key/shape listing: name -> [(key, shape)] in file order."""
    sections: dict[str, list[tuple[str, list[int]]]] = {}
    current: list[tuple[str, list[int]]] = []
    for line in path.read_text().splitlines():
        if line.startswith("## SECTION "):
            current = sections.setdefault(line.split()[2].rstrip(":"), [])
        elif line.strip() and not line.startswith("#"):
            key, shape = line.split()
            current.append((key, [int(d) for d in shape.strip("[]").split(",") if d]))
    return sections


@pytest.fixture(scope="module")
def default_networks() -> dict[str, nn.Module]:
    """Default (public) configurations, built once: the full-size generator takes a few seconds."""
    torch.manual_seed(0)
    return {name: cls() for name, cls in NETWORKS.items()}


def small_image_generator(**kwargs) -> ImageGenerator:
    options = dict(ngf=8, height=256, width=192, num_upsampling_layers="more", spade_hidden=16)
    return ImageGenerator(**{**options, **kwargs}).eval()


def one_hot_segmentation(batch: int, height: int, width: int, classes: int = 7) -> torch.Tensor:
    labels = torch.randint(0, classes, (batch, height, width))
    return F.one_hot(labels, classes).permute(0, 3, 1, 2).float().contiguous()


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_default_state_dict_matches_official_listing(default_networks, name):
    listing = read_listing()
    assert sorted(listing) == ["gen", "tocg"]
    actual = [(key, list(value.shape)) for key, value in default_networks[name].state_dict().items()]
    assert actual == listing[name]
    # Spot-check facts from the research notes against the listing itself.
    assert len(listing["tocg"]) == 262 and len(listing["gen"]) == 264


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_strict_load_of_official_layout_round_trips(default_networks, name, tmp_path):
    original = default_networks[name].state_dict()
    path = tmp_path / f"{name}.pth"
    torch.save(original, path)

    torch.manual_seed(1)
    fresh = NETWORKS[name]()
    probe = {"gen": "head_0.conv_0.weight_orig", "tocg": "conv.scale.weight"}[name]
    assert not torch.equal(fresh.state_dict()[probe], original[probe])  # the load must change something
    load_strict(fresh, read_state_dict(path), name)
    loaded = fresh.state_dict()
    assert list(loaded) == list(original)
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key


def test_read_state_dict_unwraps_and_strips_module_prefix(tmp_path):
    torch.manual_seed(0)
    network = ConditionGenerator(ngf=8)
    state = network.state_dict()
    wrapped = {f"module.{key}": value for key, value in state.items()}
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": wrapped, "epoch": 3}, path)
    read = read_state_dict(path)
    assert list(read) == list(state)
    fresh = ConditionGenerator(ngf=8)
    load_strict(fresh, read, "wrapped checkpoint")
    assert torch.equal(fresh.state_dict()["flow_conv.4.weight"], state["flow_conv.4.weight"])


def test_sha256_file(tmp_path):
    path = tmp_path / "abc.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_mismatched_checkpoint_names_every_problem(tmp_path):
    torch.manual_seed(0)
    state = ConditionGenerator(ngf=8).state_dict()
    del state["flow_conv.2.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["conv1.0.weight"] = torch.zeros(32, 9, 1, 1)  # expected [32, 8, 1, 1]
    path = tmp_path / "bad.pth"
    torch.save(state, path)

    with pytest.raises(CheckpointError) as info:
        load_strict(ConditionGenerator(ngf=8), read_state_dict(path), "condition generator checkpoint")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("condition generator checkpoint")
    assert "missing keys: flow_conv.2.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "conv1.0.weight (expected [32, 8, 1, 1], got [32, 9, 1, 1])" in message


def test_many_missing_keys_are_summarised():
    with pytest.raises(CheckpointError, match=r"missing keys: .* \.\.\. and \d+ more") as info:
        load_strict(ConditionGenerator(ngf=8), {}, "empty")
    assert str(info.value).count(",") == 4  # five keys named, then the count


@pytest.mark.parametrize(
    "content",
    [b"definitely not a checkpoint", None, [torch.zeros(1)], {"a": torch.zeros(1), "b": 3}, {}],
    ids=["text", "missing", "list", "non-tensor", "empty"],
)
def test_unreadable_checkpoints_raise_checkpoint_error(tmp_path, content):
    path = tmp_path / "model.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_spectral_norm_is_converged_at_construction_and_folding_keeps_output():
    torch.manual_seed(0)
    generator = small_image_generator()
    x, seg = torch.randn(2, 9, 256, 192), one_hot_segmentation(2, 256, 192)
    with torch.no_grad():
        before = generator(x, seg)
    generator.fold_spectral_norm()
    generator.fold_spectral_norm()  # idempotent
    with torch.no_grad():
        after = generator(x, seg)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)

    keys = generator.state_dict().keys()
    assert not [key for key in keys if key.endswith(("weight_orig", "weight_u", "weight_v"))]
    assert "head_0.conv_0.weight" in keys and "up_3.conv_s.weight" in keys
    # Folded weights are spectrally normalised: largest singular value ~1 (the power-iteration estimate
    # never exceeds the true value, so >= 1; random, unconverged u/v would give arbitrary values).
    for name in ("head_0.conv_0", "G_middle_0.conv_s", "up_3.conv_1"):
        weight = generator.get_submodule(name).weight
        assert 0.9999 <= torch.linalg.matrix_norm(weight.flatten(1), ord=2).item() < 1.1, name


def test_condition_generator_output_shapes():
    torch.manual_seed(0)
    network = ConditionGenerator(ngf=8).eval()
    with torch.no_grad():
        flows, segmentation, warped_cloth, warped_mask = network(
            torch.randn(2, 4, 256, 192), torch.randn(2, 16, 256, 192)
        )
    assert [tuple(f.shape) for f in flows] == [
        (2, 8, 6, 2),
        (2, 16, 12, 2),
        (2, 32, 24, 2),
        (2, 64, 48, 2),
        (2, 128, 96, 2),
    ]
    assert segmentation.shape == (2, 13, 256, 192) and segmentation.min() >= 0  # ReLU output layer
    assert warped_cloth.shape == (2, 3, 256, 192) and warped_mask.shape == (2, 1, 256, 192)
    assert segmentation.std() > 0


def test_condition_generator_warps_with_official_grid_and_divisors():
    """A constant flow (dx, dy) in flow-grid pixels from the coarsest level only must shift a ramp image
    by exactly the official grid: x = linspace(-1, 1, W) + dx / 47.5, sampled with align_corners=False
    and border padding."""
    assert flow_divisors(256, 192) == (47.5, 63.5)
    assert [flow_divisors(256 // 2**k, 192 // 2**k) for k in (4, 3, 2, 1)] == [
        (2.5, 3.5), (5.5, 7.5), (11.5, 15.5), (23.5, 31.5)
    ]  # fmt: skip
    dx, dy = 1.5, -2.0
    network = ConditionGenerator(ngf=8).eval()
    with torch.no_grad():
        for conv in network.flow_conv:
            conv.weight.zero_()
            conv.bias.zero_()
        network.flow_conv[0].bias.copy_(torch.tensor([dx, dy]))
    height, width = 256, 192
    cols = torch.arange(width, dtype=torch.float32).expand(height, width)
    rows = torch.arange(height, dtype=torch.float32).view(-1, 1).expand(height, width)
    cloth = torch.stack([cols, rows, cols, rows]).unsqueeze(0)
    with torch.no_grad():
        flows, _, warped_cloth, warped_mask = network(cloth, torch.randn(1, 16, height, width))
    for flow in flows:
        torch.testing.assert_close(flow, torch.tensor([dx, dy]).expand_as(flow), atol=1e-5, rtol=0)

    def expected(size: int, shift: float) -> torch.Tensor:
        grid = -1.0 + 2.0 * torch.arange(size, dtype=torch.float64) / (size - 1) + shift
        return (((grid + 1.0) * size - 1.0) / 2.0).clamp(0, size - 1).float()  # align_corners=False pixels

    torch.testing.assert_close(warped_cloth[0, 0, 5], expected(width, dx / 47.5), atol=2e-3, rtol=0)
    torch.testing.assert_close(warped_cloth[0, 1, :, 7], expected(height, dy / 63.5), atol=2e-3, rtol=0)
    torch.testing.assert_close(warped_mask[0, 0, :, 7], expected(height, dy / 63.5), atol=2e-3, rtol=0)


def test_condition_generator_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible by 32"):
        ConditionGenerator(ngf=8, height=250, width=192)
    with pytest.raises(ValueError, match="cloth_input must be 256x192"):
        ConditionGenerator(ngf=8)(torch.randn(1, 4, 128, 96), torch.randn(1, 16, 256, 192))


@pytest.mark.parametrize(
    ("height", "width", "mode"), [(256, 192, "normal"), (256, 192, "more"), (512, 384, "most")]
)
def test_image_generator_output_shape_and_range(height, width, mode):
    torch.manual_seed(0)
    generator = small_image_generator(height=height, width=width, num_upsampling_layers=mode)
    # Inputs at another size are resized (nearest), as in the official forward.
    x, seg = torch.randn(2, 9, height // 2, width // 2), one_hot_segmentation(2, height // 2, width // 2)
    with torch.no_grad():
        out = generator(x, seg)
    assert out.shape == (2, 3, height, width)
    assert out.min() >= -1 and out.max() <= 1 and out.std() > 1e-3


def test_image_generator_validates_configuration():
    with pytest.raises(ValueError, match="divisible by 128"):
        ImageGenerator(ngf=8, height=256, width=192, num_upsampling_layers="most", spade_hidden=16)
    with pytest.raises(ValueError, match="num_upsampling_layers must be one of"):
        ImageGenerator(ngf=8, height=256, width=192, num_upsampling_layers="many", spade_hidden=16)
    assert "up_4.conv_0.weight_orig" not in small_image_generator().state_dict()


def test_spade_noise_switch():
    torch.manual_seed(0)
    deterministic = small_image_generator()
    noisy = small_image_generator(noise=True)
    load_strict(noisy, deterministic.state_dict(), "same weights")  # noise_scale exists either way
    x, seg = torch.randn(1, 9, 256, 192), one_hot_segmentation(1, 256, 192)
    with torch.no_grad():
        reference = deterministic(x, seg)
        assert torch.equal(deterministic(x, seg), reference)
        # Zero noise_scale (the initial value): noise adds exactly nothing.
        torch.testing.assert_close(noisy(x, seg), reference, atol=1e-6, rtol=0)
        for name, parameter in noisy.named_parameters():
            if name.endswith("noise_scale"):
                parameter.fill_(0.5)
        first, second = noisy(x, seg), noisy(x, seg)
    assert (first - second).abs().max() > 1e-3
    assert (first - reference).abs().max() > 1e-3
