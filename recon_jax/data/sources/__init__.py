"""Readers of the on-disk formats, one module each, and what they share.

- :mod:`~recon_jax.data.sources.digits`: scikit-learn's embedded 8x8 digits.
- :mod:`~recon_jax.data.sources.idx`: MNIST-family IDX files (optionally gzipped).
- :mod:`~recon_jax.data.sources.cifar`: CIFAR-10, binary or python version, archive or folder.
- :mod:`~recon_jax.data.sources.npz`: an ``.npz`` with ``images``, ``labels``, ``classes``.
- :mod:`~recon_jax.data.sources.tfds`: a dataset prepared in a TFDS ``data_dir``.

Each returns an :class:`~recon_jax.data.ImageSet` of float32 NHWC images in ``[0, 1]``, built
here by :func:`make_image_set` from the raw arrays converted by :func:`to_unit_nhwc`. A reader
raises :class:`NotHere` when a location exists but lacks the data asked for, so that name
lookup (:mod:`recon_jax.data.lookup`) can note it and move on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from recon_jax.data.containers import ImageSet
from recon_jax.errors import DataError


class NotHere(DataError):
    """A location exists but does not hold the requested data (or split).

    Raised by the file loaders so that name lookup can note the location and move on;
    called directly, it is an ordinary :class:`DataError`.
    """


def make_image_set(
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


def to_unit_nhwc(images: np.ndarray, where: str) -> NDArray[np.float32]:
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
