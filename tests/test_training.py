"""Victim training: certified stationarity for smooth victims, an honest verdict for relu."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon_jax import data, newton
from recon_jax.errors import ConfigError
from recon_jax.models import MLP, init_params
from recon_jax.objectives import make_objective, squared_norm
from recon_jax.training import SOLVERS, NotStationaryWarning, TrainConfig, train_victim


@pytest.fixture(scope="module")
def digits():
    return data.select(data.load_dataset("digits"), n_per_class=10, seed=0)


def _train(digits, model, config, **kw):
    params0 = init_params(model, jax.random.key(0), digits.train.shape, config.dtype)
    return train_victim(model, params0, digits.train_centered(), digits.train.labels, config,
                        heldout_images=digits.heldout_centered(), heldout_labels=digits.heldout.labels, **kw)


@pytest.mark.parametrize("hidden, activation", [((), "gelu"), ((64,), "gelu"), ((64,), "softplus"), ((64,), "tanh")])
def test_smooth_victims_are_certified_stationary(digits, hidden, activation):
    model = MLP(n_out=10, hidden=hidden, activation=activation)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotStationaryWarning)
        params, report = _train(digits, model, TrainConfig(loss="ce", weight_decay=1e-3))
    assert report.stationary and report.grad_norm <= 1e-8
    # The certificate is recomputed, not copied from the solver: check it independently.
    objective = make_objective(model.apply, "ce", 1e-3)
    grad = jax.grad(objective)(params, jnp.asarray(digits.train_centered(), jnp.float64), digits.train.labels)
    np.testing.assert_allclose(float(jnp.sqrt(squared_norm(grad))), report.grad_norm, rtol=1e-6)
    assert report.train_accuracy == 1.0 and 0.3 < report.heldout_accuracy <= 1.0
    assert report.n_params == sum(p.size for p in jax.tree_util.tree_leaves(params))
    assert report.grad_norm_rel == pytest.approx(report.grad_norm / float(jnp.sqrt(squared_norm(params))))
    assert 0 < report.iterations < 3000 and report.seconds > 0


def test_relu_victim_is_reported_not_stationary_with_its_figure(digits):
    model = MLP(n_out=10, hidden=(100,), activation="relu")
    with pytest.warns(NotStationaryWarning, match=r"NOT stationary: \|\|grad L\|\| = .* relu activation has kinks"):
        _, report = _train(digits, model, TrainConfig(maxiter=300))
    assert not report.stationary and report.grad_norm > 1e-6 and report.iterations == 300
    assert "gelu, softplus or tanh" in report.note


def test_float32_training(digits):
    model = MLP(n_out=10, hidden=(), activation="gelu")
    params, report = _train(digits, model, TrainConfig(dtype="float32"))
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
    assert report.stationary and report.certify_tol == 1e-5


def test_gradient_descent_option_and_progress(digits):
    model = MLP(n_out=10, hidden=(), activation="gelu")
    seen = []
    with pytest.warns(NotStationaryWarning, match="Raise --maxiter"):  # 400 GD steps do not reach 1e-8
        _, report = _train(digits, model, TrainConfig(solver="gd", learning_rate=0.5, maxiter=400, segment=100),
                           progress=lambda it, err: seen.append((it, err)))
    assert [it for it, _ in seen] == [100, 200, 300, 400]
    assert seen[-1][1] < seen[0][1] and report.solver == "gd"


def test_bad_training_configurations():
    with pytest.raises(ConfigError, match="weight decay must be >= 0"):
        TrainConfig(weight_decay=-1.0)
    with pytest.raises(ConfigError, match="unknown solver 'adam'"):
        TrainConfig(solver="adam")
    with pytest.raises(ConfigError, match="unknown hessian_dtype 'float16'"):
        TrainConfig(hessian_dtype="float16")
    with pytest.raises(ConfigError, match="hessian_dtype float64 needs dtype float64"):
        TrainConfig(dtype="float32", hessian_dtype="float64")
    with pytest.raises(ConfigError, match="cg_maxiter must be >= 1"):
        TrainConfig(cg_maxiter=0)


def test_newton_is_the_default_and_beats_lbfgs_in_iterations(digits):
    assert TrainConfig().solver == "newton" and set(SOLVERS) == {"newton", "lbfgs", "gd"}
    model = MLP(n_out=10, hidden=(64,), activation="gelu")
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotStationaryWarning)
        _, newton_report = _train(digits, model, TrainConfig(), progress=lambda it, err: seen.append((it, err)))
        _, lbfgs_report = _train(digits, model, TrainConfig(solver="lbfgs"))
    assert newton_report.stationary and newton_report.grad_norm <= 1e-8 and lbfgs_report.stationary
    assert newton_report.solver == "newton" and newton_report.iterations < lbfgs_report.iterations / 5
    # Counts: one linearisation per step (plus the one that finds ||grad L|| <= tol), CG products on top.
    assert newton_report.grad_evals == newton_report.iterations + 1
    assert newton_report.hvp_evals > newton_report.iterations
    assert lbfgs_report.hvp_evals == 0 and lbfgs_report.grad_evals >= lbfgs_report.iterations
    # Progress every 10 steps (the Newton segment), ending with the converged gradient.
    assert [it for it, _ in seen][:2] == [10, 20] and seen[-1][0] == newton_report.iterations and seen[-1][1] <= 1e-10


@pytest.fixture(scope="module")
def convex_lbfgs_solution(digits):
    """θ* of a strongly convex problem (affine, cross-entropy, weight decay 1e-3) by L-BFGS to 1e-12."""
    model = MLP(n_out=10, hidden=(), activation="gelu")
    params, report = _train(digits, model, TrainConfig(solver="lbfgs", tol=1e-12))
    assert report.grad_norm <= 1e-12
    return model, params


@pytest.mark.parametrize("hessian_dtype", ["float32", "float64"])
def test_newton_agrees_with_lbfgs_on_a_strongly_convex_problem(digits, convex_lbfgs_solution, hessian_dtype):
    # L is 1e-3-strongly convex, so ||theta - theta*|| <= ||grad L(theta)|| / 1e-3 <= 1e-9 for both solutions.
    model, lbfgs_params = convex_lbfgs_solution
    params, report = _train(digits, model, TrainConfig(tol=1e-12, hessian_dtype=hessian_dtype))
    assert report.grad_norm <= 1e-12 and report.iterations < 30
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(lbfgs_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-8)


def test_newton_reports_a_non_finite_start_instead_of_crashing(digits):
    model = MLP(n_out=10, hidden=(16,), activation="gelu")
    params0 = init_params(model, jax.random.key(0), digits.train.shape, "float64")
    params0 = jax.tree_util.tree_map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), params0)
    with pytest.warns(NotStationaryWarning, match="is not finite after 0 iterations"):
        _, report = train_victim(model, params0, digits.train_centered(), digits.train.labels, TrainConfig())
    assert not report.stationary and np.isnan(report.grad_norm) and report.iterations == 0


def _quadratic(eigenvalues, seed=0):
    """H = Q diag(eigenvalues) Qᵀ (n×n, Q a random rotation) as a matvec on {"w": (n,)} pytrees, and g."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
    h = q @ np.diag(eigenvalues) @ q.T
    return h, (lambda v: {"w": jnp.asarray(h) @ v["w"]}), {"w": jnp.asarray(rng.normal(size=len(eigenvalues)))}


def test_steihaug_cg_newton_step_boundary_and_negative_curvature():
    h, matvec, g = _quadratic(np.linspace(0.5, 4.0, 12))
    model = lambda d: float(g["w"] @ d + 0.5 * d @ h @ d)
    newton_dir = -np.linalg.solve(h, np.asarray(g["w"]))
    # Inside a large region: the Newton step to the requested relative residual, in <= n products.
    d, info = newton.steihaug_cg(matvec, g, 1e3, tol=1e-10, maxiter=50)
    np.testing.assert_allclose(np.asarray(d["w"]), newton_dir, rtol=1e-8)
    assert info.iterations <= 12 and info.residual <= 1e-10 and not info.boundary and not info.negative_curvature
    np.testing.assert_allclose(float(info.model_decrease), -model(newton_dir), rtol=1e-10)
    # A small region: the step stops on its boundary and still decreases the model.
    d, info = newton.steihaug_cg(matvec, g, 0.1, tol=1e-10, maxiter=50)
    assert bool(info.boundary) and float(jnp.linalg.norm(d["w"])) == pytest.approx(0.1, rel=1e-10)
    np.testing.assert_allclose(float(info.model_decrease), -model(np.asarray(d["w"])), rtol=1e-10)
    assert float(info.model_decrease) > 0
    # Indefinite H: CG meets negative curvature and goes to the boundary along it.
    h, matvec, g = _quadratic(np.array([-1.0, 0.5, 1.0, 2.0, 3.0]), seed=1)
    d, info = newton.steihaug_cg(matvec, g, 100.0, tol=1e-10, maxiter=50)
    assert bool(info.negative_curvature) and bool(info.boundary) and info.iterations <= 5
    assert float(jnp.linalg.norm(d["w"])) == pytest.approx(100.0, rel=1e-10)
    assert float(info.model_decrease) > 0 and float(g["w"] @ d["w"]) < 0
