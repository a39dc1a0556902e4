"""Write the tiny drawn VITON-HD-layout sample set (2 persons, 2 garments, 2 unpaired pairs)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package is used from the checkout

from fashionserve.tryon.dataset import PAIRS_FILE, cloth_files, person_files  # noqa: E402
from fashionserve.tryon.samples import write_sample_set  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a tiny, deterministic VITON-HD-layout try-on test set made from drawings "
        "(no photos): OUT_DIR/test_pairs.txt and OUT_DIR/test/{image, image-parse-v3, "
        "image-parse-agnostic-v3.2, openpose_json, openpose_img, image-densepose, cloth, cloth-mask}. "
        "Files of the same names are overwritten."
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="dataset root to write")
    parser.add_argument("--height", type=int, default=1024, help="image height (default 1024)")
    parser.add_argument("--width", type=int, default=768, help="image width (default 768)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the small pose/colour variations (default 0)"
    )
    args = parser.parse_args(argv)

    try:
        pairs = write_sample_set(args.out_dir, args.height, args.width, args.seed)
    except (ValueError, OSError) as exc:
        print(f"make_samples: error: {exc}", file=sys.stderr)
        return 2

    split_dir = args.out_dir / "test"
    files = [args.out_dir / PAIRS_FILE.format(split="test")]
    for person in sorted({person for person, _ in pairs}):
        files += person_files(split_dir, person).values()
    for cloth in sorted({cloth for _, cloth in pairs}):
        files += cloth_files(split_dir, cloth).values()
    print(f"wrote {len(files)} files ({args.height}x{args.width}, seed {args.seed}):")
    for path in files:
        print(f"  {path}")
    print("pairs (person cloth):")
    for person, cloth in pairs:
        print(f"  {person} {cloth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
