"""Bundles of the two catalogue pipelines, exported like every pipeline (`fashionserve.bundle`):

- `garment_classifier`: `garment_classifier_preprocess` (uint8 photo of any size -> 28x28 gray) then
  `garment_classifier_network` (class probabilities and label);
- `fashion_generator`: `fashion_generator_network` (latents -> [-1, 1] image) then
  `fashion_generator_postprocess` (-> uint8 HWC).
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fashionserve.bundle import Stage, export_pipeline
from fashionserve.catalogue.networks.classifier import (
    CLASSES,
    UPPER_BODY,
    ClassifierConfig,
    GarmentClassifier,
)
from fashionserve.catalogue.networks.pggan import PGGANConfig, PGGANGenerator, load_pggan_checkpoint
from fashionserve.catalogue.samples import draw_product_photo
from fashionserve.catalogue.stages import ClassifierServing, GarmentPreprocess, PGGANPostprocess
from fashionserve.catalogue.training import load_classifier
from fashionserve.checkpoints import sha256_file
from fashionserve.cli import RANDOM_INIT

CLASSIFIER = "garment_classifier"
GENERATOR = "fashion_generator"

CLASSIFIER_STAGES = (
    Stage(
        "garment_classifier_preprocess",
        ("image",),
        ("garment",),
        1e-5,
        dynamic_axes=(("image", 1, "height"), ("image", 2, "width")),
    ),
    Stage("garment_classifier_network", ("garment",), ("probabilities", "label"), 1e-4),
)
GENERATOR_STAGES = (
    Stage("fashion_generator_network", ("latents",), ("image",), 2e-3),
    Stage("fashion_generator_postprocess", ("image",), ("fashion_image",), 1.0),  # rounding may flip by 1
)


def _provenance(checkpoint: Path | None, seed: int) -> dict:
    if checkpoint is None:
        return {"weights": RANDOM_INIT, "random_init": True, "seed": seed}
    return {
        "weights": "checkpoint",
        "random_init": False,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
    }


def load_garment_classifier(
    checkpoint: Path | None, config: ClassifierConfig, seed: int
) -> tuple[GarmentClassifier, dict]:
    """The classifier from a training checkpoint (its stored config wins) or seeded random weights,
    plus provenance for the manifest."""
    torch.manual_seed(seed)
    provenance = _provenance(checkpoint, seed)
    if checkpoint is None:
        return GarmentClassifier(config).eval(), provenance
    model, metadata = load_classifier(checkpoint)
    provenance["training_report"] = {
        key: metadata["report"][key] for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall")
    }
    provenance["training_data"] = metadata.get("data", {})
    return model, provenance


def classifier_inputs(batch: int, seed: int) -> tuple[Tensor]:
    """Drawn product photos, one size per seed (so parity covers several sizes and aspect ratios)."""
    height, width = 64 + 8 * (seed % 5), 48 + 12 * (seed % 3)
    photos = [draw_product_photo((seed + i) % len(CLASSES), height, width, seed + i) for i in range(batch)]
    return (torch.from_numpy(np.stack(photos)),)


def export_classifier_bundle(
    model: GarmentClassifier,
    provenance: dict,
    out_dir: Path,
    max_batch: int = 8,
    log: Callable[[str], None] = print,
) -> dict:
    """Export the garment classifier pipeline into a bundle and return its manifest."""
    description = {
        "architecture": "fashion-mnist-cnn",
        "config": model.config.to_dict(),
        "classes": list(CLASSES),
        "upper_body_classes": sorted(UPPER_BODY),
        **provenance,
    }
    modules = {
        "garment_classifier_preprocess": GarmentPreprocess(),
        "garment_classifier_network": ClassifierServing(model).eval(),
    }
    return export_pipeline(
        CLASSIFIER, CLASSIFIER_STAGES, modules, classifier_inputs, description, out_dir, max_batch, log=log
    )


def load_fashion_generator(
    checkpoint: Path | None, config: PGGANConfig, seed: int, generator: str = "avgG"
) -> tuple[PGGANGenerator, dict]:
    """The generator from a zoo-layout checkpoint (its stored config wins) or seeded random weights
    (the zoo's N(0, 1) initialization), equalized LR folded; plus provenance for the manifest."""
    torch.manual_seed(seed)
    if checkpoint is None:
        network = PGGANGenerator(config)
    else:
        network = load_pggan_checkpoint(checkpoint, generator)
    provenance = _provenance(checkpoint, seed)
    if checkpoint is not None:
        provenance["generator"] = generator
    network.fold_equalized_lr()
    return network.eval(), provenance


def export_generator_bundle(
    network: PGGANGenerator,
    provenance: dict,
    out_dir: Path,
    max_batch: int = 4,
    log: Callable[[str], None] = print,
) -> dict:
    """Export the fashion generator pipeline into a bundle and return its manifest."""
    config = network.config

    def latents(batch: int, seed: int) -> tuple[Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, config.latent_dim, generator=generator),)

    description = {
        "architecture": "pggan-zoo",
        "config": {**config.to_dict(), "resolution": config.resolution},
        **provenance,
    }
    modules = {"fashion_generator_network": network, "fashion_generator_postprocess": PGGANPostprocess()}
    return export_pipeline(
        GENERATOR, GENERATOR_STAGES, modules, latents, description, out_dir, max_batch, log=log
    )
