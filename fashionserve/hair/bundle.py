"""Export the hair pipeline into one bundle serving two ensembles, `hair_transfer` and `hair_edit`: one
parity-checked ONNX file per stage (stages the ensembles share are exported once) plus a manifest."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fashionserve.bundle import Stage, export_pipeline, record_stage_runs
from fashionserve.checkpoints import sha256_file
from fashionserve.cli import RANDOM_INIT
from fashionserve.hair.networks.encoder import Encoder4Editing, load_e4e_checkpoint
from fashionserve.hair.networks.parser import (
    CELEBAMASK_CLASSES,
    FACE_CLASSES,
    HAIR_CLASS,
    FaceParser,
    load_face_parser_checkpoint,
)
from fashionserve.hair.networks.stylegan2 import StyleGAN2Generator, load_stylegan2_checkpoint
from fashionserve.hair.samples import draw_portrait
from fashionserve.hair.stages import HairConfig, HairPipeline

PIPELINE = "hair"  # the registered model; its bundle serves both ensembles
TRANSFER = "hair_transfer"
EDIT = "hair_edit"

STAGES: tuple[Stage, ...] = (
    Stage("hair_preprocess", ("image",), ("encoder_input", "parser_input"), 1e-5),
    Stage("hair_encoder", ("encoder_input",), ("latent",), 2e-3),
    Stage("hair_parser", ("parser_input",), ("parsing",), 2e-3),
    Stage("hair_mix", ("portrait_latent", "reference_latent"), ("latent",), 0.0),
    Stage("hair_edit_latent", ("latent", "direction", "strength"), ("edited_latent",), 1e-5),
    Stage("hair_generator", ("latent",), ("generated",), 2e-3),
    Stage("hair_generated_preprocess", ("generated",), ("parser_input",), 1e-5),
    Stage(
        "hair_composite",
        ("portrait", "generated", "portrait_parsing", "generated_parsing"),
        ("hair_image",),
        1.0,  # rounding to uint8 may flip by one level
    ),
)


def portraits(config: HairConfig, batch: int, seed: int) -> Tensor:
    """`batch` drawn sample portraits at the served size (uint8 N x S x S x 3)."""
    return torch.from_numpy(
        np.stack([draw_portrait(seed + i, config.image_size, seed) for i in range(batch)])
    )


def transfer_inputs(config: HairConfig, batch: int, seed: int) -> tuple[Tensor, Tensor]:
    """(portrait, reference): drawn portraits, each paired with the next sample's hairstyle."""
    return portraits(config, batch, seed), portraits(config, batch, seed + 1)


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
    outputs); a stage used twice (encoder, parser) has both calls concatenated along the batch."""
    return record_stage_runs(ensemble, STAGES, pipeline.stages, client_inputs)


def build_networks(config: HairConfig) -> tuple[Encoder4Editing, StyleGAN2Generator, FaceParser]:
    """The three networks for `config`, freshly initialised (seed torch first for reproducible weights)."""
    generator = StyleGAN2Generator(
        config.generator_size, config.style_dim, config.n_mlp, config.channel_multiplier, config.channel_max
    )
    encoder = Encoder4Editing(
        size=config.generator_size,
        style_dim=config.style_dim,
        num_layers=config.encoder_num_layers,
        input_size=config.encoder_input_size,
        base_width=config.encoder_base_width,
        stage_units=config.encoder_stage_units,
    )
    return encoder, generator, FaceParser()


def load_networks(
    config: HairConfig,
    e4e_checkpoint: Path | None,
    parser_checkpoint: Path | None,
    generator_checkpoint: Path | None,
    seed: int,
) -> tuple[HairPipeline, dict]:
    """Reference pipeline from the user's checkpoints (strict) or seeded random weights, plus provenance.
    The e4e checkpoint holds the encoder, its StyleGAN2 decoder and the average latent;
    `generator_checkpoint` (rosinality `g_ema`) replaces that decoder when given. Random-init sets the
    encoder's average latent to the random generator's mean W, as e4e's is its generator's."""
    torch.manual_seed(seed)
    random_init = e4e_checkpoint is None
    provenance: dict = {"random_init": random_init, "seed": seed}
    encoder, generator, parser = build_networks(config)
    if random_init:
        encoder.set_latent_avg(generator.mean_latent(seed=seed))
        provenance["latent_avg"] = "mean W of the random-init generator"
    else:
        encoder, generator = load_e4e_checkpoint(e4e_checkpoint, encoder, generator)
        parser = load_face_parser_checkpoint(parser_checkpoint)
        provenance.update(
            e4e_checkpoint=str(e4e_checkpoint),
            e4e_checkpoint_sha256=sha256_file(e4e_checkpoint),
            parser_checkpoint=str(parser_checkpoint),
            parser_checkpoint_sha256=sha256_file(parser_checkpoint),
        )
        if generator_checkpoint is not None:
            generator = load_stylegan2_checkpoint(generator_checkpoint, generator)
            provenance.update(
                generator_checkpoint=str(generator_checkpoint),
                generator_checkpoint_sha256=sha256_file(generator_checkpoint),
            )
    pipeline = HairPipeline(config, encoder.eval(), generator.eval(), parser.eval()).eval()
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
        "architecture": "e4e+stylegan2+bisenet",
        "config": {**config.to_dict(), "height": config.image_size, "width": config.image_size},
        "parser_classes": list(CELEBAMASK_CLASSES),
        "hair_class": HAIR_CLASS,
        "face_classes": list(FACE_CLASSES),
        "weights": RANDOM_INIT if provenance["random_init"] else "checkpoint",
        **provenance,
    }
    client_inputs = {
        TRANSFER: lambda batch, seed: transfer_inputs(config, batch, seed),
        EDIT: lambda batch, seed: edit_inputs(config, batch, seed),
    }
    return export_pipeline(
        PIPELINE, STAGES, pipeline.stages, client_inputs, description, out_dir, max_batch, parity_batches, log
    )
