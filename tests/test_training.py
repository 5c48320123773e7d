"""Victim training: certified stationarity for smooth victims, an honest verdict for relu."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon_jax import data
from recon_jax.errors import ConfigError
from recon_jax.models import MLP, init_params
from recon_jax.objectives import make_objective, squared_norm
from recon_jax.training import NotStationaryWarning, TrainConfig, train_victim


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
