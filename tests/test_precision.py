"""Precision discipline: one table of dtype-dependent tolerances, a compute dtype that follows
θ, mixed image/θ dtypes refused, failed line searches that stop the inner solve, and float32
bilevel and KKT runs that compute and store in float32.

conftest.py turns on x64 for the whole session, so every float32 array here is made float32
explicitly (a float32 test that forgot would silently run in float64).
"""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon_jax import bilevel, checkpoint, data, kkt, precision, training
from recon_jax.cli import main
from recon_jax.errors import ConfigError
from recon_jax.models import MLP, init_params
from recon_jax.objectives import make_objective
from recon_jax.reconstruct import ReconstructionSpec, reconstruct
from recon_jax.solvers import InnerConfig, make_argmin
from recon_jax.training import TrainConfig, train_victim

F32, F64 = jnp.float32, jnp.float64
CLASSES = (0, 1, 2)


def _leaf_dtypes(tree) -> set:
    return {leaf.dtype for leaf in jax.tree_util.tree_leaves(tree)}


@pytest.fixture(scope="module")
def digits():
    """2 images of each of 3 digit classes, 8×8."""
    return data.select(data.load_dataset("digits"), n_per_class=2, classes=CLASSES, seed=0)


def _train(digits, dtype: str, hidden=(16,)):
    """A gelu victim trained in ``dtype`` on ``digits``: (model, θ*, report, images, labels, config)."""
    model = MLP(n_out=len(CLASSES), hidden=hidden, activation="gelu")
    images = jnp.asarray(digits.train_centered(), dtype)
    labels = jnp.asarray(digits.train.labels)
    config = TrainConfig(loss="ce", weight_decay=1e-2, dtype=dtype, solver="lbfgs")  # the fixtures these tests were measured on
    params, report = train_victim(model, init_params(model, jax.random.key(0), images.shape[1:], dtype), images,
                                  labels, config)
    return model, params, report, images, labels, config


@pytest.fixture(scope="module")
def victim32(digits):
    return _train(digits, "float32")


@pytest.fixture(scope="module")
def victim64(digits):
    return _train(digits, "float64")


def _save(directory, digits, victim):
    model, params, report, images, _, config = victim
    return checkpoint.save_victim(directory, model=model, params=params, image_shape=tuple(images.shape[1:]),
                                  train_config=config, report=report, data=digits, seed=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, digits, victim32, victim64):
    root = tmp_path_factory.mktemp("precision")
    return {"float32": _save(root / "victim32", digits, victim32),
            "float64": _save(root / "victim64", digits, victim64)}


# ---------------------------------------------------------------------------------------- one tolerance table


def test_tolerances_come_from_one_table():
    assert precision.default_tolerances("float64") == {"inner_tol": 1e-10, "cg_tol": 1e-10, "certify_tol": 1e-8,
                                                       "solver_tol": 1e-10}
    assert precision.default_tolerances(np.float32) == {"inner_tol": 1e-6, "cg_tol": 1e-6, "certify_tol": 1e-5,
                                                        "solver_tol": 1e-6}
    precision.default_tolerances("float32")["inner_tol"] = 1.0  # a fresh dict: the table is not changed
    assert precision.default_tolerances(F32)["inner_tol"] == 1e-6
    for name in precision.DTYPES:
        table = precision.default_tolerances(name)
        assert training.DEFAULT_SOLVER_TOL[name] == table["solver_tol"] == TrainConfig(dtype=name).resolved_tol
        certify_tol = TrainConfig(dtype=name).resolved_certify_tol
        assert training.DEFAULT_CERTIFY_TOL[name] == table["certify_tol"] == certify_tol
        resolved = InnerConfig().resolved(name)
        assert (resolved.tol, resolved.cg_tol) == (table["inner_tol"], table["cg_tol"])
    # None means "by dtype"; a value given is kept; resolving twice changes nothing.
    assert InnerConfig().tol is None and InnerConfig().cg_tol is None
    given = InnerConfig(tol=1e-4).resolved(F64)
    assert (given.tol, given.cg_tol) == (1e-4, 1e-10) and given.resolved(F32) == given
    with pytest.raises(ConfigError, match="unsupported dtype"):
        precision.default_tolerances("float16")
    with pytest.raises(ConfigError, match="tol and cg_tol > 0"):
        InnerConfig(tol=0.0)


# ---------------------------------------------------------------------------------------- compute dtype


def test_compute_dtype_follows_theta():
    model = MLP(n_out=2, hidden=(5,), use_bias=(True, False))
    p32 = init_params(model, jax.random.key(0), (3, 3, 1), F32)
    p64 = init_params(model, jax.random.key(0), (3, 3, 1), F64)
    assert _leaf_dtypes(p32) == {np.dtype("float32")} and _leaf_dtypes(p64) == {np.dtype("float64")}
    x32 = jax.random.normal(jax.random.key(1), (4, 3, 3, 1), F32)
    x64 = x32.astype(F64)
    # float32 images on a float64 θ compute in float64 (widening is exact, so the outputs are equal) ...
    out = model.apply(p64, x32)
    assert out.dtype == F64
    np.testing.assert_array_equal(out, model.apply(p64, x64))
    # ... and float64 images on a float32 θ compute in float32.
    assert model.apply(p32, x64).dtype == F32
    np.testing.assert_array_equal(model.apply(p32, x64), model.apply(p32, x32))
    # The gradient with respect to the images comes back in the images' dtype.
    assert jax.grad(lambda x: model.apply(p64, x).sum())(x32).dtype == F32


# ---------------------------------------------------------------------------------------- inner solver


@pytest.mark.parametrize("backend", ["jaxopt", "custom_vjp"])
def test_inner_solver_refuses_images_of_another_dtype(backend, victim64):
    model, params, _, images, labels, _ = victim64
    argmin = make_argmin(make_objective(model.apply, "ce", 1e-2), InnerConfig(backend=backend))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    with pytest.raises(ConfigError, match="the images: dtype float32, but theta is float64"):
        argmin(params, images.astype(F32), labels, zeros, zeros)


@pytest.mark.parametrize("backend", ["jaxopt", "custom_vjp"])
def test_failed_line_search_stops_the_float32_inner_solve(backend, victim32):
    """float64's tolerance (1e-10) is unreachable in float32: the solve used to run all 500
    iterations; now it stops at the first failed line search and says so."""
    model, params, _, images, labels, _ = victim32
    objective = make_objective(model.apply, "ce", 1e-2)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    x = images + 0.2 * jax.random.normal(jax.random.key(1), images.shape, F32)

    def solve(config):
        argmin = make_argmin(objective, config)
        return jax.jit(lambda x: argmin(params, x, labels, zeros, zeros))(x)

    theta, info = solve(InnerConfig(backend=backend, tol=1e-10, maxiter=500))
    assert bool(info.failed_linesearch) and int(info.iterations) < 250, int(info.iterations)
    assert float(info.grad_norm) < 1e-5 and _leaf_dtypes(theta) == {np.dtype("float32")}
    # The float32 default tolerance (1e-6) is reached without a failure.
    theta, info = solve(InnerConfig(backend=backend))
    assert not bool(info.failed_linesearch) and float(info.grad_norm) <= 1e-6 and int(info.iterations) < 100


@pytest.mark.parametrize("backend", ["jaxopt", "custom_vjp"])
def test_float32_hypergradient_agrees_with_float64(backend, victim64):
    """Implicit differentiation still works with the line-search stop, and in float32 (θ* cast,
    default tolerances) it agrees with float64 to the precision study's order (~1e-3)."""
    model, params, _, images, labels, _ = victim64
    objective = make_objective(model.apply, "ce", 1e-2)
    x = images + 0.2 * jax.random.normal(jax.random.key(2), images.shape, F64)
    config = bilevel.BilevelConfig(inner=InnerConfig(backend=backend))
    results = {}
    for dtype in (F64, F32):
        problem = bilevel.Problem(victim_params=precision.cast_tree(params, dtype), labels=labels, objective=objective)
        results[dtype] = jax.jit(lambda x, problem=problem: bilevel.hypergradient(config, problem, x))(x.astype(dtype))
    (loss64, grad64), (loss32, grad32) = results[F64], results[F32]
    assert loss32.dtype == grad32.dtype == F32 and grad64.dtype == F64
    assert abs(float(loss32) - float(loss64)) <= 1e-3 * float(loss64)
    assert float(jnp.linalg.norm(grad32.astype(F64) - grad64) / jnp.linalg.norm(grad64)) <= 2e-2


# ---------------------------------------------------------------------------------------- KKT


def _kkt_problem(dtype):
    """A gelu regression victim with random θ* (3 outputs), m = 8 candidates of 4×4."""
    model = MLP(n_out=3, hidden=(8,), activation="gelu")
    params = init_params(model, jax.random.key(0), (4, 4, 1), F64)
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape, F64), params)
    return kkt.Problem(victim_params=precision.cast_tree(params, dtype), labels=None, model=model)


def test_kkt_refuses_arrays_of_another_dtype():
    config = kkt.KKTConfig(task="regression")
    problem = _kkt_problem(F32)
    images = jnp.zeros((8, 4, 4, 1), F32)
    lambdas = jnp.zeros((8, 3), F32)
    with pytest.raises(ConfigError, match="the candidate images: dtype float64, but theta is float32"):
        kkt.init_state(config, problem, images.astype(F64), lambdas)
    with pytest.raises(ConfigError, match="the multipliers λ: dtype float64"):
        kkt.init_state(config, problem, images, lambdas.astype(F64))
    state = kkt.init_state(config, problem, images, lambdas)
    with pytest.raises(ConfigError, match="the hyperparameter lr_x: dtype float64"):
        kkt.run_steps(config, problem, kkt.Hyper(lr_x=jnp.asarray(0.1, F64)), state, 1)
    kkt.run_steps(config, problem, kkt.Hyper(lr_x=0.1), state, 1)  # Python floats take θ*'s dtype


def test_kkt_float32_run_decreases_and_matches_float64():
    """benchmarks/precision.py: float32 is safe for KKT. 100 SGD steps from the same start."""
    config = kkt.KKTConfig(task="regression", optimizer="sgd")
    images = 0.1 * jax.random.normal(jax.random.key(3), (8, 4, 4, 1), F64)
    lambdas = jax.random.normal(jax.random.key(4), (8, 3), F64)
    histories = {}
    for dtype in (F64, F32):
        problem = _kkt_problem(dtype)
        hyper = kkt.Hyper(lr_x=jnp.asarray(0.05, dtype), lr_lambda=jnp.asarray(0.05, dtype))
        state = kkt.init_state(config, problem, images.astype(dtype), lambdas.astype(dtype))
        state, history = jax.jit(lambda s, problem=problem, hyper=hyper: kkt.run_steps(config, problem, hyper, s, 100))(
            state)
        assert state.images.dtype == history["kkt_loss"].dtype == dtype and not bool(state.diverged)
        histories[dtype] = np.asarray(history["kkt_loss"])
    loss32, loss64 = histories[F32], histories[F64]
    assert loss32[-1] < 0.6 * loss32[0] and np.all(np.diff(loss32) <= 1e-6 * loss32[0])  # decreasing
    np.testing.assert_allclose(loss32, loss64, rtol=1e-4)


# ---------------------------------------------------------------------------------------- reconstruct and CLI


def test_float32_victim_bilevel_run_is_float32_throughout(folders, tmp_path):
    out = tmp_path / "run"
    summary = reconstruct(folders["float32"], out, ReconstructionSpec(
        method="bilevel", init="gaussian:0.1", n_inits=2, bilevel=bilevel.BilevelConfig(steps=3)))
    assert summary["dtype"] == summary["victim_dtype"] == "float32" and summary["dtype_note"] is None
    assert summary["inner_tol"] == summary["cg_tol"] == 1e-6  # by dtype, the spec left them None
    assert summary["spec"]["bilevel"]["inner"]["tol"] is None
    with np.load(out / "reconstructions.npz") as f:
        assert f["centered"].dtype == f["init_centered"].dtype == np.float32
    with np.load(out / "history.npz") as f:
        assert f["outer_loss"].dtype == np.float32 and np.all(np.isfinite(f["outer_loss"]))


def test_float32_random_search_starts_from_float32_images(folders, tmp_path):
    """The sampled init scales are float64 numpy draws; they used to widen x₀ to float64."""
    out = tmp_path / "sweep"
    reconstruct(folders["float32"], out, ReconstructionSpec(method="bilevel", random_search=2, n_inits=1,
                                                            bilevel=bilevel.BilevelConfig(steps=2)))
    with np.load(out / "reconstructions.npz") as f:
        assert f["init_centered"].dtype == f["centered"].dtype == np.float32


def test_kkt_defaults_to_float32_and_says_so(folders, tmp_path, caplog):
    spec = ReconstructionSpec(method="kkt", init="gaussian:0.01", n_inits=1, learning_rate=0.01,
                              kkt=kkt.KKTConfig(steps=4, task="regression"))
    with caplog.at_level(logging.WARNING, logger="recon_jax.reconstruct"):
        summary = reconstruct(folders["float64"], tmp_path / "kkt32", spec)
    assert summary["dtype"] == "float32" and summary["victim_dtype"] == "float64"
    assert "theta* (trained in float64) cast to float32" in summary["dtype_note"]
    assert "--dtype float64" in summary["dtype_note"] and summary["dtype_note"] in caplog.text
    with np.load(tmp_path / "kkt32" / "reconstructions.npz") as f:
        assert f["centered"].dtype == np.float32
    with np.load(tmp_path / "kkt32" / "history.npz") as f:
        assert f["kkt_loss"].dtype == np.float32
    # Asking for float64 keeps it.
    spec64 = ReconstructionSpec(**{**spec.__dict__, "dtype": "float64"})
    summary = reconstruct(folders["float64"], tmp_path / "kkt64", spec64)
    assert summary["dtype"] == "float64" and summary["dtype_note"] is None


def test_cli_kkt_default_dtype_and_tolerances_by_dtype(folders, tmp_path):
    out = tmp_path / "cli-kkt"
    assert main(["reconstruct", "--victim", str(folders["float64"]), "--method", "kkt", "--n-inits", "1",
                 "--steps", "3", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["dtype"] == "float32" and "cast to float32" in run["dtype_note"]
    assert run["spec"]["bilevel"]["inner"]["tol"] is None and run["spec"]["bilevel"]["inner"]["cg_tol"] is None
    out = tmp_path / "cli-kkt64"
    assert main(["reconstruct", "--victim", str(folders["float64"]), "--method", "kkt", "--n-inits", "1",
                 "--steps", "3", "--dtype", "float64", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["dtype"] == "float64"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_failed_line_search_stops_the_inner_solve_only_at_the_round_off_floor(dtype):
    """failed ∧ L did not decrease ∧ ‖∇L‖ ≤ √ε·max(1, |L|): the round-off floor of a line search."""
    from recon_jax.solvers import stalled_at_roundoff

    eps = np.finfo(dtype).eps
    call = lambda failed, old, new, grad: bool(stalled_at_roundoff(jnp.asarray(failed), jnp.asarray(old, dtype),
                                                                   jnp.asarray(new, dtype), jnp.asarray(grad, dtype)))
    assert call(True, 0.5, 0.5, 0.1 * np.sqrt(eps))  # unchanged L at a tiny gradient: the floor
    assert call(True, 0.5, 0.5 + eps, 0.1 * np.sqrt(eps))  # higher by round-off: the floor
    assert call(True, 40.0, 40.0, 10 * np.sqrt(eps))  # the floor scales with |L|
    assert not call(True, 2.2747115, 2.2747149, 0.25)  # a bad step far from the floor (784-256-10 gelu, MNIST)
    assert not call(True, 0.5, 0.5, 10 * np.sqrt(eps))  # above the floor
    assert not call(True, 0.5, 0.4, 0.1 * np.sqrt(eps))  # L decreased: progress
    assert not call(False, 0.5, 0.5, 0.0)  # no failure
    assert not call(True, np.inf, 2.3, 1e-12)  # the first iteration (L_k = inf before it): a decrease
