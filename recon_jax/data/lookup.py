"""Where datasets are found: :func:`load_dataset` turns a name into an :class:`~recon_jax.data.ImageSet`.

A name with a prefix (``idx:PATH``, ``cifar:PATH``, ``npz:PATH``, ``tfds:NAME[:SPLIT]``) goes
straight to its reader (:mod:`recon_jax.data.sources`); ``digits`` is embedded; ``mnist``,
``fashion_mnist`` and ``cifar10`` are looked up in :data:`LOOKUP_ORDER`: local files under the
roots of :func:`data_roots` (``$RECON_JAX_DATA`` first), then a prepared TFDS ``data_dir``,
then a TFDS download only when allowed. :func:`describe_lookup` prints that order and what
exists on this machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from recon_jax.data.catalog import DATA_ENV, DATASET_FORMS, HOW_TO_SUPPLY, NAMED_CLASSES, TFDS_EXTRA
from recon_jax.data.containers import ImageSet
from recon_jax.data.sources import NotHere
from recon_jax.data.sources.cifar import load_cifar
from recon_jax.data.sources.digits import load_digits
from recon_jax.data.sources.idx import load_idx
from recon_jax.data.sources.npz import load_npz
from recon_jax.data.sources.tfds import load_tfds, parse_tfds_name
from recon_jax.errors import DataError

LOOKUP_ORDER: tuple[str, ...] = (
    f"local files under each root: the folders in ${DATA_ENV} (os.pathsep-separated), "
    "then ~/.cache/recon_jax/data, then /usr/share/datasets; in a root, ROOT/<name> or "
    "ROOT/<name with - for _> (IDX folder for mnist/fashion_mnist, CIFAR archive or folder "
    "for cifar10), then ROOT/<name>.npz, ROOT/<name>_test.npz, ROOT/<name>_train.npz",
    "a prepared TFDS data_dir (the data_dir argument, else $TFDS_DATA_DIR) holding <name>",
    "TFDS download and prepare, only with download=True (needs network and TensorFlow)",
)
"""How ``mnist``, ``fashion_mnist`` and ``cifar10`` are found, first match wins."""


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
        ``cifar:PATH``, ``npz:PATH``, ``tfds:NAME`` or ``tfds:NAME:SPLIT`` (see
        :mod:`recon_jax.data` for the formats and the lookup order of the plain names).
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
            return load_digits(split)
        if name in NAMED_CLASSES:
            return _load_by_name(name, split, data_dir, download)
        raise _unknown_dataset(name)
    if kind == "tfds":
        tfds_name, tfds_split = parse_tfds_name(rest, split)
        return load_tfds(tfds_name, tfds_split, data_dir, download)
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
        return load_idx(path, split)
    if kind == "cifar":
        return load_cifar(path, split)
    return load_npz(path, split, dataset=path.stem, default_class_names=None)


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
                    return load_cifar(path, split, dataset=name)
                return load_idx(path, split, dataset=name)
            except NotHere as err:
                tried.append(f"{path} ({err})")
        elif split not in (None, file_split):
            tried.append(f"{path} (holds {file_split or 'an unnamed split'}, not {split})")
        else:
            return load_npz(path, file_split, dataset=name, default_class_names=NAMED_CLASSES[name])

    tfds_dir, has_name = _tfds_dir_holding(name, data_dir)
    if has_name:
        return load_tfds(name, split, tfds_dir, download)
    tried.append(f"TFDS data_dir {tfds_dir}/{name} (absent)" if tfds_dir else "TFDS data_dir (none given)")
    if download:
        return load_tfds(name, split, data_dir, download=True)
    tried.append("TFDS download (not allowed: download=False)")
    listing = "\n  ".join(tried)
    raise DataError(
        f"dataset {name!r}{f' split {split!r}' if split else ''} not found; tried, in order:\n  {listing}\n"
        f"To fix: {HOW_TO_SUPPLY}, or allow download=True (network and {TFDS_EXTRA})."
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
    for name in NAMED_CLASSES:
        found = [str(path) for path, _, _ in _local_candidates(name) if path.exists()]
        tfds_dir, has_name = _tfds_dir_holding(name, data_dir)
        if has_name:
            found.append(f"TFDS {Path(tfds_dir or '') / name}")
        lines.append(f"  {name}: {', '.join(found) if found else 'nothing; ' + HOW_TO_SUPPLY}")
    return "\n".join(lines)
