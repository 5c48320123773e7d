"""Reconstruction runs: a victim folder in, a run folder out. The API behind ``recon-jax reconstruct``.

    reconstruct(victim_dir, out_dir, ReconstructionSpec(...)) -> run summary (dict)

writes

    out_dir/reconstructions.npz   images, init_images (K, N, h, w, c) in [0,1] (K = runs =
                                  initialisations × hyperparameter grid); centered and
                                  init_centered (mean-subtracted, as optimised); labels (N,)
    out_dir/history.npz           per step (K, steps): outer_loss, objective, inner_grad_norm,
                                  inner_iterations, cg_residual
    out_dir/run.json              resolved config, versions, seconds, final_outer_loss (K),
                                  diverged (K), final inner figures (K)
    out_dir/chunks/               resumable per-chunk state (removed when the run completes)

The attack itself uses only θ*, the architecture and recipe (victim.json) and the label
counts. The victim's ``data.npz`` is read for evaluation-side work only: mapping results to
[0,1] with the training mean, and the initialisations that the paper studies as oracles
(``gt-noise``, ``interp``) or that use the held-out pool as public data (``heldout``, ``mean``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from recon_jax import bilevel, checkpoint
from recon_jax.artifacts import atomic_save_npz, atomic_write_json, json_roundtrip, read_json, versions
from recon_jax.batching import auto_chunk_size, run_batched
from recon_jax.errors import ConfigError
from recon_jax.initialisation import initial_images, parse_init
from recon_jax.models import count_params
from recon_jax.objectives import make_objective
from recon_jax.precision import resolve_dtype

log = logging.getLogger(__name__)
METHODS = ("bilevel",)


@dataclasses.dataclass(frozen=True)
class ReconstructionSpec:
    """One reconstruction run: initialisations × hyperparameters of one method against one victim.

    ``learning_rate``, ``box_weight`` and ``tv_weight`` take one value or a tuple; the run is
    the grid n_inits × |lr| × |box_weight| × |tv_weight| (initialisation-major: every
    hyperparameter combination sees the same initial images), K = the grid size, all in one
    vmapped program.
    """

    method: str = "bilevel"
    init: str = "gaussian:0.1"
    n_inits: int = 16
    seed: int = 0
    learning_rate: float | tuple[float, ...] = 0.01
    box_weight: float | tuple[float, ...] = 0.0
    tv_weight: float | tuple[float, ...] = 0.0
    chunk_size: int | None = None  # None: chosen from free memory
    segment: int = 100  # outer steps between checkpoints
    dtype: str | None = None  # None: the victim's dtype
    bilevel: bilevel.BilevelConfig = bilevel.BilevelConfig()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; available: {', '.join(METHODS)}")
        parse_init(self.init)
        if self.n_inits < 1:
            raise ConfigError(f"--n-inits must be >= 1, got {self.n_inits}")
        if not all(lr > 0 for lr in _values(self.learning_rate)):
            raise ConfigError(f"--lr must be > 0, got {self.learning_rate}")
        if any(w < 0 for w in _values(self.box_weight) + _values(self.tv_weight)):
            raise ConfigError("prior weights must be >= 0")
        if self.segment < 1:
            raise ConfigError(f"segment must be >= 1, got {self.segment}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def hyper_grid(self) -> list[tuple[float, float, float]]:
        """(lr, box_weight, tv_weight) combinations, in the order runs are laid out per init."""
        return list(itertools.product(_values(self.learning_rate), _values(self.box_weight),
                                      _values(self.tv_weight)))


def _values(value) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else (float(value),)


def problem_from_victim(victim: checkpoint.Victim) -> bilevel.Problem:
    """The attacker's view: θ*, known class-balanced labels, and the victim's training objective."""
    objective = make_objective(victim.model.apply, victim.train_config.loss, victim.train_config.weight_decay)
    return bilevel.Problem(victim_params=victim.params, labels=jnp.asarray(victim.known_labels()),
                           objective=objective)


def bytes_per_init(victim: checkpoint.Victim, config: bilevel.BilevelConfig, itemsize: int) -> int:
    """Rough footprint of one initialisation: images ×4 (x, Adam moments, gradient), θ-sized
    vectors (θ, warm starts, gradient, L-BFGS history 2m, CG 4), and activations."""
    n_params = count_params(victim.params)
    image_size = victim.n_train * int(np.prod(victim.image_shape))
    widths = sum(victim.model.hidden) + victim.model.n_out
    theta_vectors = 8 + 2 * config.inner.history_size + 4
    return itemsize * (4 * image_size + theta_vectors * n_params + 6 * victim.n_train * widths)


def sorted_ground_truth(directory) -> dict | None:
    """The victim's data.npz with training images sorted by label (stable), or None if absent."""
    path = Path(directory) / checkpoint.DATA_FILE
    if not path.is_file():
        return None
    truth = checkpoint.load_ground_truth(directory)
    order = np.argsort(truth["train_labels"], kind="stable")
    truth["train_images"] = truth["train_images"][order]
    truth["train_labels"] = truth["train_labels"][order]
    return truth


def to_unit(centered: np.ndarray, truth: dict | None) -> tuple[np.ndarray, str]:
    """Map mean-subtracted images to [0,1]: add the training mean and clip, or (with no
    ground truth at hand) min-max scale each image (BRIEF §4)."""
    if truth is not None:
        return np.clip(centered + truth["mean"], 0.0, 1.0).astype(np.float32), "add training mean, clip to [0,1]"
    axes = tuple(range(centered.ndim - 3, centered.ndim))
    lo, hi = centered.min(axis=axes, keepdims=True), centered.max(axis=axes, keepdims=True)
    return ((centered - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float32), "min-max scale per image"


def reconstruct(victim_dir: str | os.PathLike, out_dir: str | os.PathLike, spec: ReconstructionSpec, *,
                overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """Run ``spec`` against the victim in ``victim_dir`` and write ``out_dir`` (see module doc).

    A finished ``out_dir`` with the same spec is returned as is; an interrupted one resumes.
    """
    out_dir = Path(out_dir)
    victim = checkpoint.load_victim(victim_dir, dtype=spec.dtype)
    dtype = resolve_dtype(spec.dtype or victim.train_config.dtype)
    spec_json = {"victim": str(Path(victim_dir).resolve()), **spec.to_json()}
    spec_json = json_roundtrip(spec_json)
    if (out_dir / "run.json").is_file() and not overwrite:
        saved = read_json(out_dir / "run.json")
        if saved.get("spec") == spec_json:
            log.info("%s already holds this run; reusing it", out_dir)
            return saved
        raise ConfigError(f"{out_dir} already holds a different run; choose another --out or pass --overwrite")
    if overwrite and out_dir.exists():
        for name in ("run.json", "reconstructions.npz", "history.npz", "spec.json"):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "chunks", ignore_errors=True)
    chunks = out_dir / "chunks"
    if (out_dir / "spec.json").is_file() and read_json(out_dir / "spec.json") != spec_json:
        raise ConfigError(f"{out_dir} holds an interrupted run with a different spec; use another --out "
                          "or pass --overwrite")
    if not victim.report.get("stationary", False):
        log.warning("victim is not certified stationary (%s): theta* is not an exact argmin, so the bilevel "
                    "objective cannot reach 0 at the true images", victim.report.get("note", ""))
    atomic_write_json(out_dir / "spec.json", spec_json)

    init_spec = parse_init(spec.init)
    truth = sorted_ground_truth(victim_dir)
    problem = problem_from_victim(victim)
    labels = np.asarray(problem.labels)
    x0 = initial_images(init_spec, spec.n_inits, labels, victim.image_shape, seed=spec.seed,
                        ground_truth=truth, dtype=dtype)
    if not np.all(np.isfinite(x0)):
        raise ConfigError("initial images contain non-finite values")
    grid = np.asarray(spec.hyper_grid(), dtype)  # (G, 3)
    n_runs = spec.n_inits * len(grid)
    x0 = np.repeat(x0, len(grid), axis=0)  # run r uses init r // G and hyperparameters r % G
    hyper_values = np.tile(grid, (spec.n_inits, 1))
    hyper = bilevel.Hyper(learning_rate=jnp.asarray(hyper_values[:, 0]), box_weight=jnp.asarray(hyper_values[:, 1]),
                          tv_weight=jnp.asarray(hyper_values[:, 2]))
    chunk_size = spec.chunk_size or auto_chunk_size(
        n_runs, bytes_per_init(victim, spec.bilevel, np.dtype(dtype).itemsize))

    config = spec.bilevel
    start = time.perf_counter()
    states, history, final = run_batched(
        lambda x, h: bilevel.init_state(config, problem, x),
        lambda s, h, n: bilevel.run_steps(config, problem, h, s, n),
        lambda s, h: bilevel.evaluate(config, problem, s),
        jnp.asarray(x0), hyper, steps=config.steps, chunk_size=chunk_size, segment=spec.segment,
        checkpoint_dir=chunks, progress=progress)
    seconds = time.perf_counter() - start

    centered = np.asarray(states.images)
    images, mapping = to_unit(centered, truth)
    init_unit, _ = to_unit(x0, truth)
    atomic_save_npz(out_dir / "reconstructions.npz", images=images, init_images=init_unit,
                    centered=centered, init_centered=x0, labels=labels)
    atomic_save_npz(out_dir / "history.npz", **history)
    summary = {
        "spec": spec_json,
        "method": spec.method,
        "init": str(init_spec),
        "n_inits": spec.n_inits,
        "n_runs": n_runs,
        "run_init_index": (np.arange(n_runs) // len(grid)).tolist(),
        "run_learning_rate": hyper_values[:, 0].tolist(),
        "run_box_weight": hyper_values[:, 1].tolist(),
        "run_tv_weight": hyper_values[:, 2].tolist(),
        "n_images": int(len(labels)),
        "image_shape": list(victim.image_shape),
        "chunk_size": chunk_size,
        "dtype": np.dtype(dtype).name,
        "image_mapping": mapping,
        "victim_stationary": bool(victim.report.get("stationary", False)),
        "final_outer_loss": final["outer_loss"].tolist(),
        "final_inner_grad_norm": final["inner_grad_norm"].tolist(),
        "inner_converged": (final["inner_grad_norm"] <= config.inner.tol).tolist(),
        "diverged": final["diverged"].tolist(),
        "best_outer_loss": float(np.nanmin(np.where(final["diverged"], np.nan, final["outer_loss"])))
        if not np.all(final["diverged"]) else None,
        "seconds": seconds,
        "versions": versions(),
    }
    atomic_write_json(out_dir / "run.json", summary)
    shutil.rmtree(chunks, ignore_errors=True)
    return summary

