"""The attack protocol (recon_jax.attack) and the registries: one definition of each shared
helper, CLI choices that are the registries' keys, and one-line registration."""

from __future__ import annotations

import argparse
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np

from recon_jax import attack, bilevel, cli, kkt, models, reconstruct, solvers
from recon_jax.attack import Attack

SHARED = {  # a helper of recon_jax.attack -> a pattern that would mean a copy of it
    "box_penalty": r"def box_penalty\b",
    "freeze": r"jnp\.where\(ok\b",
    "descent_direction": r"optax\.(scale_by_adam|trace)\(",
    "scan_steps": r"None, length=n_steps",
}


def test_shared_helpers_are_defined_once():
    for module in (bilevel, kkt):
        source = inspect.getsource(module)
        for helper, pattern in SHARED.items():
            assert not re.search(pattern, source), f"{module.__name__} duplicates attack.{helper}"
            assert helper in source, f"{module.__name__} does not use attack.{helper}"
    assert bilevel.box_penalty is kkt.box_penalty is attack.box_penalty


def test_box_penalty_equation():
    x = jnp.asarray([[-2.0, 0.0], [0.5, 3.0]]).reshape(1, 2, 2, 1)
    assert float(attack.box_penalty(x)) == 1.0 + 4.0  # relu(-1 - (-2))² + relu(3 - 1)²
    assert float(attack.box_penalty(x, -3.0, 3.0)) == 0.0


def _choices(parser: argparse.ArgumentParser, command: str, flag: str) -> tuple:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return tuple(next(a for a in sub._actions if flag in a.option_strings).choices)


def test_cli_choices_are_the_registries_keys():
    parser = cli.build_parser()
    for command in ("reconstruct", "sweep"):
        assert _choices(parser, command, "--method") == tuple(reconstruct.PROGRAMS) == tuple(attack.attacks())
        assert _choices(parser, command, "--backend") == tuple(solvers.BACKENDS)
    assert _choices(parser, "train", "--model") == ("affine", *models.ARCHITECTURES)
    assert set(attack.attacks()) == {"bilevel", "kkt"}
    assert tuple(solvers.BACKENDS) == ("jaxopt", "custom_vjp")
    assert tuple(models.ACTIVATIONS) == ("relu", "gelu", "softplus", "tanh")
    assert tuple(models.ARCHITECTURES) == ("mlp", "cnn")


def test_registering_is_one_line(monkeypatch):
    monkeypatch.setattr(models, "ACTIVATIONS", dict(models.ACTIVATIONS))
    monkeypatch.setattr(models, "SMOOTH_ACTIVATIONS", list(models.SMOOTH_ACTIVATIONS))
    models.register_activation("swish", lambda beta, alpha: jax.nn.swish, smooth=True)
    model = models.MLP(n_out=1, hidden=(3,), activation="swish")
    params = models.init_params(model, jax.random.key(0), (2, 2, 1))
    assert model.apply(params, jnp.ones((1, 2, 2, 1))).shape == (1, 1)
    assert "swish" in models.SMOOTH_ACTIVATIONS
    monkeypatch.setattr(attack, "ATTACKS", dict(attack.ATTACKS))
    attack.register_attack("mine", kkt.attack)
    assert attack.ATTACKS["mine"] is kkt.attack
    monkeypatch.setattr(solvers, "BACKENDS", dict(solvers.BACKENDS))
    solvers.register_backend("mine", *solvers.BACKENDS["jaxopt"])
    assert solvers.InnerConfig(backend="mine").backend == "mine"


def test_kkt_attack_is_the_module_functions():
    model = models.MLP(n_out=1, hidden=(8,), activation="gelu")
    params = models.init_params(model, jax.random.key(0), (3, 3, 1), jnp.float32)
    problem = kkt.Problem(victim_params=params, labels=jnp.asarray([0, 0, 1, 1]), model=model)
    config = kkt.KKTConfig(steps=3)
    hyper = kkt.Hyper(lr_x=0.01)
    x0 = 0.1 * jax.random.normal(jax.random.key(1), (4, 3, 3, 1), jnp.float32)
    lam0 = kkt.initial_lambdas(jax.random.key(2), 4, "binary", dtype=jnp.float32)
    a = kkt.attack(config, problem)
    assert isinstance(a, Attack) and a.name == "kkt" and a.final_loss == "kkt_loss"
    state, history = a.run_steps(a.init_state((x0, lam0), hyper), hyper, 3)
    ref, ref_history = kkt.run_steps(config, problem, hyper, kkt.init_state(config, problem, x0, lam0), 3)
    np.testing.assert_array_equal(state.images, ref.images)
    np.testing.assert_array_equal(history["kkt_loss"], ref_history["kkt_loss"])
    stepped, record = a.step(a.init_state((x0, lam0), hyper), hyper)
    assert float(record["kkt_loss"]) == float(ref_history["kkt_loss"][0])
    assert set(a.evaluate(state, hyper)) >= {"kkt_loss", "diverged"}


def test_bilevel_attack_metadata():
    model = models.MLP(n_out=2, hidden=(), activation="gelu")
    params = models.init_params(model, jax.random.key(0), (2, 2, 1), jnp.float64)
    from recon_jax.objectives import make_objective

    problem = bilevel.Problem(victim_params=params, labels=jnp.asarray([0, 1]),
                              objective=make_objective(model.apply, "ce", 1e-2), convex=True)
    a = bilevel.attack(bilevel.BilevelConfig(steps=2), problem)
    assert a.name == "bilevel" and a.final_loss == "outer_loss"
    x0 = jnp.zeros((2, 2, 2, 1), jnp.float64)
    state = a.init_state(x0, bilevel.Hyper(learning_rate=0.01))
    assert state.images.shape == x0.shape and not bool(state.diverged)
