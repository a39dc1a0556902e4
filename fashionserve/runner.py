"""Generic Triton python-backend model: runs the version directory's `model.onnx` with ONNX Runtime.

Every leaf of the `cpu` target uses it (its `model.py` imports `TritonPythonModel` from here).
Requests in one `execute` call are validated one by one, then run as one batch.
Config parameters understood:
  `max_value:<input>`   reject a request whose input holds a larger value (e.g. labels 0..19)
  `intra_op_threads`    ONNX Runtime intra-op threads (default: ONNX Runtime's choice)
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Triton python-backend entry point."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.model_name = config["name"]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "0"))
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_values = {
            key.split(":", 1)[1]: int(value)
            for key, value in parameters.items()
            if key.startswith("max_value:")
        }

    def _check(self, inputs: dict[str, np.ndarray]) -> str | None:
        for name, limit in self.max_values.items():
            largest = int(inputs[name].max(initial=0))
            if largest > limit:
                return f"{self.model_name}: input '{name}' holds values up to {largest}, expected 0..{limit}"
        return None

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        batch: list[tuple[int, dict[str, np.ndarray]]] = []
        for index, request in enumerate(requests):
            inputs = {
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names
            }
            error = self._check(inputs)
            if error:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
            else:
                batch.append((index, inputs))
        if batch:
            feeds = {name: np.concatenate([inputs[name] for _, inputs in batch]) for name in self.input_names}
            try:
                outputs = self.session.run(self.output_names, feeds)
            except Exception as exc:  # report ORT's reason to every client of this batch, keep serving
                error = pb_utils.TritonError(f"{self.model_name}: {exc}")
                for index, _ in batch:
                    responses[index] = pb_utils.InferenceResponse(error=error)
                return responses
            start = 0
            for index, inputs in batch:
                size = len(inputs[self.input_names[0]])
                tensors = [
                    pb_utils.Tensor(n, o[start : start + size])
                    for n, o in zip(self.output_names, outputs, strict=True)
                ]
                responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += size
        return responses
