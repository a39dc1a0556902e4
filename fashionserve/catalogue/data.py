"""Fashion-MNIST in its standard IDX files (read from a folder the user supplies; nothing downloads).

IDX: big-endian header `0x00 0x00 <type> <ndim>`, then one int32 per dimension, then the data;
images are type 0x08 (uint8), 3 dimensions (count, 28, 28); labels uint8, 1 dimension. Files may be
gzipped (`.gz`, as distributed) or not.
"""

import gzip
import hashlib
from pathlib import Path

import numpy as np

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# md5 of the distributed .gz files (zalandoresearch/fashion-mnist README)
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# md5 of their decompressed IDX contents (measured on those files), so that the same data re-gzipped or
# unpacked counts too: Debian's dataset-fashion-mnist package ships the .gz files with the gzip header's
# file name and time stripped (other md5, same bytes inside)
OFFICIAL_CONTENT_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(Exception):
    """A missing or malformed dataset file (one line)."""


def read_idx(path: Path) -> np.ndarray:
    """A uint8 IDX file (gzipped or not) as an array of its stored shape."""
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != _UBYTE:
        raise DataError(f"{path}: IDX data type 0x{raw[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(f"{path}: IDX holds {len(raw)} bytes, its header {list(shape)} says {expected}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()  # writable, for torch


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _UBYTE, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    path.write_bytes(gzip.compress(header + array.tobytes(), mtime=0))


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no {stem}.gz (or {stem}); give the folder holding the Fashion-MNIST IDX files")


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of `split` ('train' or 'test') from `root`."""
    images_path, labels_path = (_find(root, stem) for stem in SPLITS[split])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: expected images of shape [N, 28, 28], got {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: expected {len(images)} labels, got shape {list(labels.shape)}")
    if labels.max(initial=0) > 9:
        raise DataError(f"{labels_path}: labels up to {labels.max()}, expected 0..9")
    return images, labels


def official_files(root: Path) -> bool:
    """Whether `root` holds the official Fashion-MNIST data (md5): the four distributed .gz files byte
    for byte, or files (gzipped or not) whose IDX contents are theirs."""
    for stem, content_md5 in OFFICIAL_CONTENT_MD5.items():
        try:
            path = _find(root, stem)
            raw = path.read_bytes()
            if hashlib.md5(raw).hexdigest() == OFFICIAL_MD5.get(path.name):
                continue
            content = gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw
        except (DataError, OSError, EOFError):
            return False
        if hashlib.md5(content).hexdigest() != content_md5:
            return False
    return True
