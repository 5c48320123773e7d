"""The attack protocol (recon_jax.attack) and the registries: one definition of each shared
helper, CLI choices that are the registries' keys, and one-line registration."""

from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon_jax import (attack, bilevel, checkpoint, cli, data, kkt, landscape, memory, models, reconstruct, search,
                       solvers, study)
from recon_jax.attack import Attack
from recon_jax.errors import ConfigError
from recon_jax.training import TrainConfig, train_victim

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


# ---------------------------------------------------------------------------------------- a third method


class _ToyState(NamedTuple):
    images: jax.Array
    diverged: jax.Array


def _toy_attack(config, problem) -> Attack:
    """A toy attack that shrinks the images towards 0: x ← x − lr·x (lr the per-run hyper)."""

    def step(state, lr):
        images = state.images - lr * state.images
        ok = jnp.all(jnp.isfinite(images)) & ~state.diverged
        return attack.freeze(ok, _ToyState(images, ~ok), state), {"gap": jnp.sum(images ** 2)}

    def evaluate(state, lr):
        gap = jnp.sum(state.images ** 2)
        return {"gap": gap, "shrink": jnp.sqrt(gap), "diverged": state.diverged}

    return Attack(name="toy", final_loss="gap", init_state=lambda x, lr: _ToyState(x, jnp.asarray(False)),
                  step=step, evaluate=evaluate,
                  run_steps=lambda state, lr, n, start=0: attack.scan_steps(lambda s: step(s, lr), state, n))


def _toy_program(spec, victim, truth, dtype) -> reconstruct.Program:
    """The toy's program: n_inits gaussian starts, one learning rate, 3 steps."""
    labels = victim.known_labels()
    x0 = reconstruct._starting_images(spec, labels, victim, truth, dtype, 1, None)
    runs = {"learning_rate": np.full(len(x0), reconstruct._values(spec.learning_rate)[0])}
    estimate = memory.Estimate(per_init=4 * x0[0].nbytes, fixed=0, terms={})
    return reconstruct._program(_toy_attack(None, None), jnp.asarray(x0), jnp.asarray(runs["learning_rate"], dtype),
                                labels, x0, runs, estimate, steps=3)


TOY = attack.Method(
    name="toy", converged=attack.Convergence("final_shrink", 0.5, "shrink"), mismatch_key="final_shrink",
    objective=lambda victim, *, labels=None, toy_scale=1.0, **_: (lambda x: toy_scale * jnp.sum(x ** 2)),
    objective_options=lambda spec, run, best: {"toy_scale": 2.0},
    validate_search_ranges=lambda overrides: search.resolve_ranges(overrides, {"lr": (0.1, 0.9)}, {}, what="toy "),
    default_dtype="float32", dtype_reason="the toy does not mind",
    landscape_point_bytes=lambda victim, labels, spec, dtype: 1 << 40,  # forces batches of one point
    summary_extras=lambda spec, victim, final, history: {"toy_history_steps": len(history["gap"][0])})


@pytest.fixture(scope="module")
def toy_victim(tmp_path_factory):
    """An affine float64 victim on 2 digits of 2 classes, saved to a folder."""
    digits = data.select(data.load_dataset("digits"), n_per_class=1, classes=(0, 1), seed=0)
    model = models.MLP(n_out=2)
    images = jnp.asarray(digits.train_centered(), jnp.float64)
    config = TrainConfig(loss="ce", weight_decay=1e-2, dtype="float64")
    params, report = train_victim(model, models.init_params(model, jax.random.key(0), images.shape[1:], jnp.float64),
                                  images, jnp.asarray(digits.train.labels), config)
    return checkpoint.save_victim(tmp_path_factory.mktemp("toy") / "victim", model=model, params=params,
                                  image_shape=tuple(images.shape[1:]), train_config=config, report=report,
                                  data=digits, seed=0)


def test_a_registered_method_runs_without_edits_to_reconstruct_study_or_landscape(monkeypatch, tmp_path, toy_victim):
    """A third method registered in the three registries (attack, descriptor, program) is run by
    ``reconstruct``, judged by ``study`` and sliced by ``landscape`` through its descriptor."""
    monkeypatch.setattr(attack, "ATTACKS", dict(attack.attacks()))
    monkeypatch.setattr(attack, "METHODS", dict(attack.descriptors()))
    monkeypatch.setattr(reconstruct, "PROGRAMS", dict(reconstruct.PROGRAMS))
    attack.register_attack("toy", _toy_attack)
    attack.register_descriptor(TOY)
    reconstruct.register_method("toy", _toy_program)
    assert "toy" in _choices(cli.build_parser(), "reconstruct", "--method")

    with pytest.raises(ConfigError, match="unknown toy search range 'alpha'"):
        reconstruct.ReconstructionSpec(method="toy", random_search=2, search_ranges={"alpha": (1, 2)})
    spec = reconstruct.ReconstructionSpec(method="toy", init="gaussian:0.1", n_inits=3, learning_rate=0.5)
    run = reconstruct.reconstruct(toy_victim, tmp_path / "run", spec)
    assert run["method"] == "toy" and run["final_loss_name"] == "gap"
    assert run["dtype"] == "float32" and "(the toy does not mind)" in run["dtype_note"]  # default_dtype
    assert run["toy_history_steps"] == 3  # summary_extras
    shrink = np.asarray(run["final_shrink"])
    np.testing.assert_allclose(np.asarray(run["final_outer_loss"]), shrink ** 2, rtol=1e-5)

    columns = study.convergence_columns(run)
    assert columns == {"converged_fraction": float(np.mean(shrink <= 0.5)), "converged_criterion": "shrink <= 0.5"}
    assert study.convergence_columns({**run, "final_shrink": [0.1, 0.4, 0.6]})["converged_fraction"] == 2 / 3

    victim = checkpoint.load_victim(toy_victim)
    x = jnp.ones((2, *victim.image_shape))
    assert float(landscape.objective_function(victim, "toy")(x)) == x.size
    assert float(landscape.objective_function(victim, "toy", toy_scale=3.0)(x)) == 3 * x.size
    with pytest.raises(ConfigError, match="choose one of bilevel, kkt, toy"):
        landscape.objective_function(victim, "gradient-inversion")

    # The study's landscape slices: objective options from the run, batches bounded by the bytes.
    config = SimpleNamespace(spec=lambda cell: spec,
                             landscape=SimpleNamespace(points_1d=5, points_2d=3, extend=0.25))
    truth = reconstruct.sorted_ground_truth(toy_victim)
    figures = study._landscape(config, None, Path(toy_victim), tmp_path / "run", truth)
    with np.load(tmp_path / "run" / "reconstructions.npz") as f:
        best = f["centered"][run["ranking"][0]]
    assert figures["landscape_at_reconstruction"] == pytest.approx(2.0 * float(np.sum(best ** 2)), rel=1e-5)
    with np.load(tmp_path / "landscape.npz") as f:
        assert f["line_values"].shape == (5,) and f["plane_values"].shape == (3, 3)


def test_every_method_is_registered_three_times():
    """Each attack has a constructor, a descriptor and a program builder, under the same names;
    the built-in descriptors hold the criteria summary.csv has always written."""
    assert tuple(attack.attacks()) == tuple(attack.descriptors()) == tuple(reconstruct.PROGRAMS)
    assert all(method.name == name for name, method in attack.descriptors().items())
    assert attack.descriptor("kkt").default_dtype == "float32" and attack.descriptor("bilevel").default_dtype is None
    criteria = {name: f"{m.converged.label} <= {m.converged.threshold:g}" for name, m in attack.descriptors().items()}
    assert criteria == {"bilevel": "outer_loss <= 1e-06", "kkt": "relative_residual <= 0.001"}
    assert (bilevel.CONVERGED_OBJECTIVE, kkt.KKT_CONVERGED_RESIDUAL) == (1e-6, 1e-3)
