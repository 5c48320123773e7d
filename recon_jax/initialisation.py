"""Initial guesses x₀ for K reconstructions, in the victim's mean-subtracted pixel space.

    gaussian:σ    x₀ ~ N(0, σ²) per pixel                     (an attacker's random start)
    mean[:σ]      x₀ = m̂ − m + N(0, σ²), σ = 0.01 by default  (m̂: held-out pool mean, m: training mean)
    heldout       x₀ = a held-out image of the same class      (plausible but non-member images)
    gt-noise:σ    x₀ = x_true + N(0, σ²)                        (oracle: the paper's near-ground-truth study)
    interp:a      x₀ = a · x_true + (1 − a) · held-out image    (oracle: a = 1 is the truth, a = 0 heldout)

``gt-noise`` and ``interp`` read the ground truth: the attacker would not have it; the paper
studies them to measure how close an initialisation must be. ``heldout`` and ``mean`` use
the held-out pool, which stands in for public data from the same distribution.
Each of the K initialisations draws its own noise and its own held-out images.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recon_jax.errors import ConfigError

KINDS = ("gaussian", "mean", "heldout", "gt-noise", "interp")
ORACLE_KINDS = ("gt-noise", "interp")


@dataclasses.dataclass(frozen=True)
class InitSpec:
    kind: str
    value: float | None = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


def parse_init(text: str) -> InitSpec:
    """Parse ``gaussian:0.1``, ``gt-noise:0.05``, ``heldout``, ``mean``, ``mean:0.01``, ``interp:0.5``."""
    kind, _, value = text.partition(":")
    if kind not in KINDS:
        raise ConfigError(f"unknown --init {text!r}; expected one of gaussian:SIGMA, gt-noise:SIGMA, heldout, "
                          "mean[:SIGMA], interp:A")
    if kind == "heldout":
        if value:
            raise ConfigError(f"--init heldout takes no value, got {text!r}")
        return InitSpec(kind)
    if not value:
        if kind == "mean":
            return InitSpec(kind, 0.01)
        raise ConfigError(f"--init {kind} needs a value, e.g. {kind}:0.1")
    try:
        number = float(value)
    except ValueError as err:
        raise ConfigError(f"--init {text!r}: {value!r} is not a number") from err
    if not np.isfinite(number) or number < 0 or (kind == "interp" and number > 1):
        raise ConfigError(f"--init {text!r}: value must be finite, >= 0{' and <= 1' if kind == 'interp' else ''}")
    return InitSpec(kind, number)


def _heldout_draws(rng, k: int, labels: np.ndarray, heldout_centered: np.ndarray,
                   heldout_labels: np.ndarray) -> np.ndarray:
    """(K, N, h, w, c): for each init, held-out images matching ``labels``, drawn without
    replacement per class; when a class has more slots than held-out images (e.g. the KKT
    attack's m = 2N candidates), a random order of the class's images is cycled."""
    out = np.empty((k, len(labels), *heldout_centered.shape[1:]), heldout_centered.dtype)
    for c in np.unique(labels):
        slots = np.flatnonzero(labels == c)
        pool = np.flatnonzero(heldout_labels == c)
        if len(pool) == 0:
            raise ConfigError(f"the held-out pool has no image of class {c}; train the victim with a larger "
                              "--n-heldout")
        for i in range(k):
            order = rng.permutation(pool)
            out[i, slots] = heldout_centered[order[np.arange(len(slots)) % len(pool)]]
    return out


def truth_for_slots(labels: np.ndarray, truth: np.ndarray, truth_labels: np.ndarray) -> np.ndarray:
    """(N_slots, h, w, c): slot j gets the next training image of class labels[j] (cycling)."""
    out = np.empty((len(labels), *truth.shape[1:]), truth.dtype)
    for c in np.unique(labels):
        slots, pool = np.flatnonzero(labels == c), np.flatnonzero(truth_labels == c)
        if len(pool) == 0:
            raise ConfigError(f"no training image of class {c} to initialise from")
        out[slots] = truth[pool[np.arange(len(slots)) % len(pool)]]
    return out


def initial_images(spec: InitSpec, n_inits: int, labels: np.ndarray, image_shape, *, seed: int,
                   ground_truth: dict | None = None, dtype=np.float64) -> np.ndarray:
    """x₀ of shape (K, N, h, w, c), mean-subtracted, for ``labels`` (N,).

    ``ground_truth`` is the victim's ``data.npz`` content; only ``gaussian`` works without
    it. Oracle initialisations pair slot j with a training image of class ``labels[j]``,
    cycling through that class's images in order, so N slots sorted by class get the N
    training images, and m = 2N candidates (KKT) get each training image twice.
    """
    if n_inits < 1:
        raise ConfigError(f"--n-inits must be >= 1, got {n_inits}")
    rng = np.random.default_rng(seed)
    shape = (n_inits, len(labels), *image_shape)
    if spec.kind == "gaussian":
        return (spec.value * rng.standard_normal(shape)).astype(dtype)
    if ground_truth is None:
        raise ConfigError(f"--init {spec} needs the victim's data.npz (held-out pool or ground truth)")
    mean = ground_truth["mean"]
    heldout_centered = ground_truth["heldout_images"] - mean
    if spec.kind == "mean":
        return (heldout_centered.mean(axis=0) + spec.value * rng.standard_normal(shape)).astype(dtype)
    if spec.kind == "heldout":
        return _heldout_draws(rng, n_inits, labels, heldout_centered, ground_truth["heldout_labels"]).astype(dtype)
    truth = truth_for_slots(labels, ground_truth["train_images"] - mean, ground_truth["train_labels"])
    if spec.kind == "gt-noise":
        return (truth[None] + spec.value * rng.standard_normal(shape)).astype(dtype)
    heldout = _heldout_draws(rng, n_inits, labels, heldout_centered, ground_truth["heldout_labels"])
    return (spec.value * truth[None] + (1.0 - spec.value) * heldout).astype(dtype)
