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


def _logistic(seed=0, n=40, d=6, classes=3, weight_decay=1e-2):
    """A strongly convex L(W, b) = mean cross-entropy of softmax(xW + b) + λ/2 ‖(W, b)‖²."""
    rng = np.random.default_rng(seed)
    x, y = jnp.asarray(rng.normal(size=(n, d))), jnp.asarray(rng.integers(0, classes, n))

    def objective(params, x, y):
        logits = x @ params["w"] + params["b"]
        ce = jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0])
        return ce + 0.5 * weight_decay * (jnp.sum(params["w"] ** 2) + jnp.sum(params["b"] ** 2))

    start = {"w": jnp.asarray(rng.normal(size=(d, classes))), "b": jnp.zeros(classes)}
    return objective, start, x, y


def test_newton_minimize_reaches_the_tolerance_and_the_minimiser_of_a_strongly_convex_problem():
    """Inexact Newton–CG with fixed budgets: ‖∇L‖ ≤ tol at the returned θ (the reported norm is
    the true one there), the same minimiser as a dense Newton iteration, and superlinear
    convergence where CG can solve the Newton system (21 unknowns, 21 iterations), and still
    convergence, linear and slower, with a budget of 5."""
    objective, start, x, y = _logistic()
    steps = {}
    for budget in (21, 5):
        theta, info = newton.minimize(objective, start, x, y, tol=1e-12, max_steps=50, cg_iterations=budget)
        true_norm = float(jnp.sqrt(newton.squared_norm(jax.grad(objective)(theta, x, y))))
        # The reported norm comes from the converged check's linearisation, another evaluation
        # order than jax.grad: equal up to the gradient's own round-off (a few eps of its O(1) terms).
        np.testing.assert_allclose(float(info.grad_norm), true_norm, rtol=1e-12, atol=4 * np.finfo(np.float64).eps)
        assert true_norm <= 1e-12 and not bool(info.stalled)
        assert int(info.gradients) == int(info.steps) + 1  # no gradient after the converged check
        steps[budget] = int(info.steps)
    assert 1 <= steps[21] <= 10 and steps[21] < steps[5] < 50
    # The (unique) minimiser by dense Newton steps on the flattened parameters, from θ = 0.
    flat, unravel = jax.flatten_util.ravel_pytree(start)
    flat = jnp.zeros_like(flat)
    f = lambda v: objective(unravel(v), x, y)
    for _ in range(30):
        flat = flat - jnp.linalg.solve(jax.hessian(f)(flat), jax.grad(f)(flat))
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(theta)[0], flat, rtol=1e-9, atol=1e-11)
    # Already converged: no step, one linearisation.
    again, info = newton.minimize(objective, theta, x, y, tol=1e-10, max_steps=50, cg_iterations=5)
    assert int(info.steps) == 0 and int(info.gradients) == 1
    np.testing.assert_array_equal(jax.flatten_util.ravel_pytree(again)[0], jax.flatten_util.ravel_pytree(theta)[0])


def test_newton_minimize_stops_at_its_step_cap_and_reports_the_norm_there():
    objective, start, x, y = _logistic(seed=1)
    theta, info = newton.minimize(objective, start, x, y, tol=1e-14, max_steps=2, cg_iterations=1)
    assert int(info.steps) == 2 and not bool(info.stalled)
    assert int(info.gradients) == 2 + 1  # the steps' linearisations and the gradient at the returned θ
    true_norm = float(jnp.sqrt(newton.squared_norm(jax.grad(objective)(theta, x, y))))
    np.testing.assert_allclose(float(info.grad_norm), true_norm, rtol=1e-12)
    assert true_norm > 1e-14


def test_newton_minimize_under_vmap_equals_a_loop():
    """Each batch element stops at its own tolerance (the converged ones are masked), so the
    vmapped solve gives every element the θ it gets alone."""
    objective, start, x, y = _logistic(seed=2)
    scales = jnp.asarray([0.1, 1.0, 3.0, 10.0])
    solve = lambda s: newton.minimize(objective, jax.tree_util.tree_map(lambda a: s * a, start), x, y, tol=1e-11,
                                      max_steps=40, cg_iterations=4)
    batched, batched_info = jax.vmap(solve)(scales)
    for i, s in enumerate(scales):
        alone, info = solve(s)
        assert int(batched_info.steps[i]) == int(info.steps)
        for a, b in zip(jax.tree_util.tree_leaves(alone), jax.tree_util.tree_leaves(batched)):
            np.testing.assert_allclose(b[i], a, rtol=1e-12, atol=1e-14)
