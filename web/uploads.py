"""Uploaded photos are personal data: read into memory only (never a temporary file, never a log line),
bounded in bytes before parsing and in pixels before decoding, and accepted by content, not by name."""

import io
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

# What Pillow recognises from the first bytes (the name and the declared type are ignored). Phone JPEGs
# with extra frames (MPO) open through the JPEG plugin.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
Image.init()  # registers every plugin: WebP is not among the few Pillow loads first
MAX_FILES = 3  # a face, a hairstyle (shape) reference and a hair colour reference
MAX_FIELDS = 8


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 12 * 1024 * 1024  # the whole request body
    max_pixels: int = 40_000_000  # a 48 MP phone photo is 8000x6000; a decompression bomb is far more
    max_side: int = 12_000


class UploadError(Exception):
    """A request the user can fix (too big, not an image, ...): the message is shown as is."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


async def _capped(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, refused as soon as it grows past `limit` bytes (whatever Content-Length says)."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise UploadError(_too_big(limit), 413)
        yield chunk


def _too_big(limit: int) -> str:
    return f"The upload is larger than {limit / 2**20:.0f} MB: send a smaller photo."


async def read_form(request: Request, limits: UploadLimits) -> FormData:
    """Parse a multipart/form-data body entirely in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
        raise UploadError(_too_big(limits.max_bytes), 413)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadError("Send the form as multipart/form-data.", 415)
    parser = MultiPartParser(
        request.headers,
        _capped(request, limits.max_bytes),
        max_files=MAX_FILES,
        max_fields=MAX_FIELDS,
        max_part_size=64 * 1024,  # text fields only
    )
    # Starlette spools each file part into a SpooledTemporaryFile that moves to disk above
    # spool_max_size; a part can never be larger than the whole body, so this one never does.
    parser.spool_max_size = limits.max_bytes + 1
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise UploadError(f"The form could not be read: {exc}") from None


async def file_bytes(form: FormData, field: str) -> bytes | None:
    """The bytes of an uploaded file field, or None when the field is absent or empty."""
    value = form.get(field)
    if not isinstance(value, UploadFile):
        return None
    data = await value.read()
    return data or None


def decode_image(data: bytes, what: str, limits: UploadLimits) -> np.ndarray:
    """RGB uint8 pixels of an uploaded photo, upright (EXIF orientation applied). The size is read
    from the header and checked before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise UploadError(
            f"The {what} is not a JPEG, PNG or WebP image (other formats, e.g. HEIC, must be converted).",
            415,
        ) from None
    except (OSError, Image.DecompressionBombError, ValueError):
        raise UploadError(f"The {what} could not be read as an image: the file is damaged.") from None
    with image:
        width, height = image.size
        if width * height > limits.max_pixels or max(width, height) > limits.max_side:
            raise UploadError(
                f"The {what} is {width}x{height} pixels; the limit is {limits.max_pixels / 1e6:.0f} "
                f"megapixels and {limits.max_side} pixels a side.",
                413,
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
                upright = ImageOps.exif_transpose(image)
                return np.asarray(upright.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning):
            raise UploadError(
                f"The {what} could not be decoded: the file is damaged or incomplete."
            ) from None
