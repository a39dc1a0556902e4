"""Reading PyTorch checkpoints safely and loading them strictly, with one-line error messages."""

import hashlib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

MODULE_PREFIX = "module."  # added by (Distributed)DataParallel wrappers
MAX_LISTED = 5  # offending keys named in an error message before "... and N more"


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the network (one-line message)."""


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown if len(items) <= MAX_LISTED else f"{shown} ... and {len(items) - MAX_LISTED} more"


def _strip_module_prefix(state_dict: dict) -> OrderedDict:
    """Drop the DataParallel prefix from keys and from the version metadata torch keeps beside them."""
    stripped = OrderedDict((key.removeprefix(MODULE_PREFIX), value) for key, value in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        # The wrapped module's own entry is "module"; it becomes the root entry "".
        stripped._metadata = OrderedDict(
            ("" if key == "module" else key.removeprefix(MODULE_PREFIX), value)
            for key, value in metadata.items()
            if key == "module" or key.startswith(MODULE_PREFIX)
        )
    return stripped


def read_checkpoint(path: Path) -> object:
    """torch.load(map_location='cpu', weights_only=True) of whatever the file holds; a missing file or a
    non-checkpoint raises CheckpointError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, KeyError, ...)
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {detail})"
        ) from exc


def state_dict_of(loaded: object, source: str) -> dict[str, torch.Tensor]:
    """`loaded` checked to be a non-empty flat dict of tensors (else CheckpointError naming `source`), with
    a leading 'module.' prefix stripped if every key has it. torch's per-module version metadata is kept
    (it tells load_state_dict how old-format entries, e.g. spectral norm's, are to be read)."""
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(loaded).__name__}")
    if not loaded:
        raise CheckpointError(f"{source}: the checkpoint holds no tensors")
    bad = [
        repr(key) for key, value in loaded.items() if not isinstance(key, str) or not torch.is_tensor(value)
    ]
    if bad:
        raise CheckpointError(
            f"{source}: not a flat dict of tensors; entries that are not tensors: {_listing(bad)}"
        )
    if all(key.startswith(MODULE_PREFIX) for key in loaded):
        loaded = _strip_module_prefix(loaded)
    return loaded


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """read_checkpoint, then state_dict_of; accepts {'state_dict': {...}} wrappers."""
    loaded = read_checkpoint(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    return state_dict_of(loaded, str(path))


def load_strict(module: nn.Module, state_dict: dict, what: str) -> None:
    """load_state_dict(strict=True); on mismatch raise CheckpointError naming `what`, missing keys,
    unexpected keys and shape mismatches (name, expected shape, got shape)."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [
        f"{key} (expected {list(expected[key].shape)}, got {list(state_dict[key].shape)})"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {_listing(wrong_shape)}")
    if problems:
        raise CheckpointError(f"{what} does not match the network: " + "; ".join(problems))
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # anything the key/shape comparison above cannot see
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{what} could not be loaded: {detail}") from exc


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
