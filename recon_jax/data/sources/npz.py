"""``npz:PATH``: an ``.npz`` with ``images`` (NHWC or NHW, uint8 or float in [0, 1]),
integer ``labels`` and optionally ``classes`` (the class names)."""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recon_jax.data.containers import ImageSet
from recon_jax.data.sources import make_image_set, to_unit_nhwc
from recon_jax.errors import DataError


def load_npz(
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
    return make_image_set(to_unit_nhwc(images, str(path)), labels, class_names, provenance, str(path))
