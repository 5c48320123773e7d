"""The victim's data: a class-balanced training set, a disjoint held-out pool, and centring.

:func:`select` draws, from one :class:`~recon_jax.data.ImageSet`, ``n_per_class`` training
images per class (or per group of classes, for a binary task) and a held-out pool from the
same classes with no image in common, then computes the mean that preprocessing subtracts.
This is the protocol of Haim et al. (2022) and Runkel et al. (2024): pixels are scaled to
``[0, 1]`` and the training-set mean is subtracted,

    x_i = u_i − μ,   μ = (1/n) Σ_j u_j,   u_j ∈ [0, 1],

with μ computed on the training images only (``mean="pixel"``, the default; ``"channel"``
averages over pixels too, ``"none"`` subtracts nothing). The held-out pool is what makes a
reconstruction evidence of membership: one that matches unseen images of the same classes
as well as it matches training images shows nothing about the training set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from recon_jax.data.containers import ImageSet, VictimData
from recon_jax.errors import ConfigError, DataError

MeanMode = Literal["pixel", "channel", "none"]
MEAN_MODES: tuple[str, ...] = ("pixel", "channel", "none")


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
