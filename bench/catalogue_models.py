"""Measure the trained fashion generator against real Fashion-MNIST, with floors and a ceiling.

Rows (each against the 10,000 real test images, padded to 32x32 as the generator was trained):
  generated    the generator's images (its moving average, avgG) from N(0, I) latents
  train        real training images: the floor a perfect generator would reach
  halves       the test set's two halves against each other (5,000 each): the same-distribution floor
  random-init  an untrained generator of the same architecture (zoo initialization): the ceiling
With --sheet, 48 generated images labelled by the classifier go into one PNG.
Metrics: SWD x1e3 (levels 32, 16 and their average; bench/swd.py's computation) and, with
--classifier, the Frechet distance of the classifier's penultimate features ("FID-style"), plus the
class shares of generated images as the classifier sees them. Writes everything as JSON.

Examples:
  python bench/catalogue_models.py --data /usr/share/datasets/fashion-mnist \\
      --generator models/catalogue/fashion_generator.pt --classifier models/catalogue/garment_classifier.pt \\
      --json docs/catalogue/evaluation.json
  python bench/catalogue_models.py --data DATA --rows train,halves --metrics swd --json work/floors.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from fashionserve.catalogue.data import DataError, load_split  # noqa: E402
from fashionserve.catalogue.evaluation import (  # noqa: E402
    class_shares,
    embeddings,
    frechet_distance,
    garments,
    generate,
)
from fashionserve.catalogue.networks.classifier import CLASSES, GarmentClassifier  # noqa: E402
from fashionserve.catalogue.networks.pggan import PGGANGenerator, load_pggan_checkpoint  # noqa: E402
from fashionserve.catalogue.pggan_training import (  # noqa: E402
    PADDED_SIZE,
    PGGANTrainOptions,
    network_config,
    pad_to_32,
)
from fashionserve.catalogue.swd import SWDError, swd  # noqa: E402
from fashionserve.catalogue.training import load_classifier  # noqa: E402
from fashionserve.checkpoints import CheckpointError  # noqa: E402
from fashionserve.cli import UserError, run  # noqa: E402
from fashionserve.sheets import contact_sheet  # noqa: E402

SHEET_IMAGES = 48
ROWS = ("generated", "train", "halves", "random-init")
METRICS = ("swd", "frechet")


def choices(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    chosen = [item for item in value.split(",") if item]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise UserError(f"{flag}: choose from {', '.join(allowed)} (comma-separated), got {value!r}")
    return chosen


def write_labelled_sheet(
    generator: PGGANGenerator, classifier: GarmentClassifier, seed: int, path: Path
) -> None:
    """48 generated images (latents drawn with `seed`), 4x enlarged, each captioned with the class the
    classifier gives it and that class's probability."""
    images = generate(generator, SHEET_IMAGES, seed)
    with torch.no_grad():
        probabilities = classifier.eval()(garments(images)).softmax(1)
    confidence, labels = probabilities.max(1)
    captions = [f"{CLASSES[k]} {p:.2f}" for k, p in zip(labels.tolist(), confidence.tolist(), strict=True)]
    sheet = contact_sheet(images, 8, gap=4, background=255, scale=4, captions=captions)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="folder holding the Fashion-MNIST IDX files")
    parser.add_argument("--generator", type=Path, help="generator checkpoint (needed for the generated row)")
    parser.add_argument(
        "--classifier", type=Path, help="classifier checkpoint (needed for --metrics frechet)"
    )
    parser.add_argument("--rows", default=",".join(ROWS), help=f"default {','.join(ROWS)}")
    parser.add_argument("--metrics", default=",".join(METRICS), help=f"default {','.join(METRICS)}")
    parser.add_argument("--count", type=int, default=10_000, help="test images compared (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="latents, SWD patches and directions (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--json", type=Path, required=True, help="JSON file to write")
    parser.add_argument(
        "--sheet", type=Path, help="also write 48 generated images, labelled by the classifier, as a PNG"
    )
    args = parser.parse_args()
    rows = choices(args.rows, ROWS, "--rows")
    metrics = choices(args.metrics, METRICS, "--metrics")
    if "generated" in rows and args.generator is None:
        raise UserError("the generated row needs --generator")
    if ("frechet" in metrics or args.sheet) and args.classifier is None:
        raise UserError("--metrics frechet and --sheet need --classifier")
    if args.sheet and args.generator is None:
        raise UserError("--sheet needs --generator")
    if args.count < 2 or args.count % 2:
        raise UserError("--count must be an even number of at least 2")
    torch.set_num_threads(args.threads)
    test_images, test_labels = load_split(args.data, "test")
    if args.count > len(test_images):
        raise UserError(f"--count {args.count} exceeds the {len(test_images)} test images")
    test = pad_to_32(test_images[: args.count])
    trained = load_pggan_checkpoint(args.generator) if args.generator else None
    if trained and (trained.config.resolution, trained.config.dim_output) != (PADDED_SIZE, 1):
        raise UserError(
            f"{args.generator}: a {trained.config.resolution}x{trained.config.resolution} generator with "
            f"{trained.config.dim_output} channels; the measures need 32x32 gray (a finished training)"
        )
    classifier = load_classifier(args.classifier)[0] if args.classifier else None

    def candidates(row: str) -> tuple[np.ndarray, np.ndarray]:
        if row == "generated":
            return generate(trained, args.count, args.seed), test
        if row == "train":
            return pad_to_32(load_split(args.data, "train")[0][: args.count]), test
        if row == "halves":
            return test[: args.count // 2], test[args.count // 2 :]
        torch.manual_seed(args.seed)
        config = trained.config if trained else network_config(PGGANTrainOptions(), 3)
        return generate(PGGANGenerator(config), args.count, args.seed), test

    test_features: list[np.ndarray] = []  # the test set's, computed once for all rows

    def features(images: np.ndarray) -> np.ndarray:
        if images is not test:
            return embeddings(classifier, garments(images))
        if not test_features:
            test_features.append(embeddings(classifier, garments(test)))
        return test_features[0]

    results: dict = {"count": args.count, "seed": args.seed, "rows": {}}
    for row in rows:
        started = time.monotonic()
        first, second = candidates(row)
        values: dict = {"images": len(first)}
        if "swd" in metrics:
            values.update(swd(first, second, seed=args.seed))
        if "frechet" in metrics:
            values["frechet_distance"] = frechet_distance(features(first), features(second))
        if row == "generated" and classifier is not None:
            results["class_shares_generated"] = class_shares(classifier, garments(first))
        results["rows"][row] = values
        shown = ", ".join(f"{key} {value:.3f}" for key, value in values.items() if key != "images")
        print(f"{row}: {shown} ({time.monotonic() - started:.0f}s)", flush=True)
    if classifier is not None:
        results["class_shares_test"] = class_shares(classifier, garments(test))
        results["test_labels_shares"] = (
            np.bincount(test_labels[: args.count], minlength=10) / args.count
        ).tolist()
    if args.sheet:
        write_labelled_sheet(trained, classifier, args.seed, args.sheet)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    run(main, expected=(DataError, CheckpointError, SWDError))
