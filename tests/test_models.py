"""MLP architectures: parameter counts, reference architecture, and bad configurations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon_jax.errors import ConfigError
from recon_jax.models import (MLP, activation_fn, count_params, expected_param_count, init_params,
                              model_config, model_from_config)


@pytest.mark.parametrize("hidden, use_bias, shape, n_out, expected", [
    ((), True, (28, 28, 1), 10, 784 * 10 + 10),                                    # affine
    ((1000,), True, (28, 28, 1), 10, 784 * 1000 + 1000 + 1000 * 10 + 10),          # one hidden layer
    ((1000, 1000), (True, False, False), (32, 32, 3), 1, 3072 * 1000 + 1000 + 1000 * 1000 + 1000),  # Haim 2022
    ((256,), False, (8, 8, 1), 10, 64 * 256 + 256 * 10),
])
def test_parameter_counts(hidden, use_bias, shape, n_out, expected):
    model = MLP(n_out=n_out, hidden=hidden, use_bias=use_bias)
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0), shape))
    assert count_params(params) == expected == expected_param_count(model, shape)


def test_reference_first_layer_init_scale():
    model = MLP(n_out=1, hidden=(1000, 1000), activation="relu", use_bias=(True, False, False),
                first_layer_init_scale=1e-4)
    params = init_params(model, jax.random.key(0), (8, 8, 1))["params"]
    assert set(params["layer_0"]) == {"kernel", "bias"} and set(params["layer_1"]) == {"kernel"}
    assert 0.8e-4 < float(jnp.std(params["layer_0"]["kernel"])) < 1.2e-4
    assert float(jnp.std(params["layer_1"]["kernel"])) > 1e-2


def test_apply_is_pure_and_batches_like_single_images():
    model = MLP(n_out=3, hidden=(5,), activation="tanh")
    params = init_params(model, jax.random.key(1), (2, 2, 1), jnp.float64)
    x = jax.random.normal(jax.random.key(2), (4, 2, 2, 1), jnp.float64)
    batch = model.apply(params, x)
    assert batch.shape == (4, 3) and batch.dtype == jnp.float64
    np.testing.assert_allclose(model.apply(params, x[1]), batch[1], rtol=1e-12)


def test_softplus_sharpness_and_gelu_exact():
    z = jnp.linspace(-3, 3, 7)
    np.testing.assert_allclose(activation_fn("softplus", 50.0)(z), jax.nn.relu(z), atol=2e-2)
    np.testing.assert_allclose(activation_fn("softplus", 2.0)(z), jnp.log1p(jnp.exp(2 * z)) / 2, rtol=1e-6)
    np.testing.assert_allclose(activation_fn("gelu")(z), jax.nn.gelu(z, approximate=False))


@pytest.mark.parametrize("kwargs, match", [
    (dict(activation="swish"), "unknown activation 'swish'"),
    (dict(hidden=(10,), use_bias=(True,)), "use_bias has 1 entries but the net has 2 layers"),
    (dict(hidden=(0,)), "hidden widths must be >= 1"),
    (dict(activation="softplus", softplus_beta=0.0), "sharpness must be > 0"),
    (dict(first_layer_init_scale=-1.0), "first_layer_init_scale must be > 0"),
])
def test_bad_configurations_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MLP(n_out=2, **kwargs)


def test_config_roundtrip():
    model = MLP(n_out=1, hidden=(7, 3), activation="softplus", softplus_beta=5.0, use_bias=(True, False, True),
                first_layer_init_scale=1e-3)
    assert model_from_config(model_config(model)) == model
