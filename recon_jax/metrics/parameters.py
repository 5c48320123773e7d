"""Parameter-space distance: how far a network's parameters θ are from the victim's θ*.

    mismatch(θ, θ*) = ‖θ − θ*‖² / ‖θ*‖²      (over all leaves of the pytrees)

This is the bilevel attack's default outer loss (``recon_jax.bilevel.parameter_loss("l2",
...)``, Runkel et al. 2024), computed here with the same operations so that judging a result
does not need the attack's solver stack (jaxopt).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from recon_jax.objectives import squared_norm


def parameter_mismatch(params: Any, victim_params: Any) -> jax.Array:
    """The achieved parameter mismatch ‖θ − θ*‖² / ‖θ*‖², summed over all leaves of the pytrees.

    ``params`` and ``victim_params`` must have the same pytree structure and leaf shapes.
    Returns a scalar; 0 exactly when θ = θ*.
    """
    as_arrays = lambda tree: jax.tree.map(jnp.asarray, tree)
    params, victim_params = as_arrays(params), as_arrays(victim_params)
    diff = jax.tree_util.tree_map(jnp.subtract, params, victim_params)
    return squared_norm(diff) / squared_norm(victim_params)
