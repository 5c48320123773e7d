"""The convolutional victim (models.CNN) end to end: shapes and parameter count, the saved
config, certification on digits, the bilevel hypergradient against central differences, the
KKT loss at a constructed stationary point, the CLI pipeline with the memory probe, and that
no attack or evaluation module names an architecture class."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from recon_jax import bilevel, checkpoint, data, kkt, memory
from recon_jax.cli import main
from recon_jax.errors import ConfigError
from recon_jax.models import (CNN, MLP, Conv, count_params, expected_param_count, init_params, layer_macs, model_config,
                              model_from_config)
from recon_jax.objectives import make_objective
from recon_jax.solvers import InnerConfig
from recon_jax.training import TrainConfig
from recon_jax.victim import VictimSpec, train_and_save

ROOT = Path(__file__).resolve().parents[1]


def test_shapes_parameter_count_and_config_roundtrip():
    model = CNN(n_out=3, channels=(4, 8), dense_hidden=(5,))
    params = init_params(model, jax.random.key(0), (8, 8, 1), jnp.float64)
    assert count_params(params) == expected_param_count(model, (8, 8, 1)) == (9 + 1) * 4 + (36 + 1) * 8 + 33 * 5 + 6 * 3
    assert model.apply(params, jnp.zeros((2, 8, 8, 1))).shape == (2, 3)
    assert model.apply(params, jnp.zeros((8, 8, 1))).shape == (3,)
    assert model.apply(params, jnp.zeros((8, 8, 1), jnp.float32)).dtype == jnp.float64  # computes in θ's dtype
    cfg = json.loads(json.dumps(model_config(model)))
    assert cfg["arch"] == "cnn" and model_from_config(cfg) == model
    # The default architecture's config is unchanged: no arch key, as in earlier victim.json files.
    assert model_config(MLP(n_out=2, hidden=(3,))) == {"n_out": 2, "hidden": [3], "activation": "gelu",
                                                       "softplus_beta": 1.0, "use_bias": True,
                                                       "first_layer_init_scale": None}
    assert "arch" not in VictimSpec().to_json() and "channels" not in VictimSpec().to_json()
    with pytest.raises(ConfigError, match="too small"):
        CNN(n_out=2, channels=(1, 1, 1, 1)).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ConfigError, match="channels"):
        CNN(n_out=2, channels=())


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_conv_is_the_same_convolution(k):
    """Conv computes by image patches × reshaped kernel; it equals XLA's 'SAME' convolution
    (odd and even kernels, whose padding is asymmetric), vmapped over kernels too."""
    h = jax.random.normal(jax.random.key(0), (2, 7, 6, 3), jnp.float64)
    conv = Conv(4, kernel_size=k)
    params = conv.init(jax.random.key(1), h)
    kernel, bias = params["params"]["kernel"], params["params"]["bias"]
    reference = jax.lax.conv_general_dilated(h, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(conv.apply(params, h), reference + bias, rtol=1e-13, atol=1e-13)
    kernels = jnp.stack([kernel, 2 * kernel])
    batched = jax.vmap(lambda K: conv.apply({"params": {"kernel": K, "bias": bias}}, h))(kernels)
    np.testing.assert_allclose(batched[1], 2 * reference + bias, rtol=1e-13, atol=1e-13)


def test_flops_per_step_counts_convolutions():
    """The analytic KKT step count (14·m·F − 4·m·F_1, F_l the layer's multiply-adds per
    sample) reads a CNN's layers from its program and agrees with XLA's own count of the
    compiled step to a few percent when the convolutions dominate."""
    model = CNN(n_out=2, channels=(16, 32))
    shape, m = (16, 16, 3), 4
    macs = layer_macs(model, shape)
    assert macs == (16 * 16 * 9 * 3 * 16, 8 * 8 * 9 * 16 * 32, 4 * 4 * 32 * 2)  # conv, conv, head
    assert layer_macs(MLP(n_out=3, hidden=(5,)), (2, 2, 3)) == (12 * 5, 5 * 3)
    assert kkt.flops_per_step(model, shape, m) == 14 * m * sum(macs) - 4 * m * macs[0]
    params = init_params(model, jax.random.key(0), shape, jnp.float64)
    problem = kkt.Problem(victim_params=params, model=model,
                          labels=jnp.asarray(kkt.candidate_labels((1, 1), m, "multiclass")))
    config = kkt.KKTConfig(task="multiclass")
    state = kkt.init_state(config, problem, jnp.zeros((m, *shape)), jnp.ones(m))
    cost = jax.jit(lambda h, s: kkt.step(config, problem, h, s)).lower(
        kkt.Hyper(lr_x=jnp.asarray(0.1)), state).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # Elementwise work (gelu and its derivatives, pooling, the box prior, the patches' padding)
    # is outside the count: XLA:CPU counts 1.21× it here (float64).
    assert 1.0 <= cost["flops"] / kkt.flops_per_step(model, shape, m) <= 1.35


@pytest.fixture(scope="module")
def cnn_victim(tmp_path_factory):
    """A gelu CNN with one 4-channel block on digits, one image per class, trained by train_and_save."""
    out = tmp_path_factory.mktemp("cnn") / "victim"
    spec = VictimSpec(arch="cnn", channels=(4,), hidden=(), n_per_class=1, train=TrainConfig(weight_decay=1e-2))
    report = train_and_save(spec, out)
    return out, report


def test_train_and_save_certifies_a_cnn(cnn_victim):
    out, report = cnn_victim
    assert report.stationary and report.grad_norm <= 1e-8 and report.dtype == "float64"
    victim = checkpoint.load_victim(out)
    assert isinstance(victim.model, CNN) and victim.model.channels == (4,)
    assert report.n_params == count_params(victim.params) == expected_param_count(victim.model, victim.image_shape)
    assert not memory.has_formula(victim.model)


def test_bilevel_hypergradient_of_a_cnn_matches_central_differences(cnn_victim):
    victim = checkpoint.load_victim(cnn_victim[0])
    ground_truth = checkpoint.load_ground_truth(cnn_victim[0])
    truth = jnp.asarray(ground_truth["train_images"], jnp.float64) - jnp.asarray(ground_truth["mean"])
    labels = jnp.asarray(ground_truth["train_labels"])
    problem = bilevel.Problem(victim_params=victim.params, labels=labels,
                              objective=make_objective(victim.model.apply, "ce", 1e-2))
    config = bilevel.BilevelConfig(inner=InnerConfig(tol=1e-12, maxiter=1000, cg_ridge=0.0, cg_tol=1e-14,
                                                     cg_maxiter=1000))
    x = truth + 0.2 * jax.random.normal(jax.random.key(1), truth.shape, truth.dtype)
    f = jax.jit(lambda x: bilevel.hypergradient(config, problem, x))
    loss, grad = f(x)
    assert loss > 1e-4
    for seed in range(2):
        direction = jax.random.normal(jax.random.key(10 + seed), x.shape, x.dtype)
        eps = 1e-4
        fd = (f(x + eps * direction)[0] - f(x - eps * direction)[0]) / (2 * eps)
        assert abs(float(jnp.vdot(grad, direction)) - float(fd)) <= 1e-5 * abs(float(fd))


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_kkt_zero_at_constructed_point_cnn(task):
    """A tanh CNN (one 1-channel block on 4×4 images, P = 15): fix θ*, then λ solving
    (1/m) Σ_j λ_j ∇_θ φ_j(θ*; x_j) = θ* (m = 24 generic candidates span ℝ^P) makes θ* an exact
    stationary point, so S = 0 for both stationarity kinds."""
    m, shape = 24, (4, 4, 1)
    model = CNN(n_out=1, channels=(1,), activation="tanh")
    params = init_params(model, jax.random.key(3), shape, jnp.float64)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1003), len(leaves))
    params = jax.tree_util.tree_unflatten(treedef, [p + 0.3 * jax.random.normal(k, p.shape, p.dtype)
                                                    for p, k in zip(leaves, keys)])
    images = jax.random.uniform(jax.random.key(4), (m, *shape), jnp.float64, -0.9, 0.9)
    labels = kkt.candidate_labels((6, 6), m, task)
    signs = jnp.ones(m) if labels is None else jnp.where(jnp.asarray(labels) > 0, 1.0, -1.0)
    flat, unravel = ravel_pytree(params)
    assert flat.size == 15
    per_candidate = jax.jacobian(lambda f: signs * model.apply(unravel(f), images)[:, 0])(flat)  # (m, P)
    lambdas = jnp.linalg.lstsq(per_candidate.T / m, flat)[0]
    assert jnp.linalg.norm(per_candidate.T @ lambdas / m - flat) <= 1e-12 * jnp.linalg.norm(flat)
    problem = kkt.Problem(victim_params=params, labels=None if labels is None else jnp.asarray(labels), model=model)
    hyper = kkt.Hyper(lr_x=1.0, lambda_min=float(lambdas.min()) - 1.0)
    scale = float(jnp.vdot(flat, flat))
    for kind, reference in (("global", scale), ("per_tensor", 1.0)):
        total, terms = kkt.kkt_loss(kkt.KKTConfig(task=task, stationarity=kind), problem, hyper, images, lambdas)
        assert float(terms["stationarity"]) <= 1e-20 * reference, (kind, float(terms["stationarity"]))
        assert float(total) == float(terms["stationarity"]) and float(terms["relative_residual"]) <= 1e-10


def test_kkt_attacks_a_relu_cnn_through_the_modified_relu():
    model = CNN(n_out=1, channels=(2,), activation="relu")
    attacked = kkt.attacked_model(model, jnp.asarray(20.0))
    assert isinstance(attacked, CNN) and attacked.activation == "modified_relu" and attacked.channels == (2,)
    params = init_params(model, jax.random.key(0), (4, 4, 1), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 1), jnp.float64)
    np.testing.assert_array_equal(attacked.apply(params, x), model.apply(params, x))  # relu forward


def test_cli_train_reconstruct_evaluate_on_a_cnn(tmp_path):
    victim, run = tmp_path / "victim", tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--model", "cnn", "--channels", "2", "--classes", "0,1",
                 "--n-per-class", "1", "--out", str(victim)]) == 0
    meta = json.loads((victim / "victim.json").read_text())
    assert meta["stationary"] and meta["model"]["arch"] == "cnn" and meta["model"]["channels"] == [2]
    for method, steps in (("bilevel", "3"), ("kkt", "5")):
        out = run / method
        assert main(["reconstruct", "--victim", str(victim), "--method", method, "--n-inits", "2",
                     "--steps", steps, "--out", str(out)]) == 0
        summary = json.loads((out / "run.json").read_text())
        assert summary["chunk_size"] >= 1 and summary["bytes_per_run_estimate"] > 0  # sized by the compiled probe
        assert main(["evaluate", "--run", str(out)]) == 0
        assert (out / "evaluation.json").is_file()
    assert main(["train", "--model", "mlp", "--channels", "4", "--out", str(tmp_path / "bad")]) == 2


ATTACK_MODULES = ("bilevel.py", "kkt.py", "attack.py", "evaluation.py", "problems.py", "reconstruct.py", "study.py",
                  "landscape.py", "metrics")


def test_no_attack_or_evaluation_module_names_the_mlp():
    """Architecture-specific code lives behind models.ARCHITECTURES, so the attacks work on any
    registered architecture."""
    files = []
    for name in ATTACK_MODULES:
        path = ROOT / "recon_jax" / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    offenders = [f"{f.relative_to(ROOT)}:{i}" for f in files
                 for i, line in enumerate(f.read_text().splitlines(), 1) if re.search(r"\bMLP\b", line)]
    assert len(files) >= len(ATTACK_MODULES) and not offenders, offenders


def test_study_names_a_cnn_victim_from_its_saved_config():
    from recon_jax.study import model_name

    assert model_name(model_config(CNN(n_out=10, channels=(4, 8)))) == "cnn-gelu-4-8"
    assert model_name(model_config(CNN(n_out=10, channels=(4,), dense_hidden=(16,)))) == "cnn-gelu-4-d16"
    assert model_name(model_config(MLP(n_out=10, hidden=(64,)))) == "mlp-gelu-64"
    assert model_name(model_config(MLP(n_out=10))) == "affine"


def test_a_study_cnn_victim_has_no_dense_hidden_layer_unless_asked():
    """In a study file, arch = "cnn" without hidden means conv blocks then the head (as on the
    CLI), not VictimSpec's MLP default of one 1000-wide layer."""
    from recon_jax.studyconfig import victim_spec

    assert victim_spec({"arch": "cnn", "channels": [4]}, "[victims.c]").hidden == ()
    assert victim_spec({"arch": "cnn", "channels": [4], "hidden": [32]}, "[victims.c]").hidden == (32,)
