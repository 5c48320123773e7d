"""The attack protocol: what every reconstruction attack is to the rest of the library.

An attack is a bundle of pure functions of ONE run (one initialisation, one set of
hyperparameters), in the style of ``optax.GradientTransformation``:

    init_state(start, hyper)            -> state          start: x₀ (N, h, w, c), or (x₀, λ₀) for KKT
    step(state, hyper)                  -> (state, record)         one optimiser step
    run_steps(state, hyper, n, start=0) -> (state, history)        n steps as one ``lax.scan``;
                                                                   history = {name: (n,)}
    evaluate(state, hyper)              -> {final_loss: scalar, "diverged": bool, ...}

plus its ``name`` and ``final_loss`` (the key of ``evaluate``'s result that ranks runs).
``recon_jax.batching.run_batched`` vmaps, chunks and checkpoints these functions, so a new
attack needs nothing else from the batching, evaluation and study layers. Each concrete
attack module exposes a constructor ``attack(config, problem) -> Attack`` and registers it in
``ATTACKS`` with one call, ``register_attack("name", attack)`` (``recon_jax.bilevel`` and
``recon_jax.kkt`` do so on import; ``attacks()`` imports both and returns the registry).

Beside it, each attack registers a ``Method``: what the library layers above a single run
(``recon_jax.reconstruct``, ``recon_jax.study``, ``recon_jax.landscape``) need to know about
the method, so that none of them names a concrete attack: its default dtype, when a run has
converged, which run.json figure is its parameter mismatch, its objective of the images
alone for landscape slices, its random-search ranges, and the method's own run.json fields.
``register_descriptor(Method(...))`` adds it to ``METHODS``; ``descriptor(name)`` looks it up.

The pieces both attacks share live here: the box prior, the optimiser's direction, the
non-finite freeze and the ``lax.scan`` over steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from recon_jax.errors import ConfigError

OPTIMIZERS = ("adam", "sgd")


class Attack(NamedTuple):
    """One attack made ready for ``run_batched``: pure functions of one run (module docstring).

    ``init_state(start, hyper) -> state``; ``step(state, hyper) -> (state, record)``;
    ``run_steps(state, hyper, n_steps, start=0) -> (state, history)`` with ``start`` the index
    of the first step (shared by a batch); ``evaluate(state, hyper) -> dict`` holding
    ``final_loss`` and ``"diverged"``.
    """

    name: str
    final_loss: str
    init_state: Callable[[Any, Any], Any]
    step: Callable[[Any, Any], tuple[Any, dict]]
    evaluate: Callable[[Any, Any], dict]
    run_steps: Callable[..., tuple[Any, dict]]


ATTACKS: dict[str, Callable[[Any, Any], Attack]] = {}
"""Attack constructors by name: ``ATTACKS[name](config, problem) -> Attack``."""


def register_attack(name: str, constructor: Callable[[Any, Any], Attack]) -> Callable[[Any, Any], Attack]:
    """Register ``constructor(config, problem) -> Attack`` under ``name`` (one line per attack)."""
    ATTACKS[name] = constructor
    return constructor


def attacks() -> dict[str, Callable[[Any, Any], Attack]]:
    """The registry with the built-in attacks (bilevel, kkt) imported, hence registered."""
    from recon_jax import bilevel, kkt  # noqa: F401  (registration on import)

    return ATTACKS


# --------------------------------------------------------------------------- method descriptors


class Convergence(NamedTuple):
    """When a run counts as converged (``study.convergence_columns``): its figure in run.json
    under ``key`` (a list, one value per run) is at most ``threshold``. ``label`` names the
    figure in the criterion written to summary.csv, ``f"{label} <= {threshold:g}"``."""

    key: str
    threshold: float
    label: str


class Method(NamedTuple):
    """A method as the layers above one run see it (module docstring): data and functions
    that ``reconstruct``, ``study`` and ``landscape`` dispatch through instead of naming it.

    ``spec`` below is a ``recon_jax.reconstruct.ReconstructionSpec``, ``victim`` a
    ``recon_jax.checkpoint.Victim`` and ``run`` a run folder's run.json (a dict).
    """

    name: str
    converged: Convergence
    """The convergence criterion of ``study.convergence_columns``."""
    mismatch_key: str
    """run.json key of the per-run parameter-space mismatch (summary.csv's ``param_mismatch_median``)."""
    objective: Callable[..., Callable]
    """``objective(victim, *, labels=None, ridge, **options) -> f``: the method's objective as a
    function f(x) -> scalar of mean-subtracted images x (m, h, w, c) alone, for
    ``landscape.objective_function``; ``options`` are that function's keyword options (those
    another method takes are ignored)."""
    objective_options: Callable[[Any, dict, int], dict]
    """``objective_options(spec, run, best) -> dict``: the keyword options of ``objective`` that
    reproduce a finished run's objective, ``best`` being the index of its best run (``study``'s
    landscape slices)."""
    validate_search_ranges: Callable[[dict | None], Any]
    """``validate_search_ranges(overrides)``: the random-search ranges with ``overrides``
    applied; raises ``ConfigError`` on an unknown name or a bad range."""
    default_dtype: str | None = None
    """The run's dtype when the spec gives none; None: the victim's training dtype."""
    dtype_reason: str = ""
    """Why ``default_dtype`` is safe, quoted when θ* is cast to it (``reconstruct.cast_note``)."""
    needs_stationary_victim: bool = False
    """Whether the objective can reach 0 at the true images only at a certified stationary θ*
    (``reconstruct`` warns when the victim is not certified)."""
    landscape_point_bytes: Callable[..., int] | None = None
    """``landscape_point_bytes(victim, labels, spec, dtype) -> int``: device bytes of one point of
    a landscape slice, which ``study`` uses to bound the batch; None: unbounded (one batch)."""
    spec_warnings: Callable[[Any, Any], tuple[str, ...]] | None = None
    """``spec_warnings(spec, dtype) -> messages``: what ``reconstruct`` logs about a resolved
    spec run in ``dtype`` (e.g. tolerances the dtype cannot reach); None: nothing."""
    summary_extras: Callable[..., dict] | None = None
    """``summary_extras(spec, victim, final, history) -> dict``: the method's own run.json fields,
    from the resolved spec, the per-run final figures (``Attack.evaluate``, batched) and the
    per-step history; None: none."""


METHODS: dict[str, Method] = {}
"""Method descriptors by name: ``METHODS[name] -> Method``."""


def register_descriptor(method: Method) -> Method:
    """Register ``method`` under ``method.name`` (one line per attack, beside ``register_attack``)."""
    METHODS[method.name] = method
    return method


def descriptors() -> dict[str, Method]:
    """The descriptor registry with the built-in attacks (bilevel, kkt) imported, hence registered."""
    from recon_jax import bilevel, kkt  # noqa: F401  (registration on import)

    return METHODS


def descriptor(name: str) -> Method:
    """The registered ``Method`` called ``name``; ``ConfigError`` naming the registered ones otherwise."""
    registry = descriptors()
    if name not in registry:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(registry)}")
    return registry[name]


# --------------------------------------------------------------------------- shared pieces


def box_penalty(images: jax.Array, lower: jax.Array | float = -1.0, upper: jax.Array | float = 1.0) -> jax.Array:
    """The box prior on pixels (Haim et al. 2022; Runkel et al. 2024):

        B(x) = Σ_pixels relu(x − u)² + relu(l − x)²

    images x (N, h, w, c); l and u scalars or arrays broadcastable to one image (h, w, c);
    returns a scalar, zero exactly when l ≤ x ≤ u everywhere.
    """
    return jnp.sum(jax.nn.relu(images - upper) ** 2 + jax.nn.relu(lower - images) ** 2)


def descent_direction(optimizer: str, momentum: float = 0.9, *, extra_args: bool = False,
                      plateau: tuple[float, int] | None = None):
    """The optimiser's direction u(g) WITHOUT the learning rate, which callers apply outside
    so that it can be a traced, vmapped value (x ← x − η u):

        adam   u = m̂ / (sqrt(v̂) + ε)      (optax.scale_by_adam, Kingma & Ba 2015)
        sgd    u ← μ u + g                  (heavy-ball momentum, optax.trace with decay μ)

    ``plateau=(factor, patience)`` chains optax.contrib.reduce_on_plateau (rtol 1e-3: an
    "improvement" must lower the objective by 0.1%), whose ``update`` takes ``value=``;
    ``extra_args=True`` gives the plain direction the same ``update(..., value=)`` signature.
    """
    base = optax.scale_by_adam() if optimizer == "adam" else optax.trace(decay=momentum)
    if plateau is not None:
        factor, patience = plateau
        return optax.chain(base, optax.contrib.reduce_on_plateau(factor=factor, patience=patience,
                                                                  rtol=1e-3, atol=0.0))
    return optax.with_extra_args_support(base) if extra_args else base


def restart_plateau(opt_state, restart: jax.Array):
    """Where ``restart`` (a scalar bool), make every reduce-on-plateau state in ``opt_state``
    forget its history: best objective +∞, no steps without improvement, scale 1. The next
    objective becomes the best, so the comparison starts afresh from there.

    The bilevel attack calls it at the end of the learning-rate warm-up
    (``recon_jax.bilevel``): during the warm-up the objective may rise (the rate ramps up; on
    a non-convex victim the inner solution can change branch), and a best value from before the
    rise would otherwise be unbeatable, so the rate would halve every ``patience`` steps to zero
    (measured: a 784-256-10 gelu victim from noise froze at an outer loss of 1.07, where a
    constant rate kept descending to 0.69 by step 200).
    """
    def reset(state):
        if not isinstance(state, optax.contrib.ReduceLROnPlateauState):
            return state
        where = lambda new, old: jnp.where(restart, jnp.asarray(new, old.dtype), old)
        return state._replace(best_value=where(jnp.inf, state.best_value),
                              plateau_count=where(0, state.plateau_count), scale=where(1.0, state.scale))

    return jax.tree_util.tree_map(reset, opt_state,
                                  is_leaf=lambda s: isinstance(s, optax.contrib.ReduceLROnPlateauState))


def freeze(ok: jax.Array, new, old):
    """The non-finite freeze: ``new`` where ``ok`` (a scalar bool), else ``old``, leaf by leaf
    (pytrees of equal structure). A run that met a non-finite value keeps its last finite
    state; the other runs of a vmapped batch are unaffected."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def scan_steps(step: Callable, state, n_steps: int):
    """``n_steps`` applications of ``step(state) -> (state, record)`` as one ``lax.scan``:
    (state, {name: (n_steps,)} history)."""
    return lax.scan(lambda s, _: step(s), state, None, length=n_steps)
