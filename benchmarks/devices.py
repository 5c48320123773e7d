"""Does a study's outcome depend on how many devices share the work? The default study on
1 device against the same study sharded over N simulated CPU devices, cell by cell.

Each initialisation's arithmetic is its own: sharding only changes how many neighbours share
its device, so in exact arithmetic every figure would be equal. In floating point it need
not be: XLA picks reduction orders and vector tilings by the batch shape a device sees, so a
sum can differ in its last bit between a batch of 4 and a batch of 1. Whether such a bit
survives depends on the engine:

- the implicit engine and KKT: the step is a smooth function of its inputs, so a last-bit
  difference stays at round-off level (the sharding test holds the implicit engine to
  bitwise equality at 1 and 8 devices, ``tests/test_sharding.py``);
- the amortized engine (every victim under ``--engine auto``) takes discrete decisions at
  round-off level: the masked CG stops when ‖r‖ ≤ tol·‖b‖ and the Armijo test accepts the
  first α ∈ {1, ½, ¼, ⅛} with L(θ + αd) ≤ L(θ) + c α ∇Lᵀd. A decision that flips changes
  the next images by far more than a bit, and a non-convex outer problem then amplifies it.

So bitwise equality is not the target; the figures a study reports are. The script runs
three studies, one after another, each in its own process (``XLA_FLAGS`` is read once per
process):

  1 device, seed 0            the reference
  N devices, seed 0           the comparison (``--xla_force_host_platform_device_count=N``)
  1 device, seed 1            the noise scale: the same study with other initial draws

and prints, per cell, |Δ| between 1 and N devices of the membership AUC and own-SSIM
(target ≤ 0.03), the relative change of the median final loss, and the seed-to-seed |Δ| of
the same figures beside them, so that a device difference can be read against the study's
own run-to-run variability. Rows that differ at all are named with their engine.

Run from the repository root (about 10 minutes on 2 cores; the studies resume if rerun with
the same --out):

    python benchmarks/devices.py [--devices 8] [--out runs/devices-check] [--json PATH]
             [--set KEY=VALUE ...]     # passed to every `recon-jax study`, e.g. n_inits=8
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

TARGET = 0.03  # |Δ AUC| and |Δ own-SSIM| per cell, 1 vs N devices
FIGURES = ("membership_auc_distance", "own_ssim")


def run_study(out: Path, devices: int, seed: int, overrides: list[str]) -> float:
    """``recon-jax study`` (the default study) into ``out`` on ``devices`` simulated CPU devices."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "recon_jax", "study", "--out", str(out), "--no-figures",
               "--set", f"seeds=[{seed}]"]
    for item in overrides:
        command += ["--set", item]
    print(f"$ XLA_FLAGS=...device_count={devices} {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    return time.perf_counter() - start


def read_summary(path: Path) -> dict[str, dict]:
    """summary.csv as {cell id without its seed suffix: row}."""
    with open(path, newline="") as f:
        return {row["cell"].rsplit("__s", 1)[0]: row for row in csv.DictReader(f)}


def as_float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def engine_of(row: dict, study: Path) -> str:
    """The engine a cell ran, as its key in ``study``'s cells/<cell>/cell.json records it: KKT, or
    bilevel/<engine> (with the amortized engine's adjoint solver)."""
    if row["method"] != "bilevel":
        return row["method"]
    table = json.loads((study / "cells" / row["cell"] / "cell.json").read_text())["key"]["spec"]["bilevel"]
    solver = table.get("adjoint_solver")
    return f"bilevel/{table['engine']}" + (f"/{solver}" if solver else "")


def compare(reference: dict, other: dict, noise: dict, study: Path) -> list[dict]:
    rows = []
    for cell, ref in reference.items():
        oth, noi = other[cell], noise.get(cell, {})
        row = {"cell": cell, "engine": engine_of(ref, study), "identical": ref == {**oth, "cell": ref["cell"]}}
        for name in FIGURES:
            a, b = as_float(ref[name]), as_float(oth[name])
            row[name] = abs(a - b)
            row[name + "_seed_noise"] = abs(a - as_float(noi.get(name)))
        a, b = as_float(ref["final_loss_median"]), as_float(oth["final_loss_median"])
        row["final_loss_rel"] = abs(a - b) / max(abs(a), 1e-300)
        row["differing_columns"] = sorted(k for k in ref if k != "cell" and ref[k] != oth.get(k))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--out", default="runs/devices-check")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    out = Path(args.out)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    seconds = {
        "one": run_study(out / "1-device", 1, 0, args.set),
        "many": run_study(out / f"{args.devices}-devices", args.devices, 0, args.set),
        "noise": run_study(out / "1-device-seed1", 1, 1, args.set),
    }
    reference = read_summary(out / "1-device" / "summary.csv")
    other = read_summary(out / f"{args.devices}-devices" / "summary.csv")
    noise = read_summary(out / "1-device-seed1" / "summary.csv")
    rows = compare(reference, other, noise, out / "1-device")

    print(f"\n1 device vs {args.devices} devices, per cell (|Δ| of the figure; in brackets the same figure's "
          f"|Δ| between seeds 0 and 1 on 1 device)")
    print(f"{'cell':34s} {'engine':25s} {'|ΔAUC|':>16s} {'|Δown-SSIM|':>16s} {'Δloss/loss':>11s}  differing columns")
    for r in rows:
        columns = "identical" if r["identical"] else ", ".join(r["differing_columns"])
        print(f"{r['cell']:34s} {r['engine']:25s} "
              f"{r['membership_auc_distance']:7.4f} ({r['membership_auc_distance_seed_noise']:6.3f}) "
              f"{r['own_ssim']:7.4f} ({r['own_ssim_seed_noise']:6.3f}) {r['final_loss_rel']:11.1e}  {columns}")
    worst = {name: max(r[name] for r in rows) for name in FIGURES}
    differing = [r for r in rows if not r["identical"]]
    verdict = all(v <= TARGET for v in worst.values())
    print(f"\nworst |ΔAUC| {worst['membership_auc_distance']:.4f}, worst |Δown-SSIM| {worst['own_ssim']:.4f} "
          f"(target <= {TARGET}): {'PASS' if verdict else 'MISS'}")
    print(f"rows that differ at all: {len(differing)} of {len(rows)}; by engine: "
          + ", ".join(f"{e} {sum(r['engine'] == e for r in differing)}/{sum(r['engine'] == e for r in rows)}"
                      for e in sorted({r['engine'] for r in rows})))
    print(f"wall time of the three studies: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}")
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"devices": args.devices, "target": TARGET, "worst": worst,
                                               "pass": verdict, "rows": rows, "seconds": seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
