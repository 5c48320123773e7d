"""Reconstruction runs: a victim folder in, a run folder out. The API behind ``recon-jax
reconstruct`` and ``recon-jax sweep``, for both methods.

    reconstruct(victim_dir, out_dir, ReconstructionSpec(method="bilevel" | "kkt", ...)) -> summary

A run is K = initialisations × hyperparameter settings of one method, executed as one
vmapped, chunked, resumable program (``recon_jax.batching``). The settings come either from
a grid (comma lists on the command line) or from the reference's random search
(``random_search=R``: R sampled configurations, each with its own initial scale). It writes

    out_dir/reconstructions.npz   images, init_images (K, m, h, w, c) in [0,1] (``IMAGE_MAPPING``,
                                  the protocol's "minmax", stored as image_mapping); centered and
                                  init_centered (mean-subtracted, as optimised); labels (m,)
    out_dir/history.npz           per step (K, steps): the method's record (bilevel:
                                  outer_loss, objective, inner_grad_norm, inner_iterations,
                                  adjoint_iterations, cg_residual, cost_gradients, cost_hvps,
                                  refresh_correction (amortized engine); kkt: kkt_loss and
                                  its terms)
    out_dir/run.json              resolved spec, versions, seconds, final_outer_loss (K: the
                                  relative outer loss for bilevel, L_KKT for kkt), diverged (K),
                                  each run's hyperparameters, and the runs ranked best first;
                                  dtype (the run's), victim_dtype, dtype_note (why θ* was cast,
                                  or null); then the method's own fields (``Method.summary_extras``;
                                  bilevel: the inner_tol and cg_tol used, the engine, and
                                  cost_per_step = {gradients, hvps} (per outer step and
                                  initialisation, averaged over the run))
    out_dir/pooled.npz            (``pool`` > 0) the candidates of the best runs, pooled
    out_dir/chunks/               resumable per-chunk state (removed when the run completes)

Precision: a run computes and stores in one dtype (``reconstructions.npz["centered"]`` and
``history.npz`` have it): ``spec.dtype`` if given, else the method's ``default_dtype``
(``attack.descriptor``: float32 for KKT, safe per ``benchmarks/precision.py``), else the
victim's training dtype (bilevel). θ* is cast to it on loading, with a logged warning and
``run.json["dtype_note"]`` when that changes it.
Inner tolerances left None are resolved from it (``recon_jax.precision.default_tolerances``).

The attacks use only θ*, the architecture and recipe (victim.json) and the label counts.
The victim's ``data.npz`` is read for evaluation-side work only: mapping results to [0,1]
with the training mean, and the initialisations that the paper studies as oracles
(``gt-noise``, ``interp``) or that use the held-out pool as public data (``heldout``, ``mean``).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from recon_jax import attack as attack_protocol
from recon_jax import bilevel, checkpoint, kkt, memory, metrics
from recon_jax.artifacts import atomic_save_npz, atomic_write_json, json_roundtrip, read_json, versions
from recon_jax.batching import auto_chunk_size, check_fits, run_batched, select_devices
from recon_jax.errors import ConfigError
from recon_jax.initialisation import initial_images, parse_init
from recon_jax.precision import resolve_dtype
from recon_jax.problems import default_kkt_task, problem_from_victim

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ReconstructionSpec:
    """One run: initialisations × hyperparameters of one method against one victim.

    Grid mode (``random_search=None``): ``learning_rate`` and the method's weights take one
    value or a tuple; K = n_inits × grid size, initialisation-major (every setting sees the
    same initial images). Random-search mode (``random_search=R``): R configurations are
    drawn as in the reference (``kkt.sample_hyper``, or log-uniform lr and init scale for
    bilevel, ``bilevel.search_ranges``), each run with its own gaussian initial scale;
    K = n_inits × R. ``method`` names a registered method (``PROGRAMS`` and ``attack.METHODS``).
    """

    method: str = "bilevel"
    init: str = "gaussian:0.1"
    n_inits: int = 16
    seed: int = 0
    learning_rate: float | tuple[float, ...] = 0.01  # bilevel: outer lr; kkt: lr on x
    box_weight: float | tuple[float, ...] = 0.0  # bilevel prior weights
    tv_weight: float | tuple[float, ...] = 0.0
    lr_lambda: float = kkt.REFERENCE_LR_LAMBDA  # kkt
    alpha: float | tuple[float, ...] = 300.0  # kkt (relu victims)
    lambda_min: float | tuple[float, ...] = 0.05  # kkt
    n_candidates: int | None = None  # kkt: m (default 2N)
    random_search: int | None = None
    search_ranges: dict | None = None  # random search: {name: (lo, hi)} overriding the default ranges
    pool: int = 0  # pool the candidates of this many best runs into pooled.npz
    chunk_size: int | None = None  # None: chosen from free memory
    devices: int | None = None  # local devices the batch is sharded over; None: all
    segment: int = 100  # steps between checkpoints
    dtype: str | None = None  # None: the method's default_dtype (kkt float32), else the victim's (bilevel)
    bilevel: bilevel.BilevelConfig = bilevel.BilevelConfig()
    kkt: kkt.KKTConfig | None = None  # None: derived from the victim (task from its loss)

    def __post_init__(self):
        if self.method not in PROGRAMS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(PROGRAMS)}")
        parse_init(self.init)
        if self.n_inits < 1:
            raise ConfigError(f"--n-inits must be >= 1, got {self.n_inits}")
        if not all(lr > 0 for lr in _values(self.learning_rate)) or not self.lr_lambda > 0:
            raise ConfigError(f"learning rates must be > 0, got {self.learning_rate} and {self.lr_lambda}")
        if any(w < 0 for w in _values(self.box_weight) + _values(self.tv_weight)):
            raise ConfigError("prior weights must be >= 0")
        if self.random_search is not None and self.random_search < 1:
            raise ConfigError(f"--runs must be >= 1, got {self.random_search}")
        if self.search_ranges:
            if self.random_search is None:
                raise ConfigError("search ranges apply to a random search only; use `recon-jax sweep --runs R`")
            attack_protocol.descriptor(self.method).validate_search_ranges(self.search_ranges)
        if self.segment < 1 or self.pool < 0:
            raise ConfigError("segment must be >= 1 and pool >= 0")
        if self.devices is not None and (isinstance(self.devices, bool) or not isinstance(self.devices, int)
                                         or self.devices < 1):
            raise ConfigError(f"--devices must be a positive integer, got {self.devices!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def kkt_config(self, victim: checkpoint.Victim | None) -> kkt.KKTConfig:
        if self.kkt is not None:
            return self.kkt
        if victim is None:
            return kkt.KKTConfig()
        return kkt.KKTConfig(task=default_kkt_task(victim.train_config.loss, victim.train_config.weight_decay))


def _values(value) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else (float(value),)


@dataclasses.dataclass
class Program:
    """A method made ready for ``run_batched``: single-run functions and batched inputs."""

    init: Callable
    run: Callable
    finish: Callable
    start: object  # pytree with leading axis K
    hyper: object  # pytree with leading axis K
    labels: np.ndarray  # (m,) labels of the m reconstructed images
    init_centered: np.ndarray  # (K, m, h, w, c)
    run_settings: dict  # name -> list (K) of per-run hyperparameters, for run.json
    final_loss: str  # key of ``finish`` that is the run's objective
    bytes_per_run: int
    steps: int
    fixed_bytes: int = 0  # device memory shared by all runs on a device (θ*), see recon_jax.memory


def bytes_per_init(victim: checkpoint.Victim, config: bilevel.BilevelConfig, itemsize: int, segment: int = 100) -> int:
    """Device bytes of one bilevel run (``recon_jax.memory.for_bilevel``: L-BFGS history, other
    θ-sized vectors, images and optimiser moments, activations, history records)."""
    return memory.for_bilevel(victim, config, itemsize, segment).per_init


def _runs(spec: ReconstructionSpec, grid_names: tuple[str, ...], grid_values: tuple, sampled: dict | None,
          n_settings: int) -> dict:
    """Per-run hyperparameter lists (K,), initialisation-major."""
    if sampled is not None:
        return {name: np.tile(np.asarray(v), spec.n_inits) for name, v in sampled.items()}
    grid = np.asarray(list(itertools.product(*grid_values)), float).reshape(n_settings, len(grid_names))
    return {name: np.tile(grid[:, i], spec.n_inits) for i, name in enumerate(grid_names)}


def _starting_images(spec, labels, victim, truth, dtype, n_settings, init_scale):
    """x₀ (K, m, h, w, c): n_inits draws, each repeated for the n_settings hyperparameter settings;
    in random-search mode with a gaussian init, each run is scaled by its own sampled σ."""
    init_spec = parse_init(spec.init)
    if init_scale is not None and init_spec.kind == "gaussian":
        unit = initial_images(parse_init("gaussian:1"), spec.n_inits, labels, victim.image_shape, seed=spec.seed,
                              dtype=dtype)
        # The σ draws are float64 (numpy): cast, or a float32 run would start from float64 images.
        scale = np.tile(init_scale, spec.n_inits)[:, None, None, None, None]
        return (np.repeat(unit, n_settings, axis=0) * scale).astype(dtype)
    x0 = initial_images(init_spec, spec.n_inits, labels, victim.image_shape, seed=spec.seed,
                        ground_truth=truth, dtype=dtype)
    return np.repeat(x0, n_settings, axis=0)


def _program(attack: attack_protocol.Attack, start, hyper, labels, x0, runs, estimate: memory.Estimate,
             steps: int) -> Program:
    """A ``Program`` from an attack's functions and the batched inputs (leading axis K)."""
    return Program(init=attack.init_state, run=attack.run_steps, finish=attack.evaluate, start=start, hyper=hyper,
                   labels=labels, init_centered=x0, run_settings=runs, final_loss=attack.final_loss,
                   bytes_per_run=estimate.per_init, steps=steps, fixed_bytes=estimate.fixed)


def _memory_estimate(victim: checkpoint.Victim, attack: attack_protocol.Attack, start, hyper, segment: int,
                     steps: int, formula: Callable[[], memory.Estimate]) -> memory.Estimate:
    """Device bytes of one run: the method's formula (``recon_jax.memory``) where the victim's
    architecture has one, otherwise the compiled probe ``memory.probe_estimate`` on the first
    run's inputs (the batched ``start`` and ``hyper`` have a leading axis K)."""
    if memory.has_formula(victim.model):
        return formula()
    first = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)
    return memory.probe_estimate(attack.init_state, attack.run_steps, attack.evaluate, first(start), first(hyper),
                                 min(segment, max(steps, 1)))


def _bilevel_program(spec: ReconstructionSpec, victim, truth, dtype) -> Program:
    config = spec.bilevel
    problem = problem_from_victim(victim)
    labels = np.asarray(problem.labels)
    sampled = init_scale = None
    if spec.random_search:
        rng = np.random.default_rng(spec.seed + 1)
        log_u = lambda bounds: np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]), spec.random_search))
        ranges = bilevel.search_ranges(spec.search_ranges)
        sampled = {"learning_rate": log_u(ranges["lr"]),
                   "box_weight": np.full(spec.random_search, _values(spec.box_weight)[0]),
                   "tv_weight": np.full(spec.random_search, _values(spec.tv_weight)[0])}
        init_scale = log_u(ranges["init_scale"])
        n_settings = spec.random_search
    else:
        n_settings = len(_values(spec.learning_rate)) * len(_values(spec.box_weight)) * len(_values(spec.tv_weight))
    runs = _runs(spec, ("learning_rate", "box_weight", "tv_weight"),
                 (_values(spec.learning_rate), _values(spec.box_weight), _values(spec.tv_weight)), sampled, n_settings)
    x0 = _starting_images(spec, labels, victim, truth, dtype, n_settings, init_scale)
    if init_scale is not None:
        runs["init_scale"] = np.tile(init_scale, spec.n_inits)
    hyper = bilevel.Hyper(**{k: jnp.asarray(runs[k], dtype) for k in ("learning_rate", "box_weight", "tv_weight")})
    attack = attack_protocol.attacks()["bilevel"](config, problem)
    start = jnp.asarray(x0)
    estimate = _memory_estimate(victim, attack, start, hyper, spec.segment, config.steps,
                                lambda: memory.for_bilevel(victim, config, np.dtype(dtype).itemsize, spec.segment))
    return _program(attack, start, hyper, labels, x0, runs, estimate, config.steps)


def _kkt_program(spec: ReconstructionSpec, victim, truth, dtype) -> Program:
    config = spec.kkt_config(victim)
    problem = kkt.problem_from_victim(victim, config.task, spec.n_candidates, config.box)
    m = 2 * victim.n_train if spec.n_candidates is None else spec.n_candidates
    labels = (np.asarray(problem.labels) if problem.labels is not None
              else np.resize(victim.known_labels(), m))  # regression: labels only pair oracle inits
    sampled = init_scale = None
    if spec.random_search:
        hyper, scale = kkt.sample_hyper(jax.random.key(spec.seed + 1), spec.random_search, spec.lr_lambda, dtype,
                                        spec.search_ranges)
        sampled = {"lr_x": hyper.lr_x, "lr_lambda": hyper.lr_lambda, "alpha": hyper.alpha,
                   "lambda_min": hyper.lambda_min}
        init_scale, n_settings = np.asarray(scale), spec.random_search
    else:
        n_settings = len(_values(spec.learning_rate)) * len(_values(spec.alpha)) * len(_values(spec.lambda_min))
    runs = _runs(spec, ("lr_x", "lr_lambda", "alpha", "lambda_min"),
                 (_values(spec.learning_rate), (spec.lr_lambda,), _values(spec.alpha), _values(spec.lambda_min)),
                 sampled, n_settings)
    x0 = _starting_images(spec, labels, victim, truth, dtype, n_settings, init_scale)
    if init_scale is not None:
        runs["init_scale"] = np.tile(init_scale, spec.n_inits)
    n_outputs = victim.model.n_out if config.task == "regression" else 1
    keys = jax.random.split(jax.random.key(spec.seed + 2), len(x0))
    lambdas = jax.vmap(lambda k: kkt.initial_lambdas(k, m, config.task, n_outputs, dtype))(keys)
    hyper = kkt.Hyper(**{k: jnp.asarray(runs[k], dtype) for k in ("lr_x", "lr_lambda", "alpha", "lambda_min")})
    attack = attack_protocol.attacks()["kkt"](config, problem)
    start = (jnp.asarray(x0), lambdas)
    estimate = _memory_estimate(victim, attack, start, hyper, spec.segment, config.steps,
                                lambda: memory.for_kkt(victim, config, m, np.dtype(dtype).itemsize, spec.segment))
    return _program(attack, start, hyper, labels, x0, runs, estimate, config.steps)


PROGRAMS: dict[str, Callable] = {}
"""Program builders by method: ``PROGRAMS[method](spec, victim, truth, dtype) -> Program``."""


def register_method(name: str, build: Callable) -> Callable:
    """Register a program builder for ``ReconstructionSpec.method == name`` (one line per method)."""
    PROGRAMS[name] = build
    return build


register_method("bilevel", _bilevel_program)
register_method("kkt", _kkt_program)


def sorted_ground_truth(directory) -> dict | None:
    """The victim's data.npz with training images sorted by label (stable), or None if absent."""
    path = Path(directory) / checkpoint.DATA_FILE
    if not path.is_file():
        return None
    truth = checkpoint.load_ground_truth(directory)
    order = np.argsort(truth["train_labels"], kind="stable")
    truth["train_images"] = truth["train_images"][order]
    truth["train_labels"] = truth["train_labels"][order]
    return truth


IMAGE_MAPPING = metrics.PROTOCOL_MAPPING
"""How ``images``/``init_images`` in reconstructions.npz (and pooled.npz) are mapped to [0,1]:
the evaluation protocol's "minmax", so the stored images are the ones ``recon-jax evaluate``
scores. Recorded as ``image_mapping`` in run.json and in both files."""


def to_unit(centered: np.ndarray, truth: dict | None, mapping: str = IMAGE_MAPPING) -> tuple[np.ndarray, str]:
    """Map mean-subtracted images to [0,1] with ``metrics.to_unit`` under ``mapping``
    (``metrics.IMAGE_MAPPINGS``), as float32; and the mapping's description for run.json.
    Without ground truth (no data.npz) the mean is unknown and taken as 0, which only
    "minmax" tolerates: it then scales each mean-subtracted image to [0,1]."""
    metrics.check_mapping(mapping)
    if truth is None and mapping != "minmax":
        raise ConfigError(f'the "{mapping}" mapping to [0,1] needs the training mean, from the victim\'s data.npz')
    images = np.asarray(metrics.to_unit(centered, None if truth is None else truth["mean"], mapping), np.float32)
    note = "" if truth is not None else " (no data.npz: without the training mean)"
    return images, metrics.IMAGE_MAPPINGS[mapping] + note


def rank_runs(final_loss: np.ndarray, diverged: np.ndarray) -> np.ndarray:
    """Run indices best first: by final loss, diverged or non-finite runs last."""
    key = np.where(diverged | ~np.isfinite(final_loss), np.inf, final_loss)
    return np.argsort(key, kind="stable")


def requested_dtype(spec: ReconstructionSpec) -> str | None:
    """The dtype a run asks for: ``spec.dtype``, else its method's ``default_dtype``
    (``attack.descriptor``); None means the victim's training dtype."""
    return spec.dtype or attack_protocol.descriptor(spec.method).default_dtype


def cast_note(spec: ReconstructionSpec, victim_dtype: str, dtype: str) -> str | None:
    """Why θ* (trained in ``victim_dtype``) runs in ``dtype``; None when they agree."""
    if victim_dtype == dtype:
        return None
    reason = attack_protocol.descriptor(spec.method).dtype_reason
    why = (f"the {spec.method} attack runs in {dtype} unless a dtype is given{f' ({reason})' if reason else ''}; "
           "pass --dtype float64 (spec.dtype='float64') to keep float64"
           if spec.dtype is None else f"dtype {dtype} was asked for")
    return f"theta* (trained in {victim_dtype}) cast to {dtype}: {why}"


def resolved_spec(spec: ReconstructionSpec, dtype) -> ReconstructionSpec:
    """``spec`` with the bilevel inner tolerances left None resolved from ``dtype``
    (``InnerConfig.resolved``, i.e. ``recon_jax.precision.default_tolerances``). Logs the
    method's warnings about the resolved spec (``Method.spec_warnings``; bilevel: a float32 run
    given a tolerance float32 cannot reach)."""
    inner = spec.bilevel.inner.resolved(dtype)
    resolved = dataclasses.replace(spec, bilevel=dataclasses.replace(spec.bilevel, inner=inner))
    warnings = attack_protocol.descriptor(spec.method).spec_warnings
    for message in warnings(resolved, dtype) if warnings is not None else ():
        log.warning("%s", message)
    return resolved


def run_identity(victim_dir: str | os.PathLike, spec: ReconstructionSpec) -> dict:
    """What a run folder's results depend on: the victim folder and the spec. The device count
    is not part of it: results do not depend on it, so a run interrupted on one machine may
    resume on another (batching keeps the saved chunk size)."""
    return json_roundtrip({"victim": str(Path(victim_dir).resolve()),
                           **{k: v for k, v in spec.to_json().items() if k != "devices"}})


FUNCTION_CACHE_SIZE = 8
_FUNCTIONS: collections.OrderedDict = collections.OrderedDict()
DATA_FIELDS = ("init", "seed", "n_inits")
"""Spec fields that only change a run's inputs (the starting images), never its single-run functions."""


def _reuse_functions(program: Program, victim_dir, spec: ReconstructionSpec, dtype) -> None:
    """Give ``program`` the single-run functions of an earlier run with the same victim (same
    folder and files) and the same spec up to ``DATA_FIELDS``, so that ``run_batched`` reuses
    that run's traced and compiled programs (``recon_jax.batching``): a study's cells differ
    only in their initialisations. The functions are equal by construction (built from equal
    configs and the same victim files), so results are unchanged (tested)."""
    folder = Path(victim_dir).resolve()
    files = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file())
    identity = {k: v for k, v in run_identity(victim_dir, spec).items() if k not in DATA_FIELDS}
    key = json.dumps([identity, files, np.dtype(dtype).name], sort_keys=True, default=str)
    functions = _FUNCTIONS.pop(key, None) or (program.init, program.run, program.finish)
    _FUNCTIONS[key] = functions
    while len(_FUNCTIONS) > FUNCTION_CACHE_SIZE:
        _FUNCTIONS.popitem(last=False)
    program.init, program.run, program.finish = functions


def reconstruct(victim_dir: str | os.PathLike, out_dir: str | os.PathLike, spec: ReconstructionSpec, *,
                overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """Run ``spec`` against the victim in ``victim_dir`` and write ``out_dir`` (see module doc).

    A finished ``out_dir`` with the same spec is returned as is; an interrupted one resumes.
    """
    out_dir = Path(out_dir)
    method = attack_protocol.descriptor(spec.method)
    requested = requested_dtype(spec)
    victim = checkpoint.load_victim(victim_dir, dtype=requested)  # θ* cast to the run's dtype here
    dtype = resolve_dtype(requested or victim.train_config.dtype)
    dtype_note = cast_note(spec, victim.train_config.dtype, dtype.name)
    run_spec = resolved_spec(spec, dtype)
    spec_json = run_identity(victim_dir, spec)
    if (out_dir / "run.json").is_file() and not overwrite:
        saved = read_json(out_dir / "run.json")
        if saved.get("spec") == spec_json:
            log.info("%s already holds this run; reusing it", out_dir)
            return saved
        raise ConfigError(f"{out_dir} already holds a different run; choose another --out or pass --overwrite")
    if overwrite and out_dir.exists():
        for name in ("run.json", "reconstructions.npz", "history.npz", "pooled.npz", "spec.json"):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "chunks", ignore_errors=True)
    if (out_dir / "spec.json").is_file() and read_json(out_dir / "spec.json") != spec_json:
        raise ConfigError(f"{out_dir} holds an interrupted run with a different spec; use another --out "
                          "or pass --overwrite")
    if method.needs_stationary_victim and not victim.report.get("stationary", False):
        log.warning("victim is not certified stationary (%s): theta* is not an exact argmin, so the %s "
                    "objective cannot reach 0 at the true images", victim.report.get("note", ""), spec.method)

    truth = sorted_ground_truth(victim_dir)
    build = PROGRAMS[spec.method]
    if dtype_note:
        log.warning("%s", dtype_note)
    program = build(run_spec, victim, truth, dtype)
    _reuse_functions(program, victim_dir, run_spec, dtype)
    if np.asarray(program.init_centered).dtype != dtype:
        raise ConfigError(f"internal: the initial images are {np.asarray(program.init_centered).dtype} in a "
                          f"{dtype.name} run; please report this")
    if not np.all(np.isfinite(program.init_centered)):
        raise ConfigError("initial images contain non-finite values")
    n_runs = len(program.init_centered)
    n_devices = len(select_devices(spec.devices))  # fails here, before any work, if there are fewer
    if spec.chunk_size:
        chunk_size = spec.chunk_size
        check_fits(chunk_size, program.bytes_per_run, devices=spec.devices, fixed_bytes=program.fixed_bytes)
    else:
        chunk_size = auto_chunk_size(n_runs, program.bytes_per_run, devices=spec.devices,
                                     fixed_bytes=program.fixed_bytes)
    atomic_write_json(out_dir / "spec.json", spec_json)

    start = time.perf_counter()
    states, history, final = run_batched(
        program.init, program.run, program.finish, program.start, program.hyper, steps=program.steps,
        chunk_size=chunk_size, segment=spec.segment, checkpoint_dir=out_dir / "chunks", progress=progress,
        devices=spec.devices)
    seconds = time.perf_counter() - start

    centered = np.asarray(states.images)
    images, mapping = to_unit(centered, truth)
    init_unit, _ = to_unit(program.init_centered, truth)
    final_loss = np.asarray(final[program.final_loss], float)
    diverged = np.asarray(final["diverged"], bool)
    ranking = rank_runs(final_loss, diverged)
    atomic_save_npz(out_dir / "reconstructions.npz", images=images, init_images=init_unit, centered=centered,
                    init_centered=program.init_centered, labels=program.labels, image_mapping=np.asarray(IMAGE_MAPPING))
    atomic_save_npz(out_dir / "history.npz", **history)
    if spec.pool:
        best = ranking[: spec.pool]
        atomic_save_npz(out_dir / "pooled.npz", images=images[best].reshape(-1, *images.shape[2:]),
                        centered=centered[best].reshape(-1, *centered.shape[2:]),
                        labels=np.tile(program.labels, len(best)), runs=np.repeat(best, len(program.labels)),
                        image_mapping=np.asarray(IMAGE_MAPPING))
    summary = {
        "spec": spec_json,
        "method": spec.method,
        "init": str(parse_init(spec.init)),
        "n_inits": spec.n_inits,
        "n_runs": n_runs,
        "n_images": int(len(program.labels)),
        "image_shape": list(victim.image_shape),
        "chunk_size": -(-min(chunk_size, n_runs) // n_devices) * n_devices,  # as run_batched rounds it
        "devices": n_devices,
        "bytes_per_run_estimate": program.bytes_per_run,
        "dtype": np.dtype(dtype).name,
        "victim_dtype": victim.train_config.dtype,
        "dtype_note": dtype_note,
        "image_mapping": IMAGE_MAPPING,  # of reconstructions.npz's images and init_images
        "image_mapping_note": mapping,
        "victim_stationary": bool(victim.report.get("stationary", False)),
        "final_loss_name": program.final_loss,
        "final_outer_loss": final_loss.tolist(),
        "diverged": diverged.tolist(),
        "ranking": ranking.tolist(),
        "best_outer_loss": None if np.all(diverged) else float(final_loss[ranking[0]]),
        "run_init_index": (np.arange(n_runs) // (n_runs // spec.n_inits)).tolist(),
        **{f"run_{name}": np.asarray(v).tolist() for name, v in program.run_settings.items()},
        **{f"final_{k}": np.asarray(v).tolist() for k, v in final.items() if k not in (program.final_loss, "diverged")},
        "seconds": seconds,
        "versions": versions(),
    }
    if method.summary_extras is not None:  # the method's own fields (bilevel: tolerances, engine, costs)
        summary.update(method.summary_extras(run_spec, victim, final, history))
    atomic_write_json(out_dir / "run.json", summary)
    shutil.rmtree(out_dir / "chunks", ignore_errors=True)
    return summary
