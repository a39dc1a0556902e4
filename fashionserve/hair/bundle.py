"""Export the hair pipeline into one bundle serving two ensembles, `hair_transfer` (HairFastGAN) and
`hair_edit`: one parity-checked ONNX file per stage (stages the ensembles share are exported once) plus a
manifest. Weights come from HairFastGAN's `pretrained_models/` tree and OpenAI's CLIP ViT-B/32, or are
seeded random (`random-init`)."""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fashionserve.bundle import Stage, export_pipeline, record_stage_runs
from fashionserve.checkpoints import CheckpointError, sha256_file
from fashionserve.cli import RANDOM_INIT
from fashionserve.hair.networks.blending import (
    SMOOTH_STEPS,
    BlendingEncoder,
    ColorBlending,
    load_color_blending,
)
from fashionserve.hair.networks.clip_image import ClipImageEncoder
from fashionserve.hair.networks.encoder import Encoder4Editing, load_e4e_checkpoint
from fashionserve.hair.networks.feature_style_encoder import FeatureStyleEncoder, load_feature_style_encoder
from fashionserve.hair.networks.parser import FaceParser, load_face_parser_checkpoint
from fashionserve.hair.networks.post_process import PostProcess, load_post_process
from fashionserve.hair.networks.rotate import RotateModel, load_rotate_checkpoint
from fashionserve.hair.networks.sean import SEANGenerator, SEANInpainter, load_sean_inpainter
from fashionserve.hair.networks.shape_adaptor import ShapeAdaptor, load_shape_adaptor_checkpoint
from fashionserve.hair.networks.stylegan2 import StyleGAN2Generator, load_stylegan2_checkpoint
from fashionserve.hair.samples import draw_portrait
from fashionserve.hair.stages import (
    CTRLHAIR_LABELS,
    NETWORK_WIDTHS,
    WORK_SIZE,
    HairConfig,
    HairNetworks,
    HairPipeline,
)
from fashionserve.onnx_export import max_abs_error

PIPELINE = "hair"  # the registered model; its bundle serves both ensembles
TRANSFER = "hair_transfer"
EDIT = "hair_edit"
LABEL_TOLERANCE = 1e-3  # label maps: the share of pixels whose class may differ (argmax near ties)

STAGES: tuple[Stage, ...] = (
    Stage(
        "hair_same_images", ("face", "shape_reference", "color_reference"), ("same_shape", "same_color"), 0.0
    ),
    Stage("hair_preprocess", ("image",), ("fs_input", "encoder_input", "image_256", "parser_input"), 1e-5),
    Stage("hair_encoder", ("encoder_input",), ("latent",), 2e-3),
    Stage("hair_fs_encoder", ("fs_input",), ("style", "features"), 2e-3),
    Stage("hair_parser", ("parser_input",), ("parsing",), 2e-3),
    Stage("hair_labels", ("parsing",), ("labels",), LABEL_TOLERANCE),
    Stage("hair_w_features", ("latent",), ("features",), 2e-3),
    Stage(
        "hair_embed_mix",
        ("features", "w_features", "labels", "same_shape", "same_color"),
        ("mixed_features",),
        1e-4,
    ),
    Stage("hair_rotate", ("reference_latent", "face_latent"), ("rotated_latent",), 1e-4),
    Stage("hair_generator", ("latent",), ("generated",), 2e-3),
    Stage("hair_generated_labels", ("generated",), ("labels",), LABEL_TOLERANCE),
    Stage(
        "hair_shape_target", ("face_labels", "rotated_labels", "same"), ("target_labels",), LABEL_TOLERANCE
    ),
    Stage("hair_inpaint", ("image", "labels", "target_labels"), ("inpainted",), 2e-3),
    Stage(
        "hair_align_features",
        (
            "face_features",
            "shape_features",
            "face_inpainted_features",
            "shape_inpainted_features",
            "face_labels",
            "shape_labels",
            "target_labels",
            "same_shape",
        ),
        ("aligned_features",),
        1e-4,
    ),  # fmt: skip
    Stage(
        "hair_color_blend",
        (
            "face_style",
            "color_style",
            "face_image",
            "color_image",
            "face_labels",
            "color_labels",
            "color_target_labels",
            "same_shape",
            "same_color",
        ),
        ("blended_style",),
        2e-3,
    ),  # fmt: skip
    Stage("hair_blend_synthesis", ("style", "features"), ("blended",), 2e-3),
    Stage("hair_post_process", ("face_image", "blended"), ("final_style", "final_features"), 2e-3),
    Stage("hair_final_synthesis", ("style", "features"), ("hair_image",), 1.0),  # rounding to uint8
    Stage("hair_edit_latent", ("latent", "direction", "strength"), ("edited_latent",), 1e-5),
    Stage("hair_generated_preprocess", ("generated",), ("parser_input",), 1e-5),
    Stage(
        "hair_composite",
        ("portrait", "generated", "portrait_parsing", "generated_parsing"),
        ("hair_image",),
        1.0,  # rounding to uint8 may flip by one level
    ),
)

# Files of HairFastGAN's `pretrained_models/` tree (its README's Hugging Face download) the pipeline reads.
HAIRFAST_FILES = {
    "generator": "StyleGAN/ffhq.pt",
    "e4e": "encoder4editing/e4e_ffhq_encode.pt",
    "fs_encoder": "FeatureStyleEncoder/143_enc.pth",
    "fs_latent_avg": "FeatureStyleEncoder/psp_ffhq_encode.pt",
    "parser": "BiSeNet/face_parsing_79999_iter.pth",
    "rotate": "Rotate/rotate_best.pth",
    "shape_adaptor": "ShapeAdaptor/mask_generator.pth",
    "sean": "sean_checkpoints/CelebA-HQ_pretrained/latest_net_G.pth",
    "blending": "Blending/checkpoint.pth",
    "post_process": "PostProcess/pp_model.pth",
    "post_process_latent_avg": "PostProcess/latent_avg.pt",
}


def label_parity_error(stage: str, output: str, reference: Tensor, actual: np.ndarray) -> float:
    """Label maps: the share of pixels that differ; everything else: the max absolute error."""
    if reference.dtype == torch.int64:
        return float((reference.numpy() != actual).mean())
    return max_abs_error(reference, actual)


def portraits(config: HairConfig, batch: int, seed: int) -> Tensor:
    """`batch` drawn sample portraits at the served size (uint8 N x S x S x 3)."""
    return torch.from_numpy(
        np.stack([draw_portrait(seed + i, config.image_size, seed) for i in range(batch)])
    )


def transfer_inputs(config: HairConfig, batch: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(face, shape_reference, color_reference): drawn portraits, each with the next sample's hairstyle
    and the one after's colour; the last sample (of two or more) repeats its face as the colour reference,
    so that the pipeline's same-image paths run too."""
    face, shape, color = (
        portraits(config, batch, seed),
        portraits(config, batch, seed + 1),
        portraits(config, batch, seed + 2),
    )
    if batch > 1:
        color[-1] = face[-1]
    return face, shape, color


def edit_inputs(config: HairConfig, batch: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(portrait, direction, strength): drawn portraits, seeded unit directions per layer, strengths in
    [-3, 3] (the range InterFaceGAN edits are usually applied with)."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(batch, config.n_latent, config.style_dim, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    strength = torch.rand(batch, 1, generator=generator) * 6.0 - 3.0
    return portraits(config, batch, seed), direction, strength


def stage_runs(pipeline: HairPipeline, ensemble: str, client_inputs: tuple[Tensor, ...]) -> dict[str, tuple]:
    """Run the reference stages wired like the tracked `ensemble` and record each stage's (inputs,
    outputs); a stage used by several steps has its calls concatenated along the batch."""
    return record_stage_runs(ensemble, STAGES, pipeline.stages, client_inputs)


def build_networks(config: HairConfig) -> HairNetworks:
    """Every network for `config`, freshly initialised (seed torch first for reproducible weights).
    SEAN runs without its per-call random noise: a served stage is deterministic."""
    widths = NETWORK_WIDTHS[config.widths]
    style_dim, n_latent = widths["style_dim"], config.n_latent
    generator = StyleGAN2Generator(config.image_size, style_dim, widths["n_mlp"], 2, widths["channel_max"])
    clip = ClipImageEncoder(**widths["clip"])
    blending = BlendingEncoder(n_latent - 6, style_dim, clip.output_dim, widths["blending_middle"])
    sean = SEANGenerator(crop_size=WORK_SIZE, noise=False, **widths["sean"])
    return HairNetworks(
        e4e=Encoder4Editing(
            size=config.image_size, style_dim=style_dim, input_size=WORK_SIZE, **widths["e4e"]
        ),
        fs_encoder=FeatureStyleEncoder(
            n_latent, style_dim, input_halvings=int(math.log2(config.image_size // WORK_SIZE)), **widths["fs"]
        ),
        generator=generator,
        parser=FaceParser(),
        rotate=RotateModel(style_dim),
        shape_adaptor=ShapeAdaptor(size=WORK_SIZE, **widths["shape_adaptor"]),
        inpainter=SEANInpainter(sean, torch.randn(len(CTRLHAIR_LABELS), sean.style_length)),
        color_blending=ColorBlending(clip, blending, SMOOTH_STEPS),
        post_process=PostProcess(n_latent, style_dim, **widths["post_process"]),
    )


@dataclass(frozen=True)
class HairWeights:
    """Where the released weights are: HairFastGAN's `pretrained_models/` folder, OpenAI's ViT-B-32.pt and
    the folder holding SEAN's mean style codes (default: found from `hairfast_dir`, see sean.py)."""

    hairfast_dir: Path
    clip_checkpoint: Path
    sean_codes: Path | None = None

    def path(self, name: str) -> Path:
        path = self.hairfast_dir / HAIRFAST_FILES[name]
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (expected HairFastGAN's pretrained_models/ layout)")
        return path


def _load_released(networks: HairNetworks, weights: HairWeights) -> dict:
    """Load every network strictly from the released files; returns their provenance (path, sha256)."""
    n, path = networks, weights.path
    for name in ("generator", "e4e", "fs_encoder", "fs_latent_avg", "parser", "rotate", "shape_adaptor",
                 "sean", "blending", "post_process", "post_process_latent_avg"):  # fmt: skip
        path(name)  # every file present before the slow loads start
    if not weights.clip_checkpoint.is_file():
        raise CheckpointError(f"{weights.clip_checkpoint}: missing (OpenAI's ViT-B-32.pt)")
    load_stylegan2_checkpoint(path("generator"), n.generator)
    load_e4e_checkpoint(path("e4e"), n.e4e, copy.deepcopy(n.generator))  # its own decoder goes unused
    load_feature_style_encoder(path("fs_encoder"), path("fs_latent_avg"), n.fs_encoder)
    n.parser.load_state_dict(load_face_parser_checkpoint(path("parser")).state_dict())
    load_rotate_checkpoint(path("rotate"), n.rotate)
    load_shape_adaptor_checkpoint(path("shape_adaptor"), n.shape_adaptor)
    inpainter = load_sean_inpainter(
        path("sean"), weights.sean_codes or weights.hairfast_dir, n.inpainter.generator
    )
    n.inpainter.mean_style_codes.copy_(inpainter.mean_style_codes)
    load_color_blending(path("blending"), weights.clip_checkpoint, n.color_blending)
    load_post_process(path("post_process"), path("post_process_latent_avg"), n.post_process)
    files = {name: path(name) for name in HAIRFAST_FILES} | {"clip": weights.clip_checkpoint}
    return {
        "hairfast_dir": str(weights.hairfast_dir),
        "checkpoints": {
            name: {"path": str(file), "sha256": sha256_file(file)} for name, file in files.items()
        },
    }


def load_networks(config: HairConfig, weights: HairWeights | None, seed: int) -> tuple[HairPipeline, dict]:
    """Reference pipeline from the released files (strict: the files must have `config`'s sizes, the public
    1024 ones for HairFastGAN's) or seeded random weights, plus provenance. Random-init sets the encoders'
    average latents to the random generator's mean W, as the released ones are their generator's."""
    torch.manual_seed(seed)
    random_init = weights is None
    provenance: dict = {"random_init": random_init, "seed": seed}
    networks = build_networks(config)
    if random_init:
        mean_w = networks.generator.mean_latent(seed=seed)
        for encoder in (networks.e4e, networks.fs_encoder, networks.post_process):
            encoder.set_latent_avg(mean_w)
        provenance["latent_avg"] = "mean W of the random-init generator"
    else:
        provenance.update(_load_released(networks, weights))
    networks.inpainter.generator.fold_spectral_norm()  # eval-mode weights as plain convolutions, for export
    pipeline = HairPipeline(config, networks, SMOOTH_STEPS).eval()
    return pipeline, provenance


def export_bundle(
    pipeline: HairPipeline,
    provenance: dict,
    out_dir: Path,
    max_batch: int = 4,
    parity_batches: tuple[int, ...] = (1, 2),
    log: Callable[[str], None] = print,
) -> dict:
    """Export every stage of both ensembles to `out_dir/<stage>/model.onnx`, check ONNX Runtime against
    PyTorch on drawn portraits at `parity_batches`, write the manifest and return it. Never half-written."""
    config = pipeline.config
    label = f" [{RANDOM_INIT}]" if provenance["random_init"] else ""
    log(f"reference pipeline {config.image_size}x{config.image_size}{label}: recording stage inputs")
    description = {
        "architecture": "hairfastgan",
        "config": {**config.to_dict(), "height": config.image_size, "width": config.image_size},
        "label_order": list(CTRLHAIR_LABELS),
        "weights": RANDOM_INIT if provenance["random_init"] else "checkpoint",
        **provenance,
    }
    client_inputs = {
        TRANSFER: lambda batch, seed: transfer_inputs(config, batch, seed),
        EDIT: lambda batch, seed: edit_inputs(config, batch, seed),
    }
    return export_pipeline(
        PIPELINE, STAGES, pipeline.stages, client_inputs, description, out_dir, max_batch, parity_batches,
        log, parity_error=label_parity_error,
    )  # fmt: skip
