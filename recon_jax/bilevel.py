"""Bilevel reconstruction (Runkel et al. 2024): find images x whose training yields θ*.

    min_x  l(θ(x), θ*) + R(x)     s.t.  θ(x) ∈ argmin_θ L(θ; x, y)                 (BRIEF §2)

with the outer loss

    l2      l = ‖θ(x) − θ*‖² / ‖θ*‖²                       (default)
    cosine  l = 1 − ⟨θ(x), θ*⟩ / (‖θ(x)‖ ‖θ*‖)

over all parameters flattened, and optional priors on the mean-subtracted images x

    box     R = w_box Σ [relu(x − hi)² + relu(lo − x)²]   (or an exact projection onto [lo, hi])
    tv      R = w_tv Σ_n Σ_pixels sqrt(|∂_h x|² + |∂_w x|² + ε²)

The gradient reaches x through θ(x) by implicit differentiation (``recon_jax.solvers``).
Each outer step warm-starts the inner solver from the previous step's θ (from θ* at the
first step: at x = x_true, θ(x) = θ* exactly, and nearby x move it little) and the adjoint
CG from the previous adjoint vector. The outer optimiser is Adam (or SGD with momentum)
with the learning rate as a *traced* value, so that a batch of learning rates and prior
weights can be vmapped like initialisations.

Everything here is written for ONE initialisation. ``recon_jax.reconstruct`` vmaps,
chunks and checkpoints it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax import lax

from recon_jax.errors import ConfigError
from recon_jax.objectives import all_finite, squared_norm
from recon_jax.solvers import InnerConfig, make_argmin

OUTER_LOSSES = ("l2", "cosine")
OPTIMIZERS = ("adam", "sgd")
BOX_MODES = ("none", "penalty", "project")
WARM_STARTS = ("previous", "victim")


@dataclasses.dataclass(frozen=True)
class BilevelConfig:
    """Static settings of the outer problem (hyperparameters that vmap live in ``Hyper``)."""

    steps: int = 300
    outer_loss: str = "l2"
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only
    box: str = "none"
    box_bounds: tuple[float, float] = (-1.0, 1.0)
    tv_epsilon: float = 1e-3
    warm_start: str = "previous"
    record_cg_residual: bool = True
    inner: InnerConfig = InnerConfig()

    def __post_init__(self):
        for name, value, allowed in (("outer_loss", self.outer_loss, OUTER_LOSSES),
                                     ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("box", self.box, BOX_MODES), ("warm_start", self.warm_start, WARM_STARTS)):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        if not self.box_bounds[0] < self.box_bounds[1]:
            raise ConfigError(f"box bounds must satisfy lo < hi, got {self.box_bounds}")


@struct.dataclass
class Hyper:
    """Per-initialisation hyperparameters (scalars here; arrays of shape (K,) when vmapped)."""

    learning_rate: jax.Array
    box_weight: jax.Array = 0.0
    tv_weight: jax.Array = 0.0


@struct.dataclass
class Problem:
    """What the attacker knows: θ*, the labels y (N,), and the inner objective L(θ; x, y)."""

    victim_params: dict
    labels: jax.Array
    objective: Callable = struct.field(pytree_node=False)


@struct.dataclass
class OuterState:
    """State of one initialisation between outer steps."""

    images: jax.Array  # x, (N, h, w, c), mean-subtracted
    opt_state: optax.OptState
    inner_params: dict  # θ from the last inner solve (warm start)
    adjoint: dict  # v from the last adjoint solve (CG warm start)
    step: jax.Array
    diverged: jax.Array  # bool: a non-finite loss or gradient was met; the state froze there


def parameter_loss(kind: str, params, victim_params) -> jax.Array:
    """l(θ, θ*): relative squared L2 or cosine distance over all leaves (a scalar)."""
    if kind == "l2":
        diff = jax.tree_util.tree_map(jnp.subtract, params, victim_params)
        return squared_norm(diff) / squared_norm(victim_params)
    if kind == "cosine":
        dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                  jax.tree_util.tree_leaves(victim_params)))
        return 1.0 - dot / jnp.sqrt(squared_norm(params) * squared_norm(victim_params))
    raise ConfigError(f"unknown outer loss {kind!r}; choose one of {', '.join(OUTER_LOSSES)}")


def box_penalty(images: jax.Array, lo: float, hi: float) -> jax.Array:
    """Σ relu(x − hi)² + relu(lo − x)² over all pixels: (N,h,w,c) -> scalar."""
    return jnp.sum(jax.nn.relu(images - hi) ** 2 + jax.nn.relu(lo - images) ** 2)


def total_variation(images: jax.Array, epsilon: float) -> jax.Array:
    """Isotropic, smoothed TV: Σ sqrt(Δ_h² + Δ_w² + ε²) summed over channels; (N,h,w,c) -> scalar."""
    d_h = images[:, 1:, :-1, :] - images[:, :-1, :-1, :]
    d_w = images[:, :-1, 1:, :] - images[:, :-1, :-1, :]
    return jnp.sum(jnp.sqrt(d_h ** 2 + d_w ** 2 + epsilon ** 2))


def image_prior(config: BilevelConfig, hyper: Hyper, images: jax.Array) -> jax.Array:
    """R(x) = w_box · box_penalty (if box == 'penalty') + w_tv · TV."""
    prior = hyper.tv_weight * total_variation(images, config.tv_epsilon)
    if config.box == "penalty":
        prior = prior + hyper.box_weight * box_penalty(images, *config.box_bounds)
    return prior


def _optimizer(config: BilevelConfig) -> optax.GradientTransformation:
    # The learning rate is applied outside, so that it can be a traced, vmapped value.
    if config.optimizer == "adam":
        return optax.scale_by_adam()
    return optax.trace(decay=config.momentum)


def init_state(config: BilevelConfig, problem: Problem, images: jax.Array) -> OuterState:
    """The state before the first step, from initial images x₀ (N, h, w, c)."""
    if config.box == "project":
        images = jnp.clip(images, *config.box_bounds)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, problem.victim_params)
    return OuterState(images=images, opt_state=_optimizer(config).init(images),
                      inner_params=problem.victim_params, adjoint=zeros, step=jnp.asarray(0),
                      diverged=jnp.asarray(False))


def outer_step(config: BilevelConfig, problem: Problem, hyper: Hyper, state: OuterState):
    """One outer step: inner solve, implicit hypergradient, optimiser update.

    Returns (new_state, record) with record = {outer_loss, objective, inner_grad_norm,
    inner_iterations, cg_residual}; ``outer_loss`` is l(θ(x), θ*) at
    the images *before* the update. A non-finite loss or gradient freezes this
    initialisation and sets ``diverged``; other initialisations are unaffected.
    """
    argmin = make_argmin(problem.objective, config.inner)
    start = state.inner_params if config.warm_start == "previous" else problem.victim_params
    probe = jax.tree_util.tree_map(jnp.zeros_like, problem.victim_params)

    def objective(images, probe):
        params, info = argmin(start, images, problem.labels, probe, state.adjoint)
        outer = parameter_loss(config.outer_loss, params, problem.victim_params)
        return outer + image_prior(config, hyper, images), (params, info, outer)

    (total, (params, info, outer)), (grad_images, grad_probe) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True)(state.images, probe)
    adjoint = jax.tree_util.tree_map(jnp.negative, grad_probe)  # v = (H + ρI)⁻¹ ∂l/∂θ

    if config.record_cg_residual:
        # ‖(H + ρI)v − ∂l/∂θ‖ / ‖∂l/∂θ‖: one extra Hessian-vector product per step.
        cotangent = jax.grad(lambda p: parameter_loss(config.outer_loss, p, problem.victim_params))(params)
        grad_theta = lambda p: jax.grad(problem.objective)(p, state.images, problem.labels)
        hv = jax.jvp(grad_theta, (params,), (adjoint,))[1]
        residual = jax.tree_util.tree_map(lambda a, b, c: a + config.inner.cg_ridge * b - c, hv, adjoint, cotangent)
        cg_residual = jnp.sqrt(squared_norm(residual) / squared_norm(cotangent))
    else:
        cg_residual = jnp.asarray(jnp.nan, total.dtype)

    tx = _optimizer(config)
    updates, opt_state = tx.update(grad_images, state.opt_state, state.images)
    images = state.images - hyper.learning_rate * updates
    if config.box == "project":
        images = jnp.clip(images, *config.box_bounds)

    ok = jnp.isfinite(total) & all_finite(grad_images) & all_finite(params) & ~state.diverged
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = OuterState(images=keep(images, state.images), opt_state=keep(opt_state, state.opt_state),
                           inner_params=keep(params, state.inner_params), adjoint=keep(adjoint, state.adjoint),
                           step=state.step + 1, diverged=~ok)
    record = {"outer_loss": outer, "objective": total, "inner_grad_norm": info.grad_norm,
              "inner_iterations": info.iterations, "cg_residual": cg_residual}
    return new_state, record


def run_steps(config: BilevelConfig, problem: Problem, hyper: Hyper, state: OuterState, n_steps: int):
    """``n_steps`` outer steps as one ``lax.scan``: (state, {name: (n_steps,)} history)."""
    return lax.scan(lambda s, _: outer_step(config, problem, hyper, s), state, None, length=n_steps)


def evaluate(config: BilevelConfig, problem: Problem, state: OuterState) -> dict:
    """l(θ(x), θ*) and the inner figures at the current images (no gradient, no update)."""
    argmin = make_argmin(problem.objective, config.inner)
    probe = jax.tree_util.tree_map(jnp.zeros_like, problem.victim_params)
    params, info = argmin(state.inner_params, state.images, problem.labels, probe, state.adjoint)
    return {"outer_loss": parameter_loss(config.outer_loss, params, problem.victim_params),
            "inner_grad_norm": info.grad_norm, "inner_iterations": info.iterations,
            "diverged": state.diverged}


def hypergradient(config: BilevelConfig, problem: Problem, images: jax.Array, init_params=None):
    """(l(θ(x), θ*), ∇_x l) at images x (N,h,w,c), with a cold adjoint: for tests and probes."""
    argmin = make_argmin(problem.objective, config.inner)
    start = problem.victim_params if init_params is None else init_params
    zeros = jax.tree_util.tree_map(jnp.zeros_like, problem.victim_params)

    def outer(images):
        params, _ = argmin(start, images, problem.labels, zeros, zeros)
        return parameter_loss(config.outer_loss, params, problem.victim_params)

    return jax.value_and_grad(outer)(images)
