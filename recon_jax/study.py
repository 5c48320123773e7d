"""Initialisation studies: a grid of cells run, judged and reported, resumably.

    run_study(config, out_dir) -> list of per-cell results

Layout of ``out_dir``::

    config.json                  the validated study (a rerun with another config is refused)
    victims/<victim>/            victims, trained once (``recon_jax.victim``)
    cells/<cell>/run/            the cell's reconstruction run (``recon_jax.reconstruct``; resumes
                                 from its chunk checkpoints) and evaluation.json/.npz
    cells/<cell>/landscape.npz   objective slices, for cells whose init is in [landscape]
    cells/<cell>/cell.json       the cell's figures: written last and atomically, so a cell
                                 with cell.json is finished and a rerun skips it
    results.json                 every cell's figures and timings, and the config
    summary.csv                  one row per cell, every metric (no timings: two runs of the
                                 same config give the same file); the columns are described
                                 below, and ssim_mapping / distance_mapping name the mapping
                                 to [0,1] of the SSIM and the distance columns
    figures/*.png, report.md     tables and figures (``recon_jax.figures``)

A ``kill -9`` at any moment loses at most the steps since the last checkpoint of the cell in
progress: every file is written atomically (``recon_jax.artifacts``).

Per cell (K = n_inits × hyperparameter settings runs of m images each), besides the
training-set/held-out protocol of ``recon_jax.evaluation`` (good counts, SSIM, membership
AUC, nearest-is-train rate), the study reports what relates the result to the
initialisation. With ``t_j`` the training image that slot j was paired with (the oracle
pairing of ``recon_jax.initialisation``: slots sorted by class, cycling through the class's
training images), x₀ the initial and x the final images, mapped to [0,1] by
``metrics.to_unit`` under the mapping each column names:

- ``init_own_ssim`` / ``own_ssim``: median SSIM(x₀_j, t_j) / SSIM(x_j, t_j), and
  ``own_good_rate``: fraction of (run, slot) with SSIM(x_j, t_j) > 0.4, all under
  ``ssim_mapping`` = the protocol's "minmax" (mean added back, each image min-max scaled;
  Haim et al. 2022), the mapping under which ``train_good_count``, ``train_mean_ssim`` and
  every other SSIM column are scored, so the own figures and the good counts judge the same
  images;
- ``own_ssim_clip``: the same median SSIM under "clip" (mean added back, clipped to [0,1]).
  The two differ where min-max scaling changes an image: on MNIST a faint negative ripple on
  the black background becomes grey and 3×3 SSIM collapses, so a reconstruction can match
  its training image under "clip" and score low under "minmax";
- ``init_distance``: median over runs and slots of RMS(x₀_j − t_j), and ``moved``: median
  RMS(x_j − x₀_j), both in [0,1] pixel units under ``distance_mapping`` = "clip", which
  leaves an image in [0,1] (the truth itself) unchanged; under "minmax" a training image
  that does not span [0,1] would be at a nonzero distance from itself;
- ``distinct_minima``: ``recon_jax.landscape.distinct_minima`` among the runs whose final
  loss is within ``atol + rtol·best`` of the best;
- landscape (if computed): the objective at the reconstruction (t=0) and the ground truth
  (t=1) and its maximum on the segment between them.

Size and convergence (the last columns of summary.csv, for the identifiability map of
``recon_jax.identifiability``): ``n_train`` N, ``n_pixels`` D = h·w·c, ``n_params`` P and
``unknowns_per_param`` N·D/P from the victim's saved shapes (``size_columns``); ``arch``
("affine", "mlp-gelu-64", "mlp-gelu-64-64"), ``weight_decay``, ``n_per_class``;
``final_loss`` = ``final_loss_median``, the median final objective of the cell's non-diverged
runs (bilevel: relative outer loss; KKT: L_KKT); ``converged_fraction``, the fraction of the
cell's runs that meet ``converged_criterion``, the method's (``attack.Method.converged``;
bilevel: objective ≤ ``bilevel.CONVERGED_OBJECTIVE``; KKT: relative residual ≤
``kkt.KKT_CONVERGED_RESIDUAL``; ``convergence_columns``).

The study names no attack: what differs between methods (the convergence criterion, the
parameter-mismatch figure, the landscape objective and its batch bound) comes from the
method's registered descriptor, ``attack.descriptor(spec.method)``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from recon_jax import bilevel, checkpoint, metrics
from recon_jax.artifacts import atomic_save_npz, atomic_write_bytes, atomic_write_json, json_roundtrip, read_json, versions
from recon_jax.attack import descriptor
from recon_jax.errors import ConfigError
from recon_jax.evaluation import evaluate_run
from recon_jax.initialisation import truth_for_slots
from recon_jax.landscape import distinct_minima
from recon_jax.problems import is_convex
from recon_jax.reconstruct import reconstruct, run_identity, sorted_ground_truth
from recon_jax.studyconfig import Cell, StudyConfig
from recon_jax.victim import VictimSpec, train_and_save

log = logging.getLogger(__name__)

ID_COLUMNS = ("cell", "victim", "method", "init", "init_kind", "init_value", "seed")
METRIC_COLUMNS = (
    "n_runs", "n_images", "victim_stationary", "victim_n_params", "diverged_runs",
    "final_loss_name", "final_loss_min", "final_loss_median", "param_mismatch_median",
    "ssim_mapping", "distance_mapping",
    "init_distance", "init_own_ssim", "own_ssim", "own_ssim_clip", "own_good_rate", "moved",
    "train_good_count", "heldout_good_count", "train_mean_ssim", "heldout_mean_ssim",
    "train_hungarian_good_count", "heldout_hungarian_good_count", "heldout_max_ssim", "train_above_heldout_count",
    "membership_auc_distance", "membership_auc_best_ssim", "nearest_is_train_rate", "nearest_is_train_chance",
    "distinct_minima", "minima_candidates",
    "landscape_at_reconstruction", "landscape_at_truth", "landscape_max_on_segment",
    # Size and convergence columns (``size_columns``, ``convergence_columns``), appended last so
    # that readers of the columns above by position are unaffected.
    "n_train", "n_pixels", "n_params", "unknowns_per_param", "arch", "weight_decay", "n_per_class",
    "final_loss", "converged_fraction", "converged_criterion",
)
SIZE_COLUMNS = ("n_train", "n_pixels", "n_params", "unknowns_per_param", "arch", "weight_decay", "n_per_class")
DISTANCE_MAPPING = "clip"  # init_distance and moved (module doc); SSIM columns: the evaluation's mapping
LANDSCAPE_BYTES = 1 << 30  # slices run in batches of points within this (``Method.landscape_point_bytes``: KKT)


def _victim_dir(out: Path, name: str) -> Path:
    return out / "victims" / name


def _cell_dir(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.id


def prepare_victims(config: StudyConfig, out: Path) -> dict[str, dict]:
    """Train (or reuse) every victim of the study; their reports, by name."""
    reports = {}
    for name, spec in config.victims.items():
        log.info("victim %s: %s", name, "reusing" if (_victim_dir(out, name) / "victim.json").is_file() else "training")
        report = train_and_save(spec, _victim_dir(out, name))
        reports[name] = report if isinstance(report, dict) else report.to_dict()
        if not reports[name].get("stationary", False):
            log.warning("victim %s is not certified stationary: %s", name, reports[name].get("note", ""))
    return reports


def _rms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean((a - b) ** 2, axis=(-3, -2, -1)))


def _own_figures(run_dir: Path, truth: dict, good_threshold: float,
                 ssim_mapping: str = metrics.PROTOCOL_MAPPING) -> dict:
    """Figures that relate each slot to the training image it was paired with (module doc).

    Computed from the run's mean-subtracted ``centered``/``init_centered`` (float64) with
    ``metrics.to_unit``, exactly as ``evaluation.evaluate_reconstructions`` maps them before
    scoring: SSIM figures under ``ssim_mapping`` (pass the evaluation's ``image_mapping``),
    distances under ``DISTANCE_MAPPING``, and ``own_ssim_clip`` under "clip".
    """
    with np.load(run_dir / "reconstructions.npz", allow_pickle=False) as f:
        centered = np.asarray(f["centered"], np.float64)
        init_centered = np.asarray(f["init_centered"], np.float64)
        labels = f["labels"]
    mean = np.asarray(truth["mean"], np.float64)
    unit = lambda images, mapping: np.asarray(metrics.to_unit(images, mean, mapping))
    slots = truth_for_slots(labels, truth["train_images"], truth["train_labels"])  # (m, h, w, c) in [0,1]
    flat = lambda a: a.reshape(-1, *a.shape[2:])
    tiled = flat(np.broadcast_to(slots, centered.shape))
    own = np.asarray(metrics.ssim(flat(unit(centered, ssim_mapping)), tiled))
    init_own = np.asarray(metrics.ssim(flat(unit(init_centered, ssim_mapping)), tiled))
    own_clip = np.asarray(metrics.ssim(flat(unit(centered, "clip")), tiled))
    images, init_images = unit(centered, DISTANCE_MAPPING), unit(init_centered, DISTANCE_MAPPING)
    return {"ssim_mapping": ssim_mapping, "distance_mapping": DISTANCE_MAPPING,
            "init_distance": float(np.median(_rms(init_images, slots))),
            "init_own_ssim": float(np.median(init_own)),
            "own_ssim": float(np.median(own)),
            "own_ssim_clip": float(np.median(own_clip)),
            "own_good_rate": float(np.mean(own > good_threshold)),
            "moved": float(np.median(_rms(images, init_images)))}


def arch_name(hidden, activation: str) -> str:
    """``[]`` -> ``"affine"``; ``[64]``, gelu -> ``"mlp-gelu-64"``; ``[64, 64]`` -> ``"mlp-gelu-64-64"``."""
    hidden = list(hidden or [])
    return "affine" if not hidden else "-".join(["mlp", activation, *map(str, hidden)])


def model_name(cfg: dict) -> str:
    """The ``arch`` column from victim.json's ``model`` entry: ``arch_name`` for the default
    architecture; otherwise its registered name, activation, channels and dense widths, e.g.
    ``"cnn-gelu-16-32"`` or ``"cnn-gelu-16-32-d64"``."""
    arch = cfg.get("arch", "mlp")
    if arch == "mlp":
        return arch_name(cfg.get("hidden"), cfg.get("activation", "gelu"))
    return "-".join([arch, cfg.get("activation", "gelu"), *map(str, cfg.get("channels", [])),
                     *(f"d{h}" for h in cfg.get("dense_hidden", []))])


def size_columns(victim_dir: Path) -> dict:
    """The victim's size, from its saved shapes (victim.json), not its name:

        n_train = N (training images, Σ label_counts), n_pixels = D = h·w·c, n_params = P,
        unknowns_per_param = N·D / P   (unknown pixel values per released parameter)

    with ``arch`` (``model_name``), ``weight_decay`` and ``n_per_class`` of its recipe."""
    meta = read_json(victim_dir / checkpoint.META_FILE)
    n_train = int(sum(meta["label_counts"]))
    n_pixels = int(math.prod(int(s) for s in meta["image_shape"]))
    n_params = int(meta["n_params"])
    model = meta["model"]
    return {"n_train": n_train, "n_pixels": n_pixels, "n_params": n_params,
            "unknowns_per_param": n_train * n_pixels / n_params,
            "arch": model_name(model),
            "weight_decay": float(meta["train_config"]["weight_decay"]),
            "n_per_class": (meta.get("spec") or {}).get("n_per_class")}


def convergence_columns(run: dict) -> dict:
    """``converged_fraction``: the fraction of a cell's K runs (diverged ones count as not
    converged) whose final figure meets the method's criterion (``attack.Method.converged``),
    ``converged_criterion``: bilevel outer loss ≤ ``bilevel.CONVERGED_OBJECTIVE``, KKT relative
    residual ≤ ``kkt.KKT_CONVERGED_RESIDUAL``. ``run``: the run's run.json. Returns both columns
    (None when run.json lacks the figure)."""
    criterion = descriptor(run.get("method")).converged
    values, threshold, name = run.get(criterion.key), criterion.threshold, criterion.label
    if values is None:
        return {"converged_fraction": None, "converged_criterion": None}
    values = np.asarray([np.nan if v is None else v for v in values], float)
    ok = ~np.asarray(run["diverged"], bool) & np.isfinite(values) & (values <= threshold)
    return {"converged_fraction": float(ok.mean()), "converged_criterion": f"{name} <= {threshold:g}"}


def _landscape(config: StudyConfig, cell: Cell, victim_dir: Path, run_dir: Path, truth: dict) -> dict:
    """1-D slice best reconstruction → ground truth, 2-D slice through (best, truth, second best)."""
    from recon_jax import landscape

    spec = config.spec(cell)
    # The method's objective of the images alone, as the best run saw it (KKT: that run's α), in
    # the run's dtype (KKT runs default to float32), with θ* cast to it.
    best = landscape.best_run_objective(victim_dir, run_dir, spec)
    if best is None:
        return {}
    f, victim, run, ranking, centered, labels = best
    mean = truth["mean"]
    target = truth_for_slots(labels, truth["train_images"] - mean, truth["train_labels"])
    method = descriptor(spec.method)
    dtype = np.dtype(run.get("dtype", centered.dtype))
    batch_size = None
    if method.landscape_point_bytes is not None:  # e.g. KKT's profiled objective: a (q, P) Jacobian per point
        per_point = method.landscape_point_bytes(victim, labels, spec, dtype)
        batch_size = int(max(1, min(config.landscape.points_2d ** 2, LANDSCAPE_BYTES // per_point)))
    start = centered[ranking[0]].astype(dtype)
    line = landscape.slice_1d(f, start, target.astype(dtype), n=config.landscape.points_1d,
                              extend=config.landscape.extend, batch_size=batch_size)
    arrays = {f"line_{k}": np.asarray(v) for k, v in line.items()}
    t, values = np.asarray(line["t"]), np.asarray(line["values"])
    on_segment = (t >= -1e-12) & (t <= 1 + 1e-12)
    figures = {"landscape_at_reconstruction": float(line["start_value"]),
               "landscape_at_truth": float(line["end_value"]),
               "landscape_max_on_segment": float(np.nanmax(np.concatenate(
                   [values[on_segment], [line["start_value"], line["end_value"]]])))}
    if len(ranking) >= 2:
        plane = landscape.slice_2d(f, start, target.astype(dtype), centered[ranking[1]].astype(dtype),
                                   n=config.landscape.points_2d, extend=config.landscape.extend,
                                   names=("best run", "ground truth", "second run"), batch_size=batch_size)
        arrays.update({f"plane_{k}": np.asarray(v) for k, v in plane.items()})
    atomic_save_npz(run_dir.parent / "landscape.npz", **arrays)
    return figures


def _clear_stale(cell_dir: Path, spec_json: dict) -> None:
    """Remove a cell folder left by different settings (a config changed under ``extend``), so
    the cell reruns from scratch; a folder with the same run spec is kept and resumes."""
    run_dir = cell_dir / "run"
    for name in ("run.json", "spec.json"):
        path = run_dir / name
        if path.is_file():
            saved = read_json(path)
            saved = saved.get("spec") if name == "run.json" else saved
            if saved != spec_json:
                log.info("%s holds a run with other settings; removing it", cell_dir)
                shutil.rmtree(cell_dir)
            return
    (cell_dir / "cell.json").unlink(missing_ok=True)  # a cell.json without its run is stale


def run_cell(config: StudyConfig, cell: Cell, out: Path, *, progress: Callable[[int, int], None] | None = None,
             devices: int | None = None) -> dict:
    """Run, evaluate and describe one cell; writes cells/<cell>/cell.json last. Returns its figures."""
    cell_dir = _cell_dir(out, cell)
    run_dir = cell_dir / "run"
    victim_dir = _victim_dir(out, cell.victim)
    spec = dataclasses.replace(config.spec(cell), devices=devices)
    _clear_stale(cell_dir, run_identity(victim_dir, spec))
    timings = {}
    start = time.perf_counter()
    run = reconstruct(victim_dir, run_dir, spec, progress=progress)
    timings["seconds_reconstruct"] = time.perf_counter() - start

    start = time.perf_counter()
    evaluation = evaluate_run(run_dir, victim_dir=victim_dir)
    truth = sorted_ground_truth(victim_dir)
    own = _own_figures(run_dir, truth, evaluation.get("good_threshold", metrics.GOOD_SSIM),
                       evaluation.get("image_mapping", metrics.PROTOCOL_MAPPING))
    losses = np.asarray(run["final_outer_loss"], float)
    diverged = np.asarray(run["diverged"], bool)
    ok = ~diverged & np.isfinite(losses)
    minima = {"distinct_minima": None, "minima_candidates": None}
    if ok.sum() >= 2:
        with np.load(run_dir / "reconstructions.npz", allow_pickle=False) as f:
            centered = f["centered"][ok]
        best = float(losses[ok].min())
        tol = config.minima.objective_atol + config.minima.objective_rtol * abs(best)
        found = distinct_minima(centered, losses[ok], tol, config.minima.distance_threshold)
        minima = {"distinct_minima": int(found.count), "minima_candidates": int(len(found.candidates))}
    mismatch_key = descriptor(spec.method).mismatch_key
    mismatch = np.asarray(run.get(mismatch_key, losses), float)[ok] if ok.any() else np.array([np.nan])
    timings["seconds_evaluate"] = time.perf_counter() - start

    landscape = {}
    if cell.init in config.landscape.inits:
        start = time.perf_counter()
        landscape = _landscape(config, cell, victim_dir, run_dir, truth)
        timings["seconds_landscape"] = time.perf_counter() - start
    victim_meta = read_json(victim_dir / checkpoint.META_FILE)
    kind, _, value = cell.init.partition(":")
    result = {
        "cell": cell.id, "victim": cell.victim, "method": cell.method, "init": cell.init, "init_kind": kind,
        "init_value": float(value) if value else None, "seed": cell.seed,
        "n_runs": run["n_runs"], "n_images": run["n_images"],
        "victim_stationary": bool(victim_meta.get("stationary", False)),
        "victim_n_params": victim_meta.get("n_params"),
        "diverged_runs": int(diverged.sum()), "final_loss_name": run["final_loss_name"],
        "final_loss_min": float(losses[ok].min()) if ok.any() else None,
        "final_loss_median": float(np.median(losses[ok])) if ok.any() else None,
        "param_mismatch_median": float(np.median(mismatch)),
        "final_loss": float(np.median(losses[ok])) if ok.any() else None,  # = final_loss_median
        **own, **{k: evaluation.get(k) for k in METRIC_COLUMNS if k in evaluation}, **minima, **landscape,
        **size_columns(victim_dir), **convergence_columns(run),
        "spec": _without_devices(spec.to_json()),
        "key": cell_key(config, cell),
    }
    result.update(timings, seconds=sum(timings.values()))
    atomic_write_json(cell_dir / "cell.json", json_roundtrip(result))
    return result


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def summary_csv(results: list[dict]) -> str:
    """One row per cell, ``ID_COLUMNS + METRIC_COLUMNS`` (timings excluded: deterministic)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = ID_COLUMNS + METRIC_COLUMNS
    writer.writerow(columns)
    for r in results:
        writer.writerow([_format(r.get(c)) for c in columns])
    return buffer.getvalue()


def _check_out(config: StudyConfig, out: Path, extend: bool) -> None:
    saved = out / "config.json"
    mine = json_roundtrip(config.to_json())
    if saved.is_file() and read_json(saved) != mine and not extend:
        raise ConfigError(f"{out} holds a study with a different config; choose another --out, or pass --extend "
                          "to reuse the cells whose settings are unchanged")
    atomic_write_json(saved, mine)


def _without_devices(spec_json: dict) -> dict:
    """A spec's JSON without ``devices``: results do not depend on the device count."""
    return json_roundtrip({k: v for k, v in spec_json.items() if k != "devices"})


def cell_key(config: StudyConfig, cell: Cell) -> dict:
    """Everything a cell's result depends on: its run spec, its victim's spec, and the
    evaluation settings (distinct-minima tolerances; landscape slices if the cell has them;
    the mappings to [0,1]: a cell judged before they were recorded is judged again, its run reused).
    A finished cell is reused only if its saved key equals this one."""
    landscape = dataclasses.asdict(config.landscape) if cell.init in config.landscape.inits else None
    if landscape is not None:
        landscape.pop("inits")
    spec = config.spec(cell)
    spec_json = _own_method_only(_without_devices(spec.to_json()))
    if spec.method == "bilevel":  # what runs, not the setting: "auto" may change its choice
        spec_json["bilevel"] = _resolved_bilevel(spec_json["bilevel"], _victim_convex(config.victims[cell.victim]))
    return json_roundtrip({"spec": spec_json, "victim": config.victims[cell.victim].to_json(),
                           "minima": dataclasses.asdict(config.minima), "landscape": landscape,
                           "mappings": {"ssim": metrics.PROTOCOL_MAPPING, "distance": DISTANCE_MAPPING}})


def _victim_convex(victim: VictimSpec) -> bool:
    """``problems.is_convex`` of a victim spec, before it is trained (the class count does not matter)."""
    return is_convex(victim.model(max(victim.n_classes(), 2)), victim.train.weight_decay)


def _own_method_only(spec_json: dict) -> dict:
    """A spec without the settings table of the other attack (a KKT cell does not run the
    bilevel engine, so a new bilevel setting must not rerun it, and vice versa)."""
    other = {"bilevel": "kkt", "kkt": "bilevel"}.get(spec_json.get("method"))
    return {k: v for k, v in spec_json.items() if k != other}


REFRESH_BUDGETS = ("refresh_cg", "refresh_newton_steps")
REFRESH_NAMES = 2  # the revision of the refresh solvers' names that keys are written in
LEGACY_REFRESH_NAMES = {"lbfgs": "jaxopt"}  # revision 1 → 2 ("auto" by convexity: _current_refresh_names)


def _resolved_bilevel(table: dict, convex: bool) -> dict:
    """A bilevel spec's table as it runs: the engine "auto" picks, and the amortized engine's
    adjoint solver (``bilevel.solver_for``) and refresh solver (``bilevel.refresh_solver_for``,
    with its budgets only where it is Newton), which the implicit engine does not use and so
    leaves out. ``table`` names its settings as today (``_current_refresh_names`` translates
    saved ones); the key carries ``refresh_names`` = ``REFRESH_NAMES``, the revision of the
    refresh solvers' names it is written in."""
    engine = bilevel.engine_for(table.get("engine", "auto"), convex)
    table = {**table, "engine": engine}
    solver = table.pop("adjoint_solver", "cg")
    refresh = table.pop("refresh_solver", "auto")
    table.pop("refresh_names", None)
    budgets = {name: table.pop(name) for name in REFRESH_BUDGETS if name in table}
    if engine == "amortized":
        table["adjoint_solver"] = bilevel.solver_for(solver, convex)
        table["refresh_solver"] = bilevel.refresh_solver_for(refresh, convex)
        table["refresh_names"] = REFRESH_NAMES
        if table["refresh_solver"] == "newton":
            table.update(budgets)
    return table


def _current_refresh_names(table: dict, convex: bool) -> dict:
    """A saved bilevel table with its refresh solver in today's names. Before 2026-12-02 (no
    ``refresh_names`` in the table) "lbfgs" named jaxopt's L-BFGS, now "jaxopt", and "auto"
    meant Newton for a convex inner problem and jaxopt's L-BFGS otherwise; a table saved before
    the refresh solver was a setting (none named) ran jaxopt's, and CG for the adjoint."""
    if table.get("refresh_names") == REFRESH_NAMES:
        return table
    refresh = table.get("refresh_solver", "jaxopt")
    refresh = LEGACY_REFRESH_NAMES.get(refresh, refresh)
    if refresh == "auto":
        refresh = "newton" if convex else "jaxopt"
    return {**table, "refresh_solver": refresh}


def _saved_spec_as_keyed_now(spec_json: dict, convex: bool) -> dict:
    """A saved spec as ``cell_key`` builds one now: only its own attack's settings table, and for
    a bilevel spec the engine and adjoint solver that ran (``_resolved_bilevel``). A bilevel
    engine still saved as the setting "auto" (before keys held the engine that ran) is the one
    "auto" picked then: amortized for a convex inner problem, implicit otherwise."""
    spec_json = _own_method_only(spec_json)
    table = spec_json.get("bilevel") or {}
    if spec_json.get("method") != "bilevel":
        return spec_json
    if table.get("engine") == "auto":
        table = {**table, "engine": "amortized" if convex else "implicit"}
    return {**spec_json, "bilevel": _resolved_bilevel(_current_refresh_names(table, convex), convex)}


def reusable(saved: dict | None, config: StudyConfig, cell: Cell) -> bool:
    """Whether a saved cell.json holds this cell's result: its key equals ``cell_key``, in which
    a bilevel spec names the engine that runs (so "auto" and the engine it picks are the same
    cell) and a spec holds only its own attack's settings. Cells from before keys are compared
    by spec; saved specs are normalised the same way first (``_saved_spec_as_keyed_now``)."""
    if saved is None:
        return False
    key = cell_key(config, cell)
    convex = _victim_convex(config.victims[cell.victim])
    if "key" not in saved:
        return _saved_spec_as_keyed_now(_without_devices(saved.get("spec") or {}), convex) == key["spec"]
    old = saved["key"]
    return {**old, "spec": _saved_spec_as_keyed_now(old.get("spec") or {}, convex)} == key


class Progress:
    """Progress lines on stderr via logging: one per cell, and within a cell at most every ``every`` s."""

    def __init__(self, n_cells: int, every: float = 10.0, echo: Callable[[str], None] | None = None):
        self.n_cells, self.every, self.echo = n_cells, every, echo or (lambda s: log.warning("%s", s))
        self.last = 0.0
        self.started = time.perf_counter()

    def cell(self, index: int, cell: Cell, state: str) -> None:
        elapsed = time.perf_counter() - self.started
        self.echo(f"[{index + 1}/{self.n_cells}] {cell.victim} / {cell.method} / {cell.init} / seed {cell.seed}: "
                  f"{state} ({elapsed:.0f} s elapsed)")

    def steps(self, index: int, cell: Cell) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            now = time.perf_counter()
            if now - self.last >= self.every or done == total:
                self.last = now
                self.echo(f"[{index + 1}/{self.n_cells}]   step {done}/{total}")
        return report


def run_study(config: StudyConfig, out_dir: str | os.PathLike, *, process_index: int = 0, process_count: int = 1,
              barrier: Callable[[str], None] | None = None, echo: Callable[[str], None] | None = None,
              report: bool = True, extend: bool = False, devices: int | None = None) -> list[dict]:
    """Run every cell of ``config`` into ``out_dir`` (module doc); returns the cells' results.

    With ``process_count`` > 1 (multi-host, ``recon_jax.distributed``), process p runs the
    cells whose index ≡ p (mod process_count); ``barrier(name)`` synchronises the processes
    after the victims are trained and after all cells, and only process 0 writes victims
    and the study outputs.
    """
    out = Path(out_dir)
    cells = config.cells()
    if process_index == 0:
        _check_out(config, out, extend)
        prepare_victims(config, out)
    if barrier is not None:
        barrier("victims")
    if process_index != 0:
        prepare_victims(config, out)  # reuses process 0's victims (identical specs)
    progress = Progress(len(cells), echo=echo)
    for index, cell in enumerate(cells):
        if index % process_count != process_index:
            continue
        path = _cell_dir(out, cell) / "cell.json"
        if reusable(read_json(path) if path.is_file() else None, config, cell):
            progress.cell(index, cell, "done earlier, reused")
            continue
        progress.cell(index, cell, "running")
        result = run_cell(config, cell, out, progress=progress.steps(index, cell), devices=devices)
        progress.cell(index, cell, f"finished in {result['seconds']:.0f} s: train good {result.get('train_good_count')}, "
                                   f"held-out good {result.get('heldout_good_count')}, AUC "
                                   f"{_short(result.get('membership_auc_distance'))}")
    if barrier is not None:
        barrier("cells")
    if process_index != 0:
        return []
    results = [with_size_columns(out, read_json(_cell_dir(out, cell) / "cell.json")) for cell in cells]
    write_outputs(config, out, results, figures=report and config.figures)
    return results


def with_size_columns(out: Path, result: dict) -> dict:
    """A cell's result with the size and convergence columns, computed from its victim and run
    folders when the cell was judged before they existed (a reused cell keeps its cell.json)."""
    if all(k in result for k in SIZE_COLUMNS + ("final_loss", "converged_fraction")):
        return result
    run = read_json(out / "cells" / result["cell"] / "run" / "run.json")
    return {**result, **size_columns(_victim_dir(out, result["victim"])), **convergence_columns(run),
            "final_loss": result.get("final_loss_median")}


def _short(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def write_outputs(config: StudyConfig, out: Path, results: list[dict], *, figures: bool = True) -> None:
    """results.json, summary.csv, and (``figures``) figures/*.png and report.md."""
    atomic_write_json(out / "results.json", {"config": config.to_json(), "cells": results, "versions": versions()})
    atomic_write_bytes(out / "summary.csv", summary_csv(results).encode())
    if figures:
        from recon_jax.report import write_report
        write_report(config, out, results)
