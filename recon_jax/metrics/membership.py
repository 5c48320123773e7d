"""Membership ambiguity: does a reconstruction single out the training set?

Runkel et al.'s question needs the protocol's statistics against a **held-out pool** from
the same distribution as well as against the training set: a reconstruction as close to
some held-out image as to any training image is no evidence of membership.
:func:`membership_auc` and :func:`nearest_is_train_rate` reduce that to numbers for which
0.5 and the chance rate mean "no evidence". Host-side numpy/scipy in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata

from recon_jax.errors import DataError
from recon_jax.metrics.neighbours import mean_squared_distances, ncc_features


def pool_reconstructions(reconstructions: ArrayLike) -> NDArray[np.float64]:
    """``(m, h, w, c)`` or ``(K, n, h, w, c)`` -> ``(m, h, w, c)`` with m = K·n (run-major)."""
    reconstructions = np.asarray(reconstructions, dtype=np.float64)
    if reconstructions.ndim not in (4, 5):
        raise DataError(f"reconstructions must be (n, h, w, c) or (K, n, h, w, c), got {reconstructions.shape}")
    pooled = reconstructions.reshape(-1, *reconstructions.shape[-3:])
    bad = ~np.isfinite(pooled).all(axis=(1, 2, 3))
    if bad.any():
        # Silently dropping them would renumber every reconstruction index in the results.
        raise DataError(
            f"{int(bad.sum())} of {len(pooled)} reconstructions contain NaN or inf (diverged runs?); "
            "drop those runs before evaluating, e.g. images[~diverged]")
    return pooled


def membership_auc(train_scores: ArrayLike, heldout_scores: ArrayLike) -> float:
    """AUC of telling training images from held-out ones by a score (higher = "member").

        AUC = (1 / n_t n_h) Σ_i Σ_j [ 1(s_i > s_j) + ½ 1(s_i = s_j) ],  i ∈ train, j ∈ held-out

    the Mann–Whitney U statistic over n_t n_h, computed from average ranks:
    U = R_train − n_t(n_t + 1)/2. 1 = perfectly separable, 0.5 = no evidence of membership,
    and AUC(a, b) + AUC(b, a) = 1 exactly. Scores: e.g. the best SSIM to any reconstruction,
    or minus the distance to the nearest reconstruction. ``(n_t,)``, ``(n_h,)`` -> float.
    """
    train_scores = np.asarray(train_scores, dtype=np.float64).ravel()
    heldout_scores = np.asarray(heldout_scores, dtype=np.float64).ravel()
    if train_scores.size == 0 or heldout_scores.size == 0:
        raise DataError("membership AUC needs at least one training and one held-out score")
    if np.isnan(train_scores).any() or np.isnan(heldout_scores).any():
        raise DataError("membership scores contain NaN")
    ranks = rankdata(np.concatenate([train_scores, heldout_scores]))  # average ranks: ties share
    n_train = train_scores.size
    u_statistic = ranks[:n_train].sum() - n_train * (n_train + 1) / 2.0
    return float(u_statistic / (n_train * heldout_scores.size))


def nearest_is_train(train_distances: NDArray[np.float64], heldout_distances: NDArray[np.float64]) -> NDArray[np.float64]:
    """Per query: 1 if its nearest image is a training image, 0 if held-out, ½ on an exact tie."""
    best_train = train_distances.min(axis=1)
    best_heldout = heldout_distances.min(axis=1)
    return np.where(best_train < best_heldout, 1.0, np.where(best_train > best_heldout, 0.0, 0.5))


class NearestIsTrain(NamedTuple):
    rate: float
    """The fraction of reconstructions whose nearest image (train ∪ held-out) is a training image."""
    chance: float
    """n_train / (n_train + n_heldout): the rate if nearness carried no membership information."""
    per_reconstruction: NDArray[np.float64]
    """``(n_reconstructions,)``: 1 (train), 0 (held-out) or ½ (an exact tie between the two)."""


def nearest_is_train_rate(
    reconstructions: ArrayLike,
    train_images: ArrayLike,
    heldout_images: ArrayLike,
    mean: ArrayLike | None = None,
    downsample: bool = True,
    standardise: bool = True,
) -> NearestIsTrain:
    """How often a reconstruction's NCC-nearest image in train ∪ held-out is a training image.

        rate = (1/m) Σ_k [ 1(min_i d(x_k, t_i) < min_j d(x_k, h_j)) + ½ 1(=) ],
        chance = n_t / (n_t + n_h)

    with d from :func:`ncc_distances`. A rate near the chance rate means the reconstructions
    are as close to unseen images as to training images. An exact tie counts ½ (so it
    favours neither pool, unlike an argmin over the union, which favours whichever comes
    first).

    Args:
      reconstructions: ``(m, h, w, c)`` or ``(K, n, h, w, c)`` (pooled), mean-subtracted.
      train_images, heldout_images: ``(n_t, h, w, c)``, ``(n_h, h, w, c)`` in [0, 1].
      mean: the training mean, subtracted from both pools so that they are compared in the
        reconstructions' space (the reference protocol); None compares as given.
    """
    queries = pool_reconstructions(reconstructions)
    train_images = np.asarray(train_images, np.float64)
    heldout_images = np.asarray(heldout_images, np.float64)
    if mean is not None:
        train_images = train_images - np.asarray(mean, np.float64)
        heldout_images = heldout_images - np.asarray(mean, np.float64)
    features = ncc_features(queries, downsample, standardise)
    per_reconstruction = nearest_is_train(
        mean_squared_distances(features, ncc_features(train_images, downsample, standardise)),
        mean_squared_distances(features, ncc_features(heldout_images, downsample, standardise)))
    n_train, n_heldout = len(train_images), len(heldout_images)
    return NearestIsTrain(float(per_reconstruction.mean()), n_train / (n_train + n_heldout), per_reconstruction)
