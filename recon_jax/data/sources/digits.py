"""``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, shipped in its wheel, so
always available offline (the embedded default dataset)."""

from __future__ import annotations

import numpy as np

from recon_jax.data.catalog import MNIST_CLASSES
from recon_jax.data.containers import ImageSet
from recon_jax.data.sources import make_image_set
from recon_jax.errors import ConfigError


def load_digits(split: str | None) -> ImageSet:
    """scikit-learn digits: 1,797 images ``(8, 8, 1)``, values 0..16 scaled by 1/16."""
    if split is not None:
        raise ConfigError(
            f"'digits' is one set with no train/test split, got split={split!r}; omit the split"
        )
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))[..., None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    provenance = {
        "kind": "digits",
        "dataset": "digits",
        "path": "sklearn.datasets.load_digits",
        "split": None,
    }
    return make_image_set(images, labels, MNIST_CLASSES, provenance, "digits")
