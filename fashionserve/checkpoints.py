"""Reading PyTorch checkpoints safely and loading them strictly, with one-line error messages."""

import hashlib
import io
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

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


# --- TorchScript archives, read without torch.jit.load ------------------------------------------------
# torch.jit.load compiles the archive's TorchScript code (no Python runs, but it is a compiler fed with
# the file's text). Only the tensors are needed, so the archive's data.pkl is unpickled with a closed list
# of constructors: TorchScript objects become plain records, tensors are rebuilt from the data/ records,
# and anything else stops the read. Which attributes are parameters or buffers (what state_dict() holds)
# is read from the `__parameters__` / `__buffers__` lines of the class declarations in code/, as text.

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_CLASS_DECLARATION = re.compile(r"^class (\w+)\(Module\):\n((?:  .*\n)*)", re.MULTILINE)
_NAME_LIST = re.compile(r"^  __(parameters|buffers)__ = \[(.*)\]$", re.MULTILINE)


class _ScriptObject:
    """A TorchScript object from data.pkl: its class (`qualified_name`) and attribute state."""

    qualified_name = ""

    def __setstate__(self, state: object) -> None:
        self.state = state


def _passthrough(value: object, *_: object) -> object:
    """torch.jit._pickle's list builders and type tags: the value itself."""
    return value


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickler for a TorchScript data.pkl that constructs nothing but tensors, dicts and records."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}data.pkl")))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> object:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:
                self.classes[qualified] = type(name, (_ScriptObject,), {"qualified_name": qualified})
            return self.classes[qualified]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch.jit._pickle" and (name.startswith("build_") or name == "restore_type_tag"):
            return _passthrough
        raise pickle.UnpicklingError(f"refusing to construct {module}.{name}")

    def persistent_load(self, pid: object) -> Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unknown storage type {dtype!r}")
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            if len(raw) != numel * dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {key}: {len(raw)} bytes for {numel} x {dtype}")
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self.storages[key]

    @staticmethod
    def _rebuild_tensor(storage: Tensor, offset: int, size: tuple, stride: tuple, *_: object) -> Tensor:
        return storage.as_strided(size, stride, offset)  # raises on a view outside the storage


def _state_names(archive: zipfile.ZipFile, prefix: str) -> dict[str, list[str]]:
    """Class qualified name -> its parameter and buffer attribute names, from the code/ declarations."""
    names: dict[str, list[str]] = {}
    code = f"{prefix}code/"
    for entry in archive.namelist():
        if not (entry.startswith(code) and entry.endswith(".py")):
            continue
        module = entry[len(code) : -len(".py")].replace("/", ".")
        for class_name, body in _CLASS_DECLARATION.findall(archive.read(entry).decode("utf-8", "replace")):
            listed = [re.findall(r'"(\w+)"', items) for _, items in _NAME_LIST.findall(body)]
            names[f"{module}.{class_name}"] = [name for group in listed for name in group]
    return names


def _torchscript_prefix(archive: zipfile.ZipFile) -> str | None:
    """The record prefix ("name/") of a TorchScript archive: a data.pkl beside a constants.pkl (plain
    torch.save archives have no constants.pkl); None for other zip files."""
    names = set(archive.namelist())
    pickles = [name for name in names if name.endswith("/data.pkl")]
    if len(pickles) == 1 and pickles[0].removesuffix("data.pkl") + "constants.pkl" in names:
        return pickles[0].removesuffix("data.pkl")
    return None


def is_torchscript_archive(path: Path) -> bool:
    """Whether `path` is a TorchScript archive (torch.jit.save), judged from its zip directory only."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _torchscript_prefix(archive) is not None
    except (OSError, zipfile.BadZipFile):
        return False


def read_torchscript_state_dict(path: Path) -> dict[str, Tensor]:
    """The state_dict() a torch.jit.load of the TorchScript archive `path` would give (parameters and
    buffers under their dotted module paths), read without loading TorchScript. CheckpointError if the
    file is not such an archive or holds anything but modules, tensors and plain values."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _torchscript_prefix(archive)
            if prefix is None:
                raise CheckpointError(f"{path}: not a TorchScript archive (no data.pkl beside constants.pkl)")
            root = _ArchiveUnpickler(archive, prefix).load()
            declarations = _state_names(archive, prefix)
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, RuntimeError, EOFError) as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path}: not a readable TorchScript archive ({type(exc).__name__}: {detail})"
        ) from exc
    state_dict: dict[str, Tensor] = OrderedDict()

    def collect(record: object, prefix: str) -> None:
        if not isinstance(record, _ScriptObject) or not isinstance(getattr(record, "state", None), dict):
            raise CheckpointError(f"{path}: module {prefix or '<root>'} is not a TorchScript module record")
        attributes = record.state
        # Without a readable declaration (an archive format we have not seen), every tensor attribute
        # counts; strict loading afterwards names any that the network does not have.
        names = declarations.get(record.qualified_name, list(attributes))
        for name in names:
            if torch.is_tensor(attributes.get(name)):
                state_dict[prefix + name] = attributes[name]
        for name, value in attributes.items():
            if isinstance(value, _ScriptObject):
                collect(value, f"{prefix}{name}.")

    collect(root, "")
    return state_dict
