"""``cifar:PATH``: CIFAR-10 as published, the binary or the python version, as the archive
(read in place, never extracted), the extracted ``cifar-10-batches-*`` folder, or a folder
holding one of those. The python version is a pickle: it is read with an unpickler that
allows numpy arrays only."""

from __future__ import annotations

import codecs
import io
import pickle
import re
import tarfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from recon_jax.data.catalog import CIFAR10_CLASSES
from recon_jax.data.containers import ImageSet
from recon_jax.data.sources import NotHere, make_image_set, to_unit_nhwc
from recon_jax.errors import ConfigError, DataError

_CIFAR_DIRS = {"binary": "cifar-10-batches-bin", "python": "cifar-10-batches-py"}
_CIFAR_ARCHIVES = {"binary": "cifar-10-binary.tar.gz", "python": "cifar-10-python.tar.gz"}
_CIFAR_RECORD = 1 + 3 * 32 * 32


# numpy moved `_reconstruct` and `scalar` from numpy.core to numpy._core in 2.0; take them
# from numpy's own reducers so that both spellings map to the same functions.
_NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_NUMPY_SCALAR = np.float64(0).__reduce__()[0]
_UNPICKLE_ALLOWED: Mapping[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(str, 'latin1').
    ("_codecs", "encode"): codecs.encode,
    ("codecs", "encode"): codecs.encode,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays; refuses every other global.

    The CIFAR python version is a pickle, and a pickle can call any importable function.
    Only the globals that (py2- or py3-era) numpy array pickles reference are allowed.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _UNPICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name}: a CIFAR batch holds only numpy arrays, "
                "so this file is not CIFAR-10 (possibly malicious); use the official cifar-10-python.tar.gz"
            ) from None


def _unpickle_batch(raw: bytes, source: str) -> dict[bytes, Any]:
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except DataError as err:
        raise DataError(f"{source}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise DataError(f"{source} is not a readable CIFAR pickle ({err}); download it again") from None
    if not isinstance(batch, dict):
        raise DataError(f"{source} unpickles to {type(batch).__name__}, expected a CIFAR batch dict")
    return batch


def _cifar_sources(path: Path) -> tuple[str, str, dict[str, Callable[[], bytes]]]:
    """Find CIFAR-10 at ``path``: ``(version, location, {member name: read bytes})``.

    ``path`` is an archive, an extracted ``cifar-10-batches-*`` folder, or a folder holding
    one of those (extracted folders first, binary before python). Archives are read in
    place, never extracted, so member paths cannot escape anywhere.
    """
    if path.is_file():
        return _cifar_archive(path)
    if not path.is_dir():
        raise DataError(f"{path} is neither a CIFAR archive nor a folder")
    names = {child.name for child in path.iterdir()}
    version = _cifar_version(names)
    if version:
        files = {child.name: child.read_bytes for child in path.iterdir() if child.is_file()}
        return version, str(path), files
    for folder in _CIFAR_DIRS.values():
        if folder in names:
            return _cifar_sources(path / folder)
    for archive in _CIFAR_ARCHIVES.values():
        if archive in names:
            return _cifar_archive(path / archive)
    raise NotHere(
        f"no CIFAR-10 in {path}: expected {', '.join([*_CIFAR_DIRS.values(), *_CIFAR_ARCHIVES.values()])} "
        "or the batch files themselves"
    )


def _cifar_version(names: set[str] | Mapping[str, object]) -> str | None:
    """"binary" or "python" if these file names are CIFAR-10 batches, else None."""
    if "test_batch.bin" in names or "data_batch_1.bin" in names:
        return "binary"
    if "test_batch" in names or "data_batch_1" in names:
        return "python"
    return None


def _cifar_archive(path: Path) -> tuple[str, str, dict[str, Callable[[], bytes]]]:
    try:
        with tarfile.open(path) as archive:
            contents = {
                Path(member.name).name: archive.extractfile(member).read()  # type: ignore[union-attr]
                for member in archive.getmembers()
                if member.isfile()
            }
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is not a readable tar archive ({err}); download it again") from None
    version = _cifar_version(contents)
    if not version:
        raise DataError(
            f"{path} holds no CIFAR-10 batches (found {sorted(contents)[:8]}); "
            f"use {' or '.join(_CIFAR_ARCHIVES.values())}"
        )
    return version, str(path), {name: (lambda data=data: data) for name, data in contents.items()}


def load_cifar(path: Path, split: str | None, dataset: str = "cifar10") -> ImageSet:
    """CIFAR-10: records of 1 label + 3072 CHW bytes -> images ``(n, 32, 32, 3)``."""
    if split not in (None, "train", "test"):
        raise ConfigError(f"CIFAR-10 holds splits 'train' and 'test', got split={split!r}")
    version, location, read = _cifar_sources(path.resolve())
    suffix = ".bin" if version == "binary" else ""
    batch_pattern = re.compile(rf"data_batch_(\d+){re.escape(suffix)}")
    batch_numbers = {member: int(match[1]) for member in read if (match := batch_pattern.fullmatch(member))}
    train_files = sorted(batch_numbers, key=batch_numbers.__getitem__)
    test_file = f"test_batch{suffix}"
    available = {"train": train_files, "test": [test_file] if test_file in read else []}
    chosen = split or ("train" if available["train"] else "test")
    files = available[chosen]
    if not files:
        raise NotHere(f"no CIFAR-10 {chosen} batches in {location}")

    pixel_chunks, label_chunks = [], []
    for member in files:
        source = f"{location}:{member}"
        if version == "binary":
            raw = read[member]()
            if not raw or len(raw) % _CIFAR_RECORD:
                raise DataError(
                    f"{source} is truncated: {len(raw)} bytes is not a whole number of "
                    f"{_CIFAR_RECORD}-byte records; download it again"
                )
            records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
            label_chunks.append(records[:, 0].astype(np.int64))
            pixel_chunks.append(records[:, 1:])
        else:
            batch = _unpickle_batch(read[member](), source)
            pixels, labels = batch.get(b"data"), batch.get(b"labels")
            is_cifar = (
                isinstance(pixels, np.ndarray)
                and pixels.dtype == np.uint8
                and pixels.shape[1:] == (3072,)
                and labels is not None
            )
            if not is_cifar:
                raise DataError(
                    f"{source} is not a CIFAR-10 batch: needs b'data' uint8 (n, 3072) and b'labels', "
                    f"found keys {list(batch)}"
                )
            label_array = np.asarray(labels, dtype=np.int64)
            if label_array.shape != (len(pixels),):
                raise DataError(f"{source} has {len(pixels)} images but {label_array.size} labels")
            label_chunks.append(label_array)
            pixel_chunks.append(pixels)
    images = np.concatenate(pixel_chunks).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    provenance = {
        "kind": "cifar",
        "dataset": dataset,
        "path": location,
        "format": version,
        "files": files,
        "split": chosen,
    }
    class_names = _cifar_class_names(version, read, location)
    unit_images = to_unit_nhwc(images, location)
    return make_image_set(unit_images, np.concatenate(label_chunks), class_names, provenance, location)


def _cifar_class_names(
    version: str, read: Mapping[str, Callable[[], bytes]], location: str
) -> tuple[str, ...]:
    """Names from ``batches.meta.txt`` / ``batches.meta``; the CIFAR-10 names if absent."""
    if version == "binary":
        if "batches.meta.txt" not in read:
            return CIFAR10_CLASSES
        lines = read["batches.meta.txt"]().decode().splitlines()
        return tuple(line.strip() for line in lines if line.strip())
    if "batches.meta" not in read:
        return CIFAR10_CLASSES
    meta = _unpickle_batch(read["batches.meta"](), f"{location}:batches.meta")
    names = meta.get(b"label_names")
    if not isinstance(names, list):
        raise DataError(f"{location}:batches.meta has no b'label_names' list (keys {list(meta)})")
    return tuple(name.decode() if isinstance(name, bytes) else str(name) for name in names)
