"""Per-pair image metrics, in jax: the mapping of mean-subtracted images to [0, 1]
(:func:`to_unit`, the protocol's "minmax" and "clip"), MSE, PSNR, and SSIM with kornia's
3×3 Gaussian window as Haim et al. (2022) use it (:func:`ssim`, :func:`ssim_map`,
:func:`dssim`, and :func:`ssim_matrix` for every query against every reference).

They broadcast over leading axes of ``(..., h, w, c)`` images, and jit, vmap and run on an
accelerator.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike, NDArray

from recon_jax.errors import ConfigError, DataError

GOOD_SSIM = 0.4
"""SSIM above which a reconstruction is commonly counted as "good" (Haim et al. 2022)."""

SSIM_SIGMA = 1.5
"""σ of kornia's SSIM Gaussian window (fixed in kornia, whatever the window size)."""

_IMAGE_AXES = (-3, -2, -1)


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
