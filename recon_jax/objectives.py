"""Training objectives with weight decay: the victim's loss and the bilevel inner problem.

    L(θ; x, y) = (1/N) Σ_i ℓ(𝒩(θ; x_i), y_i) + (λ_wd / 2) ‖θ‖²     (Runkel et al. 2024)

with ℓ one of

    ce        ℓ(f, y) = −f_y + log Σ_k exp f_k                  f: (C,), y ∈ {0..C−1}
    logistic  ℓ(f, y) = log(1 + exp(−s f)),  s = ±1             f: (1,), y ∈ {0,1} or {±1}
    mse       ℓ(f, y) = ½ ‖f − t(y)‖²                            t = ±1 (C = 1) or one-hot

Labels are class indices. For binary tasks label 1 is the positive class (s = +1) and
label 0 (or −1) the negative one (s = −1).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recon_jax.errors import ConfigError

LOSSES = ("ce", "logistic", "mse")


def signed_labels(labels: jax.Array, dtype=jnp.float32) -> jax.Array:
    """s_i = +1 for label > 0, −1 otherwise: maps {0,1} and {−1,+1} alike. (n,) -> (n,)."""
    return jnp.where(labels > 0, 1.0, -1.0).astype(dtype)


def per_sample_loss(loss: str, outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """ℓ(𝒩(θ; x_i), y_i) for each sample: outputs (n, C), labels (n,) -> (n,)."""
    if loss == "ce":
        return optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
    if loss == "logistic":
        margin = signed_labels(labels, outputs.dtype) * outputs[:, 0]
        return jax.nn.softplus(-margin)
    if loss == "mse":
        if outputs.shape[-1] == 1:
            targets = signed_labels(labels, outputs.dtype)[:, None]
        else:
            targets = jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype)
        return 0.5 * jnp.sum((outputs - targets) ** 2, axis=-1)
    raise ConfigError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def check_loss(loss: str, n_out: int, n_classes: int) -> None:
    """Raise ConfigError unless the loss fits the output width and the number of classes."""
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if loss == "ce" and (n_out != n_classes or n_classes < 2):
        raise ConfigError(f"loss 'ce' needs one output per class: n_out={n_out}, classes={n_classes}")
    if loss == "logistic" and (n_out != 1 or n_classes != 2):
        raise ConfigError(
            f"loss 'logistic' needs a binary task with one output (n_out={n_out}, classes={n_classes}); "
            "use --binary-positive to group classes, or --loss ce")
    if loss == "mse" and n_out not in (1, n_classes):
        raise ConfigError(f"loss 'mse' needs n_out = 1 (±1 targets, binary) or n_out = classes ({n_classes})")
    if loss == "mse" and n_out == 1 and n_classes != 2:
        raise ConfigError("loss 'mse' with one output uses ±1 targets and needs a binary task")


def squared_norm(tree) -> jax.Array:
    """‖θ‖² = Σ over all leaves of Σ θ²."""
    return sum(jnp.vdot(p, p) for p in jax.tree_util.tree_leaves(tree))


def all_finite(tree) -> jax.Array:
    """True iff every element of every leaf is finite (a scalar bool, traceable)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


def make_objective(apply_fn: Callable, loss: str, weight_decay: float) -> Callable:
    """Return L(θ, x, y) = (1/N) Σ_i ℓ(apply_fn(θ, x)_i, y_i) + (λ_wd/2) ‖θ‖².

    ``apply_fn(params, images (n,h,w,c)) -> (n, C)``; the result is a scalar. The same
    function is the victim's training loss and the bilevel inner objective, where x are
    the candidate images.
    """
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if not weight_decay >= 0:
        raise ConfigError(f"weight decay must be >= 0, got {weight_decay}")

    def objective(params, images, labels):
        data_term = jnp.mean(per_sample_loss(loss, apply_fn(params, images), labels))
        return data_term + 0.5 * weight_decay * squared_norm(params)

    return objective


def predictions(outputs: jax.Array) -> jax.Array:
    """Predicted class: argmax for C > 1 outputs, [f > 0] for one output. (n, C) -> (n,)."""
    if outputs.shape[-1] == 1:
        return (outputs[:, 0] > 0).astype(jnp.int32)
    return jnp.argmax(outputs, axis=-1)


def accuracy(outputs: jax.Array, labels: jax.Array) -> float:
    """Fraction of samples whose prediction equals the label (binary: label > 0 is positive)."""
    if outputs.shape[-1] == 1:
        labels = (labels > 0).astype(jnp.int32)
    return float(np.mean(np.asarray(predictions(outputs)) == np.asarray(labels)))
