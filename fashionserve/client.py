"""Thin layer over tritonclient shared by the CLIs and the load tests: connect over gRPC or HTTP,
read a model's input contract, validate inputs against it before sending, and infer."""

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image, UnidentifiedImageError
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from fashionserve.cli import UserError

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
# Largest image a client decodes: 8192x8192 (256 MB as RGB). Pillow's own bomb check only warns up to
# twice its 89 M pixel limit and decodes anyway; a crafted header must be refused before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192


class ClientError(Exception):
    """An expected failure talking to the server (one line)."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # without the batch dimension; -1 = any


class TritonModelClient:
    """One model on one Triton server."""

    def __init__(
        self,
        url: str,
        model: str,
        protocol: str = "grpc",
        timeout: float = 600.0,
        connection: grpcclient.InferenceServerClient | httpclient.InferenceServerClient | None = None,
    ):
        """`connection`: an open tritonclient client of `protocol` to share (e.g. one gRPC channel for
        every request of a web server; tritonclient's gRPC client is thread-safe); `close` leaves it
        open. Without it, this object opens and owns its own."""
        if protocol not in PROTOCOLS:
            raise ClientError(f"unknown protocol {protocol!r}; choose grpc or http")
        self.model = model
        self.protocol = protocol
        self.timeout = timeout
        module = grpcclient if protocol == "grpc" else httpclient
        self._module = module
        self._owns_connection = connection is None
        try:
            if connection is not None:
                self._client = connection
            elif protocol == "grpc":
                self._client = grpcclient.InferenceServerClient(url)
            else:
                self._client = httpclient.InferenceServerClient(
                    url, connection_timeout=10.0, network_timeout=timeout
                )
            live = self._client.is_server_live()
        except Exception as exc:  # tritonclient raises several types for a refused connection
            raise ClientError(f"cannot reach Triton at {url} over {protocol}: {_reason(exc)}") from None
        if not live:
            raise ClientError(f"Triton at {url} is not live")
        try:
            ready = self._client.is_model_ready(model)
        except InferenceServerException as exc:
            raise ClientError(f"model '{model}': {_reason(exc)}") from None
        if not ready:
            raise ClientError(f"model '{model}' is not loaded/ready on Triton at {url}")
        metadata = self._client.get_model_metadata(model, **({"as_json": True} if protocol == "grpc" else {}))
        config = self._client.get_model_config(model, **({"as_json": True} if protocol == "grpc" else {}))
        config = config.get("config", config)
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.inputs = [
            InputSpec(
                i["name"], np.dtype(triton_to_np_dtype(i["datatype"])), tuple(int(d) for d in i["shape"][1:])
            )
            for i in metadata["inputs"]
        ]
        self.outputs = [o["name"] for o in metadata["outputs"]]

    def server_has(self, model: str) -> bool:
        """Whether another model is loaded and ready on the same server."""
        try:
            return bool(self._client.is_model_ready(model))
        except InferenceServerException:
            return False

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        """Check names, dtypes and shapes (batch first); raise ClientError naming the offending tensor."""
        expected = {spec.name for spec in self.inputs}
        if set(inputs) != expected:
            raise ClientError(f"model '{self.model}' takes inputs {sorted(expected)}, got {sorted(inputs)}")
        batch = None
        for spec in self.inputs:
            array = inputs[spec.name]
            if array.dtype != spec.dtype:
                raise ClientError(f"input '{spec.name}': expected dtype {spec.dtype}, got {array.dtype}")
            shape = array.shape[1:]
            if len(shape) != len(spec.shape) or any(
                e not in (-1, g) for e, g in zip(spec.shape, shape, strict=True)
            ):
                raise ClientError(
                    f"input '{spec.name}': expected shape [batch, {', '.join(map(str, spec.shape))}], "
                    f"got {list(array.shape)}"
                )
            batch = batch if batch is not None else array.shape[0]
            if array.shape[0] != batch:
                raise ClientError(
                    f"input '{spec.name}': batch {array.shape[0]} differs from the others ({batch})"
                )
        if self.max_batch_size and batch is not None and not 1 <= batch <= self.max_batch_size:
            raise ClientError(f"batch {batch} is outside 1..{self.max_batch_size} for model '{self.model}'")

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate, send one request and return every output by name."""
        self.validate(inputs)
        tensors = []
        for name, array in inputs.items():
            tensor = self._module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            tensors.append(tensor)
        requested = [self._module.InferRequestedOutput(name) for name in self.outputs]
        try:
            if self.protocol == "grpc":
                result = self._client.infer(
                    self.model, tensors, outputs=requested, client_timeout=self.timeout
                )
            else:
                result = self._client.infer(self.model, tensors, outputs=requested)
        except InferenceServerException as exc:
            raise ClientError(f"server rejected the request: {_reason(exc)}") from None
        return {name: result.as_numpy(name) for name in self.outputs}

    def close(self) -> None:
        if self._owns_connection:
            self._client.close()


def _reason(exc: Exception) -> str:
    """One line from a tritonclient exception."""
    text = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def open_image(path: Path, what: str = "image") -> Image.Image:
    """The decoded image at `path`; UserError naming the file if it is missing, unreadable, or larger
    than MAX_IMAGE_PIXELS (checked from the header, before decoding: decompression bombs)."""
    if not Path(path).is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                image.close()
                raise UserError(
                    f"{what} {path} is {width}x{height}, more than {MAX_IMAGE_PIXELS} pixels; "
                    "refused before decoding"
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"{what} {path}: refused before decoding: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:  # Pillow's decoders use all
        raise UserError(f"cannot read {what} {path}: {exc}") from None
    return image


def save_png(path: Path, image: np.ndarray) -> None:
    """Write a uint8 HWC image as PNG, creating the folder; never leaves a half-written file behind."""
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a .png file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    try:
        Image.fromarray(image).save(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
