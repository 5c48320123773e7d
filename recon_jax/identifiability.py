"""The identifiability map of a finished study: membership AUC against unknowns per parameter.

    write_identifiability(study_dir, out_dir) -> {"points": [...], "transitions": [...], "figures": [...]}
    recon-jax identifiability --study runs/NAME [--out DIR] [--resamples B]
    recon-jax identifiability --study runs/A --study runs/B --out DIR     # points of several studies pooled

A victim trained on N images of D = h·w·c pixels releases P parameters; the attacks solve for
N·D unknown pixel values from them. Runkel et al. (2024) argue that once the unknowns per
parameter N·D/P grow, the reconstruction problem has many exact solutions, so an attack from
random initialisations reaches a zero objective with images that are plausible but are not
the training set. The map measures that: for every point of a study (victim × method ×
initialisation, seeds pooled), the membership AUC of the reconstructions, with a bootstrap
interval, against N·D/P (``recon_jax.study.size_columns``), and per curve (method ×
architecture × initialisation × weight decay) the ratio at which the AUC falls through 0.75.

**AUC.** Exactly the evaluation's ``membership_auc_distance``
(``recon_jax.evaluation.evaluate_reconstructions``): with d(x, p) the protocol's NCC distance
(``metrics.neighbours.ncc_features`` and ``mean_squared_distances``, both sides
mean-subtracted; plain L2 where the cell was evaluated so) and R the pooled reconstructions
of the non-diverged runs,

    s(p) = −min_{x ∈ R} d(x, p),        AUC = metrics.membership_auc(s(train), s(held-out)),

so a point's estimate with one seed is its cell's summary value. Because the minimum over a
pool is the minimum of per-run minima, ``per_run_distances`` computes δ_k(p) = min_{x ∈ run k}
d(x, p) once, shape (K, n_pool), and the AUC of any multiset S of runs is that of
s(p) = −min_{k ∈ S} δ_k(p).

**Interval.** A two-stage percentile bootstrap (Davison and Hinkley 1997, §3.8; Efron and
Tibshirani 1993, §13.3): each replicate draws S seeds with replacement from the point's S
seeds, and within each drawn seed K_s runs with replacement from its K_s runs, computes each
drawn seed's AUC from its drawn runs and averages them; the estimate is the mean over seeds
of the per-seed AUC. The interval is the (1 ± level)/2 percentiles of B replicates
(``bootstrap_interval``). It measures the spread due to the initialisations (and seeds), for
this victim: the victim's own training draw is fixed.

**Transition.** ``transition_ratio``: the first downward crossing of τ = 0.75 along a curve,
by linear interpolation in log N·D/P (equation there), and its interval from the crossings
of the replicate curves (each point's b-th replicate).

**Several studies.** A curve may take its points from several finished studies of one dataset
(e.g. a quick grid and a config that extends one architecture to larger N): their points are
pooled, in the order the studies are given, a victim trained with the same spec in two of
them is counted once (the first study's), and the ``study`` column says where each point
came from. Studies of different datasets are refused: their N·D/P do not share a curve.

Outputs in ``out_dir`` (default ``<study>/identifiability``): ``identifiability.csv`` (one row
per point: ``POINT_COLUMNS``), ``transitions.csv`` (one row per curve: ``TRANSITION_COLUMNS``),
``identifiability.md``, and ``figures/``: per initialisation ``auc_vs_unknowns_<init>.png``
(AUC with its interval, 0.75 dashed, chance 0.5 dotted), ``converged_vs_unknowns_<init>.png``,
``own_ssim_vs_unknowns_<init>.png``, and ``weight_decay_<init>.png`` (AUC and own SSIM against
weight decay, for victims that differ only by their weight decay), where the study has them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from recon_jax import figures, metrics
from recon_jax.artifacts import atomic_write_bytes, read_json
from recon_jax.checkpoint import load_ground_truth
from recon_jax.errors import ConfigError
from recon_jax.metrics.membership import pool_reconstructions
from recon_jax.metrics.neighbours import mean_squared_distances, ncc_features
from recon_jax.study import _format, with_size_columns

AUC_THRESHOLD = 0.75
"""τ: the AUC at which a curve's transition is read (0.5 = no evidence of membership, 1 = the
training images are told apart from held-out ones every time)."""
DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95

POINT_COLUMNS = (
    "victim", "method", "init", "arch", "n_train", "n_pixels", "n_params", "unknowns_per_param", "n_per_class",
    "weight_decay", "n_seeds", "n_runs", "auc", "auc_low", "auc_high", "level", "resamples", "auc_summary",
    "converged_fraction", "own_ssim", "final_loss", "train_above_heldout_count", "cells", "note",
    "auc_swap", "auc_swap_low", "auc_swap_high", "swap_cell", "swap_nonfinite", "study",
)
TRANSITION_COLUMNS = (
    "method", "arch", "init", "weight_decay", "n_points", "ratio_min", "ratio_max", "threshold", "transition",
    "transition_low", "transition_high", "level", "replicates_crossing", "note",
    "transition_n_train", "transition_n_train_low", "transition_n_train_high",
)


# ---------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------


class Interval(NamedTuple):
    estimate: float
    """The statistic of the full sample."""
    low: float
    high: float
    """The percentile interval (NaN if no replicate is a number)."""
    replicates: NDArray[np.float64]
    """``(n_resamples,)``: the statistic of each resample (NaN where it is undefined)."""


def percentile_interval(replicates: ArrayLike, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """(T*_(⌈B α/2⌉), T*_(⌈B(1 − α/2)⌉)), α = 1 − level: order statistics of the B replicates
    that are not NaN (±inf are kept: a replicate beyond the grid). ``(B,)`` -> two floats."""
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), e.g. 0.95; got {level}")
    values = np.asarray(replicates, np.float64).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    alpha = 1.0 - level
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
    return float(low), float(high)


def bootstrap_interval(values_or_fn: ArrayLike | Callable[[np.random.Generator], float],
                       statistic: Callable[[np.ndarray], float] = np.mean, *, level: float = DEFAULT_LEVEL,
                       n_resamples: int = DEFAULT_RESAMPLES, rng: np.random.Generator | int | None = None,
                       estimate: float | None = None) -> Interval:
    """Percentile bootstrap interval of a statistic (Efron and Tibshirani 1993, §13.3).

    With data x = (x_1, …, x_n) (``values_or_fn`` an array, resampled along its first axis)
    and statistic T, each of the B = ``n_resamples`` replicates is

        T*_b = T(x_{j_1}, …, x_{j_n}),   j_1, …, j_n ~ Uniform{1, …, n} independently,

    and the interval at ``level`` = 1 − α is (T*_(⌈Bα/2⌉), T*_(⌈B(1−α/2)⌉)), order
    statistics of the replicates (``percentile_interval``); the estimate is T(x). For a
    resampling scheme of its own (e.g. two-stage: seeds, then runs within seeds), pass a
    function ``fn(rng) -> T*_b`` that draws one replicate, and the full-sample ``estimate``.

    Shapes: values ``(n, ...)``; returns ``Interval(estimate, low, high, replicates (B,))``.
    ``rng``: a numpy Generator or a seed (the interval is reproducible given it).
    """
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if callable(values_or_fn):
        replicates = np.asarray([values_or_fn(rng) for _ in range(n_resamples)], np.float64)
        point = math.nan if estimate is None else float(estimate)
    else:
        values = np.asarray(values_or_fn)
        if values.ndim == 0 or len(values) == 0:
            raise ConfigError("bootstrap_interval needs at least one value (an array resampled along axis 0)")
        n = len(values)
        replicates = np.asarray([statistic(values[rng.integers(0, n, n)]) for _ in range(n_resamples)], np.float64)
        point = float(statistic(values)) if estimate is None else float(estimate)
    low, high = percentile_interval(replicates, level)
    return Interval(point, low, high, replicates)


# ---------------------------------------------------------------------------------------
# Membership AUC of a multiset of runs
# ---------------------------------------------------------------------------------------


class RunDistances(NamedTuple):
    """Per run k and pool image p: δ_k(p) = min over run k's reconstructions of d(x, p)."""

    train: NDArray[np.float64]
    """``(K, n_train)``."""
    heldout: NDArray[np.float64]
    """``(K, n_heldout)``."""


def per_run_distances(centered: ArrayLike, train_images: ArrayLike, heldout_images: ArrayLike, mean: ArrayLike | None,
                      *, downsample: bool = True, standardise: bool = True) -> RunDistances:
    """δ_k(p) = min_{j} d(x_{k,j}, p − μ) for each run k and each training / held-out image p,
    with d the protocol's NCC distance computed as ``evaluation.evaluate_reconstructions``
    does (pooled reconstructions, float64, the same features and distance matrix), then split
    by run. centered: ``(K, m, h, w, c)`` mean-subtracted; pools ``(n, h, w, c)`` in [0, 1];
    mean ``(1, h, w, c)`` or None."""
    centered = np.asarray(centered)
    if centered.ndim != 5:
        raise ConfigError(f"centered must be (K, m, h, w, c) reconstructions of K runs, got shape {centered.shape}")
    n_runs, m = centered.shape[:2]
    pooled = pool_reconstructions(centered)
    mean_array = np.zeros((1, *pooled.shape[1:])) if mean is None else np.asarray(mean, np.float64)
    features = ncc_features(pooled, downsample, standardise)
    out = []
    for images in (train_images, heldout_images):
        images = np.asarray(images, np.float64)
        d = mean_squared_distances(features, ncc_features(images - mean_array, downsample, standardise))
        out.append(d.reshape(n_runs, m, -1).min(axis=1))
    return RunDistances(*out)


def auc_of_runs(distances: RunDistances, runs: ArrayLike | None = None) -> float:
    """Membership AUC of the reconstructions of the runs ``runs`` (indices, repeats allowed;
    None = all), the evaluation's ``membership_auc_distance``:

        AUC = membership_auc(−min_{k ∈ runs} δ_k(train), −min_{k ∈ runs} δ_k(held-out))."""
    train, heldout = distances
    if runs is not None:
        train, heldout = train[np.asarray(runs)], heldout[np.asarray(runs)]
    return metrics.membership_auc(-train.min(axis=0), -heldout.min(axis=0))


def point_bootstrap(seeds: list[RunDistances], *, level: float = DEFAULT_LEVEL, n_resamples: int = DEFAULT_RESAMPLES,
                    rng: np.random.Generator | int | None = None) -> Interval:
    """The two-stage bootstrap of a point's AUC (module doc): estimate = (1/S) Σ_s AUC_s(all
    runs of seed s); replicate = (1/S) Σ_{i=1..S} AUC_{s_i}(runs drawn with replacement from
    seed s_i), s_i drawn with replacement. ``seeds``: one ``RunDistances`` (K_s runs) per seed."""
    if not seeds:
        raise ConfigError("point_bootstrap needs the runs of at least one seed")

    def replicate(generator: np.random.Generator) -> float:
        drawn = generator.integers(0, len(seeds), len(seeds))
        return float(np.mean([auc_of_runs(seeds[s], generator.integers(0, len(seeds[s].train), len(seeds[s].train)))
                              for s in drawn]))

    estimate = float(np.mean([auc_of_runs(d) for d in seeds]))
    return bootstrap_interval(replicate, level=level, n_resamples=n_resamples, rng=rng, estimate=estimate)


# ---------------------------------------------------------------------------------------
# Transition
# ---------------------------------------------------------------------------------------


class Transition(NamedTuple):
    ratio: float
    """r× in (0, ∞), or NaN where the curve does not cross downward (``reason`` says why)."""
    reason: str
    """Empty for a crossing, else why there is none."""
    side: str = ""
    """Where an uncrossed transition lies: "above" the grid (AUC ≥ τ throughout), "below" it
    (AUC < τ from the first point on), or "" (a crossing, or too few points)."""

    @property
    def bound(self) -> float:
        """r× as a replicate enters an interval: the crossing, +inf above the grid, 0 below it."""
        return {"above": math.inf, "below": 0.0}.get(self.side, self.ratio)


def transition_ratio(ratios: ArrayLike, aucs: ArrayLike, threshold: float = AUC_THRESHOLD) -> Transition:
    """The ratio N·D/P at which a curve of AUC against the ratio first falls through τ.

    With the points sorted by ratio, r_1 < … < r_n (NaN AUCs dropped), and i the first index
    with a_i ≥ τ > a_{i+1} (the first downward crossing),

        log r× = log r_i + (a_i − τ) / (a_i − a_{i+1}) · (log r_{i+1} − log r_i),

    linear interpolation in log ratio between the two grid points that bracket τ. Without
    such an i, r× is NaN with the reason: every a_i ≥ τ (``side`` "above": the transition lies
    above the grid), or the AUC is below τ where the grid starts and never falls through it
    (``side`` "below"), or fewer than two points have an AUC.
    ratios ``(n,)`` > 0 distinct, aucs ``(n,)`` -> ``Transition(ratio, reason, side)``.
    """
    ratios, aucs = np.asarray(ratios, np.float64), np.asarray(aucs, np.float64)
    if ratios.shape != aucs.shape or ratios.ndim != 1:
        raise ConfigError(f"ratios and aucs must be two (n,) arrays, got {ratios.shape} and {aucs.shape}")
    keep = np.isfinite(ratios) & np.isfinite(aucs)
    ratios, aucs = ratios[keep], aucs[keep]
    if np.any(ratios <= 0):
        raise ConfigError("ratios must be > 0 (unknowns per parameter)")
    order = np.argsort(ratios, kind="stable")
    ratios, aucs = ratios[order], aucs[order]
    if len(ratios) < 2:
        return Transition(math.nan, f"{len(ratios)} point(s) with an AUC: a crossing needs two")
    if len(np.unique(ratios)) != len(ratios):
        raise ConfigError(f"ratios must be distinct (average the AUCs of equal ratios first), got {ratios.tolist()}")
    for i in range(len(ratios) - 1):
        if aucs[i] >= threshold > aucs[i + 1]:
            t = (aucs[i] - threshold) / (aucs[i] - aucs[i + 1])
            log_r = math.log(ratios[i]) + t * (math.log(ratios[i + 1]) - math.log(ratios[i]))
            return Transition(math.exp(log_r), "")
    if np.all(aucs >= threshold):
        return Transition(math.nan, f"AUC >= {threshold:g} at every ratio up to {ratios[-1]:.3g}: the transition "
                                    "lies above the grid", "above")
    return Transition(math.nan, f"AUC < {threshold:g} from the smallest ratio {ratios[0]:.3g} on, with no downward "
                                "crossing: the transition lies below the grid", "below")


def _curve_values(ratios: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ratios, and the mean value at each (points of equal size in one curve)."""
    unique = np.unique(ratios)
    return unique, np.asarray([np.nanmean(values[ratios == r]) if np.any(np.isfinite(values[ratios == r]))
                               else np.nan for r in unique])


def curve_transition(ratios: ArrayLike, aucs: ArrayLike, replicates: ArrayLike, *, threshold: float = AUC_THRESHOLD,
                     level: float = DEFAULT_LEVEL) -> dict:
    """A curve's transition r× (``transition_ratio``; NaN with a note if it does not cross) and
    its percentile interval over the bootstrap replicate curves: replicate b of the curve takes
    each point's b-th replicate AUC, and its crossing r×_b (+inf where it stays above τ over the
    grid, 0 where it is below τ throughout) enters ``percentile_interval``; so an interval
    bound of inf or 0 says the transition may lie beyond the grid. ``replicates_crossing`` is
    the fraction of replicates that cross inside the grid.
    ratios, aucs ``(n,)``; replicates ``(n, B)``. Points of equal ratio are averaged."""
    ratios, aucs = np.asarray(ratios, np.float64), np.asarray(aucs, np.float64)
    replicates = np.asarray(replicates, np.float64)
    unique, curve = _curve_values(ratios, aucs)
    found = transition_ratio(unique, curve, threshold)
    crossings = []
    for b in range(replicates.shape[1]):
        crossings.append(transition_ratio(unique, _curve_values(ratios, replicates[:, b])[1], threshold).bound)
    crossings = np.asarray(crossings, np.float64)
    low, high = percentile_interval(crossings, level) if crossings.size else (math.nan, math.nan)
    finite = np.isfinite(crossings) & (crossings > 0)
    return {"n_points": int(np.isfinite(curve).sum()), "ratio_min": float(unique.min()), "ratio_max": float(unique.max()),
            "threshold": threshold, "transition": found.ratio, "transition_low": low, "transition_high": high,
            "level": level, "replicates_crossing": float(finite.mean()) if crossings.size else math.nan,
            "note": found.reason}


# ---------------------------------------------------------------------------------------
# A finished study
# ---------------------------------------------------------------------------------------


def _study_results(study: Path) -> list[dict]:
    path = study / "results.json"
    if not path.is_file():
        raise ConfigError(f"{study} holds no results.json: run `recon-jax study` to the end first (a rerun with the "
                          "same --out resumes it)")
    return [with_size_columns(study, cell) for cell in read_json(path)["cells"]]


def _nn_options(cell_dir: Path) -> dict:
    """The nearest-neighbour options the cell was evaluated with (evaluation.json)."""
    path = cell_dir / "run" / "evaluation.json"
    plain = path.is_file() and read_json(path).get("nearest_neighbours") == "plain L2"
    return {"downsample": not plain, "standardise": not plain}


def cell_distances(study: Path, cell: dict, truths: dict) -> RunDistances | None:
    """``per_run_distances`` of a cell's non-diverged runs (None if every run diverged)."""
    cell_dir = study / "cells" / cell["cell"]
    run = read_json(cell_dir / "run" / "run.json")
    diverged = np.asarray(run["diverged"], bool)
    if diverged.all():
        return None
    if cell["victim"] not in truths:
        truths[cell["victim"]] = load_ground_truth(study / "victims" / cell["victim"])
    truth = truths[cell["victim"]]
    with np.load(cell_dir / "run" / "reconstructions.npz", allow_pickle=False) as f:
        centered = f["centered"][~diverged]  # as evaluate_run: a diverged run's candidates are not evidence
    return per_run_distances(centered, truth["train_images"], truth["heldout_images"], truth["mean"],
                             **_nn_options(cell_dir))


def _mean(cells: list[dict], key: str) -> float | None:
    values = [c.get(key) for c in cells if c.get(key) is not None]
    return float(np.mean(values)) if values else None


def _study_paths(study_dirs) -> list[Path]:
    """One study folder or several, as a list of paths (several: each named once)."""
    paths = [Path(study_dirs)] if isinstance(study_dirs, (str, os.PathLike)) else [Path(s) for s in study_dirs]
    if not paths:
        raise ConfigError("no study given: pass a finished study folder (recon-jax identifiability --study runs/NAME)")
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"a study is given twice ({', '.join(map(str, paths))}): name each folder once")
    return paths


def _victim_dataset(study: Path, victim: str):
    return read_json(study / "victims" / victim / "victim.json").get("spec", {}).get("dataset")


def identifiability_points(study_dirs: str | os.PathLike | list, *, n_resamples: int = DEFAULT_RESAMPLES,
                           level: float = DEFAULT_LEVEL, seed: int = 0, swap: bool = False,
                           swap_batch: int | None = None) -> list[dict]:
    """One dict per point (victim, method, init) of one finished study, or of several studies of
    one dataset pooled (``study_dirs`` a list; module doc), in the studies' order:
    ``POINT_COLUMNS``, plus ``replicates`` ``(B,)`` and the victim's saved ``spec``. The
    bootstrap of every point draws from its own generator, seeded by (``seed``, point index),
    the index running over the pooled points.

    ``swap=True`` adds the swap test (``recon_jax.swap``: membership evidence from the attack's
    own objective) on the best run of the point's first cell with a non-diverged run:
    ``auc_swap`` with a bootstrap interval over the candidate images; cached per cell in
    ``cells/<cell>/swap.npz``. Otherwise those columns are empty."""
    studies = _study_paths(study_dirs)
    per_study = [(study, _study_results(study)) for study in studies]  # every results.json checked before any work
    datasets = {study: {_victim_dataset(study, victim) for victim in {c["victim"] for c in cells}}
                for study, cells in per_study}  # one victim.json read per victim, not per cell
    if len(set().union(*datasets.values())) > 1:
        found = "; ".join(f"{study}: {', '.join(sorted(map(str, d)))}" for study, d in datasets.items())
        raise ConfigError(f"the studies hold victims of different datasets ({found}): their N·D/P do not share a "
                          "curve; pool studies of one dataset (run `recon-jax identifiability` once per dataset)")
    points, index = [], 0
    for study, cells in per_study:
        groups: dict[tuple, list[dict]] = {}
        for cell in cells:
            groups.setdefault((cell["victim"], cell["method"], cell["init"]), []).append(cell)
        truths = {}
        for (victim, method, init), members in groups.items():
            points.append(_point(study, victim, method, init, members, truths, n_resamples=n_resamples, level=level,
                                 rng=np.random.default_rng([seed, index])))
            if swap:
                points[-1].update(_swap_columns(study, members, n_resamples, level,
                                                np.random.default_rng([seed, index, 1]), swap_batch))
            index += 1
    return points


def _point(study: Path, victim: str, method: str, init: str, members: list[dict], truths: dict, *,
           n_resamples: int, level: float, rng: np.random.Generator) -> dict:
    """The point of one (victim, method, init) of a study: its cells (one per seed) pooled."""
    seeds, notes = [], []
    for cell in members:
        distances = cell_distances(study, cell, truths)
        if distances is None:
            notes.append(f"seed {cell['seed']}: every run diverged, left out")
        else:
            seeds.append(distances)
    if seeds:
        interval = point_bootstrap(seeds, level=level, n_resamples=n_resamples, rng=rng)
    else:
        interval = Interval(math.nan, math.nan, math.nan, np.full(n_resamples, np.nan))
    first = members[0]
    meta = read_json(study / "victims" / victim / "victim.json")
    return {
        "victim": victim, "method": method, "init": init,
        **{k: first.get(k) for k in ("arch", "n_train", "n_pixels", "n_params", "unknowns_per_param",
                                     "n_per_class", "weight_decay")},
        "n_seeds": len(seeds), "n_runs": int(sum(len(d.train) for d in seeds)),
        "auc": interval.estimate, "auc_low": interval.low, "auc_high": interval.high, "level": level,
        "resamples": n_resamples, "auc_summary": _mean(members, "membership_auc_distance"),
        "converged_fraction": _mean(members, "converged_fraction"), "own_ssim": _mean(members, "own_ssim"),
        "final_loss": _mean(members, "final_loss"),
        "train_above_heldout_count": _mean(members, "train_above_heldout_count"),
        "cells": " ".join(c["cell"] for c in members), "note": "; ".join(notes), "study": study.name,
        "replicates": interval.replicates, "spec": meta.get("spec"),
    }


def _swap_columns(study: Path, members: list[dict], n_resamples: int, level: float, rng: np.random.Generator,
                  batch_size: int | None) -> dict:
    """The swap-test columns of one point, from its first cell with a non-diverged run."""
    from recon_jax import swap

    options = {} if batch_size is None else {"batch_size": int(batch_size)}
    for cell in members:
        result = swap.cached_cell_swap(study, cell, **options)
        if result:
            low, high = swap.swap_interval(result["delta_train"], result["delta_heldout"], n_resamples=n_resamples,
                                           level=level, rng=rng)
            return {"auc_swap": float(result["auc_swap"]), "auc_swap_low": low, "auc_swap_high": high,
                    "swap_cell": cell["cell"], "swap_nonfinite": int(result["nonfinite"])}
    return {}


def _without(spec: dict | None, *keys: str) -> str:
    """A victim spec as a canonical string, with the named fields (``train.x`` for the
    recipe's) removed: victims equal under it differ only by those fields."""
    spec = json.loads(json.dumps(spec or {}))
    for key in keys:
        table = spec
        *parents, leaf = key.split(".")
        for part in parents:
            table = table.get(part, {})
        table.pop(leaf, None)
    return json.dumps(spec, sort_keys=True)


def _distinct_victims(points: list[dict]) -> list[dict]:
    """Points of a curve, one per distinct victim spec: a victim trained twice under two names
    (e.g. a weight-decay sweep's value equal to the default) is the same victim, kept once."""
    seen, kept = set(), []
    for p in points:
        key = _without(p["spec"])
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept


def curves(points: list[dict]) -> dict[tuple, list[dict]]:
    """Points grouped by curve (method, arch, init, weight_decay), distinct victims, in study order."""
    grouped: dict[tuple, list[dict]] = {}
    for p in points:
        if p.get("unknowns_per_param") is not None:
            grouped.setdefault((p["method"], p["arch"], p["init"], p["weight_decay"]), []).append(p)
    return {key: _distinct_victims(members) for key, members in grouped.items()}


def transitions(points: list[dict], *, threshold: float = AUC_THRESHOLD, level: float = DEFAULT_LEVEL) -> list[dict]:
    """One row per curve: ``TRANSITION_COLUMNS`` (``curve_transition``).

    The same crossing in training images: a curve holds one architecture on one dataset, so
    N = (N·D/P)·P/D with one P/D, and interpolating linearly in log N·D/P is interpolating in
    log N: ``transition_n_train`` = transition·P/D (and its interval likewise). NaN where the
    curve's points disagree on P/D (they should not)."""
    rows = []
    for (method, arch, init, weight_decay), members in curves(points).items():
        ratios = np.asarray([p["unknowns_per_param"] for p in members], np.float64)
        aucs = np.asarray([p["auc"] for p in members], np.float64)
        replicates = np.stack([p["replicates"] for p in members])
        row = {"method": method, "arch": arch, "init": init, "weight_decay": weight_decay,
               **curve_transition(ratios, aucs, replicates, threshold=threshold, level=level)}
        per_image = np.asarray([p["n_train"] / p["unknowns_per_param"] if p.get("n_train") else np.nan
                                for p in members], np.float64)  # P/D, one value per curve
        scale = per_image[0] if np.allclose(per_image, per_image[0], rtol=1e-9) else np.nan
        for suffix in ("", "_low", "_high"):
            row[f"transition_n_train{suffix}"] = float(row[f"transition{suffix}"] * scale)
        rows.append(row)
    return rows


def weight_decay_groups(points: list[dict]) -> dict[tuple, list[dict]]:
    """Points of victims that differ only by weight decay (two or more values), grouped by
    (method, init, arch, n_train, the rest of the victim spec), sorted by weight decay."""
    grouped: dict[tuple, list[dict]] = {}
    for p in points:
        grouped.setdefault((p["method"], p["init"], p["arch"], p["n_train"], _without(p["spec"], "train.weight_decay")),
                           []).append(p)
    out = {}
    for key, members in grouped.items():
        members = sorted(_distinct_victims(members), key=lambda p: p["weight_decay"])
        if len({p["weight_decay"] for p in members}) >= 2:
            out[key] = members
    return out


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def _csv(rows: list[dict], columns: tuple[str, ...]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format(row.get(c)) for c in columns])
    return buffer.getvalue().encode()


def _slug(init: str) -> str:
    return init.replace(":", "=")


def _label(method: str, arch: str, weight_decay: float | None, show_wd: bool) -> str:
    return f"{method} · {arch}" + (f" · wd {weight_decay:g}" if show_wd and weight_decay is not None else "")


def _figures(points: list[dict], fig_dir: Path, threshold: float, level: float) -> list[str]:
    written = []
    by_curve = curves(points)
    ratio_label = "unknowns per parameter N·D/P (log)"
    for init in dict.fromkeys(p["init"] for p in points):
        keys = [k for k in by_curve if k[2] == init]
        if not keys:
            continue
        show_wd = len({k[3] for k in keys}) > 1
        panels, by_n = {}, {}
        for key in keys:
            members = by_curve[key]
            x = [p["unknowns_per_param"] for p in members]
            label = _label(key[0], key[1], key[3], show_wd)
            by_n[label] = {"x": [p["n_train"] for p in members], "y": [p["auc"] for p in members],
                           "low": [p["auc_low"] for p in members], "high": [p["auc_high"] for p in members]}
            for name, y_key, bounds in (("auc", "auc", True), ("converged", "converged_fraction", False),
                                        ("own_ssim", "own_ssim", False)):
                curve = {"x": x, "y": [np.nan if p[y_key] is None else p[y_key] for p in members]}
                if bounds:
                    curve |= {"low": [p["auc_low"] for p in members], "high": [p["auc_high"] for p in members]}
                panels.setdefault(name, {})[label] = curve
        specs = (
            ("auc", f"auc_vs_unknowns_{_slug(init)}.png", "membership AUC (distance)",
             [(threshold, f"AUC = {threshold:g}", "--"), (0.5, "chance", ":")], (0.0, 1.02),
             f"init {init}: AUC, {level:.0%} bootstrap intervals"),
            ("converged", f"converged_vs_unknowns_{_slug(init)}.png", "fraction of runs converged", [], (-0.02, 1.02),
             f"init {init}: runs meeting the objective criterion"),
            ("own_ssim", f"own_ssim_vs_unknowns_{_slug(init)}.png",
             f"own SSIM [{metrics.PROTOCOL_MAPPING}] (median)", [(metrics.GOOD_SSIM, f"SSIM {metrics.GOOD_SSIM:g}", ":")],
             None, f"init {init}: SSIM to the paired training image"),
        )
        for name, file, ylabel, hlines, ylim, title in specs:
            figures.curve_panels(fig_dir / file, [{"ylabel": ylabel, "curves": panels[name], "hlines": hlines,
                                                   "ylim": ylim}], ratio_label, logx=True, title=title)
            written.append(file)
        # The same AUC curves against N alone: do architectures with different P line up in N·D/P or in N?
        file = f"auc_vs_n_train_{_slug(init)}.png"
        figures.curve_panels(fig_dir / file, [{"ylabel": "membership AUC (distance)", "curves": by_n,
                                               "hlines": specs[0][3], "ylim": (0.0, 1.02)}],
                             "training images N (log)", logx=True,
                             title=f"init {init}: AUC against N, {level:.0%} bootstrap intervals")
        written.append(file)
    for init in dict.fromkeys(p["init"] for p in points if p.get("auc_swap") is not None):
        curves_ = {}
        for key, members in by_curve.items():
            members = [p for p in members if p.get("auc_swap") is not None]
            if key[2] != init or not members:
                continue
            label = _label(key[0], key[1], key[3], len({k[3] for k in by_curve if k[2] == init}) > 1)
            x = [p["unknowns_per_param"] for p in members]
            curves_[f"{label}: distance"] = {"x": x, "y": [p["auc"] for p in members],
                                             "low": [p["auc_low"] for p in members],
                                             "high": [p["auc_high"] for p in members]}
            curves_[f"{label}: swap"] = {"x": x, "y": [p["auc_swap"] for p in members],
                                         "low": [p["auc_swap_low"] for p in members],
                                         "high": [p["auc_swap_high"] for p in members]}
        file = f"swap_vs_distance_{_slug(init)}.png"
        figures.curve_panels(fig_dir / file, [{"ylabel": "membership AUC", "curves": curves_, "ylim": (0.0, 1.02),
                                               "hlines": [(threshold, f"AUC = {threshold:g}", "--"),
                                                          (0.5, "chance", ":")]}],
                             ratio_label, logx=True,
                             title=f"init {init}: distance AUC and swap-test AUC")
        written.append(file)
    groups = weight_decay_groups(points)
    for init in dict.fromkeys(key[1] for key in groups):
        auc, ssim = {}, {}
        for key, members in groups.items():
            method, g_init, arch, n_train = key[:4]
            if g_init != init:
                continue
            label = f"{method} · {arch} · N={n_train}"
            label += f" ({members[0]['victim']})" if label in auc else ""
            x = [p["weight_decay"] for p in members]
            auc[label] = {"x": x, "y": [p["auc"] for p in members], "low": [p["auc_low"] for p in members],
                          "high": [p["auc_high"] for p in members]}
            ssim[label] = {"x": x, "y": [np.nan if p["own_ssim"] is None else p["own_ssim"] for p in members]}
        logx = all(p["weight_decay"] > 0 for key, members in groups.items() if key[1] == init for p in members)
        file = f"weight_decay_{_slug(init)}.png"
        figures.curve_panels(fig_dir / file, [
            {"ylabel": "membership AUC (distance)", "curves": auc, "ylim": (0.0, 1.02),
             "hlines": [(threshold, f"AUC = {threshold:g}", "--"), (0.5, "chance", ":")]},
            {"ylabel": f"own SSIM [{metrics.PROTOCOL_MAPPING}] (median)", "curves": ssim,
             "hlines": [(metrics.GOOD_SSIM, f"SSIM {metrics.GOOD_SSIM:g}", ":")]}],
            "weight decay λ_wd" + (" (log)" if logx else ""), logx=logx,
            title=f"init {init}: victims that differ only by weight decay")
        written.append(file)
    return written


def _markdown(studies: list[Path], points: list[dict], rows: list[dict], written: list[str], threshold: float,
              level: float, n_resamples: int) -> str:
    fmt = lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else (
        f"{v:.3g}" if isinstance(v, float) else str(v))
    names = " + ".join(f"`{study.name}`" for study in studies)
    lines = [f"# Identifiability map of {names}", "",
             f"Membership AUC (distance to the nearest reconstruction; 0.5 = no evidence of membership) against "
             f"unknowns per parameter N·D/P, with {level:.0%} percentile bootstrap intervals over initialisations "
             f"and seeds ({n_resamples} resamples). Transition: the ratio at which the AUC first falls through "
             f"{threshold:g}, interpolated linearly in log N·D/P (– where it does not cross, with the reason); its "
             "interval from the replicate curves (a bound of inf: replicates above the grid; 0: below it).", "",
             "## Transitions", "", "| method | arch | init | weight decay | points | N·D/P range | transition | "
             "interval | as N (images) | replicates crossing | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['arch']} | {r['init']} | {fmt(r['weight_decay'])} | {r['n_points']} | "
                     f"{fmt(r['ratio_min'])}–{fmt(r['ratio_max'])} | {fmt(r['transition'])} | "
                     f"[{fmt(r['transition_low'])}, {fmt(r['transition_high'])}] | "
                     f"{fmt(r['transition_n_train'])} [{fmt(r['transition_n_train_low'])}, "
                     f"{fmt(r['transition_n_train_high'])}] | {fmt(r['replicates_crossing'])} | {r['note']} |")
    lines += ["", "## Points", "", "AUC swap: the swap test on the best run (`recon_jax.swap`), Δ(p) = "
              "min_j f(x̂ with slot j ← p) − f(x̂) over the slots of p's class, score −Δ; interval over the candidate "
              "images (– where not computed: `recon-jax identifiability --swap`).", "",
              "| victim | method | init | N·D/P | AUC | interval | AUC swap | interval | converged | own SSIM |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        victim = f"{p['study']}/{p['victim']}" if len(studies) > 1 else p["victim"]
        lines.append(f"| {victim} | {p['method']} | {p['init']} | {fmt(p['unknowns_per_param'])} | "
                     f"{fmt(p['auc'])} | [{fmt(p['auc_low'])}, {fmt(p['auc_high'])}] | {fmt(p.get('auc_swap'))} | "
                     f"[{fmt(p.get('auc_swap_low'))}, {fmt(p.get('auc_swap_high'))}] | "
                     f"{fmt(p['converged_fraction'])} | {fmt(p['own_ssim'])} |")
    lines += ["", "## Figures", ""] + [f"![{name}](figures/{name})\n" for name in written]
    return "\n".join(lines) + "\n"


def write_identifiability(study_dir: str | os.PathLike | list, out_dir: str | os.PathLike | None = None, *,
                          n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed: int = 0,
                          threshold: float = AUC_THRESHOLD, draw: bool = True, swap: bool = False,
                          swap_batch: int | None = None) -> dict:
    """Compute the map of a finished study, or of several of one dataset pooled (``study_dir`` a
    list; ``out_dir`` is then required), and write it (module doc) to ``out_dir`` (default
    ``<study>/identifiability``); ``swap=True`` adds the swap test's AUC per point
    (``identifiability_points``). Returns {"points", "transitions", "figures", "out"}."""
    if not 0 < threshold < 1:
        raise ConfigError(f"threshold must be an AUC in (0, 1), e.g. 0.75; got {threshold}")
    studies = _study_paths(study_dir)
    if out_dir is None and len(studies) > 1:
        raise ConfigError(f"{len(studies)} studies are pooled: give the output folder (--out DIR); a default inside "
                          "one of them would mix a pooled map with that study's own")
    out = Path(out_dir) if out_dir is not None else studies[0] / "identifiability"
    points = identifiability_points(studies, n_resamples=n_resamples, level=level, seed=seed, swap=swap,
                                    swap_batch=swap_batch)
    rows = transitions(points, threshold=threshold, level=level)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "identifiability.csv", _csv(points, POINT_COLUMNS))
    atomic_write_bytes(out / "transitions.csv", _csv(rows, TRANSITION_COLUMNS))
    written = []
    if draw:
        (out / "figures").mkdir(exist_ok=True)
        written = _figures(points, out / "figures", threshold, level)
    atomic_write_bytes(out / "identifiability.md",
                       _markdown(studies, points, rows, written, threshold, level, n_resamples).encode())
    return {"points": points, "transitions": rows, "figures": written, "out": out}
