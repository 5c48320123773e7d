"""The one-hidden-layer plateau: a local minimum of the bilevel objective, or an optimiser failure?

Claim under test (docs/identifiability.md, "The plateau"): on a 784-256-10 gelu victim trained
on 100 MNIST images (N·D/P = 78,400 / 203,530 = 0.39: fewer unknowns than parameters), the
bilevel attack of Runkel et al. (2024) from N(0, 0.1²) noise stalls at an outer loss
f(x) = ‖θ(x) − θ*‖² / ‖θ*‖² of about 0.65 although every inner solve converges.

The script runs the attack (``recon_jax.reconstruct``, resumable), takes the best run's final
images x_p and measures there:

1. **Gradient.** ‖∇f(x_p)‖ (exact hypergradient: inner solve and adjoint CG at tight
   tolerances), against ‖∇f(x_0)‖ at the initialisation, and the loss decrease over the last
   10% of the steps.
2. **Slices.** f on the segment x_p → x* (the training images sorted by label, as the slots
   are) and on the plane through (x_p, x*, the second-best run) (``recon_jax.landscape``).
3. **Curvature** (``recon_jax.curvature``). Lanczos (Golub and Van Loan 2013, §10.1; full
   reorthogonalisation) on
   - the outer Gauss–Newton matrix G = (2 / ‖θ*‖²) Jᵀ J with J = dθ/dx = −H⁻¹ M,
     H = ∇²_θ L(θ_p; x_p) (P × P), M = ∂_x ∇_θ L (P × ND), so G u = (2/‖θ*‖²) Mᵀ H⁻¹ H⁻¹ M u:
     one JVP and one VJP of ∇_θL in x and two CG solves per product;
   - the full outer Hessian ∇²f(x_p) through central differences of the exact hypergradient,
     ∇²f v ≈ (∇f(x_p + εv) − ∇f(x_p − εv)) / 2ε, ε = 1e-4 ‖x_p‖ / ‖v‖.
   The lowest Ritz values tell a minimum (all ≥ 0, within the probe's error) from a saddle.
4. **More steps.** The attack continued from x_p for ``--extra-steps`` steps (Adam at the
   final learning rate of the plateau schedule and at the initial one).

Writes ``OUT/plateau.json``, ``OUT/plateau.md`` and figures under ``OUT/figures``.

    python experiments/plateau.py --out runs/plateau                       # MNIST, as above
    python experiments/plateau.py --dataset fashion_mnist --out runs/plateau-fashion
    python experiments/plateau.py --hidden 64 --n-per-class 5 --steps 300 --out runs/plateau-small
    python experiments/plateau.py --engine amortized --steps 10000 --schedule cosine --out runs/plateau-10k

Reduced variants for CPU budgets change --steps, --n-per-class, --hidden, --lanczos and
--extra-steps; every figure in plateau.json records the settings it was measured with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from recon_jax import bilevel, checkpoint, figures, landscape
from recon_jax.curvature import gauss_newton_operator, hessian_operator, lanczos
from recon_jax.artifacts import atomic_write_bytes, atomic_write_json
from recon_jax.precision import enable_float64
from recon_jax.problems import problem_from_victim
from recon_jax.initialisation import truth_for_slots
from recon_jax.reconstruct import ReconstructionSpec, reconstruct, sorted_ground_truth
from recon_jax.solvers import InnerConfig, make_solve
from recon_jax.training import TrainConfig
from recon_jax.victim import VictimSpec, train_and_save


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--n-per-class", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--init", default="gaussian:0.1")
    p.add_argument("--n-inits", type=int, default=2)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--engine", default="implicit", choices=("implicit", "amortized"))
    p.add_argument("--schedule", default="plateau", choices=bilevel.SCHEDULES,
                   help="outer learning-rate schedule (bilevel.lr_schedule). The default, plateau, halves the rate "
                        "after 20 steps without improvement, so once the loss stalls more steps cannot move it; "
                        "cosine decays over the whole --steps, the test of what 10x more steps do")
    p.add_argument("--extra-steps", type=int, default=200)
    p.add_argument("--lanczos", type=int, default=30, help="Lanczos steps per operator")
    p.add_argument("--slice-points", type=int, default=21)
    p.add_argument("--plane-points", type=int, default=9)
    p.add_argument("--out", default="runs/plateau")
    args = p.parse_args(argv)
    enable_float64()
    out = Path(args.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    result_file = out / "plateau.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    result["settings"] = vars(args)

    def save():
        atomic_write_json(result_file, result)

    # -- victim and attack (both resumable)
    t0 = time.perf_counter()
    spec = VictimSpec(dataset=args.dataset, n_per_class=args.n_per_class, hidden=(args.hidden,), activation="gelu",
                      train=TrainConfig(weight_decay=args.weight_decay))
    report = train_and_save(spec, out / "victim")
    victim = checkpoint.load_victim(out / "victim")
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(victim.params))
    n_unknowns = int(sum(victim.label_counts)) * int(np.prod(victim.image_shape))
    result["victim"] = {"n_params": int(n_params), "unknowns": n_unknowns, "unknowns_per_param": n_unknowns / n_params,
                        "grad_norm": (report.get("grad_norm") if isinstance(report, dict) else report.grad_norm)}
    config = bilevel.BilevelConfig(steps=args.steps, engine=args.engine, schedule=args.schedule)
    run = reconstruct(out / "victim", out / "run", ReconstructionSpec(method="bilevel", init=args.init,
                                                                      n_inits=args.n_inits, bilevel=config))
    result["attack_seconds"] = time.perf_counter() - t0
    with np.load(out / "run" / "reconstructions.npz") as f:
        centered, labels, init_centered = f["centered"], f["labels"], f["init_centered"]
    with np.load(out / "run" / "history.npz") as f:
        history = {k: f[k] for k in f.files}
    ranking = [r for r in run["ranking"] if not run["diverged"][r]]
    best = ranking[0]
    losses = np.asarray(history["outer_loss"])  # (K, steps)
    tail = max(1, args.steps // 10)
    result["trajectory"] = {
        "final_outer_loss": np.asarray(run["final_outer_loss"]).tolist(), "best_run": int(best),
        "loss_at_steps": {str(s): losses[best, s].item() for s in (0, args.steps // 10, args.steps // 2, args.steps - 1)},
        "relative_decrease_last_10pct": float((losses[best, -tail - 1] - losses[best, -1]) / losses[best, -tail - 1]),
        "inner_converged": run.get("inner_converged")}
    save()

    problem = problem_from_victim(victim)
    problem = problem.replace(labels=jnp.asarray(labels))
    theta_star = victim.params
    tight = InnerConfig(tol=1e-10, cg_tol=1e-10, maxiter=2000, cg_maxiter=1000)
    exact = dataclasses.replace(config, inner=tight)
    x_p = jnp.asarray(centered[best])
    x_0 = jnp.asarray(init_centered[best])
    grad_fn = jax.jit(lambda x, start: bilevel.hypergradient(exact, problem, x, start))

    # -- 1. gradient norms
    if "gradient" not in result:
        f_p, g_p = grad_fn(x_p, theta_star)
        f_0, g_0 = grad_fn(x_0, theta_star)
        result["gradient"] = {"f_plateau": float(f_p), "grad_norm_plateau": float(jnp.linalg.norm(g_p)),
                              "f_init": float(f_0), "grad_norm_init": float(jnp.linalg.norm(g_0)),
                              "ratio": float(jnp.linalg.norm(g_p) / jnp.linalg.norm(g_0)),
                              "x_norm_plateau": float(jnp.linalg.norm(x_p))}
        save()
    print("gradient:", result["gradient"], flush=True)

    # -- 2. slices
    if "slices" not in result:
        truth = sorted_ground_truth(out / "victim")
        target = jnp.asarray(truth_for_slots(labels, truth["train_images"] - truth["mean"], truth["train_labels"]))
        f = landscape.objective_function(victim, "bilevel", labels=labels, bilevel_config=config)
        line = landscape.slice_1d(f, x_p, target, n=args.slice_points, extend=0.1, batch_size=8)
        slices = {"t": np.asarray(line["t"]).tolist(), "values": np.asarray(line["values"]).tolist(),
                  "at_plateau": float(line["start_value"]), "at_truth": float(line["end_value"])}
        t, v = np.asarray(line["t"]), np.asarray(line["values"])
        seg = (t >= 0) & (t <= 1)
        ends = [line["start_value"], line["end_value"]]  # t = 0 and t = 1, which the grid may not hold
        slices["max_on_segment"] = float(np.nanmax(np.concatenate([v[seg], ends])))
        slices["barrier"] = float(v[seg].max() - max(line["start_value"], line["end_value"]))
        figures.curve_panels(out / "figures" / "slice_1d.png", [{
            "ylabel": "f(x) = ‖θ(x) − θ*‖² / ‖θ*‖²", "curves": {"plateau → ground truth": {"x": t, "y": v}},
            "hlines": []}], "t (0: plateau point, 1: training images)", logx=False,
            title="bilevel objective on the segment from the plateau to the ground truth")
        if len(ranking) >= 2:
            plane = landscape.slice_2d(f, x_p, target, jnp.asarray(centered[ranking[1]]), n=args.plane_points,
                                       extend=0.1, names=("plateau", "ground truth", "second run"), batch_size=8)
            slices["plane_min"] = float(np.nanmin(np.asarray(plane["values"])))
            slices["plane_values"] = np.asarray(plane["values"]).tolist()
        result["slices"] = slices
        save()
    print("slices:", {k: v for k, v in result["slices"].items() if not isinstance(v, list)}, flush=True)

    # -- 3. curvature at x_p
    solve = make_solve(problem.objective, tight)
    theta_p, info = jax.jit(solve)(theta_star, x_p, problem.labels)
    gn = gauss_newton_operator(problem.objective, x_p, problem.labels, theta_p, theta_star)

    if "gauss_newton" not in result:
        start = time.perf_counter()
        ritz = lanczos(gn, x_p.size, args.lanczos)
        result["gauss_newton"] = {"ritz": ritz.tolist(), "lowest": float(ritz[0]), "highest": float(ritz[-1]),
                                  "inner_grad_norm": float(info.grad_norm), "seconds": time.perf_counter() - start}
        save()
    print("gauss-newton ritz (lowest 3, highest):", result["gauss_newton"]["ritz"][:3],
          result["gauss_newton"]["highest"], flush=True)

    if "hessian" not in result:
        start = time.perf_counter()

        hess = hessian_operator(lambda x: grad_fn(x, theta_p), x_p)
        ritz = lanczos(hess, x_p.size, args.lanczos, seed=1)
        result["hessian"] = {"ritz": ritz.tolist(), "lowest": float(ritz[0]), "highest": float(ritz[-1]),
                             "seconds": time.perf_counter() - start}
        save()
    print("hessian ritz (lowest 3, highest):", result["hessian"]["ritz"][:3], result["hessian"]["highest"], flush=True)

    # -- 4. more steps from the plateau
    if "continuation" not in result and args.extra_steps > 0:
        attack = bilevel.attack(dataclasses.replace(config, steps=args.extra_steps, schedule="constant",
                                                    warmup_steps=0), problem)
        cont = {}
        for name, lr in (("lr_0.01", 0.01), ("lr_0.001", 0.001)):
            hyper = bilevel.Hyper(learning_rate=jnp.asarray(lr))
            state = attack.init_state(x_p, hyper)
            start = time.perf_counter()
            state, hist = jax.jit(lambda s: attack.run_steps(s, hyper, args.extra_steps))(state)
            loss = np.asarray(hist["outer_loss"])
            cont[name] = {"first": float(loss[0]), "last": float(loss[-1]), "min": float(loss.min()),
                          "seconds": time.perf_counter() - start, "loss": loss[:: max(1, args.extra_steps // 50)].tolist()}
        result["continuation"] = cont
        save()
    print("continuation:", {k: {kk: vv for kk, vv in v.items() if kk != "loss"}
                            for k, v in result.get("continuation", {}).items()}, flush=True)
    atomic_write_bytes(out / "plateau.md", _markdown(result).encode())
    return 0


def _markdown(r: dict) -> str:
    g, s, gn, h = r["gradient"], r["slices"], r["gauss_newton"], r["hessian"]
    lines = ["# The one-hidden-layer plateau", "",
             f"Victim: {r['settings']['hidden']} gelu units, {r['victim']['unknowns']} unknowns, "
             f"{r['victim']['n_params']} parameters (N·D/P = {r['victim']['unknowns_per_param']:.3g}); "
             f"attack: bilevel from {r['settings']['init']}, {r['settings']['steps']} steps, "
             f"{r['settings']['engine']} engine.", "",
             f"- final outer loss per run: {', '.join(f'{v:.3g}' for v in r['trajectory']['final_outer_loss'])}; "
             f"decrease over the last 10% of steps: {100 * r['trajectory']['relative_decrease_last_10pct']:.2g}%",
             f"- ‖∇f‖ at the plateau {g['grad_norm_plateau']:.3g} against {g['grad_norm_init']:.3g} at the "
             f"initialisation (ratio {g['ratio']:.3g}); f = {g['f_plateau']:.4g}",
             f"- segment plateau → ground truth: f from {s['at_plateau']:.4g} to {s['at_truth']:.3g}, "
             f"largest value on it {s['max_on_segment']:.4g} (barrier {s['barrier']:.3g})",
             f"- Gauss–Newton Ritz values: lowest {gn['lowest']:.3g}, highest {gn['highest']:.3g}",
             f"- Hessian Ritz values: lowest {h['lowest']:.3g}, highest {h['highest']:.3g}"]
    for name, c in r.get("continuation", {}).items():
        lines.append(f"- {r['settings']['extra_steps']} more Adam steps ({name}): {c['first']:.4g} → {c['last']:.4g} "
                     f"(min {c['min']:.4g})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
