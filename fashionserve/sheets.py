"""Contact sheets: many small images on one grid, optionally with a caption under each."""

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAPTION_HEIGHT = 14  # pixels of caption strip under each image (PIL's default bitmap font is 11 px)


def contact_sheet(
    images: np.ndarray,
    columns: int,
    gap: int = 4,
    background: int = 255,
    scale: int = 1,
    captions: list[str] | None = None,
) -> np.ndarray:
    """uint8 [N, H, W] or [N, H, W, C] -> one uint8 image: `columns` per row, each enlarged `scale` times
    (nearest), `gap` pixels of `background` between them, and a caption under each if given."""
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    count, height, width = images.shape[:3]
    cell = height + (CAPTION_HEIGHT if captions else 0)
    rows = math.ceil(count / columns)
    sheet = np.full(
        (rows * (cell + gap) + gap, columns * (width + gap) + gap, *images.shape[3:]), background, np.uint8
    )
    for index, image in enumerate(images):
        top, left = gap + (index // columns) * (cell + gap), gap + (index % columns) * (width + gap)
        sheet[top : top + height, left : left + width] = image
    if not captions:
        return sheet
    canvas = Image.fromarray(sheet)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    ink = 0 if background > 127 else 255
    for index, caption in enumerate(captions):
        top, left = gap + (index // columns) * (cell + gap), gap + (index % columns) * (width + gap)
        draw.text(
            (left + 1, top + height + 1), caption, fill=ink if sheet.ndim == 2 else (ink,) * 3, font=font
        )
    return np.asarray(canvas)
