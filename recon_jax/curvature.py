"""Curvature of the bilevel objective at a point: is it a minimum, a saddle, or a slope?

    lanczos(matvec, dim, k) -> Ritz values (ascending)
    gauss_newton_operator(problem, images, params) -> u ↦ G u
    hessian_operator(value_and_grad, images, params) -> v ↦ ∇²f v (central differences)

The bilevel objective of Runkel et al. (2024) is f(x) = l(θ(x), θ*) with θ(x) = argmin_θ
L(θ; x, y) and l the relative squared distance ‖θ − θ*‖² / ‖θ*‖². By the implicit function
theorem its Jacobian is

    J = dθ/dx = −H⁻¹ M,      H = ∇²_θ L(θ(x); x)  (P × P),      M = ∂_x ∇_θ L(θ(x); x)  (P × ND),

so the outer Gauss–Newton matrix (the Hessian of f with the second derivatives of θ(x)
dropped) is

    G = Jᵀ ∇²_θ l J = (2 / ‖θ*‖²) Mᵀ H⁻¹ H⁻¹ M      (ND × ND, positive semidefinite),

one JVP and one VJP of ∇_θL in x and two conjugate-gradient solves with H per product. Its
small eigenvalues are the directions in which the images can move without moving θ(x) to
first order. The full Hessian ∇²f adds Σ_p (θ − θ*)_p ∇²θ_p (2/‖θ*‖²), which is not small at
a point of nonzero loss; its lowest eigenvalue tells a minimum (≥ 0) from a saddle (< 0).
``hessian_operator`` applies it by central differences of the exact hypergradient.

Lanczos (Golub and Van Loan 2013, §10.1) with full reorthogonalisation gives, after k
products, Ritz values that converge first at both ends of the spectrum: the extreme
eigenvalues without forming the matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from recon_jax.errors import ConfigError


def lanczos(matvec: Callable[[np.ndarray], np.ndarray], dim: int, k: int, seed: int = 0) -> np.ndarray:
    """Ritz values (ascending, at most k) of a symmetric operator A: R^dim → R^dim.

    k steps of Lanczos from a random unit vector q_1: α_i = q_iᵀ A q_i, w = A q_i − Q Qᵀ A q_i
    (reorthogonalised twice against every earlier q, "twice is enough"), β_i = ‖w‖,
    q_{i+1} = w / β_i; the Ritz values are the eigenvalues of the tridiagonal T_k =
    tridiag(β, α, β) = Q_kᵀ A Q_k. Stops early when β falls to round-off (an invariant
    subspace: the Ritz values are then eigenvalues). ``matvec`` takes and returns (dim,) numpy.
    """
    if k < 1 or dim < 1:
        raise ConfigError(f"Lanczos needs k >= 1 steps and dim >= 1, got k={k}, dim={dim}")
    rng = np.random.default_rng(seed)
    q = rng.normal(size=dim)
    basis, alphas, betas = [q / np.linalg.norm(q)], [], []
    for i in range(min(k, dim)):
        w = np.asarray(matvec(basis[-1]), np.float64).reshape(dim)
        alpha = float(basis[-1] @ w)
        alphas.append(alpha)
        Q = np.stack(basis)
        w = w - Q.T @ (Q @ w)
        w = w - Q.T @ (Q @ w)
        beta = float(np.linalg.norm(w))
        if i == min(k, dim) - 1 or beta <= 1e-12 * max(abs(a) for a in alphas + [1e-300]):
            break
        betas.append(beta)
        basis.append(w / beta)
    n = len(alphas)
    off = np.asarray(betas[:n - 1])
    return np.linalg.eigvalsh(np.diag(alphas) + np.diag(off, 1) + np.diag(off, -1))


def gauss_newton_operator(objective: Callable, images: jax.Array, labels: jax.Array, params, victim_params, *,
                          cg_tol: float = 1e-10, cg_maxiter: int = 1000) -> Callable[[np.ndarray], np.ndarray]:
    """u ↦ G u for the outer Gauss–Newton matrix G = (2/‖θ*‖²) Mᵀ H⁻¹ H⁻¹ M at x = ``images``
    (module docstring), with θ = ``params`` ≈ θ(x) (solve it tightly first: G is evaluated at
    the given θ) and θ* = ``victim_params``. ``objective(θ, x, y)`` is L. Vectors are flat
    numpy (ND,), with x's layout; H⁻¹ by conjugate gradients to relative ``cg_tol``.
    """
    flat, unravel = ravel_pytree(params)
    norm2 = float(sum(jnp.vdot(a, a) for a in jax.tree_util.tree_leaves(victim_params)))
    grad_theta = jax.grad(objective)
    hvp = lambda v: ravel_pytree(jax.jvp(lambda q: grad_theta(q, images, labels), (params,), (unravel(v),))[1])[0]
    _, mix_vjp = jax.vjp(lambda x: ravel_pytree(grad_theta(params, x, labels))[0], images)

    @jax.jit
    def apply(u):
        m_u = ravel_pytree(jax.jvp(lambda x: grad_theta(params, x, labels), (images,),
                                   (u.reshape(images.shape),))[1])[0]
        solve = lambda b: jax.scipy.sparse.linalg.cg(hvp, b, tol=cg_tol, maxiter=cg_maxiter)[0]
        return mix_vjp(solve(solve(m_u)))[0].ravel() * (2.0 / norm2)

    return lambda u: np.asarray(apply(jnp.asarray(u, flat.dtype)))


def hessian_operator(value_and_grad: Callable, images: jax.Array, *, relative_step: float = 1e-4
                     ) -> Callable[[np.ndarray], np.ndarray]:
    """v ↦ ∇²f(x) v ≈ (∇f(x + εv) − ∇f(x − εv)) / 2ε with ε = ``relative_step`` ‖x‖ / ‖v‖
    (error O(ε²) from the third derivative, plus the gradient's own error / ε).
    ``value_and_grad(x) -> (f, ∇f)`` must be exact to well below ε·‖∇²f v‖: an inner solve
    and adjoint at tight tolerances (``bilevel.hypergradient`` with a tight ``InnerConfig``).
    Vectors are flat numpy (ND,)."""
    x_norm = float(jnp.linalg.norm(images))

    def apply(v):
        v = jnp.asarray(v, images.dtype).reshape(images.shape)
        eps = relative_step * x_norm / float(jnp.linalg.norm(v))
        _, g_plus = value_and_grad(images + eps * v)
        _, g_minus = value_and_grad(images - eps * v)
        return np.asarray((g_plus - g_minus) / (2 * eps)).ravel()

    return apply
