"""Claim: the bilevel objective can be driven to ≈ 0 on real images, from near-ground-truth
AND from random initialisations (the first half of the paper's C2: reaching θ* exactly does
not need the training images).

Setting (the bilevel issue's): float64 victims trained to a certified stationary point with
λ_wd = 1e-3, known class-balanced labels, Adam lr 0.01, 1000 outer steps, inner L-BFGS to
‖∇L‖ ≤ 1e-10 warm-started from the previous step, adjoint CG to 1e-10. Rows:

    mnist-affine    100 MNIST test images (10 per class), affine CE
    cifar20-affine  20 CIFAR-10 test images (2 per class), affine CE
    mnist-gelu256   100 MNIST test images, 784-256-10 gelu CE (non-convex inner problem)

each from ``gt-noise:0.05`` and ``gaussian:0.1``, K initialisations vmapped. It writes
``OUT/victims/*``, ``OUT/runs/*`` (the run folders, with ``evaluation.json``) and
``OUT/convergence.csv`` (one row per victim × init: min / median / max final relative outer
loss over K, seconds, and the training-set vs held-out good counts and membership AUC).

Command (MNIST and CIFAR-10 from local files in the folder ``RECON_JAX_DATA`` names, offline;
see docs/data.md):

    RECON_JAX_DATA=/path/to/data python experiments/bilevel_convergence.py --out results/convergence

Runtime on the 2-core development CPU: about 5 minutes for the affine rows with K = 4; the
gelu rows take about 25 minutes each at K = 2 (the non-convex inner problem needs ~50–100
L-BFGS iterations per outer step). ``--rows mnist-affine,cifar20-affine`` picks rows.
Results it gave (2026-11-28) are in docs/results.md ("Bilevel convergence").
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np

from recon_jax.bilevel import BilevelConfig
from recon_jax.evaluation import evaluate_run
from recon_jax.precision import enable_float64
from recon_jax.reconstruct import ReconstructionSpec, reconstruct
from recon_jax.training import TrainConfig
from recon_jax.victim import VictimSpec, train_and_save

ROWS = {
    "mnist-affine": (VictimSpec(dataset="mnist", n_per_class=10, hidden=()), 4),
    "cifar20-affine": (VictimSpec(dataset="cifar10", n_per_class=2, hidden=()), 4),
    "mnist-gelu256": (VictimSpec(dataset="mnist", n_per_class=10, hidden=(256,), activation="gelu"), 2),
}
INITS = ("gt-noise:0.05", "gaussian:0.1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/convergence")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    enable_float64()
    out = Path(args.out)
    table = []
    for name in args.rows.split(","):
        victim_spec, n_inits = ROWS[name]
        victim_spec = VictimSpec(**{**victim_spec.__dict__, "train": TrainConfig(loss="ce", weight_decay=1e-3)})
        report = train_and_save(victim_spec, out / "victims" / name)
        report = report if isinstance(report, dict) else report.to_dict()
        for init in INITS:
            run_dir = out / "runs" / f"{name}_{init.replace(':', '-')}"
            spec = ReconstructionSpec(init=init, n_inits=n_inits, learning_rate=0.01,
                                      bilevel=BilevelConfig(steps=args.steps), segment=100)
            run = reconstruct(out / "victims" / name, run_dir, spec,
                              progress=lambda done, total: logging.info("%s %s: step %d/%d", name, init, done, total))
            evaluation = evaluate_run(run_dir, plain_l2=name.startswith("mnist"))
            losses = np.asarray(run["final_outer_loss"])
            table.append({"victim": name, "init": init, "K": n_inits, "victim_grad_norm": report["grad_norm"],
                          "loss_min": losses.min(), "loss_median": float(np.median(losses)), "loss_max": losses.max(),
                          "seconds": round(run["seconds"], 1),
                          "train_good": evaluation["train_good_count"], "heldout_good": evaluation["heldout_good_count"],
                          "n_train": evaluation["n_train"],
                          "membership_auc": evaluation["membership_auc_distance"]})
            logging.info("%s", table[-1])
    with open(out / "convergence.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print((out / "convergence.csv").read_text())


if __name__ == "__main__":
    main()
