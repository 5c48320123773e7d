"""Training objectives: closed forms, label conventions, weight decay, float64 gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon_jax.errors import ConfigError
from recon_jax.models import MLP, init_params
from recon_jax.objectives import accuracy, check_loss, make_objective, per_sample_loss


def test_cross_entropy_closed_form():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = jnp.array([0, 1])
    expected = [np.log(np.exp(2) + 1 + np.exp(-1)) - 2, np.log(2 * np.exp(0.5) + np.exp(3)) - 0.5]
    np.testing.assert_allclose(per_sample_loss("ce", logits, labels), expected, rtol=1e-12)


def test_logistic_accepts_01_and_pm1_labels():
    f = jnp.array([[1.5], [-0.3], [0.2]])
    expected = np.log1p(np.exp(-np.array([1.5, 0.3, -0.2])))  # s = +1, -1, -1
    np.testing.assert_allclose(per_sample_loss("logistic", f, jnp.array([1, 0, 0])), expected, rtol=1e-12)
    np.testing.assert_allclose(per_sample_loss("logistic", f, jnp.array([1, -1, -1])), expected, rtol=1e-12)


def test_mse_targets():
    single = per_sample_loss("mse", jnp.array([[0.5], [0.0]]), jnp.array([1, 0]))
    np.testing.assert_allclose(single, [0.5 * 0.25, 0.5 * 1.0])
    onehot = per_sample_loss("mse", jnp.array([[1.0, 0.0, 0.0]]), jnp.array([2]))
    np.testing.assert_allclose(onehot, [0.5 * (1.0 + 1.0)])


def test_weight_decay_term_and_mean_over_samples():
    model = MLP(n_out=2, hidden=(), activation="gelu")
    params = init_params(model, jax.random.key(0), (2, 2, 1), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (5, 2, 2, 1), jnp.float64)
    y = jnp.array([0, 1, 1, 0, 1])
    plain = make_objective(model.apply, "ce", 0.0)(params, x, y)
    decayed = make_objective(model.apply, "ce", 0.3)(params, x, y)
    sq = sum(float(jnp.sum(p ** 2)) for p in jax.tree_util.tree_leaves(params))
    np.testing.assert_allclose(decayed - plain, 0.15 * sq, rtol=1e-12)
    np.testing.assert_allclose(plain, jnp.mean(per_sample_loss("ce", model.apply(params, x), y)), rtol=1e-12)


@pytest.mark.parametrize("loss, n_out", [("ce", 3), ("logistic", 1), ("mse", 1), ("mse", 3)])
def test_gradient_matches_finite_differences_float64(loss, n_out):
    model = MLP(n_out=n_out, hidden=(4,), activation="softplus")
    params = init_params(model, jax.random.key(0), (3, 3, 1), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (6, 3, 3, 1), jnp.float64)
    y = jnp.array([0, 1, 2, 0, 1, 2]) % (3 if n_out == 3 else 2)
    f = make_objective(model.apply, loss, 1e-2)
    grad = jax.grad(f)(params, x, y)
    direction = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.key(3), p.shape, p.dtype), params)
    eps = 1e-6
    shift = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * d, params, direction)
    fd = (f(shift(eps), x, y) - f(shift(-eps), x, y)) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(direction)))
    np.testing.assert_allclose(analytic, fd, rtol=1e-7)


def test_loss_and_task_mismatches_are_named():
    with pytest.raises(ConfigError, match="unknown loss 'hinge'"):
        make_objective(lambda p, x: x, "hinge", 0.0)
    with pytest.raises(ConfigError, match="weight decay must be >= 0"):
        make_objective(lambda p, x: x, "ce", -1e-3)
    with pytest.raises(ConfigError, match="binary task"):
        check_loss("logistic", 1, 10)
    with pytest.raises(ConfigError, match="one output per class"):
        check_loss("ce", 1, 2)


def test_accuracy_binary_and_multiclass():
    assert accuracy(jnp.array([[0.3], [-0.2], [0.1]]), jnp.array([1, 0, 0])) == pytest.approx(2 / 3)
    assert accuracy(jnp.array([[0.3], [-0.2]]), jnp.array([1, -1])) == 1.0
    assert accuracy(jnp.array([[0.0, 1.0], [2.0, 1.0]]), jnp.array([1, 1])) == 0.5
