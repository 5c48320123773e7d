"""recon_jax.curvature: Lanczos against a known spectrum, the outer Gauss–Newton operator against
the dense Jᵀ J of the implicit function theorem, and the finite-difference Hessian product
against jax.hessian, all in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from recon_jax.curvature import gauss_newton_operator, hessian_operator, lanczos
from recon_jax.errors import ConfigError
from recon_jax.models import MLP, init_params
from recon_jax.objectives import make_objective
from recon_jax.solvers import InnerConfig, make_solve


def test_lanczos_finds_the_extreme_eigenvalues():
    rng = np.random.default_rng(0)
    eigenvalues = np.concatenate([[-2.0, 1e-3], np.linspace(0.5, 1.5, 60), [9.0]])
    basis, _ = np.linalg.qr(rng.normal(size=(63, 63)))
    A = basis @ np.diag(eigenvalues) @ basis.T
    full = lanczos(lambda v: A @ v, 63, 63)
    np.testing.assert_allclose(full, np.sort(eigenvalues), atol=1e-10)
    ritz = lanczos(lambda v: A @ v, 63, 25)  # well-separated ends converge first
    assert ritz[0] == pytest.approx(-2.0, abs=1e-8) and ritz[-1] == pytest.approx(9.0, abs=1e-8)
    assert ritz[1] == pytest.approx(1e-3, abs=1e-6)
    with pytest.raises(ConfigError, match="k >= 1"):
        lanczos(lambda v: v, 3, 0)


def _problem():
    """A small gelu MLP trained (to ‖∇L‖ ≤ 1e-11, the library's L-BFGS) on 3 random 2×2 images."""
    jax.config.update("jax_enable_x64", True)
    model = MLP(n_out=2, hidden=(3,), activation="gelu")
    objective = make_objective(model.apply, "ce", 1e-2)
    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 1), jnp.float64)
    y = jnp.array([0, 1, 1])
    theta0 = init_params(model, jax.random.key(1), (2, 2, 1), jnp.float64)
    theta, info = make_solve(objective, InnerConfig(tol=1e-12, maxiter=2000))(theta0, x, y)
    flat, unravel = ravel_pytree(theta)
    loss = lambda f, x: objective(unravel(f), x, y)
    assert float(jnp.linalg.norm(jax.grad(loss)(flat, x))) < 1e-11
    return objective, x, y, theta, unravel, loss, flat


def test_gauss_newton_operator_equals_the_dense_implicit_jacobian():
    objective, x, y, theta, unravel, loss, flat = _problem()
    theta_star = jax.tree_util.tree_map(lambda a: 1.1 * a, theta)  # any θ*: G depends on it by ‖θ*‖²
    H = jax.hessian(loss)(flat, x)
    M = jax.jacobian(lambda xx: jax.grad(loss)(flat, xx))(x).reshape(flat.size, -1)
    J = -jnp.linalg.solve(H, M)  # dθ/dx, implicit function theorem
    norm2 = float(jnp.vdot(1.1 * flat, 1.1 * flat))
    G = 2.0 / norm2 * J.T @ J
    apply = gauss_newton_operator(objective, x, y, theta, theta_star)
    u = np.random.default_rng(0).normal(size=x.size)
    np.testing.assert_allclose(apply(u), np.asarray(G @ u), rtol=1e-8, atol=1e-12)
    assert lanczos(apply, x.size, x.size)[0] >= -1e-10  # positive semidefinite


def test_hessian_operator_matches_the_exact_hessian():
    jax.config.update("jax_enable_x64", True)
    f = lambda x: jnp.sum(jnp.sin(x) * x[::-1]) + 0.5 * jnp.sum(x ** 4)
    x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 2, 2, 1)
    apply = hessian_operator(jax.value_and_grad(f), x)
    v = np.random.default_rng(1).normal(size=x.size)
    exact = jax.hessian(lambda flat: f(flat.reshape(x.shape)))(x.ravel()) @ v
    np.testing.assert_allclose(apply(v), np.asarray(exact), rtol=1e-6, atol=1e-7)
