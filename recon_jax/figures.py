"""Figures for study reports: image grids, scatter plots, sorted-SSIM curves, landscape slices.

Every function takes plain numpy arrays and an output path, checks its input (a bad shape,
length or range raises :class:`recon_jax.errors.ConfigError` naming the problem and the
fix) and writes one PNG atomically (``recon_jax.artifacts.atomic_write_bytes``: a temporary
sibling, then ``os.replace``), so a report never links a half-written image.

Rendering uses matplotlib's Agg canvas explicitly, on ``matplotlib.figure.Figure`` objects
that pyplot never sees: nothing is shown, no GUI backend is touched, no global figure
registry grows, and the process's pyplot backend is left as it was.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from recon_jax.artifacts import atomic_write_bytes
from recon_jax.errors import ConfigError

DPI = 120
IMAGE_TOLERANCE = 1e-6
"""Pixels may leave [0, 1] by this much (float round-off) before image_grid refuses them."""
LOG_RANGE_2D = 10.0
"""Decades of log10 values that slice_2d_plot's colour scale spans below the maximum."""


# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Render ``fig`` to PNG bytes with Agg and write them atomically to ``path``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    fig.clear()
    return atomic_write_bytes(path, buffer.getvalue())


def _vector(name: str, values, *, finite: bool = False) -> np.ndarray:
    """A 1-D float array, or ConfigError."""
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} must hold numbers ({err}); pass a numeric array") from err
    if array.ndim != 1:
        raise ConfigError(f"{name} must be a 1-D array, got shape {array.shape}; pass one value per point")
    if finite and not np.all(np.isfinite(array)):
        raise ConfigError(f"{name} has non-finite values; drop or fix them before plotting")
    return array


def _log_floor(values: np.ndarray) -> tuple[np.ndarray, float | None]:
    """values with non-positive entries raised to a floor 1e-3 × the smallest positive value
    (for log scales), and that floor (None if nothing was raised or nothing is positive)."""
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0 or np.all(values[np.isfinite(values)] > 0):
        return values, None
    floor = 1e-3 * float(positive.min())
    return np.where(np.isfinite(values) & (values <= 0), floor, values), floor


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------


def _check_image_columns(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not columns:
        raise ConfigError("image_grid needs at least one column, e.g. {'ground truth': images}")
    checked, first = {}, None
    for name, images in columns.items():
        images = np.asarray(images, dtype=float)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ConfigError(f"column {name!r} has shape {images.shape}; image_grid needs (n, h, w, c) images with "
                              "c = 1 (grayscale) or c = 3 (RGB), e.g. add a channel axis with images[..., None]")
        if first is None:
            first = (name, images.shape)
        elif images.shape != first[1]:
            raise ConfigError(f"column {name!r} has shape {images.shape} but column {first[0]!r} has {first[1]}; "
                              "every column must hold the same number of images of the same size (one row each)")
        if not np.all(np.isfinite(images)):
            raise ConfigError(f"column {name!r} has non-finite pixels; fix the images before plotting")
        lo, hi = float(images.min()), float(images.max())
        if lo < -IMAGE_TOLERANCE or hi > 1 + IMAGE_TOLERANCE:
            raise ConfigError(f"column {name!r} has pixel values in [{lo:.4g}, {hi:.4g}], outside [0, 1]; map "
                              "mean-subtracted images with recon_jax.metrics.to_unit(centered, mean, mapping) "
                              "first (mapping 'minmax' or 'clip')")
        checked[name] = np.clip(images, 0.0, 1.0)
    return checked


def image_grid(path: str | os.PathLike, columns: Mapping[str, np.ndarray], row_labels: Sequence[str] | None = None,
               title: str | None = None) -> Path:
    """One row per image, one column per named set: e.g. ground truth | init | reconstruction
    | nearest training | nearest held-out.

    columns: {name: images (n, h, w, c) in [0, 1]}, all of the same shape; grayscale for
    c = 1, RGB for c = 3. row_labels: n strings (e.g. SSIM values), or None. Returns ``path``.
    """
    columns = _check_image_columns(columns)
    n_rows, height, width, channels = next(iter(columns.values())).shape
    if row_labels is not None and len(row_labels) != n_rows:
        raise ConfigError(f"row_labels has {len(row_labels)} entries but the columns hold {n_rows} images; "
                          "give one label per row, or None")
    cell = 1.3
    fig = _new_figure(cell * len(columns) + (1.0 if row_labels is not None else 0.2),
                      cell * n_rows * height / width + (0.5 if title else 0.3))
    axes = fig.subplots(n_rows, len(columns), squeeze=False)
    for j, (name, images) in enumerate(columns.items()):
        for i in range(n_rows):
            ax = axes[i, j]
            if channels == 1:
                ax.imshow(images[i, :, :, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(images[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[i]), fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------


def scatter(path: str | os.PathLike, x, y, groups, xlabel: str, ylabel: str, title: str | None = None,
            logx: bool = False, hline: float | None = None) -> Path:
    """y against x, one colour per group (e.g. SSIM against init distance per method and
    architecture, or membership AUC against init distance with ``hline=0.5``, chance).

    x, y: (n,) numbers; groups: (n,) strings. Within a group that repeats x values, a line
    joins the mean y at each distinct x, sorted by x. Points with a non-finite x or y are
    left out (a NaN AUC has no place on the axes). ``logx`` needs x > 0.
    """
    x, y = _vector("x", x), _vector("y", y)
    groups = np.asarray(groups).astype(str)
    if groups.ndim != 1:
        raise ConfigError(f"groups must be a 1-D array of strings, got shape {groups.shape}")
    if not len(x) == len(y) == len(groups):
        raise ConfigError(f"x, y and groups must have one entry per point, got lengths {len(x)}, {len(y)} and "
                          f"{len(groups)}")
    keep = np.isfinite(x) & np.isfinite(y)
    if logx and np.any(x[keep] <= 0):
        raise ConfigError("logx=True needs x > 0; drop the non-positive points or use a linear axis")
    fig = _new_figure(5.0, 3.6)
    ax = fig.subplots()
    for k, group in enumerate(dict.fromkeys(groups[keep])):
        sel = keep & (groups == group)
        colour = f"C{k % 10}"
        ax.scatter(x[sel], y[sel], s=14, alpha=0.6, color=colour, label=group)
        levels = np.unique(x[sel])
        if len(levels) < np.count_nonzero(sel):
            means = [float(np.mean(y[sel & (x == level)])) for level in levels]
            ax.plot(levels, means, "-", color=colour, linewidth=1.5)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", linewidth=1, label=f"y = {hline:g}")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def sorted_curves(path: str | os.PathLike, curves: Mapping[str, np.ndarray], ylabel: str,
                  threshold: float | None = None, title: str | None = None,
                  dashed: Sequence[str] = ()) -> Path:
    """Each curve's values sorted in descending order against their rank (1 = best), e.g.
    per-training-image SSIM of several runs, with ``threshold`` (e.g.
    ``metrics.GOOD_SSIM`` = 0.4) as a dashed gray line. curves: {name: (n_k,) values}; lengths
    may differ; NaNs are dropped. Curves named in ``dashed`` are drawn dashed in the colour of
    the curve before them (e.g. the held-out pool after the training set of one run).
    """
    if not curves:
        raise ConfigError("sorted_curves needs at least one curve, e.g. {'bilevel': ssim_values}")
    fig = _new_figure(5.0, 3.6)
    ax = fig.subplots()
    color = None
    for name, values in curves.items():
        values = _vector(f"curve {name!r}", values)
        values = np.sort(values[~np.isnan(values)])[::-1]
        style = dict(linestyle="--", color=color) if name in dashed and color is not None else dict(linestyle="-")
        (line,) = ax.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=2.5, linewidth=1.2,
                          label=name, **style)
        color = line.get_color()
    if threshold is not None:
        ax.axhline(threshold, color="gray", linestyle=":", linewidth=1, label=f"threshold {threshold:g}")
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xlabel("rank (sorted, best first)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def curve_panels(path: str | os.PathLike, panels: Sequence[Mapping], xlabel: str, *, logx: bool = False,
                 title: str | None = None) -> Path:
    """Side-by-side panels against one x quantity, each with named curves, optional error bars
    and reference lines: e.g. membership AUC and own SSIM against unknowns per parameter N·D/P,
    one curve per method × architecture.

    panels: a list of {"ylabel": str, "curves": {name: {"x": (n,), "y": (n,), and optionally
    "low": (n,), "high": (n,)}}, "hlines": [(y, label, linestyle)] (optional), "title": str
    (optional), "ylim": (lo, hi) (optional)}. Each curve is drawn sorted by x, joined by a
    line; points with a non-finite x or y are left out; ``low``/``high`` (an interval around
    y, e.g. a bootstrap percentile interval) are drawn as error bars where finite. A curve
    name keeps its colour and style in every panel; past ten curves the colours repeat with
    another line style and marker, so that no two curves look alike. ``logx`` needs x > 0.
    """
    if not panels:
        raise ConfigError("curve_panels needs at least one panel, e.g. [{'ylabel': 'AUC', 'curves': {...}}]")
    checked, colours = [], {}
    for k, panel in enumerate(panels):
        if "curves" not in panel or "ylabel" not in panel:
            raise ConfigError(f"panel {k} needs keys 'ylabel' and 'curves'")
        curves = {}
        for name, curve in panel["curves"].items():
            if "x" not in curve or "y" not in curve:
                raise ConfigError(f"curve {name!r} needs keys 'x' and 'y'")
            arrays = {key: _vector(f"curve {name!r} {key}", curve[key]) for key in ("x", "y", "low", "high")
                      if curve.get(key) is not None}
            lengths = {key: len(a) for key, a in arrays.items()}
            if len(set(lengths.values())) != 1:
                raise ConfigError(f"curve {name!r} has arrays of different lengths {lengths}; give one value per point")
            keep = np.isfinite(arrays["x"]) & np.isfinite(arrays["y"])
            if logx and np.any(arrays["x"][keep] <= 0):
                raise ConfigError(f"curve {name!r}: logx=True needs x > 0")
            order = np.argsort(arrays["x"][keep], kind="stable")
            curves[name] = {key: a[keep][order] for key, a in arrays.items()}
            n = len(colours)
            colours.setdefault(name, (f"C{n % 10}", ("-", "--", ":", "-.")[n // 10 % 4], "os^D"[n // 10 % 4]))
        checked.append((panel, curves))
    fig = _new_figure(4.6 * len(checked) + 0.4, 3.8)
    axes = fig.subplots(1, len(checked), squeeze=False)[0]
    for ax, (panel, curves) in zip(axes, checked):
        for name, c in curves.items():
            colour, style, marker = colours[name]
            ax.plot(c["x"], c["y"], linestyle=style, marker=marker, color=colour, markersize=3.5, linewidth=1.3,
                    label=name)
            if "low" in c and "high" in c:
                bars = np.isfinite(c["low"]) & np.isfinite(c["high"])
                if bars.any():
                    y = c["y"][bars]
                    ax.errorbar(c["x"][bars], y, yerr=[np.maximum(y - c["low"][bars], 0), np.maximum(c["high"][bars] - y, 0)],
                                fmt="none", ecolor=colour, elinewidth=1, capsize=3, alpha=0.8)
        for y, label, style in panel.get("hlines", ()):
            ax.axhline(y, color="gray", linestyle=style, linewidth=1, label=label)
        if logx:
            ax.set_xscale("log")
            # Plain numbers (2, 1e-03) rather than mathtext powers; minor ticks labelled when the axis spans few decades.
            ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        if panel.get("ylim") is not None:
            ax.set_ylim(*panel["ylim"])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel["ylabel"])
        if panel.get("title"):
            ax.set_title(panel["title"], fontsize=9)
        ax.grid(alpha=0.3)
        if curves or panel.get("hlines"):
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------
# Landscapes (recon_jax.landscape)
# ---------------------------------------------------------------------------------------


def slice_1d_plot(path: str | os.PathLike, slices: Mapping[str, Mapping[str, np.ndarray]], title: str, *,
                  marks: tuple[str, str] = ("reconstruction", "ground truth")) -> Path:
    """Objective values along 1-D slices (``landscape.slice_1d`` outputs: dicts with t (n,)
    and values (n,)), one line per named slice, with vertical lines at t = 0 and t = 1 named
    by ``marks``. The y axis is logarithmic when any value is positive; values ≤ 0 (an
    exact 0 at the ground truth) are then drawn at a floor 1e-3 × the smallest positive
    value, shown as a dotted line.
    """
    if not slices:
        raise ConfigError("slice_1d_plot needs at least one slice, e.g. {'bilevel': landscape.slice_1d(...)}")
    checked = {}
    for name, item in slices.items():
        if "t" not in item or "values" not in item:
            raise ConfigError(f"slice {name!r} needs keys 't' and 'values' (the output of landscape.slice_1d)")
        t, values = _vector(f"slice {name!r} t", item["t"], finite=True), _vector(f"slice {name!r} values", item["values"])
        if len(t) != len(values):
            raise ConfigError(f"slice {name!r} has {len(t)} t values but {len(values)} objective values; they must pair up")
        checked[name] = (t, values)
    all_values = np.concatenate([v for _, v in checked.values()])
    use_log = bool(np.any(all_values[np.isfinite(all_values)] > 0))
    floor = _log_floor(all_values)[1] if use_log else None
    fig = _new_figure(5.0, 3.6)
    ax = fig.subplots()
    for name, (t, values) in checked.items():
        if floor is not None:
            values = np.where(np.isfinite(values) & (values <= 0), floor, values)
        ax.plot(t, values, "-o", markersize=3, linewidth=1.3, label=name)
    for position, label, style in ((0.0, marks[0], ":"), (1.0, marks[1], "--")):
        ax.axvline(position, color="black", linestyle=style, linewidth=1, label=f"t = {position:g}: {label}")
    if use_log:
        ax.set_yscale("log")
    if floor is not None:
        ax.axhline(floor, color="gray", linestyle=":", linewidth=0.8, label="values ≤ 0 drawn here")
    ax.set_xlabel("t  (x = start + t (end − start))")
    ax.set_ylabel("objective")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def slice_2d_plot(path: str | os.PathLike, slice2d: Mapping, title: str) -> Path:
    """log10 of the objective on a plane (``landscape.slice_2d`` output: u (n_u,), v (n_v,),
    values (n_v, n_u), points (3, 2), names), as an image with contour lines, the three
    defining points marked and labelled. Axes are plane coordinates with equal aspect, so
    distances in the plot are image-space L2 distances. Values ≤ 0 are drawn at a floor
    1e-3 × the smallest positive value, and the colour scale spans at most ``LOG_RANGE_2D``
    decades below the maximum (lower values take the lowest colour), so one grid point that
    lands on an exact minimum does not wash out the rest of the plane.
    """
    missing = [key for key in ("u", "v", "values", "points") if key not in slice2d]
    if missing:
        raise ConfigError(f"slice2d lacks {missing}; pass the output of landscape.slice_2d")
    u, v = _vector("u", slice2d["u"], finite=True), _vector("v", slice2d["v"], finite=True)
    values = np.asarray(slice2d["values"], dtype=float)
    points = np.asarray(slice2d["points"], dtype=float)
    names = tuple(slice2d.get("names", ("origin", "a", "b")))
    if values.shape != (len(v), len(u)):
        raise ConfigError(f"values has shape {values.shape}, expected (len(v), len(u)) = {(len(v), len(u))}: rows "
                          "follow v, columns follow u, as landscape.slice_2d returns them")
    if points.shape != (3, 2) or len(names) != 3:
        raise ConfigError(f"points must be (3, 2) plane coordinates with 3 names, got {points.shape} and {len(names)}")
    if len(u) < 2 or len(v) < 2:
        raise ConfigError("a plane slice needs at least 2 grid values along u and v")
    raised, _ = _log_floor(values)
    if not np.any(np.isfinite(raised) & (raised > 0)):
        raise ConfigError("the slice has no positive finite value, so it has no log10 to draw")
    logs = np.log10(np.where(np.isfinite(raised) & (raised > 0), raised, np.nan))
    logs = np.maximum(logs, np.nanmax(logs) - LOG_RANGE_2D)  # NaN (non-finite values) stays NaN: left blank
    aspect = (v[-1] - v[0]) / max(u[-1] - u[0], 1e-300)  # figure shaped like the plane (equal axes)
    fig = _new_figure(5.6, float(np.clip(4.2 * aspect, 2.2, 4.2 / 0.6)) + 0.8)
    ax = fig.subplots()
    extent = (u[0] - (u[1] - u[0]) / 2, u[-1] + (u[1] - u[0]) / 2, v[0] - (v[1] - v[0]) / 2, v[-1] + (v[1] - v[0]) / 2)
    image = ax.imshow(logs, origin="lower", extent=extent, cmap="viridis", aspect="equal", interpolation="nearest")
    if np.nanmax(logs) > np.nanmin(logs):
        ax.contour(u, v, logs, levels=8, colors="black", linewidths=0.5, alpha=0.5)
    fig.colorbar(image, ax=ax, label="log10 objective", shrink=0.8)
    for (pu, pv), name, marker in zip(points, names, ("o", "*", "s")):
        ax.plot(pu, pv, marker, color="red", markeredgecolor="black", markersize=9)
        ax.annotate(name, (pu, pv), textcoords="offset points", xytext=(6, 6), fontsize=8, color="white",
                    bbox={"boxstyle": "round,pad=0.2", "facecolor": "black", "alpha": 0.5})
    ax.set_xlabel("u (image-space distance)")
    ax.set_ylabel("v (image-space distance)")
    ax.set_title(title)
    return _save(fig, path)
