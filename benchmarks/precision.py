"""Precision policy: what float32 (and TF32, on a GPU) costs the attacks, against float64.

On two small certified victims trained here in float64 (the embedded digits, 10 classes × 2
images of 8×8: affine 64-10 and one-hidden-layer 64-32-10 gelu, cross-entropy, λ_wd = 1e-3):

1. Hypergradient error. ∇_x l(θ(x), θ*) by the library's implicit differentiation (jaxopt
   backend) at x = truth + N(0, 0.05²) (near the truth) and at x ~ N(0, 0.1²) (random), for
   several (dtype, inner tol = CG tol) settings, against a float64 reference solved to 1e-12.
   Reported: ‖g − g_ref‖ / ‖g_ref‖, the inner L-BFGS iterations and ‖∇_θL‖ reached.
2. Reconstruction quality. 100 Adam steps (lr 0.01) from two gt-noise:0.05 initialisations per
   setting; reported: the relative outer loss of the final images (re-evaluated in float64 with
   the reference solver, so every setting is judged alike), the mean SSIM (kornia 3×3 window)
   of the final images, mean added back and clipped to [0,1], to the training images, and the
   RMS pixel difference to the float64 run's final images.
3. The KKT attack: the relative error of ∇_(x,λ) L_KKT in float32 at a random point (gelu
   victim, regression task with one multiplier per output), and L_KKT after 100 SGD steps.

TF32 exists only on NVIDIA GPUs (Ampere and later); on CPU JAX computes float32 matmuls in
float32, so ``--tf32`` adds rows only where ``jax.default_backend() == "gpu"``.

Command (from the repository root; 3-5 minutes on a 2-core CPU):

    python benchmarks/precision.py [--tf32] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon_jax import batching, bilevel, data, kkt, metrics  # noqa: E402
from recon_jax.models import MLP, init_params  # noqa: E402
from recon_jax.objectives import make_objective  # noqa: E402
from recon_jax.precision import cast_tree, enable_float64  # noqa: E402
from recon_jax.solvers import InnerConfig  # noqa: E402
from recon_jax.training import TrainConfig, train_victim  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py
from timing import Stopwatch  # noqa: E402

REFERENCE = InnerConfig(tol=1e-12, cg_tol=1e-12, maxiter=3000, cg_maxiter=2000)
# (label, dtype, inner tol = CG tol, matmul precision, also run the reconstruction)
SETTINGS = [
    ("float64, tol 1e-10 (default)", "float64", 1e-10, None, True),
    ("float32, tol 1e-6", "float32", 1e-6, "highest", True),
    ("float32, tol 1e-5", "float32", 1e-5, "highest", True),
    # float32 cannot reach float64's tolerance: every inner solve runs to maxiter (hypergradient only)
    ("float32, tol 1e-10 (float64's default)", "float32", 1e-10, "highest", False),
]
TF32_SETTINGS = [("TF32, tol 1e-6", "float32", 1e-6, "tensorfloat32", True),
                 ("TF32, tol 1e-5", "float32", 1e-5, "tensorfloat32", True)]
STEPS, LR, NOISE = 100, 0.01, 0.05


def victims() -> list[dict]:
    chosen = data.select(data.load_dataset("digits"), n_per_class=2, seed=0)
    images = jnp.asarray(chosen.train_centered(), jnp.float64)
    labels = jnp.asarray(chosen.train.labels)
    out = []
    for name, hidden in (("affine 64-10", ()), ("gelu 64-32-10", (32,))):
        model = MLP(n_out=10, hidden=hidden, activation="gelu")
        params, report = train_victim(model, init_params(model, jax.random.key(0), (8, 8, 1), jnp.float64), images,
                                      labels, TrainConfig(loss="ce", weight_decay=1e-3))
        print(f"victim {name}: ||grad L|| = {report.grad_norm:.1e} after {report.iterations} iterations "
              f"(stationary: {report.stationary})", flush=True)
        out.append({"name": name, "model": model, "params": params, "images": images, "labels": labels,
                    "mean": np.asarray(chosen.mean), "truth_unit": np.asarray(chosen.train.images)})
    return out


def problem(victim: dict, dtype) -> bilevel.Problem:
    return bilevel.Problem(victim_params=cast_tree(victim["params"], dtype), labels=victim["labels"],
                           objective=make_objective(victim["model"].apply, "ce", 1e-3))


def with_precision(precision):
    return jax.default_matmul_precision(precision) if precision else _null()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def hypergradients(victim: dict, settings) -> list[dict]:
    rows = []
    near = victim["images"] + NOISE * jax.random.normal(jax.random.key(1), victim["images"].shape, jnp.float64)
    far = 0.1 * jax.random.normal(jax.random.key(2), victim["images"].shape, jnp.float64)
    for where, x in (("near truth", near), ("random", far)):
        ref_config = bilevel.BilevelConfig(inner=REFERENCE)
        _, g_ref = jax.jit(lambda x: bilevel.hypergradient(ref_config, problem(victim, jnp.float64), x))(x)
        for label, dtype, tol, precision, _ in settings:
            config = bilevel.BilevelConfig(inner=InnerConfig(tol=tol, cg_tol=tol, maxiter=3000, cg_maxiter=2000))
            prob = problem(victim, dtype)
            with with_precision(precision):
                _, g = jax.jit(lambda x: bilevel.hypergradient(config, prob, x))(x.astype(dtype))
                from recon_jax.solvers import make_argmin
                zeros = jax.tree_util.tree_map(jnp.zeros_like, prob.victim_params)
                _, info = jax.jit(lambda x: make_argmin(prob.objective, config.inner)(
                    prob.victim_params, x, prob.labels, zeros, zeros))(x.astype(dtype))
            error = float(jnp.linalg.norm(g.astype(jnp.float64) - g_ref) / jnp.linalg.norm(g_ref))
            rows.append({"victim": victim["name"], "at": where, "setting": label, "relative_error": error,
                         "inner_iterations": int(info.iterations), "inner_grad_norm": float(info.grad_norm)})
            print(f"  hypergradient {victim['name']:<14} {where:<10} {label:<40} rel. error {error:9.2e}  "
                  f"inner {int(info.iterations):4d} it, ||grad|| {float(info.grad_norm):.1e}", flush=True)
    return rows


def reconstructions(victim: dict, settings) -> list[dict]:
    rows = []
    k = 2
    x0 = victim["images"][None] + NOISE * jax.random.normal(jax.random.key(3), (k, *victim["images"].shape),
                                                            jnp.float64)
    ref_config = bilevel.BilevelConfig(inner=REFERENCE)
    ref_problem = problem(victim, jnp.float64)
    judge = jax.jit(jax.vmap(lambda x: bilevel.evaluate(ref_config, ref_problem,
                                                        bilevel.init_state(ref_config, ref_problem, x))["outer_loss"]))
    reference_images = None
    for label, dtype, tol, precision, run in settings:
        if not run:
            continue
        config = bilevel.BilevelConfig(steps=STEPS, inner=InnerConfig(tol=tol, cg_tol=tol, maxiter=3000))
        prob = problem(victim, dtype)
        hyper = bilevel.Hyper(learning_rate=jnp.full(k, LR, dtype), box_weight=jnp.zeros(k, dtype),
                              tv_weight=jnp.zeros(k, dtype))
        with Stopwatch() as clock, with_precision(precision):
            states, history, final = batching.run_batched(
                lambda x, h: bilevel.init_state(config, prob, x),
                lambda s, h, n, i=0: bilevel.run_steps(config, prob, h, s, n, i),
                lambda s, h: bilevel.evaluate(config, prob, s), x0.astype(dtype), hyper, steps=STEPS, segment=STEPS)
        seconds = clock.seconds
        images = np.asarray(states.images, np.float64)
        loss64 = np.asarray(judge(jnp.asarray(images)))
        unit = np.clip(images + victim["mean"], 0.0, 1.0)
        ssim = float(np.mean(metrics.ssim(unit, victim["truth_unit"][None])))
        reference_images = unit if reference_images is None else reference_images  # the first setting: float64
        rms = float(np.sqrt(np.mean((unit - reference_images) ** 2)))
        rows.append({"victim": victim["name"], "setting": label, "final_outer_loss_float64": loss64.tolist(),
                     "final_outer_loss_own": np.asarray(final["outer_loss"], float).tolist(), "ssim": ssim,
                     "rms_pixel_difference_to_float64": rms,
                     "mean_inner_iterations": float(np.mean(history["inner_iterations"])),
                     "diverged": int(np.sum(final["diverged"])), "seconds": seconds})
        print(f"  reconstruction {victim['name']:<14} {label:<40} outer loss (float64) {np.median(loss64):9.2e}  "
              f"SSIM {ssim:.4f}  RMS pixel diff to float64 {rms:.1e}  mean inner it "
              f"{np.mean(history['inner_iterations']):6.1f}  {seconds:5.1f} s", flush=True)
    return rows


def kkt_rows(victim: dict, precisions) -> list[dict]:
    model, m = victim["model"], 40
    config = kkt.KKTConfig(steps=STEPS, task="regression")
    x = 0.1 * jax.random.normal(jax.random.key(4), (m, 8, 8, 1), jnp.float64)
    lam = jax.random.normal(jax.random.key(5), (m, 10), jnp.float64)
    hyper = kkt.Hyper(lr_x=jnp.asarray(0.05), lr_lambda=jnp.asarray(0.05))

    def grads(dtype, precision):
        prob = kkt.Problem(victim_params=cast_tree(victim["params"], dtype), labels=None, model=model)
        h = cast_tree(hyper, dtype)
        with with_precision(precision):
            g = jax.jit(jax.grad(lambda a, b: kkt.kkt_loss(config, prob, h, a, b)[0], argnums=(0, 1)))(
                x.astype(dtype), lam.astype(dtype))
            state = kkt.init_state(config, prob, x.astype(dtype), lam.astype(dtype))
            state, history = jax.jit(lambda s: kkt.run_steps(config, prob, h, s, STEPS))(state)
        return jnp.concatenate([jnp.ravel(a).astype(jnp.float64) for a in g]), float(history["kkt_loss"][-1])

    g_ref, loss_ref = grads(jnp.float64, None)
    rows = []
    for label, dtype, precision in precisions:
        g, loss = grads(dtype, precision)
        error = float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref))
        rows.append({"victim": victim["name"], "setting": label, "gradient_relative_error": error,
                     "kkt_loss_after_steps": loss, "kkt_loss_float64": loss_ref})
        print(f"  kkt {victim['name']:<14} {label:<12} grad rel. error {error:9.2e}  L_KKT after {STEPS} steps "
              f"{loss:.6e} (float64 {loss_ref:.6e})", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tf32", action="store_true", help="also TensorFloat-32 rows (NVIDIA GPUs only)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    enable_float64()
    on_gpu = jax.default_backend() == "gpu"
    settings = SETTINGS + (TF32_SETTINGS if args.tf32 and on_gpu else [])
    precisions = [("float32", jnp.float32, "highest")] + ([("TF32", jnp.float32, "tensorfloat32")]
                                                          if args.tf32 and on_gpu else [])
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "jax": jax.__version__,
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    print(f"recon_jax precision check | {info['date']} | jax {jax.__version__} on {info['backend']} "
          f"({info['device']}), {info['cpu_count']} CPUs", flush=True)
    if args.tf32 and not on_gpu:
        print("TF32 needs an NVIDIA GPU (Ampere or later); on CPU float32 matmuls are float32: no TF32 rows.")
    results = {"hypergradient": [], "reconstruction": [], "kkt": []}
    for victim in victims():
        results["hypergradient"] += hypergradients(victim, settings)
        results["reconstruction"] += reconstructions(victim, settings)
        if victim["model"].hidden:
            results["kkt"] += kkt_rows(victim, precisions)
    if args.out:
        Path(args.out).write_text(json.dumps({**info, **results}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
