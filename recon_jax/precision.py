"""Floating-point precision: which dtypes a run may use, checked before any work.

JAX computes in float32 unless its x64 mode is on. A float64 run silently falling back to
float32 would corrupt every stationarity certificate and hypergradient test, so asking for
float64 without x64 is an error, not a downgrade. The CLI turns x64 on when
``--dtype float64`` is given; library users call ``enable_float64()`` (or set
``JAX_ENABLE_X64=1``) before creating arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from recon_jax.errors import ConfigError

DTYPES = ("float32", "float64")


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
