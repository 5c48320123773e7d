"""Nearest neighbours and one-to-one matching of reconstructions to images (numpy, float64).

The protocol's step 1 (Haim et al. 2022): distances by normalised cross-correlation, both
images bicubically downsampled ×½ and standardised per channel (:func:`ncc_distances`);
then each image's nearest reconstruction (:func:`nearest`), or a one-to-one matching,
greedy (:func:`match_greedy`) or optimal (:func:`match_hungarian`). Host-side numpy/scipy in
float64, since these end in argmins, sorts and combinatorial assignment.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import linear_sum_assignment

from recon_jax.errors import DataError

_BICUBIC_HALF_TAPS = np.array([-0.09375, 0.59375, 0.59375, -0.09375])
"""Cubic-convolution weights (Keys, a = −0.75) at distances 1.5, 0.5, 0.5, 1.5."""


def downsample_half_bicubic(images: ArrayLike) -> NDArray[np.float64]:
    """×½ bicubic downsampling, equal to ``torch.nn.functional.interpolate(x, scale_factor=0.5,
    mode='bicubic')`` (align_corners=False, no antialiasing), which Haim et al. use.

    Output pixel i samples the source at 2i + ½ (half-pixel centres), so every output pixel
    sees the same four taps, rows 2i−1 … 2i+2, with the cubic-convolution kernel
    (a = −0.75) at distances 1.5, 0.5, 0.5, 1.5:

        y_i = −0.09375 x_{2i−1} + 0.59375 x_{2i} + 0.59375 x_{2i+1} − 0.09375 x_{2i+2},

    indices clamped to the image (edge replication), applied along h then w.
    ``jax.image.resize(..., 'bicubic')`` differs on purpose: it uses a = −0.5 and widens the
    kernel to antialias when downsampling.

    ``(..., h, w, c)`` -> ``(..., ⌊h/2⌋, ⌊w/2⌋, c)`` float64.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim < 3 or min(images.shape[-3], images.shape[-2]) < 2:
        raise DataError(f"×½ downsampling needs images (..., h, w, c) with h, w >= 2, got {images.shape}")
    for axis in (images.ndim - 3, images.ndim - 2):
        size = images.shape[axis]
        centres = 2 * np.arange(size // 2)
        images = sum(
            w * np.take(images, np.clip(centres + offset, 0, size - 1), axis=axis)
            for w, offset in zip(_BICUBIC_HALF_TAPS, (-1, 0, 1, 2))
        )
    return images


def standardise_channels(images: ArrayLike) -> NDArray[np.float64]:
    """z = (x − mean_c) / std_c per image and channel, over (h, w); ``(..., h, w, c)`` -> same.

    std is the population std (ddof 0), so (1/hw) Σ z² = 1 per channel. Haim et al. use
    torch's ddof-1 std; that scales every distance by the same factor (hw−1)/hw and changes
    no nearest neighbour or matching. A constant channel (std 0) standardises to zeros.
    """
    images = np.asarray(images, dtype=np.float64)
    centred = images - images.mean(axis=(-3, -2), keepdims=True)
    std = centred.std(axis=(-3, -2), keepdims=True)
    return centred / np.where(std > 0, std, 1.0)


def ncc_features(images: ArrayLike, downsample: bool, standardise: bool) -> NDArray[np.float64]:
    """The vectors NCC compares: ``(n, h, w, c)`` -> ``(n, D)``."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4:
        raise DataError(f"expected images (n, h, w, c), got shape {images.shape}")
    if downsample:
        images = downsample_half_bicubic(images)
    if standardise:
        images = standardise_channels(images)
    return images.reshape(images.shape[0], -1)


def mean_squared_distances(queries: NDArray[np.float64], references: NDArray[np.float64]) -> NDArray[np.float64]:
    """(1/D) ‖q − r‖² for all pairs of rows: (nq, D), (nr, D) -> (nq, nr).

    The fast form ‖q‖² + ‖r‖² − 2 q·r cancels catastrophically for near-identical pairs,
    exactly the pairs that decide nearest neighbours and membership ties. Entries below
    1e-9 of ‖q‖² + ‖r‖² are therefore recomputed as explicit differences, so an exact
    duplicate is at distance exactly 0.
    """
    if queries.shape[1] != references.shape[1]:
        raise DataError(f"query and reference images differ in size: {queries.shape[1]} vs {references.shape[1]} values")
    q_norms = np.einsum("ij,ij->i", queries, queries)
    r_norms = np.einsum("ij,ij->i", references, references)
    scale = q_norms[:, None] + r_norms[None, :]
    distances = np.maximum(scale - 2.0 * queries @ references.T, 0.0)
    rows, cols = np.nonzero(distances <= 1e-9 * scale)
    for start in range(0, len(rows), 4096):
        i, j = rows[start:start + 4096], cols[start:start + 4096]
        distances[i, j] = np.sum((queries[i] - references[j]) ** 2, axis=1)
    return distances / max(queries.shape[1], 1)


def ncc_distances(
    queries: ArrayLike,
    references: ArrayLike,
    downsample: bool = True,
    standardise: bool = True,
) -> NDArray[np.float64]:
    """Pairwise normalised-cross-correlation distances (the protocol's step 1, Haim et al. 2022).

        d(q, r) = (1/D) ‖z(P q) − z(P r)‖²

    P is ×½ bicubic downsampling (:func:`downsample_half_bicubic`; identity with
    ``downsample=False``), z is per-image, per-channel standardisation
    (:func:`standardise_channels`; identity with ``standardise=False``, giving plain L2 as
    used for MNIST), and D = h'w'c is the number of compared values. This is Haim et al.'s
    ``ncc_dist(..., div_dim=True)``: the *squared* L2 distance per value, a monotone function
    of the Euclidean distance, so nearest neighbours are the same under either. With
    standardisation d = 2(1 − ρ̄), ρ̄ the mean over channels of the Pearson correlation of
    q and r, so d ∈ [0, 4] and d is invariant to per-channel affine intensity changes
    a_c x + b_c with a_c > 0.

    Args:
      queries: ``(n_queries, h, w, c)`` (e.g. reconstructions).
      references: ``(n_references, h, w, c)`` (e.g. training images).

    Returns:
      ``(n_queries, n_references)`` float64.
    """
    return mean_squared_distances(
        ncc_features(queries, downsample, standardise), ncc_features(references, downsample, standardise))


# ---------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------


class Nearest(NamedTuple):
    """Nearest neighbours both ways in a distance matrix ``(n_queries, n_references)``."""

    query_of_reference: NDArray[np.int64]
    """``(n_references,)``: for each reference, the index of its nearest query."""
    reference_distance: NDArray[np.float64]
    """``(n_references,)``: that distance."""
    reference_of_query: NDArray[np.int64]
    """``(n_queries,)``: for each query, the index of its nearest reference."""
    query_distance: NDArray[np.float64]
    """``(n_queries,)``: that distance."""


def nearest(distances: ArrayLike) -> Nearest:
    """Nearest neighbours both ways: argmin_q d[q, r] for each reference r, argmin_r d[q, r]
    for each query q. Ties go to the lowest index. ``distances``: ``(n_queries, n_references)``.
    """
    distances = _distance_matrix(distances)
    query_of_reference = np.argmin(distances, axis=0)
    reference_of_query = np.argmin(distances, axis=1)
    return Nearest(
        query_of_reference=query_of_reference,
        reference_distance=distances[query_of_reference, np.arange(distances.shape[1])],
        reference_of_query=reference_of_query,
        query_distance=distances[np.arange(distances.shape[0]), reference_of_query],
    )


class Matching(NamedTuple):
    """A one-to-one matching of min(n_queries, n_references) pairs, ordered by reference."""

    query_index: NDArray[np.int64]
    reference_index: NDArray[np.int64]
    distance: NDArray[np.float64]

    @property
    def total(self) -> float:
        """Σ distance over the matched pairs."""
        return float(np.sum(self.distance))


def _distance_matrix(distances: ArrayLike) -> NDArray[np.float64]:
    distances = np.asarray(distances, dtype=np.float64)
    if distances.ndim != 2 or 0 in distances.shape:
        raise DataError(f"expected a non-empty distance matrix (n_queries, n_references), got {distances.shape}")
    if np.isnan(distances).any():
        raise DataError("distance matrix contains NaN")
    return distances


def _matching(distances: NDArray[np.float64], queries, references) -> Matching:
    order = np.argsort(references, kind="stable")
    queries, references = np.asarray(queries, np.int64)[order], np.asarray(references, np.int64)[order]
    return Matching(queries, references, distances[queries, references])


def match_greedy(distances: ArrayLike) -> Matching:
    """Greedy one-to-one matching: repeatedly take the smallest remaining d[q, r], then remove
    row q and column r, until min(n_queries, n_references) pairs are matched. Ties go to the
    first entry in row-major order. ``distances``: ``(n_queries, n_references)``.

    Greedy is not optimal: for d = [[1, 2], [2, 100]] it takes (0,0) then (1,1), total 101,
    where (0,1), (1,0) costs 4 (:func:`match_hungarian`).
    """
    distances = _distance_matrix(distances)
    n_pairs = min(distances.shape)
    used_queries = np.zeros(distances.shape[0], bool)
    used_references = np.zeros(distances.shape[1], bool)
    queries, references = [], []
    for flat in np.argsort(distances, axis=None, kind="stable"):
        q, r = divmod(int(flat), distances.shape[1])
        if used_queries[q] or used_references[r]:
            continue
        used_queries[q] = used_references[r] = True
        queries.append(q)
        references.append(r)
        if len(queries) == n_pairs:
            break
    return _matching(distances, queries, references)


def match_hungarian(distances: ArrayLike) -> Matching:
    """Optimal one-to-one matching: the min(n_queries, n_references) pairs minimising
    Σ d[q, r] (``scipy.optimize.linear_sum_assignment``). ``distances``: ``(n_queries, n_references)``.
    """
    distances = _distance_matrix(distances)
    if np.isinf(distances).any():
        raise DataError("Hungarian matching needs finite distances")
    queries, references = linear_sum_assignment(distances)
    return _matching(distances, queries, references)
