"""How reconstructions are judged: the reference protocol (Haim et al. 2022) plus membership ambiguity.

The reference protocol of Haim et al. (2022), as their evaluation code runs it:

1. For each training image find the nearest reconstruction by normalised cross-correlation
   (NCC): both images bicubically downsampled ×½, each standardised per channel, then the
   L2 distance (:func:`ncc_distances`, :func:`nearest`). Both sides are mean-subtracted
   arrays, as the attack sees them.
2. Add the training mean back to the reconstruction and min-max scale it to [0, 1]
   (:func:`to_unit` with ``mapping="minmax"``, the :data:`PROTOCOL_MAPPING`).
3. SSIM with kornia's 3×3 Gaussian window, averaged over pixels and channels (:func:`ssim`);
   DSSIM = (1 − SSIM)/2 (:func:`dssim`).
4. Count reconstructions with SSIM > 0.4 as "good"; plot per-image SSIM sorted.
5. Later work: one-to-one matching (:func:`match_greedy`, :func:`match_hungarian`) with
   SSIM, PSNR (:func:`psnr`) and MSE (:func:`mse`).

Runkel et al.'s question needs the same statistics against a **held-out pool** from the same
distribution: a reconstruction as close to some held-out image as to any training image is
no evidence of membership. :func:`evaluate_reconstructions` computes everything against both
pools, and :func:`membership_auc` / :func:`nearest_is_train_rate` reduce it to numbers where
0.5 / the chance rate mean "no evidence".

**Mapping to [0, 1].** Every place in the package that maps mean-subtracted images to
[0, 1] calls :func:`to_unit` with one of two named mappings (:data:`IMAGE_MAPPINGS`):
``"minmax"`` (add the mean, min-max scale each image: the protocol's, step 2) and
``"clip"`` (add the mean, clip to [0, 1]: leaves an image that is already in [0, 1], such
as a training image, unchanged). The protocol's figures (SSIM, PSNR, good counts) use
``"minmax"``; which mapping every other figure uses is stated where it is reported.

Two kinds of function live here. Per-pair image metrics (:func:`to_unit`, :func:`ssim`,
:func:`psnr`, :func:`mse`, :func:`parameter_mismatch`) are jax functions: they broadcast over
leading axes, and jit, vmap and run on an accelerator. Set-level statistics (distance
matrices, matching, AUC, clustering) are host-side numpy/scipy in float64, since they end in
argmins, sorts and combinatorial assignment. Images are float NHWC throughout.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import linear_sum_assignment

from recon_jax.bilevel import parameter_loss  # the bilevel outer loss is exactly this quantity
from scipy.stats import rankdata

from recon_jax.errors import ConfigError, DataError

GOOD_SSIM = 0.4
"""SSIM above which a reconstruction is commonly counted as "good" (Haim et al. 2022)."""

SSIM_SIGMA = 1.5
"""σ of kornia's SSIM Gaussian window (fixed in kornia, whatever the window size)."""

_IMAGE_AXES = (-3, -2, -1)


# ---------------------------------------------------------------------------------------
# Per-pair image metrics (jax)
# ---------------------------------------------------------------------------------------


IMAGE_MAPPINGS = {
    "minmax": "add the training mean, then min-max scale each image to [0,1] (the evaluation protocol of "
              "Haim et al. 2022 and Buzaglo et al. 2023)",
    "clip": "add the training mean, then clip to [0,1]",
}
"""The two ways :func:`to_unit` maps mean-subtracted images to [0, 1], by name."""

PROTOCOL_MAPPING = "minmax"
"""The mapping under which the protocol scores reconstructions (SSIM, PSNR, MSE, good counts)."""


def check_mapping(mapping: str) -> str:
    """``mapping`` if it names one of :data:`IMAGE_MAPPINGS`, else ConfigError."""
    if mapping not in IMAGE_MAPPINGS:
        raise ConfigError(f"unknown image mapping {mapping!r}; choose one of {', '.join(IMAGE_MAPPINGS)}")
    return mapping


def to_unit(centered: ArrayLike, mean: ArrayLike | None, mapping: str) -> jax.Array:
    """Map mean-subtracted images to [0, 1]: the one implementation of both mappings.

    With v = x + μ (the training mean added back):

    - ``"minmax"`` (:data:`PROTOCOL_MAPPING`): u = (v − min v) / (max v − min v), with min
      and max over each image's pixels and channels together (one affine map per image, as
      Haim et al.'s ``transform_vmin_vmax_batch``). A constant image, whose range is 0, maps
      to all zeros instead of 0/0. Invariant to a per-image affine map of v (a > 0), so it
      scores shape, not brightness or contrast, and it changes an image in [0, 1] that does
      not reach both 0 and 1.
    - ``"clip"``: u = min(max(v, 0), 1). An image already in [0, 1] is unchanged; values
      outside are cut off.

    Args:
      centered: mean-subtracted images ``(..., n, h, w, c)``, e.g. ``(K, n, h, w, c)``.
      mean: the training mean ``(1, h, w, c)`` (or anything broadcastable), or None for 0.
      mapping: ``"minmax"`` or ``"clip"`` (:data:`IMAGE_MAPPINGS`).

    Returns:
      ``(..., n, h, w, c)`` in [0, 1], in the dtype of ``centered`` (float32 without x64).
    """
    check_mapping(mapping)
    images = jnp.asarray(centered)
    if mean is not None:
        images = images + jnp.asarray(mean, dtype=images.dtype)
    if mapping == "clip":
        return jnp.clip(images, 0, 1)
    low = jnp.min(images, axis=_IMAGE_AXES, keepdims=True)
    span = jnp.max(images, axis=_IMAGE_AXES, keepdims=True) - low
    return (images - low) / jnp.where(span > 0, span, 1)


def to_unit_range(centered: ArrayLike, mean: ArrayLike | None) -> jax.Array:
    """The protocol's mapping: ``to_unit(centered, mean, "minmax")`` (kept for callers by this name)."""
    return to_unit(centered, mean, PROTOCOL_MAPPING)


def mse(a: ArrayLike, b: ArrayLike) -> jax.Array:
    """Mean squared error per image pair: MSE = (1/hwc) Σ (a − b)².

    ``a``, ``b``: ``(..., h, w, c)``, broadcast over the leading axes -> ``(...)``.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    return jnp.mean((a - b) ** 2, axis=_IMAGE_AXES)


def psnr(a: ArrayLike, b: ArrayLike, max_val: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio per image pair: PSNR = 10 log₁₀(L² / MSE), L = ``max_val``.

    ``a``, ``b``: ``(..., h, w, c)`` with data range L (1 for [0, 1] images) -> ``(...)``,
    in dB; +inf for identical images.
    """
    return 10.0 * jnp.log10(max_val**2 / mse(a, b))


def gaussian_window(window: int, sigma: float = SSIM_SIGMA) -> NDArray[np.float64]:
    """kornia's normalised 1-D Gaussian: g_k ∝ exp(−(k − ⌊s/2⌋)² / 2σ²), k = 0..s−1, Σ g = 1.

    For s = 3, σ = 1.5: g = (e, 1, e) / (1 + 2e), e = exp(−1/4.5) ≈ 0.800737, i.e.
    (0.307801, 0.384397, 0.307801). The SSIM window is the outer product g gᵀ.
    """
    if window < 1 or window % 2 == 0:
        # kornia shifts even windows by half a pixel and pads them asymmetrically; the
        # protocol uses 3, so we support odd sizes only rather than half-match kornia.
        raise ConfigError(f"SSIM window must be an odd positive size, got {window}")
    offsets = np.arange(window) - window // 2
    weights = np.exp(-(offsets**2) / (2.0 * sigma**2))
    return weights / weights.sum()


def _blur(images: jax.Array, weights: NDArray[np.float64]) -> jax.Array:
    """Separable Gaussian filter with reflect padding over the (h, w) axes of ``(..., h, w, c)``.

    "Reflect" mirrors about the edge pixel without repeating it (… x₂ x₁ | x₀ x₁ x₂ …), as
    ``torch.nn.functional.pad(mode='reflect')``, which is kornia's ``filter2d`` default.
    """
    radius = len(weights) // 2
    for axis in (images.ndim - 3, images.ndim - 2):
        size = images.shape[axis]
        pad = [(0, 0)] * images.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(images, pad, mode="reflect")
        images = sum(
            float(w) * jax.lax.slice_in_dim(padded, k, k + size, axis=axis) for k, w in enumerate(weights)
        )
    return images


def _ssim_from_moments(mu_a, mu_b, mean_a2, mean_b2, mean_ab, max_val, eps):
    """The SSIM map from local moments: kornia's formula, including its ``eps``."""
    c1 = (0.01 * max_val) ** 2
    c2 = (0.03 * max_val) ** 2
    var_a = mean_a2 - mu_a**2
    var_b = mean_b2 - mu_b**2
    cov_ab = mean_ab - mu_a * mu_b
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)
    denominator = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return numerator / (denominator + eps)


def _check_ssim_shape(shape: tuple[int, ...], window: int) -> None:
    if len(shape) < 3:
        raise DataError(f"SSIM needs images (..., h, w, c), got shape {shape}")
    h, w = shape[-3], shape[-2]
    if min(h, w) <= window // 2:
        raise DataError(f"reflect padding for a {window}x{window} window needs h, w > {window // 2}, got {h}x{w}")


@partial(jax.jit, static_argnames=("window", "max_val", "eps"))
def ssim_map(a: ArrayLike, b: ArrayLike, window: int = 3, max_val: float = 1.0, eps: float = 1e-12) -> jax.Array:
    """Per-pixel SSIM, as ``kornia.metrics.ssim(img1, img2, window_size)`` returns it.

        SSIM(a, b) = (2 μ_a μ_b + C₁)(2 σ_ab + C₂) / [(μ_a² + μ_b² + C₁)(σ_a² + σ_b² + C₂) + ε]

    with μ = G∗x, σ_a² = G∗a² − μ_a², σ_ab = G∗(ab) − μ_a μ_b, G the ``window``×``window``
    Gaussian (σ = 1.5, :func:`gaussian_window`) applied per channel with reflect padding
    ("same" output size), C₁ = (0.01 L)², C₂ = (0.03 L)², L = ``max_val``, ε = ``eps``.

    ``a``, ``b``: ``(..., h, w, c)``, broadcast over leading axes -> ``(..., h, w, c)``.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    dtype = jnp.result_type(a, b, jnp.float32)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    _check_ssim_shape(shape, window)
    a = jnp.broadcast_to(a.astype(dtype), shape)
    b = jnp.broadcast_to(b.astype(dtype), shape)
    weights = gaussian_window(window)
    return _ssim_from_moments(
        _blur(a, weights), _blur(b, weights), _blur(a * a, weights), _blur(b * b, weights), _blur(a * b, weights),
        max_val, eps)


def ssim(a: ArrayLike, b: ArrayLike, window: int = 3, max_val: float = 1.0, eps: float = 1e-12) -> jax.Array:
    """SSIM per image pair: the mean of :func:`ssim_map` over pixels and channels.

    This is Haim et al.'s ``kornia.metrics.ssim(x, y, window_size=3)`` followed by a mean
    over (c, h, w). ``a``, ``b``: ``(..., h, w, c)`` in [0, 1] (range L = ``max_val``),
    broadcast over leading axes -> ``(...)``; identical images give 1 (up to ε).
    """
    return jnp.mean(ssim_map(a, b, window, max_val, eps), axis=_IMAGE_AXES)


def dssim(a: ArrayLike, b: ArrayLike, window: int = 3, max_val: float = 1.0, eps: float = 1e-12) -> jax.Array:
    """Structural dissimilarity DSSIM = (1 − SSIM)/2 per image pair; shapes as :func:`ssim`."""
    return (1.0 - ssim(a, b, window, max_val, eps)) / 2.0


@partial(jax.jit, static_argnames=("window", "max_val", "eps"))
def _ssim_block(queries, references, window, max_val, eps):
    """SSIM of every query with every reference: (nq, h, w, c), (nr, h, w, c) -> (nq, nr)."""
    weights = gaussian_window(window)
    mu_q, mu_r = _blur(queries, weights), _blur(references, weights)
    mean_q2, mean_r2 = _blur(queries**2, weights), _blur(references**2, weights)
    mean_qr = _blur(queries[:, None] * references[None], weights)
    ssim_maps = _ssim_from_moments(mu_q[:, None], mu_r[None], mean_q2[:, None], mean_r2[None], mean_qr, max_val, eps)
    return jnp.mean(ssim_maps, axis=_IMAGE_AXES)


def ssim_matrix(
    queries: ArrayLike,
    references: ArrayLike,
    window: int = 3,
    max_val: float = 1.0,
    eps: float = 1e-12,
    max_block_elements: int = 2**24,
) -> NDArray[np.float64]:
    """SSIM of every query with every reference, S_qr = SSIM(queries[q], references[r]).

    ``queries`` ``(nq, h, w, c)``, ``references`` ``(nr, h, w, c)`` -> ``(nq, nr)`` numpy.
    Computed in blocks of references so that a block's ``nq·block·h·w·c`` pairwise products
    stay under ``max_block_elements``; the last block is padded to the block size, so one
    compilation serves all blocks.
    """
    queries, references = jnp.asarray(queries), jnp.asarray(references)
    dtype = jnp.result_type(queries, references, jnp.float32)
    queries, references = queries.astype(dtype), references.astype(dtype)
    _check_ssim_shape(queries.shape, window)
    if queries.shape[1:] != references.shape[1:]:
        raise DataError(f"query images {queries.shape[1:]} and reference images {references.shape[1:]} differ")
    n_queries, n_refs = queries.shape[0], references.shape[0]
    if n_queries == 0 or n_refs == 0:
        return np.zeros((n_queries, n_refs))
    per_reference = n_queries * math.prod(queries.shape[1:])
    block = int(max(1, min(n_refs, max_block_elements // max(per_reference, 1))))
    columns = []
    for start in range(0, n_refs, block):
        chunk = references[start:start + block]
        n_valid = chunk.shape[0]
        if n_valid < block:
            chunk = jnp.concatenate([chunk, jnp.zeros((block - n_valid, *chunk.shape[1:]), chunk.dtype)])
        columns.append(np.asarray(_ssim_block(queries, chunk, window, max_val, eps))[:, :n_valid])
    return np.concatenate(columns, axis=1)


def parameter_mismatch(params: Any, victim_params: Any) -> jax.Array:
    """The achieved parameter mismatch ‖θ − θ*‖² / ‖θ*‖², summed over all leaves of the pytrees.

    ``params`` and ``victim_params`` must have the same pytree structure and leaf shapes.
    Returns a scalar; 0 exactly when θ = θ*.
    """
    as_arrays = lambda tree: jax.tree.map(jnp.asarray, tree)
    return parameter_loss("l2", as_arrays(params), as_arrays(victim_params))


# ---------------------------------------------------------------------------------------
# Nearest neighbours by normalised cross-correlation (numpy, float64)
# ---------------------------------------------------------------------------------------

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


def _features(images: ArrayLike, downsample: bool, standardise: bool) -> NDArray[np.float64]:
    """The vectors NCC compares: ``(n, h, w, c)`` -> ``(n, D)``."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4:
        raise DataError(f"expected images (n, h, w, c), got shape {images.shape}")
    if downsample:
        images = downsample_half_bicubic(images)
    if standardise:
        images = standardise_channels(images)
    return images.reshape(images.shape[0], -1)


def _mean_squared_distances(queries: NDArray[np.float64], references: NDArray[np.float64]) -> NDArray[np.float64]:
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
    return _mean_squared_distances(
        _features(queries, downsample, standardise), _features(references, downsample, standardise))


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


# ---------------------------------------------------------------------------------------
# Membership ambiguity
# ---------------------------------------------------------------------------------------


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


def _nearest_is_train(train_distances: NDArray[np.float64], heldout_distances: NDArray[np.float64]) -> NDArray[np.float64]:
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
    queries = _pool_reconstructions(reconstructions)
    train_images = np.asarray(train_images, np.float64)
    heldout_images = np.asarray(heldout_images, np.float64)
    if mean is not None:
        train_images = train_images - np.asarray(mean, np.float64)
        heldout_images = heldout_images - np.asarray(mean, np.float64)
    features = _features(queries, downsample, standardise)
    per_reconstruction = _nearest_is_train(
        _mean_squared_distances(features, _features(train_images, downsample, standardise)),
        _mean_squared_distances(features, _features(heldout_images, downsample, standardise)))
    n_train, n_heldout = len(train_images), len(heldout_images)
    return NearestIsTrain(float(per_reconstruction.mean()), n_train / (n_train + n_heldout), per_reconstruction)


# ---------------------------------------------------------------------------------------
# The full evaluation
# ---------------------------------------------------------------------------------------


def _pool_reconstructions(reconstructions: ArrayLike) -> NDArray[np.float64]:
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


def evaluate_reconstructions(
    reconstructions: ArrayLike,
    train_images: ArrayLike,
    heldout_images: ArrayLike,
    mean: ArrayLike | None,
    *,
    good_threshold: float = GOOD_SSIM,
    downsample: bool = True,
    standardise: bool = True,
    window: int = 3,
    best_ssim: bool = True,
    mapping: str = PROTOCOL_MAPPING,
) -> dict[str, Any]:
    """The reference protocol against the training set AND the held-out pool, plus membership.

    For each pool P ∈ {train, heldout} (prefix ``"{P}_"``), with D = :func:`ncc_distances`
    between the reconstructions and P − mean (both in the attack's mean-subtracted space),
    and u = :func:`to_unit` of the reconstructions under ``mapping`` (the protocol's
    ``"minmax"`` unless asked otherwise; returned as ``image_mapping``):

    - ``nearest_reconstruction`` (n_P,): k*(p) = argmin_k D[k, p]; ``nearest_distance`` (n_P,).
    - ``ssim``, ``dssim``, ``psnr``, ``mse`` (n_P,): of the pair (u[k*(p)], P[p]).
    - ``good_count``: #{p : ssim > good_threshold}; ``mean_ssim``, ``median_ssim``.
    - ``ssim_sorted`` (n_P,): ``ssim`` sorted descending (the per-image SSIM curve).
    - ``hungarian_reconstruction``, ``hungarian_image`` (min(m, n_P),): the optimal one-to-one
      matching under D (:func:`match_hungarian`), ordered by image; ``hungarian_distance``, ``hungarian_ssim``,
      ``hungarian_psnr``, ``hungarian_mse``, ``hungarian_ssim_sorted``,
      ``hungarian_good_count``, ``hungarian_mean_ssim``.
    - ``best_ssim`` (n_P,), if ``best_ssim``: max_k SSIM(u[k], P[p]) over all reconstructions.

    Membership (no prefix):

    - ``membership_auc_distance``: :func:`membership_auc` of −``nearest_distance`` (train vs
      held-out); ``membership_auc_nearest_ssim``: of ``ssim``;
      ``membership_auc_best_ssim``: of ``best_ssim`` (if computed). 0.5 = no evidence.
    - ``nearest_is_train_rate``, ``nearest_is_train_chance``: :func:`nearest_is_train_rate`.
    - ``heldout_max_ssim``: max_p ``heldout_ssim``, the best SSIM the same protocol gives a
      held-out image, i.e. what a reconstruction reaches without membership;
      ``train_above_heldout_count``: #{training images with ``train_ssim`` above it}. On MNIST,
      where a near-blank candidate scores SSIM > 0.4 against most digits (3×3 SSIM of flat
      black backgrounds), this count, not ``train_good_count``, is the evidence of recovery.

    Also ``n_reconstructions``, ``n_train``, ``n_heldout``, ``good_threshold``, ``image_mapping``. Arrays are
    numpy, scalars Python numbers, so the dict saves directly to ``.npz`` / ``.json``.

    Args:
      reconstructions: mean-subtracted, ``(m, h, w, c)`` or ``(K, n, h, w, c)`` from K
        initialisations (pooled to m = K·n).
      train_images, heldout_images: ``(n_t, h, w, c)``, ``(n_h, h, w, c)`` in [0, 1].
      mean: the training mean ``(1, h, w, c)`` that was subtracted; None for none.
      good_threshold: SSIM above which a reconstruction counts as good (0.4).
      downsample, standardise: NCC options (``False, False`` = plain L2, e.g. for MNIST).
      window: SSIM window (3).
      best_ssim: also compute SSIM of every reconstruction with every image (m·(n_t + n_h)
        SSIMs; cheap on an accelerator, the slowest part on a CPU).
      mapping: how reconstructions are mapped to [0, 1] before SSIM, PSNR and MSE
        (:func:`to_unit`); the protocol's is ``"minmax"``.
    """
    centered = _pool_reconstructions(reconstructions)
    mean_array = np.zeros((1, *centered.shape[1:])) if mean is None else np.asarray(mean, np.float64)
    unit = np.asarray(to_unit(centered, mean_array, mapping))
    features = _features(centered, downsample, standardise)
    pools = {"train": np.asarray(train_images, np.float64), "heldout": np.asarray(heldout_images, np.float64)}
    out: dict[str, Any] = {
        "n_reconstructions": len(centered),
        "n_train": len(pools["train"]),
        "n_heldout": len(pools["heldout"]),
        "good_threshold": float(good_threshold),
        "image_mapping": mapping,
    }
    distances = {}
    for name, images in pools.items():
        if images.ndim != 4 or images.shape[1:] != centered.shape[1:] or len(images) == 0:
            raise DataError(
                f"{name} images must be a non-empty (n, h, w, c) set shaped like the reconstructions "
                f"{centered.shape[1:]}, got {images.shape}")
        if not np.isfinite(images).all():
            raise DataError(f"{name} images contain NaN or inf")
        distances[name] = d = _mean_squared_distances(features, _features(images - mean_array, downsample, standardise))
        neighbours = nearest(d)
        paired = unit[neighbours.query_of_reference]
        pair_ssim = np.asarray(ssim(paired, images, window))
        out |= {
            f"{name}_nearest_reconstruction": neighbours.query_of_reference,
            f"{name}_nearest_distance": neighbours.reference_distance,
            f"{name}_ssim": pair_ssim,
            f"{name}_dssim": (1.0 - pair_ssim) / 2.0,
            f"{name}_psnr": np.asarray(psnr(paired, images)),
            f"{name}_mse": np.asarray(mse(paired, images)),
            f"{name}_good_count": int(np.sum(pair_ssim > good_threshold)),
            f"{name}_mean_ssim": float(np.mean(pair_ssim)),
            f"{name}_median_ssim": float(np.median(pair_ssim)),
            f"{name}_ssim_sorted": np.sort(pair_ssim)[::-1],
        }
        matching = match_hungarian(d)
        matched_recs, matched_images = unit[matching.query_index], images[matching.reference_index]
        matched_ssim = np.asarray(ssim(matched_recs, matched_images, window))
        out |= {
            f"{name}_hungarian_reconstruction": matching.query_index,
            f"{name}_hungarian_image": matching.reference_index,
            f"{name}_hungarian_distance": matching.distance,
            f"{name}_hungarian_ssim": matched_ssim,
            f"{name}_hungarian_psnr": np.asarray(psnr(matched_recs, matched_images)),
            f"{name}_hungarian_mse": np.asarray(mse(matched_recs, matched_images)),
            f"{name}_hungarian_good_count": int(np.sum(matched_ssim > good_threshold)),
            f"{name}_hungarian_mean_ssim": float(np.mean(matched_ssim)),
            f"{name}_hungarian_ssim_sorted": np.sort(matched_ssim)[::-1],
        }
        if best_ssim:
            out[f"{name}_best_ssim"] = ssim_matrix(unit, images, window).max(axis=0)
    out["membership_auc_distance"] = membership_auc(-out["train_nearest_distance"], -out["heldout_nearest_distance"])
    out["membership_auc_nearest_ssim"] = membership_auc(out["train_ssim"], out["heldout_ssim"])
    if best_ssim:
        out["membership_auc_best_ssim"] = membership_auc(out["train_best_ssim"], out["heldout_best_ssim"])
    out["heldout_max_ssim"] = float(np.max(out["heldout_ssim"]))
    out["train_above_heldout_count"] = int(np.sum(out["train_ssim"] > out["heldout_max_ssim"]))
    per_reconstruction = _nearest_is_train(distances["train"], distances["heldout"])
    out["nearest_is_train_rate"] = float(per_reconstruction.mean())
    out["nearest_is_train_chance"] = out["n_train"] / (out["n_train"] + out["n_heldout"])
    return out


# ---------------------------------------------------------------------------------------
# Distinct minima
# ---------------------------------------------------------------------------------------


class DistinctMinima(NamedTuple):
    count: int
    """How many pairwise-distinct reconstructions there are among the near-best runs."""
    candidates: NDArray[np.int64]
    """Run indices with objective ≤ best + objective_tol, best objective first."""
    representatives: NDArray[np.int64]
    """The run index of each distinct minimum (``count`` of them), in candidate order."""
    assignment: NDArray[np.int64]
    """``(len(candidates),)``: for each candidate, the run index of its representative."""
    distances: NDArray[np.float64]
    """``(len(candidates), len(candidates))``: the set distance between candidate runs."""


def distinct_minima(
    images: ArrayLike,
    objective_values: ArrayLike,
    objective_tol: float,
    distance_threshold: float,
    *,
    metric: str = "ncc",
    downsample: bool = False,
    match: bool = True,
) -> DistinctMinima:
    """Count distinct local minima among near-best reconstructions from K initialisations.

    Definition. Runs whose objective is within ``objective_tol`` of the best,
    f_k ≤ min_j f_j + tol (NaN objectives excluded), are the candidates: they reach
    (numerically) equally good minima. The distance between two candidate runs k, l, each a
    set of n images, is

        Δ(k, l) = min_π (1/n) Σ_i d(x_{k,i}, x_{l,π(i)})     (``match=True``)
        Δ(k, l) = (1/n) Σ_i d(x_{k,i}, x_{l,i})               (``match=False``)

    with d the per-image distance of :func:`ncc_distances` (``metric="ncc"``: 2(1 − ρ̄), in
    [0, 4]; ``metric="l2"``: mean squared pixel difference). Matching over permutations π
    (Hungarian) is the default because the objectives are invariant to permuting candidate
    images that share a label, so a permuted copy of the same set is the same minimum.
    Greedy clustering then walks the candidates from the best objective down; a candidate
    whose Δ to every representative so far exceeds ``distance_threshold`` becomes a new
    representative, otherwise it joins its closest representative. ``count`` is the number
    of representatives.

    Args:
      images: ``(K, n, h, w, c)`` reconstructions (mean-subtracted or not: NCC does not mind).
      objective_values: ``(K,)`` final objective of each run (lower is better).
    """
    images = np.asarray(images, dtype=np.float64)
    objective_values = np.asarray(objective_values, dtype=np.float64).ravel()
    if images.ndim != 5 or images.shape[0] != objective_values.shape[0]:
        raise DataError(
            f"expected images (K, n, h, w, c) and objective_values (K,), got {images.shape} and {objective_values.shape}")
    if metric not in ("ncc", "l2"):
        raise ConfigError(f"unknown metric {metric!r}; choose 'ncc' or 'l2'")
    finite = ~np.isnan(objective_values)
    if not finite.any():
        raise DataError("every objective value is NaN")
    best = np.min(objective_values[finite])
    within = finite & (objective_values <= best + objective_tol)
    candidates = np.flatnonzero(within)
    candidates = candidates[np.argsort(objective_values[candidates], kind="stable")]
    n_images = images.shape[1]
    features = _features(images[candidates].reshape(-1, *images.shape[2:]), downsample, metric == "ncc")
    features = features.reshape(len(candidates), n_images, -1)
    set_distances = np.zeros((len(candidates), len(candidates)))
    for a in range(len(candidates)):
        for b in range(a + 1, len(candidates)):
            per_image = _mean_squared_distances(features[a], features[b])
            if match:
                rows, cols = linear_sum_assignment(per_image)
                value = per_image[rows, cols].mean()
            else:
                value = np.trace(per_image) / n_images
            set_distances[a, b] = set_distances[b, a] = value
    representatives: list[int] = []  # positions in `candidates`
    assignment = np.empty(len(candidates), np.int64)
    for position in range(len(candidates)):
        if representatives:
            gaps = set_distances[position, representatives]
            closest = int(np.argmin(gaps))
            if gaps[closest] <= distance_threshold:
                assignment[position] = candidates[representatives[closest]]
                continue
        representatives.append(position)
        assignment[position] = candidates[position]
    return DistinctMinima(
        count=len(representatives),
        candidates=candidates,
        representatives=candidates[representatives],
        assignment=assignment,
        distances=set_distances,
    )
