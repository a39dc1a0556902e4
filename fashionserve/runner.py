"""Generic Triton python-backend model: runs the version directory's `model.onnx` with ONNX Runtime.

Every leaf of the `cpu` target uses it (its `model.py` imports `TritonPythonModel` from here).
Requests in one `execute` call are validated one by one, then run as one batch. A request is refused
with its own error (the others, and the model, keep serving) unless every input has the ONNX model's
rank, dtype and fixed dimensions, no empty dimension, at most the model's element limit per sample,
and, for float inputs, only finite values; shapes are checked before any value is read. Anything else
that fails in a batch is reported to that batch's clients, never raised into the stub.

One fault is out of this module's reach: the stub turns each input into a numpy array before model
code runs, and a shape whose size overflows (e.g. [1, 2**62, 0, 3], zero bytes, which Triton lets
through for dynamic dimensions) kills the stub there. The launcher's stub watchdog reloads such a
model (see docs/hardening.md).

Config parameters understood:
  `max_value:<input>`      reject a request whose input holds a larger value (e.g. labels 0..19)
  `max_elements:<input>`   most elements of one sample of <input> (default DEFAULT_MAX_ELEMENTS)
  `intra_op_threads`       ONNX Runtime intra-op threads (default: ONNX Runtime's choice)
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# 2**24 elements per sample: a 2048x2048 RGB image fits, an 8000x8000 one (which took the server to
# 11 GB) does not. Every served model's fixed shapes are far below it.
DEFAULT_MAX_ELEMENTS = 1 << 24
_ONNX_DTYPES = {
    "tensor(uint8)": np.uint8,
    "tensor(int64)": np.int64,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}


class RequestError(Exception):
    """A request this model refuses (the message names the model and the tensor)."""


@dataclass(frozen=True)
class InputRule:
    """What one input of the ONNX model accepts; `dims` excludes the batch, None = any size."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]
    max_elements: int
    max_value: int | None

    def check_shape(self, model: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """Refuse a shape or dtype this input does not take, from the metadata alone."""
        where = f"{model}: input '{self.name}'"
        if dtype != self.dtype:
            raise RequestError(f"{where}: expected dtype {self.dtype}, got {dtype}")
        expected = f"[batch, {', '.join('-1' if d is None else str(d) for d in self.dims)}]"
        if len(shape) != len(self.dims) + 1:
            raise RequestError(f"{where}: expected shape {expected}, got {list(shape)}")
        if any(d < 1 for d in shape):
            raise RequestError(f"{where}: every dimension must be at least 1, got {list(shape)}")
        if any(e is not None and e != d for e, d in zip(self.dims, shape[1:], strict=True)):
            raise RequestError(f"{where}: expected shape {expected}, got {list(shape)}")
        elements = math.prod(shape[1:])  # Python ints: no overflow whatever the client declared
        if elements > self.max_elements:
            raise RequestError(
                f"{where}: {elements} elements per sample ({list(shape)}), more than this model's "
                f"limit of {self.max_elements}"
            )

    def check_values(self, model: str, array: np.ndarray) -> None:
        """Refuse non-finite floats and values above the configured maximum."""
        where = f"{model}: input '{self.name}'"
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise RequestError(f"{where} holds NaN or infinite values")
        if self.max_value is not None:
            largest = int(array.max(initial=0))
            if largest > self.max_value:
                raise RequestError(f"{where} holds values up to {largest}, expected 0..{self.max_value}")


def input_rules(session: ort.InferenceSession, parameters: dict[str, str]) -> list[InputRule]:
    """One rule per ONNX input, limits taken from the config's parameters."""
    rules = []
    for spec in session.get_inputs():
        dims = tuple(d if isinstance(d, int) and d > 0 else None for d in spec.shape[1:])
        max_value = parameters.get(f"max_value:{spec.name}")
        rules.append(
            InputRule(
                name=spec.name,
                dtype=np.dtype(_ONNX_DTYPES[spec.type]),
                dims=dims,
                max_elements=int(parameters.get(f"max_elements:{spec.name}", DEFAULT_MAX_ELEMENTS)),
                max_value=None if max_value is None else int(max_value),
            )
        )
    return rules


class TritonPythonModel:
    """Triton python-backend entry point."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.model_name = config["name"]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "0"))
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.rules = input_rules(session, parameters)
        if any(None in rule.dims for rule in self.rules):
            # Sizes vary per request: ONNX Runtime's arena would keep the largest request's memory for
            # good (an 8000x8000 photo left 5 GB behind), so allocate per run instead.
            options.enable_cpu_mem_arena = False
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.session = session
        self.output_names = [o.name for o in session.get_outputs()]

    def _inputs(self, request) -> dict[str, np.ndarray]:
        """The request's inputs as arrays, each checked by its rule: shape and dtype first (the stub
        hands the arrays over already made; reading their values is what costs), then the values."""
        arrays = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
        expected = [rule.name for rule in self.rules]
        if sorted(arrays) != sorted(expected):
            raise RequestError(f"{self.model_name}: expected inputs {expected}, got {sorted(arrays)}")
        for rule in self.rules:
            rule.check_shape(self.model_name, arrays[rule.name].shape, arrays[rule.name].dtype)
        for rule in self.rules:
            rule.check_values(self.model_name, arrays[rule.name])
        return arrays

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        batch: list[tuple[int, dict[str, np.ndarray]]] = []
        for index, request in enumerate(requests):
            try:
                batch.append((index, self._inputs(request)))
            except RequestError as exc:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        if batch:
            try:
                names = [rule.name for rule in self.rules]
                feeds = {name: np.concatenate([inputs[name] for _, inputs in batch]) for name in names}
                outputs = self.session.run(self.output_names, feeds)
            except Exception as exc:  # report the reason to every client of this batch, keep serving
                error = pb_utils.TritonError(f"{self.model_name}: {exc}")
                for index, _ in batch:
                    responses[index] = pb_utils.InferenceResponse(error=error)
                return responses
            start = 0
            for index, inputs in batch:
                size = len(inputs[self.rules[0].name])
                tensors = [
                    pb_utils.Tensor(n, o[start : start + size])
                    for n, o in zip(self.output_names, outputs, strict=True)
                ]
                responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += size
        return responses
