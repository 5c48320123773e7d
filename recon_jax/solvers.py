"""The inner problem and its adjoint, behind one small seam with two backends.

The bilevel method needs θ(x) ∈ argmin_θ L(θ; x, y) as a *differentiable* function of the
candidate images x. By the implicit function theorem at ∇_θL(θ(x); x) = 0,

    dθ/dx = −H⁻¹ ∂_x∇_θL,      H = ∇²_θL(θ(x); x)                            (BRIEF §2)

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import jaxopt
import optax
from flax import struct
from jax import lax

from recon_jax.errors import ConfigError
from recon_jax.objectives import squared_norm

BACKENDS = ("jaxopt", "custom_vjp")


@dataclasses.dataclass(frozen=True)
class InnerConfig:
    """Inner solver (L-BFGS) and adjoint (CG) settings; all static under jit."""

    backend: str = "jaxopt"
    tol: float = 1e-10  # stop when ‖∇_θL‖₂ ≤ tol (use ~1e-6 in float32)
    maxiter: int = 500
    history_size: int = 10
    cg_ridge: float = 1e-10
    cg_maxiter: int = 200
    cg_tol: float = 1e-10  # relative: ‖(H+ρ)v − g‖ ≤ cg_tol ‖g‖

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown inner backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.maxiter < 1 or self.cg_maxiter < 1:
            raise ConfigError("inner maxiter and cg_maxiter must be >= 1 (CG is always capped)")
        if self.cg_ridge < 0 or self.tol <= 0 or self.cg_tol <= 0:
            raise ConfigError("cg_ridge must be >= 0, tol and cg_tol > 0")


@struct.dataclass
class InnerInfo:
    """Per-solve diagnostics (no gradient flows through them)."""

    iterations: jax.Array  # int, inner solver iterations
    grad_norm: jax.Array  # ‖∇_θL(θ(x); x)‖₂ at the returned solution


def probed(objective: Callable) -> Callable:
    """L(θ; x, y) + ⟨probe, θ⟩: same argmin at probe = 0, and ∂l/∂probe = −v."""

    def fun(params, images, labels, probe):
        return objective(params, images, labels) + sum(
            jnp.vdot(p, q) for p, q in zip(jax.tree_util.tree_leaves(probe), jax.tree_util.tree_leaves(params)))

    return fun


def make_argmin(objective: Callable, config: InnerConfig) -> Callable:
    """θ(x) with implicit differentiation; see the module docstring for the signature."""
    fun = probed(objective)
    if config.backend == "jaxopt":
        return partial(_argmin_jaxopt, fun, config)
    return partial(_argmin_custom_vjp, fun, config)


def _argmin_jaxopt(fun, config: InnerConfig, init_params, images, labels, probe, adjoint_init):
    # jaxopt's root_vjp solves H u = −∂l/∂θ, i.e. u = −v: warm-start CG from −v_prev.
    cg_init = jax.tree_util.tree_map(jnp.negative, adjoint_init)
    solver = jaxopt.LBFGS(
        fun=fun, tol=config.tol, maxiter=config.maxiter, history_size=config.history_size, jit=True,
        implicit_diff=True,
        implicit_diff_solve=partial(jaxopt.linear_solve.solve_cg, init=cg_init, ridge=config.cg_ridge,
                                    maxiter=config.cg_maxiter, tol=config.cg_tol))
    params, state = solver.run(init_params, images, labels, probe)
    return params, InnerInfo(iterations=lax.stop_gradient(state.iter_num),
                             grad_norm=lax.stop_gradient(state.error))


def lbfgs_minimize(fun: Callable, init_params, *, tol: float, maxiter: int, history_size: int):
    """Pure-optax L-BFGS (zoom line search) until ‖∇fun‖₂ ≤ tol or ``maxiter``.

    Returns (params, InnerInfo). ``fun`` maps params to a scalar.
    """
    opt = optax.lbfgs(memory_size=history_size)
    value_and_grad = optax.value_and_grad_from_state(fun)

    def cond(carry):
        _, _, k, grad_norm = carry
        return (k < maxiter) & (grad_norm > tol)

    def body(carry):
        params, state, k, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        params = optax.apply_updates(params, updates)
        new_grad = optax.tree_utils.tree_get(state, "grad")
        return params, state, k + 1, jnp.sqrt(squared_norm(new_grad))

    init = (init_params, opt.init(init_params), jnp.asarray(0), jnp.asarray(jnp.inf, _dtype_of(init_params)))
    params, _, iterations, _ = lax.while_loop(cond, body, init)
    grad_norm = jnp.sqrt(squared_norm(jax.grad(fun)(params)))
    return params, InnerInfo(iterations=iterations, grad_norm=grad_norm)


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
