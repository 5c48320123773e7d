"""The inner problem and its adjoint, behind one small seam with two backends.

The bilevel method needs θ(x) ∈ argmin_θ L(θ; x, y) as a *differentiable* function of the
candidate images x. By the implicit function theorem at ∇_θL(θ(x); x) = 0,

    dθ/dx = −H⁻¹ ∂_x∇_θL,      H = ∇²_θL(θ(x); x)     (Runkel et al. 2024)

so a reverse-mode cotangent g = ∂l/∂θ becomes ∂l/∂x = −(∂_x∇_θL)ᵀ v with v solving the
adjoint system (H + ρI) v = g by conjugate gradients (H is symmetric: use CG, not the
normal equations; ρ is a small ridge; the iterations are capped).

``make_argmin(objective, config)`` returns

    argmin(init_params, images, labels, probe, adjoint_init) -> (params, InnerInfo)

differentiable in ``images`` (and ``labels`` where they are soft). Two backends, which the
tests hold to the same hypergradient:

    "jaxopt"       jaxopt.LBFGS(implicit_diff=True, implicit_diff_solve=solve_cg(ridge, ...))
    "custom_vjp"   pure JAX, no jaxopt: a jax.custom_vjp around optax.lbfgs whose backward
                   pass runs CG from jax.scipy (warm-started) and one VJP

The *probe* is how the adjoint vector gets out of the backward pass, for diagnostics and to
warm-start the next solve. The inner objective is L(θ; x) + ⟨probe, θ⟩ with probe = 0, so
the solution is unchanged, while ∂l/∂probe = −(H + ρI)⁻¹ g = −v exactly. ``adjoint_init``
warm-starts CG; consecutive outer steps change x little, so the previous v is an excellent
start and CG stops after a few iterations. The gradient with respect to ``init_params`` is
zero by construction: the argmin does not depend on where the solver started.

Tolerances: ``InnerConfig(tol=None, cg_tol=None)`` (the default) means "by dtype": they are
resolved from θ's dtype by ``InnerConfig.resolved`` (``recon_jax.precision.default_tolerances``:
1e-10 in float64, 1e-6 in float32) when the argmin is called. The solve stops at
‖∇_θL‖₂ ≤ tol, at ``maxiter``, or at the first line search that fails WITHOUT decreasing L
(reported as ``InnerInfo.failed_linesearch``) at a gradient norm below √ε·max(1, |L|), the
floor of a line search on L's values (``stalled_at_roundoff``). A zoom line search (Nocedal &
Wright 2006, Algorithms 3.5–3.6) fails when no trial step meets both Wolfe conditions; it then falls
back to a step with sufficient decrease if it found one. Such a fallback step is progress,
and L-BFGS recovers from it (measured in float64: a failure at ‖∇L‖ ≈ 1e-9, then 1e-13 six
iterations later), so it does not stop the solve; nor does a failure above that floor, even
one whose step raises L (a bad step, which L-BFGS recovers from). A failure whose step leaves L
unchanged or higher at the floor is where round-off, not the solver, limits ‖∇_θL‖ (float32
stalls there at ‖∇L‖ ≈ 1e-7 on the digits victims), and every later iteration only makes noisy
steps: that stops it.
Images must have θ's dtype (``precision.check_same_dtype``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jaxopt
import optax
from flax import struct
from jax import lax

from recon_jax.errors import ConfigError
from recon_jax.objectives import squared_norm
from recon_jax.precision import check_same_dtype, default_tolerances, tree_dtype

class Backend(NamedTuple):
    """An inner-solver backend: ``argmin(fun, config, init_params, images, labels, probe,
    adjoint_init) -> (θ, InnerInfo)`` differentiable in the images by the implicit function
    theorem, and ``solve(fun, config, init_params, images, labels, probe) -> (θ, InnerInfo)``,
    the same forward iterations without a differentiation rule. ``fun`` is ``probed(L)``;
    ``config`` has its tolerances resolved."""

    argmin: Callable
    solve: Callable


BACKENDS: dict[str, Backend] = {}
"""Inner-solver backends by name (``InnerConfig.backend``); add one with ``register_backend``."""


def register_backend(name: str, argmin: Callable, solve: Callable) -> None:
    """Register an inner-solver backend (see ``Backend``) under ``name``: one line per backend."""
    BACKENDS[name] = Backend(argmin=argmin, solve=solve)


@dataclasses.dataclass(frozen=True)
class InnerConfig:
    """Inner solver (L-BFGS) and adjoint (CG) settings; all static under jit.

    ``tol`` and ``cg_tol`` None (the default) mean "by θ's dtype", see ``resolved``.
    """

    backend: str = "jaxopt"
    tol: float | None = None  # stop when ‖∇_θL‖₂ ≤ tol; None: by dtype (1e-10 float64, 1e-6 float32)
    maxiter: int = 500
    history_size: int = 10
    cg_ridge: float = 1e-10
    cg_maxiter: int = 200
    cg_tol: float | None = None  # relative: ‖(H+ρ)v − g‖ ≤ cg_tol ‖g‖; None: by dtype, as tol

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown inner backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.maxiter < 1 or self.cg_maxiter < 1:
            raise ConfigError("inner maxiter and cg_maxiter must be >= 1 (CG is always capped)")
        if self.cg_ridge < 0 or (self.tol is not None and not self.tol > 0) or (
                self.cg_tol is not None and not self.cg_tol > 0):
            raise ConfigError("cg_ridge must be >= 0, tol and cg_tol > 0 (or None: by dtype)")

    def resolved(self, dtype) -> InnerConfig:
        """This config with ``tol`` / ``cg_tol`` that are None replaced by the ``inner_tol`` /
        ``cg_tol`` of ``recon_jax.precision.default_tolerances(dtype)``; given values are kept."""
        defaults = default_tolerances(dtype)
        return dataclasses.replace(self, tol=defaults["inner_tol"] if self.tol is None else self.tol,
                                   cg_tol=defaults["cg_tol"] if self.cg_tol is None else self.cg_tol)


@struct.dataclass
class InnerInfo:
    """Per-solve diagnostics (no gradient flows through them)."""

    iterations: jax.Array  # int, inner solver iterations
    grad_norm: jax.Array  # ‖∇_θL(θ(x); x)‖₂ at the returned solution
    failed_linesearch: jax.Array  # bool: a line search failed without decreasing L, stopping at ‖∇_θL‖₂ > tol


def probed(objective: Callable) -> Callable:
    """L(θ; x, y) + ⟨probe, θ⟩: same argmin at probe = 0, and ∂l/∂probe = −v."""

    def fun(params, images, labels, probe):
        return objective(params, images, labels) + sum(
            jnp.vdot(p, q) for p, q in zip(jax.tree_util.tree_leaves(probe), jax.tree_util.tree_leaves(params)))

    return fun


def make_argmin(objective: Callable, config: InnerConfig) -> Callable:
    """θ(x) with implicit differentiation; see the module docstring for the signature.

    ``config``'s None tolerances are resolved from ``init_params``' dtype at each call
    (``InnerConfig.resolved``), and images of another dtype than θ are refused (ConfigError).
    """
    fun = probed(objective)
    argmin = BACKENDS[config.backend].argmin

    def call(init_params, images, labels, probe, adjoint_init):
        check_same_dtype("the images", images, init_params,
                         "cast them with jnp.asarray(images, dtype) to theta's dtype, or theta with "
                         "recon_jax.precision.cast_tree(params, images.dtype)")
        return argmin(fun, config.resolved(tree_dtype(init_params)), init_params, images, labels, probe, adjoint_init)

    return call


def make_solve(objective: Callable, config: InnerConfig) -> Callable:
    """θ(x) WITHOUT a differentiation rule: the same forward solve as ``make_argmin``'s backend.

        solve(init_params, images, labels) -> (params, InnerInfo),   params ≈ argmin_θ L(θ; x, y)

    For callers that only need the solution, never its derivative (the amortized engine's
    refresh, the final evaluation of a run): it runs the very iterations ``make_argmin`` runs
    (same solver, same objective L(θ; x) + ⟨0, θ⟩, same stopping rule), but traces no
    ``custom_vjp``/``custom_root`` rule, whose batching under ``vmap`` was most of the tracing
    time of a study cell. The output carries no gradient (``lax.stop_gradient``).
    """
    fun = probed(objective)

    def call(init_params, images, labels):
        check_same_dtype("the images", images, init_params,
                         "cast them with jnp.asarray(images, dtype) to theta's dtype, or theta with "
                         "recon_jax.precision.cast_tree(params, images.dtype)")
        resolved = config.resolved(tree_dtype(init_params))
        probe = jax.tree_util.tree_map(jnp.zeros_like, init_params)
        images, labels = lax.stop_gradient(images), lax.stop_gradient(labels)
        params, info = BACKENDS[config.backend].solve(fun, resolved, init_params, images, labels, probe)
        return jax.tree_util.tree_map(lax.stop_gradient, (params, info))

    return call


@dataclasses.dataclass(eq=False)
class _LBFGS(jaxopt.LBFGS):
    """``jaxopt.LBFGS`` whose ``state.failed_linesearch`` means "the line search failed AND its
    step did not decrease L" (L(θ_{k+1}) ≥ L(θ_k)), see the module docstring. With
    ``stop_if_linesearch_fails=True`` jaxopt's own loop then stops there; ``run`` keeps its
    ``custom_root`` decoration, so the argmin is still differentiated implicitly."""

    def update(self, params, state, *args, **kwargs):
        params, new = super().update(params, state, *args, **kwargs)
        stalled = stalled_at_roundoff(new.failed_linesearch, state.value, new.value, new.error)
        return jaxopt.OptStep(params=params, state=new._replace(failed_linesearch=stalled))


def stalled_at_roundoff(failed, value, new_value, grad_norm) -> jax.Array:
    """Whether a failed line search marks the round-off floor of a line search on L:

        failed  ∧  ¬(L_{k+1} < L_k)  ∧  ‖∇L(θ_{k+1})‖ ≤ √ε · max(1, |L_k|)      (ε of L's dtype)

    Near a minimum a step's decrease is about ‖∇L‖²/λ (λ the curvature along it); once that
    falls below the round-off ε|L| of the values being compared, i.e. ‖∇L‖ ≲ √(ελ|L|), no
    line search can tell better from worse. A failure above that floor is a bad step, not the
    floor, and L-BFGS recovers from it: measured on a 784-256-10 gelu victim from θ* at
    gaussian:0.1 images (float64), jaxopt's zoom search failed at its second iteration with
    ‖∇L‖ = 0.25 (and again at 1.1e-4), and the solve, left to go on, reached ‖∇L‖ = 1.9e-8;
    stopping at the first failure had left θ next to θ*. Scalars in (``value`` may be inf
    before the first iteration), a bool scalar out."""
    eps = jnp.finfo(jnp.result_type(new_value)).eps
    floor = jnp.sqrt(eps) * jnp.maximum(1.0, jnp.abs(jnp.where(jnp.isfinite(value), value, new_value)))
    return failed & ~(new_value < value) & (grad_norm <= floor)


def _solve_jaxopt(fun, config: InnerConfig, init_params, images, labels, probe):
    """The jaxopt backend's forward solve, without implicit differentiation."""
    solver = _LBFGS(fun=fun, tol=config.tol, maxiter=config.maxiter, history_size=config.history_size,
                    jit=True, stop_if_linesearch_fails=True, implicit_diff=False,
                    unroll=False)  # "auto" would unroll (a masked scan of maxiter steps) without implicit diff
    params, state = solver.run(init_params, images, labels, probe)
    failed = state.failed_linesearch & (state.error > config.tol)
    return params, InnerInfo(iterations=state.iter_num, grad_norm=state.error, failed_linesearch=failed)


def _solve_lbfgs(fun, config: InnerConfig, init_params, images, labels, probe):
    """The custom_vjp backend's forward solve: ``lbfgs_minimize`` on L(θ; x) + ⟨probe, θ⟩."""
    return lbfgs_minimize(lambda p: fun(p, images, labels, probe), init_params, tol=config.tol,
                          maxiter=config.maxiter, history_size=config.history_size)


def _argmin_jaxopt(fun, config: InnerConfig, init_params, images, labels, probe, adjoint_init):
    # jaxopt's root_vjp solves H u = −∂l/∂θ, i.e. u = −v: warm-start CG from −v_prev.
    cg_init = jax.tree_util.tree_map(jnp.negative, adjoint_init)
    solver = _LBFGS(
        fun=fun, tol=config.tol, maxiter=config.maxiter, history_size=config.history_size, jit=True,
        stop_if_linesearch_fails=True, implicit_diff=True,
        implicit_diff_solve=partial(jaxopt.linear_solve.solve_cg, init=cg_init, ridge=config.cg_ridge,
                                    maxiter=config.cg_maxiter, tol=config.cg_tol))
    params, state = solver.run(init_params, images, labels, probe)
    failed = state.failed_linesearch & (state.error > config.tol)
    return params, InnerInfo(iterations=lax.stop_gradient(state.iter_num),
                             grad_norm=lax.stop_gradient(state.error),
                             failed_linesearch=lax.stop_gradient(failed))


MAX_LINESEARCH_STEPS = 20  # optax.lbfgs's default zoom line search budget


def lbfgs_minimize(fun: Callable, init_params, *, tol: float, maxiter: int, history_size: int):
    """Pure-optax L-BFGS (zoom line search) until ‖∇fun‖₂ ≤ tol, ``maxiter``, or a line search
    that fails without decreasing ``fun`` (see the module docstring; the same rule as the
    jaxopt backend's).

    Returns (params, InnerInfo). ``fun`` maps params to a scalar. optax's zoom line search
    (``scale_by_zoom_linesearch``) exposes no failure flag, so it is read from its info: it
    failed when its last trial point misses the sufficient-decrease condition
    (``info.decrease_error`` > 0; inf for a non-finite value) or when it used its whole budget
    of ``MAX_LINESEARCH_STEPS`` trials. Such a failure stops the loop, after its step is
    applied, when fun(θ_{k+1}) ≥ fun(θ_k).
    """
    opt = optax.lbfgs(memory_size=history_size, linesearch=optax.scale_by_zoom_linesearch(
        max_linesearch_steps=MAX_LINESEARCH_STEPS, initial_guess_strategy="one"))
    value_and_grad = optax.value_and_grad_from_state(fun)

    def cond(carry):
        _, _, k, grad_norm, failed = carry
        return (k < maxiter) & (grad_norm > tol) & ~failed

    def body(carry):
        params, state, k, _, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        params = optax.apply_updates(params, updates)
        new_grad = optax.tree_utils.tree_get(state, "grad")
        info = optax.tree_utils.tree_get(state, "info")
        failed = (info.decrease_error > 0) | (info.num_linesearch_steps >= MAX_LINESEARCH_STEPS)
        new_norm = jnp.sqrt(squared_norm(new_grad))
        stalled = stalled_at_roundoff(failed, value, optax.tree_utils.tree_get(state, "value"), new_norm)
        return params, state, k + 1, new_norm, stalled

    init = (init_params, opt.init(init_params), jnp.asarray(0), jnp.asarray(jnp.inf, _dtype_of(init_params)),
            jnp.asarray(False))
    params, _, iterations, _, failed = lax.while_loop(cond, body, init)
    grad_norm = jnp.sqrt(squared_norm(jax.grad(fun)(params)))
    return params, InnerInfo(iterations=iterations, grad_norm=grad_norm, failed_linesearch=failed & (grad_norm > tol))


def _dtype_of(tree):
    return jax.tree_util.tree_leaves(tree)[0].dtype


def _argmin_custom_vjp(fun, config: InnerConfig, init_params, images, labels, probe, adjoint_init):
    @jax.custom_vjp
    def argmin(init_params, images, labels, probe, adjoint_init):
        return lbfgs_minimize(lambda p: fun(p, images, labels, probe), init_params, tol=config.tol,
                              maxiter=config.maxiter, history_size=config.history_size)

    def forward(init_params, images, labels, probe, adjoint_init):
        params, info = argmin(init_params, images, labels, probe, adjoint_init)
        return (params, info), (params, images, labels, probe, adjoint_init, init_params)

    def backward(residuals, cotangents):
        params, images, labels, probe, adjoint_init, init_params = residuals
        params_bar, _ = cotangents
        grad_theta = lambda p, *args: jax.grad(fun)(p, *args)
        # Adjoint system (H + ρI) v = ∂l/∂θ, H = ∇²_θL at the solution; H is symmetric.
        hvp = lambda v: jax.jvp(lambda p: grad_theta(p, images, labels, probe), (params,), (v,))[1]
        ridge_hvp = lambda v: jax.tree_util.tree_map(lambda a, b: a + config.cg_ridge * b, hvp(v), v)
        v, _ = jax.scipy.sparse.linalg.cg(ridge_hvp, params_bar, x0=adjoint_init, tol=config.cg_tol,
                                          maxiter=config.cg_maxiter)
        # ∂l/∂(x, y, probe) = −(∂_{x,y,probe} ∇_θL)ᵀ v
        _, vjp = jax.vjp(lambda *args: grad_theta(params, *args), images, labels, probe)
        negate = lambda a: a if a.dtype == jax.dtypes.float0 else -a  # integer labels get float0
        images_bar, labels_bar, probe_bar = jax.tree_util.tree_map(negate, vjp(v))
        zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
        return zeros(init_params), images_bar, labels_bar, probe_bar, zeros(adjoint_init)

    argmin.defvjp(forward, backward)
    params, info = argmin(init_params, images, labels, probe, adjoint_init)
    return params, jax.tree_util.tree_map(lax.stop_gradient, info)


register_backend("jaxopt", _argmin_jaxopt, _solve_jaxopt)
register_backend("custom_vjp", _argmin_custom_vjp, _solve_lbfgs)
