"""Claim tested (issue 4): the KKT attack (Haim et al. 2022; Buzaglo et al. 2023), started
from small-σ random candidates, recovers some of the 100 MNIST odd/even training images of a
binary MLP trained by GD to zero training error (SSIM > 0.4 under the evaluation protocol of
Haim et al. 2022 / Buzaglo et al. 2023), and we count how many candidates match a held-out
image equally well.

Result (float64, 2-core CPU, 2026-11-28): reproduced, for a few images, once the attack's box
prior keeps candidates in the pixel range. Pooling the 800 candidates of 4 vmapped runs:

| box of the prior | good (SSIM > 0.4) train / held-out | best held-out SSIM | train images above it | membership AUC | candidates nearer train (chance 0.5) |
|---|---|---|---|---|---|
| pixel: x + μ ∈ [0, 1] (ours, default) | 92 / 89 | 0.597 | **9** (SSIM 0.60–0.74) | 0.66 | 0.77 |
| centered: x ∈ [−1, 1] (reference) | 0 / 0 | 0.108 | 22 (SSIM 0.11–0.24) | 0.60 | 0.65 |

(plain-L2 neighbours, as that protocol does for MNIST; with the reference code's NCC on ×½ bicubic images
the pixel box gives 77 / 56 good, 6 above the best held-out SSIM of 0.607, AUC 0.67.)
``recovered_pixel.png`` shows them: the nine are the training images themselves (an 8, a 6,
a 4, a 9, ...), while the best-matched held-out images meet blends of several digits.

Run to run: the same command in a fresh clone trained a victim equal to this one within
2e-16 (XLA:CPU's threaded reductions are not bitwise deterministic) and the attack, at a
learning rate near its stability limit, amplified that into a different draw: 4 (plain L2)
and 20 (NCC) training images above the best held-out SSIM (0.623 and 0.554), 91 / 89 good,
per-run counts 5, 11, 12, 7 (here 5, 7, 4, 4), AUC 0.67 / 0.68, 79 % / 84 % of candidates
nearer a training image, and the same digits on top of the figure. The count above the best
held-out SSIM hangs on one extreme held-out value (there an 8 that looks like a recovered
training 8), so it moves between 4 and 20; the AUC and the nearest-is-train rate are stable.

The reference architecture, 784-1000-1000-1 (``--hidden 1000,1000``; bias in the first layer,
first-layer init 1e-4, the other layers at flax's default init as the reference leaves them
at PyTorch's), trained and attacked the same way, does better: loss 4.3e-7, held-out accuracy
0.85; 93 / 85 good; **14** (plain L2) and 16 (NCC) training images above the best held-out
SSIM (0.678, 0.676), SSIM up to 0.79; per-run counts 12, 6, 4, 17; membership AUC 0.74 / 0.77;
86 % / 84 % of the candidates nearer a training image. Its best-λ residual at the truth is
0.983, and the attack's 0.982: the second layer keeps its init (‖W₂‖² = 1013 of
‖θ*‖² = 1036), which no combination of margin gradients explains, so the global residual
measures that init, while the first layer and the output weights carry the images. The
figure in docs/kkt.md (``docs/kkt_mnist_recovered_pixel.png``) is this run. Rerun from a fresh
clone it reproduced every figure above.

How to read the counts. On MNIST the 0.4 threshold carries no evidence: a 3×3 SSIM is
dominated by the flat black background, so a candidate with a clean background and a blurred
digit-shaped blob scores > 0.4 against most digits, training or not (92 training against 89
held-out images). The evidence is in the images recovered *better than any held-out image
is matched* (``train_above_heldout_count``), in the AUC, and in the figure. Conversely, the
reference's box lets candidates settle at ±1 inside the digit; once the mean is added back they
span about [−0.9, 1.5], the protocol's min-max scaling lifts the black background to gray and
SSIM collapses (at most 0.24), although the candidates are recognisably the training digits
(``recovered_centered.png``) and 22 training images are matched better than any held-out
one. Adding Gaussian noise of σ = 0.01 to the true images already drops 62 of 100 below 0.4.

Setting, a CPU-sized version of the reference (the reference setting in parentheses):

- victim: 784-1000-1 relu (reference: 784-1000-1000-1), with a bias in the first layer only
  and a first-layer init N(0, 1e-4²) as in the reference. Logistic loss, no weight decay,
  100 MNIST test images (50 odd = +1, 50 even = −1), pixels in [0,1] minus the training mean,
  float64. Trained by full-batch GD at lr 0.5 for 1e5 steps (reference: lr 0.01 for 1e6
  epochs, so lr·steps is 5e4 here against 1e4 there). It reaches zero training error, loss
  1.8e-6 and held-out accuracy 0.83.
- attack: m = 2N = 200 candidates per run, x₀ ~ N(0, (1e-4)²), λ₀ ~ U[0,1), SGD with momentum
  0.9, lr 1 on x and 1e-2 on λ, λ_min = 0.447, box weight 1, λ-hinge weight 5, 6000 steps.
  4 runs in one vmapped program: α ∈ {25, 50} × 2 initial draws. Reference: lr_λ = 1e-4, 50k
  steps, a random search over (lr, σ, α, λ_min); the reference's MNIST run used lr 0.03,
  σ 0.035, α 150, λ_min 0.447.
- evaluation: the protocol of Haim et al. 2022 / Buzaglo et al. 2023 against the 100
  training images and a 100-image held-out pool of the same classes, plain-L2 and NCC-×½
  nearest neighbours (``recon-jax evaluate --plain-l2`` writes the plain-L2 files into the
  run folder).

How far θ* is from a KKT point of its own training set: ``landscape.profiled_stationarity`` at
the true images, min over λ of ‖θ* − (1/N) Σ_j λ_j y_j ∇_θΦ(x_j)‖ / ‖θ*‖, is 0.275 through the
attacked network (α = 25) and 0.422 with relu's own derivative; along the GD run it fell only
logarithmically (0.36 after 1e4 steps, 0.29 after 3e4). The attack reaches 0.07–0.09 (pixel
box) and 0.05 (centered), i.e. it fits θ* *better* than the training set does, so the KKT
equations alone do not single out the training set here; what recovers images is the path
from small σ under plain SGD.

What decided it (exploratory runs with a scratch driver on the same victim, float32, 2000–
10000 steps; recovered = cosine > 0.8 between a training image and its best candidate,
against 0 for every held-out image):

| attack | residual | recovered (cos > 0.8) | protocol good train / held-out |
|---|---|---|---|
| reference MNIST setting (lr 0.03, σ 0.035, α 150, lr_λ 1e-4), centered box | 0.577 (stalls) | 0 | 0 / 0 |
| Adam (lr 1e-3, lr_λ 3e-2), σ 1e-3, α 500, centered box (this script before) | 0.066 | 3 | 0 / 0 |
| SGD lr 1, lr_λ 1e-2, σ 1e-4, α 150, centered box | 0.063 | 3–5 | 0 / 0 |
| same, pixel box | 0.086 | 7 | 78 / 77 |
| same, pixel box, α 25 / 50 / 500 (6000 / 4000 / 4000 steps) | 0.072 / 0.096 / 0.14 | 6 / 8 / 5 | 85 / 82, 89 / 83, 66 / 52 |

- With the reference's λ learning rate (1e-4) the multipliers cannot grow to the scale this
  victim needs (best λ at the truth up to 16 with 1/N scaling, 32 with 1/m), and the loss
  stalls at a relative residual of 0.577; lr_λ = 1e-2 frees it. lr ≥ 2 diverges.
- Adam moves every pixel at its learning rate, including the background pixels whose
  gradient is nearly zero (their first-layer weights never left the 1e-4 init), so its
  candidates have noisy backgrounds; SGD from σ = 1e-4 leaves them at ≈ 0.
- Earlier victims (all 100 MNIST odd/even images): weight-decay victims are exact stationary
  points (residual 9e-9), but weight decay prunes the hidden layer to 5–6 significant
  neurons (gelu, softplus, and 784-1000-1000-1 MSE victims alike), so θ* carries about
  6·785 numbers against 78,400 unknowns, and the attack fits it (residual 0.05) with
  candidates that are not digits: 0 recovered.

Command (MNIST from local files in the folder ``RECON_JAX_DATA`` names, offline; see
docs/data.md):

    RECON_JAX_DATA=/path/to/data python experiments/kkt_mnist.py --out results/kkt_mnist
    RECON_JAX_DATA=/path/to/data python experiments/kkt_mnist.py --out results/kkt_mnist --box centered

The same thing through the command line:

    recon-jax train --dataset mnist --n-per-class 50 --binary-positive 1,3,5,7,9 --hidden 1000 \\
      --bias 1,0 --activation relu --first-layer-init-scale 1e-4 --loss logistic --weight-decay 0 \\
      --solver gd --lr 0.5 --maxiter 100000 --out OUT/victim
    recon-jax reconstruct --victim OUT/victim --method kkt --init gaussian:1e-4 --n-inits 2 \\
      --steps 6000 --optimizer sgd --lr 1 --lr-lambda 1e-2 --alpha 25,50 --lambda-min 0.447 \\
      --kkt-box pixel --out OUT/run
    recon-jax evaluate --run OUT/run --plain-l2

Runtime on the 2-core machine: victim training 292 s with the machine idle (680 s while it was
shared; jaxopt GD, 2.9–6.8 ms per step), the KKT residual at the truth 7 s, the attack 301 s
(4 runs × 6000 steps, 12.6 ms per run-step in float64), the evaluation a few seconds: about
10 minutes, 17 with the machine shared. ``--hidden 1000,1000``: training 774 s, attack 682 s,
about 25 minutes.
Rerunning with the same --out reuses the finished victim and runs; ``--box centered`` then
costs only its own attack (292 s).

Outputs in OUT: ``victim/``, ``run_{box}/`` (with ``evaluation.json``), ``summary_{box}.json``
(every figure above plus the settings), ``summary_{box}.md`` (the same as a table),
``recovered_{box}.png`` and ``ssim_sorted_{box}.png``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from recon_jax import checkpoint, figures, kkt, landscape, metrics
from recon_jax.artifacts import atomic_write_bytes, atomic_write_json
from recon_jax.evaluation import evaluate_reconstructions, evaluate_run
from recon_jax.precision import enable_float64
from recon_jax.reconstruct import ReconstructionSpec, reconstruct, sorted_ground_truth
from recon_jax.training import TrainConfig
from recon_jax.victim import VictimSpec, train_and_save

log = logging.getLogger("kkt_mnist")
FIGURE_ROWS = 12


def hidden_widths(text: str) -> tuple[int, ...]:
    """"1000" -> (1000,); "1000,1000" -> (1000, 1000), the reference's D-1000-1000-1."""
    return tuple(int(w) for w in text.split(","))


def victim_spec(args) -> VictimSpec:
    hidden = hidden_widths(args.hidden)
    return VictimSpec(
        dataset="mnist", n_per_class=50, binary_positive=(1, 3, 5, 7, 9), hidden=hidden, activation="relu",
        use_bias=(True,) + (False,) * len(hidden), first_layer_init_scale=1e-4,
        train=TrainConfig(loss="logistic", weight_decay=0.0, solver="gd", learning_rate=args.train_lr,
                          maxiter=args.train_steps, dtype="float64"),
        seed=0)


def attack_spec(args) -> ReconstructionSpec:
    return ReconstructionSpec(
        method="kkt", init=f"gaussian:{args.sigma}", n_inits=args.n_inits, seed=0, learning_rate=args.lr,
        lr_lambda=args.lr_lambda, alpha=tuple(float(a) for a in args.alpha.split(",")), lambda_min=args.lambda_min,
        dtype=args.dtype, kkt=kkt.KKTConfig(steps=args.steps, task="binary", optimizer="sgd", box=args.box))


def truth_residual(victim: checkpoint.Victim, truth: dict, alpha: float | None) -> float:
    """min_λ ‖θ* − (1/N) Σ_j λ_j y_j ∇_θΦ(x_j)‖ / ‖θ*‖ at the N true training images (``truth``,
    sorted by label), through the attacked network (modified ReLU with sharpness α), or the
    plain relu network for α = None."""
    images = jnp.asarray(truth["train_images"] - truth["mean"], jnp.float64)
    model = victim.model if alpha is None else kkt.attacked_model(victim.model, jnp.asarray(alpha, jnp.float64))
    value, _ = landscape.profiled_stationarity("binary", model.apply, victim.params, images,
                                               jnp.asarray(truth["train_labels"]))
    return float(np.sqrt(value))


def judge(candidates: np.ndarray, truth: dict, plain_l2: bool) -> dict:
    """The Haim et al. 2022 / Buzaglo et al. 2023 protocol against the training set and the held-out pool (plain-L2 or NCC-x1/2 neighbours)."""
    return evaluate_reconstructions(candidates, truth["train_images"], truth["heldout_images"], truth["mean"],
                                    downsample=not plain_l2, standardise=not plain_l2, best_ssim=False)


def scalars(result: dict) -> dict:
    keys = ("train_good_count", "heldout_good_count", "train_above_heldout_count", "heldout_max_ssim",
            "train_mean_ssim", "heldout_mean_ssim", "train_hungarian_good_count", "heldout_hungarian_good_count",
            "membership_auc_distance", "membership_auc_nearest_ssim", "nearest_is_train_rate",
            "nearest_is_train_chance")
    return {k: result[k] for k in keys}


def write_figures(out: Path, box: str, candidates: np.ndarray, truth: dict, result: dict) -> None:
    """recovered_{box}.png: the best-matched training and held-out images beside their nearest
    candidate (as the protocol scores it: mean added, min-max scaled); ssim_sorted_{box}.png:
    per-image SSIM of both pools, sorted."""
    unit = np.asarray(metrics.to_unit_range(candidates, truth["mean"]))
    columns, labels = {}, []
    for pool, name in (("train", "training"), ("heldout", "held-out")):
        order = np.argsort(-result[f"{pool}_ssim"])[:FIGURE_ROWS]
        columns[name] = truth[f"{pool}_images"][order]
        columns[f"candidate ({name})"] = unit[result[f"{pool}_nearest_reconstruction"][order]]
        labels.append([f"{v:.2f}" for v in result[f"{pool}_ssim"][order]])
    row_labels = [f"{a} | {b}" for a, b in zip(*labels)]
    figures.image_grid(out / f"recovered_{box}.png", columns, row_labels,
                       title=f"KKT on binary MNIST ({box} box): best {FIGURE_ROWS} SSIMs, training | held-out")
    figures.sorted_curves(out / f"ssim_sorted_{box}.png", {"training images": result["train_ssim"],
                                                    "held-out images": result["heldout_ssim"]},
                          "SSIM of the nearest candidate", threshold=metrics.GOOD_SSIM,
                          title=f"per-image SSIM ({box} box, plain-L2 neighbours)", dashed=("held-out images",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/kkt_mnist")
    parser.add_argument("--hidden", default="1000", help="hidden widths, e.g. 1000 or 1000,1000 (the reference)")
    parser.add_argument("--train-steps", type=int, default=100_000)
    parser.add_argument("--train-lr", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--n-inits", type=int, default=2)
    parser.add_argument("--sigma", type=float, default=1e-4)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--lr-lambda", type=float, default=1e-2)
    parser.add_argument("--alpha", default="25,50", help="comma list: one vmapped run per value and init")
    parser.add_argument("--lambda-min", type=float, default=0.447)
    parser.add_argument("--box", choices=kkt.BOXES, default="pixel")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    enable_float64()
    out = Path(args.out)
    victim_dir, run_dir = out / "victim", out / f"run_{args.box}"
    seconds = {}

    start = time.perf_counter()
    report = train_and_save(victim_spec(args), victim_dir)
    report = report if isinstance(report, dict) else report.to_dict()
    # A reused victim or run reports the time it took when it was computed, not the reuse.
    seconds["train"] = float(report.get("seconds") or time.perf_counter() - start)

    start = time.perf_counter()
    alpha_truth = float(args.alpha.split(",")[0])
    victim, truth = checkpoint.load_victim(victim_dir), sorted_ground_truth(victim_dir)
    residual_attacked = truth_residual(victim, truth, alpha_truth)
    residual_relu = truth_residual(victim, truth, None)
    seconds["truth_residual"] = time.perf_counter() - start

    start = time.perf_counter()
    run = reconstruct(victim_dir, run_dir, attack_spec(args),
                      progress=lambda done, total: log.info("attack step %d / %d", done, total))
    seconds["attack"] = float(run.get("seconds") or time.perf_counter() - start)

    start = time.perf_counter()
    evaluate_run(run_dir, plain_l2=True, best_ssim=False)  # the standard files, as `recon-jax evaluate --plain-l2`
    with np.load(run_dir / "reconstructions.npz") as f:
        centered = f["centered"]
    keep = ~np.asarray(run["diverged"], bool)
    pooled = centered[keep].reshape(-1, *centered.shape[2:])
    results = {"plain_l2": judge(pooled, truth, True), "ncc_half": judge(pooled, truth, False)}
    per_run = [scalars(judge(c, truth, True)) for c in centered]
    write_figures(out, args.box, pooled, truth, results["plain_l2"])
    seconds["evaluate"] = time.perf_counter() - start

    summary = {
        "victim": {k: report.get(k) for k in ("loss", "train_accuracy", "heldout_accuracy", "grad_norm", "iterations",
                                              "n_params")},
        f"truth_relative_residual_alpha_{alpha_truth:g}": residual_attacked,
        "truth_relative_residual_relu": residual_relu,
        "attack_relative_residual": [float(r) for r in run["final_relative_residual"]],
        "attack_runs": {"alpha": run["run_alpha"], "diverged": run["diverged"]},
        "pooled_candidates": int(len(pooled)),
        "pooled": {name: scalars(r) for name, r in results.items()},
        "per_run_plain_l2": per_run,
        "seconds": seconds,
        "settings": vars(args),
    }
    atomic_write_json(out / f"summary_{args.box}.json", summary)
    a, b = results["plain_l2"], results["ncc_half"]
    both = lambda key, fmt="{}": (fmt.format(a[key]), fmt.format(b[key]))
    pair = lambda k1, k2, fmt="{}": tuple(f"{fmt.format(r[k1])} / {fmt.format(r[k2])}" for r in (a, b))
    rows = [
        ("victim", f"784-{'-'.join(str(w) for w in hidden_widths(args.hidden))}-1 relu, GD lr {args.train_lr}, {args.train_steps} steps; loss "
                   f"{report.get('loss'):.2e}, train acc {report.get('train_accuracy'):.2f}, held-out acc "
                   f"{report.get('heldout_accuracy'):.2f}", ""),
        (f"KKT residual at the true images (best λ), α = {alpha_truth:g} / plain relu",
         f"{residual_attacked:.4f} / {residual_relu:.4f}", ""),
        ("attack", f"box {args.box}, {len(run['diverged'])} runs (α {', '.join(f'{x:g}' for x in run['run_alpha'])}), "
                   f"{args.steps} steps, {args.dtype}", ""),
        ("attack residual per run", ", ".join(f"{r:.4f}" for r in run["final_relative_residual"]), ""),
        ("pooled candidates", str(len(pooled)), ""),
        ("good (SSIM > 0.4): training / held-out images", *pair("train_good_count", "heldout_good_count")),
        ("best SSIM of any held-out image", *both("heldout_max_ssim", "{:.3f}")),
        ("training images above it (recovered, not merely plausible)", *both("train_above_heldout_count")),
        ("mean SSIM training / held-out", *pair("train_mean_ssim", "heldout_mean_ssim", "{:.3f}")),
        ("membership AUC (distance to the nearest candidate)", *both("membership_auc_distance", "{:.3f}")),
        ("candidates nearer a training than a held-out image (chance 0.5)", *both("nearest_is_train_rate", "{:.3f}")),
        ("per run: good training / held-out, above best held-out",
         "; ".join(f"{r['train_good_count']} / {r['heldout_good_count']}, {r['train_above_heldout_count']}"
                   for r in per_run), ""),
        ("seconds train / residual / attack / evaluate",
         " / ".join(f"{seconds[k]:.0f}" for k in ("train", "truth_residual", "attack", "evaluate")), ""),
    ]
    table = ("| quantity | plain-L2 neighbours (Haim et al. 2022, MNIST) | NCC on x1/2 bicubic (reference code) |\n"
             "|---|---|---|\n" + "".join(f"| {k} | {v} | {w} |\n" for k, v, w in rows))
    atomic_write_bytes(out / f"summary_{args.box}.md", table.encode())
    print(table)


if __name__ == "__main__":
    main()
