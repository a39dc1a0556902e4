"""HairFastGAN's transfer end to end: our stages chained (HairPipeline.transfer), the tracked ensemble's
wiring, and the served ensemble through the real Triton, against our re-typing of the public
`HairFast.swap` (tests/hairfast_transfer_reference.py, AIRI-Institute/HairFastGAN @
49e98019c9243d1991c19d45764fc3340a498de2) on seeded random weights, for every same-image case."""

import numpy as np
import pytest
import torch
from torch import Tensor

from fashionserve.client import TritonModelClient
from fashionserve.hair.bundle import TRANSFER, portraits, stage_runs
from fashionserve.hair.networks.parser import CELEBAMASK_CLASSES
from fashionserve.hair.stages import CTRLHAIR_LABELS, BicubicDownsample, HairPipeline
from tests import hairfast_transfer_reference as public
from tests.conftest import HAIR_CONFIG

# (face, shape, colour) as indices into three drawn portraits: every branch of the public code
CASES = {
    "all different": (0, 1, 2),
    "shape is colour": (0, 1, 1),
    "face is colour": (0, 1, 0),
    "face is shape": (0, 0, 2),
    "all one image": (0, 0, 0),
}


@pytest.fixture(scope="module")
def cases() -> tuple[Tensor, Tensor, Tensor]:
    """uint8 [5, S, S, 3] batches of faces, shape references and colour references, one row per case."""
    drawn = portraits(HAIR_CONFIG, 3, 40)
    return tuple(torch.stack([drawn[case[k]] for case in CASES.values()]) for k in range(3))


def public_networks(pipeline: HairPipeline) -> public.Networks:
    n = pipeline.networks
    return public.Networks(
        e4e=n.e4e, fs_encoder=n.fs_encoder, generator=n.generator, bise_net=n.parser, rotate_model=n.rotate,
        mask_generator=n.shape_adaptor, sean=n.inpainter, clip=n.color_blending.clip,
        blending_modulations=n.color_blending.encoder, post_process=n.post_process,
    )  # fmt: skip


@pytest.fixture(scope="module")
def public_swaps(hair_pipeline, cases) -> tuple[np.ndarray, dict[str, Tensor]]:
    """The public swap per case: images as uint8 (x 255, rounded), and the intermediates stacked."""
    reference = public.HairFast(public_networks(hair_pipeline), HAIR_CONFIG.image_size)
    images, intermediates = [], []
    for row in range(len(CASES)):
        images.append(reference.swap(*(batch[row].permute(2, 0, 1) for batch in cases)))
        intermediates.append(reference.intermediates)
    images = np.stack([(image * 255).round().permute(1, 2, 0).to(torch.uint8).numpy() for image in images])
    return images, {name: torch.cat([i[name] for i in intermediates]) for name in intermediates[0]}


@pytest.fixture(scope="module")
def expected(public_swaps) -> np.ndarray:
    return public_swaps[0]


def assert_images_match(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float noise: at most one level off, except at the few pixels where a label map's argmax
    may fall the other way between two formulations (a near-tie), which move a mask edge."""
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    for row, name in enumerate(CASES):
        off = (difference[row] > 1).mean()
        assert off <= 0.002, f"{name}: {off:.2%} of values differ by more than one level"
        assert difference[row].mean() < 0.05, f"{name}: mean difference {difference[row].mean():.3f}"


def test_test_inputs_exercise_the_masks(hair_pipeline, cases):
    """The test can only catch mask and shape mistakes if there is hair: the parsed faces have it, and the
    shape step moves it (the target differs from the face's own labels)."""
    s = hair_pipeline.stages
    with torch.no_grad():
        face_labels = s["hair_labels"](s["hair_parser"](s["hair_preprocess"](cases[0])[3]))
        hair = (face_labels == CTRLHAIR_LABELS.index("hair")).float().mean()
        assert 0.05 < hair < 0.9, hair
        shape_labels = s["hair_labels"](s["hair_parser"](s["hair_preprocess"](cases[1])[3]))
        latent = s["hair_encoder"](s["hair_preprocess"](cases[0])[1])
        shape_latent = s["hair_encoder"](s["hair_preprocess"](cases[1])[1])
        rotated = s["hair_generated_labels"](s["hair_generator"](s["hair_rotate"](shape_latent, latent)))
        target = s["hair_shape_target"](face_labels, rotated, torch.zeros(len(CASES), 1))
    assert (target != face_labels).float().mean() > 0.01
    assert (face_labels != shape_labels).any()


def test_transfer_equals_the_public_swap_in_every_case(hair_pipeline, cases, expected):
    with torch.no_grad():
        actual = hair_pipeline.transfer(*cases).numpy()
    assert_images_match(actual, expected)
    # a pipeline that skipped shape alignment would fail above (the images differ beyond the tolerance)
    names = list(CASES)
    gap = np.abs(expected[names.index("all different")].astype(int) - expected[names.index("face is shape")])
    assert gap.mean() > 0.1


def test_every_step_s_result_equals_the_public_swap_s(hair_pipeline, cases, public_swaps):
    """S_blend (colour), F_align (shape), S_final and F_final (refinement) per case: the final image alone
    depends little on some of them with random weights."""
    with torch.no_grad():
        recorded = stage_runs(hair_pipeline, TRANSFER, cases)
    ours = {
        "S_blend": recorded["hair_color_blend"][1][0],
        "F_align": recorded["hair_align_features"][1][0],
        "S_final": recorded["hair_post_process"][1][0],
        "F_final": recorded["hair_post_process"][1][1],
    }
    for name, theirs in public_swaps[1].items():
        scale = float(theirs.abs().max())
        error = float((ours[name] - theirs).abs().max()) / scale
        assert error < 1e-4, (name, error)
    # the branches matter: colour blending changes S (all different vs all one image), shape alignment
    # changes F (all different vs face is shape)
    names = list(CASES)
    blend = public_swaps[1]["S_blend"]
    assert (blend[names.index("all different")] - blend[names.index("all one image")]).abs().max() > 1e-2
    align = public_swaps[1]["F_align"]
    assert (align[names.index("all different")] - align[names.index("face is shape")]).abs().max() > 1e-2


def test_tracked_wiring_equals_the_pipeline(hair_pipeline, cases):
    with torch.no_grad():
        recorded = stage_runs(hair_pipeline, TRANSFER, cases)
        direct = hair_pipeline.transfer(*cases)
    assert torch.equal(recorded["hair_final_synthesis"][1][0], direct)
    # embedding runs on each image, alignment and inpainting on two, the rest once
    batch = len(CASES)
    assert len(recorded["hair_preprocess"][0][0]) == 3 * batch
    assert len(recorded["hair_encoder"][0][0]) == 5 * batch
    assert len(recorded["hair_generator"][0][0]) == 2 * batch
    assert len(recorded["hair_inpaint"][0][0]) == 2 * batch


def test_served_transfer_equals_the_public_swap(hair_server, hair_bundle, cases, expected):
    client = TritonModelClient(hair_server.grpc_url, TRANSFER)
    try:
        inputs = dict(
            zip(("face", "shape_reference", "color_reference"), (c.numpy() for c in cases), strict=True)
        )
        # max_batch_size 4: the five cases go as 3 + 2
        outputs = [
            client.infer({k: v[rows] for k, v in inputs.items()})["hair_image"]
            for rows in (slice(0, 3), slice(3, 5))
        ]
    finally:
        client.close()
    assert_images_match(np.concatenate(outputs), expected)


@pytest.mark.parametrize(("factor", "size"), [(4, 1024), (2, 512), (1, 256)])
def test_bicubic_downsample_equals_the_public_filter(factor, size):
    image = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(factor))
    expected = public.BicubicDownSample(factor)(image)
    actual = BicubicDownsample(factor)(image)
    assert actual.shape == (2, 3, size // factor, size // factor)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_label_order_is_ctrlhair_s():
    assert list(CTRLHAIR_LABELS) == [name.replace("skin_other", "skin") for name in public.PARSING_LABEL_LIST]
    assert list(CELEBAMASK_CLASSES) == [
        name.replace("skin_other", "skin") for name in public.FACE_PARSING_LABELS.values()
    ]
