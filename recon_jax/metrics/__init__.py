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
no evidence of membership. :func:`membership_auc` / :func:`nearest_is_train_rate` reduce it
to numbers where 0.5 / the chance rate mean "no evidence", and
``recon_jax.evaluation.evaluate_reconstructions`` computes everything against both pools.

**Mapping to [0, 1].** Every place in the package that maps mean-subtracted images to
[0, 1] calls :func:`to_unit` with one of two named mappings (:data:`IMAGE_MAPPINGS`):
``"minmax"`` (add the mean, min-max scale each image: the protocol's, step 2) and
``"clip"`` (add the mean, clip to [0, 1]: leaves an image that is already in [0, 1], such
as a training image, unchanged). The protocol's figures (SSIM, PSNR, good counts) use
``"minmax"``; which mapping every other figure uses is stated where it is reported.

Two kinds of function live here. Per-pair image metrics (:func:`to_unit`, :func:`ssim`,
:func:`psnr`, :func:`mse`, :func:`parameter_mismatch`) are jax functions: they broadcast over
leading axes, and jit, vmap and run on an accelerator. Set-level statistics (distance
matrices, matching, AUC) are host-side numpy/scipy in float64, since they end in argmins,
sorts and combinatorial assignment. Images are float NHWC throughout.

The package, one idea per module:

- :mod:`~recon_jax.metrics.images`: the mapping to [0, 1], MSE, PSNR, SSIM;
- :mod:`~recon_jax.metrics.parameters`: the parameter mismatch ‖θ − θ*‖² / ‖θ*‖²;
- :mod:`~recon_jax.metrics.neighbours`: NCC distances, nearest neighbours, matching;
- :mod:`~recon_jax.metrics.membership`: membership AUC and the nearest-is-train rate.

Nothing here imports the attacks (``recon_jax.bilevel``, jaxopt).
"""

from __future__ import annotations

from recon_jax.metrics.images import (
    GOOD_SSIM,
    IMAGE_MAPPINGS,
    PROTOCOL_MAPPING,
    SSIM_SIGMA,
    check_mapping,
    dssim,
    gaussian_window,
    mse,
    psnr,
    ssim,
    ssim_map,
    ssim_matrix,
    to_unit,
    to_unit_range,
)
from recon_jax.metrics.membership import NearestIsTrain, membership_auc, nearest_is_train_rate
from recon_jax.metrics.neighbours import (
    Matching,
    Nearest,
    downsample_half_bicubic,
    match_greedy,
    match_hungarian,
    ncc_distances,
    nearest,
    standardise_channels,
)
from recon_jax.metrics.parameters import parameter_mismatch

__all__ = [
    "GOOD_SSIM",
    "IMAGE_MAPPINGS",
    "PROTOCOL_MAPPING",
    "SSIM_SIGMA",
    "Matching",
    "Nearest",
    "NearestIsTrain",
    "check_mapping",
    "downsample_half_bicubic",
    "dssim",
    "gaussian_window",
    "match_greedy",
    "match_hungarian",
    "membership_auc",
    "mse",
    "ncc_distances",
    "nearest",
    "nearest_is_train_rate",
    "parameter_mismatch",
    "psnr",
    "ssim",
    "ssim_map",
    "ssim_matrix",
    "standardise_channels",
    "to_unit",
    "to_unit_range",
]
