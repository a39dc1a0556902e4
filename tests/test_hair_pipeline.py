"""The hair bundle: manifest, stage parity, the edit composite, rendering, the ensembles' step structure,
`hair_edit` through the real Triton, bad inputs, loading HairFastGAN's released file layout, and the
export CLI. The transfer against the public HairFastGAN code is tests/test_hairfast_transfer.py."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tritonclient.utils import InferenceServerException

from fashionserve.client import ClientError, TritonModelClient
from fashionserve.hair.bundle import (
    EDIT,
    HAIRFAST_FILES,
    PIPELINE,
    STAGES,
    TRANSFER,
    HairWeights,
    build_networks,
    edit_inputs,
    load_networks,
    stage_runs,
    transfer_inputs,
)
from fashionserve.hair.networks.blending import SMOOTH_STEPS
from fashionserve.hair.networks.parser import HAIR_CLASS, NUM_CLASSES
from fashionserve.hair.samples import draw_portrait
from fashionserve.hair.stages import HairComposite, HairConfig, HairPipeline
from fashionserve.onnx_export import run_onnx
from fashionserve.repository import TRACKED_REPOSITORY, RenderError, read_config, render_repository
from tests.conftest import HAIR_CONFIG, one_line_error, run_cli
from tests.test_tryon_pipeline import raw_infer

SIZE = HAIR_CONFIG.image_size
N_LATENT, STYLE_DIM = HAIR_CONFIG.n_latent, HAIR_CONFIG.style_dim
SKIN = 1  # BiSeNet's skin class
INPUTS = {
    TRANSFER: ("face", "shape_reference", "color_reference"),
    EDIT: ("portrait", "direction", "strength"),
}
HEAVY = [
    "hair_encoder", "hair_fs_encoder", "hair_parser", "hair_w_features", "hair_generator",
    "hair_generated_labels", "hair_shape_target", "hair_inpaint", "hair_color_blend", "hair_blend_synthesis",
    "hair_post_process", "hair_final_synthesis",
]  # fmt: skip


def inputs_of(ensemble: str, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    return (transfer_inputs if ensemble == TRANSFER else edit_inputs)(HAIR_CONFIG, batch, seed)


def test_manifest_records_both_ensembles_and_parity(hair_bundle):
    _, manifest = hair_bundle
    assert manifest["pipeline"] == PIPELINE and list(manifest["ensembles"]) == [TRANSFER, EDIT]
    assert manifest["architecture"] == "hairfastgan" and manifest["weights"] == "random-init"
    assert manifest["config"]["widths"] == "tiny" and manifest["config"]["n_latent"] == N_LATENT
    assert manifest["label_order"].index("hair") == 13  # CtrlHair's order (BiSeNet's hair is 17)
    assert list(manifest["models"]) == [s.name for s in STAGES]
    image = {"dtype": "uint8", "shape": [SIZE, SIZE, 3]}
    transfer, edit = manifest["ensembles"][TRANSFER], manifest["ensembles"][EDIT]
    assert transfer["input_contract"] == [{"name": name, **image} for name in INPUTS[TRANSFER]]
    assert edit["input_contract"] == [
        {"name": "portrait", **image},
        {"name": "direction", "dtype": "float32", "shape": [N_LATENT, STYLE_DIM]},
        {"name": "strength", "dtype": "float32", "shape": [1]},
    ]
    assert transfer["output_contract"] == edit["output_contract"] == [{"name": "hair_image", **image}]
    for stage in STAGES:
        errors = manifest["models"][stage.name]["parity_max_error"]
        assert set(errors) == set(stage.outputs) and all(0 <= e <= stage.tolerance for e in errors.values())


def test_every_stage_matches_pytorch_on_new_inputs(hair_bundle, hair_pipeline):
    """ONNX Runtime against the PyTorch stages on inputs the export never saw (batch 3, other seeds)."""
    directory = hair_bundle[0]
    recorded = {**stage_runs(hair_pipeline, EDIT, inputs_of(EDIT, 3, 11))}
    recorded.update(stage_runs(hair_pipeline, TRANSFER, inputs_of(TRANSFER, 3, 11)))
    for stage in STAGES:
        session = ort.InferenceSession(
            str(directory / stage.name / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        args, expected = recorded[stage.name]
        for name, want, got in zip(stage.outputs, expected, run_onnx(session, args), strict=True):
            assert got.shape == tuple(want.shape), (stage.name, name)
            if want.dtype == torch.int64:
                error = float((want.numpy() != got).mean())
            else:
                error = np.abs(want.double().numpy() - got.astype(np.float64)).max()
            assert error <= stage.tolerance, (stage.name, name, error)


def one_hot_logits(labels: np.ndarray) -> torch.Tensor:
    """Parser logits (1 x classes x H x W) whose argmax is `labels`."""
    return torch.from_numpy(np.eye(NUM_CLASSES, dtype=np.float32)[labels].transpose(2, 0, 1)[None] * 10.0)


def test_edit_composite_replaces_only_the_feathered_hair_region():
    """Image 256 px, parser 128 px: outside the hair region grown by the feathering radius the output is
    the portrait bit for bit; deep inside it, the generated image; the face under no new hair is kept."""
    composite = HairComposite(HAIR_CONFIG)
    radius = composite.radius  # parser pixels
    p = HAIR_CONFIG.parser_size
    portrait_labels = np.zeros((p, p), np.int64)
    portrait_labels[8:40, 16:112] = HAIR_CLASS  # old hair above the face
    portrait_labels[40:120, 32:96] = SKIN
    portrait_labels[40:80, 24:32] = HAIR_CLASS  # old hair beside the face
    generated_labels = np.zeros((p, p), np.int64)
    generated_labels[16:56, 40:88] = HAIR_CLASS  # new hair, partly over the forehead (bangs)
    generated_labels[56:120, 32:96] = SKIN
    portrait = torch.from_numpy(draw_portrait(0, SIZE))[None]
    generated = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        out = composite(
            portrait, generated, one_hot_logits(portrait_labels), one_hot_logits(generated_labels)
        )
    out = out[0].numpy().astype(int)
    region = (generated_labels == HAIR_CLASS) | (portrait_labels == HAIR_CLASS) & (portrait_labels != SKIN)
    as_tensor = torch.tensor(region, dtype=torch.float32)[None]
    grown = torch.nn.functional.max_pool2d(as_tensor, 2 * radius + 3, 1, radius + 1)
    shrunk = -torch.nn.functional.max_pool2d(-as_tensor, 2 * radius + 3, 1, radius + 1)
    outside = np.kron(grown[0].numpy() == 0, np.ones((2, 2), bool))
    inside = np.kron(shrunk[0].numpy() == 1, np.ones((2, 2), bool))
    assert outside.mean() > 0.3 and inside.mean() > 0.02  # the test looks at enough pixels on both sides
    assert np.array_equal(out[outside], portrait[0].numpy()[outside])
    new = ((generated + 1) * 127.5).round()[0].permute(1, 2, 0).numpy()
    assert np.abs(out[inside] - new[inside]).max() <= 1
    assert np.array_equal(out[200:220, 120:140], portrait[0, 200:220, 120:140].numpy())  # chin: face kept
    assert (out != portrait[0].numpy())[32:112, 80:176].any()  # the bangs replace the forehead


def test_render_serves_both_ensembles_from_one_bundle(hair_bundle, tmp_path):
    directory, manifest = hair_bundle
    names = render_repository(directory, manifest, tmp_path / "cpu", target="cpu", version=2)
    assert names[:2] == [TRANSFER, EDIT] and sorted(names[2:]) == sorted(s.name for s in STAGES)
    for name in names:
        assert (tmp_path / "cpu" / name / "2").is_dir()
    transfer = read_config(tmp_path / "cpu" / TRANSFER / "config.pbtxt")
    assert [list(t.dims) for t in transfer.input] == [[SIZE, SIZE, 3]] * 3
    edit = read_config(tmp_path / "cpu" / EDIT / "config.pbtxt")
    assert [list(t.dims) for t in edit.input] == [[SIZE, SIZE, 3], [N_LATENT, STYLE_DIM], [1]]
    labels = read_config(tmp_path / "cpu" / "hair_labels" / "config.pbtxt")
    assert labels.backend == "python" and list(labels.output[0].dims) == [1, 256, 256]
    with pytest.raises(RenderError, match="no TensorRT plan"):
        render_repository(directory, manifest, tmp_path / "gpu", target="gpu")
    tracked = {
        name: read_config(TRACKED_REPOSITORY / name / "config.pbtxt").platform for name in manifest["models"]
    }
    assert sorted(name for name, platform in tracked.items() if platform == "tensorrt_plan") == sorted(HEAVY)


def _upstream(steps, index: int) -> set[int]:
    producer = {tensor: i for i, step in enumerate(steps) for tensor in step.output_map.values()}

    def walk(i: int) -> set[int]:
        direct = {producer[t] for t in steps[i].input_map.values() if t in producer}
        return direct.union(*(walk(d) for d in direct))

    return walk(index)


def test_independent_steps_do_not_wait_for_each_other():
    """Triton runs ensemble steps as soon as their inputs exist: the three embeddings, and the shape and
    colour references' pose alignment, are independent branches; everything feeds the result."""
    steps = read_config(TRACKED_REPOSITORY / TRANSFER / "config.pbtxt").ensemble_scheduling.step
    fs = [i for i, step in enumerate(steps) if step.model_name == "hair_fs_encoder"]
    generators = [i for i, step in enumerate(steps) if step.model_name == "hair_generator"]
    assert len(fs) == 3 and len(generators) == 2
    for group in (fs, generators):
        for a in group:
            assert not any(b in _upstream(steps, a) for b in group if b != a)
    assert _upstream(steps, len(steps) - 1) == set(range(len(steps) - 1))  # no step is wasted


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_edit_ensemble_equals_the_pipeline(hair_server, hair_pipeline, protocol):
    inputs = inputs_of(EDIT, 2, 3)
    url = hair_server.grpc_url if protocol == "grpc" else hair_server.http_url
    client = TritonModelClient(url, EDIT, protocol)
    served = client.infer({n: t.numpy() for n, t in zip(INPUTS[EDIT], inputs, strict=True)})["hair_image"]
    client.close()
    with torch.no_grad():
        expected = hair_pipeline.edit(*inputs).numpy()
    assert served.dtype == np.uint8 and served.shape == (2, SIZE, SIZE, 3)
    difference = np.abs(served.astype(np.int16) - expected.astype(np.int16))
    assert difference.mean() < 0.5, difference.mean()
    assert (difference > 8).mean() < 0.01  # a parser label may flip where two logits nearly tie
    # Some hair was pasted. (The tiny random generator's images parse as hair nearly everywhere, so here
    # the region may cover the whole crop; what stays outside it: the composite test above.)
    assert (served != inputs[0].numpy()).any(-1).mean() > 0.02


@pytest.mark.parametrize(
    "ensemble, change, expected",
    [
        (TRANSFER, lambda b: {**b, "face": b["face"][:, :, :48]}, "face"),
        (TRANSFER, lambda b: {**b, "shape_reference": b["shape_reference"][:, :32, :32]}, "shape_reference"),
        (
            TRANSFER,
            lambda b: {**b, "color_reference": b["color_reference"].astype(np.float32)},
            "color_reference",
        ),
        (EDIT, lambda b: {**b, "direction": b["direction"][:, :1]}, "direction"),
        (EDIT, lambda b: {**b, "strength": np.ones((1, 2), np.float32)}, "strength"),
    ],
    ids=["non-square", "wrong-size", "wrong-dtype", "direction-shape", "strength-shape"],
)
def test_server_rejects_bad_input_and_keeps_serving(hair_server, ensemble, change, expected):
    batch = {n: t.numpy() for n, t in zip(INPUTS[ensemble], inputs_of(ensemble, 1, 0), strict=True)}
    with pytest.raises(InferenceServerException) as error:
        raw_infer(hair_server.http_url, ensemble, "hair_image", change(batch))
    assert expected in error.value.message()
    assert raw_infer(hair_server.http_url, ensemble, "hair_image", batch).shape == (1, SIZE, SIZE, 3)


def test_client_validates_before_sending(hair_server):
    portrait, direction, strength = (t.numpy() for t in edit_inputs(HAIR_CONFIG, 1, 0))
    client = TritonModelClient(hair_server.grpc_url, EDIT)
    shape = rf"\[batch, {N_LATENT}, {STYLE_DIM}\], got \[1, {STYLE_DIM}\]"
    with pytest.raises(ClientError, match=rf"input 'direction': expected shape {shape}"):
        client.infer({"portrait": portrait, "direction": direction[:, 0], "strength": strength})
    with pytest.raises(ClientError, match="input 'portrait': expected dtype uint8, got float32"):
        client.infer({"portrait": portrait.astype(np.float32), "direction": direction, "strength": strength})
    client.close()


def write_released_layout(pipeline: HairPipeline, root: Path) -> HairWeights:
    """`pipeline`'s networks saved as HairFastGAN's pretrained_models/ tree (each file in its upstream
    container), OpenAI's CLIP as a state dict with `visual.` keys, and SEAN's mean codes as ACE.npy files."""
    n = pipeline.networks
    files = {name: root / relative for name, relative in HAIRFAST_FILES.items()}
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"g_ema": n.generator.state_dict(), "latent_avg": torch.zeros(STYLE_DIM)}, files["generator"])
    e4e = {f"encoder.{k}": v for k, v in n.e4e.state_dict().items()}
    e4e.update({f"decoder.{k}": v for k, v in n.generator.state_dict().items()})
    torch.save({"state_dict": e4e, "latent_avg": n.e4e.latent_avg.clone(), "opts": {}}, files["e4e"])
    torch.save(n.fs_encoder.state_dict(), files["fs_encoder"])
    torch.save({"latent_avg": n.fs_encoder.latent_avg.clone()}, files["fs_latent_avg"])
    torch.save(n.parser.state_dict(), files["parser"])
    torch.save({"model_state_dict": n.rotate.state_dict()}, files["rotate"])
    torch.save(n.shape_adaptor.state_dict(), files["shape_adaptor"])
    torch.save(n.inpainter.generator.state_dict(), files["sean"])
    torch.save({"model_state_dict": n.color_blending.encoder.state_dict()}, files["blending"])
    torch.save({"model_state_dict": n.post_process.state_dict()}, files["post_process"])
    torch.save(n.post_process.latent_avg.clone(), files["post_process_latent_avg"])
    clip = root / "ViT-B-32.pt"
    torch.save({f"visual.{k}": v for k, v in n.color_blending.clip.visual.state_dict().items()}, clip)
    codes = root / "codes"
    for label, code in enumerate(n.inpainter.mean_style_codes.numpy()):
        (codes / str(label)).mkdir(parents=True)
        np.save(codes / str(label) / "ACE.npy", code)
    return HairWeights(root, clip, codes)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[HairPipeline, HairWeights]:
    """A random tiny pipeline and its released layout (SEAN saved with spectral norm, as released)."""
    torch.manual_seed(5)
    networks = build_networks(HAIR_CONFIG)
    for index, encoder in enumerate((networks.e4e, networks.fs_encoder, networks.post_process)):
        encoder.set_latent_avg(torch.randn(STYLE_DIM, generator=torch.Generator().manual_seed(index)))
    original = HairPipeline(HAIR_CONFIG, networks, SMOOTH_STEPS).eval()
    weights = write_released_layout(original, tmp_path_factory.mktemp("pretrained_models"))
    networks.inpainter.generator.fold_spectral_norm()  # as load_networks does after loading
    return original, weights


def test_the_released_layout_loads_into_the_same_pipeline(released):
    original, weights = released
    loaded, provenance = load_networks(HAIR_CONFIG, weights, seed=0)
    assert provenance["random_init"] is False and set(provenance["checkpoints"]) == {*HAIRFAST_FILES, "clip"}
    inputs = transfer_inputs(HAIR_CONFIG, 1, 21)
    with torch.no_grad():
        assert torch.equal(loaded.transfer(*inputs), original.transfer(*inputs))


def test_export_cli_refuses_bad_arguments_in_one_line(released, tmp_path):
    _, weights = released
    out = ["--out", str(tmp_path / "b")]
    files = ["--hairfast-dir", str(weights.hairfast_dir), "--clip-checkpoint", str(weights.clip_checkpoint)]
    small = ["--resolution", "256", "--widths", "tiny", "--sean-codes", str(weights.sean_codes)]
    assert "power of two of at least 256" in one_line_error(
        run_cli("export/hair.py", "--random-init", "--resolution", "200", *out)
    )
    missing = tmp_path / "nowhere"
    error = one_line_error(
        run_cli("export/hair.py", "--hairfast-dir", str(missing), *files[2:], *small, *out)
    )
    assert str(missing / HAIRFAST_FILES["generator"]) in error and "pretrained_models" in error
    # the files have tiny widths: loading them as the public configuration names the mismatch
    assert "StyleGAN2 checkpoint" in one_line_error(run_cli("export/hair.py", *files, *out))
    broken = torch.load(weights.path("rotate"))
    del broken["model_state_dict"]["modulation_module_list.0.fc.weight"]
    torch.save(broken, tmp_path / "rotate_best.pth")
    copy_root = tmp_path / "copy"
    for name, relative in HAIRFAST_FILES.items():
        target = copy_root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(tmp_path / "rotate_best.pth" if name == "rotate" else weights.path(name))
    error = one_line_error(
        run_cli("export/hair.py", "--hairfast-dir", str(copy_root), *files[2:], *small, *out)
    )
    assert "modulation_module_list.0.fc.weight" in error and "missing" in error
    result = run_cli("export/hair.py", *out)
    assert result.returncode == 2 and "--random-init" in result.stderr
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob("*.partial"))


def test_export_cli_help_names_the_released_files():
    result = run_cli("export/hair.py", "--help")
    assert result.returncode == 0
    for fragment in ("--hairfast-dir", "--clip-checkpoint", "--sean-codes", "pretrained_models", "--widths"):
        assert fragment in result.stdout


def test_config_refuses_sizes_the_networks_cannot_take():
    for size in (128, 300, 2048 + 1):
        with pytest.raises(ValueError, match="power of two"):
            HairConfig(image_size=size)
    with pytest.raises(ValueError, match="widths"):
        HairConfig(widths="huge")
    assert json.loads(json.dumps(HairConfig().to_dict()))["n_latent"] == 18
