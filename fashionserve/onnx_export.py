"""Export PyTorch modules to ONNX with a dynamic batch dimension and check them against PyTorch."""

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import remove_spectral_norm
from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook

OPSET = 18


class ExportError(Exception):
    """An expected export failure (one line, shown to the user)."""


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of an exported model; `shape` excludes the batch dimension."""

    name: str
    dtype: str  # numpy dtype name: "uint8", "float32", ...
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def rsqrt_with_epsilon(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """1 / sqrt(x + epsilon) for x >= 0, written so that the epsilon survives export_onnx.

    The exporter's optimizer (onnxscript, optimize=True) removes an Add of a scalar within 1e-8 of zero
    as a no-op, so `x + 1e-8` exports as `x`, and x = 0 (an all-zero latent or style) then gives inf and
    NaN. The clamp changes nothing in PyTorch (x + epsilon is at least epsilon) but stays in the graph.
    """
    return (x + epsilon).clamp_min(epsilon).rsqrt()


SPECTRAL_NORM_ITERATIONS = 20  # power iterations run on freshly initialised spectral-norm vectors


@torch.no_grad()
def converge_spectral_norms(module: nn.Module) -> None:
    """Power-iterate the random initial u, v of every spectral-normed layer in `module`: with random
    vectors the eval-mode sigma = u . (W v) can be close to 0 and blow the weights up (SEAN at tiny
    widths reached 1e13 before its tanh). A loaded checkpoint overwrites u and v."""
    for layer in module.modules():
        if hasattr(layer, "weight_orig"):
            matrix = layer.weight_orig.flatten(1)
            for _ in range(SPECTRAL_NORM_ITERATIONS):
                layer.weight_v.copy_(F.normalize(matrix.t() @ layer.weight_u, dim=0, eps=1e-12))
                layer.weight_u.copy_(F.normalize(matrix @ layer.weight_v, dim=0, eps=1e-12))


def fold_spectral_norms(module: nn.Module) -> None:
    """Replace every spectral-normed layer's weight_orig/u/v by its plain eval-mode weight (in place,
    idempotent), so that it exports as a plain convolution."""
    for layer in module.modules():
        if hasattr(layer, "weight_orig"):
            # weight_orig / (u . W v) without a power iteration, i.e. the eval-mode weight.
            remove_spectral_norm(layer)
            # torch wraps the load-state-dict hook, so remove_spectral_norm's type test misses it and
            # the hook stays: it would then demand weight_orig when a folded state dict is loaded.
            for key, hook in list(layer._load_state_dict_pre_hooks.items()):
                if isinstance(getattr(hook, "hook", hook), SpectralNormLoadStateDictPreHook):
                    del layer._load_state_dict_pre_hooks[key]


def export_onnx(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    max_batch: int,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> None:
    """Export `module` (eval mode) to `path` with the torch.export-based exporter, a dynamic batch
    dimension 1..max_batch, opset OPSET, then run the ONNX checker. Writes `path` atomically.
    `dynamic_axes` names further dynamic dimensions per input ({"image": {1: "height", 2: "width"}});
    inputs sharing a name share the dimension."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notes
    module.eval()  # the exporter restores the outer module's mode on its children: set it on the outermost
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    axes = dynamic_axes or {}
    named = {name: torch.export.Dim(name, min=2) for dims in axes.values() for name in dims.values()}
    dynamic_shapes = tuple(
        {0: batch, **{axis: named[name] for axis, name in axes.get(input_name, {}).items()}}
        for input_name, _ in zip(input_names, example_inputs, strict=True)
    )
    tmp = path.with_suffix(".onnx.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            example_inputs,
            dynamo=True,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    program.save(str(tmp), external_data=False)
    onnx.checker.check_model(str(tmp), full_check=True)
    tmp.replace(path)


def tensor_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file, each shape without its (dynamic) batch dimension; other
    dynamic dimensions are -1."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def specs(args: list) -> list[TensorSpec]:
        def dims(shape: list) -> tuple[int, ...]:
            return tuple(d if isinstance(d, int) else -1 for d in shape[1:])

        return [TensorSpec(a.name, _ORT_TYPES[a.type], dims(a.shape)) for a in args]

    return specs(session.get_inputs()), specs(session.get_outputs())


_ORT_TYPES = {
    "tensor(uint8)": "uint8",
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
}


def run_onnx(session: ort.InferenceSession, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """Run `session` on torch tensors fed in declared input order."""
    feeds = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feeds)


def max_abs_error(reference: torch.Tensor, actual: np.ndarray) -> float:
    """Largest absolute difference, computed in float64."""
    return float(np.max(np.abs(reference.double().numpy() - actual.astype(np.float64)), initial=0.0))
