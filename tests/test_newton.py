"""The fixed-budget linear solvers of recon_jax.newton: MINRES on symmetric indefinite systems
(against a dense solve and the optimal Krylov residual), the scaled warm start shared with CG,
and the masks that make a batch element's arithmetic its own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon_jax import newton


def _indefinite(n=30, negative=5, seed=0):
    """A (n, n) symmetric matrix with ``negative`` eigenvalues in [−1, −0.1] and the rest in [0.1, 10]."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eigenvalues = np.concatenate([rng.uniform(0.1, 10, n - negative), -rng.uniform(0.1, 1, negative)])
    return q @ np.diag(eigenvalues) @ q.T, rng.normal(size=n)


def _optimal_krylov_residual(a, r0, k):
    """min over u ∈ K_k(A, r0) of ‖r0 − A u‖ / ‖r0‖, from an orthonormal Krylov basis (Arnoldi)."""
    basis = [r0 / np.linalg.norm(r0)]
    for _ in range(k - 1):
        w = a @ basis[-1]
        for q in basis:
            w -= (q @ w) * q
        basis.append(w / np.linalg.norm(w))
    aq = a @ np.stack(basis, 1)
    c, *_ = np.linalg.lstsq(aq, r0, rcond=None)
    return np.linalg.norm(r0 - aq @ c) / np.linalg.norm(r0)


def test_minres_solves_an_indefinite_system_with_the_least_residual_of_each_krylov_space():
    a, b = _indefinite()
    matvec = lambda v: jnp.asarray(a) @ v
    exact = np.linalg.solve(a, b)
    previous = 1.0
    for k in (1, 3, 8, 15):
        u, info = newton.minimal_residual(matvec, jnp.asarray(b), None, iterations=k)
        true = np.linalg.norm(b - a @ np.asarray(u)) / np.linalg.norm(b)
        np.testing.assert_allclose(float(info.residual), true, rtol=1e-8)  # the recursive estimate is the residual
        np.testing.assert_allclose(true, _optimal_krylov_residual(a, b, k), rtol=1e-6)
        assert true <= previous and int(info.iterations) == k
        previous = true
    u, info = newton.minimal_residual(matvec, jnp.asarray(b), None, iterations=40, tol=1e-12)
    np.testing.assert_allclose(np.asarray(u), exact, rtol=1e-9, atol=1e-9)
    assert int(info.iterations) <= 31  # frozen at the tolerance (n = 30, plus round-off)
    # CG on the same system meets negative curvature and stops far from the solution.
    _, cg_info = newton.conjugate_gradient(matvec, jnp.asarray(b), None, iterations=40)
    assert float(cg_info.residual) > 1e-3


def test_minres_with_a_ridge_and_early_stop_agrees_with_the_fixed_budget():
    a, b = _indefinite(seed=1)
    matvec = lambda v: jnp.asarray(a) @ v
    fixed, fixed_info = newton.minimal_residual(matvec, jnp.asarray(b), None, iterations=60, ridge=0.5, tol=1e-10)
    early, early_info = newton.minimal_residual(matvec, jnp.asarray(b), None, iterations=60, ridge=0.5, tol=1e-10,
                                                early_stop=True)
    np.testing.assert_allclose(np.asarray(fixed), np.linalg.solve(a + 0.5 * np.eye(len(b)), b), rtol=1e-8, atol=1e-8)
    np.testing.assert_array_equal(np.asarray(fixed), np.asarray(early))
    assert int(fixed_info.iterations) == int(early_info.iterations) < 60


@pytest.mark.parametrize("solver", [newton.minimal_residual, newton.conjugate_gradient])
def test_a_warm_start_never_starts_worse_than_none(solver):
    """The scaled warm start u₀ = c x₀ (c minimising ‖b − c A x₀‖) keeps ‖r₀‖ ≤ ‖b‖ for any x₀:
    a stale adjoint carried from another Hessian, a million times too long, is scaled away
    instead of carried on; a good warm start is kept (c ≈ 1) and improved."""
    a, b = _indefinite(seed=2) if solver is newton.minimal_residual else (np.eye(30) * 2.0 + 0.1, np.ones(30))
    matvec = lambda v: jnp.asarray(a) @ v
    rng = np.random.default_rng(3)
    stale = 1e6 * rng.normal(size=len(b))
    _, info = solver(matvec, jnp.asarray(b), jnp.asarray(stale), iterations=1)
    assert float(info.residual) <= 1.0 + 1e-12
    exact = np.linalg.solve(a, b)
    good = exact + 1e-3 * rng.normal(size=len(b))
    u, info = solver(matvec, jnp.asarray(b), jnp.asarray(good), iterations=2)
    start = np.linalg.norm(b - a @ good) / np.linalg.norm(b)
    assert float(info.residual) < start and np.linalg.norm(np.asarray(u) - exact) < 1e-2
    u, info = solver(matvec, jnp.asarray(b), jnp.asarray(exact), iterations=3, tol=1e-10)
    assert int(info.iterations) == 0  # an exact warm start is already converged: frozen


def test_minres_under_vmap_equals_a_loop():
    """Each batch element runs its own iterations (masks, no shared stopping test)."""
    a, _ = _indefinite(seed=4)
    rng = np.random.default_rng(5)
    bs = jnp.asarray(rng.normal(size=(4, 30)))
    bs = bs.at[1].set(jnp.asarray(np.linalg.eigh(a)[1][:, 0]))  # an eigenvector: solved in one iteration
    matvec = lambda v: jnp.asarray(a) @ v
    solve = lambda b: newton.minimal_residual(matvec, b, None, iterations=12, tol=1e-6)
    batched, info = jax.vmap(solve)(bs)
    for i in range(4):
        single, single_info = solve(bs[i])
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single), rtol=1e-12, atol=1e-14)
        assert int(info.iterations[i]) == int(single_info.iterations)
    assert int(info.iterations[1]) == 1 and int(info.iterations[0]) == 12
