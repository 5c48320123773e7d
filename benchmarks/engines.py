"""Do the two bilevel engines give the same study? The amortized engine against the implicit reference, cell by cell.

The bilevel attack has two engines (``recon_jax.bilevel``): the implicit one solves the inner
problem to tolerance every outer step and differentiates the argmin by the implicit function
theorem (jaxopt); the amortized one carries θ and the adjoint v across outer steps and spends a
fixed Newton-CG and adjoint-CG budget per step (Arbel & Mairal, ICLR 2022; Ramzi et al.,
SHINE, ICLR 2022), with an exact refresh every ``refresh_every`` steps. For a convex inner
problem (affine victims) the hypergradients agree to the amortisation error
(``benchmarks/bilevel.py`` (a)). For networks with hidden layers θ(x) is a branch of local
minimisers, and agreement of the *study's figures* is what a user needs before trusting the
cheaper engine on a new victim.

This script runs the bilevel cells of a study config twice, once per engine, into
``OUT/implicit`` and ``OUT/amortized`` (resumable: a rerun reuses finished cells), and prints
per cell, side by side:

    membership AUC (distance), own SSIM, final outer loss, seconds,
    and for the amortized engine the largest refresh correction ‖θ_carried − θ_exact‖/‖θ‖
    over the refreshes after step 0 (how far the carried θ had drifted from θ(x)).

It ends with the largest |ΔAUC|, the largest |Δ own SSIM|, the median final-loss ratio
amortized / implicit and the median time ratio implicit / amortized. Tolerances for a verdict
(``--auc-tol``, default 0.02; ``--ssim-tol``, default 0.02) are those the study's own
bootstrap intervals resolve at 8 initialisations: a difference below them does not change a
table in ``docs/identifiability.md``.

    python benchmarks/engines.py --config experiments/identifiability_quick.toml --victims mlp8,mlp32 \
        --set n_inits=4 --dataset cifar10 --out runs/engines-cifar10 [--json out.json]

``--set``, ``--victims`` and ``--dataset`` mean what they mean for ``recon-jax study``; only the
bilevel methods run (``--methods`` narrows them further). Time: two studies; the implicit one
dominates (minutes a cell for the quick grid's gelu victims on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ENGINES = ("implicit", "amortized")


def bilevel_methods(raw: dict, names: str | None) -> list[str]:
    methods = [n for n, t in raw.get("methods", {}).items() if t.get("method", "bilevel") == "bilevel"]
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(methods))
        if unknown:
            sys.exit(f"--methods: {', '.join(unknown)} is not a bilevel method of this config "
                     f"(bilevel methods: {', '.join(methods) or 'none'})")
        methods = wanted
    if not methods:
        sys.exit("the config has no bilevel method: nothing to compare")
    return methods


def _number(value) -> float:
    """A summary figure as a float, NaN where the cell has none (None)."""
    return float("nan") if value is None else float(value)


def largest_refresh_correction(run_dir: Path) -> float:
    """max over initialisations and refreshes after step 0 of ‖θ_carried − θ_exact‖/‖θ‖ (nan if none)."""
    path = run_dir / "history.npz"
    if not path.is_file():
        return float("nan")
    with np.load(path) as history:
        if "refresh_correction" not in history:
            return float("nan")
        later = history["refresh_correction"][:, 1:]
    later = later[np.isfinite(later)]
    return float(later.max()) if later.size else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a study file, e.g. experiments/identifiability_quick.toml")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--victims", default=None, help="comma-separated victim tables (default: all)")
    parser.add_argument("--methods", default=None, help="comma-separated bilevel method tables (default: all bilevel)")
    parser.add_argument("--out", required=True, help="folder for the two studies (OUT/implicit, OUT/amortized)")
    parser.add_argument("--auc-tol", type=float, default=0.02)
    parser.add_argument("--ssim-tol", type=float, default=0.02)
    parser.add_argument("--json", default=None, help="also write every number here")
    args = parser.parse_args(argv)

    from recon_jax import study, studyconfig
    from recon_jax.precision import enable_float64

    raw = studyconfig.apply_overrides(studyconfig.read_raw(args.config), args.set)
    methods = bilevel_methods(raw, args.methods)
    raw = studyconfig.select_tables(studyconfig.select_tables(raw, "victims", args.victims), "methods", ",".join(methods))
    if studyconfig.needs_float64(raw):
        enable_float64()
    results = {}
    for engine in ENGINES:
        engine_raw = studyconfig.apply_overrides(raw, [f'methods.{m}.bilevel.engine="{engine}"' for m in methods])
        config = studyconfig.config_from_dict(engine_raw, name=raw.get("name", Path(args.config).stem),
                                              dataset=args.dataset)
        print(f"== {engine}: {len(config.cells())} cells into {Path(args.out) / engine}", flush=True)
        out = Path(args.out) / engine
        results[engine] = {r["cell"]: r for r in study.run_study(config, out, extend=True, report=False,
                                                                 echo=lambda s: print(s, flush=True))}
        for cell, r in results[engine].items():
            r["largest_refresh_correction"] = largest_refresh_correction(out / "cells" / cell / "run")

    rows = []
    header = ("cell", "N·D/P", "AUC impl", "AUC amort", "own SSIM impl", "own SSIM amort",
              "loss impl", "loss amort", "s impl", "s amort", "max refresh corr.")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for cell, a in results["implicit"].items():
        b = results["amortized"][cell]
        row = {"cell": cell, "unknowns_per_param": _number(a.get("unknowns_per_param")),
               **{f"{k}_{e}": _number(r.get(k)) for e, r in (("implicit", a), ("amortized", b))
                  for k in ("membership_auc_distance", "own_ssim", "final_loss", "seconds")},
               "largest_refresh_correction": b["largest_refresh_correction"]}
        rows.append(row)
        print(f"| {cell} | {row['unknowns_per_param']:.2f} | {row['membership_auc_distance_implicit']:.3f} | "
              f"{row['membership_auc_distance_amortized']:.3f} | {row['own_ssim_implicit']:.3f} | "
              f"{row['own_ssim_amortized']:.3f} | {row['final_loss_implicit']:.2e} | {row['final_loss_amortized']:.2e} | "
              f"{row['seconds_implicit']:.0f} | {row['seconds_amortized']:.0f} | {row['largest_refresh_correction']:.2e} |")
    # A figure missing under one engine (e.g. every run of a cell diverged) is NaN: the verdict is then DIFFER.
    d_auc = float(np.max([abs(r["membership_auc_distance_amortized"] - r["membership_auc_distance_implicit"])
                          for r in rows]))
    d_ssim = float(np.max([abs(r["own_ssim_amortized"] - r["own_ssim_implicit"]) for r in rows]))
    loss_ratio = float(np.median([r["final_loss_amortized"] / r["final_loss_implicit"] for r in rows]))
    speed = float(np.median([r["seconds_implicit"] / r["seconds_amortized"] for r in rows]))
    verdict = "AGREE" if d_auc <= args.auc_tol and d_ssim <= args.ssim_tol else "DIFFER"
    print(f"\nlargest |dAUC| {d_auc:.3f} (tol {args.auc_tol}), largest |d own SSIM| {d_ssim:.3f} (tol {args.ssim_tol}): "
          f"{verdict}; median final-loss ratio amortized/implicit {loss_ratio:.2f}; "
          f"median time ratio implicit/amortized {speed:.1f}; load average {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "max_abs_dauc": d_auc, "max_abs_dssim": d_ssim,
                                               "median_loss_ratio": loss_ratio, "median_speedup": speed,
                                               "verdict": verdict}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
