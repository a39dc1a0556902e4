"""Face alignment for the hair pipeline: any photo -> the FFHQ-aligned square crop the hair ensembles take,
and the served crop -> back into the photo.

Models (trained, installed from the package index, nothing downloaded): dlib's HOG frontal-face detector
(built into dlib, what the FFHQ recipe and HairFastGAN use) proposes faces; dlib's MMOD CNN face detector
confirms each proposal on a small window around it (HOG alone reports faces on textures, e.g. twice on
the astronaut photo); dlib's 68-point shape predictor (trained on iBUG 300-W) places the landmarks. The
two model files come inside the `face-recognition-models` package.

The crop follows the FFHQ dataset recipe (`recreate_aligned_images`, re-used by HairFastGAN's
scripts/align_face.py): the eye centres and the mouth corners define an oriented square; it is cut out,
rotated and scaled to the served size. The square is kept as an `Alignment`, so the result crop can be
warped back and blended into the photo (`paste_into_photo`), leaving every pixel the server did not change
untouched.

Coordinates are continuous: pixel (i, j) covers [i, i + 1) x [j, j + 1), as in Pillow's transforms.
"""

import importlib.util
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from fashionserve.cli import UserError

MAX_PHOTO_PIXELS = 40_000_000  # a 40 MP photo is 120 MB decoded; larger files are refused unread
MAX_UPSCALE = 8.0  # a face whose crop would be enlarged more than this to the served size is refused
DETECT_SIDE = 1024  # faces are looked for on a copy at most this long (a selfie's face stays large)
CONFIRM_SIDE = 120  # a proposal is confirmed on a window scaled so the face is this many pixels wide
MODELS_PACKAGE = "face_recognition_models"
LANDMARK_MODEL = "shape_predictor_68_face_landmarks.dat"
CONFIRM_MODEL = "mmod_human_face_detector.dat"
LEFT_EYE, RIGHT_EYE = slice(36, 42), slice(42, 48)  # dlib's 68-point layout, as seen on the photo
MOUTH_LEFT, MOUTH_RIGHT = 48, 54  # outer mouth corners


class AlignmentError(UserError):
    """A photo that cannot be aligned (no face, face too small, unreadable or too large)."""


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # left, top, right, bottom, photo pixels
    landmarks: np.ndarray  # 68 x 2 float, dlib's order, continuous photo coordinates (pixel centres)

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]


@dataclass(frozen=True)
class Alignment:
    """The oriented square of the FFHQ crop in the photo: its centre and two half-axes (x: half the top
    edge, left to right; y: half the left edge, top to bottom), continuous photo coordinates."""

    centre: np.ndarray
    half_x: np.ndarray
    half_y: np.ndarray

    @property
    def side(self) -> float:
        """Side of the square in photo pixels."""
        return 2.0 * float(np.hypot(*self.half_x))

    @property
    def corners(self) -> np.ndarray:
        """4 x 2: top-left, bottom-left, bottom-right, top-right (the order of Pillow's QUAD)."""
        c, x, y = self.centre, self.half_x, self.half_y
        return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])

    def crop_to_photo(self, size: int) -> np.ndarray:
        """3 x 3 matrix: continuous coordinates in a size x size crop -> photo."""
        c, x, y = self.centre, self.half_x, self.half_y
        origin = c - x - y
        return np.array(
            [
                [2 * x[0] / size, 2 * y[0] / size, origin[0]],
                [2 * x[1] / size, 2 * y[1] / size, origin[1]],
                [0, 0, 1],
            ]
        )

    def photo_to_crop(self, size: int) -> np.ndarray:
        return np.linalg.inv(self.crop_to_photo(size))


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """N x 2 points through a 3 x 3 affine matrix."""
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def ffhq_alignment(landmarks: np.ndarray) -> Alignment:
    """The FFHQ crop square from 68 landmarks (continuous photo coordinates)."""
    eye_left, eye_right = landmarks[LEFT_EYE].mean(0), landmarks[RIGHT_EYE].mean(0)
    eye_centre = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (landmarks[MOUTH_LEFT] + landmarks[MOUTH_RIGHT]) / 2 - eye_centre
    # The crop's x axis: the eye line averaged with the eye-to-mouth line turned a quarter clockwise.
    half_x = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    half_x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8) / np.hypot(*half_x)
    half_y = np.array([-half_x[1], half_x[0]])
    return Alignment(centre=eye_centre + 0.1 * eye_to_mouth, half_x=half_x, half_y=half_y)


def warp_to_crop(photo: np.ndarray, alignment: Alignment, size: int) -> np.ndarray:
    """size x size x 3 uint8 crop of the aligned square, made like the FFHQ recipe: shrink a much larger
    photo first, pad where the square leaves the photo with a blurred reflection fading to the median
    colour, sample at 4x the size (bilinear), then downscale with Lanczos."""
    image = Image.fromarray(photo)
    corners = alignment.corners
    side = alignment.side
    shrink = math.floor(side / size / 2)
    if shrink > 1:
        small = (round(image.width / shrink), round(image.height / shrink))
        corners = corners * [small[0] / image.width, small[1] / image.height]
        image = image.resize(small, Image.LANCZOS)
        side /= shrink
    border = max(round(side * 0.1), 3)
    left, top = np.floor(corners.min(0)).astype(int) - border
    right, bottom = np.ceil(corners.max(0)).astype(int) + border
    box = (max(left, 0), max(top, 0), min(right, image.width), min(bottom, image.height))
    image = image.crop(box)
    corners = corners - box[:2]
    pad = (max(-left, 0), max(-top, 0), max(right - box[2], 0), max(bottom - box[3], 0))  # l, t, r, b
    if max(pad) > border - 4:
        image, offset = _pad_like_ffhq(np.asarray(image), pad, side)
        corners = corners + offset
    big = 4 * size
    quad = image.transform((big, big), Image.QUAD, corners.flatten().tolist(), Image.BILINEAR)
    return np.asarray(quad.resize((size, size), Image.LANCZOS))


def _pad_like_ffhq(
    image: np.ndarray, pad: tuple[int, int, int, int], side: float
) -> tuple[Image.Image, np.ndarray]:
    """Reflect-pad (at least 30% of the square's side on every edge), blur the padding more the further
    it is from the photo and fade it to the photo's median colour; returns the image and the shift."""
    left, top, right, bottom = np.maximum(pad, round(side * 0.3))
    padded = np.pad(image.astype(np.float32), ((top, bottom), (left, right), (0, 0)), mode="reflect")
    height, width = padded.shape[:2]
    rows, cols = np.ogrid[:height, :width]
    distance_in = np.maximum(
        1.0 - np.minimum(cols.astype(np.float32) / left, (width - 1 - cols).astype(np.float32) / right),
        1.0 - np.minimum(rows.astype(np.float32) / top, (height - 1 - rows).astype(np.float32) / bottom),
    )[..., None]
    blur = side * 0.02
    blurred = ndimage.gaussian_filter(padded, [blur, blur, 0])
    padded += (blurred - padded) * np.clip(distance_in * 3.0 + 1.0, 0.0, 1.0)
    padded += (np.median(padded, axis=(0, 1)) - padded) * np.clip(distance_in, 0.0, 1.0)
    image_out = Image.fromarray(np.clip(np.rint(padded), 0, 255).astype(np.uint8))
    return image_out, np.array([left, top], dtype=np.float64)


def read_photo(path: Path, max_pixels: int = MAX_PHOTO_PIXELS) -> np.ndarray:
    """RGB uint8 H x W x 3, upright by its EXIF orientation. The size is read from the header and a photo
    over `max_pixels` is refused before it is decoded."""
    if not path.is_file():
        raise AlignmentError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():  # Pillow warns above its own limit; ours is lower and says more
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise AlignmentError(_too_large(path, width, height, max_pixels))
                return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except Image.DecompressionBombError:
        raise AlignmentError(f"{path} is too large to open (over {max_pixels / 1e6:g} megapixels)") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise AlignmentError(f"cannot read image {path}: {exc}") from None


def _too_large(path: Path, width: int, height: int, max_pixels: int) -> str:
    return (
        f"{path} is {width}x{height} ({width * height / 1e6:.1f} megapixels), over the limit of "
        f"{max_pixels / 1e6:g} megapixels: scale it down first"
    )


@dataclass(frozen=True)
class AlignedFace:
    crop: np.ndarray  # size x size x 3 uint8
    alignment: Alignment
    face: Face
    faces_found: int  # the largest face is used when there are several


def _models_folder() -> Path:
    spec = importlib.util.find_spec(MODELS_PACKAGE)  # not imported: its __init__ needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise AlignmentError(
            "face alignment needs the packages dlib-bin and face-recognition-models "
            "(pip install -r requirements.txt), or use --aligned with ready crops"
        )
    return Path(spec.submodule_search_locations[0]) / "models"


class FaceAligner:
    """Finds faces with dlib and cuts FFHQ crops. Loading the models takes about a second; keep one."""

    def __init__(self, landmark_model: Path | None = None):
        try:
            import dlib  # a compiled extension: imported only when alignment is used
        except ImportError:
            raise AlignmentError(
                "face alignment needs the package dlib-bin (pip install -r requirements.txt), "
                "or use --aligned with ready crops"
            ) from None
        models = _models_folder()
        landmark_model = landmark_model or models / LANDMARK_MODEL
        if not landmark_model.is_file():
            raise AlignmentError(f"landmark model not found: {landmark_model}")
        self._dlib = dlib
        self._propose = dlib.get_frontal_face_detector()
        self._confirm = dlib.cnn_face_detection_model_v1(str(models / CONFIRM_MODEL))
        try:
            self._landmarks = dlib.shape_predictor(str(landmark_model))
        except RuntimeError as exc:
            raise AlignmentError(f"cannot load landmark model {landmark_model}: {exc}") from None

    def find_faces(self, photo: np.ndarray) -> list[Face]:
        """Confirmed faces with their 68 landmarks, largest first."""
        photo = np.ascontiguousarray(photo)  # dlib misreads strided views (e.g. a slice of a photo)
        height, width = photo.shape[:2]
        scale = min(1.0, DETECT_SIDE / max(height, width))
        small = photo
        if scale < 1.0:
            small = np.asarray(Image.fromarray(photo).resize((round(width * scale), round(height * scale))))
        faces = []
        for rect in self._propose(small, 1):  # one upsampling: faces down to about 40 pixels
            box = tuple(
                int(round(v / scale)) for v in (rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)
            )
            if not self._confirmed(photo, box):
                continue
            shape = self._landmarks(photo, self._dlib.rectangle(box[0], box[1], box[2] - 1, box[3] - 1))
            landmarks = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64) + 0.5
            faces.append(Face(box=box, landmarks=landmarks))
        return sorted(faces, key=lambda face: face.width * face.height, reverse=True)

    def _confirmed(self, photo: np.ndarray, box: tuple[int, int, int, int]) -> bool:
        """Whether the CNN detector finds a face centred inside `box` on a window twice its size."""
        left, top, right, bottom = box
        reach = max(right - left, bottom - top)
        x0, y0 = max((left + right) // 2 - reach, 0), max((top + bottom) // 2 - reach, 0)
        window = Image.fromarray(photo[y0 : (top + bottom) // 2 + reach, x0 : (left + right) // 2 + reach])
        zoom = CONFIRM_SIDE / reach
        window = window.resize((max(1, round(window.width * zoom)), max(1, round(window.height * zoom))))
        for detection in self._confirm(np.asarray(window), 0):
            centre_x = x0 + (detection.rect.left() + detection.rect.right() + 1) / 2 / zoom
            centre_y = y0 + (detection.rect.top() + detection.rect.bottom() + 1) / 2 / zoom
            if left <= centre_x <= right and top <= centre_y <= bottom:
                return True
        return False

    def align(
        self, photo: np.ndarray, size: int, name: str | Path, max_upscale: float = MAX_UPSCALE
    ) -> AlignedFace:
        """The size x size FFHQ crop of the largest face in `photo` (`name` is used in errors)."""
        faces = self.find_faces(photo)
        if not faces:
            raise AlignmentError(f"no face found in {name}")
        face = faces[0]
        alignment = ffhq_alignment(face.landmarks)
        if alignment.side * max_upscale < size:
            raise AlignmentError(
                f"the face in {name} is too small: {face.width}x{face.height} px, its crop "
                f"{alignment.side:.0f} px across; the server's {size} px crops need at least "
                f"{size / max_upscale:.0f} px (at most {max_upscale:g}x enlargement): use a larger photo"
            )
        return AlignedFace(warp_to_crop(photo, alignment, size), alignment, face, len(faces))


def feather_width(size: int) -> int:
    """Blend seam width in crop pixels (16 at 1024)."""
    return max(2, round(size / 64))


def crop_window(size: int, feather: int) -> np.ndarray:
    """size x size float32: 1 inside, falling linearly to 0 over `feather` pixels at the edges."""
    ramp = np.clip((np.minimum(np.arange(size), np.arange(size)[::-1]) + 0.5) / feather, 0.0, 1.0)
    return np.minimum.outer(ramp, ramp).astype(np.float32)


def changed_region(sent: np.ndarray, result: np.ndarray, feather: int) -> np.ndarray:
    """size x size float32 blend mask: 1 on every pixel the server changed (the hair region, as its
    parser and composite decided) and `feather` pixels around, falling to 0 over another `feather`
    pixels; 0 at the crop's edges."""
    changed = np.any(sent != result, axis=-1)
    grown = ndimage.maximum_filter(changed, size=2 * feather + 1).astype(np.float32)
    soft = ndimage.uniform_filter(grown, size=2 * feather + 1, mode="constant")
    soft[soft < 1e-6] = 0.0  # uniform_filter leaves rounding dust where it should be 0
    return np.minimum(soft, crop_window(len(sent), feather))


def paste_back(photo: np.ndarray, crop: np.ndarray, alignment: Alignment, mask: np.ndarray) -> np.ndarray:
    """`photo` with `crop` warped back into the aligned square and blended by `mask` (crop coordinates, 0
    to 1). Photo pixels where the warped mask is 0 keep their exact values."""
    height, width = photo.shape[:2]
    corners = alignment.corners
    left, top = np.maximum(np.floor(corners.min(0)).astype(int), 0)
    right, bottom = np.minimum(np.ceil(corners.max(0)).astype(int), (width, height))
    if right <= left or bottom <= top:
        return photo.copy()
    # Shrink the crop to about its size in the photo first, so that sampling it does not alias.
    side = max(1, min(len(crop), round(alignment.side)))
    image, weight = Image.fromarray(crop), Image.fromarray(mask.astype(np.float32))  # mode F
    if side < len(crop):
        image, weight = image.resize((side, side), Image.LANCZOS), weight.resize((side, side), Image.BILINEAR)
    to_crop = alignment.photo_to_crop(side) @ np.array([[1, 0, left], [0, 1, top], [0, 0, 1]])
    affine = to_crop[:2].flatten().tolist()
    out_size = (int(right - left), int(bottom - top))
    warped = np.asarray(image.transform(out_size, Image.AFFINE, affine, Image.BICUBIC), dtype=np.float32)
    weights = np.asarray(weight.transform(out_size, Image.AFFINE, affine, Image.BILINEAR))[..., None]
    region = photo[top:bottom, left:right]
    blended = np.clip(np.rint(region + weights * (warped - region)), 0, 255).astype(np.uint8)
    result = photo.copy()
    result[top:bottom, left:right] = np.where(weights > 0, blended, region)
    return result


def paste_into_photo(
    photo: np.ndarray, alignment: Alignment, sent: np.ndarray, result: np.ndarray
) -> np.ndarray:
    """The served `result` for the crop `sent` blended into `photo` where the server changed the crop."""
    return paste_back(photo, result, alignment, changed_region(sent, result, feather_width(len(sent))))
