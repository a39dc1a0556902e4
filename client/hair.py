"""Hairstyle try-on through Triton: write PNGs of faces with another photo's hairstyle and a third
photo's hair colour (`hair_transfer`, HairFastGAN), or with their hair edited along a latent direction
(`hair_edit`).

Faces and references are any photos: the client finds the largest face (dlib detector and 68 landmarks,
fashionserve/hair/alignment.py), cuts the FFHQ-aligned crop the server takes (the `hair` bundle's
resolution, 1024 for the released weights) and pastes the result back into the original face photo,
where the server changed the crop; the rest of the photo is kept bit for bit. With --aligned the images
are taken as ready face-aligned square crops and the result is the crop: another size is refused unless
--resize scales it; a non-square image is always refused. Everything is checked (and aligned) before
anything is sent.

Transfer: --face F [F ...] --shape S [S ...] [--color C [C ...]]: the hairstyle (shape) of S in the hair
colour of C. Each reference option takes one image for all faces or one per face; without --color the
colour comes from the shape reference. The same photo may be given twice (e.g. --color F keeps the
face's own hair colour).
Edit: --face F [F ...] --direction D.npy --strength S. D is an InterFaceGAN-style direction in W space:
[512] or [1, 512] (applied to every W+ layer) or [18, 512] (one per layer), at the served model's style
dimension and layer count.
Without --face the drawn sample portraits are used (in transfer mode each takes the next one's hairstyle
and the one after's colour); without --direction in edit mode, a sample direction that is NOT semantic
(a seeded unit vector).

Examples:
  python client/hair.py --out work/hair
  python client/hair.py --face selfie.jpg --shape style.jpg --out work/hair
  python client/hair.py --face selfie.jpg --shape style.jpg --color blond.jpg --out work/hair
  python client/hair.py --aligned --face crop.png --shape style_crop.png --out work/hair
  python client/hair.py --face me.png --direction bangs.npy --strength 1.5 --out work/hair
  python client/hair.py --strength 2 --protocol http --url 127.0.0.1:8000 --out work/hair
"""

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from fashionserve.cli import UserError, command_parser, output_folder, run  # noqa: E402
from fashionserve.client import (  # noqa: E402
    DEFAULT_URLS,
    PROTOCOLS,
    ClientError,
    TritonModelClient,
    open_image,
    save_png,
)
from fashionserve.hair.alignment import (  # noqa: E402
    MAX_UPSCALE,
    Alignment,
    FaceAligner,
    paste_into_photo,
    read_photo,
)
from fashionserve.hair.directions import per_layer_direction  # noqa: E402
from fashionserve.hair.samples import sample_direction, sample_portraits  # noqa: E402

TRANSFER, EDIT = "hair_transfer", "hair_edit"
INPUTS = {
    TRANSFER: ("face", "shape_reference", "color_reference"),
    EDIT: ("portrait", "direction", "strength"),
}
FACE_INPUT = {TRANSFER: "face", EDIT: "portrait"}  # the input the result is pasted back from


@dataclass(frozen=True)
class Placement:
    """Where a portrait's crop came from, to paste the result back."""

    photo: np.ndarray
    alignment: Alignment


Item = tuple[str, dict[str, np.ndarray], Placement | None]  # output name, one sample's inputs, its photo


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.add_argument(
        "--face", "--portrait", type=Path, nargs="+", help="face photo(s) to change (default: the samples)"
    )
    transfer = parser.add_argument_group("transfer (default mode)")
    transfer.add_argument("--shape", type=Path, nargs="+", help="photo(s) whose hairstyle (shape) to take")
    transfer.add_argument(
        "--color",
        type=Path,
        nargs="+",
        help="photo(s) whose hair colour to take (default: the --shape photo(s))",
    )
    edit = parser.add_argument_group("edit (chosen by --direction or --strength)")
    edit.add_argument("--direction", type=Path, help="latent direction .npy (default: the sample direction)")
    edit.add_argument("--strength", type=float, help="how far to move along the direction (default 1.0)")
    parser.add_argument("--url", help="Triton address (default 127.0.0.1:8001 for grpc, :8000 for http)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="grpc (default) or http")
    parser.add_argument("--model", help=f"ensemble name (default {TRANSFER} or {EDIT}, by mode)")
    parser.add_argument("--batch", type=int, default=1, help="faces per request (default 1)")
    parser.add_argument("--aligned", action="store_true", help="images are ready FFHQ-aligned square crops")
    parser.add_argument(
        "--resize", action="store_true", help="with --aligned: scale crops to the served size"
    )
    parser.add_argument(
        "--max-upscale",
        type=float,
        default=MAX_UPSCALE,
        help=f"refuse faces whose crop would be enlarged more than this (default {MAX_UPSCALE:g})",
    )
    parser.add_argument(
        "--landmark-model",
        type=Path,
        help="another dlib 68-point shape_predictor .dat (default: the packaged one)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the result PNGs")
    args = parser.parse_args()
    args.mode = EDIT if args.direction is not None or args.strength is not None else TRANSFER
    if args.mode == EDIT and (args.shape or args.color):
        parser.error("--shape/--color (transfer) and --direction/--strength (edit) exclude each other")
    if args.mode == TRANSFER and args.face and not args.shape:
        parser.error("--face needs --shape (the hairstyle photo) in transfer mode")
    if (args.shape or args.color) and not args.face:
        parser.error("--shape and --color need --face")
    for option, references in (("--shape", args.shape), ("--color", args.color)):
        if references and len(references) not in (1, len(args.face)):
            parser.error(f"give one {option} or one per face ({len(args.face)}), not {len(references)}")
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    if args.resize and not args.aligned:
        parser.error("--resize only applies to --aligned crops (photos are aligned to the served size)")
    if not args.max_upscale > 0:
        parser.error("--max-upscale must be positive")
    return args


def read_portrait(path: Path, size: int, resize: bool) -> np.ndarray:
    """RGB uint8 size x size x 3 from an image file; refuses non-square images, and other sizes unless
    `resize`."""
    with open_image(path) as image:
        image = image.convert("RGB")
    width, height = image.size
    if width != height:
        raise UserError(f"{path} is {width}x{height}, not square: send a face-aligned square crop")
    if width != size:
        if not resize:
            raise UserError(
                f"{path} is {width}x{height}; the server takes {size}x{size} crops (--resize scales it)"
            )
        image = image.resize((size, size), Image.LANCZOS)
    return np.asarray(image)


def read_direction(path: Path | None, n_latent: int, style_dim: int) -> np.ndarray:
    """n_latent x style_dim float32 direction from a .npy ([style_dim], [1, style_dim] repeated over the
    layers, or [n_latent, style_dim]), or the sample direction."""
    if path is None:
        return np.repeat(sample_direction(style_dim)[None], n_latent, axis=0)
    if not path.is_file():
        raise UserError(f"direction not found: {path}")
    try:
        direction = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read direction {path} as .npy: {exc}") from None
    try:
        return per_layer_direction(direction, n_latent, style_dim)
    except ValueError as exc:
        raise UserError(f"direction {path} {exc}") from None


class FaceReader:
    """The user's images as the crops the server takes: FFHQ-aligned crops of any photo (the default), or
    ready crops (--aligned). The face models load on first use."""

    def __init__(self, args: argparse.Namespace, size: int):
        self.args = args
        self.size = size
        self.aligner: FaceAligner | None = None

    def crop(self, path: Path, role: str) -> tuple[np.ndarray, Placement | None]:
        """The crop of `path` (the `role` it plays names it in errors), and where it came from."""
        try:
            return self._crop(path)
        except UserError as exc:
            raise UserError(f"{role}: {exc}") from None

    def _crop(self, path: Path) -> tuple[np.ndarray, Placement | None]:
        if self.args.aligned:
            return read_portrait(path, self.size, self.args.resize), None
        photo = read_photo(path)
        if self.aligner is None:
            self.aligner = FaceAligner(self.args.landmark_model)
        aligned = self.aligner.align(photo, self.size, path, self.args.max_upscale)
        face = aligned.face
        several = f"found {aligned.faces_found} faces, using the largest: " if aligned.faces_found > 1 else ""
        print(
            f"{path}: {several}face {face.width}x{face.height} px at ({face.box[0]}, {face.box[1]}), "
            f"crop {aligned.alignment.side:.0f} px across"
        )
        return aligned.crop, Placement(photo, aligned.alignment)


def per_face(references: list[Path], count: int) -> list[Path]:
    """One reference per face: a single one repeated, or the list as given."""
    return references * count if len(references) == 1 else references


def transfer_name(face: str, shape: str, color: str) -> str:
    return f"{face}_hair_{shape}" if color == shape else f"{face}_hair_{shape}_color_{color}"


def transfer_items(args: argparse.Namespace, reader: FaceReader) -> list[Item]:
    if args.face is None:
        samples = list(sample_portraits(reader.size).items())
        shapes, colors = samples[1:] + samples[:1], samples[2:] + samples[:2]
        return [
            (
                transfer_name(name, shape_name, color_name),
                {"face": image, "shape_reference": shape, "color_reference": color},
                None,
            )
            for (name, image), (shape_name, shape), (color_name, color) in zip(
                samples, shapes, colors, strict=True
            )
        ]
    shapes = per_face(args.shape, len(args.face))
    colors = per_face(args.color, len(args.face)) if args.color else shapes
    crops: dict[Path, tuple[np.ndarray, Placement | None]] = {}

    def crop(path: Path, role: str) -> tuple[np.ndarray, Placement | None]:
        if path not in crops:  # a photo named twice (e.g. as shape and colour) is aligned once
            crops[path] = reader.crop(path, role)
        return crops[path]

    items = []
    for face, shape, color in zip(args.face, shapes, colors, strict=True):
        face_crop, placement = crop(face, "face")
        inputs = {
            "face": face_crop,
            "shape_reference": crop(shape, "shape reference")[0],
            "color_reference": crop(color, "colour reference")[0],
        }
        items.append((transfer_name(face.stem, shape.stem, color.stem), inputs, placement))
    return items


def edit_items(args: argparse.Namespace, reader: FaceReader, n_latent: int, style_dim: int) -> list[Item]:
    direction = read_direction(args.direction, n_latent, style_dim)
    strength = 1.0 if args.strength is None else args.strength
    if not np.isfinite(strength):
        raise UserError(f"--strength must be a finite number, got {strength}")
    label = f"edit_{args.direction.stem if args.direction else 'sample'}_{strength:g}"
    portraits = (
        [(name, image, None) for name, image in sample_portraits(reader.size).items()]
        if args.face is None
        else [(p.stem, *reader.crop(p, "face")) for p in args.face]
    )
    values = {"direction": direction, "strength": np.array([strength], np.float32)}
    return [(f"{name}_{label}", {"portrait": image, **values}, place) for name, image, place in portraits]


def main() -> None:
    args = parse_args()
    output_folder(args.out)
    client = TritonModelClient(
        args.url or DEFAULT_URLS[args.protocol], args.model or args.mode, args.protocol
    )
    shapes = {spec.name: spec.shape for spec in client.inputs}
    expected = INPUTS[args.mode]
    if set(shapes) != set(expected):
        raise UserError(
            f"model '{client.model}' takes {sorted(shapes)}, not the {args.mode} inputs {list(expected)}"
        )
    if client.max_batch_size and args.batch > client.max_batch_size:
        raise UserError(
            f"--batch {args.batch} is over the largest batch of '{client.model}': {client.max_batch_size}"
        )
    reader = FaceReader(args, size=shapes[FACE_INPUT[args.mode]][0])
    if args.mode == EDIT:
        n_latent, style_dim = shapes["direction"]
        items = edit_items(args, reader, n_latent, style_dim)
    else:
        items = transfer_items(args, reader)
    names = [name for name, _, _ in items]
    if clash := next((name for name in names if names.count(name) > 1), None):
        raise UserError(f"two results would be written to {args.out / clash}.png: rename one of the images")
    pending = iter(items)
    while chunk := list(itertools.islice(pending, args.batch)):
        batch = {name: np.stack([inputs[name] for _, inputs, _ in chunk]) for name in chunk[0][1]}
        images = client.infer(batch)["hair_image"]
        for (name, inputs, placement), image in zip(chunk, images, strict=True):
            if placement is not None:  # back into the original photo, where the server changed the crop
                sent = inputs[FACE_INPUT[args.mode]]
                image = paste_into_photo(placement.photo, placement.alignment, sent, image)
            path = args.out / f"{name}.png"
            save_png(path, image)
            print(f"wrote {path}")
    client.close()


if __name__ == "__main__":
    run(main, expected=(ClientError,))
