"""recon_jax.lbfgs: the two-loop recursion against the dense BFGS inverse-Hessian update, the
solver on convex and non-convex problems with known minimisers, its stopping rules, and the
fixed-length body that makes a vmapped solve equal a loop of single solves (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon_jax import lbfgs
from recon_jax.objectives import squared_norm

flat = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]


def _quadratic(n=12, seed=0, condition=50.0):
    """L(θ) = ½ θᵀAθ − bᵀθ over θ = {"a": (n−4,), "b": (2, 2)}: minimiser A⁻¹b."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = q @ np.diag(np.geomspace(1.0, condition, n)) @ q.T
    b = rng.normal(size=n)
    unravel = jax.flatten_util.ravel_pytree({"a": jnp.zeros(n - 4), "b": jnp.zeros((2, 2))})[1]
    objective = lambda theta: 0.5 * flat(theta) @ (a @ flat(theta)) - b @ flat(theta)
    return objective, unravel, np.linalg.solve(a, b)


def _rosenbrock(theta):
    """Σ_i 100 (θ_{i+1} − θ_i²)² + (1 − θ_i)²: non-convex; global minimiser θ = 1 (in 2-D the only
    one; from 4-D on there is a second local minimum near θ_0 = −1)."""
    return jnp.sum(100.0 * (theta[1:] - theta[:-1] ** 2) ** 2 + (1.0 - theta[:-1]) ** 2)


def test_two_loop_direction_equals_the_dense_bfgs_inverse_hessian_of_the_last_m_pairs():
    """d = −H g with H from H⁰ = γI by the BFGS update H ← (I − ρsyᵀ) H (I − ρysᵀ) + ρssᵀ over
    the last m pairs, oldest first (Nocedal & Wright 2006, eq. 7.19), also after the ring
    buffer has wrapped (7 pairs stored in 4 slots) and before it is full (2 pairs)."""
    rng = np.random.default_rng(3)
    n, m = 9, 4
    unravel = jax.flatten_util.ravel_pytree({"w": jnp.zeros((2, 3)), "v": jnp.zeros(3)})[1]
    spd = rng.normal(size=(n, n))
    spd = spd @ spd.T + n * np.eye(n)
    pairs = [(s, spd @ s + 0.1 * rng.normal(size=n)) for s in rng.normal(size=(7, n))]
    grad = rng.normal(size=n)
    for count in (2, 7):
        s_hist, y_hist, rho = np.zeros((m, n)), np.zeros((m, n)), np.zeros(m)
        for i, (s, y) in enumerate(pairs[:count]):
            s_hist[i % m], y_hist[i % m], rho[i % m] = s, y, 1.0 / (y @ s)
        gamma = 0.37
        h = gamma * np.eye(n)
        for s, y in pairs[max(0, count - m):count]:
            r = 1.0 / (y @ s)
            h = (np.eye(n) - r * np.outer(s, y)) @ h @ (np.eye(n) - r * np.outer(y, s)) + r * np.outer(s, s)
        stacked = lambda hist: jax.vmap(unravel)(jnp.asarray(hist))
        direction = lbfgs.two_loop_direction(unravel(jnp.asarray(grad)), stacked(s_hist), stacked(y_hist),
                                             jnp.asarray(rho), jnp.asarray(count), jnp.asarray(gamma))
        np.testing.assert_allclose(flat(direction), -h @ grad, rtol=1e-12, atol=1e-12)


def test_minimize_reaches_the_minimiser_of_a_quadratic_and_reports_the_true_gradient_norm():
    objective, unravel, solution = _quadratic()
    start = unravel(jnp.zeros(12))
    theta, info = lbfgs.minimize(objective, start, tol=1e-10, max_iterations=200, history_size=10)
    true_norm = float(jnp.sqrt(squared_norm(jax.grad(objective)(theta))))
    np.testing.assert_allclose(float(info.grad_norm), true_norm, rtol=1e-10)
    assert true_norm <= 1e-10 and bool(info.converged) and not bool(info.stalled)
    assert int(info.gradients) == int(info.iterations) + 1 and int(info.iterations) <= 60
    np.testing.assert_allclose(flat(theta), solution, rtol=1e-9, atol=1e-10)
    # Already converged: no iteration, the one gradient at the start.
    again, info = lbfgs.minimize(objective, theta, tol=1e-9, max_iterations=200)
    assert int(info.iterations) == 0 and int(info.gradients) == 1
    np.testing.assert_array_equal(flat(again), flat(theta))


def test_minimize_solves_a_non_convex_problem_and_stops_at_its_iteration_cap():
    start = jnp.asarray([-1.2, 1.0])  # the classical start, along the curved valley
    theta, info = lbfgs.minimize(_rosenbrock, start, tol=1e-9, max_iterations=2000, history_size=8)
    assert bool(info.converged) and int(info.iterations) < 200
    np.testing.assert_allclose(theta, jnp.ones(2), atol=1e-8)
    # The cap: stops unconverged, not stalled, and reports the norm at the θ it returns.
    theta, info = lbfgs.minimize(_rosenbrock, start, tol=1e-9, max_iterations=5)
    assert int(info.iterations) == 5 and not bool(info.converged) and not bool(info.stalled)
    np.testing.assert_allclose(float(info.grad_norm), float(jnp.linalg.norm(jax.grad(_rosenbrock)(theta))), rtol=1e-12)
    assert float(_rosenbrock(theta)) < float(_rosenbrock(start))


def test_non_finite_trials_are_never_accepted_and_a_hopeless_start_stalls():
    """L = ∞ outside the ball ‖θ‖ ≤ 1.2 around a minimiser at ‖θ‖ = 1: unit trials from far
    starts leave the ball, are rejected, and the step scale shrinks; the solve still converges.
    Where L is NaN everywhere but the start, nothing is ever accepted: stalled, θ unchanged."""
    target = jnp.asarray([0.6, 0.8, 0.0])
    walled = lambda t: jnp.where(jnp.linalg.norm(t) <= 1.2, 10.0 * jnp.sum((t - target) ** 2), jnp.inf)
    start = jnp.asarray([-0.2, -0.3, 1.1])
    theta, info = lbfgs.minimize(walled, start, tol=1e-10, max_iterations=200)
    assert bool(info.converged) and bool(jnp.isfinite(walled(theta)))
    np.testing.assert_allclose(theta, target, atol=1e-11)
    nan_elsewhere = lambda t: jnp.where(jnp.all(t == start), jnp.sum(t ** 2), jnp.nan)
    theta, info = lbfgs.minimize(nan_elsewhere, start, tol=1e-10, max_iterations=200)
    assert bool(info.stalled) and not bool(info.converged) and int(info.iterations) < 200
    np.testing.assert_array_equal(theta, start)


@pytest.mark.parametrize("problem", ["quadratic", "rosenbrock"])
def test_minimize_under_vmap_equals_a_loop(problem):
    """The body has a fixed length and every element stops at its own test (a finished element
    is carried unchanged), so a vmapped solve gives each element the θ and the iteration count
    it gets alone."""
    if problem == "quadratic":
        objective, unravel, _ = _quadratic(seed=1)
        starts = jax.vmap(unravel)(jnp.asarray(np.random.default_rng(5).normal(size=(4, 12))) * jnp.asarray(
            [0.1, 1.0, 10.0, 100.0])[:, None])
    else:
        objective = _rosenbrock
        starts = jnp.asarray(np.random.default_rng(6).normal(size=(4, 5)))
    solve = lambda t: lbfgs.minimize(objective, t, tol=1e-9, max_iterations=300, history_size=5)
    batched, batched_info = jax.jit(jax.vmap(solve))(starts)
    counts = set()
    for i in range(4):
        alone, info = jax.jit(solve)(jax.tree_util.tree_map(lambda a: a[i], starts))
        assert int(batched_info.iterations[i]) == int(info.iterations)
        counts.add(int(info.iterations))
        # Equal up to reassociation in the batched products (round-off of θ's O(1) entries).
        np.testing.assert_allclose(flat(jax.tree_util.tree_map(lambda a: a[i], batched)), flat(alone),
                                   rtol=1e-10, atol=1e-12)
    assert len(counts) > 1  # the elements did stop at different iterations
