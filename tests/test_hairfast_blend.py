"""HairFastGAN colour step: CLIP ViT-B/32 image encoder and the blending encoder. Public key layouts,
parity with our re-typing of the public code (tests/hairfast_blend_reference.py: openai/CLIP @ a1d0717,
AIRI-Institute/HairFastGAN @ 49e9801) on seeded random weights, strict loading of the released file
layouts (including a TorchScript archive read without TorchScript) and ONNX export parity."""

import copy
import io
import os
import pickle
import zipfile
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from fashionserve.checkpoints import CheckpointError, read_torchscript_state_dict
from fashionserve.hair.networks.blending import (
    BlendingEncoder,
    ColorBlending,
    HairMaskMorphology,
    load_blending_checkpoint,
    load_color_blending,
)
from fashionserve.hair.networks.clip_image import (
    ClipImageEncoder,
    ClipImagePreprocess,
    load_clip_image_encoder,
)
from fashionserve.onnx_export import export_onnx, max_abs_error, run_onnx
from tests import hairfast_blend_reference as reference
from tests.test_networks import read_listing

NETWORKS = Path(__file__).parent.parent / "fashionserve" / "hair" / "networks"
# Tiny configurations: same code paths as ViT-B/32 (224 px, patch 32, width 768, 12 x 12 heads, 512) and
# the public blending encoder (latent 512, middle 1024); the image size is not a multiple of the CLIP
# resolution so that adaptive pooling averages uneven windows, as 256 -> 224 does.
TINY_CLIP = dict(resolution=32, patch_size=8, width=32, layers=2, heads=4, output_dim=16)
TINY_LATENT, TINY_MIDDLE, TINY_IMAGE = 16, 32, 36
HAIR_LABEL = 13  # CelebA-mask hair label that HairFastGAN's masks test for


def keys_and_shapes(module: nn.Module, prefix: str = "") -> list[tuple[str, list[int]]]:
    return [(prefix + key, list(value.shape)) for key, value in module.state_dict().items()]


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Seeded random values for every parameter, LayerNorm gains and biases included (their 1 / 0
    initial values would hide terms of the arithmetic)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("weight") and parameter.dim() == 1:  # LayerNorm gain: keep it near 1
                parameter.copy_(1 + 0.2 * noise)
            else:
                parameter.copy_(noise * parameter.shape[-1] ** -0.5)
    return module.eval()


def tiny_reference_tower(seed: int = 0) -> reference.CLIPImageTower:
    config = TINY_CLIP
    visual = reference.VisionTransformer(
        config["resolution"],
        config["patch_size"],
        config["width"],
        config["layers"],
        config["heads"],
        config["output_dim"],
    )
    return randomize(reference.CLIPImageTower(visual), seed)


def tiny_reference_blending(seed: int = 0) -> reference.ClipBlendingModel:
    model = reference.ClipBlendingModel(
        tiny_reference_tower(seed),
        latent=TINY_LATENT,
        embed=TINY_CLIP["output_dim"],
        middle=TINY_MIDDLE,
        resolution=TINY_CLIP["resolution"],
    )
    randomize(model.modulation_module_list, seed + 1)
    return model.eval()


def tiny_color_blending(model: reference.ClipBlendingModel) -> ColorBlending:
    """Our ColorBlending holding the reference model's weights (strictly loaded)."""
    clip = ClipImageEncoder(**TINY_CLIP)
    clip.load_state_dict(model.clip_model.state_dict(), strict=True)
    encoder = BlendingEncoder(latent_dim=TINY_LATENT, embed_dim=TINY_CLIP["output_dim"], middle=TINY_MIDDLE)
    trained = {k: v for k, v in model.state_dict().items() if not k.startswith("clip_model.")}
    encoder.load_state_dict(trained, strict=True)
    return ColorBlending(clip, encoder).eval()


def images(batch: int, seed: int, size: int = TINY_IMAGE) -> Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def blob_labels(batch: int, seed: int, size: int = TINY_IMAGE) -> Tensor:
    """CelebA-style label maps [B, 1, S, S] with random hair (13) blobs and other labels elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, size // 6, size // 6, generator=generator) > 0.5
    hair = torch.nn.functional.interpolate(coarse.float(), size=(size, size), mode="nearest").bool()
    others = torch.randint(0, 13, (batch, 1, size, size), generator=generator)
    return torch.where(hair, torch.full_like(others, HAIR_LABEL), others)


def hair_of(labels: Tensor) -> Tensor:
    return (labels == HAIR_LABEL).float()


def blending_inputs(batch: int, seed: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "latent_face": torch.randn(batch, 18, TINY_LATENT, generator=generator),
        "latent_color": torch.randn(batch, 18, TINY_LATENT, generator=generator),
        "face_image": images(batch, seed + 1),
        "color_image": images(batch, seed + 2),
        "face_labels": blob_labels(batch, seed + 3),
        "color_labels": blob_labels(batch, seed + 4),
        "target_hair": hair_of(blob_labels(batch, seed + 5)),
    }


def ours_inputs(inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
    return (
        inputs["latent_face"],
        inputs["latent_color"],
        inputs["face_image"],
        inputs["color_image"],
        hair_of(inputs["face_labels"]),
        hair_of(inputs["color_labels"]),
        inputs["target_hair"],
    )


# --- key layouts ----------------------------------------------------------------------------------------


def test_clip_image_encoder_keys_equal_the_public_visual_listing():
    listing = read_listing(NETWORKS / "clip_vit_b32_state_dict_keys.txt")
    assert len(listing["visual"]) == 152
    with torch.device("meta"):
        encoder = ClipImageEncoder()
    assert keys_and_shapes(encoder) == listing["visual"]
    assert sum(p.numel() for p in encoder.parameters()) == 87_849_216


def test_blending_encoder_keys_equal_the_public_checkpoint_listing():
    listing = read_listing(NETWORKS / "blending_state_dict_keys.txt")
    assert len(listing["model_state_dict"]) == 70
    with torch.device("meta"):
        encoder = BlendingEncoder()
    assert keys_and_shapes(encoder) == listing["model_state_dict"]


# --- parity with the re-typed public code ---------------------------------------------------------------


def test_clip_image_encoder_equals_reference_get_image_embed():
    model = tiny_reference_blending(seed=1)
    ours = tiny_color_blending(model).clip
    x = images(3, seed=2)
    with torch.no_grad():
        expected = model.get_image_embed(x)
        actual = ours(x)
    assert actual.shape == (3, TINY_CLIP["output_dim"])
    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-5)


def test_clip_preprocess_pools_and_normalizes_like_hairfastgan_at_256():
    """Public sizes: 256 -> 224 adaptive average pooling (uneven 1.14 px windows), [-1, 1] -> CLIP stats."""
    x = images(2, seed=3, size=256)
    pooled = torch.nn.AdaptiveAvgPool2d((224, 224))(x)
    mean = torch.tensor(reference.NORMALIZE_MEAN).view(-1, 1, 1)
    std = torch.tensor(reference.NORMALIZE_STD).view(-1, 1, 1)
    torch.testing.assert_close(ClipImagePreprocess()(x), (pooled * 0.5 + 0.5 - mean) / std, rtol=0, atol=1e-6)


def test_hair_morphology_equals_reference_dilate_erosion():
    masks = hair_of(blob_labels(3, seed=4))
    dilated, eroded = reference.DilateErosion(5).mask(masks)
    morphology = HairMaskMorphology(5)
    assert torch.equal(morphology.dilate(masks), dilated)
    assert torch.equal(morphology.erode(masks), eroded)
    assert dilated.sum() > masks.sum() > eroded.sum() > 0  # the masks exercise both operations


def test_blending_encoder_equals_reference_modulation():
    """In float64, so that constants whose effect is below float32 resolution (LayerNorm eps) show."""
    model = tiny_reference_blending(seed=5)
    ours = tiny_color_blending(model).encoder.double()
    inputs = blending_inputs(2, seed=6)
    embeds = torch.randn(4, TINY_CLIP["output_dim"], generator=torch.Generator().manual_seed(7)).double()

    class FixedEmbeddings(nn.Module):  # stands in for CLIP: returns given embeddings in call order
        def __init__(self):
            super().__init__()
            self.calls = iter((embeds[:2], embeds[2:]))

        def encode_image(self, _image):
            return next(self.calls)

    model.clip_model = FixedEmbeddings()
    model.modulation_module_list.double()
    latent_face, latent_color = (inputs[name][:, 6:].double() for name in ("latent_face", "latent_color"))
    with torch.no_grad():
        expected = model(latent_face, latent_color, inputs["face_image"], inputs["color_image"])
        actual = ours(latent_face, latent_color, embeds[:2], embeds[2:])
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    assert (actual - latent_face).abs().max() > 1e-2  # the modulation changes the latent


def test_color_blending_equals_reference_blend_images():
    model = tiny_reference_blending(seed=8)
    ours = tiny_color_blending(model)
    inputs = blending_inputs(2, seed=9)
    expected = []
    for i in range(2):  # upstream blends one face at a time
        sample = {key: value[i : i + 1] for key, value in inputs.items()}
        face = {"S": sample["latent_face"], "image_norm_256": sample["face_image"]}
        color = {"S": sample["latent_color"], "image_norm_256": sample["color_image"]}
        expected.append(
            reference.blend_latents(
                model, face, color, sample["face_labels"], sample["color_labels"], sample["target_hair"]
            )
        )
    with torch.no_grad():
        actual = ours(*ours_inputs(inputs))
    torch.testing.assert_close(actual, torch.cat(expected), rtol=0, atol=2e-5)
    assert torch.equal(actual[:, :6], inputs["latent_face"][:, :6])


# --- loading the released layouts -----------------------------------------------------------------------


class OpenAIClipLike(nn.Module):
    """A tiny stand-in for OpenAI's CLIP module as its TorchScript file holds it: `visual` plus text-tower
    entries and the three scalar entries clip.build_model drops."""

    def __init__(self, tower: reference.CLIPImageTower):
        super().__init__()
        self.visual = tower.visual
        self.token_embedding = nn.Embedding(10, 8)
        self.positional_embedding = nn.Parameter(torch.randn(5, 8))
        self.text_projection = nn.Parameter(torch.randn(8, TINY_CLIP["output_dim"]))
        self.logit_scale = nn.Parameter(torch.ones([]))
        for name, value in (("input_resolution", 32), ("context_length", 5), ("vocab_size", 10)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, image: Tensor) -> Tensor:
        return self.visual(image)


@pytest.fixture(scope="module")
def clip_archive(tmp_path_factory) -> tuple[Path, reference.CLIPImageTower]:
    """A TorchScript archive (torch.jit.save of a traced module, float16 like the published file) and the
    reference tower holding the same (fp16-rounded) weights in float32."""
    tower = tiny_reference_tower(seed=10)
    traced = torch.jit.trace(OpenAIClipLike(copy.deepcopy(tower)), torch.zeros(1, 3, 32, 32)).half()
    path = tmp_path_factory.mktemp("clip") / "ViT-B-32.pt"
    torch.jit.save(traced, str(path))
    return path, tower.half().float()


def test_torchscript_reader_equals_jit_state_dict(clip_archive):
    path, _ = clip_archive
    expected = torch.jit.load(str(path)).state_dict()
    actual = read_torchscript_state_dict(path)
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


def test_torchscript_reader_without_declarations_takes_every_tensor_attribute(clip_archive, tmp_path):
    """An archive whose code/ cannot be read: all tensor attributes, which for this module (no plain
    tensor attributes) is still the state dict."""
    path, _ = clip_archive
    stripped = tmp_path / "no_code.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(stripped, "w") as target:
        for entry in source.namelist():
            if "/code/" not in entry:
                target.writestr(entry, source.read(entry))
    expected = read_torchscript_state_dict(path)
    actual = read_torchscript_state_dict(stripped)
    assert sorted(actual) == sorted(expected)
    assert all(torch.equal(actual[key], value) for key, value in expected.items())


def test_clip_encoder_loads_archive_and_state_dict_files(clip_archive, tmp_path):
    path, tower = clip_archive
    x = images(2, seed=11)
    model = tiny_reference_blending()
    model.clip_model = tower
    with torch.no_grad():
        expected = model.get_image_embed(x)
        from_archive = load_clip_image_encoder(path, ClipImageEncoder(**TINY_CLIP))(x)
        plain = tmp_path / "clip_state_dict.pt"
        torch.save(torch.jit.load(str(path)).state_dict(), plain)
        from_state_dict = load_clip_image_encoder(plain, ClipImageEncoder(**TINY_CLIP))(x)
    torch.testing.assert_close(from_archive, expected, rtol=0, atol=2e-5)
    assert from_archive.dtype == torch.float32 and torch.equal(from_archive, from_state_dict)


def test_color_blending_loads_both_released_files(clip_archive, tmp_path):
    path, tower = clip_archive
    model = tiny_reference_blending(seed=19)
    model.clip_model = tower
    blending_file = tmp_path / "checkpoint.pth"
    trained = {k: v for k, v in model.state_dict().items() if not k.startswith("clip_model.")}
    torch.save({"model_state_dict": trained}, blending_file)
    network = ColorBlending(ClipImageEncoder(**TINY_CLIP), tiny_encoder())
    loaded = load_color_blending(blending_file, path, network)
    inputs = blending_inputs(1, seed=20)
    face = {"S": inputs["latent_face"], "image_norm_256": inputs["face_image"]}
    color = {"S": inputs["latent_color"], "image_norm_256": inputs["color_image"]}
    expected = reference.blend_latents(
        model, face, color, inputs["face_labels"], inputs["color_labels"], inputs["target_hair"]
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(*ours_inputs(inputs)), expected, rtol=0, atol=2e-5)


def test_clip_loader_names_missing_unexpected_and_misshaped_keys(clip_archive, tmp_path):
    state = dict(torch.jit.load(str(clip_archive[0])).state_dict())
    del state["visual.ln_post.bias"]
    state["visual.extra"] = torch.zeros(1)
    state["visual.proj"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_clip_image_encoder(path, ClipImageEncoder(**TINY_CLIP))
    message = str(error.value)
    assert "missing keys: ln_post.bias" not in message  # keys are named as in the file
    assert "visual.ln_post.bias" in message and "visual.extra" in message
    assert "visual.proj (expected [32, 16], got [3, 3])" in message
    text_only = tmp_path / "text.pt"
    torch.save({"logit_scale": torch.ones([])}, text_only)
    with pytest.raises(CheckpointError, match="no visual"):
        load_clip_image_encoder(text_only, ClipImageEncoder(**TINY_CLIP))


def test_torchscript_reader_refuses_foreign_constructors(tmp_path):
    """A data.pkl that names any callable outside the closed list stops the read; nothing is run."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    payload = pickle.dumps(Evil(), protocol=2)
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", payload)
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("evil/version", "3\n")
    with pytest.raises(CheckpointError, match=r"refusing to construct (posix|os)\.system"):
        read_torchscript_state_dict(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not a TorchScript archive"):
        buffer = io.BytesIO()
        torch.save({"a": torch.zeros(1)}, buffer)
        (tmp_path / "plain.pt").write_bytes(buffer.getvalue())
        read_torchscript_state_dict(tmp_path / "plain.pt")


def tiny_encoder() -> BlendingEncoder:
    return BlendingEncoder(latent_dim=TINY_LATENT, embed_dim=TINY_CLIP["output_dim"], middle=TINY_MIDDLE)


def test_blending_loader_accepts_the_public_wrapping_only(tmp_path):
    state = randomize(tiny_encoder(), seed=12).state_dict()
    good = tmp_path / "checkpoint.pth"
    torch.save({"model_state_dict": state}, good)
    loaded = load_blending_checkpoint(good, tiny_encoder())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    torch.save({"model_state_dict": state, "clip": "ViT-B/32"}, good)
    load_blending_checkpoint(good, tiny_encoder())

    cases = {
        "bare": (state, "no 'model_state_dict'"),
        "other_clip": ({"model_state_dict": state, "clip": "ViT-L/14"}, "'ViT-L/14', not ViT-B/32"),
        "with_clip": (
            {"model_state_dict": {**state, "clip_model.visual.proj": torch.zeros(1)}},
            "unexpected keys: clip_model.visual.proj",
        ),
        "misshaped": (
            {"model_state_dict": {**state, "modulation_module_list.0.fc.bias": torch.zeros(3)}},
            r"modulation_module_list.0.fc.bias \(expected \[16\], got \[3\]\)",
        ),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(content, path)
        with pytest.raises(CheckpointError, match=message):
            load_blending_checkpoint(path, tiny_encoder())
    missing = {k: v for k, v in state.items() if k != "modulation_module_list.4.beta_function.3.bias"}
    torch.save({"model_state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing keys: modulation_module_list.4.beta_function.3.bias"):
        load_blending_checkpoint(tmp_path / "missing.pth", tiny_encoder())


# --- ONNX -----------------------------------------------------------------------------------------------


def test_color_blending_exports_with_dynamic_batch(tmp_path):
    # One transformer layer and two morphology steps: the same operators, a shorter export.
    clip = randomize(ClipImageEncoder(**{**TINY_CLIP, "layers": 1}), seed=13)
    ours = ColorBlending(clip, randomize(tiny_encoder(), seed=14), smooth=2).eval()
    path = tmp_path / "color_blending.onnx"
    names = [
        "latent_face",
        "latent_color",
        "face_image",
        "color_image",
        "face_hair",
        "color_hair",
        "target_hair",
    ]
    export_onnx(ours, ours_inputs(blending_inputs(2, seed=14)), path, names, ["latent_blend"], max_batch=8)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "MatMul" in ops and "Softmax" in ops and not ops & {"Attention", "MultiHeadAttention"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        inputs = ours_inputs(blending_inputs(batch, seed=15 + batch))
        with torch.no_grad():
            expected = ours(*inputs)
        (actual,) = run_onnx(session, inputs)
        assert actual.shape == (batch, 18, TINY_LATENT)
        assert max_abs_error(expected, actual) < 1e-4


def test_clip_image_encoder_exports_at_public_preprocessing_size(tmp_path):
    """256 x 256 input pooled to the CLIP resolution, the public sizes of the preprocessing."""
    clip = randomize(
        ClipImageEncoder(resolution=224, patch_size=32, width=32, layers=1, heads=2, output_dim=8), 16
    )
    path = tmp_path / "clip.onnx"
    export_onnx(clip, (images(2, seed=17, size=256),), path, ["image"], ["embedding"], max_batch=4)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images(3, seed=18, size=256)
    with torch.no_grad():
        expected = clip(x)
    assert max_abs_error(expected, run_onnx(session, (x,))[0]) < 1e-4
