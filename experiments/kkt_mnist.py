"""Claim tested (issue 4): the KKT attack (Haim et al. 2022, BRIEF §3), started from small-σ
random candidates, recovers some of the 100 MNIST odd/even training images of a binary MLP
trained by GD to zero training error (SSIM > 0.4 after the BRIEF §4 protocol), and the
candidates that look like digits are closer to training images than to held-out ones.

Result on this CPU: the target was NOT reached. 0 of 100 training images were recovered
(SSIM > 0.4), and 0 held-out images were matched equally well. Membership AUC by distance
was 0.59; mean SSIM of the nearest candidate was 0.090 for training images and 0.063 for
held-out ones. The attack explains θ* *better* than the training set does: relative KKT
residual 0.066 and 0.073 in the two runs, against 0.267 at the true images with their best
multipliers. It does so with candidates that are not digits (measured 2026-11-28; table
below).

Setting, a CPU-sized version of the reference (the reference setting in parentheses):

- victim: 784-1000-1 relu (reference: 784-1000-1000-1), with a bias in the first layer only
  and a first-layer init N(0, 1e-4²) as in the reference. Logistic loss, no weight decay,
  100 MNIST test images (50 odd = +1, 50 even = −1), pixels in [0,1] minus the training mean,
  float64. Trained by full-batch GD at lr 0.5 for 1e5 steps (reference: lr 0.01 for 1e6
  epochs, so lr·steps is 5e4 here against 1e4 there). It reaches zero training error, loss
  1.8e-6 and held-out accuracy 0.83.
- attack: m = 2N = 200 candidates, x₀ ~ N(0, (1e-3)²), λ₀ ~ U[0,1), modified ReLU α = 500,
  λ_min = 0.05, box prior weight 1, λ-hinge weight 5. Adam with lr 1e-3 on x and 3e-2 on λ
  for 3000 steps, 2 random initialisations vmapped. Reference: SGD with momentum 0.9,
  lr_λ = 1e-4, 50k steps, and a random search over (lr, σ, α, λ_min).
  On this victim SGD (lr_x 0.03 or 0.3, lr_λ 1e-2, 3000 steps) stalled at relative residual
  0.574, and so did Adam at lr_x 1e-2.
- evaluation: BRIEF §4 with plain-L2 nearest neighbours (MNIST), against the 100 training
  images and a 100-image held-out pool of the same classes (``recon-jax evaluate --plain-l2``).

The script also records how far θ* is from a KKT point of its own training set:
``landscape.profiled_stationarity`` at the true images, i.e. min over λ of
‖θ* − (1/N) Σ_j λ_j y_j ∇_θΦ(x_j)‖ / ‖θ*‖. This is 0 only at an exact KKT point. After 1e5 GD
steps it is still 0.267 with α = 500 (0.263 with α = 1e6). Along the same GD run it was
0.36 after 1e4 steps and 0.29 after 3e4, so it falls only logarithmically with training, as
directional convergence does. With the plain relu derivative it is 0.42. GD parks 9,405 of
the 100,000 (neuron, image) pre-activations within 1e-5 of relu's kink. There the nonsmooth
KKT condition allows any σ' ∈ [0, 1]; sigmoid(αz) gives about ½ there, the step 0 or 1. So the
residual minimised over those subgradients too would be lower than 0.26 (not computed).

What was tried before this setting (all 100 MNIST odd/even images, 784-wide input):

| victim | attack | residual at truth | attack residual | good train / held-out |
|---|---|---|---|---|
| 784-1000-1 gelu, λ_wd 1e-3, L-BFGS, certified | SGD lr 0.3, lr_λ 1e-2, 2000 steps | 9e-9 | 0.050 | 0 / 0 |
| 784-1000-1 relu, GD line search, 3000 steps | SGD lr 0.01–1, lr_λ 1e-2, 3000 steps | 0.31–0.35 | 0.35–0.49 | 0–3 / 1–3 |
| 784-1000-1 relu, GD lr 0.5, 1e5 steps (this script) | SGD lr 0.03, 0.3, lr_λ 1e-2, 3000 steps | 0.27 | 0.57 (stalled) | 0–1 / 0 |
| 784-1000-1 relu, GD lr 0.5, 1e5 steps (this script) | Adam lr 1e-3, lr_λ 3e-2, 3000 steps | 0.27 | 0.066, 0.073 | 0 / 0 |

Why the weight-decay victims fail, although they are exact stationary points (θ* = Σ_j μ_j
∇Φ_j to 1e-8): at the certified stationary point, weight decay has pruned the hidden layer
to 5–6 neurons with non-negligible weights. That held in all six such victims tried:
784-1000-1 gelu (λ_wd 1e-3); softplus(β=20) with a 1e-4 first-layer init (λ_wd 1e-3, 1e-4,
1e-5) or the standard init (1e-4), all logistic; and 784-1000-1000-1 gelu with MSE on ±1
targets (λ_wd 3.75e-4, DecoReco's 7.5e-4 for their unhalved MSE; first layer). Then θ* carries about 6·785 numbers, far fewer than the
N·d = 78,400 unknowns, and many non-digit candidate sets satisfy the KKT equations.
relu victims trained by GD keep about 950 active neurons with 800+ distinct activation
patterns, and some neurons have cosine 0.9 with a training image. But they are only
approximately at a KKT point (residual 0.27), and the attack finds other sets that fit θ*
better than the training set does.

Command (MNIST from ../shared/data, offline; pinned to one core as measured):

    RECON_JAX_DATA=../shared/data taskset -c 1 python experiments/kkt_mnist.py --out results/kkt_mnist

The same thing through the command line:

    recon-jax train --dataset mnist --n-per-class 50 --binary-positive 1,3,5,7,9 --hidden 1000 \\
      --bias 1,0 --activation relu --first-layer-init-scale 1e-4 --loss logistic --weight-decay 0 \\
      --solver gd --lr 0.5 --maxiter 100000 --out OUT/victim
    recon-jax reconstruct --victim OUT/victim --method kkt --init gaussian:1e-3 --n-inits 2 \\
      --steps 3000 --optimizer adam --lr 1e-3 --lr-lambda 3e-2 --alpha 500 --lambda-min 0.05 --out OUT/run
    recon-jax evaluate --run OUT/run --plain-l2

Runtime, measured on CPU core 1 of the 2-core development machine (XLA single-threaded,
2026-11-28): about 19 minutes in all. Victim training took 11.4 minutes, measured with the
identical ``recon-jax train`` command. jaxopt's GradientDescent takes 6.8 ms per step for the
1e5 steps, against 1.1 ms for a plain ``lax.fori_loop`` of the same update. The KKT residual
at the truth took 32 s, the attack 6.0 minutes (2 runs × 3000 steps) and the evaluation
21 s. Two other jobs shared core 1 during the attack, which ran at 0.07 s per step while
alone and 0.12 s shared. Rerunning with the same --out reuses the finished victim and run.

Outputs in OUT: ``victim/``, ``run/`` (with ``evaluation.json``), ``summary.json`` (every
figure below plus the settings) and ``summary.md`` (the same as a table).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from recon_jax import checkpoint, kkt, landscape
from recon_jax.artifacts import atomic_write_bytes, atomic_write_json
from recon_jax.evaluation import evaluate_run
from recon_jax.precision import enable_float64
from recon_jax.reconstruct import ReconstructionSpec, reconstruct, sorted_ground_truth
from recon_jax.training import TrainConfig
from recon_jax.victim import VictimSpec, train_and_save

log = logging.getLogger("kkt_mnist")


def victim_spec(args) -> VictimSpec:
    return VictimSpec(
        dataset="mnist", n_per_class=50, binary_positive=(1, 3, 5, 7, 9), hidden=(args.hidden,), activation="relu",
        use_bias=(True, False), first_layer_init_scale=1e-4,
        train=TrainConfig(loss="logistic", weight_decay=0.0, solver="gd", learning_rate=args.train_lr,
                          maxiter=args.train_steps, dtype="float64"),
        seed=0)


def attack_spec(args) -> ReconstructionSpec:
    return ReconstructionSpec(
        method="kkt", init=f"gaussian:{args.sigma}", n_inits=args.n_inits, seed=0, learning_rate=args.lr,
        lr_lambda=args.lr_lambda, alpha=args.alpha, lambda_min=args.lambda_min,
        kkt=kkt.KKTConfig(steps=args.steps, task="binary", optimizer="adam"))


def truth_residual(victim_dir: Path, alpha: float | None) -> float:
    """min_λ ‖θ* − (1/N) Σ_j λ_j y_j ∇_θΦ(x_j)‖ / ‖θ*‖ at the N true training images, through the
    attacked network (modified ReLU with sharpness α), or the plain relu network for α = None."""
    victim = checkpoint.load_victim(victim_dir)
    truth = sorted_ground_truth(victim_dir)
    images = jnp.asarray(truth["train_images"] - truth["mean"], jnp.float64)
    model = victim.model if alpha is None else kkt.attacked_model(victim.model, jnp.asarray(alpha, jnp.float64))
    value, _ = landscape.profiled_stationarity("binary", model.apply, victim.params, images,
                                               jnp.asarray(truth["train_labels"]))
    return float(np.sqrt(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/kkt_mnist")
    parser.add_argument("--hidden", type=int, default=1000)
    parser.add_argument("--train-steps", type=int, default=100_000)
    parser.add_argument("--train-lr", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--n-inits", type=int, default=2)
    parser.add_argument("--sigma", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-lambda", type=float, default=3e-2)
    parser.add_argument("--alpha", type=float, default=500.0)
    parser.add_argument("--lambda-min", type=float, default=0.05)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    enable_float64()
    out = Path(args.out)
    victim_dir, run_dir = out / "victim", out / "run"
    seconds = {}

    start = time.perf_counter()
    report = train_and_save(victim_spec(args), victim_dir)
    report = report if isinstance(report, dict) else report.to_dict()
    seconds["train"] = time.perf_counter() - start

    start = time.perf_counter()
    residual_attacked = truth_residual(victim_dir, args.alpha)
    residual_relu = truth_residual(victim_dir, None)
    seconds["truth_residual"] = time.perf_counter() - start

    start = time.perf_counter()
    run = reconstruct(victim_dir, run_dir, attack_spec(args),
                      progress=lambda done, total: log.info("attack step %d / %d", done, total))
    seconds["attack"] = time.perf_counter() - start

    start = time.perf_counter()
    evaluation = evaluate_run(run_dir, plain_l2=True)
    seconds["evaluate"] = time.perf_counter() - start

    final_residual = [float(r) for r in run["final_relative_residual"]]
    summary = {
        "victim": {k: report.get(k) for k in ("loss", "train_accuracy", "heldout_accuracy", "grad_norm", "iterations",
                                              "n_params")},
        "truth_relative_residual_attacked": residual_attacked,
        "truth_relative_residual_relu": residual_relu,
        "attack_relative_residual": final_residual,
        "attack_diverged": run["diverged"],
        "train_good_count": evaluation["train_good_count"],
        "heldout_good_count": evaluation["heldout_good_count"],
        "train_hungarian_good_count": evaluation["train_hungarian_good_count"],
        "heldout_hungarian_good_count": evaluation["heldout_hungarian_good_count"],
        "train_mean_ssim": evaluation["train_mean_ssim"],
        "heldout_mean_ssim": evaluation["heldout_mean_ssim"],
        "membership_auc_distance": evaluation["membership_auc_distance"],
        "membership_auc_best_ssim": evaluation.get("membership_auc_best_ssim"),
        "nearest_is_train_rate": evaluation["nearest_is_train_rate"],
        "nearest_is_train_chance": evaluation["nearest_is_train_chance"],
        "per_run_train_good_count": evaluation.get("per_run_train_good_count"),
        "per_run_heldout_good_count": evaluation.get("per_run_heldout_good_count"),
        "seconds": seconds,
        "settings": vars(args),
    }
    atomic_write_json(out / "summary.json", summary)
    rows = [
        ("victim", f"784-{args.hidden}-1 relu, GD lr {args.train_lr}, {args.train_steps} steps; loss "
                   f"{report.get('loss'):.2e}, train acc {report.get('train_accuracy'):.2f}, held-out acc "
                   f"{report.get('heldout_accuracy'):.2f}"),
        ("KKT residual at the true images (best λ), attacked net α=%g" % args.alpha, f"{residual_attacked:.4f}"),
        ("KKT residual at the true images (best λ), plain relu", f"{residual_relu:.4f}"),
        ("attack residual per run", ", ".join(f"{r:.4f}" for r in final_residual)),
        ("good (SSIM > 0.4) training images", str(evaluation["train_good_count"])),
        ("good held-out images (matched equally well)", str(evaluation["heldout_good_count"])),
        ("Hungarian good train / held-out",
         f"{evaluation['train_hungarian_good_count']} / {evaluation['heldout_hungarian_good_count']}"),
        ("mean SSIM train / held-out", f"{evaluation['train_mean_ssim']:.3f} / {evaluation['heldout_mean_ssim']:.3f}"),
        ("membership AUC (distance)", f"{evaluation['membership_auc_distance']:.3f}"),
        ("seconds train / residual / attack / evaluate",
         " / ".join(f"{seconds[k]:.0f}" for k in ("train", "truth_residual", "attack", "evaluate"))),
    ]
    table = "| quantity | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    atomic_write_bytes(out / "summary.md", table.encode())
    print(table)


if __name__ == "__main__":
    main()
