"""Benchmark of one KKT attack step at the reference shapes, and vmapped against sequential runs.

What is measured (medians over repeats, after a compiling warm-up; every result is
``jax.block_until_ready``-ed before the clock stops):

1. Time of one ``kkt.step`` (the loss L_KKT with its double backward: G = ∇_θ[(1/m) Σ λ_j φ_j],
   then ∇_(x, λ) of ‖θ* − G‖² + priors, and the SGD update) for the reference shapes of Haim
   et al. 2022: D = 3072 (32×32×3), MLP D-1000-1000-1 with bias only in the first layer,
   modified ReLU, m = 1000 candidates; in float64 and float32.
2. The achieved FLOP rate: ``kkt.flops_per_step(model, shape, m)`` (matrix-multiply FLOPs
   derived in its docstring, 14·m·P − 4·m·d₀·d₁) divided by the step time; XLA's own count
   of the compiled step is printed beside it.
3. R = 8 runs with different hyperparameters as one vmapped step against 8 sequential
   single-run steps (one compiled program called 8 times): the time ratio vmapped /
   sequential (< 1 means the batch is cheaper than the loop).

Command (from the repository root):

    python benchmarks/kkt.py [--quick] [--m 1000] [--runs 8] [--repeats 3] [--json PATH]

The full size took 2 min 23 s of wall time pinned to one core (``taskset -c 1``, XLA
single-threaded), with a peak resident memory of 2.2 GB. ``--quick`` takes about 20 s. The header
line prints the load average and the CPU seconds the process got per wall second. When
that is below 1 with one pinned single-threaded core, other jobs shared the core, and every
time is inflated by about its inverse. The figures measured on 2026-11-28 are in
benchmarks/README.md.

``--quick`` shrinks to D-256-256-1 and m = 100 for a smoke run. The victim weights are
random (the reference initialisation scaled up so activations are not all zero): the cost of
a step does not depend on what the weights are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from recon_jax import kkt
from recon_jax.models import MLP, init_params
from recon_jax.precision import enable_float64

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/timing.py
from timing import Stopwatch, load_average, median_seconds  # noqa: E402


def bench(dtype, hidden, image_shape, m, runs, repeats) -> dict:
    model = MLP(n_out=1, hidden=hidden, activation="relu", use_bias=(True,) + (False,) * len(hidden))
    params = init_params(model, jax.random.key(0), image_shape, dtype)
    labels = jnp.asarray(kkt.candidate_labels((m // 2, m // 2), m, "binary"))
    problem = kkt.Problem(victim_params=params, labels=labels, model=model)
    config = kkt.KKTConfig(task="binary")
    x0 = 1e-3 * jax.random.normal(jax.random.key(1), (m, *image_shape), dtype)
    lambdas = kkt.initial_lambdas(jax.random.key(2), m, "binary", dtype=dtype)
    state = kkt.init_state(config, problem, x0, lambdas)
    hyper = kkt.Hyper(lr_x=jnp.asarray(1e-3, dtype), lr_lambda=jnp.asarray(1e-4, dtype),
                      alpha=jnp.asarray(300.0, dtype), lambda_min=jnp.asarray(0.05, dtype))

    single = jax.jit(lambda h, s: kkt.step(config, problem, h, s)[0])
    step_seconds = median_seconds(lambda: single(hyper, state), repeats=repeats)
    flops = kkt.flops_per_step(model, image_shape, m)
    cost = single.lower(hyper, state).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

    batch_hyper = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (runs,)) * jnp.linspace(0.5, 1.5, runs, dtype=dtype),
                                         hyper)
    batch_state = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (runs, *jnp.shape(a))), state)
    vmapped = jax.jit(jax.vmap(lambda h, s: kkt.step(config, problem, h, s)[0]))
    vmapped_seconds = median_seconds(lambda: vmapped(batch_hyper, batch_state), repeats=repeats)

    def sequential():
        out = None
        for r in range(runs):
            out = single(jax.tree_util.tree_map(lambda a: a[r], batch_hyper), state)
        return out

    sequential_seconds = median_seconds(sequential, repeats=repeats)
    return {"dtype": jnp.dtype(dtype).name, "hidden": list(hidden), "image_shape": list(image_shape), "m": m,
            "step_seconds": step_seconds, "flops_per_step": flops, "xla_flops_per_step": xla_flops,
            "gflops_per_second": flops / step_seconds / 1e9, "runs": runs, "vmapped_seconds": vmapped_seconds,
            "sequential_seconds": sequential_seconds, "vmapped_over_sequential": vmapped_seconds / sequential_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--m", type=int, default=None)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    enable_float64()
    hidden = (256, 256) if args.quick else (1000, 1000)
    m = args.m or (100 if args.quick else 1000)
    load_start = load_average()[0]
    with Stopwatch() as clock:
        results = [bench(dtype, hidden, (32, 32, 3), m, args.runs, args.repeats)
                   for dtype in (jnp.float64, jnp.float32)]
    # CPU seconds this process got per wall second: ≈ the threads XLA uses when the machine
    # is otherwise idle (1.0 pinned to one core, single-threaded); less means other jobs
    # shared the core(s) and every time below is inflated by about that factor.
    cpu_share = clock.cpu_seconds / clock.seconds
    print(f"KKT step, D=3072, {'-'.join(map(str, hidden))}-1, m={m}; {len(os.sched_getaffinity(0))} of "
          f"{os.cpu_count()} CPUs usable, jax {jax.__version__} ({jax.default_backend()}), {datetime.date.today()}; "
          f"load average {load_start:.1f} -> {load_average()[0]:.1f}, CPU seconds per wall second {cpu_share:.2f}")
    print(f"{'dtype':8} {'s/step':>9} {'GFLOP/step':>11} {'XLA GFLOP':>10} {'GFLOP/s':>8} "
          f"{'R':>3} {'vmapped s':>10} {'sequential s':>13} {'ratio':>6}")
    for r in results:
        print(f"{r['dtype']:8} {r['step_seconds']:9.3f} {r['flops_per_step'] / 1e9:11.2f} "
              f"{r['xla_flops_per_step'] / 1e9:10.2f} {r['gflops_per_second']:8.2f} {r['runs']:3d} "
              f"{r['vmapped_seconds']:10.3f} {r['sequential_seconds']:13.3f} {r['vmapped_over_sequential']:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "cpu_share": cpu_share, "load_average_start": load_start,
                       "date": str(datetime.date.today())}, f, indent=2)


if __name__ == "__main__":
    main()
