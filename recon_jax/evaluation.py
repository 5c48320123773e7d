"""Judging a run folder: the reference protocol against the training set AND the held-out pool.

    evaluate_run(run_dir) -> summary dict; writes run_dir/evaluation.json and evaluation.npz

It pools the candidates of all runs (or ``pooled.npz``), and reports, against both pools,
good counts (SSIM > 0.4 after NCC nearest-neighbour search, Haim et al. 2022), Hungarian one-to-one
figures, and the membership statistics of ``recon_jax.metrics``: a training image that is
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

import numpy as np

from recon_jax import metrics
from recon_jax.artifacts import atomic_save_npz, atomic_write_json, read_json
from recon_jax.checkpoint import load_ground_truth
from recon_jax.errors import ConfigError

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
    result = metrics.evaluate_reconstructions(centered, truth["train_images"], truth["heldout_images"], truth["mean"],
                                              best_ssim=best_ssim, **options)
    summary = {k: result[k] for k in SUMMARY_KEYS if k in result}
    summary.update(run=str(run_dir), victim=str(victim_dir), pooled=pooled, excluded_diverged_runs=int(diverged.sum())
                   if not pooled else 0, nearest_neighbours="plain L2" if plain_l2 else "NCC on x1/2 bicubic")
    if per_run and not pooled and centered.ndim == 5:
        counts = [metrics.evaluate_reconstructions(c, truth["train_images"], truth["heldout_images"], truth["mean"],
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
            pooled_result = metrics.evaluate_reconstructions(chosen, truth["train_images"], truth["heldout_images"],
                                                             truth["mean"], best_ssim=False, **options)
            summary["pooled_by_score"] = {"runs": run_index[best].tolist(),
                                          **{k: pooled_result[k] for k in SUMMARY_KEYS if k in pooled_result}}
    atomic_save_npz(run_dir / "evaluation.npz", **{k: v for k, v in result.items() if isinstance(v, np.ndarray)})
    atomic_write_json(run_dir / "evaluation.json", summary)
    return summary
