"""Victim certification: trust-region Newton–CG against L-BFGS, side by side in one process.

Two problems, each 10 images per class, cross-entropy, weight decay 1e-3, float64, trained
from the same initialisation (seed 0) to the default tolerances (solver ‖∇L‖ ≤ 1e-10,
certificate ‖∇L‖ ≤ 1e-8):

    mnist    784-1000-10 gelu on 100 MNIST images
    cifar    3072-256-10 gelu on 100 CIFAR-10 images

For each repeat the solvers run one after the other on the same data (alternating which goes
first), so both see the same machine load. Times are wall-clock seconds of
``training.train_victim`` and include compilation (each call compiles its own jitted
segments, as a first ``recon-jax train`` of a given shape does). With ``--warm``, XLA's
persistent compilation cache is turned on in a temporary folder and each solver runs once,
untimed, before the repeats: the timed runs then load their programs from the cache, as
``recon-jax train`` does on later runs (it keeps the cache in ``$RECON_JAX_JAX_CACHE``). The
script prints every run and then, per problem, the median seconds of each solver and the
ratio median(newton) / median(lbfgs).

Data: ``--mnist`` and ``--cifar`` take any dataset name that ``recon-jax datasets`` resolves,
e.g. ``mnist`` / ``cifar10`` with ``RECON_JAX_DATA`` pointing at a folder holding them, or
``idx:PATH`` / ``cifar:PATH``.

    RECON_JAX_DATA=/path/to/data python benchmarks/certify.py --problems mnist --repeats 3
    RECON_JAX_DATA=/path/to/data python benchmarks/certify.py --problems cifar --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/timing.py
from timing import Stopwatch  # noqa: E402

PROBLEMS = {"mnist": 1000, "cifar": 256}  # hidden width of the one-hidden-layer gelu MLP


def run(args) -> dict:
    from recon_jax.precision import enable_float64

    enable_float64()
    import jax

    if args.warm:
        import tempfile

        jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="certify-jax-cache-"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    from recon_jax import data
    from recon_jax.models import MLP, init_params
    from recon_jax.training import NotStationaryWarning, TrainConfig, train_victim

    results = {}
    for problem in args.problems:
        name = args.mnist if problem == "mnist" else args.cifar
        selected = data.select(data.load_dataset(name), n_per_class=args.n_per_class, seed=args.seed)
        model = MLP(n_out=len(selected.train.class_names), hidden=(PROBLEMS[problem],), activation="gelu")
        params0 = init_params(model, jax.random.key(args.seed), selected.train.shape, "float64")
        images, labels = selected.train_centered(), selected.train.labels
        shape = "x".join(str(s) for s in selected.train.shape)
        print(f"{problem}: {name}, {len(labels)} images of {shape}, "
              f"{sum(p.size for p in jax.tree_util.tree_leaves(params0))} parameters", flush=True)
        runs = {solver: [] for solver in args.solvers}

        def train(spec):
            solver, _, hessian_dtype = spec.partition(":")  # e.g. newton:float64
            maxiter = args.lbfgs_maxiter if solver == "lbfgs" else args.maxiter
            config = TrainConfig(loss="ce", weight_decay=1e-3, solver=solver, maxiter=maxiter, dtype="float64",
                                 hessian_dtype=hessian_dtype or None)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotStationaryWarning)
                return train_victim(model, params0, images, labels, config)[1]

        if args.warm:
            for solver in args.solvers:
                print(f"  warm-up {solver}: {train(solver).seconds:.2f} s (untimed; fills the compilation cache)")
        for repeat in range(args.repeats):
            order = args.solvers if repeat % 2 == 0 else args.solvers[::-1]
            for solver in order:
                report = train(solver)
                row = {k: getattr(report, k) for k in ("seconds", "grad_norm", "iterations", "grad_evals",
                                                       "hvp_evals", "stationary", "loss", "train_accuracy")}
                runs[solver].append(row)
                print(f"  repeat {repeat} {solver:14s} {report.seconds:8.2f} s  ||grad L|| {report.grad_norm:.2e}  "
                      f"iterations {report.iterations:5d}  gradients {report.grad_evals}  "
                      f"Hessian-vector products {report.hvp_evals}  stationary {report.stationary}", flush=True)
        medians = {solver: statistics.median(r["seconds"] for r in rows) for solver, rows in runs.items()}
        summary = {"runs": runs, "median_seconds": medians, "warm": args.warm}
        line = "  median: " + ", ".join(f"{s} {m:.2f} s" for s, m in medians.items())
        if "newton" in medians and "lbfgs" in medians:
            summary["ratio_newton_over_lbfgs"] = medians["newton"] / medians["lbfgs"]
            line += f"; newton / lbfgs = {summary['ratio_newton_over_lbfgs']:.3f}"
        print(line, flush=True)
        results[problem] = summary
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default="mnist,cifar", help="comma list of mnist, cifar (default both)")
    parser.add_argument("--solvers", default="newton,lbfgs",
                        help="comma list of training solvers, newton[:HESSIAN_DTYPE], lbfgs or gd "
                             "(default newton,lbfgs; e.g. newton,newton:float64,lbfgs)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per solver and problem; the median is reported")
    parser.add_argument("--mnist", default="mnist", help="dataset name for the MNIST problem (default mnist)")
    parser.add_argument("--cifar", default="cifar10", help="dataset name for the CIFAR-10 problem (default cifar10)")
    parser.add_argument("--n-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--maxiter", type=int, default=3000, help="Newton steps at most (default 3000)")
    parser.add_argument("--lbfgs-maxiter", type=int, default=3000, help="L-BFGS iterations at most (default 3000)")
    parser.add_argument("--warm", action="store_true",
                        help="time with a warm persistent compilation cache (see the module docstring)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    args.solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    unknown = [p for p in args.problems if p not in PROBLEMS]
    if unknown or args.repeats < 1:
        parser.error(f"--problems takes mnist and/or cifar, got {unknown}" if unknown else "--repeats must be >= 1")
    with Stopwatch() as clock:
        results = run(args)
    print(f"total {clock.seconds:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
