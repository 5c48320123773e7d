"""Floating-point precision: which dtypes a run may use, checked before any work.

JAX computes in float32 unless its x64 mode is on. A float64 run silently falling back to
float32 would corrupt every stationarity certificate and hypergradient test, so asking for
float64 without x64 is an error, not a downgrade. The CLI turns x64 on when
``--dtype float64`` is given; library users call ``enable_float64()`` (or set
``JAX_ENABLE_X64=1``) before creating arrays.

The compute dtype of a network follows its parameters θ (``recon_jax.models.MLP`` casts its
input images to θ's dtype), and the library's entry points keep images and θ in one dtype:
``recon_jax.reconstruct.reconstruct`` casts θ* to the run's dtype and says so in ``run.json``,
and ``recon_jax.kkt.init_state`` and the inner solvers (``recon_jax.solvers``) refuse images
whose dtype differs from θ's (``check_same_dtype``).

Every tolerance that depends on the dtype comes from ``default_tolerances`` (one table, used by
the library, the CLI and victim training alike), from the measurements of
``benchmarks/precision.py`` (``benchmarks/README.md``, "Precision policy"):

    dtype     inner_tol   cg_tol   certify_tol   solver_tol
    float64   1e-10       1e-10    1e-8          1e-10
    float32   1e-6        1e-6     1e-5          1e-6

inner_tol: the bilevel inner L-BFGS stops at ‖∇_θL‖₂ ≤ inner_tol; cg_tol: the adjoint CG stops
at ‖(H + ρI)v − g‖ ≤ cg_tol ‖g‖; certify_tol: a victim is certified stationary iff its final
‖∇_θL(θ*)‖₂ ≤ certify_tol; solver_tol: victim training stops at ‖∇_θL‖₂ ≤ solver_tol. In
float32 the measured hypergradient error with inner = CG tol = 1e-6 is 2e-5…3e-3 relative to
float64 (safe for sweeps and ranking); 1e-5 is 1e-4…3e-2 (coarse screening only); float64's
1e-10 is unreachable in float32 (solves ran to their cap; they now stop at the first line
search that fails without decreasing the loss, ``recon_jax.solvers``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from recon_jax.errors import ConfigError

DTYPES = ("float32", "float64")
FLOAT32_REACHABLE_TOL = 1e-7
"""Below this, ‖∇_θL‖ tolerances are unreachable in float32 (the precision study's float32
solves stall at ‖∇L‖ ≈ 1e-7); such a tolerance is warned about."""

# See the module docstring for what each entry means and where the values come from.
DEFAULT_TOLERANCES = {
    "float64": {"inner_tol": 1e-10, "cg_tol": 1e-10, "certify_tol": 1e-8, "solver_tol": 1e-10},
    "float32": {"inner_tol": 1e-6, "cg_tol": 1e-6, "certify_tol": 1e-5, "solver_tol": 1e-6},
}


def enable_float64() -> None:
    """Turn on JAX's x64 mode (process-wide), so float64 arrays stay float64."""
    jax.config.update("jax_enable_x64", True)


def float64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def resolve_dtype(dtype) -> np.dtype:
    """Map "float32"/"float64" (or a numpy dtype) to a numpy dtype, checking x64 mode."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if name == "float64" and not float64_enabled():
        raise ConfigError(
            "float64 was requested but JAX's x64 mode is off, so arrays would silently be float32; "
            "call recon_jax.precision.enable_float64() before creating arrays, or set JAX_ENABLE_X64=1")
    return np.dtype(name)


def cast_tree(tree, dtype):
    """Cast every floating leaf of a pytree to ``dtype``."""
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, tree)


def dtype_name(dtype) -> str:
    """"float32"/"float64" for a dtype given as a name, numpy/JAX dtype or array type; raises
    ConfigError for anything else (no x64 check: see ``resolve_dtype``)."""
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError as err:
        raise ConfigError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from err
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return name


def default_tolerances(dtype) -> dict[str, float]:
    """The dtype's tolerances {inner_tol, cg_tol, certify_tol, solver_tol} (see module docstring).

    The one table every default tolerance is read from: ``solvers.InnerConfig.resolved``,
    ``training.DEFAULT_SOLVER_TOL`` / ``DEFAULT_CERTIFY_TOL`` and the CLI. A fresh dict.
    """
    return dict(DEFAULT_TOLERANCES[dtype_name(dtype)])


def tree_dtype(tree) -> np.dtype | None:
    """The one floating dtype of a pytree's floating leaves; None if it has none. Raises
    ConfigError if the floating leaves mix dtypes (θ must be in one precision)."""
    dtypes = {np.dtype(jnp.result_type(leaf)) for leaf in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)}
    if len(dtypes) > 1:
        raise ConfigError(f"the parameters mix dtypes {sorted(d.name for d in dtypes)}; cast them to one with "
                          "recon_jax.precision.cast_tree(params, dtype)")
    return dtypes.pop() if dtypes else None


def check_same_dtype(what: str, array, params, fix: str) -> None:
    """Refuse a floating ``array`` whose dtype differs from θ's (``params``): the network would
    compute in θ's dtype and the array would be silently cast. ``what`` names the array in the
    error, ``fix`` says how to make them agree. Static (dtypes are known under jit and vmap)."""
    theta = tree_dtype(params)
    found = np.dtype(jnp.result_type(array))
    if theta is None or not jnp.issubdtype(found, jnp.floating) or found == theta:
        return
    raise ConfigError(f"{what}: dtype {found.name}, but theta is {theta.name}; the network computes in theta's dtype, "
                      f"so this would be a silent cast. Fix: {fix}")
