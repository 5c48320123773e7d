"""Bilevel engine: hypergradients against finite differences and a closed form, backend
agreement, vmap against a loop, chunking, NaN isolation and resumption."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.flatten_util import ravel_pytree

from recon_jax import bilevel, data, newton
from recon_jax.batching import run_batched
from recon_jax.errors import ConfigError
from recon_jax.models import MLP, init_params
from recon_jax.objectives import make_objective, squared_norm
from recon_jax.solvers import InnerConfig, make_argmin
from recon_jax.training import TrainConfig, train_victim

TIGHT = InnerConfig(tol=1e-12, maxiter=1000, cg_ridge=0.0, cg_tol=1e-14, cg_maxiter=1000)


def _victim(hidden, activation, loss, n_per_class=2, weight_decay=1e-2, classes=(0, 1, 2)):
    selected = data.select(data.load_dataset("digits"), n_per_class=n_per_class, classes=classes, seed=0)
    model = MLP(n_out=len(classes), hidden=hidden, activation=activation)
    images = jnp.asarray(selected.train_centered(), jnp.float64)
    order = np.argsort(selected.train.labels, kind="stable")
    images, labels = images[order], jnp.asarray(selected.train.labels[order])
    params, report = train_victim(model, init_params(model, jax.random.key(0), images.shape[1:], jnp.float64),
                                  images, labels, TrainConfig(loss=loss, weight_decay=weight_decay, tol=1e-13))
    assert report.stationary
    problem = bilevel.Problem(victim_params=params, labels=labels,
                              objective=make_objective(model.apply, loss, weight_decay))
    return problem, images


def _directional_fd(f, x, direction, eps):
    return (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)


@pytest.mark.parametrize("hidden, backend", [((), "jaxopt"), ((16,), "jaxopt"), ((), "custom_vjp"), ((16,), "custom_vjp")])
def test_hypergradient_matches_central_differences(hidden, backend):
    problem, truth = _victim(hidden, "gelu", "ce")
    config = bilevel.BilevelConfig(inner=InnerConfig(**{**TIGHT.__dict__, "backend": backend}))
    x = truth + 0.2 * jax.random.normal(jax.random.key(1), truth.shape, truth.dtype)
    f = jax.jit(lambda x: bilevel.hypergradient(config, problem, x))
    loss, grad = f(x)
    assert loss > 1e-4
    for seed in range(3):
        direction = jax.random.normal(jax.random.key(10 + seed), x.shape, x.dtype)
        fd = _directional_fd(lambda z: f(z)[0], x, direction, 1e-4)
        assert abs(float(jnp.vdot(grad, direction)) - float(fd)) <= 1e-5 * abs(float(fd))


def test_hypergradient_matches_closed_form_ridge_regression():
    """Affine + MSE + λ_wd is ridge regression: Θ(X) = (X̃ᵀX̃/N + λI)⁻¹ X̃ᵀT/N with X̃ = [X, 1]."""
    weight_decay = 1e-2
    problem, truth = _victim((), "gelu", "mse", weight_decay=weight_decay)
    n = truth.shape[0]
    targets = jax.nn.one_hot(problem.labels, 3, dtype=jnp.float64)
    star = problem.victim_params["params"]["layer_0"]
    theta_star = jnp.concatenate([star["kernel"], star["bias"][None]])

    def closed_form_loss(x):
        aug = jnp.concatenate([x.reshape(n, -1), jnp.ones((n, 1))], axis=1)
        theta = jnp.linalg.solve(aug.T @ aug / n + weight_decay * jnp.eye(aug.shape[1]), aug.T @ targets / n)
        return jnp.sum((theta - theta_star) ** 2) / jnp.sum(theta_star ** 2)

    np.testing.assert_allclose(closed_form_loss(truth), 0.0, atol=1e-20)  # θ* is exactly the ridge solution
    x = truth + 0.3 * jax.random.normal(jax.random.key(2), truth.shape, truth.dtype)
    exact_loss, exact_grad = jax.value_and_grad(closed_form_loss)(x)
    for backend in ("jaxopt", "custom_vjp"):
        config = bilevel.BilevelConfig(inner=InnerConfig(**{**TIGHT.__dict__, "backend": backend}))
        loss, grad = jax.jit(lambda x: bilevel.hypergradient(config, problem, x))(x)
        np.testing.assert_allclose(loss, exact_loss, rtol=1e-9)
        assert float(jnp.linalg.norm(grad - exact_grad) / jnp.linalg.norm(exact_grad)) <= 1e-6


@pytest.mark.parametrize("hidden, loss", [((), "ce"), ((16,), "ce"), ((), "mse")])
def test_backends_agree(hidden, loss):
    problem, truth = _victim(hidden, "gelu", loss)
    x = truth + 0.3 * jax.random.normal(jax.random.key(3), truth.shape, truth.dtype)
    grads = []
    for backend in ("jaxopt", "custom_vjp"):
        config = bilevel.BilevelConfig(inner=InnerConfig(**{**TIGHT.__dict__, "backend": backend}))
        grads.append(jax.jit(lambda x: bilevel.hypergradient(config, problem, x))(x)[1])
    assert float(jnp.linalg.norm(grads[0] - grads[1]) / jnp.linalg.norm(grads[0])) <= 1e-6


def test_true_images_are_a_zero_of_the_outer_problem():
    problem, truth = _victim((16,), "gelu", "ce")
    config = bilevel.BilevelConfig(inner=TIGHT)
    loss, grad = bilevel.hypergradient(config, problem, truth)
    assert float(loss) < 1e-20 and float(jnp.max(jnp.abs(grad))) < 1e-8


def test_adjoint_probe_and_cg_residual_match_explicit_hessian():
    problem, truth = _victim((), "gelu", "ce", n_per_class=1)
    config = bilevel.BilevelConfig(inner=TIGHT, engine="implicit")
    x0 = truth + 0.1 * jax.random.normal(jax.random.key(4), truth.shape, truth.dtype)
    state = bilevel.init_state(config, problem, x0)
    new_state, record = bilevel.outer_step(config, problem, bilevel.Hyper(learning_rate=0.01), state)
    theta, unravel = jax.flatten_util.ravel_pytree(new_state.inner_params)
    hessian = jax.hessian(lambda t: problem.objective(unravel(t), x0, problem.labels))(theta)
    g = jax.grad(lambda t: bilevel.parameter_loss("l2", unravel(t), problem.victim_params))(theta)
    v = jax.flatten_util.ravel_pytree(new_state.adjoint)[0]
    np.testing.assert_allclose(v, jnp.linalg.solve(hessian, g), rtol=1e-7, atol=1e-12)
    assert float(record["cg_residual"]) < 1e-10 and float(record["inner_grad_norm"]) <= 1e-12


def test_prior_gradients_match_finite_differences():
    x = jax.random.normal(jax.random.key(5), (2, 4, 5, 3), jnp.float64) * 1.5
    for f in (lambda z: bilevel.box_penalty(z, -1.0, 1.0), lambda z: bilevel.total_variation(z, 1e-3)):
        direction = jax.random.normal(jax.random.key(6), x.shape, x.dtype)
        fd = _directional_fd(f, x, direction, 1e-6)
        np.testing.assert_allclose(jnp.vdot(jax.grad(f)(x), direction), fd, rtol=1e-6)
    assert float(bilevel.box_penalty(jnp.clip(x, -1, 1), -1.0, 1.0)) == 0.0
    np.testing.assert_allclose(bilevel.total_variation(jnp.ones((1, 3, 3, 1)), 1e-3), 4 * 1e-3)


def test_cosine_outer_loss_is_scale_invariant():
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[3.0]])}
    scaled = jax.tree_util.tree_map(lambda p: 7.0 * p, params)
    assert abs(float(bilevel.parameter_loss("cosine", scaled, params))) < 1e-15
    assert float(bilevel.parameter_loss("l2", scaled, params)) == pytest.approx(36.0)


def _batched(problem, config, x0, hyper, **kw):
    return run_batched(lambda x, h: bilevel.init_state(config, problem, x),
                       lambda s, h, n, i=0: bilevel.run_steps(config, problem, h, s, n, i),
                       lambda s, h: bilevel.evaluate(config, problem, s), x0, hyper, steps=config.steps, **kw)


@pytest.fixture(scope="module")
def small_run():
    problem, truth = _victim((), "gelu", "ce", n_per_class=1)
    config = bilevel.BilevelConfig(steps=6, inner=InnerConfig(tol=1e-11, cg_tol=1e-11))
    x0 = 0.1 * jax.random.normal(jax.random.key(7), (4, *truth.shape), truth.dtype)
    hyper = bilevel.Hyper(learning_rate=jnp.array([0.01, 0.02, 0.005, 0.01]),
                          box_weight=jnp.zeros(4), tv_weight=jnp.array([0.0, 0.0, 0.0, 1e-3]))
    return problem, config, x0, hyper


@pytest.mark.parametrize("engine, refresh", [("implicit", "auto"), ("amortized", "lbfgs"), ("amortized", "newton"),
                                             ("amortized", "jaxopt")])
def test_vmap_equals_a_loop_of_single_runs(small_run, engine, refresh):
    """Up to reassociation: float64 round-off for the implicit engine; the amortized engine's
    float32 Hessian products (``product_precision``) round differently when batched. With
    any refresh solver (Newton's and ``recon_jax.lbfgs``'s stop each element at its own tolerance)."""
    problem, config, x0, hyper = small_run
    config = dataclasses.replace(config, engine=engine, refresh_solver=refresh)
    rtol, atol = (1e-9, 1e-12) if engine == "implicit" else (1e-6, 1e-8)
    states, history, final = _batched(problem, config, x0, hyper)
    for k in range(4):
        h = jax.tree_util.tree_map(lambda a: a[k], hyper)
        state, record = jax.jit(lambda s: bilevel.run_steps(config, problem, h, s, config.steps))(
            bilevel.init_state(config, problem, x0[k]))
        np.testing.assert_allclose(states.images[k], state.images, rtol=rtol, atol=atol)
        np.testing.assert_allclose(history["outer_loss"][k], record["outer_loss"], rtol=rtol)
    assert history["outer_loss"].shape == (4, 6) and final["outer_loss"].shape == (4,)
    assert np.all(final["outer_loss"] < history["outer_loss"][:, 0])


@pytest.mark.parametrize("engine", ["implicit", "amortized"])
def test_chunks_and_segments_do_not_change_results(small_run, engine):
    """Tolerances as in the vmap test: a batch of 3 rounds float32 products unlike one of 4."""
    problem, config, x0, hyper = small_run
    config = dataclasses.replace(config, engine=engine)
    rtol, atol = (1e-9, 1e-12) if engine == "implicit" else (1e-6, 1e-8)
    whole = _batched(problem, config, x0, hyper)
    chunked = _batched(problem, config, x0, hyper, chunk_size=3, segment=4)  # last chunk padded
    np.testing.assert_allclose(chunked[0].images, whole[0].images, rtol=rtol, atol=atol)
    for name in whole[1]:
        # The amortized record's ‖∇_θL‖ and relative CG residual come from float32 products:
        # diagnostics whose own round-off (≈1e-7 relative) is a large part of a converged value.
        loose = engine == "amortized" and name in ("inner_grad_norm", "cg_residual")
        np.testing.assert_allclose(chunked[1][name], whole[1][name], rtol=1e-2 if loose else rtol,
                                   atol=1e-7 if loose else atol, err_msg=name)


def test_a_diverging_initialisation_is_flagged_and_isolated(small_run):
    problem, config, x0, hyper = small_run
    poisoned = x0.at[2, 0, 0, 0, 0].set(jnp.nan)
    clean = _batched(problem, config, x0, hyper)
    states, history, final = _batched(problem, config, poisoned, hyper)
    assert list(final["diverged"]) == [False, False, True, False]
    keep = [0, 1, 3]
    np.testing.assert_allclose(states.images[keep], clean[0].images[keep], rtol=1e-12)
    assert np.all(np.isfinite(final["outer_loss"][keep]))


def test_interrupted_run_resumes_to_the_same_result(small_run, tmp_path):
    problem, config, x0, hyper = small_run
    reference = _batched(problem, config, x0, hyper, chunk_size=2, segment=2)

    def interrupt(done, total):
        if done == 8:  # chunk 1 mid-way: chunk 0 finished, chunk 1 has 2 of 6 steps
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _batched(problem, config, x0, hyper, chunk_size=2, segment=2, checkpoint_dir=tmp_path, progress=interrupt)
    assert sorted(p.name for p in tmp_path.glob("chunk_*.npz")) == ["chunk_0000.npz", "chunk_0001.npz"]
    assert (tmp_path / "layout.json").is_file()  # the chunk size a resumed run must keep
    calls = []
    resumed = _batched(problem, config, x0, hyper, chunk_size=2, segment=2, checkpoint_dir=tmp_path,
                       progress=lambda done, total: calls.append(done))
    assert calls == [10, 12]  # chunk 0 reused; chunk 1 continued from step 2
    np.testing.assert_allclose(resumed[0].images, reference[0].images, rtol=1e-12)
    for name in reference[1]:
        np.testing.assert_allclose(resumed[1][name], reference[1][name], rtol=1e-12)


@pytest.mark.parametrize("backend", ["jaxopt", "custom_vjp"])
def test_adjoint_warm_start_is_used_with_the_right_sign(backend):
    """Warm-started from the exact adjoint v, one CG iteration must already give the exact
    hypergradient; a start of the wrong sign (jaxopt solves for −v) would not."""
    problem, truth = _victim((), "gelu", "ce")
    x = truth + 0.2 * jax.random.normal(jax.random.key(8), truth.shape, truth.dtype)
    tight = InnerConfig(**{**TIGHT.__dict__, "backend": backend})
    zeros = jax.tree_util.tree_map(jnp.zeros_like, problem.victim_params)

    def gradients(config, adjoint_init):
        argmin = make_argmin(problem.objective, config)

        def outer(images, probe):
            params, _ = argmin(problem.victim_params, images, problem.labels, probe, adjoint_init)
            return bilevel.parameter_loss("l2", params, problem.victim_params)

        return jax.jit(jax.grad(outer, argnums=(0, 1)))(x, zeros)

    exact_x, probe_bar = gradients(tight, zeros)
    v = jax.tree_util.tree_map(jnp.negative, probe_bar)
    one_step = InnerConfig(**{**tight.__dict__, "cg_maxiter": 1})
    warm_x, _ = gradients(one_step, v)
    cold_x, _ = gradients(one_step, zeros)
    rel = lambda g: float(jnp.linalg.norm(g - exact_x) / jnp.linalg.norm(exact_x))
    assert rel(warm_x) < 1e-8 < rel(cold_x)


def test_chunk_size_follows_free_memory_and_refuses_what_cannot_fit(monkeypatch):
    from recon_jax import batching
    from recon_jax.errors import ConfigError

    monkeypatch.setattr(batching, "available_memory_bytes", lambda: 4_000_000)
    assert batching.auto_chunk_size(n_inits=1000, bytes_per_init=100_000) == 10  # 25% of 4 MB / 100 kB
    assert batching.auto_chunk_size(n_inits=3, bytes_per_init=100_000) == 3
    with pytest.raises(ConfigError, match="one initialisation needs about .* GiB"):
        batching.auto_chunk_size(n_inits=1, bytes_per_init=2_000_000)


@pytest.mark.parametrize("solver", ["cg", "minres"])
def test_amortized_hypergradient_converges_to_the_exact_one_as_the_budget_grows(solver):
    """Arbel & Mairal's amortized hypergradient: inexact at a small budget, exact in the limit.
    From θ*, v = 0 at images away from the truth, k Newton steps of c CG iterations and c adjoint
    CG iterations approach the implicit-differentiation hypergradient (tight tolerances). The
    products run in float64 here (product_precision="full"); the default float32 products set a
    floor near 1e-6 (next test)."""
    problem, truth = _victim((16,), "gelu", "ce")
    x = truth + 0.2 * jax.random.normal(jax.random.key(21), truth.shape, truth.dtype)
    exact_loss, exact = jax.jit(lambda x: bilevel.hypergradient(bilevel.BilevelConfig(inner=TIGHT), problem, x))(x)
    hyper = bilevel.Hyper(learning_rate=jnp.asarray(0.01))
    errors = []
    for newton_steps, budget in ((1, 2), (2, 8), (6, 400)):
        config = bilevel.BilevelConfig(newton_steps=newton_steps, newton_cg=budget, adjoint_cg=budget, engine="amortized",
                                       adjoint_solver=solver, product_precision="full",
                                       inner=InnerConfig(cg_ridge=0.0, cg_tol=1e-15))
        state = bilevel.init_state(config, problem, x)
        loss, grad = jax.jit(lambda s: bilevel.amortized_hypergradient(config, problem, hyper, s))(state)
        errors.append(float(jnp.linalg.norm(grad - exact) / jnp.linalg.norm(exact)))
    assert errors[0] > 1e-3 and errors[0] > errors[1] > errors[2]
    assert errors[-1] <= 1e-8
    np.testing.assert_allclose(loss, exact_loss, rtol=1e-8)


def test_float32_products_of_a_float64_run_are_rounded_products_and_the_rest_stays_float64():
    """Mixed precision (product_precision="float32"): ∇_θL, L and the returned products are
    float64; the products equal the float64 ones to float32 round-off, not better."""
    problem, truth = _victim((16,), "gelu", "ce")
    params, labels, objective = problem.victim_params, problem.labels, problem.objective
    x = truth + 0.1 * jax.random.normal(jax.random.key(3), truth.shape, truth.dtype)
    direction = jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape, a.dtype), params)
    value, grad, hvp = newton.value_gradient_and_hvp(objective, params, x, labels)
    value32, grad32, hvp32 = newton.value_gradient_and_hvp(objective, params, x, labels, product_dtype=jnp.float32)
    assert float(value32) == float(value)
    for a, b in zip(jax.tree_util.tree_leaves(grad32), jax.tree_util.tree_leaves(grad)):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-16)
    full, reduced = ravel_pytree(hvp(direction))[0], ravel_pytree(hvp32(direction))[0]
    assert reduced.dtype == jnp.float64
    error = float(jnp.linalg.norm(reduced - full) / jnp.linalg.norm(full))
    assert 1e-10 < error < 1e-5
    # A float32 run is left alone: no second precision below it.
    params32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    assert not newton.lowers_precision(jnp.float32, np.float32) and newton.lowers_precision(jnp.float32, np.float64)
    _, grad_a, hvp_a = newton.value_gradient_and_hvp(objective, params32, x.astype(jnp.float32), labels,
                                                     product_dtype=jnp.float32)
    _, grad_b, hvp_b = newton.value_gradient_and_hvp(objective, params32, x.astype(jnp.float32), labels)
    direction32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), direction)
    np.testing.assert_array_equal(ravel_pytree(hvp_a(direction32))[0], ravel_pytree(hvp_b(direction32))[0])


def test_amortized_hypergradient_with_float32_products_is_float32_accurate_at_a_large_budget():
    """With float32 products the Newton iteration still converges to the float64 θ(x) (its
    right-hand side ∇_θL is float64: iterative refinement), so the objective is exact; the
    adjoint and the cross term carry float32 round-off, so the hypergradient's error floor is
    ~1e-6 relative instead of ≤ 1e-8."""
    problem, truth = _victim((16,), "gelu", "ce")
    x = truth + 0.2 * jax.random.normal(jax.random.key(21), truth.shape, truth.dtype)
    exact_loss, exact = jax.jit(lambda x: bilevel.hypergradient(bilevel.BilevelConfig(inner=TIGHT), problem, x))(x)
    hyper = bilevel.Hyper(learning_rate=jnp.asarray(0.01))
    config = bilevel.BilevelConfig(newton_steps=6, newton_cg=400, adjoint_cg=400, engine="amortized",
                                   product_precision="float32", inner=InnerConfig(cg_ridge=0.0, cg_tol=1e-15))
    state = bilevel.init_state(config, problem, x)
    loss, grad = jax.jit(lambda s: bilevel.amortized_hypergradient(config, problem, hyper, s))(state)
    assert grad.dtype == jnp.float64
    error = float(jnp.linalg.norm(grad - exact) / jnp.linalg.norm(exact))
    assert 1e-9 < error <= 2e-5  # measured 3.9e-6; the float64 products reach 1e-11 here
    np.testing.assert_allclose(loss, exact_loss, rtol=1e-8)
    cost = config.cost_per_step()
    assert cost == {"gradients": 6 + 1 + 6, "values": 4 * 6, "hvps": 6 * 400 + 400 + 2, "float32": 7 + 6 * 400 + 402}
    assert config.cost_per_step(np.float32)["float32"] == 0


def test_amortized_refresh_runs_at_step_zero_and_every_period_across_segments(small_run):
    """The refresh is keyed to the absolute step, which run_batched passes unbatched: segments
    and chunks do not move it, and it is a real branch (not computed at other steps)."""
    problem, _, x0, hyper = small_run
    config = bilevel.BilevelConfig(steps=7, refresh_every=3, engine="amortized", inner=InnerConfig(tol=1e-11, cg_tol=1e-11))
    whole = _batched(problem, config, x0, hyper)
    pieces = _batched(problem, config, x0, hyper, chunk_size=3, segment=2)
    # The refresh's L-BFGS stops each element at ‖∇L‖ ≤ 1e-11; a batch of another size rounds
    # differently, may stop one iteration apart (θ within tol/μ), and Adam's normalised steps
    # carry that into pixels whose gradient is near zero: measured 1e-7 relative at most.
    np.testing.assert_allclose(pieces[0].images, whole[0].images, rtol=1e-6, atol=1e-10)
    # Iteration counts and step sizes are decided by tests at round-off level (a CG residual
    # against 1e-11, an Armijo test once the Newton step is negligible), which XLA's
    # batch-size-dependent reductions may flip; the floating-point records agree.
    for name in ("outer_loss", "objective", "cost_hvps"):
        np.testing.assert_allclose(pieces[1][name], whole[1][name], rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(np.isfinite(pieces[1]["refresh_correction"]),
                                  np.isfinite(whole[1]["refresh_correction"]))
    refreshed = np.isfinite(whole[1]["refresh_correction"])
    assert refreshed[:, [0, 3, 6]].all() and not refreshed[:, [1, 2, 4, 5]].any()
    cost = config.cost_per_step()
    # Defaults: 1 Newton step of 6 CG iterations, 7 adjoint CG iterations, float32 products.
    assert cost == {"gradients": 3, "values": 4, "hvps": 1 * 6 + 7 + 2, "float32": 2 + 15}
    plain = whole[1]["cost_gradients"][:, [1, 2, 4, 5]]
    np.testing.assert_array_equal(plain, cost["gradients"])
    assert (whole[1]["cost_gradients"][:, 0] > cost["gradients"]).all()
    assert (whole[1]["refresh_correction"][:, 0] > whole[1]["refresh_correction"][:, 6]).all()


def test_refresh_solvers_agree_on_a_convex_inner_problem(small_run):
    """``refresh_solver``: "auto" is Newton–CG for a convex inner problem and ``recon_jax.lbfgs``
    otherwise; every solver re-solves θ to the inner tolerance, so θ agrees to ‖∇L‖/μ (μ = λ_wd),
    v to the CG tolerance, and so does the final evaluation. The record counts each solve's cost."""
    problem, config, x0, _ = small_run
    convex = problem.replace(convex=True)
    auto = dataclasses.replace(config, engine="amortized")
    assert bilevel.refresh_solver_for(auto.refresh_solver, True) == "newton"
    assert bilevel.refresh_solver_for(auto.refresh_solver, False) == "lbfgs"
    assert bilevel.refresh_solver_for("jaxopt", True) == "jaxopt"
    state = bilevel.init_state(auto, convex, x0[0])
    configs = {solver: dataclasses.replace(auto, refresh_solver=solver) for solver in ("newton", "lbfgs", "jaxopt")}
    refreshed = {solver: jax.jit(lambda s, c=c: bilevel.refresh(c, convex, s))(state) for solver, c in configs.items()}
    flat = lambda tree: ravel_pytree(tree)[0]
    for solver in ("lbfgs", "jaxopt"):
        for name in ("inner_params", "adjoint"):
            a, b = flat(getattr(refreshed["newton"][0], name)), flat(getattr(refreshed[solver][0], name))
            assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) <= 1e-7, (solver, name)
    for solver, (new_state, _) in refreshed.items():
        gradient = jax.grad(convex.objective)(new_state.inner_params, x0[0], convex.labels)
        assert float(jnp.sqrt(squared_norm(gradient))) <= 1e-10, solver
    # Cost: the Newton steps' linearisations and the converged check (two gradients each with
    # float32 products) + the adjoint's linearisation; their CG budgets + the adjoint CG's products.
    _, info, gradients, hvps = bilevel.accurate_solve(auto, convex, state.inner_params, x0[0])
    steps = int(info.iterations)
    newton_record = refreshed["newton"][1]
    assert steps >= 1 and int(hvps) == steps * auto.refresh_cg
    assert int(gradients) == 2 * (steps + 1)  # float32 products: two gradients a linearisation, converged
    assert float(newton_record["refresh_gradients"]) == 2 * (steps + 1) + 1
    assert float(newton_record["refresh_hvps"]) > steps * auto.refresh_cg
    # L-BFGS: one gradient at the start and one per iteration, no Hessian products.
    _, info, gradients, hvps = bilevel.accurate_solve(configs["lbfgs"], convex, state.inner_params, x0[0])
    assert int(gradients) == int(info.iterations) + 1 >= 2 and int(hvps) == 0 and not bool(info.failed_linesearch)
    final = {solver: jax.jit(lambda s, c=c: bilevel.evaluate(c, convex, s))(refreshed["newton"][0])
             for solver, c in configs.items()}
    for solver in ("lbfgs", "jaxopt"):
        np.testing.assert_allclose(final["newton"]["outer_loss"], final[solver]["outer_loss"], rtol=1e-8)
    assert float(final["newton"]["inner_grad_norm"]) <= 1e-11


def test_engines_reach_the_same_images(small_run):
    """Same start, same schedule: the amortized and the implicit engine take nearly the same path
    (to 1e-6 with float64 products; to float32 round-off, 1e-5, with the default float32 ones)."""
    problem, _, x0, hyper = small_run
    runs = {}
    for engine, precision in (("amortized", "full"), ("amortized", "float32"), ("implicit", "full")):
        config = bilevel.BilevelConfig(steps=6, engine=engine, newton_steps=2, newton_cg=30, adjoint_cg=30,
                                       product_precision=precision, inner=InnerConfig(tol=1e-12, cg_tol=1e-12))
        runs[engine, precision] = _batched(problem, config, x0, hyper)
    exact = runs["implicit", "full"]
    for precision, rtol in (("full", 1e-6), ("float32", 1e-5)):
        np.testing.assert_allclose(runs["amortized", precision][0].images, exact[0].images, rtol=rtol, atol=1e-9)
        np.testing.assert_allclose(runs["amortized", precision][2]["outer_loss"], exact[2]["outer_loss"], rtol=rtol)


def test_learning_rate_schedules():
    cosine = bilevel.BilevelConfig(steps=120, schedule="cosine", warmup_steps=20, final_lr_fraction=0.01)
    s = np.asarray(jax.vmap(lambda t: bilevel.lr_schedule(cosine, t))(jnp.arange(121)))
    np.testing.assert_allclose(s[[0, 9, 19]], [0.05, 0.5, 1.0])
    np.testing.assert_allclose(s[20], 1.0)
    np.testing.assert_allclose(s[70], 0.01 + 0.99 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(s[120], 0.01, rtol=1e-6)
    plateau = bilevel.BilevelConfig(warmup_steps=4)
    np.testing.assert_allclose([bilevel.lr_schedule(plateau, t) for t in (0, 3, 50)], [0.25, 1.0, 1.0])
    constant = bilevel.BilevelConfig(schedule="constant")
    assert float(bilevel.lr_schedule(constant, 7)) == 1.0


def test_engine_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="engine='implicit'"):
        bilevel.BilevelConfig(warm_start="victim")
    with pytest.raises(ConfigError, match="budgets must be >= 1"):
        bilevel.BilevelConfig(newton_cg=0)
    with pytest.raises(ConfigError, match="unknown schedule"):
        bilevel.BilevelConfig(schedule="linear")


def test_auto_engine_is_amortized_with_cg_for_convex_and_minres_for_other_inner_problems(small_run):
    problem = small_run[0]
    auto = bilevel.BilevelConfig()
    assert auto.engine == "auto" and auto.adjoint_solver == "auto"
    assert bilevel.resolve_engine(auto, problem) == "amortized"
    assert bilevel.resolve_engine(auto, problem.replace(convex=True)) == "amortized"
    assert bilevel.solver_for(auto.adjoint_solver, problem.convex) == "minres"
    assert bilevel.solver_for(auto.adjoint_solver, True) == "cg"
    assert bilevel.solver_for("cg", False) == "cg"
    assert bilevel.resolve_engine(bilevel.BilevelConfig(engine="implicit"), problem.replace(convex=True)) == "implicit"


def test_a_second_run_on_the_same_victim_reuses_the_compiled_program_and_gives_the_same_result(tmp_path):
    """reconstruct keeps the single-run functions per (victim files, spec up to init/seed/n_inits),
    so run_batched reuses its jitted programs; a run after another equals the same run alone."""
    from recon_jax import batching, reconstruct as rec
    from recon_jax.victim import VictimSpec, train_and_save

    victim = train_and_save(VictimSpec(dataset="digits", n_per_class=1, hidden=()), tmp_path / "victim")
    first = rec.ReconstructionSpec(method="bilevel", init="gaussian:0.1", n_inits=2, seed=3,
                                   bilevel=bilevel.BilevelConfig(steps=3, engine="amortized"))
    second = dataclasses.replace(first, init="gt-noise:0.2", seed=4)
    rec._FUNCTIONS.clear()
    batching._PROGRAMS.clear()
    rec.reconstruct(tmp_path / "victim", tmp_path / "alone", second)
    alone = np.load(tmp_path / "alone" / "reconstructions.npz")["centered"]
    rec._FUNCTIONS.clear()
    batching._PROGRAMS.clear()
    rec.reconstruct(tmp_path / "victim", tmp_path / "a", first)
    programs = dict(batching._PROGRAMS)
    rec.reconstruct(tmp_path / "victim", tmp_path / "b", second)
    assert len(rec._FUNCTIONS) == 1 and dict(batching._PROGRAMS).keys() == programs.keys()
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "reconstructions.npz")["centered"], alone)
    # Another method configuration gets its own functions.
    rec.reconstruct(tmp_path / "victim", tmp_path / "c", dataclasses.replace(
        second, bilevel=bilevel.BilevelConfig(steps=4, engine="amortized")))
    assert len(rec._FUNCTIONS) == 2


def test_plateau_schedule_compares_against_the_best_since_the_warm_up():
    """A rise during the warm-up (a branch change of θ(x), or the ramping rate) must not leave a
    best value the run can never beat: reduce-on-plateau restarts at step W, so a run that then
    improves keeps its full rate, where without the restart the rate halves every `patience`
    steps towards 0."""
    import optax
    from recon_jax.attack import descent_direction, restart_plateau

    tx = descent_direction("adam", extra_args=True, plateau=(0.5, 3))
    warm, steps = 4, 40
    values = [1e-3] + [2.0 - 0.01 * t for t in range(1, steps)]  # spike at step 1, then steady descent
    scales = {}
    for restart in (False, True):
        params = jnp.zeros(3)
        state = tx.init(params)
        for t, value in enumerate(values):
            if restart:
                state = restart_plateau(state, jnp.asarray(t == warm))
            _, state = tx.update(jnp.ones(3), state, params, value=jnp.asarray(value))
        plateau = [s for s in jax.tree_util.tree_leaves(
            state, is_leaf=lambda s: isinstance(s, optax.contrib.ReduceLROnPlateauState))
            if isinstance(s, optax.contrib.ReduceLROnPlateauState)][0]
        scales[restart] = float(plateau.scale)
    assert scales[False] < 1e-3  # the spike's best value froze the run
    assert scales[True] == 1.0  # 0.5% per step beats the 0.1% threshold: never cut


def test_plateau_restart_is_wired_into_the_bilevel_update(small_run):
    """The bilevel step calls ``restart_plateau`` exactly at step W: the plateau state's best
    value there is the objective of step W, not of an earlier step."""
    import optax
    problem, _, x0, hyper = small_run
    config = bilevel.BilevelConfig(steps=6, warmup_steps=3, schedule="plateau", engine="amortized")
    state = bilevel.init_state(config, problem, x0[0])
    objectives = []
    for t in range(5):
        state, record = jax.jit(lambda s: bilevel.outer_step(config, problem, jax.tree_util.tree_map(
            lambda a: a[0], hyper), s))(state)
        objectives.append(float(record["objective"]))
        plateau = state.opt_state[1]
        assert isinstance(plateau, optax.contrib.ReduceLROnPlateauState)
        if t == 3:
            assert float(plateau.best_value) == pytest.approx(objectives[3], rel=1e-12)
            assert int(plateau.plateau_count) == 0
