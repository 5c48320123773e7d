"""Bilevel reconstruction (Runkel et al. 2024): find images x whose training yields θ*.

    min_x  l(θ(x), θ*) + R(x)     s.t.  θ(x) ∈ argmin_θ L(θ; x, y)     (Runkel et al. 2024)

with the outer loss

    l2      l = ‖θ(x) − θ*‖² / ‖θ*‖²                       (default)
    cosine  l = 1 − ⟨θ(x), θ*⟩ / (‖θ(x)‖ ‖θ*‖)

over all parameters flattened, and optional priors on the mean-subtracted images x

    box     R = w_box Σ [relu(x − hi)² + relu(lo − x)²]   (or an exact projection onto [lo, hi])
    tv      R = w_tv Σ_n Σ_pixels sqrt(|∂_h x|² + |∂_w x|² + ε²)

The gradient reaches x through θ(x) by the implicit function theorem: at ∇_θL(θ(x); x) = 0,

    ∇_x l = −(∂_x∇_θL)ᵀ v,      (H + ρI) v = ∂l/∂θ,      H = ∇²_θL(θ(x); x)              (IFT)

Two engines compute it (``BilevelConfig.engine``; the default "auto" takes the amortized one,
with a CG adjoint for a convex inner problem and a MINRES adjoint otherwise; see
``resolve_engine`` and ``solver_for``):

``"amortized"``: explicit, amortized hypergradients in the spirit of Arbel & Mairal,
  "Amortized implicit differentiation for stochastic bilevel optimization" (ICLR 2022), with
  the curvature of the forward solve shared with the adjoint as in Ramzi et al., "SHINE"
  (ICLR 2022). θ and v are CARRIED across outer steps; each step spends a fixed budget:

      θ ← θ + αd,  (H(θ) + ρI) d = −∇_θL(θ; x)          ``newton_steps`` × ``newton_cg`` CG iterations,
                                                         α ∈ {1, ½, ¼, ⅛, 0} by a parallel Armijo test
      g = ∂l/∂θ(θ),  (H(θ) + ρI) v = g                     ``adjoint_cg`` CG (convex) or MINRES iterations, warm from v
      ∇_x = −(∂_x∇_θL(θ; x))ᵀ v                             one VJP

  The Newton system's Hessian-vector products come from one ``jax.linearize`` of ∇_θL
  (``recon_jax.newton``); the adjoint's, and the cross-term VJP, from one ``jax.vjp`` of
  ∇_θL in (θ, x) at the updated θ (H is symmetric, so its VJP is its product). Every loop
  has a fixed length with masks (no data-dependent ``while_loop``: under ``vmap`` and
  shardings each initialisation's arithmetic is its own),
  and the step's gradient norm ‖∇_θL(θ; x)‖ and CG residual come out of the same products.
  By default (``product_precision="float32"``) a float64 run computes those products and the
  cross-term VJP in float32, and everything they are compared against (∇_θL, ∂l/∂θ, the CG
  recurrences, the line search) in float64: the Newton iteration still converges to the
  float64 θ(x), and the hypergradient's error floor, ~1e-6 relative, sits far below the
  amortisation's own ~1e-2.
  Every ``refresh_every`` steps, and always at step 0 (from θ* and v = 0 a random x₀ is far
  from θ(x₀): an amortized start there fails), θ is re-solved to the inner tolerance, by
  line-searched Newton–CG with fixed budgets for a convex inner problem and by L-BFGS with a
  fixed-length line search otherwise (``refresh_solver_for``, ``recon_jax.lbfgs``), and v by CG or MINRES to the CG tolerance
  (``refresh``): a periodic exact check whose correction ‖θ_amortized − θ_exact‖/‖θ‖ is recorded as ``refresh_correction``.
``"implicit"``: the reference path. Each outer step solves the inner problem with L-BFGS to
  ``inner.tol`` (warm-started from the previous θ) and differentiates the argmin with
  jaxopt's implicit differentiation (``recon_jax.solvers.make_argmin``): exact to the
  tolerances, but 50–230 gradient-equivalents per step and nested while_loops under vmap.

The outer optimiser is Adam (or SGD with momentum) with the learning rate as a *traced*
value, so that a batch of learning rates and prior weights can be vmapped like
initialisations, multiplied by a schedule s(t) (``lr_schedule``). The default,
``schedule="plateau"``, is a short linear warm-up, then the rate halves after every
``plateau_patience`` steps without a new best objective (reduce-on-plateau, per
initialisation); ``"cosine"`` decays it over the whole run to ``final_lr_fraction``. A fixed
learning rate keeps moving pixels at the optimum of this deterministic outer problem:
measured on Fashion-MNIST, the objective dipped to ~1e-6 and then rose again; either decay
removes that. Under "plateau" a run that has stalled has a vanishing rate, so more steps do
not move it: to test what more steps do, use "cosine" with the larger ``steps``.

Everything here is written for ONE initialisation. ``recon_jax.reconstruct`` vmaps,
chunks and checkpoints it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax

from recon_jax.attack import (Attack, Convergence, Method, box_penalty, descent_direction, freeze, register_attack,
                              register_descriptor, restart_plateau, scan_steps)
from recon_jax.errors import ConfigError
from recon_jax import lbfgs
from recon_jax.objectives import all_finite, squared_norm
from recon_jax.precision import FLOAT32_REACHABLE_TOL, cast_tree, default_tolerances, tree_dtype
from recon_jax.search import resolve_ranges
from recon_jax.newton import (LINE_SEARCH_STEPS, conjugate_gradient, conjugate_gradient_to_tolerance, gradient_and_hvp,
                              guarded_newton_step, lowers_precision, minimal_residual, minimize)
from recon_jax.solvers import InnerConfig, InnerInfo, make_argmin, make_solve

OUTER_LOSSES = ("l2", "cosine")
OPTIMIZERS = ("adam", "sgd")  # recon_jax.attack.descent_direction
BOX_MODES = ("none", "penalty", "project")
WARM_STARTS = ("previous", "victim")
ENGINES = ("auto", "amortized", "implicit")
ADJOINT_HESSIANS = ("shared", "updated")
PRODUCT_PRECISIONS = ("full", "float32")
ADJOINT_SOLVERS = ("auto", "cg", "minres")
REFRESH_SOLVERS = ("auto", "newton", "lbfgs", "jaxopt")
SCHEDULES = ("plateau", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class BilevelConfig:
    """Static settings of the outer problem (hyperparameters that vmap live in ``Hyper``).

    Engine budgets (``engine="amortized"``, see the module docstring): ``newton_steps`` Newton
    steps of ``newton_cg`` CG iterations and ``adjoint_cg`` adjoint CG iterations per outer step,
    an exact refresh every ``refresh_every`` steps (0: at step 0 only). CG stops early (masked)
    at ``inner.cg_tol``; the ridge ρ is ``inner.cg_ridge``. ``adjoint_solver`` solves the
    adjoint system, per step and at the refresh: "cg", "minres" (for an indefinite H), or
    "auto" = CG for a convex inner problem and MINRES otherwise (``solver_for``); with
    ``adjoint_hessian="shared"`` the per-step adjoint is part of the block CG whatever it says.
    ``refresh_solver`` re-solves θ at a refresh and at the final evaluation: "newton" (at most
    ``refresh_newton_steps`` line-searched Newton steps of ``refresh_cg`` CG iterations each,
    ``recon_jax.newton.minimize``), "lbfgs" (L-BFGS with a fixed-length parallel line search,
    ``recon_jax.lbfgs.minimize``, with ``inner``'s history size and iteration cap), "jaxopt"
    (``inner``'s jaxopt L-BFGS, the solver before 2026-12-02), or "auto" = Newton for a convex
    inner problem and "lbfgs" otherwise (``refresh_solver_for``).
    ``product_precision="float32"`` runs
    the Hessian products and the cross-term VJP of a float64 run in float32 (``_product_dtype``).
    The learning rate is scaled by the schedule s(t) (``schedule``, ``warmup_steps``,
    ``final_lr_fraction``).
    """

    steps: int = 1000
    outer_loss: str = "l2"
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only
    box: str = "none"
    box_bounds: tuple[float, float] = (-1.0, 1.0)
    tv_epsilon: float = 1e-3
    warm_start: str = "previous"
    record_cg_residual: bool = True  # implicit engine: one extra HVP per step for the adjoint residual
    inner: InnerConfig = InnerConfig()
    engine: str = "auto"
    newton_steps: int = 1
    newton_cg: int = 6
    adjoint_cg: int = 7
    refresh_every: int = 100
    adjoint_hessian: str = "updated"
    adjoint_solver: str = "auto"
    refresh_solver: str = "auto"
    refresh_cg: int = 10
    refresh_newton_steps: int = 50
    product_precision: str = "float32"
    schedule: str = "plateau"
    warmup_steps: int = 20
    final_lr_fraction: float = 0.01  # cosine only
    plateau_patience: int = 20  # plateau only: steps without improvement before the rate is cut
    plateau_factor: float = 0.5  # plateau only: the cut

    def __post_init__(self):
        for name, value, allowed in (("outer_loss", self.outer_loss, OUTER_LOSSES),
                                     ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("box", self.box, BOX_MODES), ("warm_start", self.warm_start, WARM_STARTS),
                                     ("engine", self.engine, ENGINES), ("schedule", self.schedule, SCHEDULES),
                                     ("adjoint_hessian", self.adjoint_hessian, ADJOINT_HESSIANS),
                                     ("adjoint_solver", self.adjoint_solver, ADJOINT_SOLVERS),
                                     ("refresh_solver", self.refresh_solver, REFRESH_SOLVERS),
                                     ("product_precision", self.product_precision, PRODUCT_PRECISIONS)):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        if not self.box_bounds[0] < self.box_bounds[1]:
            raise ConfigError(f"box bounds must satisfy lo < hi, got {self.box_bounds}")
        if min(self.newton_steps, self.newton_cg, self.adjoint_cg, self.refresh_cg, self.refresh_newton_steps) < 1:
            raise ConfigError(f"the amortized budgets must be >= 1: newton_steps={self.newton_steps}, "
                              f"newton_cg={self.newton_cg}, adjoint_cg={self.adjoint_cg}, "
                              f"refresh_cg={self.refresh_cg}, refresh_newton_steps={self.refresh_newton_steps}")
        if self.engine != "implicit" and self.warm_start != "previous":
            raise ConfigError("the amortized engine carries θ between steps; warm_start='victim' needs "
                              "engine='implicit'")
        if self.refresh_every < 0 or self.warmup_steps < 0:
            raise ConfigError("refresh_every and warmup_steps must be >= 0 (refresh_every 0: refresh at step 0 only)")
        if self.plateau_patience < 1 or not 0 < self.plateau_factor < 1:
            raise ConfigError(f"plateau_patience must be >= 1 and 0 < plateau_factor < 1, got "
                              f"{self.plateau_patience} and {self.plateau_factor}")
        if not 0 < self.final_lr_fraction <= 1:
            raise ConfigError(f"final_lr_fraction must be in (0, 1], got {self.final_lr_fraction}")

    def cost_per_step(self, dtype=None) -> dict:
        """Gradient evaluations and Hessian-vector-type products (JVPs/VJPs through ∇_θL) one
        amortized step spends, refreshes excluded (the history counts those per step).

        shared:  1 gradient;  2 × newton_cg products (the block CG's two systems, computed
                 together) + 1 (the warm-started adjoint's initial residual) + 1 VJP
                 + (newton_steps − 1) × (1 gradient + newton_cg products)
        updated: newton_steps + 1 gradients;  newton_steps × newton_cg + adjoint_cg + 1 + 1 VJP
                 (the last gradient is the primal pass of the VJP linearisation that gives both
                 the adjoint's products and the cross-term VJP)
        "values" counts the loss evaluations (forward passes only) of the Newton steps' parallel
        Armijo line search (``recon_jax.newton.guarded_newton_step``): its 4 trial steps (L(θ)
        itself comes out of the step's linearisation).
        With ``product_precision="float32"`` and θ in ``dtype`` wider than float32 (float64 when
        ``dtype`` is None, the bilevel default), each Newton step adds one gradient (its
        full-precision ∇_θL beside the float32 linearisation), and "float32" counts the
        gradients and products that ran in float32 (0 otherwise).
        """
        n = self.newton_steps
        reduced = lowers_precision(_product_dtype(self), np.float64 if dtype is None else dtype)
        if self.adjoint_hessian == "shared":
            cost = {"gradients": n, "values": len(LINE_SEARCH_STEPS) * (n - 1),
                    "hvps": 2 * self.newton_cg + 2 + (n - 1) * self.newton_cg}
            linearisations = n
        else:
            cost = {"gradients": n + 1, "values": len(LINE_SEARCH_STEPS) * n,
                    "hvps": n * self.newton_cg + self.adjoint_cg + 2}
            linearisations = n + 1
        cost["float32"] = linearisations + cost["hvps"] if reduced else 0
        cost["gradients"] += n if reduced else 0
        return cost


def lr_schedule(config: BilevelConfig, step: jax.Array) -> jax.Array:
    """s(t), the factor on the learning rate at outer step t (0-based):

        constant   s(t) = 1
        plateau    s(t) = min(1, (t + 1)/W) here; the optimiser then multiplies its update by
                   ``plateau_factor`` each time the objective has not improved on its best for
                   ``plateau_patience`` steps (optax.contrib.reduce_on_plateau, per initialisation),
                   the best counted from step W on (``attack.restart_plateau``)
        cosine     s(t) = (t + 1)/W for t < W;  then  f + (1 − f) · ½ (1 + cos(π (t − W)/(T − W)))

    with W = ``warmup_steps``, T = ``steps`` and f = ``final_lr_fraction``.
    """
    t = jnp.asarray(step, jnp.float32)
    if config.schedule == "constant":
        return jnp.ones_like(t)
    warm = float(config.warmup_steps)
    if config.schedule == "plateau":
        return jnp.minimum(1.0, (t + 1.0) / max(warm, 1.0))
    span = max(float(config.steps) - warm, 1.0)
    progress = jnp.clip((t - warm) / span, 0.0, 1.0)
    f = config.final_lr_fraction
    decay = f + (1.0 - f) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(t < warm, (t + 1.0) / max(warm, 1.0), decay)


@struct.dataclass
class Hyper:
    """Per-initialisation hyperparameters (scalars here; arrays of shape (K,) when vmapped)."""

    learning_rate: jax.Array
    box_weight: jax.Array = 0.0
    tv_weight: jax.Array = 0.0


@struct.dataclass
class Problem:
    """What the attacker knows: θ*, the labels y (N,), and the inner objective L(θ; x, y).

    ``convex``: the inner problem is strongly convex in θ (an affine victim with weight decay),
    which picks the amortized adjoint's solver when ``BilevelConfig.adjoint_solver == "auto"``
    (CG if convex, MINRES otherwise; ``solver_for``). False is always safe: MINRES also solves
    a positive definite system.
    """

    victim_params: dict
    labels: jax.Array
    objective: Callable = struct.field(pytree_node=False)
    convex: bool = struct.field(pytree_node=False, default=False)


def resolve_engine(config: BilevelConfig, problem: Problem) -> str:
    """The engine that runs: ``config.engine``, with "auto" = "amortized".

    Why: measured with ``benchmarks/engines.py`` (a study's bilevel cells under both engines,
    side by side), the amortized engine with its MINRES adjoint (``solver_for``) gives the
    implicit engine's figures on every victim checked, 5–17× faster:
    - MNIST, quick grid (200 steps), gelu 784-8-10 at N = 10 and 30 and 784-32-10 at N = 10:
      AUC within 0.002, own SSIM within 0.004, final losses within a factor 1.2;
    - MNIST, full grid (1000 steps), 784-16-10 at N = 10 and 50: AUC within 0.020, own SSIM
      within 0.003; at N = 50 the amortized run ends lower (0.029 against 0.053);
    - CIFAR-10, quick grid, 3072-8-10 at N = 10 and 30 and 3072-32-10 at N = 10: AUC within
      0.013; own SSIM 0.906 / 0.905 on width 32, and 0.454 / 0.420 on width 8 at N = 10;
    - CIFAR-10, the CNN of ``experiments/cnn_cifar10.toml`` (N = 10, 100 steps): AUC equal,
      own SSIM within 0.015.
    With the CG adjoint the CIFAR-10 width-32 run stalled at its start (own SSIM 0.155 against
    0.905), which is why hidden layers used to get the implicit engine. The implicit engine
    stays the reference (``engine="implicit"``) and the one to check a new kind of victim with.
    """
    return engine_for(config.engine, problem.convex)


def solver_for(solver: str, convex: bool) -> str:
    """The amortized adjoint's solver: ``solver``, with "auto" = "cg" for a convex inner
    problem (H positive definite: CG's error is least in the H-norm) and "minres" otherwise.

    Why: with hidden layers the carried θ sits near, not at, θ(x), and there H can have small
    negative eigenvalues. Measured on CIFAR-10 3072-32-10 gelu with 10 images (gaussian:0.1,
    Lanczos on H at the carried θ every 8 steps): the smallest Ritz value ran between −4e-4 and
    +1e-4 against a largest of 2e-2, and the 7-iteration CG adjoint warm-started from the
    previous v reached residuals ‖Hv − g‖/‖g‖ of 1e3–1e7 with ‖v‖ growing from 2e4 to 2e8: the
    hypergradient was noise and the run stalled at outer loss 1.1 where the implicit engine
    reaches 0.15. MINRES minimises the residual over the same Krylov space, so it never ends
    worse than its (scaled) warm start (``recon_jax.newton.minimal_residual``).
    """
    if solver != "auto":
        return solver
    return "cg" if convex else "minres"


def refresh_solver_for(solver: str, convex: bool) -> str:
    """The amortized engine's accurate inner solver (at a refresh and at the final evaluation):
    ``solver``, with "auto" = "newton" (``recon_jax.newton.minimize``) for a convex inner
    problem and "lbfgs" (``recon_jax.lbfgs.minimize``) otherwise.

    Why: all of them stop at ‖∇_θL‖ ≤ inner.tol, but under ``vmap`` jaxopt's L-BFGS ("jaxopt")
    is a while_loop over a while_loop line search, with the whole solver state selected at
    every iteration of either, while Newton's and ``recon_jax.lbfgs``'s bodies have a fixed
    length. Measured on 64 gaussian:0.1 initialisations of 20 MNIST images (affine, float64,
    from θ* to 1e-10): jaxopt took 31 iterations, 1.50 s vmapped against 0.62 s for 64
    sequential solves; Newton 8 steps of 10 CG iterations, 0.35 s against 0.30 s. For a
    non-convex inner problem far from its minimum (784-256-10 gelu at gaussian images) the
    line-searched Newton–CG stalled (‖∇_θL‖ 0.25 after 50 steps of 5 CG iterations), so "auto"
    takes L-BFGS there. On 8 gaussian:0.1 initialisations of 50 MNIST images, 784-64-10 gelu,
    from θ* to 1e-10 with at most 500 iterations: ``recon_jax.lbfgs`` converged on all 8 in
    84–96 iterations, 0.98 s for 8 sequential solves and 2.25 s vmapped; jaxopt's ran all 500
    iterations on all 8 and ended at ‖∇_θL‖ between 0.35 and 2e-10, in 10.9 s sequential and
    40.5 s vmapped.
    """
    if solver != "auto":
        return solver
    return "newton" if convex else "lbfgs"


def engine_for(engine: str, convex: bool) -> str:
    """``resolve_engine`` from the setting and the inner problem's convexity alone (what a study
    needs to key a cell by the engine that runs it, before any victim is loaded). "auto" is the
    amortized engine for every victim; ``convex`` picks its adjoint solver (``solver_for``)."""
    del convex  # the engine no longer depends on it (until 2026-12: implicit for non-convex)
    return "amortized" if engine == "auto" else engine


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


def _optimizer(config: BilevelConfig) -> optax.GradientTransformationExtraArgs:
    """The direction u(∇_x) (``recon_jax.attack.descent_direction``): Adam or heavy-ball momentum,
    then (schedule 'plateau') the reduce-on-plateau factor. The learning rate is applied
    outside, so that it can be a traced, vmapped value."""
    plateau = (config.plateau_factor, config.plateau_patience) if config.schedule == "plateau" else None
    return descent_direction(config.optimizer, config.momentum, extra_args=True, plateau=plateau)


def init_state(config: BilevelConfig, problem: Problem, images: jax.Array) -> OuterState:
    """The state before the first step, from initial images x₀ (N, h, w, c)."""
    if config.box == "project":
        images = jnp.clip(images, *config.box_bounds)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, problem.victim_params)
    return OuterState(images=images, opt_state=_optimizer(config).init(images),
                      inner_params=problem.victim_params, adjoint=zeros, step=jnp.asarray(0),
                      diverged=jnp.asarray(False))


def _implicit_hypergradient(config: BilevelConfig, problem: Problem, hyper: Hyper, state: OuterState):
    """The implicit engine at the current images: L-BFGS inner solve to ``inner.tol`` and the
    jaxopt implicit-differentiation hypergradient (exact to the tolerances).

    Returns (objective, ∇_x objective, θ(x), v, record).
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

    hvps = jnp.asarray(jnp.nan, total.dtype)  # jaxopt's adjoint CG does not report its iterations
    if config.record_cg_residual:
        # ‖(H + ρI)v − ∂l/∂θ‖ / ‖∂l/∂θ‖: one extra Hessian-vector product per step.
        cotangent = jax.grad(lambda p: parameter_loss(config.outer_loss, p, problem.victim_params))(params)
        grad_theta = lambda p: jax.grad(problem.objective)(p, state.images, problem.labels)
        hv = jax.jvp(grad_theta, (params,), (adjoint,))[1]
        residual = jax.tree_util.tree_map(lambda a, b, c: a + config.inner.cg_ridge * b - c, hv, adjoint, cotangent)
        cg_residual = jnp.sqrt(squared_norm(residual) / squared_norm(cotangent))
    else:
        cg_residual = jnp.asarray(jnp.nan, total.dtype)
    record = {"outer_loss": outer, "objective": total, "inner_grad_norm": info.grad_norm,
              "inner_iterations": info.iterations, "inner_failed_linesearch": info.failed_linesearch,
              "adjoint_iterations": jnp.asarray(-1, jnp.int32),
              "cg_residual": cg_residual, "cost_gradients": _as_cost(_lbfgs_evaluations(info), total),
              "cost_hvps": hvps}
    return total, grad_images, params, adjoint, record


def _lbfgs_evaluations(info) -> jax.Array:
    """Gradient evaluations of an L-BFGS solve (its line search's, where the backend reports them)."""
    return getattr(info, "evaluations", info.iterations)


def _as_cost(value, like) -> jax.Array:
    return jnp.asarray(value, like.dtype)


def _product_dtype(config: BilevelConfig):
    """The dtype asked for the amortized engine's Hessian products and cross-term VJP: float32
    for ``product_precision="float32"``, None (θ's own) for "full". Where θ is float32 already
    it changes nothing (``newton.lowers_precision``).

    Mixed precision as in iterative refinement: every right-hand side (∇_θL, ∂l/∂θ), the CG
    recurrences, L's line-search values and the outer update stay in θ's dtype, so the fixed
    point of the Newton and adjoint iterations is the full-precision one; only the operator
    applications (H u, (∂_x∇_θL)ᵀv) lose precision, to a relative ~κ·2⁻²⁴, below the ~10⁻²
    of a fixed-budget CG. On this 2-core CPU a float32 product costs 0.55× (affine 784-10) to
    0.34× (784-256-10 gelu) a float64 one (``benchmarks/bilevel.py``)."""
    return jnp.float32 if config.product_precision == "float32" else None


def _gradient_pullback(objective: Callable, params, images: jax.Array, labels, product_dtype):
    """One ``jax.vjp`` of F(θ, x) = ∇_θL(θ; x), in ``product_dtype`` if given: returns
    (F(θ, x), u ↦ (∂_θF)ᵀu = H u (H symmetric), v ↦ (∂_xF)ᵀv), all in the inputs' dtypes."""
    high = tree_dtype(params)
    low = product_dtype if lowers_precision(product_dtype, high) else high
    grad, pullback = jax.vjp(lambda p, x: jax.grad(objective)(p, x, labels), cast_tree(params, low),
                             images.astype(low))
    hvp = lambda u: cast_tree(pullback(cast_tree(u, low))[0], high)
    cross = lambda v: pullback(cast_tree(v, low))[1].astype(images.dtype)
    return cast_tree(grad, high), hvp, cross


def _cross_vjp(problem: Problem, params, images: jax.Array, adjoint, product_dtype=None) -> jax.Array:
    """(∂_x∇_θL(θ; x))ᵀ v: one VJP through the gradient. Shape of x (N, h, w, c)."""
    return _gradient_pullback(problem.objective, params, images, problem.labels, product_dtype)[2](adjoint)


def _amortized_hypergradient(config: BilevelConfig, problem: Problem, hyper: Hyper, state: OuterState):
    """The amortized engine's step at the current images x (Arbel & Mairal 2022; Ramzi et al. 2022).

    ``adjoint_hessian="shared"``: ONE linearisation of ∇_θL at the carried θ serves the
    Newton step and the adjoint, solved together as one block CG with two right-hand sides
    (K initialisations × 2 systems become matrix–matrix products):

        [d, v] ≈ (H(θ) + ρI)⁻¹ [−∇_θL(θ; x), ∂l/∂θ(θ)]      ``newton_cg`` iterations, v warm-started
        ∇_x l ≈ −(∂_x∇_θL(θ; x))ᵀ v,      then θ ← θ + d

    ``"updated"`` (default): Newton first, then a second linearisation at the updated θ for the
    adjoint (``adjoint_cg`` iterations) and the VJP; one more gradient per step, and the
    hypergradient is taken one Newton step closer to θ(x). Measured on 100 MNIST images (affine,
    gaussian:0.1, 1000 steps, 4 initialisations): "updated" ends at 3e-8…3e-7, "shared" at
    5e-6…3e-5, its lagged hypergradient is too inexact far from the solution. Further Newton steps (``newton_steps`` > 1) run
    after the first in both modes. Inexact by design: the error is that of θ and v, and goes to
    0 as the budgets grow (tested). Returns (objective, ∇_x objective, θ, v, record); the
    record's ``inner_grad_norm`` is ‖∇_θL‖ at the θ the hypergradient used (with float32
    products, "updated" mode, computed in float32: a floor near 1e-7·‖∇_θL‖'s scale; run.json's
    ``inner_converged`` comes from the final full-precision solve).
    """
    images, labels, objective = state.images, problem.labels, problem.objective
    inner = config.inner.resolved(tree_dtype(state.inner_params))
    ridge, tol = inner.cg_ridge, inner.cg_tol
    outer_of = lambda p: parameter_loss(config.outer_loss, p, problem.victim_params)
    params = state.inner_params
    step_size = jnp.ones((), tree_dtype(params))
    low = _product_dtype(config)
    if config.adjoint_hessian == "shared":
        grad, hvp = gradient_and_hvp(objective, params, images, labels, product_dtype=low)
        outer, cotangent = jax.value_and_grad(outer_of)(params)
        stack = lambda a, b: jax.tree_util.tree_map(lambda u, w: jnp.stack([u, w]), a, b)
        solve = lambda b, x0: conjugate_gradient(hvp, b, x0, iterations=config.newton_cg, ridge=ridge, tol=tol)
        solutions, infos = jax.vmap(solve)(stack(jax.tree_util.tree_map(jnp.negative, grad), cotangent),
                                           stack(jax.tree_util.tree_map(jnp.zeros_like, grad), state.adjoint))
        newton_dir = jax.tree_util.tree_map(lambda a: a[0], solutions)
        adjoint = jax.tree_util.tree_map(lambda a: a[1], solutions)
        grad_images_outer = -_cross_vjp(problem, params, images, adjoint, low)
        newton_iterations, adjoint_iterations, residual = infos.iterations[0], infos.iterations[1], infos.residual[1]
        params = jax.tree_util.tree_map(jnp.add, params, newton_dir)
        extra_newton = config.newton_steps - 1
    else:
        newton_iterations = jnp.asarray(0, jnp.int32)
        extra_newton = 0
        for _ in range(config.newton_steps):
            params, _, info, step_size = guarded_newton_step(objective, params, images, labels,
                                                             iterations=config.newton_cg, ridge=ridge, tol=tol,
                                                             product_dtype=low)
            newton_iterations = newton_iterations + info.iterations
        # One VJP linearisation of F(θ, x) = ∇_θL(θ; x) at (θ⁺, x) serves both the adjoint's
        # products H u = (∂_θF)ᵀu (H is symmetric) and the cross term (∂_xF)ᵀv: one primal pass,
        # where a linearisation for H and a separate VJP for the cross term took two.
        grad, hvp, cross = _gradient_pullback(objective, params, images, labels, low)
        outer, cotangent = jax.value_and_grad(outer_of)(params)
        solve = minimal_residual if solver_for(config.adjoint_solver, problem.convex) == "minres" else conjugate_gradient
        adjoint, adjoint_info = solve(hvp, cotangent, state.adjoint, iterations=config.adjoint_cg, ridge=ridge, tol=tol)
        grad_images_outer = -cross(adjoint)
        adjoint_iterations, residual = adjoint_info.iterations, adjoint_info.residual
    for _ in range(extra_newton):
        params, _, info, step_size = guarded_newton_step(objective, params, images, labels,
                                                         iterations=config.newton_cg, ridge=ridge, tol=tol,
                                                         product_dtype=low)
        newton_iterations = newton_iterations + info.iterations
    prior, prior_grad = jax.value_and_grad(lambda x: image_prior(config, hyper, x))(images)
    total = outer + prior
    cost = config.cost_per_step(tree_dtype(params))
    record = {"outer_loss": outer, "objective": total, "inner_grad_norm": jnp.sqrt(squared_norm(grad)),
              "inner_iterations": newton_iterations, "newton_step_size": step_size,
              "adjoint_iterations": adjoint_iterations, "cg_residual": residual,
              "cost_gradients": _as_cost(cost["gradients"], total), "cost_hvps": _as_cost(cost["hvps"], total)}
    return total, prior_grad + grad_images_outer, params, adjoint, record


def amortized_hypergradient(config: BilevelConfig, problem: Problem, hyper: Hyper, state: OuterState):
    """(objective, ∇_x objective) as the amortized engine computes it from ``state`` (θ, v carried):
    for benchmarks and tests that hold it to the exact ``hypergradient``."""
    total, grad_images, _, _, _ = _amortized_hypergradient(config, problem, hyper, state)
    return total, grad_images


def accurate_solve(config: BilevelConfig, problem: Problem, params, images: jax.Array):
    """θ ≈ argmin_θ L(θ; x) from ``params`` to ‖∇_θL‖ ≤ inner.tol by the amortized engine's
    refresh solver (``refresh_solver_for``): Newton–CG (``recon_jax.newton.minimize``, at most
    ``refresh_newton_steps`` steps of ``refresh_cg`` CG iterations, products in ``product_precision``)
    or L-BFGS (``recon_jax.lbfgs.minimize``, or jaxopt's as ``inner`` configures it, with
    ``inner``'s history size and iteration cap). Returns (θ, InnerInfo, gradients, hvps): the
    last two are what the solve cost, in evaluations of ∇_θL and in Hessian-vector products (all
    computed products: the fixed CG budgets count in full; line-search trial losses, forward
    passes only, are not counted)."""
    labels = problem.labels
    solver = refresh_solver_for(config.refresh_solver, problem.convex)
    if solver == "jaxopt":
        params, info = make_solve(problem.objective, config.inner)(params, images, labels)
        return params, info, _lbfgs_evaluations(info), jnp.zeros((), jnp.int32)
    inner = config.inner.resolved(tree_dtype(params))
    if solver == "lbfgs":
        params, info = lbfgs.minimize(problem.objective, lax.stop_gradient(params), lax.stop_gradient(images), labels,
                                      tol=inner.tol, max_iterations=inner.maxiter, history_size=inner.history_size)
        inner_info = InnerInfo(iterations=info.iterations, grad_norm=info.grad_norm, failed_linesearch=info.stalled)
        return params, inner_info, info.gradients, jnp.zeros((), jnp.int32)
    low = _product_dtype(config)
    params, info = minimize(problem.objective, lax.stop_gradient(params), lax.stop_gradient(images), labels,
                            tol=inner.tol, max_steps=config.refresh_newton_steps, cg_iterations=config.refresh_cg,
                            ridge=inner.cg_ridge, product_dtype=low)
    inner_info = InnerInfo(iterations=info.steps, grad_norm=info.grad_norm, failed_linesearch=info.stalled)
    return params, inner_info, info.gradients, info.steps * config.refresh_cg


def refresh(config: BilevelConfig, problem: Problem, state: OuterState):
    """Re-solve θ and v accurately at the current images (the amortized engine's exact check).

        θ ← argmin_θ L(θ; x)   by Newton–CG or L-BFGS (``accurate_solve``) from the carried θ,
                               to ‖∇_θL‖ ≤ inner.tol
        v ← (H(θ) + ρI)⁻¹ ∂l/∂θ   by CG or MINRES (``solver_for``) from the carried v, to
                                  inner.cg_tol (at most inner.cg_maxiter)

    Returns (state, {"refresh_correction": ‖θ_carried − θ‖/‖θ‖, "refresh_gradients",
    "refresh_hvps"}). A non-finite result leaves the state as it was.
    """
    params, _, gradients, newton_hvps = accurate_solve(config, problem, state.inner_params, state.images)
    _, hvp = gradient_and_hvp(problem.objective, params, state.images, problem.labels)
    cotangent = jax.grad(lambda p: parameter_loss(config.outer_loss, p, problem.victim_params))(params)
    inner = config.inner.resolved(tree_dtype(params))
    if solver_for(config.adjoint_solver, problem.convex) == "minres":
        adjoint, adjoint_info = minimal_residual(hvp, cotangent, state.adjoint, iterations=inner.cg_maxiter,
                                                 ridge=inner.cg_ridge, tol=inner.cg_tol, early_stop=True)
    else:
        adjoint, adjoint_info = conjugate_gradient_to_tolerance(
            hvp, cotangent, state.adjoint, maxiter=inner.cg_maxiter, ridge=inner.cg_ridge, tol=inner.cg_tol)
    change = jax.tree_util.tree_map(jnp.subtract, state.inner_params, params)
    correction = jnp.sqrt(squared_norm(change) / squared_norm(params))
    ok = all_finite(params) & all_finite(adjoint)
    keep = lambda new, old: freeze(ok, new, old)
    dtype = correction.dtype
    record = {"refresh_correction": correction,
              "refresh_gradients": jnp.asarray(gradients + 1, dtype),
              "refresh_hvps": jnp.asarray(newton_hvps + adjoint_info.iterations + 1, dtype)}
    return state.replace(inner_params=keep(params, state.inner_params), adjoint=keep(adjoint, state.adjoint)), record


def _update(config: BilevelConfig, hyper: Hyper, state: OuterState, total, grad_images, params, adjoint):
    """The optimiser update x ← x − η s(t) u(∇_x) with the non-finite freeze."""
    tx = _optimizer(config)
    opt_state = state.opt_state
    if config.schedule == "plateau" and config.warmup_steps:
        # Compare against the best objective since the warm-up ended (``restart_plateau``).
        opt_state = restart_plateau(opt_state, state.step == config.warmup_steps)
    updates, opt_state = tx.update(grad_images, opt_state, state.images, value=total)
    rate = hyper.learning_rate * lr_schedule(config, state.step).astype(state.images.dtype)
    images = state.images - rate * updates
    if config.box == "project":
        images = jnp.clip(images, *config.box_bounds)
    ok = jnp.isfinite(total) & all_finite(grad_images) & all_finite(params) & all_finite(adjoint) & ~state.diverged
    keep = lambda new, old: freeze(ok, new, old)
    return OuterState(images=keep(images, state.images), opt_state=keep(opt_state, state.opt_state),
                      inner_params=keep(params, state.inner_params), adjoint=keep(adjoint, state.adjoint),
                      step=state.step + 1, diverged=~ok)


def outer_step(config: BilevelConfig, problem: Problem, hyper: Hyper, state: OuterState):
    """One outer step of ``config.engine``: hypergradient at the current images, then the update.

    Returns (new_state, record) with record = {outer_loss, objective, inner_grad_norm,
    inner_iterations, adjoint_iterations, cg_residual, cost_gradients, cost_hvps};
    ``outer_loss`` is l(θ, θ*) at the images *before* the update (for the amortized engine at
    its carried θ). A non-finite loss or gradient freezes this initialisation and sets
    ``diverged``; other initialisations are unaffected.
    """
    step = _amortized_hypergradient if resolve_engine(config, problem) == "amortized" else _implicit_hypergradient
    total, grad_images, params, adjoint, record = step(config, problem, hyper, state)
    return _update(config, hyper, state, total, grad_images, params, adjoint), record


def refresh_due(config: BilevelConfig, step) -> jax.Array:
    """Whether the amortized engine refreshes before outer step ``step``: at 0 and every ``refresh_every``."""
    step = jnp.asarray(step)
    due = step == 0
    if config.refresh_every:
        due = due | (step % config.refresh_every == 0)
    return due


def run_steps(config: BilevelConfig, problem: Problem, hyper: Hyper, state: OuterState, n_steps: int,
              start=0):
    """``n_steps`` outer steps as one ``lax.scan``: (state, {name: (n_steps,)} history).

    ``start`` is the index of the first step, shared by the whole batch (``run_batched`` passes
    it unbatched), so that the amortized engine's refresh is a real branch under ``vmap``
    rather than a select that would compute it at every step. A direct caller that starts
    from ``init_state`` leaves it at 0.
    """
    if resolve_engine(config, problem) == "implicit":
        return scan_steps(lambda s: outer_step(config, problem, hyper, s), state, n_steps)

    def body(state, index):
        def no_refresh(state):
            dtype = jax.tree_util.tree_leaves(state.inner_params)[0].dtype
            zero = jnp.zeros((), dtype)
            return state, {"refresh_correction": jnp.full((), jnp.nan, dtype),
                           "refresh_gradients": zero, "refresh_hvps": zero}

        state, refreshed = lax.cond(refresh_due(config, index), lambda s: refresh(config, problem, s), no_refresh,
                                    state)
        state, record = outer_step(config, problem, hyper, state)
        record["cost_gradients"] = record["cost_gradients"] + refreshed["refresh_gradients"]
        record["cost_hvps"] = record["cost_hvps"] + refreshed["refresh_hvps"]
        return state, {**record, "refresh_correction": refreshed["refresh_correction"]}

    return lax.scan(body, state, start + jnp.arange(n_steps))


def evaluate(config: BilevelConfig, problem: Problem, state: OuterState) -> dict:
    """l(θ(x), θ*) and the inner figures at the current images (no gradient, no update); θ(x)
    by the amortized engine's ``accurate_solve`` from the carried θ, or the implicit engine's
    L-BFGS."""
    if resolve_engine(config, problem) == "amortized":
        params, info, _, _ = accurate_solve(config, problem, state.inner_params, state.images)
    else:
        params, info = make_solve(problem.objective, config.inner)(state.inner_params, state.images, problem.labels)
    return {"outer_loss": parameter_loss(config.outer_loss, params, problem.victim_params),
            "inner_grad_norm": info.grad_norm, "inner_iterations": info.iterations,
            "inner_failed_linesearch": info.failed_linesearch, "diverged": state.diverged}


def hypergradient(config: BilevelConfig, problem: Problem, images: jax.Array, init_params=None):
    """(l(θ(x), θ*), ∇_x l) at images x (N,h,w,c), with a cold adjoint: for tests and probes."""
    argmin = make_argmin(problem.objective, config.inner)
    start = problem.victim_params if init_params is None else init_params
    zeros = jax.tree_util.tree_map(jnp.zeros_like, problem.victim_params)

    def outer(images):
        params, _ = argmin(start, images, problem.labels, zeros, zeros)
        return parameter_loss(config.outer_loss, params, problem.victim_params)

    return jax.value_and_grad(outer)(images)


def attack(config: BilevelConfig, problem: Problem) -> Attack:
    """The bilevel attack as a ``recon_jax.attack.Attack``: ``init_state(x₀, hyper)`` with
    x₀ (N, h, w, c), ``step`` = ``outer_step``, ``run_steps`` and ``evaluate`` as above; the
    runs are ranked by ``outer_loss`` l(θ(x), θ*)."""
    return Attack(name="bilevel", final_loss="outer_loss",
                  init_state=lambda x, hyper: init_state(config, problem, x),
                  step=lambda state, hyper: outer_step(config, problem, hyper, state),
                  evaluate=lambda state, hyper: evaluate(config, problem, state),
                  run_steps=lambda state, hyper, n, start=0: run_steps(config, problem, hyper, state, n, start))


register_attack("bilevel", attack)


# --------------------------------------------------------------------------- the method descriptor

CONVERGED_OBJECTIVE = 1e-6
"""A run has converged when its final objective, the relative outer loss
l(θ(x), θ*) = ‖θ(x) − θ*‖² / ‖θ*‖² (``parameter_loss``), is at most this
(``recon_jax.study.convergence_columns``)."""

SEARCH_RANGES = {"lr": (1e-3, 1e-1), "init_scale": (1e-3, 0.3)}
"""The bilevel random search (``recon-jax sweep``): log-uniform learning rate and gaussian init scale."""


def search_ranges(overrides: dict | None = None) -> dict[str, tuple[float, float]]:
    """The bilevel random search's ranges (``SEARCH_RANGES``: lr and init_scale, both
    log-uniform) with ``overrides`` applied (``resolve_ranges``)."""
    return resolve_ranges(overrides, SEARCH_RANGES, {"lr": "log-uniform", "init_scale": "log-uniform"},
                          what="bilevel ")


def _objective(victim, *, labels=None, bilevel_config: BilevelConfig | None = None, **_) -> Callable:
    """f(x) = l(θ(x), θ*) against ``victim`` (``landscape.bilevel_objective``), the problem from
    ``problems.problem_from_victim``; ``labels`` (N,) default to its known class-balanced labels.
    Returns f."""
    from recon_jax.landscape import bilevel_objective  # both modules import this one
    from recon_jax.problems import problem_from_victim

    problem = problem_from_victim(victim)
    if labels is not None:
        problem = problem.replace(labels=jnp.asarray(labels))
    return bilevel_objective(problem, bilevel_config)


def _objective_options(spec, run: dict, best: int) -> dict:
    """The objective's options for a finished run: ``{"bilevel_config": spec.bilevel}`` (the
    landscape leaves the priors out, so the runs' hyperparameters do not enter)."""
    return {"bilevel_config": spec.bilevel}


def _spec_warnings(spec, dtype) -> tuple[str, ...]:
    """The warning for a float32 run whose resolved inner or CG tolerance is below what float32
    reaches (``FLOAT32_REACHABLE_TOL``), as a one-message tuple; () otherwise."""
    inner = spec.bilevel.inner
    if np.dtype(dtype) != np.float32 or not min(inner.tol, inner.cg_tol) < FLOAT32_REACHABLE_TOL:
        return ()
    return (f"inner tol {inner.tol:.0e} / CG tol {inner.cg_tol:.0e} are below what float32 reaches "
            f"(~{FLOAT32_REACHABLE_TOL:.0e}; float32 default {default_tolerances(dtype)['inner_tol']:.0e}): "
            "inner solves stop at their first failed line search or cap instead",)


def _finite_mean(values) -> float | None:
    """Mean of the finite entries (None where there are none, e.g. a figure the engine does not count)."""
    if values is None:
        return None
    values = np.asarray(values, float)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _summary_extras(spec, victim, final: dict, history: dict) -> dict:
    """run.json's bilevel fields: the ``inner_tol`` and ``cg_tol`` used, ``inner_converged`` (K),
    the ``engine`` that ran, and ``cost_per_step`` = {gradients, hvps[, values, float32]} (and
    the amortized engine's ``product_precision``). Returns them."""
    from recon_jax.problems import problem_from_victim  # problems imports this module

    inner = spec.bilevel.inner
    extras = {"inner_tol": inner.tol, "cg_tol": inner.cg_tol,
              "inner_converged": (np.asarray(final["inner_grad_norm"]) <= inner.tol).tolist()}
    # Gradient evaluations of ∇_θL and its Hessian-vector-type products (JVPs/VJPs) per outer
    # step and initialisation, averaged over the run (history.npz has them per step).
    extras["engine"] = resolve_engine(spec.bilevel, problem_from_victim(victim))
    extras["cost_per_step"] = {"gradients": _finite_mean(history.get("cost_gradients")),
                               "hvps": _finite_mean(history.get("cost_hvps"))}
    if extras["engine"] == "amortized":  # forward-only loss evaluations of the Newton line search
        counted = spec.bilevel.cost_per_step(np.asarray(final["outer_loss"]).dtype)
        extras["cost_per_step"]["values"] = counted["values"]
        extras["cost_per_step"]["float32"] = counted["float32"]  # of the gradients and products above
        extras["product_precision"] = spec.bilevel.product_precision
    return extras


register_descriptor(Method(
    name="bilevel", converged=Convergence("final_outer_loss", CONVERGED_OBJECTIVE, "outer_loss"),
    mismatch_key="final_outer_loss", objective=_objective, objective_options=_objective_options,
    validate_search_ranges=search_ranges, needs_stationary_victim=True, spec_warnings=_spec_warnings,
    summary_extras=_summary_extras))
