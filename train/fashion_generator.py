"""Train the PG-GAN fashion generator on Fashion-MNIST (padded to 32x32) on the CPU, resumably.

DATA holds train-images-idx3-ubyte.gz (and the other Fashion-MNIST IDX files; Debian's
dataset-fashion-mnist package installs them in /usr/share/datasets/fashion-mnist). Progressive growing
4x4 -> 32x32 with fade-ins, WGAN-GP, equalized learning rate, minibatch stddev, as in the PG-GAN paper
(see fashionserve/catalogue/pggan_training.py). OUT receives training.pt (resumable), history.json,
a contact sheet per resolution and, once the schedule is complete, fashion_generator.pt, the checkpoint
export/fashion_generator.py turns into a bundle.

Examples:
  python train/fashion_generator.py --data /usr/share/datasets/fashion-mnist --out work/pggan
  python train/fashion_generator.py --data /usr/share/datasets/fashion-mnist --out work/pggan --resume
  python train/fashion_generator.py --data DATA --out work/pggan-quick --stage-images 2000 --minutes 5
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402

from fashionserve.catalogue.data import DataError, load_split  # noqa: E402
from fashionserve.catalogue.pggan_training import (  # noqa: E402
    RELEASE_FILE,
    TRAINING_FILE,
    PGGANTraining,
    PGGANTrainOptions,
    pad_to_32,
    train_pggan,
)
from fashionserve.checkpoints import CheckpointError  # noqa: E402
from fashionserve.cli import UserError, run  # noqa: E402


def parse_args() -> argparse.Namespace:
    defaults = PGGANTrainOptions()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="folder holding the Fashion-MNIST IDX files")
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (checkpoints, sheets, history)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUT/training.pt (its stored options win)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"default {defaults.seed}")
    parser.add_argument(
        "--depths",
        default=",".join(str(d) for d in defaults.depths),
        help="channels per resolution from 4x4 up, comma-separated; their count sets the final "
        f"resolution (default {','.join(str(d) for d in defaults.depths)}: 32x32)",
    )
    parser.add_argument(
        "--latent-dim", type=int, default=defaults.latent_dim, help=f"default {defaults.latent_dim}"
    )
    parser.add_argument(
        "--batch-sizes",
        default=",".join(str(b) for b in defaults.batch_sizes),
        help="minibatch per resolution from 4x4 up, comma-separated "
        f"(default {','.join(str(b) for b in defaults.batch_sizes)})",
    )
    parser.add_argument(
        "--fade-images",
        type=int,
        help=f"real images shown while each new resolution fades in (default {defaults.fade_images}); "
        "with --resume, replaces the stored value (to shorten or lengthen a run)",
    )
    parser.add_argument(
        "--stage-images",
        type=int,
        help=f"real images shown at each resolution after its fade-in (default {defaults.stage_images}); "
        "with --resume, replaces the stored value",
    )
    parser.add_argument(
        "--minutes", type=float, help="stop after this many minutes (checkpointed; continue with --resume)"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--limit", type=int, help="use only the first N training images (quick runs)")
    return parser.parse_args()


def options_from(args: argparse.Namespace) -> PGGANTrainOptions:
    defaults = PGGANTrainOptions()
    try:
        depths = tuple(int(d) for d in args.depths.split(","))
        return PGGANTrainOptions(
            depths=depths,
            latent_dim=args.latent_dim,
            batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
            fade_images=defaults.fade_images if args.fade_images is None else args.fade_images,
            stage_images=defaults.stage_images if args.stage_images is None else args.stage_images,
            seed=args.seed,
        )
    except ValueError as exc:
        raise UserError(f"bad training options: {exc}") from None


def resumed(checkpoint: Path, args: argparse.Namespace) -> PGGANTraining:
    """The run in `checkpoint`; --fade-images / --stage-images, if given, change its remaining phases."""
    training = PGGANTraining.from_checkpoint(checkpoint)
    try:
        training.reschedule(args.fade_images, args.stage_images)
    except ValueError as exc:
        raise UserError(f"cannot change the schedule: {exc}") from None
    return training


def main() -> None:
    args = parse_args()
    if args.threads < 1 or (args.minutes is not None and args.minutes <= 0):
        raise UserError("--threads must be at least 1 and --minutes positive")
    torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        raise UserError(f"data folder not found: {args.data}")
    checkpoint = args.out / TRAINING_FILE
    if args.resume:
        training = resumed(checkpoint, args)
        print(f"resumed from {checkpoint} at {training.images:,} images")
    else:
        if checkpoint.exists():
            raise UserError(f"{checkpoint} exists: pass --resume to continue it, or another --out")
        training = PGGANTraining(options_from(args))
    images, _ = load_split(args.data, "train")
    data = torch.from_numpy(pad_to_32(images[: args.limit] if args.limit else images))[:, None]
    options = training.options
    print(
        f"{len(data):,} training images padded to 32x32; generator {options.resolution}x"
        f"{options.resolution}, depths {list(options.depths)}, latent {options.latent_dim}, "
        f"{training.phases[-1].end:,} images in all"
    )
    started = time.monotonic()
    max_seconds = args.minutes * 60.0 if args.minutes is not None else None
    complete = train_pggan(training, data, args.out, max_seconds, log=lambda line: print(line, flush=True))
    spent = time.monotonic() - started
    if complete:
        print(f"training complete in {training.seconds:.0f}s; generator written to {args.out / RELEASE_FILE}")
    else:
        print(f"stopped after {spent:.0f}s at {training.images:,} images; continue with --resume")


if __name__ == "__main__":
    run(main, expected=(DataError, CheckpointError))
