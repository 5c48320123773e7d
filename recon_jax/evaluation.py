"""Judging reconstructions: the reference protocol against the training set AND the held-out pool.

    evaluate_reconstructions(reconstructions, train, heldout, mean) -> dict of arrays and numbers
    evaluate_run(run_dir) -> summary dict; writes run_dir/evaluation.json and evaluation.npz

``evaluate_reconstructions`` runs the protocol on arrays, with the metrics of
``recon_jax.metrics``. ``evaluate_run`` pools the candidates of all runs in a run folder
(or ``pooled.npz``), and reports, against both pools, good counts (SSIM > 0.4 after NCC
nearest-neighbour search, Haim et al. 2022), Hungarian one-to-one figures, and the
membership statistics of ``recon_jax.metrics``: a training image that is
"recovered" no better than held-out images of the same classes is no evidence of membership.
Per run, it also reports the good counts and the reference's extraction score (the mean
DSSIM of the 10 best-matched training images; lower is better). ``pool_by_score=P`` ranks
the runs by that score, writes the best P runs' candidates to ``pooled_by_score.npz`` and
judges that pool too, as the reference pools its sweeps. The score reads the training set:
it is an oracle an attacker does not have (``recon-jax sweep`` ranks by final loss instead),
which is why the pool is judged against the held-out pool as well. Every SSIM, PSNR and
good count is of the candidates under the protocol's mapping to [0,1]
(``metrics.PROTOCOL_MAPPING``, "minmax": training mean added back, each image min-max
scaled; recorded as ``image_mapping`` in evaluation.json). This is the only place,
with ``recon_jax.reconstruct``'s oracle initialisations, that reads the victim's ground truth.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from recon_jax import metrics
from recon_jax.artifacts import atomic_save_npz, atomic_write_json, read_json
from recon_jax.checkpoint import load_ground_truth
from recon_jax.errors import ConfigError, DataError
from recon_jax.metrics.membership import nearest_is_train, pool_reconstructions
from recon_jax.metrics.neighbours import mean_squared_distances, ncc_features

SUMMARY_KEYS = ("n_reconstructions", "n_train", "n_heldout", "good_threshold", "image_mapping",
                "train_good_count", "heldout_good_count", "train_mean_ssim", "heldout_mean_ssim",
                "train_hungarian_good_count", "heldout_hungarian_good_count",
                "membership_auc_distance", "membership_auc_nearest_ssim", "membership_auc_best_ssim",
                "nearest_is_train_rate", "nearest_is_train_chance", "heldout_max_ssim", "train_above_heldout_count")


EXTRACTION_SCORE_IMAGES = 10  # the reference's ``get_evaluation_score_dssim``: mean DSSIM of the 10 best


def extraction_score(train_dssim: np.ndarray, n_best: int = EXTRACTION_SCORE_IMAGES) -> float:
    """The reference's extraction score: the mean of the ``n_best`` smallest DSSIMs of the
    nearest-candidate pairs (n_train,) (all of them when there are fewer). Lower is better."""
    values = np.sort(np.asarray(train_dssim, np.float64))
    return float(values[:n_best].mean())


def evaluate_reconstructions(
    reconstructions: ArrayLike,
    train_images: ArrayLike,
    heldout_images: ArrayLike,
    mean: ArrayLike | None,
    *,
    good_threshold: float = metrics.GOOD_SSIM,
    downsample: bool = True,
    standardise: bool = True,
    window: int = 3,
    best_ssim: bool = True,
    mapping: str = metrics.PROTOCOL_MAPPING,
) -> dict[str, Any]:
    """The reference protocol against the training set AND the held-out pool, plus membership.

    For each pool P ∈ {train, heldout} (prefix ``"{P}_"``), with D = ``metrics.ncc_distances``
    between the reconstructions and P − mean (both in the attack's mean-subtracted space),
    and u = ``metrics.to_unit`` of the reconstructions under ``mapping`` (the protocol's
    ``"minmax"`` unless asked otherwise; returned as ``image_mapping``):

    - ``nearest_reconstruction`` (n_P,): k*(p) = argmin_k D[k, p]; ``nearest_distance`` (n_P,).
    - ``ssim``, ``dssim``, ``psnr``, ``mse`` (n_P,): of the pair (u[k*(p)], P[p]).
    - ``good_count``: #{p : ssim > good_threshold}; ``mean_ssim``, ``median_ssim``.
    - ``ssim_sorted`` (n_P,): ``ssim`` sorted descending (the per-image SSIM curve).
    - ``hungarian_reconstruction``, ``hungarian_image`` (min(m, n_P),): the optimal one-to-one
      matching under D (``metrics.match_hungarian``), ordered by image; ``hungarian_distance``, ``hungarian_ssim``,
      ``hungarian_psnr``, ``hungarian_mse``, ``hungarian_ssim_sorted``,
      ``hungarian_good_count``, ``hungarian_mean_ssim``.
    - ``best_ssim`` (n_P,), if ``best_ssim``: max_k SSIM(u[k], P[p]) over all reconstructions.

    Membership (no prefix):

    - ``membership_auc_distance``: ``metrics.membership_auc`` of −``nearest_distance`` (train vs
      held-out); ``membership_auc_nearest_ssim``: of ``ssim``;
      ``membership_auc_best_ssim``: of ``best_ssim`` (if computed). 0.5 = no evidence.
    - ``nearest_is_train_rate``, ``nearest_is_train_chance``: ``metrics.nearest_is_train_rate``.
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
        (``metrics.to_unit``); the protocol's is ``"minmax"``.
    """
    centered = pool_reconstructions(reconstructions)
    mean_array = np.zeros((1, *centered.shape[1:])) if mean is None else np.asarray(mean, np.float64)
    unit = np.asarray(metrics.to_unit(centered, mean_array, mapping))
    features = ncc_features(centered, downsample, standardise)
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
        distances[name] = d = mean_squared_distances(features, ncc_features(images - mean_array, downsample, standardise))
        neighbours = metrics.nearest(d)
        paired = unit[neighbours.query_of_reference]
        pair_ssim = np.asarray(metrics.ssim(paired, images, window))
        out |= {
            f"{name}_nearest_reconstruction": neighbours.query_of_reference,
            f"{name}_nearest_distance": neighbours.reference_distance,
            f"{name}_ssim": pair_ssim,
            f"{name}_dssim": (1.0 - pair_ssim) / 2.0,
            f"{name}_psnr": np.asarray(metrics.psnr(paired, images)),
            f"{name}_mse": np.asarray(metrics.mse(paired, images)),
            f"{name}_good_count": int(np.sum(pair_ssim > good_threshold)),
            f"{name}_mean_ssim": float(np.mean(pair_ssim)),
            f"{name}_median_ssim": float(np.median(pair_ssim)),
            f"{name}_ssim_sorted": np.sort(pair_ssim)[::-1],
        }
        matching = metrics.match_hungarian(d)
        matched_recs, matched_images = unit[matching.query_index], images[matching.reference_index]
        matched_ssim = np.asarray(metrics.ssim(matched_recs, matched_images, window))
        out |= {
            f"{name}_hungarian_reconstruction": matching.query_index,
            f"{name}_hungarian_image": matching.reference_index,
            f"{name}_hungarian_distance": matching.distance,
            f"{name}_hungarian_ssim": matched_ssim,
            f"{name}_hungarian_psnr": np.asarray(metrics.psnr(matched_recs, matched_images)),
            f"{name}_hungarian_mse": np.asarray(metrics.mse(matched_recs, matched_images)),
            f"{name}_hungarian_good_count": int(np.sum(matched_ssim > good_threshold)),
            f"{name}_hungarian_mean_ssim": float(np.mean(matched_ssim)),
            f"{name}_hungarian_ssim_sorted": np.sort(matched_ssim)[::-1],
        }
        if best_ssim:
            out[f"{name}_best_ssim"] = metrics.ssim_matrix(unit, images, window).max(axis=0)
    out["membership_auc_distance"] = metrics.membership_auc(-out["train_nearest_distance"],
                                                            -out["heldout_nearest_distance"])
    out["membership_auc_nearest_ssim"] = metrics.membership_auc(out["train_ssim"], out["heldout_ssim"])
    if best_ssim:
        out["membership_auc_best_ssim"] = metrics.membership_auc(out["train_best_ssim"], out["heldout_best_ssim"])
    out["heldout_max_ssim"] = float(np.max(out["heldout_ssim"]))
    out["train_above_heldout_count"] = int(np.sum(out["train_ssim"] > out["heldout_max_ssim"]))
    per_reconstruction = nearest_is_train(distances["train"], distances["heldout"])
    out["nearest_is_train_rate"] = float(per_reconstruction.mean())
    out["nearest_is_train_chance"] = out["n_train"] / (out["n_train"] + out["n_heldout"])
    return out


def evaluate_run(run_dir: str | os.PathLike, *, victim_dir: str | os.PathLike | None = None, pooled: bool = False,
                 plain_l2: bool = False, good_threshold: float = metrics.GOOD_SSIM, best_ssim: bool = True,
                 per_run: bool = True, pool_by_score: int = 0) -> dict:
    """Evaluate ``run_dir`` (see module doc) and return the summary written to evaluation.json."""
    if pool_by_score < 0 or (pool_by_score and (pooled or not per_run)):
        raise ConfigError("pool_by_score needs a per-run evaluation of all runs (not --pooled) and P >= 1")
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise ConfigError(f"{run_dir} is not a finished run folder (no run.json); run `recon-jax reconstruct` first")
    run = read_json(run_dir / "run.json")
    victim_dir = Path(victim_dir or run["spec"]["victim"])
    truth = load_ground_truth(victim_dir)
    source = run_dir / ("pooled.npz" if pooled else "reconstructions.npz")
    if not source.is_file():
        raise ConfigError(f"{source} is missing" + ("; rerun with --pool P" if pooled else ""))
    with np.load(source, allow_pickle=False) as f:
        centered = f["centered"]
    diverged = np.asarray(run["diverged"], bool)
    run_index = np.flatnonzero(~diverged) if not pooled else None
    if not pooled and diverged.any():
        centered = centered[~diverged]  # a diverged run's candidates are frozen garbage, not evidence
    options = dict(good_threshold=good_threshold, downsample=not plain_l2, standardise=not plain_l2,
                   mapping=metrics.PROTOCOL_MAPPING)
    result = evaluate_reconstructions(centered, truth["train_images"], truth["heldout_images"], truth["mean"],
                                              best_ssim=best_ssim, **options)
    summary = {k: result[k] for k in SUMMARY_KEYS if k in result}
    summary.update(run=str(run_dir), victim=str(victim_dir), pooled=pooled, excluded_diverged_runs=int(diverged.sum())
                   if not pooled else 0, nearest_neighbours="plain L2" if plain_l2 else "NCC on x1/2 bicubic")
    if per_run and not pooled and centered.ndim == 5:
        counts = [evaluate_reconstructions(c, truth["train_images"], truth["heldout_images"], truth["mean"],
                                                   best_ssim=False, **options) for c in centered]
        summary["per_run_train_good_count"] = [c["train_good_count"] for c in counts]
        summary["per_run_heldout_good_count"] = [c["heldout_good_count"] for c in counts]
        summary["per_run_train_above_heldout_count"] = [c["train_above_heldout_count"] for c in counts]
        scores = np.asarray([extraction_score(c["train_dssim"]) for c in counts])
        summary["evaluated_runs"] = run_index.tolist()  # diverged runs are left out of every per_run list
        summary["per_run_extraction_score"] = scores.tolist()
        order = np.argsort(scores, kind="stable")
        summary["score_ranking"] = run_index[order].tolist()
        if pool_by_score:
            best = order[:pool_by_score]
            chosen = centered[best].reshape(-1, *centered.shape[2:])
            atomic_save_npz(run_dir / "pooled_by_score.npz", centered=chosen,
                            runs=np.repeat(run_index[best], centered.shape[1]))
            pooled_result = evaluate_reconstructions(chosen, truth["train_images"], truth["heldout_images"],
                                                             truth["mean"], best_ssim=False, **options)
            summary["pooled_by_score"] = {"runs": run_index[best].tolist(),
                                          **{k: pooled_result[k] for k in SUMMARY_KEYS if k in pooled_result}}
    atomic_save_npz(run_dir / "evaluation.npz", **{k: v for k, v in result.items() if isinstance(v, np.ndarray)})
    atomic_write_json(run_dir / "evaluation.json", summary)
    return summary
