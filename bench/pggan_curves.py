"""Plot a PG-GAN training run's curves (OUT/history.json of train/fashion_generator.py) as one PNG.

Top: the critic's Wasserstein estimate D(real) - D(fake) and the gradient penalty; bottom: the critic
and generator losses; x: real images shown; dotted lines where a new resolution starts to fade in.

Example:
  python bench/pggan_curves.py work/pggan/history.json --out docs/catalogue/generator_training.png
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.cli import UserError, run  # noqa: E402


def read_history(path: Path) -> list[dict]:
    try:
        history = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(history, list) or not history or "wasserstein" not in history[0]:
        raise UserError(f"{path}: not a training history (a list of logged steps)")
    return history


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("history", type=Path, help="history.json of a training run")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()
    history = read_history(args.history)
    images = [entry["images"] / 1000 for entry in history]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(images, [e["wasserstein"] for e in history], label="D(real) - D(fake)")
    top.plot(images, [e["gradient_penalty"] for e in history], label="gradient penalty")
    bottom.plot(images, [e["loss_d"] for e in history], label="critic loss")
    bottom.plot(images, [e["loss_g"] for e in history], label="generator loss")
    for previous, entry in zip(history, history[1:], strict=False):
        if entry["resolution"] != previous["resolution"]:
            for axis in (top, bottom):
                axis.axvline(previous["images"] / 1000, color="gray", linestyle=":")
            top.annotate(
                f"{entry['resolution']}px",
                (previous["images"] / 1000, 1),
                xycoords=("data", "axes fraction"),
                va="top",
                fontsize=8,
            )
    top.set_title(f"PG-GAN training ({history[-1]['seconds'] / 60:.0f} min on one CPU thread)")
    bottom.set_xlabel("real images shown (thousands)")
    for axis in (top, bottom):
        axis.legend(loc="upper right", fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run(main)
