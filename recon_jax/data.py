"""Real image datasets, read offline, and the victim's training / held-out selection.

Everything here is numpy: images come back as ``float32`` NHWC arrays in ``[0, 1]``.

Dataset names understood by :func:`load_dataset`:

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, shipped in its wheel.
  Always available offline; the embedded default.
- ``idx:PATH``: a folder of MNIST-family IDX files (``train-images-idx3-ubyte[.gz]`` ...).
- ``cifar:PATH``: CIFAR-10 as published, binary or python version, archive or extracted
  folder (or a folder holding one of those).
- ``npz:PATH``: an ``.npz`` with ``images``, ``labels`` and optionally ``classes``.
- ``tfds:NAME`` or ``tfds:NAME:SPLIT``: a dataset already prepared in a TFDS ``data_dir``
  (array_record format), read with ``tfds.data_source``.
- ``mnist``, ``fashion_mnist``, ``cifar10``: looked up in this order (:data:`LOOKUP_ORDER`):

  1. local files, under each root folder in turn: every folder in ``$RECON_JAX_DATA``
     (``os.pathsep``-separated), then ``~/.cache/recon_jax/data``, then
     ``/usr/share/datasets``. In a root, ``ROOT/<name>`` or ``ROOT/<name with - for _>``
     as an IDX folder (mnist, fashion_mnist) or CIFAR archive/folder (cifar10), then
     ``ROOT/<name>.npz``, ``ROOT/<name>_test.npz``, ``ROOT/<name>_train.npz``. A file
     named for one split is used only when that split (or no split) is asked for, and
     ``ROOT/<name>.npz`` only when no split is asked for.
  2. a prepared TFDS ``data_dir`` (the ``data_dir`` argument, else ``$TFDS_DATA_DIR``)
     that has a ``<name>`` folder.
  3. a TFDS download and prepare, only with ``download=True`` (needs network and
     TensorFlow).

  :func:`describe_lookup` prints this order and what exists on the machine.
  With ``RECON_JAX_DATA=/work/shared/data``, ``mnist`` is ``/work/shared/data/mnist``
  (test split only) and ``cifar10`` is ``/work/shared/data/cifar10_test.npz``; the Debian
  package ``dataset-fashion-mnist`` provides ``/usr/share/datasets/fashion-mnist``.

Nothing is cached between calls. ``tensorflow_datasets`` is imported only on the TFDS
paths, and TensorFlow only if tfds itself needs it there.

:func:`select` then draws the victim's balanced training set and a disjoint held-out pool
from the same classes, and subtracts the training mean (BRIEF §3: pixels scaled to
``[0, 1]``, then the training-set mean is subtracted; §4: the held-out pool is what makes
reconstruction evidence of membership).
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import io
import json
import math
import os
import pickle
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from recon_jax.errors import ConfigError, DataError

__all__ = [
    "CIFAR10_CLASSES",
    "DATA_ENV",
    "DATASET_FORMS",
    "FASHION_MNIST_CLASSES",
    "LOOKUP_ORDER",
    "MEAN_MODES",
    "MNIST_CLASSES",
    "ImageSet",
    "VictimData",
    "data_roots",
    "describe_lookup",
    "load_dataset",
    "select",
]

MNIST_CLASSES: tuple[str, ...] = tuple(str(digit) for digit in range(10))
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

DATA_ENV = "RECON_JAX_DATA"
"""Environment variable: ``os.pathsep``-separated folders searched first for local files."""

DATASET_FORMS: tuple[str, ...] = (
    "digits",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "idx:PATH",
    "cifar:PATH",
    "npz:PATH",
    "tfds:NAME",
)

LOOKUP_ORDER: tuple[str, ...] = (
    f"local files under each root: the folders in ${DATA_ENV} (os.pathsep-separated), "
    "then ~/.cache/recon_jax/data, then /usr/share/datasets; in a root, ROOT/<name> or "
    "ROOT/<name with - for _> (IDX folder for mnist/fashion_mnist, CIFAR archive or folder "
    "for cifar10), then ROOT/<name>.npz, ROOT/<name>_test.npz, ROOT/<name>_train.npz",
    "a prepared TFDS data_dir (the data_dir argument, else $TFDS_DATA_DIR) holding <name>",
    "TFDS download and prepare, only with download=True (needs network and TensorFlow)",
)
"""How ``mnist``, ``fashion_mnist`` and ``cifar10`` are found, first match wins."""

MeanMode = Literal["pixel", "channel", "none"]
MEAN_MODES: tuple[str, ...] = ("pixel", "channel", "none")

_NAMED_CLASSES: dict[str, tuple[str, ...]] = {
    "mnist": MNIST_CLASSES,
    "fashion_mnist": FASHION_MNIST_CLASSES,
    "cifar10": CIFAR10_CLASSES,
}
_HOW_TO_SUPPLY = (
    f"supply the data by setting {DATA_ENV} to a folder that holds it, by naming files "
    "directly as idx:PATH, cifar:PATH or npz:PATH, or by passing a prepared TFDS data_dir"
)
_TFDS_EXTRA = "pip install 'recon_jax[tfds]' (TensorFlow)"


class _NotHere(DataError):
    """A location exists but does not hold the requested data (or split).

    Raised by the file loaders so that name lookup can note the location and move on;
    called directly, it is an ordinary :class:`DataError`.
    """


# --------------------------------------------------------------------------- containers


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSet:
    """A labelled image set, validated on construction.

    Attributes:
      images: float32 ``(n, h, w, c)``, NHWC, every pixel finite and in ``[0, 1]``,
        ``c`` in {1, 3}.
      labels: int64 ``(n,)``, each in ``range(len(class_names))``.
      class_names: one readable name per class id.
      provenance: JSON-serialisable record of what was read: ``kind`` (digits, idx, cifar,
        npz, tfds), ``dataset``, ``path`` or ``data_dir``, ``split``, ``n``.
    """

    images: NDArray[np.float32]
    labels: NDArray[np.int64]
    class_names: tuple[str, ...]
    provenance: dict[str, Any]

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] not in (1, 3):
            shape = getattr(images, "shape", type(images).__name__)
            raise DataError(
                f"images must be a 4-D NHWC array (n, h, w, c) with c in {{1, 3}}, got shape {shape}; "
                "add a channel axis to greyscale (images[..., None]) or transpose NCHW to NHWC"
            )
        if images.dtype != np.float32:
            raise DataError(
                f"images must be float32 in [0, 1], got {images.dtype}; "
                "scale uint8 by 1/255 and convert with .astype(np.float32)"
            )
        if len(images) == 0:
            raise DataError("the image set is empty; supply at least one image")
        if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype != np.int64:
            is_array = isinstance(labels, np.ndarray)
            found = f"{labels.dtype} {labels.shape}" if is_array else type(labels).__name__
            raise DataError(f"labels must be a 1-D int64 array, got {found}; convert with .astype(np.int64)")
        if len(labels) != len(images):
            raise DataError(
                f"labels length {len(labels)} does not match the {len(images)} images; "
                "give exactly one label per image"
            )
        if not self.class_names or not all(isinstance(name, str) for name in self.class_names):
            raise DataError(f"class_names must be a non-empty tuple of str, got {self.class_names!r}")
        if labels.min() < 0 or labels.max() >= len(self.class_names):
            raise DataError(
                f"labels must lie in 0..{len(self.class_names) - 1} (one per class name), "
                f"found {labels.min()}..{labels.max()}; fix the labels or pass every class name"
            )
        if not np.isfinite(images).all():
            raise DataError(
                f"{np.count_nonzero(~np.isfinite(images))} pixel values are not finite (NaN or inf); "
                "repair or drop those images"
            )
        low, high = float(images.min()), float(images.max())
        if low < 0.0 or high > 1.0:
            raise DataError(
                f"pixel values must lie in [0, 1], found {low:g}..{high:g}; "
                "scale uint8 images by 1/255 and do not pass mean-subtracted images here"
            )
        try:
            json.dumps(self.provenance)
        except TypeError as err:
            raise DataError(
                f"provenance must be JSON-serialisable ({err}); store paths and numbers as str/int"
            ) from None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(h, w, c)`` of one image."""
        _, height, width, channels = self.images.shape
        return height, width, channels

    def __len__(self) -> int:
        return len(self.images)


@dataclasses.dataclass(frozen=True, eq=False)
class VictimData:
    """The victim's training set, its held-out pool and the mean that was subtracted.

    Attributes:
      train: ``n_train`` images, labels re-indexed to ``0..k-1`` (``k`` = 2 for binary).
      heldout: ``n_heldout`` images from the same classes, disjoint from ``train``.
      mean: float32 ``(1, h, w, c)``: the per-pixel training mean ("pixel"), the
        per-channel training mean broadcast over ``h, w`` ("channel"), or zeros ("none").
      train_indices, heldout_indices: int64 ``(n_train,)`` / ``(n_heldout,)`` indices into
        the source :class:`ImageSet`; no index is in both.
      original_train_labels, original_heldout_labels: int64 source class ids of those
        images (what the binary labels grouped).
      task: ``"multiclass"`` or ``"binary"``.
      provenance: ``{"source": <source provenance>, "selection": <settings>}``.
    """

    train: ImageSet
    heldout: ImageSet
    mean: NDArray[np.float32]
    train_indices: NDArray[np.int64]
    heldout_indices: NDArray[np.int64]
    original_train_labels: NDArray[np.int64]
    original_heldout_labels: NDArray[np.int64]
    task: Literal["multiclass", "binary"]
    provenance: dict[str, Any]

    def __post_init__(self) -> None:
        if self.heldout.shape != self.train.shape or self.mean.shape != (1, *self.train.shape):
            raise DataError(
                f"train images {self.train.shape}, held-out images {self.heldout.shape} and mean "
                f"{self.mean.shape} must share (h, w, c); build VictimData with select()"
            )

    def train_centered(self) -> NDArray[np.float32]:
        """Training images minus the mean: float32 ``(n_train, h, w, c)``."""
        return self.train.images - self.mean

    def heldout_centered(self) -> NDArray[np.float32]:
        """Held-out images minus the (training) mean: float32 ``(n_heldout, h, w, c)``."""
        return self.heldout.images - self.mean

    def to_unit(self, centered: NDArray[np.floating]) -> NDArray[np.float32]:
        """Inverse of the centring: ``centered + mean``, float32, same shape ``(..., h, w, c)``.

        No clipping: ``to_unit(train_centered())`` gives back ``train.images`` up to float32
        rounding, and reconstructions may land outside ``[0, 1]``.
        """
        return np.asarray(centered, dtype=np.float32) + self.mean

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable metadata: task, classes, sizes, indices and provenance."""
        return {
            "task": self.task,
            "class_names": list(self.train.class_names),
            "image_shape": list(self.train.shape),
            "n_train": len(self.train),
            "n_heldout": len(self.heldout),
            "train_indices": self.train_indices.tolist(),
            "heldout_indices": self.heldout_indices.tolist(),
            "original_train_labels": self.original_train_labels.tolist(),
            "original_heldout_labels": self.original_heldout_labels.tolist(),
            "provenance": self.provenance,
        }


# --------------------------------------------------------------------------- loading


SYSTEM_DATA_ROOT = Path("/usr/share/datasets")
"""Where Debian's dataset packages (e.g. ``dataset-fashion-mnist``) install: the last root searched."""


def data_roots() -> list[Path]:
    """Folders searched for local files, in order: ``$RECON_JAX_DATA``, cache, system."""
    from_env = [Path(part).expanduser() for part in os.environ.get(DATA_ENV, "").split(os.pathsep) if part]
    return [*from_env, Path("~/.cache/recon_jax/data").expanduser(), SYSTEM_DATA_ROOT]


def load_dataset(
    name: str,
    *,
    split: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
) -> ImageSet:
    """Load a real image dataset as float32 NHWC ``(n, h, w, c)`` in ``[0, 1]``.

    Args:
      name: ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``, ``idx:PATH``,
        ``cifar:PATH``, ``npz:PATH``, ``tfds:NAME`` or ``tfds:NAME:SPLIT`` (see the module
        docstring for formats and the lookup order of the plain names).
      split: ``"train"`` or ``"test"`` for IDX and CIFAR; any TFDS split for tfds; ``None``
        means train where present, else test. For ``npz:PATH`` it is only recorded.
      data_dir: TFDS data folder (else ``$TFDS_DATA_DIR``, else tfds's default).
      download: let tfds download and prepare the dataset (network and TensorFlow).

    Returns:
      An :class:`ImageSet` whose ``provenance`` records the kind, resolved path and split.

    Raises:
      DataError: unknown name, missing or corrupt files, data not found anywhere.
      ConfigError: a split the source cannot have.
    """
    kind, sep, rest = name.partition(":")
    if not sep:
        if name == "digits":
            return _load_digits(split)
        if name in _NAMED_CLASSES:
            return _load_by_name(name, split, data_dir, download)
        raise _unknown_dataset(name)
    if kind == "tfds":
        tfds_name, tfds_split = _parse_tfds_name(rest, split)
        return _load_tfds(tfds_name, tfds_split, data_dir, download)
    if kind not in ("idx", "cifar", "npz"):
        raise _unknown_dataset(name)
    if not rest:
        raise DataError(f"{name!r} names no path; write it as {kind}:PATH")
    path = Path(rest).expanduser()
    if not path.exists():
        raise DataError(
            f"path {str(path)!r} (from {name!r}) does not exist; check the path or mount the data"
        )
    if kind == "idx":
        return _load_idx(path, split)
    if kind == "cifar":
        return _load_cifar(path, split)
    return _load_npz(path, split, dataset=path.stem, default_class_names=None)


def _unknown_dataset(name: str) -> DataError:
    return DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_FORMS)}")


def _local_candidates(name: str) -> list[tuple[Path, bool, str | None]]:
    """Step 1 of :data:`LOOKUP_ORDER` for ``name``: ``(path, is_npz, split its name implies)``."""
    candidates: list[tuple[Path, bool, str | None]] = []
    for root in data_roots():
        for folder in dict.fromkeys([root / name, root / name.replace("_", "-")]):
            candidates.append((folder, False, None))
        for stem, file_split in ((name, None), (f"{name}_test", "test"), (f"{name}_train", "train")):
            candidates.append((root / f"{stem}.npz", True, file_split))
    return candidates


def _tfds_dir_holding(name: str, data_dir: str | None) -> tuple[str | None, bool]:
    """Step 2: the TFDS data_dir to use (argument, else ``$TFDS_DATA_DIR``), and whether it has ``name``."""
    tfds_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    return tfds_dir, bool(tfds_dir) and (Path(tfds_dir).expanduser() / name).is_dir()


def _load_by_name(name: str, split: str | None, data_dir: str | None, download: bool) -> ImageSet:
    """Resolve ``mnist``, ``fashion_mnist`` or ``cifar10`` in :data:`LOOKUP_ORDER`."""
    tried: list[str] = []
    for path, is_npz, file_split in _local_candidates(name):
        if not path.exists():
            tried.append(f"{path} (absent)")
        elif not is_npz:
            try:
                if name == "cifar10":
                    return _load_cifar(path, split, dataset=name)
                return _load_idx(path, split, dataset=name)
            except _NotHere as err:
                tried.append(f"{path} ({err})")
        elif split not in (None, file_split):
            tried.append(f"{path} (holds {file_split or 'an unnamed split'}, not {split})")
        else:
            return _load_npz(path, file_split, dataset=name, default_class_names=_NAMED_CLASSES[name])

    tfds_dir, has_name = _tfds_dir_holding(name, data_dir)
    if has_name:
        return _load_tfds(name, split, tfds_dir, download)
    tried.append(f"TFDS data_dir {tfds_dir}/{name} (absent)" if tfds_dir else "TFDS data_dir (none given)")
    if download:
        return _load_tfds(name, split, data_dir, download=True)
    tried.append("TFDS download (not allowed: download=False)")
    listing = "\n  ".join(tried)
    raise DataError(
        f"dataset {name!r}{f' split {split!r}' if split else ''} not found; tried, in order:\n  {listing}\n"
        f"To fix: {_HOW_TO_SUPPLY}, or allow download=True (network and {_TFDS_EXTRA})."
    )


def describe_lookup(data_dir: str | None = None) -> str:
    """Human-readable lookup order, and which candidate locations exist on this machine.

    Only checks that paths exist (nothing is read or imported), so it is instant; a
    location listed here can still hold a corrupt file or lack the split asked for.
    """
    lines = [f"Dataset names: {', '.join(DATASET_FORMS)} (also tfds:NAME:SPLIT)."]
    lines.append("digits is scikit-learn's 1,797 8x8 digits and always works offline.")
    lines.append("mnist, fashion_mnist and cifar10 are looked up in this order, first match wins:")
    lines += [f"  {step}. {text}" for step, text in enumerate(LOOKUP_ORDER, start=1)]
    lines.append(f"Roots searched here: {', '.join(map(str, data_roots()))}")
    lines.append("Found here:")
    for name in _NAMED_CLASSES:
        found = [str(path) for path, _, _ in _local_candidates(name) if path.exists()]
        tfds_dir, has_name = _tfds_dir_holding(name, data_dir)
        if has_name:
            found.append(f"TFDS {Path(tfds_dir or '') / name}")
        lines.append(f"  {name}: {', '.join(found) if found else 'nothing; ' + _HOW_TO_SUPPLY}")
    return "\n".join(lines)


def _load_digits(split: str | None) -> ImageSet:
    """scikit-learn digits: 1,797 images ``(8, 8, 1)``, values 0..16 scaled by 1/16."""
    if split is not None:
        raise ConfigError(
            f"'digits' is one set with no train/test split, got split={split!r}; omit the split"
        )
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))[..., None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    provenance = {
        "kind": "digits",
        "dataset": "digits",
        "path": "sklearn.datasets.load_digits",
        "split": None,
    }
    return _make_image_set(images, labels, MNIST_CLASSES, provenance, "digits")


def _make_image_set(
    images: NDArray[np.float32],
    labels: NDArray[np.int64],
    class_names: Sequence[str],
    provenance: dict[str, Any],
    where: str,
) -> ImageSet:
    """Build an :class:`ImageSet`, prefixing validation errors with the source ``where``."""
    try:
        return ImageSet(images, labels, tuple(class_names), {**provenance, "n": len(images)})
    except DataError as err:
        raise DataError(f"{where}: {err}") from None


def _to_unit_nhwc(images: np.ndarray, where: str) -> NDArray[np.float32]:
    """uint8 0..255 or float ``(n, h, w[, c])`` to float32 ``(n, h, w, c)``; range checked later."""
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(images.dtype, np.floating):
        return images.astype(np.float32)
    raise DataError(
        f"{where}: images must be uint8 (0..255) or float (0..1), got {images.dtype}; convert them"
    )


# ---- IDX (MNIST family)

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


def _load_idx(folder: Path, split: str | None, dataset: str | None = None) -> ImageSet:
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
        raise _NotHere(
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
    class_names = _NAMED_CLASSES[dataset]
    unit_images = _to_unit_nhwc(images, str(images_path))
    return _make_image_set(unit_images, labels.astype(np.int64), class_names, provenance, str(folder))


# ---- CIFAR-10 (binary and python versions)

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
    raise _NotHere(
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


def _load_cifar(path: Path, split: str | None, dataset: str = "cifar10") -> ImageSet:
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
        raise _NotHere(f"no CIFAR-10 {chosen} batches in {location}")

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
    unit_images = _to_unit_nhwc(images, location)
    return _make_image_set(unit_images, np.concatenate(label_chunks), class_names, provenance, location)


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


# ---- npz


def _load_npz(
    path: Path, split: str | None, *, dataset: str, default_class_names: Sequence[str] | None
) -> ImageSet:
    """``.npz`` with ``images`` (NHWC or NHW, uint8 or float in [0, 1]), ``labels``, opt. ``classes``."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = sorted(archive.files)
            missing = [key for key in ("images", "labels") if key not in keys]
            if missing:
                raise DataError(
                    f"{path} lacks {' and '.join(missing)}; it has keys {keys}. Save it with "
                    "np.savez(path, images=..., labels=..., classes=...)"
                )
            images, labels = archive["images"], archive["labels"]
            classes = archive["classes"] if "classes" in keys else None
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as err:
        raise DataError(
            f"{path} is not a readable .npz ({type(err).__name__}: {err}); write it again with np.savez"
        ) from None
    if images.ndim not in (3, 4):
        raise DataError(f"{path}: images must be (n, h, w, c) or (n, h, w), got shape {images.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if classes is not None:
        class_names = tuple(str(name) for name in classes)
    elif default_class_names is not None:
        class_names = tuple(default_class_names)
    else:
        class_names = tuple(str(label) for label in range(int(labels.max(initial=0)) + 1))
    provenance = {"kind": "npz", "dataset": dataset, "path": str(path.resolve()), "split": split}
    return _make_image_set(_to_unit_nhwc(images, str(path)), labels, class_names, provenance, str(path))


# ---- TFDS

_TFDS_NAME = re.compile(r"(?P<name>[^:]+(?::[\d*]+\.[\d*]+\.[\d*]+)?)(?::(?P<split>.+))?")


def _parse_tfds_name(rest: str, split: str | None) -> tuple[str, str | None]:
    """``NAME[:VERSION][:SPLIT]`` (version like ``3.0.1``) -> ``(NAME[:VERSION], split)``."""
    match = _TFDS_NAME.fullmatch(rest)
    if not match:
        raise DataError(f"'tfds:{rest}' is not tfds:NAME or tfds:NAME:SPLIT")
    named_split = match["split"]
    if named_split and split and named_split != split:
        raise ConfigError(
            f"'tfds:{rest}' names split {named_split!r} but split={split!r} was also given; give one"
        )
    return match["name"], named_split or split


def _load_tfds(name: str, split: str | None, data_dir: str | None, download: bool) -> ImageSet:
    """A TFDS dataset with ``image`` ``(h, w[, c])`` and ``label`` features, via data_source."""
    import tensorflow_datasets as tfds  # deferred: heavy, and only this path needs it

    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    where = f"data_dir {data_dir}" if data_dir else "the default TFDS data_dir"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"TFDS knows no dataset {name!r} and none is prepared in {where}; "
            f"check the name and data_dir, or {_HOW_TO_SUPPLY}"
        ) from None
    if not builder.is_prepared():
        if not download:
            raise DataError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; pass download=True "
                f"(network and {_TFDS_EXTRA}), pass the data_dir where it is prepared, or {_HOW_TO_SUPPLY}"
            )
        try:
            builder.download_and_prepare(file_format="array_record")
        except ImportError as err:
            raise _needs_tensorflow(name, err) from None
        except Exception as err:  # tfds raises many kinds (network, checksums); report any
            raise DataError(f"TFDS could not download and prepare {name!r}: {err}; {_HOW_TO_SUPPLY}") from err

    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise DataError(f"TFDS dataset {name!r} needs 'image' and 'label' features, has {sorted(features)}")
    splits = list(builder.info.splits)
    chosen = split or ("train" if "train" in splits else splits[0])
    try:
        source = builder.as_data_source(split=chosen)
    except NotImplementedError:
        raise DataError(
            f"TFDS dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format}, "
            "but random access needs array_record; prepare it with "
            "download_and_prepare(file_format='array_record') or use local files"
        ) from None
    except (ValueError, KeyError) as err:
        raise DataError(
            f"TFDS dataset {name!r} has no split {chosen!r} ({err}); available: {splits}"
        ) from None
    try:
        # One batched read: much faster than len(source) single-record lookups.
        records = source.__getitems__(range(len(source)))
    except ImportError as err:
        raise _needs_tensorflow(name, err) from None
    images = np.stack([np.asarray(record["image"]) for record in records])
    labels = np.asarray([record["label"] for record in records], dtype=np.int64)
    provenance = {"kind": "tfds", "dataset": name, "data_dir": str(builder.data_dir), "split": chosen}
    where_read = f"tfds:{name}:{chosen}"
    class_names = tuple(features["label"].names)
    return _make_image_set(_to_unit_nhwc(images, where_read), labels, class_names, provenance, where_read)


def _needs_tensorflow(name: str, err: ImportError) -> DataError:
    return DataError(
        f"TFDS dataset {name!r} stores its images with the Image feature, and decoding or preparing them "
        f"failed ({err}); TensorFlow is needed for that dataset: {_TFDS_EXTRA}. Or use local files: "
        f"{_HOW_TO_SUPPLY}"
    )


# --------------------------------------------------------------------------- selection


def _check_count(value: object, what: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}; {fix}")
    return int(value)


def _check_class_ids(ids: Sequence[int], n_classes: int, what: str) -> tuple[int, ...]:
    as_tuple = tuple(ids)
    bad = [
        c
        for c in as_tuple
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < n_classes
    ]
    if bad:
        raise ConfigError(f"{what} has unknown class ids {bad}; valid ids are 0..{n_classes - 1}")
    if len(set(as_tuple)) != len(as_tuple):
        raise ConfigError(f"{what} repeats class ids: {list(as_tuple)}; list each class once")
    return tuple(int(c) for c in as_tuple)


def _spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal counts, the remainder going to the first parts."""
    base, remainder = divmod(total, parts)
    return [base + (i < remainder) for i in range(parts)]


def select(
    ds: ImageSet,
    *,
    n_per_class: int,
    classes: Sequence[int] | None = None,
    binary_positive: Sequence[int] | None = None,
    n_heldout: int | None = None,
    seed: int = 0,
    mean: MeanMode = "pixel",
) -> VictimData:
    """Draw a balanced training set and a disjoint, equally balanced held-out pool.

    Without ``binary_positive``, each class in ``classes`` gets exactly ``n_per_class``
    training images, drawn uniformly without replacement, and labels become
    ``0..len(classes)-1`` in the order of ``classes``. With ``binary_positive`` there are
    two classes: label 1 is the positive group, label 0 the other chosen classes; each gets
    ``n_per_class`` images spread as evenly as possible over its source classes (50 over
    five digits = 10 each; a remainder goes to the first classes of the group).

    The held-out pool has ``n_heldout`` images (default: the training size), split over
    the (binary) classes and then over source classes in the same way, with no index in
    common with the training set. The mean is computed on the training images only.

    Args:
      ds: the source images, ``(N, h, w, c)``.
      n_per_class: training images per (binary) class.
      classes: source class ids to use, default all.
      binary_positive: source class ids forming label 1; a proper non-empty subset of
        ``classes``.
      n_heldout: size of the held-out pool.
      seed: seeds ``np.random.default_rng``; same inputs and seed give the same indices.
      mean: ``"pixel"`` (per-pixel training mean), ``"channel"`` (per-channel training
        mean) or ``"none"`` (zeros); always stored with shape ``(1, h, w, c)``.

    Returns:
      :class:`VictimData` with ``train`` ``(k * n_per_class, h, w, c)`` and ``heldout``
      ``(n_heldout, h, w, c)``.

    Raises:
      ConfigError: a count below 1, unknown or repeated class ids, an invalid
        ``binary_positive``, an unknown ``mean``.
      DataError: a class with fewer images than requested for training plus held-out.
    """
    n_per_class = _check_count(n_per_class, "n_per_class", "ask for at least one image per class")
    if mean not in MEAN_MODES:
        raise ConfigError(f"mean must be one of {', '.join(MEAN_MODES)}, got {mean!r}")
    n_source = len(ds.class_names)
    chosen = _check_class_ids(range(n_source) if classes is None else classes, n_source, "classes")
    if not chosen:
        raise ConfigError("classes is empty; choose at least one class (or pass None for all)")

    if binary_positive is None:
        groups: list[tuple[int, ...]] = [(c,) for c in chosen]
        class_names = tuple(ds.class_names[c] for c in chosen)
    else:
        positive = set(_check_class_ids(binary_positive, n_source, "binary_positive"))
        if not positive or not positive < set(chosen):
            raise ConfigError(
                f"binary_positive {sorted(positive)} must be a proper non-empty subset of the chosen classes "
                f"{list(chosen)}: name the label-1 classes, and leave at least one chosen class for label 0"
            )
        groups = [tuple(c for c in chosen if c not in positive), tuple(c for c in chosen if c in positive)]
        class_names = tuple(", ".join(ds.class_names[c] for c in group) for group in groups)

    n_train = n_per_class * len(groups)
    if n_heldout is None:
        n_heldout = n_train
    n_heldout = _check_count(n_heldout, "n_heldout", "the held-out pool needs at least one image")
    train_count: dict[int, int] = {}
    heldout_count: dict[int, int] = {}
    for group, group_heldout in zip(groups, _spread(n_heldout, len(groups))):
        train_count.update(zip(group, _spread(n_per_class, len(group))))
        heldout_count.update(zip(group, _spread(group_heldout, len(group))))

    available = np.bincount(ds.labels, minlength=n_source)
    for c in chosen:
        asked = train_count[c] + heldout_count[c]
        if asked > available[c]:
            raise DataError(
                f"class {c} ({ds.class_names[c]!r}) has {available[c]} images but {asked} were asked "
                f"({train_count[c]} train + {heldout_count[c]} held-out); "
                "lower --n-per-class or --n-heldout, or use a larger split"
            )

    rng = np.random.default_rng(seed)
    train_parts, heldout_parts, train_label_parts, heldout_label_parts = [], [], [], []
    for label, group in enumerate(groups):
        for c in group:
            pool = np.flatnonzero(ds.labels == c)
            drawn = rng.choice(pool, size=train_count[c] + heldout_count[c], replace=False)
            train_parts.append(drawn[: train_count[c]])
            heldout_parts.append(drawn[train_count[c] :])
            train_label_parts.append(np.full(train_count[c], label, dtype=np.int64))
            heldout_label_parts.append(np.full(heldout_count[c], label, dtype=np.int64))
    train_indices = np.concatenate(train_parts).astype(np.int64)
    heldout_indices = np.concatenate(heldout_parts).astype(np.int64)

    def subset(indices: NDArray[np.int64], labels: NDArray[np.int64], role: str) -> ImageSet:
        provenance = {**ds.provenance, "subset": role, "n": len(indices)}
        return ImageSet(ds.images[indices], labels, class_names, provenance)

    train = subset(train_indices, np.concatenate(train_label_parts), "train")
    heldout = subset(heldout_indices, np.concatenate(heldout_label_parts), "heldout")
    if mean == "pixel":
        mean_image = train.images.mean(axis=0, keepdims=True, dtype=np.float64)
    elif mean == "channel":
        mean_image = train.images.mean(axis=(0, 1, 2), keepdims=True, dtype=np.float64)
    else:
        mean_image = np.zeros((1, 1, 1, train.shape[-1]))
    mean_image = np.broadcast_to(mean_image.astype(np.float32), (1, *train.shape)).copy()

    selection = {
        "seed": int(seed),
        "n_per_class": n_per_class,
        "classes": list(chosen),
        "binary_positive": None if binary_positive is None else sorted(int(c) for c in binary_positive),
        "n_heldout": n_heldout,
        "mean": mean,
    }
    return VictimData(
        train=train,
        heldout=heldout,
        mean=mean_image,
        train_indices=train_indices,
        heldout_indices=heldout_indices,
        original_train_labels=ds.labels[train_indices],
        original_heldout_labels=ds.labels[heldout_indices],
        task="multiclass" if binary_positive is None else "binary",
        provenance={"source": ds.provenance, "selection": selection},
    )
