"""Membership evidence from the attack's own objective: the swap test.

    swap_deltas(f, reconstruction, slot_labels, candidates, candidate_labels) -> SwapResult
    cell_swap(study_dir, cell) -> {"auc_swap", "delta_train", "delta_heldout", "f_best", ...}

The evaluation's membership AUC (Haim et al. 2022; Buzaglo et al. 2023) scores a candidate
image p by its distance to the nearest reconstruction. An attacker holds more than the
reconstructions: θ* and the attack's objective f, a function of the images alone
(``landscape.objective_function``: the bilevel fit f(x) = ‖θ(x) − θ*‖² / ‖θ*‖² of Runkel et
al. 2024, or the KKT residual of Haim et al. 2022 with λ profiled out). The swap test asks
whether putting p among the reconstructions explains θ* better or worse than what is there.
With x̂ = (x̂_1, …, x̂_m) the best run's reconstruction (m slots with labels y_j, mean-subtracted
images (m, h, w, c)) and x̂^{j←p} the same set with slot j replaced by p,

    Δ(p) = min_{j : y_j = y_p} f(x̂^{j←p}) − f(x̂),        s(p) = −Δ(p),

    AUC_swap = metrics.membership_auc(s(train images), s(held-out images)).

A training image should, if f carries membership evidence, lower the objective more (or raise
it less) than a held-out image of the same class: AUC_swap > 0.5. It costs one objective
evaluation per (candidate, slot of its class) pair, N/C slots per candidate for a
class-balanced set: for the bilevel attack one inner solve each (warm-started at θ*), for KKT
one profiled linear solve. The pairs are vmapped in batches, as landscape slices are.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike, NDArray

from recon_jax import checkpoint, landscape, studyconfig
from recon_jax.artifacts import atomic_save_npz, read_json
from recon_jax.errors import ConfigError
from recon_jax.metrics.membership import membership_auc

DEFAULT_BATCH = 32
"""Swapped sets evaluated per vmapped call (each holds m images and, for the bilevel
objective, one inner solve's state)."""


class SwapResult(NamedTuple):
    deltas: NDArray[np.float64]
    """(n_candidates,): Δ(p) = min over the slots of p's class of f(x̂^{j←p}) − f(x̂)."""
    best_slot: NDArray[np.int64]
    """(n_candidates,): the slot j at which the minimum is reached."""
    f_reconstruction: float
    """f(x̂), the objective at the reconstruction itself."""
    evaluations: int
    """Objective evaluations spent: the (candidate, slot) pairs plus one for f(x̂)."""


def swap_pairs(slot_labels: ArrayLike, candidate_labels: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """All (candidate i, slot j) pairs with y_j = y_i, as two (n_pairs,) index arrays, candidate
    by candidate. ConfigError if a candidate's class has no slot."""
    slot_labels = np.asarray(slot_labels).ravel()
    candidate_labels = np.asarray(candidate_labels).ravel()
    missing = sorted(set(candidate_labels.tolist()) - set(slot_labels.tolist()))
    if missing:
        raise ConfigError(f"candidates of classes {missing} have no reconstruction slot of their class (slots hold "
                          f"classes {sorted(set(slot_labels.tolist()))}); the swap test needs the victim's own labels "
                          "on both sides")
    cand, slot = [], []
    for i, label in enumerate(candidate_labels):
        js = np.flatnonzero(slot_labels == label)
        cand.append(np.full(js.size, i))
        slot.append(js)
    return np.concatenate(cand).astype(np.int64), np.concatenate(slot).astype(np.int64)


def swap_deltas(f: Callable[[jax.Array], jax.Array], reconstruction: ArrayLike, slot_labels: ArrayLike,
                candidates: ArrayLike, candidate_labels: ArrayLike, *, batch_size: int = DEFAULT_BATCH) -> SwapResult:
    """The swap test's Δ(p) for every candidate p (module docstring).

    f: the attack objective of a set of m mean-subtracted images (m, h, w, c) -> scalar;
    reconstruction x̂ (m, h, w, c) with ``slot_labels`` (m,); candidates (n, h, w, c),
    mean-subtracted like x̂, with ``candidate_labels`` (n,). The (candidate, slot) pairs go
    through one jitted, vmapped program in batches of ``batch_size``
    (``landscape.evaluate_points``: the last padded, so one compilation serves all). Returns a ``SwapResult``.
    """
    x = jnp.asarray(reconstruction)
    candidates = jnp.asarray(candidates, x.dtype)
    if x.ndim != 4 or candidates.ndim != 4 or x.shape[1:] != candidates.shape[1:]:
        raise ConfigError(f"the reconstruction {tuple(x.shape)} and the candidates {tuple(candidates.shape)} must be "
                          "image sets (m, h, w, c) and (n, h, w, c) of the same image shape")
    if len(np.asarray(slot_labels)) != x.shape[0] or len(np.asarray(candidate_labels)) != candidates.shape[0]:
        raise ConfigError("one label per reconstruction slot and per candidate is needed")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    cand, slot = swap_pairs(slot_labels, candidate_labels)
    f_x = float(jax.jit(f)(x))
    swapped = lambda pair: f(x.at[pair[1]].set(candidates[pair[0]]))
    pairs = jnp.asarray(np.stack([cand, slot], axis=1))
    values = np.asarray(landscape.evaluate_points(swapped, pairs, batch_size), np.float64)
    # The pairs come candidate by candidate (swap_pairs): each candidate's minimum over its block.
    starts = np.flatnonzero(np.r_[True, cand[1:] != cand[:-1]])
    safe = np.where(np.isnan(values), np.inf, values)
    best_in_block = np.array([start + int(np.argmin(safe[start:end]))
                              for start, end in zip(starts, np.r_[starts[1:], cand.size])])
    n = candidates.shape[0]
    deltas, best = np.full(n, np.nan), np.zeros(n, np.int64)
    deltas[cand[starts]] = values[best_in_block]
    best[cand[starts]] = slot[best_in_block]
    return SwapResult(deltas=deltas - f_x, best_slot=best, f_reconstruction=f_x, evaluations=int(cand.size) + 1)


def swap_auc(delta_train: ArrayLike, delta_heldout: ArrayLike) -> float:
    """AUC_swap = membership_auc(−Δ(train), −Δ(held-out)): 1 when every training image lowers
    the objective more than every held-out image, 0.5 when Δ carries no membership evidence.
    NaN deltas (a non-finite objective) are an error of ``membership_auc``."""
    return membership_auc(-np.asarray(delta_train, np.float64), -np.asarray(delta_heldout, np.float64))


def cell_swap(study_dir: str | os.PathLike, cell: dict, *, batch_size: int = DEFAULT_BATCH,
              max_candidates: int | None = None) -> dict:
    """The swap test on a finished study cell's best (lowest-objective, non-diverged) run.

    ``cell``: its row of results.json (``cell``, ``victim``, ``method``, ``init``, ``seed``).
    The candidates are the victim's training images and its held-out pool, mean-subtracted
    (at most ``max_candidates`` of each, the first ones, to bound the cost). The objective is
    the method's own, as the best run saw it (``attack.Method.objective_options``; KKT: that
    run's α), in the run's dtype. Returns {"auc_swap", "delta_train", "delta_heldout",
    "f_best", "evaluations", "seconds", "best_run"}, or {} when every run diverged.
    """
    study = Path(study_dir)
    cell_dir = study / "cells" / cell["cell"]
    config = studyconfig.config_from_dict(read_json(study / "config.json"))
    spec = config.spec(studyconfig.Cell(cell["victim"], cell["method"], cell["init"], int(cell["seed"])))
    victim_dir = study / "victims" / cell["victim"]
    found = landscape.best_run_objective(victim_dir, cell_dir / "run", spec)
    if found is None:
        return {}
    f, ranking, slot_labels = found.objective, found.ranking, found.labels
    best = found.centered[ranking[0]]
    truth = checkpoint.load_ground_truth(victim_dir)
    dtype = best.dtype
    limit = slice(None) if max_candidates is None else slice(0, int(max_candidates))
    train = (truth["train_images"] - truth["mean"])[limit].astype(dtype)
    heldout = (truth["heldout_images"] - truth["mean"])[limit].astype(dtype)
    labels = np.concatenate([truth["train_labels"][limit], truth["heldout_labels"][limit]])
    start = time.perf_counter()
    result = swap_deltas(f, best, slot_labels, np.concatenate([train, heldout]), labels, batch_size=batch_size)
    seconds = time.perf_counter() - start
    n_train = len(train)
    delta_train, delta_heldout = result.deltas[:n_train], result.deltas[n_train:]
    finite_train, finite_heldout = np.isfinite(delta_train), np.isfinite(delta_heldout)
    auc = (swap_auc(delta_train[finite_train], delta_heldout[finite_heldout])
           if finite_train.any() and finite_heldout.any() else float("nan"))
    return {"auc_swap": auc, "delta_train": delta_train, "delta_heldout": delta_heldout,
            "nonfinite": int((~finite_train).sum() + (~finite_heldout).sum()),
            "f_best": result.f_reconstruction, "evaluations": result.evaluations,
            "seconds": seconds, "best_run": int(ranking[0])}


def swap_interval(delta_train: ArrayLike, delta_heldout: ArrayLike, *, n_resamples: int = 1000,
                  level: float = 0.95, rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of AUC_swap over the candidate images: each replicate
    draws the training and the held-out deltas with replacement (non-finite ones left out
    first). Returns (low, high); (nan, nan) without finite deltas on both sides."""
    a = np.asarray(delta_train, np.float64)
    b = np.asarray(delta_heldout, np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not a.size or not b.size:
        return float("nan"), float("nan")
    rng = np.random.default_rng(0) if rng is None else rng
    replicates = [swap_auc(rng.choice(a, a.size), rng.choice(b, b.size)) for _ in range(n_resamples)]
    low, high = np.percentile(replicates, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def cached_cell_swap(study_dir: str | os.PathLike, cell: dict, **options) -> dict:
    """``cell_swap`` with its result kept in ``cells/<cell>/swap.npz`` (written atomically), so
    a rerun (or an interrupted map) reuses every cell already done. The cache is keyed by
    the run's best index and the options; a changed run recomputes."""
    cell_dir = Path(study_dir) / "cells" / cell["cell"]
    path = cell_dir / "swap.npz"
    key = repr(sorted(options.items()))
    run = read_json(cell_dir / "run" / "run.json")
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            best = next((r for r in run["ranking"] if not run["diverged"][r]), None)
            if str(f["key"]) == key and best is not None and int(f["best_run"]) == int(best):
                return {k: (f[k].item() if f[k].ndim == 0 else f[k]) for k in f.files if k != "key"}
    result = cell_swap(study_dir, cell, **options)
    if result:
        atomic_save_npz(path, key=np.asarray(key), **{k: np.asarray(v) for k, v in result.items()})
    return result
