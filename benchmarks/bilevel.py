"""Benchmark of the bilevel reconstruction machinery: step cost, vmap speed-up, memory.

What is measured (all in float64, on real MNIST test images, medians over repeats, after a
warm-up call that compiles; every result is ``jax.block_until_ready``-ed before the clock stops):

(a) Cost of ONE outer step, in gradient units.
    The unit G is one jitted full-batch training-loss gradient ``jax.grad(L)(θ*, x, y)`` on
    the same problem. The step is a jitted ``bilevel.outer_step`` (warm-started L-BFGS
    inner solve + adjoint CG + one VJP + Adam update) on a state that has already taken
    ``warm_steps`` steps from a gaussian:0.1 initialisation, so that the warm starts are
    the ones a real run sees. Victims: the affine model (784-10, target ≤ 10 G) and a
    one-hidden-layer gelu net (784-256-10, no target: reported). Both inner backends
    ("jaxopt", "custom_vjp"), with ``record_cg_residual`` on and off. The step's record
    gives the inner iterations and the CG residual. For the affine victim one more row,
    for information, times the step with looser tolerances (tol = cg_tol = 1e-6 instead of
    1e-10) from the same state, to show how much of the cost the tight defaults account for.
    A profile follows for every victim and backend: the inner solve alone from the same
    warm start (with jaxopt's count of value-and-gradient evaluations), the backward pass
    (adjoint CG + VJP, timed as forward+backward minus forward), one Hessian-vector
    product, all in G; the number of CG iterations the step's adjoint solve needs (counted
    by a CG that mirrors ``jax.scipy.sparse.linalg.cg``'s stopping rule): on the call the
    library actually makes, with the x0 it passes (the benchmark wraps that cg function
    for one untimed run), and for comparison from the correctly signed warm start and cold; and
    the cost of one gradient inside a compiled loop, which shows how much of G is per-call
    dispatch rather than arithmetic on these small problems.

(b) K = 64 vmapped initialisations against 64 sequential single runs (affine victim on
    20 images, 20 outer steps). Vmapped: one ``batching.run_batched`` call with
    chunk_size = K (wall time, which includes its own trace + compile, since run_batched
    jits on every call), and the very same vmapped programs compiled ahead and executed
    (steady state; ``batching.batched_program`` on one device). Sequential: one jitted single-initialisation init → run_steps →
    evaluate, compiled once and called K times. Target: vmapped / sequential ≤ 0.5
    (steady state). Where the host has more than one core, the same batch is also timed
    sharded over one XLA CPU device per core (``batching.placement``, as ``--devices`` runs it:
    ``jit(shard_map(vmap(f)))``, each device stopping its loops on its own), as one chunk and in
    chunks of K/2 and K/4, against the same sequential runs, in a child process started with
    ``--xla_force_host_platform_device_count`` set to the core count (``sharded_vmap_in_child``). Diagnostics: the slowest-element penalty of a vmapped while_loop
    (Σ_steps max_k iterations / Σ_steps mean_k iterations), and the vmapped/sequential
    ratio of a plain gradient and of the inner solve alone, and the ceiling: the same ratio for
    the victim's own matrix products alone (``batched_matmul_ratio``, K batched (N, D) @ (D, C)
    products and their transposes in a dependent loop). On a CPU whose cores are already busy
    with one run's products that ceiling is about 1, and no vmapped engine can beat it.

(c) Memory of one hypergradient ∇_x l(θ(x), θ*) with implicit differentiation (the
    library's ``bilevel.hypergradient``, both backends) against unrolled differentiation
    (the same ``jaxopt.LBFGS`` with ``implicit_diff=False``, not vmapped), at N = 100 and
    N = 1000 inner iterations, forced with tol = 0 (jaxopt, unrolled) or tol = 1e-300
    (the library's InnerConfig requires tol > 0; float64 gradients never get that small)
    and maxiter = N. Memory is XLA's static buffer assignment of the compiled program:
    ``jax.jit(f).lower(*args).compile().memory_analysis()``, reported as
    argument + output + temp − alias bytes. (The ``peak_memory_in_bytes`` field is kept in
    the JSON only: on the CPU backend it stayed near 1.4 MiB while the temp buffers of the
    unrolled program reached GiBs, so it does not measure them.) Expected: implicit is flat in N (ratio 1000/100 ≤ 1.1), unrolled grows (≥ 2).
    The unrolled gradient is compiled and analysed at both N, and run and timed only
    where N ≤ 100 and its buffers fit comfortably in free memory. (Observed with jaxopt
    0.8.5: once the unrolled iterations near convergence, the gradient through its zoom
    line search comes out NaN; with linesearch="backtracking" it stays finite. That does
    not affect the memory figures.)

Command (from the repository root; 8-9 minutes on a 2-core CPU, no GPU):

    python benchmarks/bilevel.py [--quick] [--only a|b|c] [--json PATH]

``--quick`` is a smoke run: the jaxopt backend and the affine victim only, 20 images,
K = 4 with 3 steps, N = 5 and 20, 3 repeats. It takes about 2 minutes on the same
machine, almost all of it XLA compilation (the unrolled gradient alone compiles for ~15 s
whatever N), which smaller sizes do not shorten. A summary table at the end lists each
ratio with its target and PASS/MISS, and the command, machine, versions and date. The
1-minute load average is printed at the start and the end: timings taken while other
processes use the CPUs are slower and noisier (the memory figures are not affected).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import warnings
from functools import partial

import subprocess
import tempfile

import jax
import jax.numpy as jnp

warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jaxopt.*")  # archived-project notice
import jaxopt  # noqa: E402
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from recon_jax import batching, bilevel, data
from recon_jax.initialisation import initial_images, parse_init
from recon_jax.models import MLP, count_params, init_params
from recon_jax.objectives import make_objective
from recon_jax.precision import enable_float64
from recon_jax.solvers import InnerConfig, make_argmin, probed
from recon_jax.training import TrainConfig, train_victim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/timing.py
from timing import (  # noqa: E402
    Stopwatch,
    block,
    load_average,
    load_text,
    machine_is_busy,
    median_paired_difference,
    median_seconds,
    timed,
)

# MNIST comes from the data lookup (RECON_JAX_DATA, a local cache, or tfds): no machine paths here.
MNIST = os.environ.get("RECON_JAX_BENCH_DATASET", "mnist")
IMAGE_SHAPE = (28, 28, 1)
WEIGHT_DECAY = 1e-3
LEARNING_RATE = 0.01
INIT = "gaussian:0.1"
BACKENDS = ("jaxopt", "custom_vjp")

TARGET_STEP_IN_GRADS = 10.0  # (a) affine: one outer step ≤ 10 gradient evaluations
TARGET_STEP_IN_GRADS_GELU = 30.0  # (a) 784-256-10 gelu: ≤ 30
EXACT = InnerConfig(tol=1e-12, cg_tol=1e-12, maxiter=2000, cg_maxiter=2000, cg_ridge=0.0)
TRACKING_ERROR = 0.1  # (a) an amortized hypergradient off by more than this (relative) has lost θ(x)
TARGET_VMAP_RATIO = 0.5  # (b) vmapped K=64 time ≤ half of 64 sequential runs
TARGET_IMPLICIT_GROWTH = 1.1  # (c) implicit memory at 1000 / at 100 iterations: flat
TARGET_UNROLLED_GROWTH = 2.0  # (c) unrolled memory at 1000 / at 100: grows

# Sizes per mode. (a) victims: hidden_a (() = affine) on 10 × n_per_class_a images; (b) K
# initialisations × steps_b outer steps; (c) the two inner-iteration counts compared.
SIZES = {
    "default": dict(
        backends=BACKENDS, hidden_a=((), (256,)), n_per_class_a=10, warm_steps=20, loose_tol=1e-6,
        step_repeats_affine=20, step_repeats_hidden=7, grad_repeats=200, piece_repeats=7,
        n_per_class_b=2, k_inits=64, steps_b=20, exec_repeats_b=2, diagnostics_b=True, backends_b=("jaxopt",),
        n_per_class_c=10, iterations_c=(100, 1000), error_steps=(10, 100, 500), profile=False, scan_steps=50),
    # --quick: only the library's default backend and the affine victim; tiny sizes. The
    # time is almost all XLA compilation, which sizes barely change.
    "quick": dict(
        backends=("jaxopt",), hidden_a=((),), n_per_class_a=2, warm_steps=5, loose_tol=1e-6,
        step_repeats_affine=3, step_repeats_hidden=3, grad_repeats=20, piece_repeats=3,
        n_per_class_b=2, k_inits=4, steps_b=3, exec_repeats_b=1, diagnostics_b=False, backends_b=(),
        n_per_class_c=2, iterations_c=(5, 20), error_steps=(10, 30), profile=False, scan_steps=10),
}


# --------------------------------------------------------------------------- helpers


def section(title: str) -> None:
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}", flush=True)


_VICTIMS: dict = {}


def load_victim(n_per_class: int, hidden: tuple[int, ...]) -> dict:
    """Train a victim to a certified stationary point on n_per_class × 10 MNIST images (cached)."""
    if (n_per_class, hidden) in _VICTIMS:
        return _VICTIMS[n_per_class, hidden]
    victim_data = data.select(data.load_dataset(MNIST), n_per_class=n_per_class, seed=0)
    images = jnp.asarray(victim_data.train_centered(), jnp.float64)
    labels = jnp.asarray(victim_data.train.labels)
    model = MLP(n_out=10, hidden=hidden, activation="gelu")
    params0 = init_params(model, jax.random.key(0), IMAGE_SHAPE, jnp.float64)
    victim_params, report = train_victim(model, params0, images, labels,
                                         TrainConfig(loss="ce", weight_decay=WEIGHT_DECAY))
    objective = make_objective(model.apply, "ce", WEIGHT_DECAY)
    problem = bilevel.Problem(victim_params=victim_params, labels=labels, objective=objective, convex=not hidden)
    name = "affine 784-10" if not hidden else f"gelu 784-{'-'.join(map(str, hidden))}-10"
    print(f"victim {name}: {len(labels)} images, {count_params(victim_params)} parameters, "
          f"trained in {report.iterations} L-BFGS iterations, ||grad L|| = {report.grad_norm:.1e} "
          f"(stationary: {report.stationary})", flush=True)
    victim = dict(name=name, hidden=hidden, images=images, labels=labels, problem=problem, objective=objective,
                  n_params=count_params(victim_params), stationary=report.stationary)
    _VICTIMS[n_per_class, hidden] = victim
    return victim


def initial_guesses(k: int, labels) -> jax.Array:
    """x₀ (K, N, 28, 28, 1) from gaussian:0.1, as ``recon-jax reconstruct`` draws them."""
    return jnp.asarray(initial_images(parse_init(INIT), k, np.asarray(labels), IMAGE_SHAPE, seed=0,
                                      dtype=np.float64))


def scalar_hyper(k: int | None = None) -> bilevel.Hyper:
    full = (lambda v: jnp.asarray(v, jnp.float64)) if k is None else (lambda v: jnp.full(k, v, jnp.float64))
    return bilevel.Hyper(learning_rate=full(LEARNING_RATE), box_weight=full(0.0), tv_weight=full(0.0))


def count_cg_iterations(matvec, b, x0, *, tol: float, maxiter: int):
    """Iterations plain CG needs on A x = b from x0, stopping as ``jax.scipy.sparse.linalg.cg``
    does (‖r‖ ≤ tol ‖b‖, or maxiter). The library calls that cg, which does not report its
    iteration count, so this mirrors it to count. Returns (iterations, ‖r‖/‖b‖)."""
    b_flat, unravel = ravel_pytree(b)
    apply = lambda v: ravel_pytree(matvec(unravel(v)))[0]
    x = ravel_pytree(x0)[0]
    r = b_flat - apply(x)
    threshold = (tol * jnp.linalg.norm(b_flat)) ** 2

    def cond(carry):
        _, r, _, gamma, k = carry
        return (gamma > threshold) & (k < maxiter)

    def body(carry):
        x, r, p, gamma, k = carry
        ap = apply(p)
        alpha = gamma / jnp.vdot(p, ap)
        x, r = x + alpha * p, r - alpha * ap
        gamma_new = jnp.vdot(r, r)
        return x, r, r + (gamma_new / gamma) * p, gamma_new, k + 1

    _, r, _, _, k = lax.while_loop(cond, body, (x, r, r, jnp.vdot(r, r), 0))
    return k, jnp.linalg.norm(r) / jnp.linalg.norm(b_flat)


@contextlib.contextmanager
def cg_iteration_counter(counts: list):
    """Within this block, every ``jax.scipy.sparse.linalg.cg`` call — the adjoint solve of both
    backends goes through it (jaxopt's ``solve_cg`` too) — also counts, with
    ``count_cg_iterations``, the iterations it needs from the x0 it was handed, and appends
    that number to ``counts`` when the compiled program runs. Only programs traced inside
    the block are instrumented; the library is not modified, and the count is not timed."""
    module = jax.scipy.sparse.linalg
    original = module.cg

    def cg(A, b, x0=None, *, tol=1e-5, atol=0.0, maxiter=None, M=None):
        if atol == 0.0 and M is None:  # the stopping rule count_cg_iterations mirrors
            start = x0 if x0 is not None else jax.tree_util.tree_map(jnp.zeros_like, b)
            cap = maxiter if maxiter is not None else 10 * ravel_pytree(b)[0].size  # jax's default
            iterations, _ = count_cg_iterations(A, b, start, tol=tol, maxiter=cap)
            jax.debug.callback(lambda k: counts.append(int(k)), iterations)
        return original(A, b, x0=x0, tol=tol, atol=atol, maxiter=maxiter, M=M)

    module.cg = cg
    try:
        yield counts
    finally:
        module.cg = original


# --------------------------------------------------------------------------- (a)


def in_loop_gradient_seconds(objective, params, images, labels, n: int = 50, repeats: int = 5) -> float:
    """Cost of one gradient inside a compiled loop (no per-call dispatch): n chained
    gradient steps in one ``fori_loop``, divided by n. Each step uses the previous
    result, so XLA cannot drop or merge them."""
    def many_gradients(params, images, labels):
        step = lambda _, p: jax.tree_util.tree_map(lambda a, g: a - 1e-6 * g, p, jax.grad(objective)(p, images, labels))
        return lax.fori_loop(0, n, step, params)

    return median_seconds(jax.jit(many_gradients), params, images, labels, repeats=repeats) / n


def profile_step(victim: dict, inner: InnerConfig, state: bilevel.OuterState, grad_seconds: float,
                 repeats: int) -> dict:
    """Time the pieces of one outer step separately (record_cg_residual off), in gradient units."""
    problem, labels = victim["problem"], victim["labels"]
    argmin = make_argmin(problem.objective, inner)
    zeros_like = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)

    # 1. The inner solve alone, warm-started exactly as outer_step starts it.
    inner_solve = jax.jit(lambda prob, s: argmin(s.inner_params, s.images, prob.labels,
                                                 zeros_like(s.inner_params), s.adjoint))
    solution, info = inner_solve(problem, state)

    # 2. The backward pass (adjoint CG + one VJP through ∇_θL), as the difference between
    #    the forward+backward hypergradient and the forward alone (timed in interleaved
    #    pairs), from the same warm starts.
    #    (Timing the pullback directly would mean returning jax.vjp's closure from jit, which
    #    jaxopt's custom_root does not allow: its residuals leak tracers.)
    def outer_loss(prob, s, images, probe):
        params, _ = argmin(s.inner_params, images, prob.labels, probe, s.adjoint)
        return bilevel.parameter_loss("l2", params, prob.victim_params)

    forward_backward = jax.jit(lambda prob, s: jax.grad(partial(outer_loss, prob, s), argnums=(0, 1))(
        s.images, zeros_like(s.inner_params)))
    backward_seconds, forward_backward_seconds, inner_seconds = median_paired_difference(
        forward_backward, inner_solve, problem, state, repeats=repeats)

    # 3. One Hessian-vector product at the inner solution (what each CG iteration costs).
    def hvp(prob, params, vector, images):
        return jax.jvp(lambda p: jax.grad(prob.objective)(p, images, prob.labels), (params,), (vector,))[1]

    hvp_jit = jax.jit(hvp)
    hvp_seconds = median_seconds(hvp_jit, problem, solution, state.adjoint, state.images, repeats=max(repeats, 20))

    # 4. CG iterations of the adjoint solve. "as run": counted on the very call the library
    #    makes, with the x0 it passes (instrumented, see cg_iteration_counter). For
    #    comparison, the same system from the correctly signed warm start and cold. The
    #    systems: custom_vjp solves (H + ρI) v = g, g = ∂l/∂θ, so its warm start is
    #    +state.adjoint (the previous v); jaxopt's root_vjp solves (H + ρI) u = −g, u = −v,
    #    so its warm start must be −state.adjoint.
    with cg_iteration_counter([]) as as_run_counts:
        instrumented = jax.jit(lambda prob, s: jax.grad(partial(outer_loss, prob, s), argnums=(0, 1))(
            s.images, zeros_like(s.inner_params)))
        block(instrumented(problem, state))
        jax.effects_barrier()

    @jax.jit
    def cg_counts(prob, params, s):
        g = jax.grad(lambda p: bilevel.parameter_loss("l2", p, prob.victim_params))(params)
        op = lambda v: jax.tree_util.tree_map(lambda a, b: a + inner.cg_ridge * b,
                                              hvp(prob, params, v, s.images), v)
        count = partial(count_cg_iterations, op, tol=inner.cg_tol, maxiter=inner.cg_maxiter)
        sign = -1.0 if inner.backend == "jaxopt" else 1.0
        signed = lambda tree: jax.tree_util.tree_map(lambda a: sign * a, tree)
        return {"correct_sign_warm": count(signed(g), signed(s.adjoint)), "cold": count(g, zeros_like(s.adjoint))}

    counts = jax.tree_util.tree_map(np.asarray, cg_counts(problem, solution, state))

    result = {
        "inner_solve_grads": inner_seconds / grad_seconds,
        "inner_iterations": int(info.iterations),
        "backward_grads": backward_seconds / grad_seconds,
        "forward_backward_grads": forward_backward_seconds / grad_seconds,
        "hvp_grads": hvp_seconds / grad_seconds,
        "cg_iterations": {"as_run": as_run_counts[0] if len(as_run_counts) == 1 else as_run_counts,
                          **{k: int(v[0]) for k, v in counts.items()}},
        "cg_final_relative_residual": {k: float(v[1]) for k, v in counts.items()},
    }

    # jaxopt reports how many value-and-gradient evaluations its line search made.
    if inner.backend == "jaxopt":
        solver = jaxopt.LBFGS(fun=probed(problem.objective), tol=inner.tol, maxiter=inner.maxiter,
                              history_size=inner.history_size, jit=True)
        run = jax.jit(lambda prob, s: solver.run(s.inner_params, s.images, prob.labels,
                                                 zeros_like(s.inner_params))[1])
        solver_state = run(problem, state)
        result["inner_grad_evaluations"] = int(solver_state.num_grad_eval)
        result["inner_fun_evaluations"] = int(solver_state.num_fun_eval)
    return result


def benchmark_step_cost(victim: dict, sizes: dict, repeats: int) -> dict:
    """(a) for one victim: every backend × record_cg_residual, then the profile."""
    problem, images, labels = victim["problem"], victim["images"], victim["labels"]
    grad = jax.jit(jax.grad(victim["objective"]))
    grad_seconds = median_seconds(grad, problem.victim_params, images, labels, repeats=sizes["grad_repeats"])
    loop_seconds = in_loop_gradient_seconds(victim["objective"], problem.victim_params, images, labels)
    print(f"\n[{victim['name']}] unit G = one jitted full-batch gradient call: {grad_seconds * 1e3:.3f} ms "
          f"(inside a compiled loop one gradient costs {loop_seconds * 1e3:.3f} ms = {loop_seconds / grad_seconds:.2f} G; "
          f"the rest of G is per-call dispatch)", flush=True)
    hyper = scalar_hyper()
    x0 = initial_guesses(1, labels)[0]
    out = {"victim": victim["name"], "n_images": int(len(labels)), "n_params": victim["n_params"],
           "grad_ms": grad_seconds * 1e3, "grad_in_loop_ms": loop_seconds * 1e3, "steps": {}, "profile": {}}
    out["amortized"] = benchmark_amortized(victim, sizes, grad_seconds, repeats)
    print(f"  implicit engine (for comparison):\n"
          f"  {'backend':<11} {'record_cg':>9} {'tol, cg_tol':>11} {'step ms':>9} {'step / G':>9} {'inner it':>9} "
          f"{'warm-up mean it':>16} {'cg residual':>12}")
    for backend in sizes["backends"]:
        inner = InnerConfig(backend=backend).resolved(np.float64)
        # The warm-up does not depend on record_cg_residual (it only adds a diagnostic),
        # so both variants are timed on the same state.
        warm_config = bilevel.BilevelConfig(inner=inner, engine="implicit")
        state = bilevel.init_state(warm_config, problem, x0)
        warm_run = jax.jit(partial(bilevel.run_steps, warm_config), static_argnums=3)
        state, history = block(warm_run(problem, hyper, state, sizes["warm_steps"]))
        warm_mean_iterations = float(np.mean(history["inner_iterations"]))
        variants = [(True, inner), (False, inner)]
        if not victim["hidden"]:
            # For information only (not a target): the same step with looser tolerances, to
            # show how much of the cost is the tight default tolerances (looser inner and CG
            # tolerances trade hypergradient accuracy for speed: the error is bounded by them).
            variants.append((False, dataclasses.replace(inner, tol=sizes["loose_tol"], cg_tol=sizes["loose_tol"])))
        for record, step_inner in variants:
            config = bilevel.BilevelConfig(inner=step_inner, record_cg_residual=record, engine="implicit")
            step = jax.jit(partial(bilevel.outer_step, config))
            step_seconds = median_seconds(step, problem, hyper, state, repeats=repeats)
            _, step_record = step(problem, hyper, state)
            row = {"step_ms": step_seconds * 1e3, "step_grads": step_seconds / grad_seconds,
                   "inner_iterations": int(step_record["inner_iterations"]),
                   "warmup_mean_inner_iterations": warm_mean_iterations,
                   "cg_residual": float(step_record["cg_residual"])}
            key = f"{backend}/record_cg={record}"
            if step_inner != inner:
                key += f"/tol={step_inner.tol:g}"
            out["steps"][key] = row
            tolerances = f"{step_inner.tol:g}, {step_inner.cg_tol:g}"
            print(f"  {backend:<11} {str(record):>9} {tolerances:>11} {row['step_ms']:9.2f} {row['step_grads']:9.1f} "
                  f"{row['inner_iterations']:9d} {warm_mean_iterations:16.1f} {row['cg_residual']:12.2e}", flush=True)
        if sizes["profile"]:
            out["profile"][backend] = profile_step(victim, inner.resolved(np.float64), state, grad_seconds,
                                                   sizes["piece_repeats"])
    if out["profile"]:
        print(f"  profile of the implicit engine (record_cg_residual=False), in units of G = {grad_seconds * 1e3:.3f} ms:")
    for backend, p in out["profile"].items():
        evals = ""
        if "inner_grad_evaluations" in p:  # what those evaluations alone would cost, at the in-loop price
            evals = (f", {p['inner_grad_evaluations']} value+grad evaluations = "
                     f"{p['inner_grad_evaluations'] * loop_seconds / grad_seconds:.1f} G at the in-loop price")
        cg = p["cg_iterations"]
        print(f"    {backend:<11} inner solve {p['inner_solve_grads']:7.1f} G ({p['inner_iterations']} iterations{evals})"
              f" | backward (CG + VJP) {p['backward_grads']:7.1f} G | both {p['forward_backward_grads']:7.1f} G"
              f" | one HVP {p['hvp_grads']:5.2f} G\n"
              f"    {'':<11} adjoint CG iterations: {cg['as_run']} as the library runs it (instrumented), "
              f"{cg['correct_sign_warm']} from the correctly signed warm start, {cg['cold']} cold "
              f"(cap {InnerConfig().cg_maxiter})", flush=True)
    return out


def benchmark_amortized(victim: dict, sizes: dict, grad_seconds: float, repeats: int) -> dict:
    """(a) for the amortized engine: the cost of one step (median, in G) from a state that has run
    ``warm_steps`` steps, the cost of one refresh (also in G, spread over ``refresh_every``
    steps), and the relative error of the hypergradient the engine computes from its carried
    θ and v against the exact one at the same images (inner solve, from the carried θ, and CG to
    1e-12), at steps
    ``error_steps`` of a gaussian:0.1 run. The engine refreshes at steps 0, 100, 200, ...; the
    errors here are those of the carried state before any refresh at that step (its worst case).
    """
    problem, labels = victim["problem"], victim["labels"]
    config = bilevel.BilevelConfig(engine="amortized")  # what "auto" runs, for both victims
    hyper = scalar_hyper()
    x0 = initial_guesses(1, labels)[0]
    run = jax.jit(partial(bilevel.run_steps, config), static_argnums=3)
    state, history = block(run(problem, hyper, bilevel.init_state(config, problem, x0), sizes["warm_steps"]))
    step = jax.jit(partial(bilevel.outer_step, config))
    step_seconds = median_seconds(step, problem, hyper, state, repeats=repeats)
    refresh = jax.jit(partial(bilevel.refresh, config))
    refresh_seconds = median_seconds(refresh, problem, state, repeats=max(3, repeats // 3))
    per_step = step_seconds + refresh_seconds / config.refresh_every
    # The same step as runs execute it: inside run_steps' lax.scan (steps 1..n, no refresh among
    # them), so without the per-call dispatch that the single jitted call above pays.
    n_scan = sizes["scan_steps"]
    scan = jax.jit(lambda prob, h, s: bilevel.run_steps(config, prob, h, s, n_scan, 1))
    scan_seconds = median_seconds(scan, problem, hyper, state, repeats=max(3, repeats // 4)) / n_scan
    # Side by side from the same state: the step with the other product precision (float64
    # products against float32 ones, ``BilevelConfig.product_precision``).
    other = dataclasses.replace(config, product_precision="full" if config.product_precision == "float32" else "float32")
    other_seconds = median_seconds(jax.jit(partial(bilevel.outer_step, other)), problem, hyper, state, repeats=repeats)
    other_scan = jax.jit(lambda prob, h, s: bilevel.run_steps(other, prob, h, s, n_scan, 1))
    other_scan_seconds = median_seconds(other_scan, problem, hyper, state, repeats=max(3, repeats // 4)) / n_scan
    counted = config.cost_per_step()
    result = {"step_ms": step_seconds * 1e3, "step_grads": step_seconds / grad_seconds,
              "in_scan_step_grads": scan_seconds / grad_seconds,
              "in_scan_gradient_equivalents": (scan_seconds + refresh_seconds / config.refresh_every) / grad_seconds,
              "refresh_grads": refresh_seconds / grad_seconds, "gradient_equivalents": per_step / grad_seconds,
              "counted_per_step": counted, "budgets": {"newton_steps": config.newton_steps,
                                                       "newton_cg": config.newton_cg, "adjoint_cg": config.adjoint_cg,
                                                       "refresh_every": config.refresh_every,
                                                       "product_precision": config.product_precision},
              "other_precision": {"product_precision": other.product_precision,
                                  "step_grads": other_seconds / grad_seconds,
                                  "in_scan_step_grads": other_scan_seconds / grad_seconds,
                                  "default_over_other_in_scan": scan_seconds / other_scan_seconds}}
    print(f"  amortized engine (default budgets: {config.newton_steps} Newton step x {config.newton_cg} CG + "
          f"{config.adjoint_cg} adjoint CG; refresh every {config.refresh_every}): step {step_seconds * 1e3:.2f} ms "
          f"= {result['step_grads']:.1f} G, refresh {result['refresh_grads']:.1f} G, amortized per step "
          f"{result['gradient_equivalents']:.1f} G  (counted: {counted['gradients']} gradients + {counted['hvps']} "
          f"products); inside a {n_scan}-step scan {result['in_scan_step_grads']:.1f} G a step, "
          f"{result['in_scan_gradient_equivalents']:.1f} G with the refresh\n"
          f"  the same step with product_precision={other.product_precision!r}: {result['other_precision']['step_grads']:.1f} G, "
          f"in the scan {result['other_precision']['in_scan_step_grads']:.1f} G "
          f"(default / other, in the scan: {result['other_precision']['default_over_other_in_scan']:.2f})", flush=True)

    exact_config = bilevel.BilevelConfig(engine="implicit", inner=EXACT)
    # The exact hypergradient of the branch θ(x) the run follows: the inner solve starts from the
    # carried θ. For a convex inner problem (affine) the start does not matter; for a hidden
    # layer θ(x) is a branch of local minimisers, and a solve from θ* can land on another branch
    # (for 784-256-10 from noise it did, and the comparison then measured the distance between
    # two branches' hypergradients, 0.2-1 relative, not the amortisation's error).
    exact = jax.jit(lambda images, start: bilevel.hypergradient(exact_config, problem, images, start)[1])
    amortized = jax.jit(partial(bilevel.amortized_hypergradient, config))
    state, done, errors = bilevel.init_state(config, problem, x0), 0, {}
    for target in sizes["error_steps"]:
        state, _ = block(run(problem, hyper, state, target - done, done))
        done = target
        approximate = amortized(problem, hyper, state)[1]
        reference = exact(state.images, state.inner_params)
        errors[str(target)] = float(jnp.linalg.norm(approximate - reference) / jnp.linalg.norm(reference))
    result["hypergradient_relative_error"] = errors
    print("  amortized hypergradient vs exact (inner solve from the carried theta and CG to 1e-12), relative error: "
          + ", ".join(f"step {k}: {v:.1e}" for k, v in errors.items()), flush=True)
    return result


# --------------------------------------------------------------------------- (b)


def vmap_setting(sizes: dict):
    """(b)'s problem: (victim, x0 (K, N, 28, 28, 1), hyper (K,)) for the affine victim."""
    victim = load_victim(sizes["n_per_class_b"], ())
    k = sizes["k_inits"]
    return victim, initial_guesses(k, victim["labels"]), scalar_hyper(k)


def single_run_functions(config: bilevel.BilevelConfig, problem: bilevel.Problem, steps: int):
    """The single-initialisation (init, run, finish) that ``run_batched`` vmaps, and ``single``:
    one whole run (init → ``steps`` steps → evaluate) as one jitted program, the sequential baseline."""
    init = lambda x, h: bilevel.init_state(config, problem, x)
    run = lambda s, h, n, i=0: bilevel.run_steps(config, problem, h, s, n, i)
    finish = lambda s, h: bilevel.evaluate(config, problem, s)

    @jax.jit
    def single(x, h):
        final_state, _ = run(init(x, h), h, steps)
        return final_state, finish(final_state, h)

    return init, run, finish, single


def benchmark_vmap(sizes: dict) -> dict:
    """(b): K vmapped initialisations in one run_batched call vs K sequential single runs."""
    victim, x0, hyper = vmap_setting(sizes)
    problem, labels = victim["problem"], victim["labels"]
    k, steps = sizes["k_inits"], sizes["steps_b"]
    out = {"victim": victim["name"], "n_images": int(len(labels)), "k_inits": k, "steps": steps, "backends": {}}
    variants = [("amortized", bilevel.BilevelConfig(steps=steps, engine="amortized"))]
    variants += [(f"implicit/{backend}", bilevel.BilevelConfig(steps=steps, engine="implicit",
                                                               inner=InnerConfig(backend=backend)))
                 for backend in sizes["backends_b"]]
    for backend, config in variants:
        init, run, finish, single = single_run_functions(config, problem, steps)

        # One run_batched call: its wall time includes tracing and compiling its programs.
        (states, history, final), batched_call_seconds = timed(
            lambda: batching.run_batched(init, run, finish, x0, hyper, steps=steps, chunk_size=k, devices=1))

        # The programs run_batched executes on one device (``batching.batched_program``),
        # compiled ahead of time so that their execution is timed on its own. A K=64 execution
        # varies by ±15 % between calls on this machine, hence the median over a few.
        where = batching.placement(1)
        program = batching.batched_program(init, run, finish, where)
        xs, hs = where.put(x0), where.put(hyper)
        with Stopwatch() as clock:
            first_state = block(program.init(xs, hs))
            run_compiled = program.run.lower(first_state, hs, steps, 0).compile()
            finish_compiled = program.finish.lower(first_state, hs).compile()
        vmapped_compile_seconds = clock.seconds
        vmapped_seconds = median_seconds(lambda: finish_compiled(run_compiled(program.init(xs, hs), hs, 0)[0], hs),
                                         repeats=sizes["exec_repeats_b"], warmup=False)

        # Sequential: one single-initialisation program, compiled once, called K times.
        one_hyper = jax.tree_util.tree_map(lambda a: a[0], hyper)
        _, single_compile_seconds = timed(single, x0[0], one_hyper)
        sequential_times = []
        for _ in range(sizes["exec_repeats_b"]):
            sequential, seconds = timed(lambda: [block(single(x0[i], one_hyper)) for i in range(k)])
            sequential_times.append(seconds)
        sequential_seconds = statistics.median(sequential_times)

        # vmap must not change the answer (up to floating-point reassociation).
        sequential_loss = np.array([s[1]["outer_loss"] for s in sequential])
        max_loss_difference = float(np.max(np.abs(sequential_loss - final["outer_loss"])))

        # Diagnostics: a vmapped while_loop runs until its slowest element stops.
        iterations = np.asarray(history["inner_iterations"])  # (K, steps)
        slowest_penalty = float(iterations.max(axis=0).sum() / iterations.mean(axis=0).sum())
        diagnostics = (vmap_diagnostics(victim, config.inner, x0, sizes["piece_repeats"])
                       if sizes["diagnostics_b"] and config.engine == "implicit" else {})

        row = {"run_batched_call_s": batched_call_seconds,
               "vmapped_compile_s": vmapped_compile_seconds,
               "vmapped_execution_s": vmapped_seconds,
               "sequential_s": sequential_seconds, "sequential_compile_s": single_compile_seconds,
               "ratio_execution": vmapped_seconds / sequential_seconds,
               "ratio_with_compile": batched_call_seconds / (sequential_seconds + single_compile_seconds),
               "max_final_loss_difference": max_loss_difference,
               "inner_iterations_mean": float(iterations.mean()), "inner_iterations_max": int(iterations.max()),
               "slowest_element_penalty": slowest_penalty, **diagnostics}
        out["backends"][backend] = row
        if backend == "amortized":
            out["vmapped_over_sequential"] = row["ratio_execution"]
            sharded = sharded_vmap_in_child(sizes)
            if sharded:
                row.update(sharded)
                out["sharded_over_sequential"] = row["ratio_sharded"]
        print(f"\n[{backend}] K={k}, {steps} outer steps, {len(labels)} images\n"
              f"  run_batched call (incl. its compile): {batched_call_seconds:8.2f} s\n"
              f"  vmapped programs, execution only:     {vmapped_seconds:8.2f} s   "
              f"(their compile, done ahead: {vmapped_compile_seconds:.2f} s)\n"
              f"  {k} sequential single runs:            {sequential_seconds:8.2f} s   "
              f"(+ {single_compile_seconds:.2f} s for the one compile)\n"
              f"  vmapped / sequential: {row['ratio_execution']:.2f} (execution only), "
              f"{row['ratio_with_compile']:.2f} (each including one compile)   target <= {TARGET_VMAP_RATIO}\n"
              + (f"  sharded over {row['sharded_devices']} CPU devices (one per core, in a child process), execution "
                 f"only: {row['sharded_execution_s']:.2f} s against {row['sharded_sequential_s']:.2f} s sequential there, "
                 f"ratio {row['ratio_sharded']:.2f}; in chunks of "
                 + ", ".join(f"{c}: {r:.2f}" for c, r in row["ratio_sharded_by_chunk"].items()) + "\n"
                 if "ratio_sharded" in row else "") +
              f"  max |final outer loss vmapped - sequential| = {max_loss_difference:.1e}\n"
              f"  inner iterations per step: mean {row['inner_iterations_mean']:.1f}, max {row['inner_iterations_max']}; "
              f"slowest-element penalty (sum of per-step max / mean) {slowest_penalty:.2f}", flush=True)
        if diagnostics:
            print(f"  vmapped/sequential for the pieces: full-batch gradient {diagnostics['gradient_ratio']:.2f}, "
                  f"inner solve alone (from theta*, at x0) {diagnostics['inner_solve_ratio']:.2f} "
                  f"({diagnostics['inner_solve_vmapped_s']:.2f} s vs {diagnostics['inner_solve_sequential_s']:.2f} s)",
                  flush=True)
    # The ceiling for any vmapped engine on this machine: the model's own matrix products,
    # batched over K against K sequential, in a compiled loop whose steps depend on each other.
    shape = (k, len(labels), int(np.prod(victim["images"].shape[1:])), int(problem.labels.max()) + 1)
    out["batched_matmul_ratio"] = batched_matmul_ratio(*shape, repeats=sizes["exec_repeats_b"] + 1)
    print(f"\n  ceiling: K={k} batched matrix products (N, D) @ (D, C) and back, {shape[1:]}, vmapped / "
          f"sequential = {out['batched_matmul_ratio']:.2f} (a vmapped step cannot do better than its products)",
          flush=True)
    return out


def sharded_vmap(sizes: dict) -> dict:
    """(b) with the batch sharded over every local device (``batching.placement``, as
    ``--devices`` runs it: ``jit(shard_map(vmap(f)))``) against the same K sequential single runs
    on the first device, both timed in this process. Execution only (each program compiled by a
    first call). The whole batch in one chunk (what ``run_batched`` does when K fits in memory),
    and for comparison in chunks of K/2 and K/4 run one after another, as ``--chunk-size`` does."""
    victim, x0, hyper = vmap_setting(sizes)
    k, steps = sizes["k_inits"], sizes["steps_b"]
    config = bilevel.BilevelConfig(steps=steps, engine="amortized")
    init, run, finish, single = single_run_functions(config, victim["problem"], steps)
    where = batching.placement()
    program = batching.batched_program(init, run, finish, where)
    one_hyper = jax.tree_util.tree_map(lambda a: a[0], hyper)
    repeats = sizes["exec_repeats_b"] + 1
    block(single(x0[0], one_hyper))
    sequential_seconds = median_seconds(lambda: [block(single(x0[i], one_hyper)) for i in range(k)],
                                        repeats=repeats, warmup=False)
    chunk_seconds = {}
    for chunk in sorted({k, where.round_up(max(1, k // 2)), where.round_up(max(1, k // 4))}, reverse=True):
        pieces = [(where.put(x0[i:i + chunk]), where.put(jax.tree_util.tree_map(lambda a: a[i:i + chunk], hyper)))
                  for i in range(0, k, chunk)]
        sharded = lambda: [program.finish(program.run(program.init(xs, hs), hs, steps, 0)[0], hs) for xs, hs in pieces]
        block(sharded())
        chunk_seconds[chunk] = median_seconds(lambda: block(sharded()), repeats=repeats, warmup=False)
    return {"sharded_devices": where.n_devices, "sharded_execution_s": chunk_seconds[k],
            "sharded_sequential_s": sequential_seconds, "ratio_sharded": chunk_seconds[k] / sequential_seconds,
            "ratio_sharded_by_chunk": {str(c): t / sequential_seconds for c, t in chunk_seconds.items()}}


def sharded_vmap_in_child(sizes: dict) -> dict:
    """``sharded_vmap`` in a fresh process with one XLA CPU device per core: XLA:CPU splits the
    host into devices only when told before JAX starts, and doing that here would slow the
    per-call dispatch that (a) times (measured: the affine step 1.95 ms on one device, 2.86 ms
    with two). {} on a one-core host or where the child fails (its output is printed)."""
    cores = os.cpu_count() or 1
    if cores < 2:
        return {}
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                       f" --xla_force_host_platform_device_count={cores}").strip()}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "sharded.json")
        command = [sys.executable, os.path.abspath(__file__), "--sharded-child", path]
        if sizes is SIZES["quick"]:
            command.append("--quick")
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(path):
            print(f"  (sharded measurement failed, exit status {done.returncode}:\n{done.stderr[-2000:]})", flush=True)
            return {}
        with open(path) as handle:
            return json.load(handle)


def batched_matmul_ratio(k: int, n: int, d: int, c: int, *, repeats: int, length: int = 200) -> float:
    """vmapped(K) / sequential(K) time of ``length`` dependent steps  g = Xᵀ tanh(X W),
    X (N, D), W (D, C): the forward and backward products of a dense layer, the bulk of an
    affine victim's gradient and Hessian-vector products. The carry feeds every step, so
    XLA cannot hoist the products out of the loop."""
    x = jax.random.normal(jax.random.key(0), (k, n, d))
    w = jax.random.normal(jax.random.key(1), (k, d, c))

    def chain(x, w):
        def body(carry, _):
            g = x.T @ jnp.tanh((x + carry * 1e-30) @ w)
            return carry + 1e-30 * g.sum(), None
        return lax.scan(body, jnp.zeros((), x.dtype), None, length=length)[0]

    batched, single = jax.jit(jax.vmap(chain)), jax.jit(chain)
    block(batched(x, w)), block(single(x[0], w[0]))
    vmapped = median_seconds(batched, x, w, repeats=repeats)
    sequential = median_seconds(lambda: [block(single(x[i], w[i])) for i in range(k)], repeats=repeats)
    return vmapped / sequential


def vmap_diagnostics(victim: dict, inner: InnerConfig, x0, repeats: int) -> dict:
    """vmapped(K)/sequential(K) time for a plain gradient and for one cold inner solve."""
    problem, labels = victim["problem"], victim["labels"]
    k = x0.shape[0]
    # Each initialisation has its own θ in a real run, so the vmapped gradient gets a batch of θ.
    noise = jax.random.normal(jax.random.key(1), (k,))
    params_k = jax.tree_util.tree_map(lambda a: a[None] * (1 + 0.01 * noise.reshape((k,) + (1,) * a.ndim)),
                                      problem.victim_params)
    grad = jax.jit(jax.grad(problem.objective))
    grad_k = jax.jit(jax.vmap(jax.grad(problem.objective), in_axes=(0, 0, None)))
    one = lambda tree, i: jax.tree_util.tree_map(lambda a: a[i], tree)
    grad_seq = median_seconds(lambda: [grad(one(params_k, i), x0[i], labels) for i in range(k)], repeats=repeats)
    grad_vmap = median_seconds(grad_k, params_k, x0, labels, repeats=repeats)

    argmin = make_argmin(problem.objective, inner)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, problem.victim_params)
    solve = lambda x: argmin(problem.victim_params, x, labels, zeros, zeros)[0]
    solve_one, solve_k = jax.jit(solve), jax.jit(jax.vmap(solve))
    solve_seq = median_seconds(lambda: [solve_one(x0[i]) for i in range(k)], repeats=max(1, repeats // 2))
    solve_vmap = median_seconds(solve_k, x0, repeats=max(1, repeats // 2))
    return {"gradient_ratio": grad_vmap / grad_seq, "inner_solve_ratio": solve_vmap / solve_seq,
            "inner_solve_sequential_s": solve_seq, "inner_solve_vmapped_s": solve_vmap}


# --------------------------------------------------------------------------- (c)


def memory_bytes(compiled) -> dict:
    """Static buffer sizes of a compiled XLA program (CompiledMemoryStats)."""
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("memory_analysis() is unavailable on this backend")
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"total": int(total), "temp": int(m.temp_size_in_bytes), "argument": int(m.argument_size_in_bytes),
            "output": int(m.output_size_in_bytes), "alias": int(m.alias_size_in_bytes),
            "xla_peak_field": int(getattr(m, "peak_memory_in_bytes", -1))}


def benchmark_memory(sizes: dict) -> dict:
    """(c): compiled memory of the implicit and the unrolled hypergradient at N iterations."""
    victim = load_victim(sizes["n_per_class_c"], ())
    problem, labels = victim["problem"], victim["labels"]
    # A candidate near the truth, where the hypergradient is well defined.
    images = victim["images"] + 0.05 * jax.random.normal(jax.random.key(1), victim["images"].shape, jnp.float64)
    free_bytes = batching.available_memory_bytes()
    out = {"victim": victim["name"], "n_images": int(len(labels)), "rows": {}}
    print(f"\n  {'method':<22} {'N':>5} {'total MiB':>10} {'temp MiB':>10} {'compile s':>10} {'run s':>8}  notes")
    implicit_gradients = {}
    for n in sizes["iterations_c"]:
        for backend in sizes["backends"]:
            config = bilevel.BilevelConfig(inner=InnerConfig(backend=backend, tol=1e-300, maxiter=n))
            hypergradient = jax.jit(partial(bilevel.hypergradient, config))
            compiled, compile_seconds = timed(lambda: hypergradient.lower(problem, images).compile())
            (_, gradient), run_seconds = timed(compiled, problem, images)
            implicit_gradients[(backend, n)] = gradient
            # Check that N iterations really ran (the tolerance cannot be met).
            argmin = make_argmin(problem.objective, config.inner)
            zeros = jax.tree_util.tree_map(jnp.zeros_like, problem.victim_params)
            info = jax.jit(lambda prob, x: argmin(prob.victim_params, x, prob.labels, zeros, zeros)[1])(problem, images)
            row = {"method": f"implicit ({backend})", "iterations": n, **memory_bytes(compiled),
                   "compile_s": compile_seconds, "run_s": run_seconds, "iterations_run": int(info.iterations)}
            out["rows"][f"implicit_{backend}_{n}"] = row
            print_memory_row(row, f"{row['iterations_run']} iterations ran")

        solver = jaxopt.LBFGS(fun=problem.objective, tol=0.0, maxiter=n, history_size=InnerConfig().history_size,
                              implicit_diff=False, jit=True)  # unroll defaults to True when implicit_diff=False

        def unrolled_outer_loss(prob, x):
            params = solver.run(prob.victim_params, x, prob.labels).params
            return bilevel.parameter_loss("l2", params, prob.victim_params)

        unrolled = jax.jit(jax.value_and_grad(unrolled_outer_loss, argnums=1))
        compiled, compile_seconds = timed(lambda: unrolled.lower(problem, images).compile())
        row = {"method": "unrolled (jaxopt)", "iterations": n, **memory_bytes(compiled), "compile_s": compile_seconds,
               "run_s": None}
        note = "compiled and analysed only"
        if n <= 100 and row["total"] < 0.5 * free_bytes:
            (_, gradient), row["run_s"] = timed(compiled, problem, images)
            reference = implicit_gradients[("jaxopt", n)]
            row["gradient_finite"] = bool(jnp.all(jnp.isfinite(gradient)))
            row["relative_difference_to_implicit"] = float(jnp.linalg.norm(gradient - reference)
                                                           / jnp.linalg.norm(reference))
            note = (f"gradient finite: {row['gradient_finite']}, "
                    f"rel. difference to implicit {row['relative_difference_to_implicit']:.1e}")
        out["rows"][f"unrolled_{n}"] = row
        print_memory_row(row, note)

    small, large = sizes["iterations_c"]
    rows = out["rows"]
    out["ratios"] = {
        **{f"implicit_{b}_growth": rows[f"implicit_{b}_{large}"]["total"] / rows[f"implicit_{b}_{small}"]["total"]
           for b in sizes["backends"]},
        "unrolled_growth": rows[f"unrolled_{large}"]["total"] / rows[f"unrolled_{small}"]["total"],
        **{f"unrolled_over_implicit_{n}": rows[f"unrolled_{n}"]["total"] / rows[f"implicit_jaxopt_{n}"]["total"]
           for n in (small, large)},
    }
    implicit_growth = ", ".join(f"implicit {b} {out['ratios'][f'implicit_{b}_growth']:.2f}" for b in sizes["backends"])
    print(f"\n  memory at N={large} / at N={small}: {implicit_growth}, unrolled {out['ratios']['unrolled_growth']:.2f}\n"
          f"  unrolled / implicit (jaxopt): {out['ratios'][f'unrolled_over_implicit_{small}']:.0f}x at N={small}, "
          f"{out['ratios'][f'unrolled_over_implicit_{large}']:.0f}x at N={large}\n"
          f"  (memory = argument + output + temp - alias of the compiled program's buffers)", flush=True)
    return out


def print_memory_row(row: dict, note: str) -> None:
    run = f"{row['run_s']:8.2f}" if row["run_s"] is not None else f"{'-':>8}"
    print(f"  {row['method']:<22} {row['iterations']:5d} {row['total'] / 2**20:10.1f} {row['temp'] / 2**20:10.1f} "
          f"{row['compile_s']:10.1f} {run}  {note}", flush=True)


# --------------------------------------------------------------------------- main


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "load_average_1_5_15min": load_average(),
            "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
            "jaxopt": importlib.metadata.version("jaxopt"), "optax": importlib.metadata.version("optax"),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}


def summary_rows(results: dict) -> list[tuple[str, float, str, str]]:
    """(what, value, target, verdict) for every ratio measured."""
    rows = []
    for name, victim in results.get("a", {}).items():
        target = TARGET_STEP_IN_GRADS_GELU if name == "gelu" else TARGET_STEP_IN_GRADS
        value = victim["gradient_equivalents"]
        # A cheap step that has lost θ(x) is no pass: the hypergradient error at the last step
        # measured must stay below TRACKING_ERROR.
        errors = victim["amortized"]["hypergradient_relative_error"]
        tracking = all(e <= TRACKING_ERROR for e in errors.values())
        verdict = ("PASS" if value <= target else "MISS") if tracking else "MISS (tracking lost)"
        rows.append((f"a  step/grad  {victim['victim']} amortized (default)", value, f"<= {target:g}", verdict))
        rows.append((f"a  step/grad  {victim['victim']} amortized, inside a scan (as runs execute it)",
                     victim["amortized"]["in_scan_gradient_equivalents"], f"<= {target:g}", "info"))
        other = victim["amortized"]["other_precision"]
        rows.append((f"a  step/grad  {victim['victim']} amortized, product_precision={other['product_precision']}",
                     other["step_grads"], "(none)", "info"))
        for step, error in victim["amortized"]["hypergradient_relative_error"].items():
            rows.append((f"a  hypergradient rel. error at step {step} {victim['victim']}", error, "(none)", "info"))
        for key, row in victim["steps"].items():
            rows.append((f"a  step/grad  {victim['victim']} implicit {key}", row["step_grads"], "(none)", "info"))
    if "b" in results:
        for backend, row in results["b"]["backends"].items():
            rows.append((f"b  vmapped/sequential {backend} (execution)", row["ratio_execution"],
                         f"<= {TARGET_VMAP_RATIO}", "PASS" if row["ratio_execution"] <= TARGET_VMAP_RATIO else "MISS"))
            rows.append((f"b  vmapped/sequential {backend} (incl. compile)", row["ratio_with_compile"],
                         f"<= {TARGET_VMAP_RATIO}", "info"))
            if "ratio_sharded" in row:
                rows.append((f"b  vmapped/sequential {backend}, sharded over {row['sharded_devices']} CPU devices",
                             row["ratio_sharded"], f"<= {TARGET_VMAP_RATIO}",
                             "PASS" if row["ratio_sharded"] <= TARGET_VMAP_RATIO else "MISS"))
                for chunk, ratio in row.get("ratio_sharded_by_chunk", {}).items():
                    if int(chunk) != results["b"]["k_inits"]:
                        rows.append((f"b    ... in chunks of {chunk}", ratio, f"<= {TARGET_VMAP_RATIO}", "info"))
    if "c" in results:
        ratios = results["c"]["ratios"]
        small, large = results["c"]["iterations"]
        for backend in [b for b in BACKENDS if f"implicit_{b}_growth" in ratios]:
            value = ratios[f"implicit_{backend}_growth"]
            rows.append((f"c  implicit ({backend}) memory N={large}/N={small}", value, f"<= {TARGET_IMPLICIT_GROWTH}",
                         "PASS" if value <= TARGET_IMPLICIT_GROWTH else "MISS"))
        value = ratios["unrolled_growth"]
        rows.append((f"c  unrolled memory N={large}/N={small}", value, f">= {TARGET_UNROLLED_GROWTH}",
                     "PASS" if value >= TARGET_UNROLLED_GROWTH else "MISS"))
        for n in (small, large):
            rows.append((f"c  unrolled/implicit memory N={n}", ratios[f"unrolled_over_implicit_{n}"], "(none)", "info"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, few repeats (~2 min)")
    parser.add_argument("--only", choices=("a", "b", "c"), help="run one part only")
    parser.add_argument("--json", metavar="PATH", help="also write all numbers as JSON to PATH")
    parser.add_argument("--sharded-child", metavar="PATH", help=argparse.SUPPRESS)  # (b)'s sharded run
    args = parser.parse_args(argv)

    enable_float64()
    sizes = SIZES["quick" if args.quick else "default"]
    if args.sharded_child:
        with open(args.sharded_child, "w") as handle:
            json.dump(sharded_vmap(sizes), handle)
        return 0
    parts = (args.only,) if args.only else ("a", "b", "c")
    info = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine(), "sizes": sizes}
    print(f"recon_jax bilevel benchmark  |  {info['date']}\ncommand: {info['command']}\n"
          f"machine: {info['machine']['cpu_count']} CPUs, {info['machine']['platform']}, jax {jax.__version__} "
          f"({info['machine']['backend']}), jaxopt {info['machine']['jaxopt']}, float64\n"
          f"load average at start (1/5/15 min): {load_text()}", flush=True)
    if machine_is_busy():
        print("WARNING: other processes are using the CPUs; timings (not memory figures) will be noisy/slow",
              flush=True)
    results: dict = {}
    seconds: dict = {}

    if "a" in parts:
        section("(a) one outer step, in units of one full-batch training-loss gradient G")
        results["a"] = {}
        with Stopwatch() as clock:
            for hidden in sizes["hidden_a"]:
                repeats = sizes["step_repeats_hidden"] if hidden else sizes["step_repeats_affine"]
                victim = load_victim(sizes["n_per_class_a"], hidden)
                row = benchmark_step_cost(victim, sizes, repeats)
                # Stable keys for scripts: a.affine.gradient_equivalents, a.gelu.gradient_equivalents.
                row["gradient_equivalents"] = row["amortized"]["gradient_equivalents"]
                results["a"]["gelu" if hidden else "affine"] = row
        seconds["a"] = clock.seconds
    if "b" in parts:
        section(f"(b) K={sizes['k_inits']} vmapped initialisations vs {sizes['k_inits']} sequential single runs")
        with Stopwatch() as clock:
            results["b"] = benchmark_vmap(sizes)
        seconds["b"] = clock.seconds
    if "c" in parts:
        section("(c) hypergradient memory: implicit vs unrolled differentiation (compiled-program analysis)")
        with Stopwatch() as clock:
            results["c"] = benchmark_memory(sizes)
        results["c"]["iterations"] = list(sizes["iterations_c"])
        seconds["c"] = clock.seconds

    section("summary")
    rows = summary_rows(results)
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'ratio':>9}  {'target':>8}  verdict")
    for what, value, target, verdict in rows:
        print(f"{what:<{width}}  {value:9.3g}  {target:>8}  {verdict}")
    print(f"\ncommand: {info['command']}\nmachine: {info['machine']['cpu_count']} CPUs, "
          f"jax {jax.__version__} / jaxlib {info['machine']['jaxlib']} on {info['machine']['backend']}, "
          f"jaxopt {info['machine']['jaxopt']}, optax {info['machine']['optax']}, python {info['machine']['python']}\n"
          f"date: {info['date']}\nload average at start {info['machine']['load_average_1_5_15min'][0]:.2f}, "
          f"at end (1/5/15 min) {load_text()}\nsection seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))

    if args.json:
        payload = {**info, "results": results, "section_seconds": seconds,
                   "summary": [dict(zip(("measurement", "ratio", "target", "verdict"), r)) for r in rows]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=float)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
