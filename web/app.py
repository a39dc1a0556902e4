"""The web app: three pages (try-on, hairstyle transfer, hair edit) and the JSON/PNG API they call.

Every request to Triton goes through one shared gRPC connection; the blocking work of a request
(decoding, reading the data folder, inference, encoding the result) runs in a worker thread, so one
user's request never holds up another's. Uploaded photos stay in memory (see web/uploads.py)."""

import io
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from scipy import ndimage
from starlette.concurrency import run_in_threadpool
from tritonclient.utils import InferenceServerException

from fashionserve.catalogue.gate import GATE_MODEL, classify
from fashionserve.client import ClientError, TritonModelClient
from fashionserve.hair.alignment import Alignment, AlignmentError, FaceAligner, paste_into_photo
from fashionserve.hair.directions import per_layer_direction
from fashionserve.hair.samples import SAMPLE_PORTRAITS, sample_direction, sample_portraits
from fashionserve.tryon.dataset import (
    DatasetError,
    cloth_files,
    load_person_files,
    load_tryon_files,
    person_files,
    resize_inputs,
)
from web.status import StatusReader
from web.uploads import UploadError, UploadLimits, decode_image, file_bytes, read_form

STATIC = Path(__file__).parent / "static"
PAGES = ("tryon", "hair", "edit")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
THUMBNAIL_HEIGHT = 192
SAMPLE_DIRECTION = "sample"
SAMPLE_NAMES = tuple(sample.name for sample in SAMPLE_PORTRAITS)
SAMPLE_VIEW_SIZE = 256  # the drawn sample portraits as the pages show them
MAX_STRENGTH = 5.0  # InterFaceGAN edits use about ±3
GATE_THRESHOLD = 0.5  # as client/tryon.py's default
# An uploaded garment photo becomes a VITON-HD cloth image: garment pixels are those more than this
# fraction of the RGB diagonal away from the photo's border colour (as the garment classifier trims).
GARMENT_DISTANCE = 0.05 * float(np.sqrt(3) * 255)

logger = logging.getLogger("web")


@dataclass(frozen=True)
class Settings:
    triton_url: str
    dataroot: Path | None = None  # a VITON-HD-layout folder: the persons and garments to pick from
    split: str = "test"
    mlflow_uri: str | None = None  # MLflow: the status line also shows where 'production' points
    directions: Path | None = None  # folder of .npy latent directions for the edit page
    limits: UploadLimits = field(default_factory=UploadLimits)
    timeout_s: float = 300.0


class ServiceError(Exception):
    """A failure shown to the user as is (server down, model not loaded, refused input)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Models:
    """The shared gRPC connection to Triton; its methods block (call them from worker threads)."""

    def __init__(self, settings: Settings):
        self.url = settings.triton_url
        self.timeout_s = settings.timeout_s
        self.connection = grpcclient.InferenceServerClient(settings.triton_url)

    def client(self, model: str, what: str) -> TritonModelClient:
        """A client of `model` on the shared connection, or a ServiceError saying what is wrong."""
        try:
            self.connection.is_server_live()
        except InferenceServerException:
            raise ServiceError(
                503, f"The model server is not reachable (Triton at {self.url}). Try again in a minute."
            ) from None
        if not self.has(model):
            raise ServiceError(503, f"The {what} model ({model}) is not loaded on the server right now.")
        try:
            return TritonModelClient(self.url, model, "grpc", self.timeout_s, connection=self.connection)
        except ClientError as exc:  # unloaded between the two calls
            raise ServiceError(503, f"The {what} model is not available: {exc}") from None

    def has(self, model: str) -> bool:
        try:
            return bool(self.connection.is_model_ready(model))
        except InferenceServerException:
            return False

    @staticmethod
    def infer(client: TritonModelClient, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
        """One sample through `client`'s model (batch of one); its `output`."""
        try:
            return client.infer({name: array[None] for name, array in inputs.items()})[output][0]
        except ClientError as exc:
            raise ServiceError(502, f"The model server could not run this request: {exc}") from None

    def close(self) -> None:
        self.connection.close()


def png_response(image: np.ndarray) -> Response:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return Response(buffer.getvalue(), media_type="image/png")


@dataclass(frozen=True)
class Portrait:
    """What the hair models get for one image: the served-size crop, and for an uploaded photo whose face
    was aligned, the photo and its alignment (the result is pasted back into it)."""

    crop: np.ndarray
    photo: np.ndarray | None = None
    alignment: Alignment | None = None

    def result(self, served: np.ndarray) -> np.ndarray:
        if self.alignment is None:
            return served
        return paste_into_photo(self.photo, self.alignment, self.crop, served)


class Faces:
    """dlib face alignment (fashionserve.hair.alignment), loaded on first use, one thread at a time."""

    def __init__(self):
        self._aligner: FaceAligner | None = None
        self._lock = threading.Lock()

    def portrait(self, photo: np.ndarray, what: str, size: int) -> Portrait:
        """The FFHQ crop of the largest face in `photo`. A square photo where no face is found is taken
        as a ready face-aligned crop (e.g. the drawn samples, which dlib does not see as faces)."""
        try:
            with self._lock:
                if self._aligner is None:
                    self._aligner = FaceAligner()
                aligned = self._aligner.align(photo, size, f"the {what}")
        except AlignmentError as exc:
            height, width = photo.shape[:2]
            if not str(exc).startswith("no face found") or height != width:
                raise UploadError(
                    f"{str(exc)[0].upper()}{str(exc)[1:]}: upload a photo where the face is clearly "
                    "visible, or a square face-aligned crop."
                ) from None
            if width == size:
                return Portrait(photo)
            return Portrait(np.asarray(Image.fromarray(photo).resize((size, size), Image.LANCZOS)))
        return Portrait(aligned.crop, photo, aligned.alignment)


def garment_from_photo(photo: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A garment photo as the try-on model's cloth image and mask: scaled to fit height x width, padded
    with the photo's border colour, the mask is what differs from that colour (holes filled)."""
    border = np.concatenate([photo[0], photo[-1], photo[:, 0], photo[:, -1]])
    background = np.median(border, axis=0).astype(np.uint8)
    scale = min(height / photo.shape[0], width / photo.shape[1])
    size = (max(1, round(photo.shape[1] * scale)), max(1, round(photo.shape[0] * scale)))
    scaled = np.asarray(Image.fromarray(photo).resize(size, Image.LANCZOS))
    cloth = np.empty((height, width, 3), np.uint8)
    cloth[:] = background
    top, left = (height - size[1]) // 2, (width - size[0]) // 2
    cloth[top : top + size[1], left : left + size[0]] = scaled
    distance = np.linalg.norm(cloth.astype(np.float32) - background, axis=-1)
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(distance > GARMENT_DISTANCE, iterations=2))
    if not mask.any():
        raise UploadError("No garment found in the photo: use a garment on a plain background.")
    return cloth, mask.astype(np.uint8) * 255


class Catalogue:
    """The persons and garments of the VITON-HD-layout folder, by file name."""

    def __init__(self, dataroot: Path | None, split: str):
        self.split_dir = None if dataroot is None else dataroot / split

    def names(self, kind: str) -> list[str]:
        if self.split_dir is None:
            return []
        folder = self.split_dir / ("image" if kind == "person" else "cloth")
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    def files(self, kind: str, name: str) -> dict[str, Path]:
        """The dataset files of a listed person or garment (never a path made from a request)."""
        if name not in self.names(kind):
            raise ServiceError(404, f"No {kind} named {name!r} in the catalogue.")
        return person_files(self.split_dir, name) if kind == "person" else cloth_files(self.split_dir, name)

    @lru_cache(maxsize=512)  # noqa: B019 (one catalogue per app, for the app's lifetime)
    def thumbnail(self, kind: str, name: str) -> bytes:
        photo = self.files(kind, name)["person image" if kind == "person" else "cloth image"]
        with Image.open(photo) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_HEIGHT * 2, THUMBNAIL_HEIGHT))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=88)
        return buffer.getvalue()


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="fashionserve", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    models = Models(settings)
    catalogue = Catalogue(settings.dataroot, settings.split)
    faces = Faces()
    status = StatusReader(models.connection, settings.triton_url, settings.mlflow_uri)
    limits = settings.limits
    app.state.models = models
    app.router.add_event_handler("shutdown", models.close)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        # results are made from people's photos: no cache keeps them; the page loads nothing foreign
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'"
        )
        return response

    @app.exception_handler(ServiceError)
    @app.exception_handler(UploadError)
    async def expected(request: Request, exc: ServiceError | UploadError) -> JSONResponse:
        logger.info("%s %s: %d %s", request.method, request.url.path, exc.status, exc)
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(DatasetError)
    async def dataset(request: Request, exc: DatasetError) -> JSONResponse:
        logger.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": f"The catalogue folder has a problem: {exc}"}, status_code=500)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)  # the traceback, not the request
        message = "Something went wrong on the server; the error is logged. Try again, or another photo."
        return JSONResponse({"error": message}, status_code=500)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/tryon")

    for page in PAGES:
        app.add_api_route(f"/{page}", lambda: FileResponse(STATIC / "index.html"), include_in_schema=False)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        """The app is up (the pages say themselves when Triton is not)."""
        return {"ok": True}

    @app.get("/api/status")
    async def get_status() -> dict:
        return (await run_in_threadpool(status.read)).as_json()

    @app.get("/api/config")
    async def config() -> dict:
        directions = sorted(p.stem for p in settings.directions.glob("*.npy")) if settings.directions else []
        return {
            "limits": {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels},
            "persons": catalogue.names("person"),
            "garments": catalogue.names("garment"),
            "hair_samples": list(SAMPLE_NAMES),
            "directions": [SAMPLE_DIRECTION, *directions],
        }

    @app.get("/api/catalogue/{kind}/{name}")
    async def catalogue_image(kind: str, name: str) -> Response:
        if kind not in ("person", "garment"):
            raise ServiceError(404, f"Unknown kind {kind!r}: person or garment.")
        return Response(await run_in_threadpool(catalogue.thumbnail, kind, name), media_type="image/jpeg")

    @app.get("/api/hair/samples/{name}")
    async def hair_sample(name: str) -> Response:
        if name not in SAMPLE_NAMES:
            raise ServiceError(404, f"No sample portrait named {name!r}.")
        return png_response(_samples(SAMPLE_VIEW_SIZE)[name])

    @app.post("/api/tryon")
    async def tryon(request: Request) -> Response:
        form = await read_form(request, limits)
        person, garment = str(form.get("person") or ""), str(form.get("garment") or "")
        photo = await file_bytes(form, "garment_photo")
        try_anyway = form.get("try_anyway") == "true"
        if not person:
            raise UploadError("Pick a person.")
        if photo is None and not garment:
            raise UploadError("Pick a garment or upload a garment photo.")
        work = run_in_threadpool(_tryon, person, garment, photo, try_anyway)
        return png_response(await _timed("tryon", work))

    def _tryon(person: str, garment: str, photo: bytes | None, try_anyway: bool) -> np.ndarray:
        files = catalogue.files("person", person)
        if photo is None:
            files |= catalogue.files("garment", garment)
        client = models.client("tryon", "try-on")
        height, width = next(spec.shape[:2] for spec in client.inputs if spec.name == "cloth")
        if photo is None:
            inputs = resize_inputs(load_tryon_files(files), height, width)
        else:
            cloth, mask = garment_from_photo(decode_image(photo, "garment photo", limits), height, width)
            inputs = resize_inputs(load_person_files(files), height, width)
            inputs |= {"cloth": cloth, "cloth_mask": mask}
        if not try_anyway and models.has(GATE_MODEL):
            (verdict,) = classify(models.client(GATE_MODEL, "garment classifier"), inputs["cloth"][None])
            if verdict.refused(GATE_THRESHOLD):
                raise ServiceError(
                    422,
                    f"This garment looks like {verdict.name} (confidence {verdict.confidence:.2f}); the "
                    "try-on model dresses upper-body garments only. Tick 'try anyway' to run it regardless.",
                )
        return models.infer(client, inputs, "tryon_image")

    async def _portrait(
        form, field: str, what: str, optional: bool = False
    ) -> tuple[bytes | None, str] | None:
        """The uploaded photo of `field` or the name of the sample picked for it (`<field>_sample`);
        None when an `optional` field has neither."""
        data = await file_bytes(form, field)
        sample = str(form.get(f"{field}_sample") or "")
        if data is None and not sample:
            if optional:
                return None
            raise UploadError(f"Upload a {what} or pick a sample.")
        if data is None and sample not in SAMPLE_NAMES:
            raise UploadError(f"No sample portrait named {sample!r}.")
        return data, sample

    def _square(data: bytes | None, sample: str, what: str, size: int) -> Portrait:
        if data is None:
            return Portrait(_samples(size)[sample])
        return faces.portrait(decode_image(data, what, limits), what, size)

    @app.post("/api/hair/transfer")
    async def hair_transfer(request: Request) -> Response:
        """A face, a hairstyle (shape) photo and an optional hair colour photo (default: the hairstyle's)."""
        form = await read_form(request, limits)
        face = await _portrait(form, "face", "photo of yourself")
        shape = await _portrait(form, "shape", "hairstyle photo")
        color = await _portrait(form, "color", "hair colour photo", optional=True)

        def run() -> np.ndarray:
            client = models.client("hair_transfer", "hairstyle transfer")
            size = next(spec.shape[0] for spec in client.inputs if spec.name == "face")
            mine = _square(*face, "photo", size)
            hairstyle = _square(*shape, "hairstyle photo", size)
            colour = hairstyle if color is None else _square(*color, "hair colour photo", size)
            inputs = {"face": mine.crop, "shape_reference": hairstyle.crop, "color_reference": colour.crop}
            return mine.result(models.infer(client, inputs, "hair_image"))

        return png_response(await _timed("hair_transfer", run_in_threadpool(run)))

    @app.post("/api/hair/edit")
    async def hair_edit(request: Request) -> Response:
        form = await read_form(request, limits)
        portrait = await _portrait(form, "portrait", "photo of yourself")
        name = str(form.get("direction") or SAMPLE_DIRECTION)
        try:
            strength = float(str(form.get("strength") or "0"))
        except ValueError:
            raise UploadError("The strength must be a number.") from None
        if not -MAX_STRENGTH <= strength <= MAX_STRENGTH:
            raise UploadError(f"The strength must be between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g}.")

        def run() -> np.ndarray:
            client = models.client("hair_edit", "hair edit")
            shapes = {spec.name: spec.shape for spec in client.inputs}
            n_latent, style_dim = shapes["direction"]
            mine = _square(*portrait, "photo", shapes["portrait"][0])
            inputs = {
                "portrait": mine.crop,
                "direction": _direction(name, n_latent, style_dim),
                "strength": np.array([strength], np.float32),
            }
            return mine.result(models.infer(client, inputs, "hair_image"))

        return png_response(await _timed("hair_edit", run_in_threadpool(run)))

    def _direction(name: str, n_latent: int, style_dim: int) -> np.ndarray:
        if name == SAMPLE_DIRECTION:
            return np.repeat(sample_direction(style_dim)[None], n_latent, axis=0)
        path = settings.directions / f"{name}.npy" if settings.directions else None
        if path is None or path.stem not in {p.stem for p in settings.directions.glob("*.npy")}:
            raise UploadError(f"No edit direction named {name!r}.")
        try:
            return per_layer_direction(np.load(path, allow_pickle=False), n_latent, style_dim)
        except (ValueError, OSError) as exc:
            message = f"The edit direction {name!r} does not fit the served model: it {exc}"
            raise ServiceError(500, message) from None

    return app


@lru_cache(maxsize=4)
def _samples(size: int) -> dict[str, np.ndarray]:
    return sample_portraits(size)


async def _timed(what: str, work):
    """Await `work`, logging how long it took (never what it was about: no names, no pixels)."""
    started = time.perf_counter()
    try:
        return await work
    finally:
        logger.info("%s: %.2f s", what, time.perf_counter() - started)
