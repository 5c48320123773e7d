"""Energy landscapes of the two reconstruction objectives (Runkel et al. 2024: many minima).

Both attacks optimise mean-subtracted candidate images x (m, h, w, c). To look at their
landscapes we need each objective as a function of x *alone*:

    bilevel   f(x) = l(θ(x), θ*),   θ(x) = argmin_θ L(θ; x, y)         (outer loss, no priors)
    kkt       f(x) = min_λ Σ_p w_p (θ*_p − G_p(x, λ))²                  (λ profiled out)

Then :func:`slice_1d` evaluates f along the segment from one point to another (e.g. a
reconstruction to the ground truth) and :func:`slice_2d` on the plane through three points,
each as one compiled, vmapped call. A barrier between a reconstruction and the ground truth,
or a second basin in the plane, is the "many local minima" the paper reports.
:func:`distinct_minima` counts distinct near-best reconstructions among K runs, given each
run's objective value (e.g. its final loss); :func:`distinct_minima_report` does the same,
judging them all by the same x-only objective.

The objectives and slices are pure jax: f is jit- and vmap-able and differentiable in x
(bilevel by implicit differentiation, kkt through the linear solve). Counting minima is
host-side numpy/scipy (set distances by NCC, ``recon_jax.metrics``; Hungarian matching).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import linear_sum_assignment

from recon_jax import bilevel, checkpoint, kkt
from recon_jax.artifacts import read_json
from recon_jax.attack import descriptor
from recon_jax.errors import ConfigError, DataError
from recon_jax.metrics.neighbours import mean_squared_distances, ncc_features
from recon_jax.solvers import make_argmin

if TYPE_CHECKING:
    from recon_jax.checkpoint import Victim

DEFAULT_RIDGE = 1e-10
"""Relative ridge ρ/(tr A / q) of the profiled-λ normal equations (float64 scale)."""


# ---------------------------------------------------------------------------------------
# The objectives as functions of the images alone
# ---------------------------------------------------------------------------------------


def bilevel_objective(problem: bilevel.Problem, config: bilevel.BilevelConfig | None = None) -> Callable:
    """f(x) = l(θ(x), θ*) with θ(x) = argmin_θ L(θ; x, y), the inner solve warm-started at θ*.

    ``l`` is ``config.outer_loss`` (default relative squared L2, ‖θ(x) − θ*‖² / ‖θ*‖², see
    ``bilevel.parameter_loss``); the priors of ``bilevel.image_prior`` are left out, so this is
    the landscape of the fit alone. Shapes: x (N, h, w, c) mean-subtracted, labels y =
    ``problem.labels`` (N,); f(x) is a scalar. At the true images of a certified-stationary
    victim the warm start already satisfies the inner tolerance, so f(x_true) = 0 exactly.
    """
    config = bilevel.BilevelConfig() if config is None else config
    argmin = make_argmin(problem.objective, config.inner)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, problem.victim_params)

    def f(images: jax.Array) -> jax.Array:
        params, _ = argmin(problem.victim_params, images, problem.labels, zeros, zeros)
        return bilevel.parameter_loss(config.outer_loss, params, problem.victim_params)

    return f


def _parameter_weights(kind: str, victim_params) -> jax.Array:
    """w (P,): per-parameter weights of the stationarity residual, flattened like θ*.

    global      w_p = 1 / ‖θ*‖²                 (so Σ_p w_p r_p² = ‖r‖² / ‖θ*‖²)
    per_tensor  w_p = 1 / ‖θ*_t‖², p in tensor t (1 where θ*_t = 0, as ``kkt.stationarity``)
    """
    leaves = jax.tree_util.tree_leaves(victim_params)
    if kind == "global":
        total = sum(jnp.vdot(p, p) for p in leaves)
        return jnp.concatenate([jnp.full(p.size, 1.0 / total, p.dtype) for p in leaves])
    if kind == "per_tensor":
        scales = [jnp.vdot(p, p) for p in leaves]
        return jnp.concatenate([jnp.full(p.size, 1.0 / jnp.where(s > 0, s, 1.0), p.dtype)
                                for p, s in zip(leaves, scales)])
    raise ConfigError(f"unknown KKT stationarity {kind!r}; choose one of {', '.join(kkt.STATIONARITY)}")


def _flatten_rows(tree) -> jax.Array:
    """A pytree of leaves (q, *shape_t) -> one matrix (q, P), leaves in tree order."""
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree_util.tree_leaves(tree)], axis=1)


def profiled_stationarity(task: str, apply_fn: Callable, victim_params, images: jax.Array,
                          labels: jax.Array | None, *, stationarity: str = "global",
                          ridge: float = DEFAULT_RIDGE) -> tuple[jax.Array, jax.Array]:
    """The KKT stationarity residual with the multipliers λ profiled out: (value, λ̂).

    With g_j = ∇_θ φ_j(θ*; x_j) the per-candidate gradients (rows of J, shape (q, P); q = m
    for binary and multiclass, q = m·C for regression with C outputs; φ from ``kkt.margins``)
    and G(x, λ) = (1/m) Jᵀλ exactly as in ``kkt.combination_gradient``,

        value(x) = min_λ Σ_p w_p (θ*_p − G_p(x, λ))²                       (a scalar)

    with w from ``stationarity``: ``global`` gives ‖θ* − G‖² / ‖θ*‖² (the relative residual
    ``kkt.kkt_loss`` reports, squared), ``per_tensor`` gives Σ_t ‖θ*_t − G_t‖² / ‖θ*_t‖².
    This is a weighted linear least-squares problem in λ, solved through its q×q normal
    equations (the Gram matrix of the per-candidate gradients):

        (A + ρI) λ̂ = b,   A = J W Jᵀ / m²,   b = J W θ* / m,   ρ = ridge · tr(A) / q

    The tiny relative ridge keeps the solve defined when the g_j are linearly dependent
    (e.g. q > P) and then picks the small-norm minimiser; its bias on λ̂ is about
    ridge × cond(A). The value is computed from the residual θ* − Jᵀλ̂/m, not from the
    normal equations. Because λ̂ minimises the residual, value(x) is a function of x alone,
    a lower bound on the stationarity term of L_KKT at any λ. λ̂ is unconstrained: the
    reference's soft bound λ ≥ λ_min and the box prior are not part of it.

    Shapes: images (m, h, w, c); labels (m,) (None for regression); ``apply_fn(params,
    images) -> (m, C)`` (the *attacked* network, see ``kkt.attacked_model``); λ̂ (m,), or
    (m, C) for regression with C > 1 outputs. Memory: J holds q·P numbers. The Gram matrix
    squares J's condition number: use float64.
    """
    m = images.shape[0]

    def phi(params):
        return kkt.margins(task, apply_fn(params, images), labels)

    phi_shape = jax.eval_shape(phi, victim_params).shape
    jacobian = _flatten_rows(jax.jacrev(lambda p: phi(p).reshape(-1))(victim_params))  # J (q, P)
    theta = jnp.concatenate([leaf.ravel() for leaf in jax.tree_util.tree_leaves(victim_params)])  # (P,)
    weights = _parameter_weights(stationarity, victim_params)  # (P,)
    weighted = jacobian * weights  # J W (q, P)
    gram = weighted @ jacobian.T / m ** 2  # A (q, q)
    rhs = weighted @ theta / m  # b (q,)
    q = gram.shape[0]
    scale = jnp.maximum(jnp.trace(gram) / q, jnp.finfo(gram.dtype).tiny)
    lambdas = jnp.linalg.solve(gram + ridge * scale * jnp.eye(q, dtype=gram.dtype), rhs)
    residual = theta - jacobian.T @ lambdas / m
    value = jnp.sum(weights * residual ** 2)
    out_shape = phi_shape if len(phi_shape) == 1 or phi_shape[-1] > 1 else phi_shape[:1]
    return value, lambdas.reshape(out_shape)


def kkt_objective(problem: kkt.Problem, config: kkt.KKTConfig | None = None, hyper: kkt.Hyper | None = None,
                  ridge: float = DEFAULT_RIDGE) -> Callable:
    """f(x) = :func:`profiled_stationarity` value for ``problem``'s victim and candidate labels.

    The network is the attacked copy (``kkt.attacked_model``: modified ReLU with sharpness
    ``hyper.alpha`` for relu victims, the trained activation otherwise); the task and the
    stationarity normalisation come from ``config``. Shapes: x (m, h, w, c) -> scalar;
    ``problem.labels`` (m,) for binary and multiclass tasks (``kkt.candidate_labels``), None
    for regression.
    """
    config = kkt.KKTConfig() if config is None else config
    if config.task != "regression" and problem.labels is None:
        raise ConfigError(f"task {config.task!r} needs the candidates' labels; build them with kkt.candidate_labels "
                          "(objective_function does this from the victim's label counts)")
    hyper = kkt.Hyper(lr_x=0.0) if hyper is None else hyper
    apply_fn = kkt.attacked_model(problem.model, hyper.alpha).apply

    def f(images: jax.Array) -> jax.Array:
        value, _ = profiled_stationarity(config.task, apply_fn, problem.victim_params, images, problem.labels,
                                         stationarity=config.stationarity, ridge=ridge)
        return value

    return f


def objective_function(victim: Victim, method: str, *, labels=None,
                       bilevel_config: bilevel.BilevelConfig | None = None,
                       kkt_config: kkt.KKTConfig | None = None, kkt_hyper: kkt.Hyper | None = None,
                       ridge: float = DEFAULT_RIDGE, **options) -> Callable[[jax.Array], jax.Array]:
    """The attack objective of ``method`` against ``victim`` as f(x) -> scalar.

    x are mean-subtracted candidate images (m, h, w, c), the space the attacks optimise in.
    The objective is the registered method's (``attack.descriptor(method).objective``), given
    ``labels``, ``ridge`` and the keyword options that are not None: ``bilevel_config`` for
    bilevel, ``kkt_config`` and ``kkt_hyper`` for KKT, ``options`` for other registered
    methods. An unregistered ``method`` raises ``ConfigError`` naming the registered ones.

    ``bilevel``: f(x) = l(θ(x), θ*) (:func:`bilevel_objective`); m = N and ``labels``
    default to the known class-balanced ``victim.known_labels()`` (sorted by class, so the
    ground truth must be sorted by label too, see ``reconstruct.sorted_ground_truth``).

    ``kkt``: f(x) = min_λ ‖θ* − (1/m) Σ_j λ_j ∇_θ φ_j(θ*; x_j)‖² / ‖θ*‖² (with ``global``
    stationarity; see :func:`profiled_stationarity`). λ is **profiled out** (solved for
    exactly at each x), so the value is a function of x alone. The task defaults to the
    one ``recon-jax reconstruct`` derives from the victim's loss; ``labels`` default to
    ``kkt.candidate_labels(victim.label_counts, m)`` for the m candidates passed in; α
    comes from ``kkt_hyper`` (default 300) for relu victims.
    """
    options = {"bilevel_config": bilevel_config, "kkt_config": kkt_config, "kkt_hyper": kkt_hyper, **options}
    given = {name: value for name, value in options.items() if value is not None}
    return descriptor(method).objective(victim, labels=labels, ridge=ridge, **given)


class BestRun(NamedTuple):
    """A finished run's best (lowest-loss, non-diverged) reconstruction and the objective it saw."""

    objective: Callable[[jax.Array], jax.Array]  # f(x), the method's objective (``objective_function``)
    victim: Victim  # loaded in the run's dtype
    run: dict  # run.json
    ranking: list[int]  # the non-diverged runs, best first
    centered: np.ndarray  # (K, N, h, w, c): every run's mean-subtracted reconstruction
    labels: np.ndarray  # (N,): the slots' labels


def best_run_objective(victim_dir, run_dir, spec) -> BestRun | None:
    """The objective of a finished run's method as its best run saw it, in the run's dtype.

    Reads ``run_dir``'s run.json and reconstructions.npz and the victim in ``victim_dir``
    (θ* cast to the run's dtype: KKT runs default to float32), and builds f(x) with the
    method's own options for that run (``attack.Method.objective_options``; KKT: the best run's
    α). ``spec`` is the run's ``ReconstructionSpec``. Returns None when every run diverged.
    Used by the study's landscapes and by the swap test (``recon_jax.swap``).
    """
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    ranking = [r for r in run["ranking"] if not run["diverged"][r]]
    if not ranking:
        return None
    victim = checkpoint.load_victim(victim_dir, dtype=run.get("dtype", spec.dtype))
    with np.load(run_dir / "reconstructions.npz", allow_pickle=False) as f:
        centered, labels = f["centered"], np.asarray(f["labels"])
    f = objective_function(victim, spec.method, labels=labels,
                           **descriptor(spec.method).objective_options(spec, run, ranking[0]))
    return BestRun(objective=f, victim=victim, run=run, ranking=ranking, centered=centered, labels=labels)


# ---------------------------------------------------------------------------------------
# Slices
# ---------------------------------------------------------------------------------------


def evaluate_points(f: Callable, points: jax.Array, batch_size: int | None) -> np.ndarray:
    """f on each of points (B, *shape): one vmapped, jitted call over all B, or (to bound
    memory) the same program over batches of ``batch_size`` points, the last batch padded by
    repeating its final point so that one compilation serves every batch. -> (B,) numpy.

    The batches run from Python rather than inside ``lax.map``: XLA:CPU (JAX 0.10) was seen to
    hang for good on a ``lax.map`` whose body holds the KKT objective's linear solve."""
    run = jax.jit(jax.vmap(f))
    if batch_size is None or batch_size >= len(points):
        return np.asarray(run(points))
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 or None, got {batch_size}")
    values = []
    for start in range(0, len(points), batch_size):
        chunk = points[start:start + batch_size]
        size = len(chunk)
        if size < batch_size:
            chunk = jnp.concatenate([chunk, jnp.repeat(chunk[-1:], batch_size - size, axis=0)])
        values.append(np.asarray(run(chunk))[:size])
    return np.concatenate(values)


def _as_image_set(name: str, value, reference_shape=None) -> jax.Array:
    value = jnp.asarray(value)
    if value.ndim != 4:
        raise ConfigError(f"{name} must be a set of images (m, h, w, c), got shape {tuple(value.shape)}")
    if reference_shape is not None and tuple(value.shape) != tuple(reference_shape):
        raise ConfigError(f"{name} has shape {tuple(value.shape)} but the first point has {tuple(reference_shape)}; "
                          "all points must be image sets of the same shape")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(jnp.zeros(()).dtype)
    return value


def _check_grid(n: int, extend: float) -> None:
    if int(n) != n or n < 2:
        raise ConfigError(f"n must be an integer >= 2, got {n}")
    if not extend >= 0:
        raise ConfigError(f"extend must be >= 0, got {extend}")


def slice_1d(f: Callable, start, end, n: int = 21, extend: float = 0.25, *,
             batch_size: int | None = None) -> dict:
    """f along the line x(t) = start + t (end − start), t ∈ [−extend, 1 + extend].

    start, end: image sets (m, h, w, c) of the same shape (e.g. a reconstruction and the
    ground truth). Returns numpy arrays

        t (n,)          evenly spaced; grid points within 1e-9 of a step of 0 or 1 are set
                        to exactly 0 and 1 (they are on the grid when (n − 1)·extend /
                        (1 + 2·extend) is an integer, e.g. n = 13, extend = 0.25)
        values (n,)     f(x(t))
        start_value     f(x(0)) = f(start), end_value f(x(1)) = f(end): always evaluated
        distance        ‖end − start‖₂ over all pixels (t = 1 is this far from t = 0)

    all n + 2 points in one compiled call (see ``batch_size`` in :func:`slice_2d`).
    """
    _check_grid(n, extend)
    start = _as_image_set("start", start)
    end = _as_image_set("end", end, start.shape)
    t = np.linspace(-extend, 1.0 + extend, int(n))
    step = (1.0 + 2.0 * extend) / (n - 1)
    for mark in (0.0, 1.0):
        t[np.abs(t - mark) <= 1e-9 * step] = mark
    ts = jnp.asarray(np.concatenate([t, [0.0, 1.0]]), start.dtype)
    direction = end - start
    points = start[None] + ts[:, None, None, None, None] * direction[None]
    values = evaluate_points(f, points, batch_size)
    return {"t": t, "values": values[:n], "start_value": float(values[n]), "end_value": float(values[n + 1]),
            "distance": float(jnp.linalg.norm(direction))}


def plane_basis(origin, a, b) -> tuple[jax.Array, jax.Array, np.ndarray]:
    """Orthonormal basis of the plane through three image sets, by Gram–Schmidt:

        e₁ = (a − o) / ‖a − o‖,   e₂ = r / ‖r‖,   r = (b − o) − ⟨b − o, e₁⟩ e₁

    (inner products over all pixels). Returns (e₁, e₂, coordinates (3, 2)), the rows being
    the plane coordinates of o = (0, 0), a = (‖a − o‖, 0) and b = (⟨b − o, e₁⟩, ‖r‖), so
    plane distances are image-space L2 distances. Raises ConfigError if the points are
    (numerically) collinear.
    """
    da, db = a - origin, b - origin
    norm_a = jnp.linalg.norm(da)
    if not float(norm_a) > 0:
        raise ConfigError("the first two points of the plane coincide; pass three distinct image sets")
    e1 = da / norm_a
    along = jnp.vdot(db, e1)
    r = db - along * e1
    norm_r = jnp.linalg.norm(r)
    if not float(norm_r) > 1e-12 * max(float(norm_a), float(jnp.linalg.norm(db))):
        raise ConfigError("the three points are collinear, so they span no plane; use slice_1d, or pick a "
                          "third point off the line (e.g. another reconstruction)")
    coordinates = np.array([[0.0, 0.0], [float(norm_a), 0.0], [float(along), float(norm_r)]])
    return e1, r / norm_r, coordinates


def slice_2d(f: Callable, origin, a, b, n: int = 11, extend: float = 0.25, *,
             names: Sequence[str] = ("origin", "a", "b"), batch_size: int | None = None) -> dict:
    """f on the plane through three image sets (m, h, w, c), e.g. a reconstruction (origin),
    the ground truth (a) and a second reconstruction (b).

    With the orthonormal basis e₁, e₂ of :func:`plane_basis`, the point at plane
    coordinates (u, v) is x(u, v) = origin + u e₁ + v e₂. u and v each take n evenly spaced
    values covering the three points' coordinates, widened by ``extend`` × their span on
    each side. Returns numpy arrays

        u (n,), v (n,)
        values (n, n)     values[i, j] = f(x(u[j], v[i]))   (rows follow v: imshow layout)
        points (3, 2)     plane coordinates of origin, a, b
        point_values (3,) f at x(points[k]), the three defining points
        names             ``names``, the labels of the three points

    All n² + 3 evaluations run in one compiled program: vmapped over all of them, or with
    ``batch_size`` over vmapped batches of that size (less memory; the
    bilevel inner solver under vmap runs until the slowest point of a batch converges).
    """
    _check_grid(n, extend)
    if len(names) != 3:
        raise ConfigError(f"names must label the three points, got {len(names)} names")
    origin = _as_image_set("origin", origin)
    a = _as_image_set("a", a, origin.shape)
    b = _as_image_set("b", b, origin.shape)
    e1, e2, coordinates = plane_basis(origin, a, b)

    def axis(values):
        lo, hi = float(np.min(values)), float(np.max(values))
        pad = extend * (hi - lo)
        return np.linspace(lo - pad, hi + pad, int(n))

    u, v = axis(coordinates[:, 0]), axis(coordinates[:, 1])
    uu, vv = np.meshgrid(u, v)  # (n, n), [i, j] = (u[j], v[i])
    plane = np.concatenate([np.stack([uu.ravel(), vv.ravel()], axis=1), coordinates])  # (n² + 3, 2)
    plane = jnp.asarray(plane, origin.dtype)
    points = (origin[None] + plane[:, 0, None, None, None, None] * e1[None]
              + plane[:, 1, None, None, None, None] * e2[None])
    values = evaluate_points(f, points, batch_size)
    return {"u": u, "v": v, "values": values[: n * n].reshape(n, n), "points": coordinates,
            "point_values": values[n * n:], "names": tuple(names)}


# ---------------------------------------------------------------------------------------
# Distinct minima judged by the x-only objective
# ---------------------------------------------------------------------------------------


class DistinctMinima(NamedTuple):
    count: int
    """How many pairwise-distinct reconstructions there are among the near-best runs."""
    candidates: NDArray[np.int64]
    """Run indices with objective ≤ best + objective_tol, best objective first."""
    representatives: NDArray[np.int64]
    """The run index of each distinct minimum (``count`` of them), in candidate order."""
    assignment: NDArray[np.int64]
    """``(len(candidates),)``: for each candidate, the run index of its representative."""
    distances: NDArray[np.float64]
    """``(len(candidates), len(candidates))``: the set distance between candidate runs."""


def distinct_minima(
    images: ArrayLike,
    objective_values: ArrayLike,
    objective_tol: float,
    distance_threshold: float,
    *,
    metric: str = "ncc",
    downsample: bool = False,
    match: bool = True,
) -> DistinctMinima:
    """Count distinct local minima among near-best reconstructions from K initialisations.

    Definition. Runs whose objective is within ``objective_tol`` of the best,
    f_k ≤ min_j f_j + tol (NaN objectives excluded), are the candidates: they reach
    (numerically) equally good minima. The distance between two candidate runs k, l, each a
    set of n images, is

        Δ(k, l) = min_π (1/n) Σ_i d(x_{k,i}, x_{l,π(i)})     (``match=True``)
        Δ(k, l) = (1/n) Σ_i d(x_{k,i}, x_{l,i})               (``match=False``)

    with d the per-image distance of ``metrics.ncc_distances`` (``metric="ncc"``: 2(1 − ρ̄), in
    [0, 4]; ``metric="l2"``: mean squared pixel difference). Matching over permutations π
    (Hungarian) is the default because the objectives are invariant to permuting candidate
    images that share a label, so a permuted copy of the same set is the same minimum.
    Greedy clustering then walks the candidates from the best objective down; a candidate
    whose Δ to every representative so far exceeds ``distance_threshold`` becomes a new
    representative, otherwise it joins its closest representative. ``count`` is the number
    of representatives.

    Args:
      images: ``(K, n, h, w, c)`` reconstructions (mean-subtracted or not: NCC does not mind).
      objective_values: ``(K,)`` final objective of each run (lower is better).
    """
    images = np.asarray(images, dtype=np.float64)
    objective_values = np.asarray(objective_values, dtype=np.float64).ravel()
    if images.ndim != 5 or images.shape[0] != objective_values.shape[0]:
        raise DataError(
            f"expected images (K, n, h, w, c) and objective_values (K,), got {images.shape} and {objective_values.shape}")
    if metric not in ("ncc", "l2"):
        raise ConfigError(f"unknown metric {metric!r}; choose 'ncc' or 'l2'")
    finite = ~np.isnan(objective_values)
    if not finite.any():
        raise DataError("every objective value is NaN")
    best = np.min(objective_values[finite])
    within = finite & (objective_values <= best + objective_tol)
    candidates = np.flatnonzero(within)
    candidates = candidates[np.argsort(objective_values[candidates], kind="stable")]
    n_images = images.shape[1]
    features = ncc_features(images[candidates].reshape(-1, *images.shape[2:]), downsample, metric == "ncc")
    features = features.reshape(len(candidates), n_images, -1)
    set_distances = np.zeros((len(candidates), len(candidates)))
    for a in range(len(candidates)):
        for b in range(a + 1, len(candidates)):
            per_image = mean_squared_distances(features[a], features[b])
            if match:
                rows, cols = linear_sum_assignment(per_image)
                value = per_image[rows, cols].mean()
            else:
                value = np.trace(per_image) / n_images
            set_distances[a, b] = set_distances[b, a] = value
    representatives: list[int] = []  # positions in `candidates`
    assignment = np.empty(len(candidates), np.int64)
    for position in range(len(candidates)):
        if representatives:
            gaps = set_distances[position, representatives]
            closest = int(np.argmin(gaps))
            if gaps[closest] <= distance_threshold:
                assignment[position] = candidates[representatives[closest]]
                continue
        representatives.append(position)
        assignment[position] = candidates[position]
    return DistinctMinima(
        count=len(representatives),
        candidates=candidates,
        representatives=candidates[representatives],
        assignment=assignment,
        distances=set_distances,
    )


def distinct_minima_report(f: Callable, images, *, objective_tol: float, distance_threshold: float,
                           batch_size: int | None = None, **options) -> dict:
    """:func:`distinct_minima` over K runs, each judged by the same x-only objective f.

    A run's own final loss is not comparable across methods (L_KKT depends on its λ and
    penalties; the bilevel loss on its last inner solve). Here f(x_k) is recomputed for
    every run's images x_k (K, m, h, w, c) in one compiled call, then runs with
    f(x_k) ≤ min_l f(x_l) + objective_tol are clustered by set distance (see
    :func:`distinct_minima`; ``options``: metric, downsample, match).

    Returns a dict: objective_values (K,), and count, candidates, representatives,
    assignment, distances from :class:`DistinctMinima`.
    """
    images = jnp.asarray(images)
    if images.ndim != 5:
        raise ConfigError(f"images must be K runs of image sets (K, m, h, w, c), got shape {tuple(images.shape)}")
    values = evaluate_points(f, images, batch_size)
    result = distinct_minima(np.asarray(images), values, objective_tol, distance_threshold, **options)
    return {"objective_values": values, **result._asdict()}
