"""A study's figures and ``report.md``, from its finished cells (``recon_jax.study``).

    write_report(config, out_dir, results)

Figures (``out_dir/figures``), drawn by ``recon_jax.figures``:

- ``own_ssim_vs_init_distance.png``: SSIM of each reconstruction to the training image its
  slot was paired with (under the protocol's "minmax" mapping, as the good counts), against
  the distance of the initialisation from that image ("clip" mapping) (C1, C3);
- ``nn_ssim_vs_init_distance.png``: the protocol's mean SSIM of the nearest reconstruction,
  for training images (solid) and held-out images (dashed): "looks like a training image"
  against "is one" (C2);
- ``auc_vs_init_distance.png``: membership AUC (distance to nearest reconstruction), chance
  0.5 marked (C2);
- ``sorted_ssim_<victim>_<method>.png``: per init, the sorted per-image SSIM curves against
  training and held-out images;
- ``grid_<cell>.png``: ground truth | init | reconstruction as scored ("minmax") |
  reconstruction ("clip") | nearest training | nearest held-out, for the best run of each
  cell; init and reconstructions mapped to [0,1] by ``metrics.to_unit`` from the run's
  mean-subtracted arrays, the column titles naming the mapping;
- ``slice1d_<victim>_<method>.png`` and ``slice2d_<cell>.png``: objective slices (C4).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from recon_jax import figures, metrics
from recon_jax.artifacts import atomic_write_bytes, read_json
from recon_jax.initialisation import truth_for_slots
from recon_jax.reconstruct import sorted_ground_truth
from recon_jax.study import DISTANCE_MAPPING

SSIM_MAPPING = metrics.PROTOCOL_MAPPING  # of every SSIM, good count and the scored grid column

GRID_ROWS = 8


def _group(r: dict) -> str:
    return f"{r['victim']} / {r['method']}"


def _values(results: list[dict], key: str) -> np.ndarray:
    return np.asarray([np.nan if r.get(key) is None else r[key] for r in results], float)


def _grid(out: Path, result: dict, path: Path, truth: dict) -> None:
    cell_dir = out / "cells" / result["cell"]
    run = read_json(cell_dir / "run" / "run.json")
    best = next((r for r in run["ranking"] if not run["diverged"][r]), run["ranking"][0])
    with np.load(cell_dir / "run" / "reconstructions.npz", allow_pickle=False) as f:
        centered, init_centered, labels = f["centered"][best], f["init_centered"][best], f["labels"]
    rows = np.arange(min(GRID_ROWS, len(labels)))
    mean = truth["mean"]
    unit = lambda images, mapping: np.asarray(metrics.to_unit(np.asarray(images[rows], np.float64),
                                                              np.asarray(mean, np.float64), mapping))
    nearest = {}
    for pool in ("train", "heldout"):
        pool_images = truth[f"{pool}_images"]
        d = metrics.ncc_distances(centered[rows], pool_images - mean)
        nearest[pool] = pool_images[np.argmin(d, axis=1)]
    paired = truth_for_slots(labels, truth["train_images"], truth["train_labels"])[rows]
    figures.image_grid(path, {"ground truth (paired)": paired,
                              f"init\n({SSIM_MAPPING})": unit(init_centered, SSIM_MAPPING),
                              f"reconstruction\n({SSIM_MAPPING}, scored)": unit(centered, SSIM_MAPPING),
                              "reconstruction\n(clip)": unit(centered, "clip"),
                              "nearest training": nearest["train"], "nearest held-out": nearest["heldout"]},
                       title=f"{result['victim']} / {result['method']} / init {result['init']} (best run)")


def _sorted(out: Path, results: list[dict], path: Path, title: str) -> None:
    curves = {}
    for r in results:
        file = out / "cells" / r["cell"] / "run" / "evaluation.npz"
        if not file.is_file():
            continue
        with np.load(file, allow_pickle=False) as f:
            curves[f"{r['init']} train"] = f["train_ssim_sorted"]
            curves[f"{r['init']} held-out"] = f["heldout_ssim_sorted"]
    if curves:
        figures.sorted_curves(path, curves, ylabel=f"SSIM of nearest reconstruction [{SSIM_MAPPING}]",
                              threshold=metrics.GOOD_SSIM,
                              title=title, dashed=[k for k in curves if k.endswith("held-out")])


def _slices(out: Path, results: list[dict], fig_dir: Path, stem: str) -> list[str]:
    written, lines = [], {}
    for r in results:
        file = out / "cells" / r["cell"] / "landscape.npz"
        if not file.is_file():
            continue
        with np.load(file, allow_pickle=False) as f:
            t, values = f["line_t"], f["line_values"]
            if "line_start_value" in f.files:  # the exact ends, which the grid may straddle
                t = np.concatenate([t, [0.0, 1.0]])
                values = np.concatenate([values, [f["line_start_value"], f["line_end_value"]]])
                order = np.argsort(t, kind="stable")
                t, values = t[order], values[order]
            lines[f"{r['init']} seed {r['seed']}"] = {"t": t, "values": values}
            plane = {k[len("plane_"):]: f[k] for k in f.files if k.startswith("plane_")}
        if plane:
            name = f"slice2d_{r['cell']}.png"
            figures.slice_2d_plot(fig_dir / name, plane, title=f"{r['victim']} / {r['method']} / {r['init']}: "
                                                               "objective on a plane")
            written.append(name)
    if lines:
        name = f"slice1d_{stem}.png"
        figures.slice_1d_plot(fig_dir / name, lines, title=f"{stem.replace('_', ' / ')}: best run (t=0) to truth (t=1)")
        written.insert(0, name)
    return written


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


_S, _D = f" [{SSIM_MAPPING}]", f" [{DISTANCE_MAPPING}]"  # the mapping to [0,1] behind a column
TABLE = (("victim", "victim"), ("method", "method"), ("init", "init"), ("seed", "seed"),
         ("init dist" + _D, "init_distance"), ("own SSIM" + _S, "own_ssim"), ("own SSIM [clip]", "own_ssim_clip"),
         ("train good" + _S, "train_good_count"), ("held-out good" + _S, "heldout_good_count"),
         ("train > best held-out" + _S, "train_above_heldout_count"),
         ("train SSIM" + _S, "train_mean_ssim"), ("held-out SSIM" + _S, "heldout_mean_ssim"),
         ("AUC dist", "membership_auc_distance"), ("AUC best-SSIM" + _S, "membership_auc_best_ssim"),
         ("NN is train (chance)", None), ("final loss (median)", "final_loss_median"),
         ("distinct minima", None))


def table(results: list[dict]) -> str:
    """The report's main table (markdown), one row per cell."""
    lines = ["| " + " | ".join(h for h, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for r in results:
        row = []
        for header, key in TABLE:
            if header.startswith("NN is train"):
                row.append(f"{_fmt(r.get('nearest_is_train_rate'))} ({_fmt(r.get('nearest_is_train_chance'))})")
            elif header == "distinct minima":
                row.append(f"{_fmt(r.get('distinct_minima'))} of {_fmt(r.get('minima_candidates'))}")
            else:
                row.append(_fmt(r.get(key)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(config, out_dir: str | os.PathLike, results: list[dict]) -> Path:
    """Draw every figure and write ``report.md``; returns its path."""
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    groups = np.asarray([_group(r) for r in results])
    distance = _values(results, "init_distance")
    embedded = []
    figures.scatter(fig_dir / "own_ssim_vs_init_distance.png", distance, _values(results, "own_ssim"), groups,
                    xlabel=f"init distance to paired training image (RMS, [0,1] pixels, {DISTANCE_MAPPING})",
                    ylabel=f"median SSIM(reconstruction [{SSIM_MAPPING}], paired image)", hline=metrics.GOOD_SSIM,
                    title="Quality against initialisation distance")
    nn_groups = np.concatenate([np.char.add(groups, " · train"), np.char.add(groups, " · held-out")])
    figures.scatter(fig_dir / "nn_ssim_vs_init_distance.png", np.concatenate([distance, distance]),
                    np.concatenate([_values(results, "train_mean_ssim"), _values(results, "heldout_mean_ssim")]),
                    nn_groups, xlabel=f"init distance (RMS, {DISTANCE_MAPPING})",
                    ylabel=f"mean SSIM of nearest reconstruction [{SSIM_MAPPING}]",
                    title="Nearest-reconstruction SSIM: training vs held-out images")
    figures.scatter(fig_dir / "auc_vs_init_distance.png", distance, _values(results, "membership_auc_distance"),
                    groups, xlabel=f"init distance (RMS, {DISTANCE_MAPPING})", ylabel="membership AUC (distance)",
                    hline=0.5,
                    title="Membership AUC (0.5 = no evidence)")
    embedded += ["own_ssim_vs_init_distance.png", "nn_ssim_vs_init_distance.png", "auc_vs_init_distance.png"]
    slices = []
    for victim in config.victims:
        for method in config.methods:
            chosen = [r for r in results if r["victim"] == victim and r["method"] == method]
            stem = f"{victim}_{method}"
            _sorted(out, chosen, fig_dir / f"sorted_ssim_{stem}.png", f"{victim} / {method}: sorted SSIM")
            embedded.append(f"sorted_ssim_{stem}.png")
            slices += _slices(out, chosen, fig_dir, stem)
    grids = []
    truths = {name: sorted_ground_truth(out / "victims" / name) for name in config.victims}  # read once per victim
    for r in results:
        name = f"grid_{r['cell']}.png"
        _grid(out, r, fig_dir / name, truths[r["victim"]])
        grids.append(name)
    lines = [f"# Study `{config.name}`", ""]
    if config.description:
        lines += [config.description, ""]
    lines += [f"{len(results)} cells: victims {', '.join(config.victims)} × methods {', '.join(config.methods)} × "
              f"inits {', '.join(config.inits)} × seeds {', '.join(map(str, config.seeds))}; "
              f"{config.n_inits} initialisations per cell."
              + "".join(f" Victim {v} runs inits {', '.join(i)} instead." for v, i in config.victim_inits.items()), ""]
    lines += ["## Victims", "", "| victim | dataset | architecture | loss | weight decay | stationary | params |",
              "|---|---|---|---|---|---|---|"]
    for name, spec in config.victims.items():
        meta = read_json(out / "victims" / name / "victim.json")
        report = meta
        arch = "affine" if not spec.hidden else "-".join(map(str, spec.hidden)) + f" {spec.activation}"
        if spec.arch != "mlp":
            arch = f"{spec.arch} {'-'.join(map(str, spec.channels))}" + "".join(f"-d{h}" for h in spec.hidden) \
                + f" {spec.activation}"
        lines.append(f"| {name} | {spec.dataset} ({spec.n_per_class}/class) | {arch} | {spec.train.loss} | "
                     f"{spec.train.weight_decay:g} | {_fmt(report.get('stationary'))} (‖∇L‖ "
                     f"{_fmt(report.get('grad_norm'))}) | {_fmt(report.get('n_params'))} |")
    lines += ["", "## Results", "", table(results), "",
              f"Brackets name how a column maps mean-subtracted images to [0,1] before it measures them "
              f"(`recon_jax.metrics.to_unit`): *{SSIM_MAPPING}* adds the training mean back and min-max scales each "
              f"image, as the evaluation protocol of Haim et al. (2022) and Buzaglo et al. (2023) does; *clip* adds the "
              f"mean back and clips to [0,1], leaving an image already in [0,1] unchanged. Every SSIM column and good "
              f"count is under {SSIM_MAPPING}, so *own SSIM* and *train good* judge the same images; *own SSIM [clip]* "
              f"shows what min-max scaling changes (on MNIST it turns a faint ripple on the black background grey, "
              f"and 3×3 SSIM collapses).",
              "",
              "*init dist*: median RMS distance ([0,1] pixels) of the initial image to the training image its slot "
              "is paired with; *own SSIM*: median SSIM of the reconstruction to that image. *train/held-out good*: "
              "training / held-out images whose nearest reconstruction (NCC) has SSIM > 0.4 (Haim et al. 2022), "
              "*train/held-out SSIM* their mean. *AUC*: membership AUC of training vs held-out images by "
              "their distance (or best SSIM) to the nearest reconstruction; 0.5 = the reconstructions carry no "
              "evidence of membership. *NN is train*: rate at which a reconstruction's nearest image is a "
              "training image, against chance. *distinct minima*: among the runs that reach the best objective "
              f"within {config.minima.objective_atol:g} + {config.minima.objective_rtol:g}·best, how many are "
              f"distinct in image space (matched NCC set distance > {config.minima.distance_threshold:g}).", ""]
    lines += ["## Figures", ""]
    for name in embedded + slices:
        lines += [f"![{name}](figures/{name})", ""]
    lines += ["## Reconstructions (best run of each cell)", ""]
    for name in grids:
        lines += [f"![{name}](figures/{name})", ""]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
