"""The containers every dataset comes back in: :class:`ImageSet` (labelled images in [0, 1],
validated on construction) and :class:`VictimData` (the victim's training set, held-out pool
and the training mean that was subtracted, with the inverse of that centring)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from recon_jax.errors import DataError


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
