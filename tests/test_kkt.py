"""KKT attack: zero loss at constructed stationary points, gradients against central
differences (through the double backward and the modified ReLU), vmap against single
runs, NaN isolation, the reference's sampling conventions, and config errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from recon_jax import kkt
from recon_jax.batching import run_batched
from recon_jax.errors import ConfigError
from recon_jax.models import MLP, init_params, modified_relu


def _params(model: MLP, image_shape, seed: int):
    """A θ* with every tensor nonzero (flax initialises biases to 0)."""
    params = init_params(model, jax.random.key(seed), image_shape, jnp.float64)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1000), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [p + 0.1 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def _affine_params(kernel: np.ndarray, bias: np.ndarray) -> dict:
    return {"params": {"layer_0": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}}


def _assert_zero(task: str, model: MLP, victim_params, labels, images, lambdas, lambda_min: float):
    """S ≤ 1e-20 (relative) for both stationarity kinds; with x in the box and λ ≥ λ_min the
    box and λ terms are exactly 0, so L_KKT = S."""
    problem = kkt.Problem(victim_params=victim_params, labels=None if labels is None else jnp.asarray(labels),
                          model=model)
    hyper = kkt.Hyper(lr_x=1.0, lambda_min=lambda_min)
    scale = float(sum(jnp.vdot(p, p) for p in jax.tree_util.tree_leaves(victim_params)))
    for kind, reference in (("global", scale), ("per_tensor", 1.0)):
        config = kkt.KKTConfig(task=task, stationarity=kind)
        total, terms = kkt.kkt_loss(config, problem, hyper, jnp.asarray(images), jnp.asarray(lambdas))
        assert float(terms["stationarity"]) <= 1e-20 * reference, (kind, float(terms["stationarity"]))
        assert float(terms["box_penalty"]) == 0.0 and float(terms["lambda_penalty"]) == 0.0
        assert float(total) == float(terms["stationarity"])
        assert float(terms["relative_residual"]) <= 1e-10


def test_stationarity_normalisations():
    """global: Σ_t ‖θ*_t − G_t‖² (the reference's get_kkt_loss); per_tensor: each tensor relative
    to ‖θ*_t‖², a zero tensor absolutely."""
    victim = {"kernel": jnp.array([[3.0, 4.0]]), "bias": jnp.zeros(2)}
    combination = {"kernel": jnp.array([[3.0, 2.0]]), "bias": jnp.array([1.0, 0.0])}
    assert float(kkt.stationarity("global", victim, combination)) == 4.0 + 1.0
    assert float(kkt.stationarity("per_tensor", victim, combination)) == 4.0 / 25.0 + 1.0


# ----------------------------------------------------------------------------------------
# L_KKT = 0 at points built to satisfy θ* = (1/m) Σ_j λ_j ∇_θ φ_j(θ*; x_j)
# ----------------------------------------------------------------------------------------

def test_zero_at_constructed_point_affine_binary():
    """Φ(x) = wᵀx + b, φ_j = y_j Φ(x_j): ∇_w φ_j = y_j x_j, ∇_b φ_j = y_j, independent of θ, so
    θ* := (1/m) Σ_j λ_j y_j (x_j, 1) is an exact KKT point for any x, λ."""
    rng = np.random.default_rng(0)
    m, shape = 6, (2, 2, 1)
    images = rng.uniform(-0.9, 0.9, (m, *shape))
    labels = kkt.candidate_labels((3, 3), m, "binary")
    signs = np.where(labels > 0, 1.0, -1.0)
    lambdas = rng.uniform(0.2, 1.0, m)
    flat = images.reshape(m, -1)
    kernel = (lambdas * signs) @ flat / m
    bias = np.array([np.sum(lambdas * signs) / m])
    params = _affine_params(kernel[:, None], bias)
    _assert_zero("binary", MLP(n_out=1), params, labels, images, lambdas, lambda_min=0.1)


def test_zero_at_constructed_point_affine_multiclass():
    """Φ_k(x) = W_kᵀx + b_k, φ_j = Φ_{y_j} − Φ_{r_j} with r_j the runner-up *at θ**: choose θ*
    first (rows summing to 0 over classes, the span of e_y − e_r), read off r_j, then
    ∇_W φ_j = x_j (e_{y_j} − e_{r_j})ᵀ and ∇_b φ_j = e_{y_j} − e_{r_j} are fixed vectors g_j and
    λ solves (1/m) Σ_j λ_j g_j = θ* exactly (m = 12 ≥ (d_0 + 1)(C − 1) = 6)."""
    rng = np.random.default_rng(1)
    m, shape, n_classes = 12, (1, 2, 1), 3
    images = rng.uniform(-0.9, 0.9, (m, *shape))
    labels = kkt.candidate_labels((2, 2, 2), m, "multiclass")
    theta = rng.normal(size=(3, n_classes))  # rows: kernel (2, C), then bias (C,)
    theta -= theta.mean(axis=1, keepdims=True)
    flat = images.reshape(m, -1)
    outputs = flat @ theta[:2] + theta[2]
    masked = np.where(np.eye(n_classes, dtype=bool)[labels], -np.inf, outputs)
    runner_up = masked.argmax(axis=1)
    sign = np.eye(n_classes)[labels] - np.eye(n_classes)[runner_up]  # (m, C)
    columns = np.concatenate([flat, np.ones((m, 1))], axis=1)[:, :, None] * sign[:, None, :] / m  # (m, 3, C)
    lambdas, *_ = np.linalg.lstsq(columns.reshape(m, -1).T, theta.ravel(), rcond=None)
    assert np.linalg.norm(columns.reshape(m, -1).T @ lambdas - theta.ravel()) <= 1e-13 * np.linalg.norm(theta)
    params = _affine_params(theta[:2], theta[2])
    _assert_zero("multiclass", MLP(n_out=n_classes), params, labels, images, lambdas,
                 lambda_min=float(lambdas.min()) - 1.0)


@pytest.mark.parametrize("n_out", [1, 2])
def test_zero_at_constructed_point_affine_regression(n_out):
    """Weight decay: θ* = (1/m) Σ_j Σ_k λ_jk ∇_θ Φ_k(x_j), i.e. W_{:,k} = (1/m) Σ_j λ_jk x_j,
    b_k = (1/m) Σ_j λ_jk, with λ free in sign (shape (m,) for one output, (m, C) otherwise)."""
    rng = np.random.default_rng(2)
    m, shape = 5, (2, 2, 1)
    images = rng.uniform(-0.9, 0.9, (m, *shape))
    lambdas = rng.normal(size=(m,) if n_out == 1 else (m, n_out))
    per_output = lambdas.reshape(m, n_out)
    kernel = images.reshape(m, -1).T @ per_output / m
    bias = per_output.sum(axis=0) / m
    _assert_zero("regression", MLP(n_out=n_out), _affine_params(kernel, bias), None, images, lambdas,
                 lambda_min=1e9)  # λ_min is ignored for regression


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_zero_at_constructed_point_tanh_network(task):
    """A one-hidden-layer tanh net: G depends on θ, so fix θ* first. The per-candidate
    gradients g_j = ∇_θ φ_j(θ*; x_j) then span ℝ^P (P = 11 < m = 16, generic x), and λ solving
    (1/m) Σ_j λ_j g_j = θ* makes θ* an exact stationary point."""
    m, shape = 16, (1, 3, 1)
    model = MLP(n_out=1, hidden=(2,), activation="tanh")
    params = _params(model, shape, seed=3)
    images = jax.random.uniform(jax.random.key(4), (m, *shape), jnp.float64, -0.9, 0.9)
    labels = kkt.candidate_labels((4, 4), m, task)
    signs = jnp.ones(m) if labels is None else jnp.where(jnp.asarray(labels) > 0, 1.0, -1.0)
    flat_params, unravel = ravel_pytree(params)
    per_candidate = jax.jacobian(lambda f: signs * model.apply(unravel(f), images)[:, 0])(flat_params)  # (m, P)
    lambdas = jnp.linalg.lstsq(per_candidate.T / m, flat_params)[0]
    assert jnp.linalg.norm(per_candidate.T @ lambdas / m - flat_params) <= 1e-13 * jnp.linalg.norm(flat_params)
    _assert_zero(task, model, params, labels, images, lambdas, lambda_min=float(lambdas.min()) - 1.0)


# ----------------------------------------------------------------------------------------
# ∇_(x, λ) L_KKT against central differences
# ----------------------------------------------------------------------------------------

GRADIENT_CASES = {
    "affine-binary": (MLP(n_out=1), "binary", "global"),
    "tanh-multiclass": (MLP(n_out=3, hidden=(4,), activation="tanh"), "multiclass", "per_tensor"),
    "softplus-regression-2-outputs": (MLP(n_out=2, hidden=(3,), activation="softplus"), "regression", "global"),
}


@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_gradient_matches_central_differences(case):
    """Directional derivatives of L_KKT along random (dx, dλ) against central differences,
    float64, relative error ≤ 1e-6. Some pixels lie outside [−1, 1] and some λ below λ_min,
    so all three terms contribute.

    relu victims are not in this list on purpose. Their attacked copy uses ``modified_relu``,
    whose every derivative is sigmoid(αz)'s family while its value is relu's, as in the
    reference's PyTorch autograd Function. ∇_x L_KKT is then, by design, not the derivative
    of L_KKT's value, so finite differences are not its reference; the modified ReLU's own
    derivatives are tested against their closed forms below.
    """
    model, task, kind = GRADIENT_CASES[case]
    m, shape = 4, (1, 3, 1)
    params = _params(model, shape, seed=5)
    images = 0.5 * jax.random.normal(jax.random.key(6), (m, *shape), jnp.float64)
    images = images.at[0, 0, 0, 0].set(1.3).at[1, 0, 2, 0].set(-1.2)  # outside the box
    labels = kkt.candidate_labels((m // 2,) * max(model.n_out, 2), m, task)
    lambda_shape = (m,) if task != "regression" or model.n_out == 1 else (m, model.n_out)
    lambdas = jax.random.uniform(jax.random.key(7), lambda_shape, jnp.float64, 0.2, 1.0)
    lambdas = lambdas.at[0].set(0.03)  # below λ_min = 0.1
    if model.hidden:
        first = params["params"]["layer_0"]
        pre_activations = images.reshape(m, -1) @ first["kernel"] + first["bias"]
        assert float(jnp.min(jnp.abs(pre_activations))) > 1e-3  # FD stays on one side of relu's kink
    problem = kkt.Problem(victim_params=params, labels=None if labels is None else jnp.asarray(labels), model=model)
    config = kkt.KKTConfig(task=task, stationarity=kind)
    hyper = kkt.Hyper(lr_x=1.0, alpha=20.0, lambda_min=0.1)
    loss = jax.jit(lambda x, lam: kkt.kkt_loss(config, problem, hyper, x, lam)[0])
    grad_x, grad_lambda = jax.jit(jax.grad(lambda x, lam: kkt.kkt_loss(config, problem, hyper, x, lam)[0],
                                           argnums=(0, 1)))(images, lambdas)
    eps = 1e-5
    for seed in range(3):
        dx = jax.random.normal(jax.random.key(10 + seed), images.shape, jnp.float64)
        dl = jax.random.normal(jax.random.key(20 + seed), lambdas.shape, jnp.float64)
        fd = (loss(images + eps * dx, lambdas + eps * dl) - loss(images - eps * dx, lambdas - eps * dl)) / (2 * eps)
        analytic = jnp.vdot(grad_x, dx) + jnp.vdot(grad_lambda, dl)
        assert abs(float(analytic - fd)) <= 1e-6 * abs(float(fd)), (float(analytic), float(fd))


# ----------------------------------------------------------------------------------------
# modified ReLU
# ----------------------------------------------------------------------------------------

def test_modified_relu_derivatives():
    """σ = relu exactly; σ' = sigmoid(αz); σ'' = α sigmoid(αz)(1 − sigmoid(αz)), α traced."""
    z = jnp.linspace(-0.3, 0.3, 61)
    for alpha in (10.0, 20.0, 500.0):
        a = jnp.asarray(alpha)
        s = jax.nn.sigmoid(alpha * z)
        first = jax.vmap(jax.grad(modified_relu))(z, jnp.full_like(z, alpha))
        second = jax.vmap(jax.grad(jax.grad(modified_relu)))(z, jnp.full_like(z, alpha))
        np.testing.assert_array_equal(modified_relu(z, a), jax.nn.relu(z))
        np.testing.assert_allclose(first, s, rtol=1e-14, atol=1e-300)
        np.testing.assert_allclose(second, alpha * s * (1 - s), rtol=1e-12, atol=1e-300)


def test_modified_relu_gives_the_attack_its_second_derivatives():
    """For a one-hidden-layer relu net, G_{b_1} = (1/m) Σ_j λ_j y_j (w_2 ⊙ σ'(z_j)) depends on x only
    through σ'. With plain relu σ' is a step, so ∂G_{b_1}/∂x = 0 (a.e.) and the attack gets
    no signal from that tensor; ``modified_relu`` makes it nonzero (the reason the reference
    uses it). Other tensors, e.g. G_{W_1} ∝ Σ λ_j y_j x_j(...)ᵀ, depend on x directly either way."""
    m, shape = 4, (1, 3, 1)
    model = MLP(n_out=1, hidden=(5,), activation="relu")
    params = _params(model, shape, seed=8)
    images = 0.5 * jax.random.normal(jax.random.key(9), (m, *shape), jnp.float64)
    labels = jnp.asarray(kkt.candidate_labels((2, 2), m, "binary"))
    lambdas = jnp.linspace(0.2, 1.0, m)

    def first_bias_jacobian(apply_fn):
        def first_bias(x):
            return kkt.combination_gradient("binary", apply_fn, params, x, labels, lambdas)["params"]["layer_0"]["bias"]
        return jax.jacobian(first_bias)(images)

    plain = first_bias_jacobian(model.apply)
    attacked = first_bias_jacobian(kkt.attacked_model(model, jnp.asarray(20.0)).apply)
    assert float(jnp.max(jnp.abs(plain))) == 0.0
    assert float(jnp.max(jnp.abs(attacked))) > 1e-3
    # smooth victims are attacked as trained
    assert kkt.attacked_model(MLP(n_out=1, hidden=(5,), activation="tanh"), 20.0).activation == "tanh"


# ----------------------------------------------------------------------------------------
# vmapped runs, NaN isolation
# ----------------------------------------------------------------------------------------

def _sweep_setup(n_runs: int = 3):
    m, shape = 4, (1, 3, 1)
    model = MLP(n_out=1, hidden=(3,), activation="relu")
    problem = kkt.Problem(victim_params=_params(model, shape, seed=11),
                          labels=jnp.asarray(kkt.candidate_labels((2, 2), m, "binary")), model=model)
    hyper = kkt.Hyper(lr_x=jnp.array([1e-3, 1e-2, 3e-2]), lr_lambda=jnp.array([1e-4, 1e-3, 1e-2]),
                      alpha=jnp.array([10.0, 50.0, 200.0]), lambda_min=jnp.array([0.01, 0.1, 0.5]))
    images = 0.3 * jax.random.normal(jax.random.key(12), (n_runs, m, *shape), jnp.float64)
    lambdas = jax.random.uniform(jax.random.key(13), (n_runs, m), jnp.float64)
    return problem, hyper, images, lambdas


def _batched(config, problem, hyper, images, lambdas, steps):
    # finish ignores extra arguments, so it fits run_batched's finish(state) and a finish(state, hyper)
    return run_batched(lambda start, h: kkt.init_state(config, problem, *start),
                       lambda s, h, n, i=0: kkt.run_steps(config, problem, h, s, n, i),
                       lambda s, *_: {"diverged": s.diverged},
                       (images, lambdas), hyper, steps=steps, segment=3)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_vmapped_runs_equal_single_runs(optimizer):
    problem, hyper, images, lambdas = _sweep_setup()
    steps = 6
    config = kkt.KKTConfig(steps=steps, optimizer=optimizer)
    states, history, final = _batched(config, problem, hyper, images, lambdas, steps)
    evaluated = jax.vmap(partial(kkt.evaluate, config, problem))(hyper, states)

    @jax.jit
    def single(h, x, lam):
        state, record = kkt.run_steps(config, problem, h, kkt.init_state(config, problem, x, lam), steps)
        return state, record, kkt.evaluate(config, problem, h, state)

    for r in range(3):
        state, record, figures = single(jax.tree_util.tree_map(lambda a: a[r], hyper), images[r], lambdas[r])
        np.testing.assert_allclose(states.images[r], state.images, rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(states.lambdas[r], state.lambdas, rtol=1e-12, atol=1e-300)
        for name in ("kkt_loss", "stationarity", "box_penalty", "lambda_penalty", "relative_residual"):
            np.testing.assert_allclose(history[name][r], record[name], rtol=1e-12, atol=1e-300)
        for name in ("kkt_loss", "stationarity", "relative_residual"):
            np.testing.assert_allclose(evaluated[name][r], figures[name], rtol=1e-12)
    assert history["kkt_loss"].shape == (3, steps)
    assert not np.any(final["diverged"])
    assert np.all(np.asarray(evaluated["kkt_loss"]) < history["kkt_loss"][:, 0])  # the steps descend


def test_nan_candidate_freezes_only_its_run():
    problem, hyper, images, lambdas = _sweep_setup()
    config = kkt.KKTConfig(steps=6)
    poisoned = images.at[1, 0, 0, 1, 0].set(jnp.nan)
    clean_states, clean_history, _ = _batched(config, problem, hyper, images, lambdas, 6)
    states, history, final = _batched(config, problem, hyper, poisoned, lambdas, 6)
    np.testing.assert_array_equal(final["diverged"], [False, True, False])
    for r in (0, 2):
        np.testing.assert_array_equal(states.images[r], clean_states.images[r])
        np.testing.assert_array_equal(states.lambdas[r], clean_states.lambdas[r])
        np.testing.assert_array_equal(history["kkt_loss"][r], clean_history["kkt_loss"][r])
    np.testing.assert_array_equal(states.images[1], poisoned[1])  # frozen where it started
    np.testing.assert_array_equal(states.lambdas[1], lambdas[1])
    assert np.all(np.isnan(history["kkt_loss"][1]))


# ----------------------------------------------------------------------------------------
# reference conventions: labels, multipliers, random search, FLOPs
# ----------------------------------------------------------------------------------------

def test_sgd_update_is_the_reference_torch_sgd_with_momentum():
    """The reference optimises x and λ with two ``torch.optim.SGD(momentum=0.9)`` (dampening 0,
    no Nesterov): u ← μu + ∇ (u₀ = 0, so the first u is the gradient), p ← p − lr·u, with lr_x
    on x and lr_λ on λ, both gradients taken of the same L_KKT at the same (x, λ). Three steps
    written out by hand against ``kkt.step``."""
    problem, hyper, images, lambdas = _sweep_setup()
    hyper = jax.tree_util.tree_map(lambda a: a[1], hyper)
    config = kkt.KKTConfig(momentum=0.9)
    grad = jax.grad(lambda x, lam: kkt.kkt_loss(config, problem, hyper, x, lam)[0], argnums=(0, 1))
    x, lam = images[0], lambdas[0]
    u_x, u_lam = jnp.zeros_like(x), jnp.zeros_like(lam)
    state = kkt.init_state(config, problem, x, lam)
    for _ in range(3):
        g_x, g_lam = grad(x, lam)
        u_x, u_lam = 0.9 * u_x + g_x, 0.9 * u_lam + g_lam
        x, lam = x - hyper.lr_x * u_x, lam - hyper.lr_lambda * u_lam
        state, _ = kkt.step(config, problem, hyper, state)
        np.testing.assert_allclose(state.images, x, rtol=1e-13, atol=1e-300)
        np.testing.assert_allclose(state.lambdas, lam, rtol=1e-13, atol=1e-300)


def test_reference_loss_on_a_hand_computed_case():
    """L_KKT of the reference's get_kkt_loss + get_verify_loss, written out for an affine binary
    victim (∇_w Φ(x) = x, ∇_b Φ = 1): Σ_t ‖θ*_t − (1/m) Σ_j λ_j y_j ∇_tΦ(x_j)‖², plus
    Σ relu(x − 1)² + relu(−1 − x)², plus 5 Σ relu(λ_min − λ)². No normalisation by ‖θ*‖."""
    images = jnp.array([[[[0.5], [1.5]]], [[[-2.0], [0.25]]]])  # (m=2, 1, 2, 1)
    labels = jnp.array([0, 1])  # y = −1, +1
    lambdas = jnp.array([0.02, 0.7])
    kernel, bias = np.array([[0.3], [-0.1]]), np.array([0.2])
    problem = kkt.Problem(victim_params=_affine_params(kernel, bias), labels=labels, model=MLP(n_out=1))
    y = np.array([-1.0, 1.0])
    flat = np.asarray(images).reshape(2, -1)
    combination_w = (lambdas * y) @ flat / 2
    combination_b = np.sum(lambdas * y) / 2
    expected = (np.sum((kernel[:, 0] - combination_w) ** 2) + (bias[0] - combination_b) ** 2
                + 0.5 ** 2 + 1.0 ** 2 + 5 * (0.1 - 0.02) ** 2)
    total, _ = kkt.kkt_loss(kkt.KKTConfig(), problem, kkt.Hyper(lr_x=1.0, lambda_min=0.1), images, lambdas)
    np.testing.assert_allclose(float(total), expected, rtol=1e-14)


def test_candidate_labels_are_class_balanced():
    np.testing.assert_array_equal(kkt.candidate_labels((2, 2), task="binary"), [0, 0, 0, 0, 1, 1, 1, 1])  # m = 2N
    np.testing.assert_array_equal(kkt.candidate_labels((5, 5, 5), 7, "multiclass"), [0, 0, 0, 1, 1, 2, 2])
    assert kkt.candidate_labels((3, 3), task="regression") is None


def test_initial_lambdas_and_random_search_ranges():
    key = jax.random.key(0)
    binary = kkt.initial_lambdas(key, 1000, "binary")
    assert binary.shape == (1000,) and binary.dtype == jnp.float64
    assert 0.0 <= float(binary.min()) and float(binary.max()) < 1.0
    assert kkt.initial_lambdas(key, 7, "regression", n_outputs=3).shape == (7, 3)
    assert float(kkt.initial_lambdas(key, 1000, "regression").min()) < 0.0  # free in sign
    hyper, init_scale = kkt.sample_hyper(jax.random.key(1), 2000)
    for values, (lo, hi), log in ((hyper.lr_x, kkt.LR_X_RANGE, True),
                                  (init_scale, kkt.INIT_SCALE_RANGE, True),
                                  (hyper.alpha, kkt.ALPHA_RANGE, False),
                                  (hyper.lambda_min, kkt.LAMBDA_MIN_RANGE, False)):
        values = np.log(np.asarray(values)) if log else np.asarray(values)
        lo, hi = (np.log(lo), np.log(hi)) if log else (lo, hi)
        assert values.shape == (2000,) and lo <= values.min() and values.max() <= hi
        assert abs(values.mean() - (lo + hi) / 2) < 0.05 * (hi - lo)  # uniform on the (log) scale
    np.testing.assert_array_equal(hyper.lr_lambda, np.full(2000, 1e-4))
    # Overridden ranges: only the named ones change; lo == hi fixes the value.
    hyper, init_scale = kkt.sample_hyper(jax.random.key(1), 500, ranges={"lr": (0.3, 1.0), "alpha": (150, 150)})
    assert 0.3 <= float(hyper.lr_x.min()) and float(hyper.lr_x.max()) <= 1.0
    np.testing.assert_allclose(hyper.alpha, 150.0)
    assert float(init_scale.min()) >= 1e-6 and float(init_scale.max()) <= 0.1
    assert 0.01 <= float(hyper.lambda_min.min()) and float(hyper.lambda_min.max()) <= 0.5


@pytest.mark.parametrize("ranges, message", [
    ({"momentum": (0, 1)}, "unknown search range 'momentum'; choose among lr, init_scale, alpha, lambda_min"),
    ({"lr": (0.0, 1.0)}, r"lr is log-uniform and needs lo > 0"),
    ({"alpha": (500, 10)}, r"finite lo <= hi, got \(500.0, 10.0\)"),
    ({"lambda_min": (0.1,)}, "must be two numbers lo, hi"),
])
def test_bad_search_ranges_raise(ranges, message):
    with pytest.raises(ConfigError, match=message):
        kkt.search_ranges(ranges)


def test_flops_per_step():
    assert kkt.flops_per_step(MLP(n_out=3), (2, 2, 3), 10) == 10 * 10 * 12 * 3  # affine: 10·m·d_0·C
    # matmul-dominated: XLA's own count of the compiled step agrees to a few percent
    m, shape = 8, (4, 4, 3)
    model = MLP(n_out=1, hidden=(128,), activation="relu")
    problem = kkt.Problem(victim_params=_params(model, shape, seed=0),
                          labels=jnp.asarray(kkt.candidate_labels((4, 4), m, "binary")), model=model)
    config = kkt.KKTConfig()
    state = kkt.init_state(config, problem, jnp.zeros((m, *shape)), jnp.ones(m))
    cost = jax.jit(lambda h, s: kkt.step(config, problem, h, s)).lower(
        kkt.Hyper(lr_x=jnp.asarray(0.1)), state).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # Elementwise work is outside the analytic count: 1.14 with XLA's default CPU flags and
    # 1.16 with XLA_FLAGS=--xla_cpu_multi_thread_eigen=false (measured), hence the margin.
    assert 0.95 <= cost["flops"] / kkt.flops_per_step(model, shape, m) <= 1.25


# ----------------------------------------------------------------------------------------
# configuration errors
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"task": "ranking"}, "unknown KKT task 'ranking'; choose one of binary, multiclass, regression"),
    ({"stationarity": "cosine"}, "unknown KKT stationarity 'cosine'; choose one of global, per_tensor"),
    ({"optimizer": "lbfgs"}, "unknown KKT optimizer 'lbfgs'; choose one of sgd, adam"),
    ({"steps": -1}, "steps must be an integer >= 0"),
    ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0; the reference uses 0.9"),
    ({"box_weight": -1.0}, "box_weight must be finite and >= 0"),
    ({"lambda_weight": float("nan")}, "lambda_weight must be finite and >= 0"),
])
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        kkt.KKTConfig(**kwargs)


def test_pixel_box_bounds_the_candidate_plus_mean_to_unit_range():
    """box 'pixel': l = −μ, u = 1 − μ, so the penalty is zero exactly when x + μ ∈ [0, 1]; its
    gradient is the closed form 2 relu(x − u) − 2 relu(l − x)."""
    rng = np.random.default_rng(0)
    mean = rng.uniform(0.0, 0.6, (1, 3, 4, 1))
    lower, upper = kkt.box_bounds("pixel", mean, (3, 4, 1))
    np.testing.assert_array_equal(lower, -mean[0])
    np.testing.assert_array_equal(upper, 1.0 - mean[0])
    inside = jnp.asarray(rng.uniform(0.0, 1.0, (5, 3, 4, 1)) - mean)
    assert float(kkt.box_penalty(inside, lower, upper)) == 0.0
    x = jnp.asarray(rng.uniform(-1.5, 1.5, (5, 3, 4, 1)))
    pixels = np.asarray(x) + mean
    expected = np.sum(np.maximum(pixels - 1, 0) ** 2 + np.maximum(-pixels, 0) ** 2)
    np.testing.assert_allclose(float(kkt.box_penalty(x, lower, upper)), expected, rtol=1e-12)
    grad = jax.grad(lambda z: kkt.box_penalty(z, lower, upper))(x)
    np.testing.assert_allclose(grad, 2 * np.maximum(pixels - 1, 0) - 2 * np.maximum(-pixels, 0), rtol=1e-12)
    # The reference box is (−1, 1) and needs no mean.
    assert kkt.box_bounds("centered", None, (3, 4, 1)) == (-1.0, 1.0)
    with pytest.raises(ConfigError, match="'pixel' box needs the victim's training mean.*preprocessing.npz"):
        kkt.box_bounds("pixel", None, (3, 4, 1))
    with pytest.raises(ConfigError, match="mean contains NaN"):
        kkt.box_bounds("pixel", np.full((1, 3, 4, 1), np.nan), (3, 4, 1))
    with pytest.raises(ConfigError, match="unknown KKT box 'unit'; choose one of centered, pixel"):
        kkt.KKTConfig(box="unit")


def test_pixel_box_enters_the_loss_through_the_problem():
    model = MLP(n_out=1)
    params = _params(model, (2, 2, 1), seed=3)
    mean = jnp.full((2, 2, 1), 0.25)
    labels = jnp.array([0, 1])
    images = jnp.full((2, 2, 2, 1), 0.9)  # x + μ = 1.15 > 1 everywhere; inside the centered box
    lambdas = jnp.ones(2)
    centered = kkt.Problem(victim_params=params, labels=labels, model=model)
    pixel = centered.replace(box_lower=-mean, box_upper=1.0 - mean)
    _, terms_c = kkt.kkt_loss(kkt.KKTConfig(), centered, kkt.Hyper(lr_x=0.1), images, lambdas)
    _, terms_p = kkt.kkt_loss(kkt.KKTConfig(box="pixel"), pixel, kkt.Hyper(lr_x=0.1), images, lambdas)
    assert float(terms_c["box_penalty"]) == 0.0
    np.testing.assert_allclose(float(terms_p["box_penalty"]), 8 * 0.15 ** 2, rtol=1e-12)
    np.testing.assert_allclose(float(terms_p["stationarity"]), float(terms_c["stationarity"]), rtol=1e-12)


def test_mismatched_problem_raises():
    binary_model, multi_model = MLP(n_out=1), MLP(n_out=3)
    params = _params(binary_model, (1, 2, 1), seed=0)
    images, labels = jnp.zeros((4, 1, 2, 1)), jnp.array([0, 0, 1, 1])
    problem = kkt.Problem(victim_params=params, labels=labels, model=binary_model)
    with pytest.raises(ConfigError, match="multipliers λ have shape \\(3,\\), expected \\(4,\\)"):
        kkt.init_state(kkt.KKTConfig(), problem, images, jnp.ones(3))
    with pytest.raises(ConfigError, match="labels of shape \\(4,\\).*kkt.candidate_labels"):
        kkt.init_state(kkt.KKTConfig(), problem.replace(labels=labels[:3]), images, jnp.ones(4))
    with pytest.raises(ConfigError, match="task 'binary' needs a victim with one output"):
        kkt.init_state(kkt.KKTConfig(), problem.replace(model=multi_model), images, jnp.ones(4))
    with pytest.raises(ConfigError, match="expected \\(4, 3\\)"):
        kkt.init_state(kkt.KKTConfig(task="regression"), problem.replace(model=multi_model), images, jnp.ones(4))
    with pytest.raises(ConfigError, match="task 'binary' needs 2 classes"):
        kkt.candidate_labels((1, 1, 1), task="binary")
    with pytest.raises(ConfigError, match="2 candidates cannot cover 3 classes"):
        kkt.candidate_labels((1, 1, 1), 2, "multiclass")
