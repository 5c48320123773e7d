"""From a victim to the problems the attacks solve: what an attacker knows, as each attack needs it.

A victim (``recon_jax.checkpoint.Victim``) releases θ*, its architecture, its training recipe
(loss, weight decay) and its label counts. From these:

- :func:`problem_from_victim`: the bilevel attack's ``bilevel.Problem`` (Runkel et al. 2024):
  θ*, the known class-balanced labels, the victim's training objective
  L(θ; x, y) = (1/N) Σ_i ℓ(𝒩(θ; x_i), y_i) + (λ_wd / 2) ‖θ‖², and whether it is convex in θ;
- :func:`default_kkt_task`: which KKT condition (binary, multiclass or regression) holds
  exactly at θ* for that recipe, the task the KKT attack uses unless told otherwise (its
  problem is ``kkt.problem_from_victim(victim, task, ...)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp

from recon_jax import bilevel
from recon_jax.models import is_linear_in_params
from recon_jax.objectives import make_objective

if TYPE_CHECKING:
    from recon_jax.checkpoint import Victim

KKT_TASK_OF_LOSS = {"logistic": "binary", "ce": "multiclass", "mse": "regression"}


def default_kkt_task(loss: str, weight_decay: float) -> str:
    """The KKT setting (Haim et al. 2022; Buzaglo et al. 2023) that holds EXACTLY at the victim's trained θ*.

    logistic -> binary (θ* = Σ μ_j y_j ∇Φ_j with μ_j ≥ 0, with or without weight decay);
    mse -> regression; ce -> multiclass (the margin form of the max-margin KKT point) without
    weight decay, but regression with it: at a stationary point of mean CE + λ/2‖θ‖²,
    θ* = Σ_j Σ_c (y_jc − p_jc)/(nλ) ∇Φ_c(x_j), a signed combination of every output's gradient
    that the margin form cannot express (its residual at the true images is far from 0).
    """
    if loss == "ce" and weight_decay > 0:
        return "regression"
    return KKT_TASK_OF_LOSS[loss]


def is_convex(model, weight_decay: float) -> bool:
    """Whether the training objective L(θ) is strongly convex in θ: a network linear in θ (the
    affine model), whose loss (ce, logistic or mse) is convex in its outputs, plus weight decay
    λ_wd > 0 (which makes it strongly convex)."""
    return bool(is_linear_in_params(model)) and weight_decay > 0


def problem_from_victim(victim: Victim) -> bilevel.Problem:
    """The attacker's view: θ*, known class-balanced labels, and the victim's training objective."""
    objective = make_objective(victim.model.apply, victim.train_config.loss, victim.train_config.weight_decay)
    return bilevel.Problem(victim_params=victim.params, labels=jnp.asarray(victim.known_labels()),
                           objective=objective, convex=is_convex(victim.model, victim.train_config.weight_decay))
