"""``tfds:NAME`` or ``tfds:NAME:SPLIT``: a dataset prepared in a TFDS ``data_dir``
(array_record format), read with ``tfds.data_source``; a download and prepare only when
asked for. ``tensorflow_datasets`` is imported only when this reader runs, and TensorFlow
only if tfds itself needs it there (to prepare, or to decode Image features)."""

from __future__ import annotations

import os
import re

import numpy as np

from recon_jax.data.catalog import HOW_TO_SUPPLY, TFDS_EXTRA
from recon_jax.data.containers import ImageSet
from recon_jax.data.sources import make_image_set, to_unit_nhwc
from recon_jax.errors import ConfigError, DataError

_TFDS_NAME = re.compile(r"(?P<name>[^:]+(?::[\d*]+\.[\d*]+\.[\d*]+)?)(?::(?P<split>.+))?")


def parse_tfds_name(rest: str, split: str | None) -> tuple[str, str | None]:
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


def load_tfds(name: str, split: str | None, data_dir: str | None, download: bool) -> ImageSet:
    """A TFDS dataset with ``image`` ``(h, w[, c])`` and ``label`` features, via data_source."""
    import tensorflow_datasets as tfds  # deferred: heavy, and only this path needs it

    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    where = f"data_dir {data_dir}" if data_dir else "the default TFDS data_dir"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"TFDS knows no dataset {name!r} and none is prepared in {where}; "
            f"check the name and data_dir, or {HOW_TO_SUPPLY}"
        ) from None
    if not builder.is_prepared():
        if not download:
            raise DataError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; pass download=True "
                f"(network and {TFDS_EXTRA}), pass the data_dir where it is prepared, or {HOW_TO_SUPPLY}"
            )
        try:
            builder.download_and_prepare(file_format="array_record")
        except ImportError as err:
            raise _needs_tensorflow(name, err) from None
        except Exception as err:  # tfds raises many kinds (network, checksums); report any
            raise DataError(f"TFDS could not download and prepare {name!r}: {err}; {HOW_TO_SUPPLY}") from err

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
    return make_image_set(to_unit_nhwc(images, where_read), labels, class_names, provenance, where_read)


def _needs_tensorflow(name: str, err: ImportError) -> DataError:
    return DataError(
        f"TFDS dataset {name!r} stores its images with the Image feature, and decoding or preparing them "
        f"failed ({err}); TensorFlow is needed for that dataset: {TFDS_EXTRA}. Or use local files: "
        f"{HOW_TO_SUPPLY}"
    )
