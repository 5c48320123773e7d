"""``idx:PATH``: a folder of MNIST-family IDX files (``train-images-idx3-ubyte[.gz]``,
``train-labels-idx1-ubyte[.gz]``, and ``t10k-...`` for the test split), as MNIST and
Fashion-MNIST are published. Gzipped files are read in memory."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from recon_jax.data.catalog import NAMED_CLASSES
from recon_jax.data.containers import ImageSet
from recon_jax.data.sources import NotHere, make_image_set, to_unit_nhwc
from recon_jax.errors import ConfigError, DataError

_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _read_file(path: Path) -> bytes:
    """Bytes of ``path``, gunzipped when it ends in ``.gz``."""
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{path} is not a valid gzip file ({err}); download it again or gunzip a good copy"
        ) from None


def _parse_idx(raw: bytes, ndim: int, path: Path) -> NDArray[np.uint8]:
    """Parse IDX: ``00 00 08 ndim``, ``ndim`` big-endian uint32 dims, then uint8 data."""
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataError(
            f"{path} is not an IDX file (bad magic {raw[:4].hex()}); point idx: at MNIST-format files"
        )
    if raw[2] != 0x08:
        raise DataError(f"{path} holds IDX dtype code 0x{raw[2]:02x}, only 0x08 (uint8) is supported")
    if raw[3] != ndim:
        raise DataError(f"{path} has {raw[3]} dimensions, expected {ndim}; are images and labels swapped?")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header; download it again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected, found = math.prod(dims), len(raw) - header
    if found != expected:
        state = "truncated" if found < expected else "longer than its header says"
        raise DataError(
            f"{path} is {state}: header says {dims} = {expected} bytes of data, found {found}; "
            "download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path | None:
    return next((path for path in (folder / stem, folder / f"{stem}.gz") if path.is_file()), None)


def load_idx(folder: Path, split: str | None, dataset: str | None = None) -> ImageSet:
    """An IDX folder: images ``(n, h, w)`` uint8 and labels ``(n,)`` -> ``(n, h, w, 1)``."""
    if split not in (None, "train", "test"):
        raise ConfigError(f"IDX folders hold splits 'train' and 'test', got split={split!r}")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; idx:PATH names the folder holding the IDX files")
    found: dict[str, tuple[Path, Path]] = {}
    for name, prefix in _IDX_PREFIX.items():
        images_path = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
        labels_path = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
        if images_path and labels_path:
            found[name] = (images_path, labels_path)
    chosen = split or next(iter(found), None)
    if chosen not in found:
        wanted = "train or test" if split is None else split
        prefix = _IDX_PREFIX[split or "train"]
        raise NotHere(
            f"no IDX {wanted} split in {folder} (needs {prefix}-images-idx3-ubyte[.gz] and "
            f"{prefix}-labels-idx1-ubyte[.gz]; found {sorted(child.name for child in folder.iterdir())})"
        )
    images_path, labels_path = found[chosen]
    images = _parse_idx(_read_file(images_path), 3, images_path)
    labels = _parse_idx(_read_file(labels_path), 1, labels_path)
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    # Fashion-MNIST uses the same file names as MNIST; only its location tells them apart.
    dataset = dataset or ("fashion_mnist" if "fashion" in str(folder.resolve()).lower() else "mnist")
    provenance = {
        "kind": "idx",
        "dataset": dataset,
        "path": str(folder.resolve()),
        "files": [images_path.name, labels_path.name],
        "split": chosen,
    }
    class_names = NAMED_CLASSES[dataset]
    unit_images = to_unit_nhwc(images, str(images_path))
    return make_image_set(unit_images, labels.astype(np.int64), class_names, provenance, str(folder))
