"""Victim training to a certified stationary point, full batch, with jaxopt.

    θ* ∈ argmin_θ L(θ; x, y) = (1/N) Σ_i ℓ(𝒩(θ; x_i), y_i) + (λ_wd/2) ‖θ‖²

The bilevel attack (BRIEF §2) rests on ∇_θL(θ*; x_true) = 0: only then is θ* the argmin of
the inner problem at the true images, and only then does warm-starting the inner solver
from θ* make sense. So a victim is *certified* stationary only when the final
‖∇_θL(θ*)‖₂, recomputed after training, is at most ``certify_tol`` (default 1e-8 in
float64, 1e-5 in float32). Otherwise training warns with the figure and the victim's
metadata says ``stationary: false``.

Smooth activations (gelu, softplus, tanh) and the affine model reach ‖∇L‖ ≈ 1e-10 with
L-BFGS in float64 within a few hundred iterations. relu victims stall near 1e-4 because L
is not differentiable where a pre-activation crosses 0: a nonsmooth stationary point is
not a zero of the gradient, which is what implicit differentiation needs.

The solver runs in jitted segments of ``segment`` iterations, so long runs report progress
and stop as soon as the tolerance is met.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np
from jax import lax

from recon_jax.errors import ConfigError
from recon_jax.models import SMOOTH_ACTIVATIONS, MLP, count_params
from recon_jax.objectives import accuracy, make_objective, squared_norm
from recon_jax.precision import cast_tree, resolve_dtype

log = logging.getLogger(__name__)

SOLVERS = ("lbfgs", "gd")
DEFAULT_SOLVER_TOL = {"float64": 1e-10, "float32": 1e-6}
DEFAULT_CERTIFY_TOL = {"float64": 1e-8, "float32": 1e-5}


class NotStationaryWarning(UserWarning):
    """Training ended with ‖∇L‖ above the certification tolerance."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train a victim. ``tol`` / ``certify_tol`` default by dtype (see module doc)."""

    loss: str = "ce"
    weight_decay: float = 1e-3
    solver: str = "lbfgs"
    maxiter: int = 3000
    tol: float | None = None
    certify_tol: float | None = None
    dtype: str = "float64"
    learning_rate: float | None = None  # gd only: fixed step; None = backtracking line search
    acceleration: bool = False  # gd only: Nesterov/FISTA acceleration
    history_size: int = 10  # lbfgs only
    segment: int = 100

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ConfigError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}; use 0 for none")
        if self.maxiter < 1 or self.segment < 1:
            raise ConfigError("maxiter and segment must be >= 1")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.learning_rate}")

    @property
    def resolved_tol(self) -> float:
        return self.tol if self.tol is not None else DEFAULT_SOLVER_TOL[self.dtype]

    @property
    def resolved_certify_tol(self) -> float:
        return self.certify_tol if self.certify_tol is not None else DEFAULT_CERTIFY_TOL[self.dtype]


@dataclasses.dataclass(frozen=True)
class TrainReport:
    """What training achieved; ``stationary`` is the certificate the bilevel attack needs."""

    grad_norm: float  # ‖∇_θL(θ*)‖₂
    grad_norm_rel: float  # ‖∇_θL(θ*)‖₂ / ‖θ*‖₂
    loss: float
    train_accuracy: float
    heldout_accuracy: float | None
    n_params: int
    iterations: int
    stationary: bool
    certify_tol: float
    seconds: float
    solver: str
    dtype: str
    note: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_solver(objective: Callable, config: TrainConfig):
    """The jaxopt solver for ``config``: LBFGS, or GradientDescent (fixed step or line search)."""
    tol = config.resolved_tol
    if config.solver == "lbfgs":
        return jaxopt.LBFGS(fun=objective, tol=tol, maxiter=config.maxiter,
                            history_size=config.history_size, jit=True)
    return jaxopt.GradientDescent(fun=objective, tol=tol, maxiter=config.maxiter,
                                  stepsize=config.learning_rate or 0.0,
                                  acceleration=config.acceleration, jit=True)


def certificate_note(grad_norm: float, certify_tol: float, iterations: int, activation: str,
                     dtype: str = "float64") -> str:
    """A one-line human explanation of the stationarity verdict."""
    if grad_norm <= certify_tol:
        return f"certified stationary: ||grad L|| = {grad_norm:.2e} <= {certify_tol:.0e}"
    why = ""
    if activation not in (*SMOOTH_ACTIVATIONS, "affine"):
        why = (f" The {activation} activation has kinks where L is not differentiable; gradient methods "
               "stall there, and the bilevel method (implicit differentiation) needs a smooth victim: "
               "use gelu, softplus or tanh.")
    return (f"NOT stationary: ||grad L|| = {grad_norm:.2e} > {certify_tol:.0e} after {iterations} "
            f"iterations.{why} {'Otherwise r' if why else 'R'}aise --maxiter"
            f"{', or train in float64' if dtype != 'float64' else ''}.")


def train_victim(model: MLP, init_params, images, labels, config: TrainConfig, *,
                 heldout_images=None, heldout_labels=None,
                 progress: Callable[[int, float], None] | None = None):
    """Train ``model`` full-batch from ``init_params`` until ‖∇L‖ ≤ tol or ``maxiter``.

    Args:
      images: (N, h, w, c) mean-subtracted training images; labels: (N,) class indices.
      heldout_images / heldout_labels: optional (M, h, w, c) / (M,) for held-out accuracy.
      progress: called as ``progress(iterations, grad_norm)`` after each segment.

    Returns:
      (params θ*, TrainReport). Warns ``NotStationaryWarning`` when not certified.
    """
    dtype = resolve_dtype(config.dtype)
    images = jnp.asarray(images, dtype)
    labels = jnp.asarray(labels)
    params = cast_tree(init_params, dtype)
    objective = make_objective(model.apply, config.loss, config.weight_decay)
    solver = make_solver(objective, config)
    tol = config.resolved_tol

    @jax.jit
    def run_segment(params, state, n_steps):
        def cond(carry):
            _, state, k = carry
            return (k < n_steps) & (state.error > tol)

        def body(carry):
            params, state, k = carry
            params, state = solver.update(params, state, images, labels)
            return params, state, k + 1

        return lax.while_loop(cond, body, (params, state, 0))

    start = time.perf_counter()
    state = solver.init_state(params, images, labels)
    iterations = 0
    while iterations < config.maxiter:
        n_steps = min(config.segment, config.maxiter - iterations)
        params, state, done = run_segment(params, state, n_steps)
        iterations += int(done)
        error = float(state.error)
        if progress is not None:
            progress(iterations, error)
        log.debug("iteration %d: solver error %.3e", iterations, error)
        if int(done) < n_steps or not math.isfinite(error):
            break
    params = jax.block_until_ready(params)
    seconds = time.perf_counter() - start

    loss, grad = jax.value_and_grad(objective)(params, images, labels)
    grad_norm = float(jnp.sqrt(squared_norm(grad)))
    param_norm = float(jnp.sqrt(squared_norm(params)))
    certify_tol = config.resolved_certify_tol
    stationary = bool(np.isfinite(grad_norm) and grad_norm <= certify_tol)
    heldout_accuracy = None
    if heldout_images is not None:
        heldout_accuracy = accuracy(model.apply(params, jnp.asarray(heldout_images, dtype)),
                                    jnp.asarray(heldout_labels))
    note = certificate_note(grad_norm, certify_tol, iterations, model.activation if model.hidden else "affine",
                            config.dtype)
    report = TrainReport(
        grad_norm=grad_norm, grad_norm_rel=grad_norm / max(param_norm, np.finfo(dtype).tiny),
        loss=float(loss), train_accuracy=accuracy(model.apply(params, images), labels),
        heldout_accuracy=heldout_accuracy, n_params=count_params(params), iterations=iterations,
        stationary=stationary, certify_tol=certify_tol, seconds=seconds, solver=config.solver,
        dtype=config.dtype, note=note)
    if not stationary:
        warnings.warn(note, NotStationaryWarning, stacklevel=2)
    return params, report
