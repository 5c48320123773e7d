"""Landscapes: the x-only objectives (bilevel outer loss, KKT residual with λ profiled out),
1-D and 2-D slices through them, and distinct minima judged by them. Tiny float64 victims."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon_jax import kkt, landscape
from recon_jax.checkpoint import Victim
from recon_jax.errors import ConfigError
from recon_jax.models import MLP, init_params
from recon_jax.training import TrainConfig, train_victim

SHAPE = (4, 4, 1)


def _victim(model: MLP, params, loss: str, label_counts, weight_decay: float = 1e-2, report=None) -> Victim:
    return Victim(model=model, params=params, image_shape=SHAPE,
                  train_config=TrainConfig(loss=loss, weight_decay=weight_decay, dtype="float64"),
                  report=report or {}, label_counts=tuple(label_counts),
                  class_names=tuple(str(c) for c in range(len(label_counts))), meta={})


@pytest.fixture(scope="module")
def trained():
    """An affine ce victim on 6 random 4×4 images (3 per class, sorted by label), certified
    stationary in float64: (victim, true images (6, 4, 4, 1))."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-0.5, 0.5, (6, *SHAPE))
    labels = np.repeat([0, 1], 3)
    model = MLP(n_out=2)
    config = TrainConfig(loss="ce", weight_decay=1e-2, dtype="float64")
    params, report = train_victim(model, init_params(model, jax.random.key(0), SHAPE, jnp.float64),
                                  images, labels, config)
    assert report.stationary
    return _victim(model, params, "ce", (3, 3), report=report.to_dict()), jnp.asarray(images)


@pytest.fixture(scope="module")
def bilevel_f(trained):
    return landscape.objective_function(trained[0], "bilevel")


def test_bilevel_objective_zero_at_truth_positive_away(trained, bilevel_f):
    _, truth = trained
    assert float(bilevel_f(truth)) <= 1e-8
    away = truth + 0.1 * jax.random.normal(jax.random.key(1), truth.shape, truth.dtype)
    assert float(bilevel_f(away)) > 1e-6


def test_slice_1d_endpoints(trained, bilevel_f):
    _, truth = trained
    start = truth + 0.2 * jax.random.normal(jax.random.key(2), truth.shape, truth.dtype)
    out = landscape.slice_1d(bilevel_f, start, truth, n=13, extend=0.25)  # step 0.125: 0 and 1 on the grid
    assert out["t"].shape == out["values"].shape == (13,)
    assert out["t"][0] == -0.25 and out["t"][-1] == 1.25
    assert np.count_nonzero(out["t"] == 0.0) == 1 and np.count_nonzero(out["t"] == 1.0) == 1
    f_start, f_end = float(bilevel_f(start)), float(bilevel_f(truth))
    np.testing.assert_allclose(out["values"][out["t"] == 0.0], f_start, rtol=1e-7)
    np.testing.assert_allclose(out["values"][out["t"] == 1.0], f_end, atol=1e-10)
    np.testing.assert_allclose(out["start_value"], f_start, rtol=1e-7)
    assert out["end_value"] <= 1e-8 and f_start > 1e-6
    np.testing.assert_allclose(out["distance"], float(jnp.linalg.norm(truth - start)), rtol=1e-12)


def test_slice_2d_reproduces_the_three_points(trained, bilevel_f):
    _, truth = trained
    k1, k2 = jax.random.split(jax.random.key(3))
    origin = truth + 0.2 * jax.random.normal(k1, truth.shape, truth.dtype)
    other = truth + 0.2 * jax.random.normal(k2, truth.shape, truth.dtype)
    out = landscape.slice_2d(bilevel_f, origin, truth, other, n=4, names=("recon", "truth", "recon 2"))
    assert out["values"].shape == (4, 4) and out["u"].shape == out["v"].shape == (4,)
    expected = [float(bilevel_f(x)) for x in (origin, truth, other)]
    np.testing.assert_allclose(out["point_values"][[0, 2]], np.array(expected)[[0, 2]], rtol=1e-6)
    assert out["point_values"][1] <= 1e-8
    # The plane coordinates are true image-space distances.
    points = out["points"]
    np.testing.assert_allclose(points[0], [0.0, 0.0])
    for k, x in ((1, truth), (2, other)):
        np.testing.assert_allclose(np.linalg.norm(points[k]), float(jnp.linalg.norm(x - origin)), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(points[2] - points[1]), float(jnp.linalg.norm(other - truth)), rtol=1e-12)
    assert out["names"] == ("recon", "truth", "recon 2")


def test_slice_2d_grid_layout_on_a_quadratic():
    """values[i, j] = f(origin + u[j] e₁ + v[i] e₂), checked against f(x) = ‖x − c‖² directly."""
    rng = np.random.default_rng(4)
    origin, a, b, c = (jnp.asarray(rng.normal(size=(2, 3, 3, 1))) for _ in range(4))
    f = lambda x: jnp.sum((x - c) ** 2)
    out = landscape.slice_2d(f, origin, a, b, n=5, extend=0.5, batch_size=7)
    e1, e2, _ = landscape.plane_basis(origin, a, b)
    np.testing.assert_allclose(float(jnp.vdot(e1, e2)), 0.0, atol=1e-14)
    for i, j in ((0, 0), (1, 3), (4, 2)):
        x = origin + out["u"][j] * e1 + out["v"][i] * e2
        np.testing.assert_allclose(out["values"][i, j], float(f(x)), rtol=1e-12)
    np.testing.assert_allclose(out["point_values"], [float(f(x)) for x in (origin, a, b)], rtol=1e-12)
    # The grid covers the three points, widened by extend × span.
    assert out["u"][0] < out["points"][:, 0].min() and out["u"][-1] > out["points"][:, 0].max()


def test_slice_input_errors():
    f = lambda x: jnp.sum(x ** 2)
    x = jnp.ones((2, 3, 3, 1))
    with pytest.raises(ConfigError, match="same shape"):
        landscape.slice_1d(f, x, jnp.ones((2, 3, 3, 2)))
    with pytest.raises(ConfigError, match=r"\(m, h, w, c\)"):
        landscape.slice_1d(f, jnp.ones((3, 3)), jnp.ones((3, 3)))
    with pytest.raises(ConfigError, match="n must be"):
        landscape.slice_1d(f, x, 2 * x, n=1)
    with pytest.raises(ConfigError, match="collinear"):
        landscape.slice_2d(f, x, 2 * x, 3 * x)
    with pytest.raises(ConfigError, match="coincide"):
        landscape.slice_2d(f, x, x, 3 * x)


# ----------------------------------------------------------------------------------------
# KKT: the residual with λ profiled out
# ----------------------------------------------------------------------------------------

def _affine_point(task: str, n_out: int, m: int = 6, seed: int = 5):
    """x, λ and θ* := (1/m) Σ_j λ_j ∇_θ φ_j(x_j) for an affine model (∇φ is independent of θ):
    binary φ_j = y_j Φ(x_j), regression Σ_k λ_jk Φ_k(x_j). P = 17·C > q, so λ is unique."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-0.9, 0.9, (m, *SHAPE))
    flat = images.reshape(m, -1)
    if task == "binary":
        labels = kkt.candidate_labels((m // 2, m - m // 2), m, "binary")
        lambdas = rng.uniform(0.2, 1.0, m)
        coeff = (lambdas * np.where(labels > 0, 1.0, -1.0))[:, None]  # (m, 1)
    else:
        labels, lambdas = None, rng.normal(size=(m, n_out))
        coeff = lambdas
    params = {"params": {"layer_0": {"kernel": jnp.asarray(flat.T @ coeff / m),
                                     "bias": jnp.asarray(coeff.sum(axis=0) / m)}}}
    return MLP(n_out=n_out), params, images, labels, lambdas


@pytest.mark.parametrize("task,n_out", [("binary", 1), ("regression", 2)])
def test_kkt_profiled_recovers_constructed_lambda(task, n_out):
    model, params, images, labels, lambdas = _affine_point(task, n_out)
    labels = None if labels is None else jnp.asarray(labels)
    value, found = jax.jit(lambda x: landscape.profiled_stationarity(task, model.apply, params, x, labels))(
        jnp.asarray(images))
    assert float(value) <= 1e-14
    assert found.shape == lambdas.shape
    np.testing.assert_allclose(np.asarray(found), lambdas, rtol=1e-6, atol=1e-8)


def test_kkt_objective_of_victim_zero_at_constructed_point_positive_away():
    model, params, images, labels, _ = _affine_point("binary", 1)
    victim = _victim(model, params, "logistic", (3, 3))  # task binary; labels from the label counts
    f = landscape.objective_function(victim, "kkt")
    assert float(f(jnp.asarray(images))) <= 1e-14
    np.testing.assert_array_equal(labels, kkt.candidate_labels((3, 3), 6, "binary"))
    away = jnp.asarray(images) + 0.3 * jax.random.normal(jax.random.key(6), images.shape, jnp.float64)
    assert 1e-4 < float(f(away)) <= 1.0  # λ = 0 gives exactly 1: profiling can only do better


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_kkt_profiled_is_the_minimum_of_kkt_stationarity(activation):
    """At random x on a 1-hidden-layer net, the profiled value equals kkt_loss's relative
    residual² at λ̂ (same attacked network: modified ReLU with the same α for relu) and is
    below it at any other λ."""
    model = MLP(n_out=1, hidden=(3,), activation=activation)
    params = init_params(model, jax.random.key(7), SHAPE, jnp.float64)
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)
    m = 8
    images = jax.random.normal(jax.random.key(8), (m, *SHAPE), jnp.float64)
    labels = jnp.asarray(kkt.candidate_labels((4, 4), m, "binary"))
    hyper = kkt.Hyper(lr_x=0.0, alpha=50.0)
    apply_fn = kkt.attacked_model(model, hyper.alpha).apply
    value, lambdas = jax.jit(lambda x: landscape.profiled_stationarity("binary", apply_fn, params, x, labels))(images)
    problem = kkt.Problem(victim_params=params, labels=labels, model=model)
    relative = jax.jit(lambda lam: kkt.kkt_loss(kkt.KKTConfig(), problem, hyper, images, lam)[1]["relative_residual"])
    residual = lambda lam: float(relative(lam)) ** 2
    np.testing.assert_allclose(float(value), residual(lambdas), rtol=1e-8)
    for k in range(3):
        other = lambdas + 0.01 * jax.random.normal(jax.random.key(10 + k), lambdas.shape, lambdas.dtype)
        assert float(value) <= residual(other)
    f = landscape.objective_function(_victim(model, params, "logistic", (2, 2)), "kkt", labels=labels,
                                     kkt_hyper=hyper)
    np.testing.assert_allclose(float(f(images)), float(value), rtol=1e-12)


def test_objective_function_unknown_method(trained):
    with pytest.raises(ConfigError, match="unknown method"):
        landscape.objective_function(trained[0], "gradient-inversion")


def test_distinct_minima_counts_near_best_distinct_sets():
    rng = np.random.default_rng(8)
    base, other, worse = rng.random((3, 3, 8, 8, 1))
    runs = np.stack([base, base[[2, 0, 1]], other, worse])  # run 1 = run 0 with images permuted
    objective = np.array([1.0, 1.0, 1.0, 5.0])
    found = landscape.distinct_minima(runs, objective, objective_tol=1e-6, distance_threshold=0.1)
    assert found.count == 2
    np.testing.assert_array_equal(found.candidates, [0, 1, 2])  # run 3 (worse objective) excluded
    np.testing.assert_array_equal(found.representatives, [0, 2])
    np.testing.assert_array_equal(found.assignment, [0, 0, 2])
    assert found.distances.shape == (3, 3) and found.distances[0, 1] == 0.0 and found.distances[0, 2] > 1.0
    # Without matching, the permuted copy looks like a third minimum.
    assert landscape.distinct_minima(runs, objective, 1e-6, 0.1, match=False).count == 3
    # A tolerance that admits run 3 adds it as a third distinct set (plain L2: mean squared
    # difference of independent U[0,1] pixels is about 1/6).
    assert landscape.distinct_minima(runs, objective, 10.0, 0.05, metric="l2").count == 3


def test_distinct_minima_report_uses_the_x_only_objective(trained, bilevel_f):
    """Two runs at the truth (one with same-class images swapped: the same minimum) and one
    far off: one distinct minimum among the near-best, the far run excluded by its objective."""
    _, truth = trained
    swapped = truth[jnp.array([1, 0, 2, 3, 4, 5])]
    far = truth + 0.3 * jax.random.normal(jax.random.key(9), truth.shape, truth.dtype)
    report = landscape.distinct_minima_report(bilevel_f, jnp.stack([truth, swapped, far]),
                                              objective_tol=1e-8, distance_threshold=0.1)
    assert report["objective_values"].shape == (3,) and report["objective_values"][2] > 1e-6
    assert report["count"] == 1
    assert sorted(report["candidates"].tolist()) == [0, 1]
