"""KKT / stationarity reconstruction (Haim et al. 2022; DecoReco, Buzaglo et al. 2023).

A network trained by gradient methods tends to a KKT point of margin maximisation (or,
with weight decay, to a stationary point of the regularised loss), so that

    θ* = Σ_j λ_j ∇_θ φ_j(θ*; x_j).

The attack optimises m candidate images x (m, h, w, c) and multipliers λ to satisfy it:

    L_KKT(x, λ) = S(θ*, G(x, λ))
                + w_box Σ [relu(x − u)² + relu(l − x)²]           (box prior on the candidates' pixels)
                + w_λ Σ_j relu(λ_min − λ_j)²                       (λ_j ≥ λ_min, soft; not for regression)

    G(x, λ) = ∇_θ [ (1/m) Σ_j λ_j φ_j(θ; x_j) ] |_{θ = θ*}        (a pytree shaped like θ*)

with φ_j per task (Φ = the attacked network, outputs (m, C))

    binary       φ_j = y_j Φ(x_j),  y_j = ±1 (labels 0/1 map to −1/+1)            λ: (m,)
    multiclass   φ_j = Φ_{y_j}(x_j) − max_{k≠y_j} Φ_k(x_j)                         λ: (m,)
    regression   Σ_j λ_j φ_j = Σ_j Σ_k λ_jk Φ_k(x_j),  λ free in sign             λ: (m,) if C = 1, else (m, C)

The regression form is the stationarity condition of any weight-decayed training loss,
∇L = (1/N) Σ_i Σ_k ∂ℓ/∂f_ik ∇_θ f_ik + λ_wd θ = 0, which needs one multiplier per sample
*and output*: with one output it is the reference's λ_j Φ(x_j) (DecoReco, MSE with ±1
targets); with C outputs (MSE on one-hot targets, or cross-entropy with weight decay) it
keeps one multiplier per output rather than summing the outputs under one λ_j, which
could not express θ* in general.

The box [l, u] (``KKTConfig.box``), per pixel, in the attack's mean-subtracted space:

    centered    l = −1,  u = 1                     (the reference: a loose box around the mean)
    pixel       l = −μ,  u = 1 − μ                 (the candidate plus the training mean μ lies in
                                                    [0, 1], the range every training image has)

``pixel`` needs μ, the per-pixel training mean that the victim's preprocessing subtracts; a
victim folder releases it with θ* (``preprocessing.npz``), as any deployed model ships its
input normalisation. It is our addition, not the reference's. On MNIST it matters: the
centered box lets candidates settle at ±1 inside the digit, i.e. far outside [0, 1] once μ
is added back, and the min-max scaling of the evaluation protocol (Haim et al. 2022; Buzaglo
et al. 2023) then lifts the black background and SSIM collapses (``experiments/kkt_mnist.py``
measures both).

The stationarity term S (``KKTConfig.stationarity``):

    global      S = Σ_t ‖θ*_t − G_t‖²               (the reference; default)
    per_tensor  S = Σ_t ‖θ*_t − G_t‖² / ‖θ*_t‖²     (each tensor relative; a tensor with θ*_t = 0
                                                     counts absolutely, ‖G_t‖²)

The reference code does not normalise: in both nivha/dataset_reconstruction and
gonbuzaglo/decoreco, ``extraction.py::get_kkt_loss`` takes
``torch.autograd.grad(outputs=λ·φ, inputs=model.parameters(), grad_outputs=ones/m)``
(m = ``extraction_data_amount``, the number of candidates: that is the 1/m in G) and sums
``(p − grad).pow(2).sum()`` over the parameter tensors, i.e. exactly ``global``.
``get_verify_loss`` adds the box term with weight 1 and the λ term with weight 5, and
skips the λ term for regression. ``per_tensor`` is our scale-free variant: each layer
contributes its relative residual, so a layer with small weights is not drowned out.

Differentiating L_KKT with respect to (x, λ) differentiates G, itself a gradient with
respect to θ: a second derivative through the network, computed here as ``jax.grad`` of a
loss that contains ``jax.grad`` over θ (the "double backward"). With plain relu the
mixed derivative ∂²φ/∂θ∂x loses every term through σ'' = 0, so relu victims are attacked
through a copy with ``modified_relu`` (relu forward, σ'(z) := sigmoid(α z), so
σ'' = α s(1 − s)); smooth victims (gelu, softplus, tanh, affine) keep their activation
and α is unused. G also contains relu *values* (e.g. ∇_{W_2} ∝ Σ_j λ_j y_j relu(z_j)); whether
∂/∂x of those uses the true relu step (∇_x L_KKT is then the exact gradient of the computed
L_KKT) or sigmoid(α z) (as the reference's PyTorch double backward does) is decided by
the JVP rule of ``recon_jax.models.modified_relu``, not here.

Optimisation follows the reference: SGD with momentum 0.9 on x and λ with separate
learning rates (x: log-uniform 1e-5…1; λ: 1e-4), x₀ ~ N(0, σ²) with σ log-uniform
1e-6…0.1, λ₀ ~ U[0, 1) (N(0, 1) for regression), α ~ U[10, 500], λ_min ~ U[0.01, 0.5]
(the random-search ranges of ``reconstructions/*/sweep.txt`` in nivha/dataset_reconstruction),
50,000 steps. Learning rates are applied outside optax so that they can be traced, and a
sweep over (lr, σ, α, λ_min) is one vmapped program (``recon_jax.batching.run_batched``).

Precision: the attack computes in θ*'s dtype. ``init_state`` refuses candidates or multipliers
of another dtype, and ``run_steps`` hyperparameter arrays of another dtype (ConfigError), so
nothing is silently widened or narrowed. float32 is safe here (``benchmarks/precision.py``: the
float32 gradient of L_KKT is within 1e-7 of float64's, and L_KKT after 100 SGD steps agrees to 7
digits) and 2.6–5× faster on CPU (``benchmarks/kkt.py``), so ``recon_jax.reconstruct`` runs KKT
in float32 unless a dtype is asked for.

Everything here is written for ONE run (one set of m candidates); batching happens outside.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from recon_jax.attack import (Attack, Convergence, Method, box_penalty, descent_direction, freeze, register_attack,
                              register_descriptor, scan_steps)
from recon_jax.errors import ConfigError
from recon_jax.models import count_params, layer_macs, with_activation
from recon_jax.objectives import all_finite, signed_labels, squared_norm
from recon_jax.precision import check_same_dtype
from recon_jax.problems import default_kkt_task
from recon_jax.search import resolve_ranges

if TYPE_CHECKING:
    from recon_jax.checkpoint import Victim

TASKS = ("binary", "multiclass", "regression")
STATIONARITY = ("global", "per_tensor")
OPTIMIZERS = ("sgd", "adam")
BOX_BOUNDS = (-1.0, 1.0)  # the reference's box on mean-subtracted pixels (``box="centered"``)
BOXES = ("centered", "pixel")

# Random-search ranges of the reference sweeps (nivha/dataset_reconstruction,
# reconstructions/{cifar10_vehicles_animals,mnist_odd_even}/sweep.txt).
LR_X_RANGE = (1e-5, 1.0)  # log-uniform
INIT_SCALE_RANGE = (1e-6, 0.1)  # log-uniform
ALPHA_RANGE = (10.0, 500.0)  # uniform
LAMBDA_MIN_RANGE = (0.01, 0.5)  # uniform
REFERENCE_LR_LAMBDA = 1e-4  # ``--extraction_lambda_lr`` default


@dataclasses.dataclass(frozen=True)
class KKTConfig:
    """Static settings of the KKT attack (hyperparameters that vmap live in ``Hyper``)."""

    steps: int = 50_000
    task: str = "binary"
    stationarity: str = "global"
    optimizer: str = "sgd"
    momentum: float = 0.9  # sgd only
    box_weight: float = 1.0
    lambda_weight: float = 5.0  # binary and multiclass only
    box: str = "centered"  # "centered": [−1, 1] (reference); "pixel": [−μ, 1 − μ], see module doc

    def __post_init__(self):
        for name, value, allowed in (("task", self.task, TASKS), ("stationarity", self.stationarity, STATIONARITY),
                                     ("optimizer", self.optimizer, OPTIMIZERS), ("box", self.box, BOXES)):
            if value not in allowed:
                raise ConfigError(f"unknown KKT {name} {value!r}; choose one of {', '.join(allowed)}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"KKT steps must be an integer >= 0, got {self.steps!r}; the reference uses 50000")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"KKT momentum must be in [0, 1), got {self.momentum}; the reference uses 0.9")
        for name, value in (("box_weight", self.box_weight), ("lambda_weight", self.lambda_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"KKT {name} must be finite and >= 0, got {value}; the reference uses "
                                  f"{1.0 if name == 'box_weight' else 5.0}")


@struct.dataclass
class Hyper:
    """Per-run hyperparameters: scalars for one run, arrays of shape (R,) when vmapped.

    lr_x: learning rate of the candidates x; lr_lambda: of the multipliers λ;
    alpha: sharpness α of ``modified_relu`` (relu victims only);
    lambda_min: the soft lower bound on λ (binary and multiclass only).
    """

    lr_x: jax.Array
    lr_lambda: jax.Array = REFERENCE_LR_LAMBDA
    alpha: jax.Array = 300.0  # ``--extraction_model_relu_alpha`` default of the reference
    lambda_min: jax.Array = 0.05  # ``--extraction_min_lambda`` default of the reference


@struct.dataclass
class Problem:
    """What the attacker knows: θ*, the architecture, and the m candidates' labels.

    ``labels`` (m,) are class indices (binary: 0/1, read as −1/+1); None for regression,
    whose φ uses no labels (m is then the leading axis of the candidates).
    ``box_lower``, ``box_upper``: the box of the prior in mean-subtracted space, scalars or
    arrays broadcastable to one image (h, w, c); see ``box_bounds``.
    """

    victim_params: dict
    labels: jax.Array | None
    model: nn.Module = struct.field(pytree_node=False)
    box_lower: jax.Array | float = BOX_BOUNDS[0]
    box_upper: jax.Array | float = BOX_BOUNDS[1]


@struct.dataclass
class KKTState:
    """State of one run between steps."""

    images: jax.Array  # x, (m, h, w, c), mean-subtracted
    lambdas: jax.Array  # λ, (m,) or (m, C) (regression with C outputs)
    opt_state: optax.OptState
    step: jax.Array
    diverged: jax.Array  # bool: a non-finite loss or gradient was met; the state froze there


def attacked_model(model: nn.Module, alpha: jax.Array) -> nn.Module:
    """The network the attack differentiates: relu victims get ``modified_relu`` with sharpness α
    (possibly traced, through ``models.with_activation``, for any architecture with
    ``activation`` and ``alpha`` fields); other activations are used as trained."""
    if getattr(model, "activation", None) == "relu":
        return with_activation(model, "modified_relu", alpha)
    return model


def margins(task: str, outputs: jax.Array, labels: jax.Array | None) -> jax.Array:
    """φ_j from the network outputs (m, C): (m,) for binary/multiclass, (m, C) for regression."""
    if task == "binary":
        return signed_labels(labels, outputs.dtype) * outputs[:, 0]
    if task == "multiclass":
        is_label = jax.nn.one_hot(labels, outputs.shape[-1], dtype=bool)
        own = jnp.sum(jnp.where(is_label, outputs, 0.0), axis=-1)
        runner_up = jnp.max(jnp.where(is_label, -jnp.inf, outputs), axis=-1)
        return own - runner_up
    if task == "regression":
        return outputs
    raise ConfigError(f"unknown KKT task {task!r}; choose one of {', '.join(TASKS)}")


def combination_gradient(task: str, apply_fn: Callable, victim_params, images: jax.Array,
                         labels: jax.Array | None, lambdas: jax.Array):
    """G(x, λ) = ∇_θ [(1/m) Σ_j λ_j φ_j(θ; x_j)] at θ = θ*: a pytree shaped like θ*.

    ``apply_fn(params, images (m,h,w,c)) -> (m, C)``. For regression λ (m,) or (m, C) is
    contracted with the outputs (m, C), see the module docstring.
    """
    m = images.shape[0]

    def weighted_margin_sum(params):
        phi = margins(task, apply_fn(params, images), labels)
        return jnp.sum(lambdas.reshape(phi.shape) * phi) / m

    return jax.grad(weighted_margin_sum)(victim_params)


def stationarity(kind: str, victim_params, combination) -> jax.Array:
    """S(θ*, G): ``global`` Σ_t ‖θ*_t − G_t‖² or ``per_tensor`` Σ_t ‖θ*_t − G_t‖² / ‖θ*_t‖²
    (‖θ*_t‖² read as 1 where it is 0); a scalar."""
    residuals = jax.tree_util.tree_map(jnp.subtract, victim_params, combination)
    if kind == "global":
        return squared_norm(residuals)
    if kind == "per_tensor":
        # A tensor with θ*_t = 0 (e.g. an untrained zero bias) has no scale: it counts absolutely.
        scales = [jnp.vdot(p, p) for p in jax.tree_util.tree_leaves(victim_params)]
        return sum(jnp.vdot(r, r) / jnp.where(scale > 0, scale, 1.0)
                   for r, scale in zip(jax.tree_util.tree_leaves(residuals), scales))
    raise ConfigError(f"unknown KKT stationarity {kind!r}; choose one of {', '.join(STATIONARITY)}")


def box_bounds(box: str, input_mean: np.ndarray | None, image_shape: Sequence[int]):
    """(l, u) of ``box`` in mean-subtracted space: ``centered`` (−1, 1); ``pixel`` (−μ, 1 − μ)
    with μ the training mean, shape (1, h, w, c) or (h, w, c), read as (h, w, c)."""
    if box == "centered":
        return BOX_BOUNDS
    if box != "pixel":
        raise ConfigError(f"unknown KKT box {box!r}; choose one of {', '.join(BOXES)}")
    if input_mean is None:
        raise ConfigError("the 'pixel' box needs the victim's training mean (preprocessing.npz in the victim folder), "
                          "which this victim does not release; retrain it with `recon-jax train` or use box 'centered'")
    mean = np.asarray(input_mean, np.float64).reshape(tuple(image_shape))
    if not np.all(np.isfinite(mean)):
        raise ConfigError("the victim's training mean contains NaN or inf; the 'pixel' box cannot use it")
    return -mean, 1.0 - mean


def lambda_penalty(lambdas: jax.Array, lambda_min: jax.Array) -> jax.Array:
    """Σ_j relu(λ_min − λ_j)²: (m,) -> scalar."""
    return jnp.sum(jax.nn.relu(lambda_min - lambdas) ** 2)


def kkt_loss(config: KKTConfig, problem: Problem, hyper: Hyper, images: jax.Array, lambdas: jax.Array):
    """(L_KKT(x, λ), terms) for candidates x (m,h,w,c) and multipliers λ.

    terms = {stationarity, box_penalty, lambda_penalty}, the three summands of L_KKT (already
    weighted by w_box and w_λ; lambda_penalty is 0 for regression), plus relative_residual
    ‖θ* − G‖ / ‖θ*‖ over all parameters: a scale-free figure, comparable across victims.
    """
    apply_fn = attacked_model(problem.model, hyper.alpha).apply
    combination = combination_gradient(config.task, apply_fn, problem.victim_params, images, problem.labels, lambdas)
    residual = jax.tree_util.tree_map(jnp.subtract, problem.victim_params, combination)
    terms = {"stationarity": stationarity(config.stationarity, problem.victim_params, combination),
             "box_penalty": config.box_weight * box_penalty(images, problem.box_lower, problem.box_upper)}
    if config.task == "regression":
        terms["lambda_penalty"] = jnp.zeros((), terms["stationarity"].dtype)
    else:
        terms["lambda_penalty"] = config.lambda_weight * lambda_penalty(lambdas, hyper.lambda_min)
    total = terms["stationarity"] + terms["box_penalty"] + terms["lambda_penalty"]
    terms["relative_residual"] = jnp.sqrt(squared_norm(residual) / squared_norm(problem.victim_params))
    return total, terms


def _optimizer(config: KKTConfig) -> optax.GradientTransformation:
    """SGD momentum or Adam (``recon_jax.attack.descent_direction``); the learning rates are
    applied outside, so that they can be traced, vmapped values."""
    return descent_direction(config.optimizer, config.momentum)


def _check_shapes(config: KKTConfig, problem: Problem, images: jax.Array, lambdas: jax.Array) -> None:
    """Static shape checks (shapes are concrete even under jit/vmap)."""
    m, n_out = images.shape[0], problem.model.n_out
    if config.task == "binary" and n_out != 1:
        raise ConfigError(f"task 'binary' needs a victim with one output, this one has {n_out}; use task 'multiclass'")
    if config.task == "multiclass" and n_out < 2:
        raise ConfigError("task 'multiclass' needs a victim with >= 2 outputs; use task 'binary' for one output")
    if config.task == "regression":
        expected = (m,) if n_out == 1 else (m, n_out)
    else:
        if problem.labels is None or tuple(problem.labels.shape) != (m,):
            shape = None if problem.labels is None else tuple(problem.labels.shape)
            raise ConfigError(f"task {config.task!r} needs labels of shape ({m},) for the {m} candidates, got "
                              f"{shape}; build them with kkt.candidate_labels")
        expected = (m,)
    if tuple(lambdas.shape) != expected:
        raise ConfigError(f"multipliers λ have shape {tuple(lambdas.shape)}, expected {expected} for task "
                          f"{config.task!r} with {m} candidates and {n_out} outputs; use kkt.initial_lambdas")


def _check_dtypes(problem: Problem, **arrays) -> None:
    """Refuse floating arrays whose dtype differs from θ*'s (static: dtypes are concrete under jit/vmap)."""
    for name, array in arrays.items():
        check_same_dtype(name, array, problem.victim_params,
                         "create them in theta*'s dtype (e.g. jnp.asarray(x, dtype), kkt.initial_lambdas(..., dtype), "
                         "kkt.sample_hyper(..., dtype)), or cast theta* with recon_jax.precision.cast_tree")


def init_state(config: KKTConfig, problem: Problem, images: jax.Array, lambdas: jax.Array) -> KKTState:
    """The state before the first step, from candidates x₀ (m, h, w, c) and multipliers λ₀,
    both in θ*'s dtype (ConfigError otherwise)."""
    _check_shapes(config, problem, images, lambdas)
    _check_dtypes(problem, **{"the candidate images": images, "the multipliers λ": lambdas})
    return KKTState(images=images, lambdas=lambdas, opt_state=_optimizer(config).init((images, lambdas)),
                    step=jnp.asarray(0), diverged=jnp.asarray(False))


def step(config: KKTConfig, problem: Problem, hyper: Hyper, state: KKTState):
    """One optimiser step on (x, λ): x ← x − lr_x·u_x, λ ← λ − lr_λ·u_λ, with u from SGD momentum
    (u ← μu + ∇) or Adam applied to ∇_(x,λ) L_KKT (a double backward, see module doc).

    Returns (new_state, record) with record = {kkt_loss, stationarity, box_penalty,
    lambda_penalty, relative_residual} at the state *before* the update. A non-finite loss
    or gradient freezes this run and sets ``diverged``; other runs in a vmapped batch are
    unaffected.
    """
    (total, terms), grads = jax.value_and_grad(
        lambda x, lam: kkt_loss(config, problem, hyper, x, lam), argnums=(0, 1), has_aux=True)(
        state.images, state.lambdas)
    updates, opt_state = _optimizer(config).update(grads, state.opt_state, (state.images, state.lambdas))
    images = state.images - hyper.lr_x * updates[0]
    lambdas = state.lambdas - hyper.lr_lambda * updates[1]

    ok = jnp.isfinite(total) & all_finite(grads) & ~state.diverged
    keep = lambda new, old: freeze(ok, new, old)
    new_state = KKTState(images=keep(images, state.images), lambdas=keep(lambdas, state.lambdas),
                         opt_state=keep(opt_state, state.opt_state), step=state.step + 1, diverged=~ok)
    return new_state, {"kkt_loss": total, **terms}


def run_steps(config: KKTConfig, problem: Problem, hyper: Hyper, state: KKTState, n_steps: int, start=0):
    """``n_steps`` steps as one ``lax.scan``: (state, {name: (n_steps,)} history). ``start`` (the
    first step's index, given by ``run_batched``) is not needed: every KKT step is the same.
    Hyperparameters given as arrays must have θ*'s dtype (Python floats adapt to it)."""
    _check_dtypes(problem, **{f"the hyperparameter {name}": value for name, value in vars(hyper).items()
                              if isinstance(value, (jax.Array, np.ndarray)) and not getattr(value, "weak_type", False)})
    return scan_steps(lambda s: step(config, problem, hyper, s), state, n_steps)


def evaluate(config: KKTConfig, problem: Problem, hyper: Hyper, state: KKTState) -> dict:
    """Final per-run scalars at the current (x, λ): kkt_loss, stationarity, relative_residual
    (see ``kkt_loss``) and diverged. No gradient, no update."""
    total, terms = kkt_loss(config, problem, hyper, state.images, state.lambdas)
    return {"kkt_loss": total, "stationarity": terms["stationarity"],
            "relative_residual": terms["relative_residual"], "diverged": state.diverged}


def attack(config: KKTConfig, problem: Problem) -> Attack:
    """The KKT attack as a ``recon_jax.attack.Attack``: ``init_state((x₀, λ₀), hyper)`` with
    candidates x₀ (m, h, w, c) and multipliers λ₀, ``step``, ``run_steps`` and ``evaluate`` as
    above; the runs are ranked by ``kkt_loss`` L_KKT(x, λ)."""
    return Attack(name="kkt", final_loss="kkt_loss",
                  init_state=lambda start, hyper: init_state(config, problem, *start),
                  step=lambda state, hyper: step(config, problem, hyper, state),
                  evaluate=lambda state, hyper: evaluate(config, problem, hyper, state),
                  run_steps=lambda state, hyper, n, start=0: run_steps(config, problem, hyper, state, n, start))


register_attack("kkt", attack)


def candidate_labels(label_counts: Sequence[int], m: int | None = None, task: str = "binary") -> np.ndarray | None:
    """Labels (m,) of the m candidates, sorted by class; None for regression (φ uses no labels).

    m defaults to 2N (N = Σ label_counts), as in the reference. The candidates are
    class-balanced: each of the C classes gets ⌊m/C⌋, and the first m mod C classes one
    more (binary: half label 0, i.e. y = −1, and half label 1, y = +1, like the reference's
    ``data_extraction``).
    """
    if task not in TASKS:
        raise ConfigError(f"unknown KKT task {task!r}; choose one of {', '.join(TASKS)}")
    n_classes, n_train = len(label_counts), int(sum(label_counts))
    m = 2 * n_train if m is None else int(m)
    if task == "regression":
        if m < 1:
            raise ConfigError(f"the number of candidates must be >= 1, got {m}")
        return None
    if task == "binary" and n_classes != 2:
        raise ConfigError(f"task 'binary' needs 2 classes, the victim has {n_classes}; use task 'multiclass'")
    if m < n_classes:
        raise ConfigError(f"{m} candidates cannot cover {n_classes} classes; use m >= {n_classes} (default 2N)")
    per_class = [m // n_classes + (c < m % n_classes) for c in range(n_classes)]
    return np.repeat(np.arange(n_classes), per_class).astype(np.int32)


def initial_lambdas(key: jax.Array, m: int, task: str, n_outputs: int = 1, dtype=None) -> jax.Array:
    """λ₀: U[0, 1) of shape (m,) for binary/multiclass; N(0, 1) for regression, of shape (m,)
    for one output and (m, n_outputs) otherwise (free-sign multipliers, DecoReco)."""
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    if task == "regression":
        return jax.random.normal(key, (m,) if n_outputs == 1 else (m, n_outputs), dtype)
    if task not in TASKS:
        raise ConfigError(f"unknown KKT task {task!r}; choose one of {', '.join(TASKS)}")
    return jax.random.uniform(key, (m,), dtype)


SEARCH_RANGES = {"lr": LR_X_RANGE, "init_scale": INIT_SCALE_RANGE, "alpha": ALPHA_RANGE,
                 "lambda_min": LAMBDA_MIN_RANGE}


def search_ranges(overrides: dict | None = None) -> dict[str, tuple[float, float]]:
    """The KKT random-search ranges: the reference's (``SEARCH_RANGES``) with ``overrides``
    applied (``resolve_ranges``); lr and init_scale are log-uniform, α a sharpness > 0."""
    return resolve_ranges(overrides, SEARCH_RANGES, {"lr": "log-uniform", "init_scale": "log-uniform",
                                                     "alpha": "the modified-ReLU sharpness"})


def sample_hyper(key: jax.Array, n_runs: int, lr_lambda: float = REFERENCE_LR_LAMBDA, dtype=None,
                 ranges: dict | None = None):
    """The reference's random search, as arrays (n_runs,): (Hyper, init_scale).

    lr_x ~ log-U[1e-5, 1], α ~ U[10, 500], λ_min ~ U[0.01, 0.5], lr_λ fixed (1e-4), and the
    initial-candidate scale σ ~ log-U[1e-6, 0.1] (for x₀ ~ N(0, σ²); it is not a step
    hyperparameter, so it is returned beside ``Hyper``). ``ranges`` overrides any of these
    ranges by name (lr, init_scale, alpha, lambda_min; see ``search_ranges``).
    """
    if n_runs < 1:
        raise ConfigError(f"the number of runs must be >= 1, got {n_runs}")
    bounds = search_ranges(ranges)
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    k_lr, k_scale, k_alpha, k_min = jax.random.split(key, 4)

    def log_uniform(k, bounds):
        lo, hi = math.log(bounds[0]), math.log(bounds[1])
        return jnp.exp(jax.random.uniform(k, (n_runs,), dtype, lo, hi))

    def uniform(k, bounds):
        return jax.random.uniform(k, (n_runs,), dtype, *bounds)

    hyper = Hyper(lr_x=log_uniform(k_lr, bounds["lr"]), lr_lambda=jnp.full((n_runs,), lr_lambda, dtype),
                  alpha=uniform(k_alpha, bounds["alpha"]), lambda_min=uniform(k_min, bounds["lambda_min"]))
    return hyper, log_uniform(k_scale, bounds["init_scale"])


def problem_from_victim(victim: Victim, task: str, m: int | None = None, box: str = "centered") -> Problem:
    """The attacker's view of a ``recon_jax.checkpoint.Victim``: θ*, its architecture,
    class-balanced labels for m candidates (default 2N, see ``candidate_labels``), and the
    bounds of ``box`` (``box_bounds``; ``pixel`` reads the victim's released training mean)."""
    labels = candidate_labels(victim.label_counts, m, task)
    lower, upper = box_bounds(box, victim.input_mean, victim.image_shape)
    dtype = jax.tree_util.tree_leaves(victim.params)[0].dtype
    return Problem(victim_params=victim.params, labels=None if labels is None else jnp.asarray(labels),
                   model=victim.model, box_lower=jnp.asarray(lower, dtype), box_upper=jnp.asarray(upper, dtype))


def flops_per_step(model: nn.Module, image_shape: Sequence[int], m: int) -> int:
    """Analytic FLOP count of one KKT step on m candidates, for any network built from dense
    and convolution layers. With F_l the multiply-adds per sample of weight layer l
    (``models.layer_macs``: d_{l−1}·d_l for a dense layer, H'·W'·k²·c_in·c_out for a
    convolution) and F = Σ_l F_l, a layer on m samples costs 2·m·F_l FLOPs (a multiply-add is
    2 FLOPs), and so does each of its two transposes (the product for the input's cotangent
    and the one for the weight's):

      forward              z_l = W_l h_{l−1}                                2mF
      θ-gradient (G)       ∇W_l from (h_{l−1}, δ_l)                          2mF
                           δ_{l−1} from δ_l, l ≥ 2                           2m(F − F_1)
      double backward      reverse of z_l = W_l h (W = θ* is constant): one  2mF
      (∂/∂x, ∂/∂λ)         product per layer, for the cotangent of h
                           reverse of ∇W_l: both factors depend on x,        4mF
                           two products per layer
                           reverse of δ_{l−1}: one product per layer l ≥ 2   2m(F − F_1)

    Total 14·m·F − 4·m·F_1. For a chain of dense layers with widths d_0 = h·w·c, …, d_L,
    F = P = Σ_l d_{l−1} d_l (matmul weights), so the count is 14·m·P − 4·m·d_0·d_1 (the
    affine model: 10·m·d_0·d_1).

    These are model FLOPs in the MFU convention: matmuls and convolutions only. Elementwise
    work is left out: per candidate pixel the box penalty, its gradient, the optimiser update
    and the NaN guard; per hidden unit the activation with σ' and σ''; pooling. XLA's cost
    analysis of the compiled step (CPU, float64, m = 32…40) counts 40–55 such FLOPs per pixel
    and a few tens per hidden unit, so it exceeds this count by 2–5% for hidden widths ≥ 128
    (e.g. 1.02 for 768-512-10, 1.05 for 192-128-128-1), but by 1.4× for an affine 10-class
    model and 6.5× for an affine binary one, where the matmuls do only 10·C FLOPs per pixel.
    """
    macs = layer_macs(model, image_shape)
    return 14 * m * sum(macs) - 4 * m * macs[0]


# --------------------------------------------------------------------------- the method descriptor

KKT_CONVERGED_RESIDUAL = 1e-3
"""A run has converged when its final relative residual ‖θ* − G(x, λ)‖ / ‖θ*‖ (reported by
``kkt_loss`` as ``relative_residual``) is at most this (``recon_jax.study.convergence_columns``).
The KKT objective L_KKT is absolute: it grows with ‖θ*‖² and holds the box and λ penalties, so
no threshold on it means the same on two victims. The squared relative residual
‖θ* − G‖² / ‖θ*‖² is the same kind of figure as the bilevel objective, a relative squared
mismatch in parameter space (θ* against what the candidates imply), so the bilevel criterion
1e-6 on it (``bilevel.CONVERGED_OBJECTIVE``) is √1e-6 = 1e-3 on the residual."""

DEFAULT_DTYPE = "float32"
"""The run's dtype when the spec gives none: float32, which ``benchmarks/precision.py``
measured safe for KKT (gradient of L_KKT within 1e-7 of float64's, L_KKT after 100 steps
equal to 7 digits; ``benchmarks/README.md``)."""


def _objective(victim: Victim, *, labels=None, kkt_config: KKTConfig | None = None, kkt_hyper: Hyper | None = None,
               ridge: float | None = None, **_) -> Callable:
    """f(x) = min_λ of the stationarity residual against ``victim`` (``landscape.kkt_objective``,
    λ profiled out). The task defaults to the one ``recon-jax reconstruct`` derives from the
    victim's loss; ``labels`` default to ``candidate_labels(victim.label_counts, m)`` for the m
    candidates f is given; α comes from ``kkt_hyper`` (default 300) for relu victims.
    Returns f."""
    from recon_jax import landscape  # landscape imports this module

    ridge = landscape.DEFAULT_RIDGE if ridge is None else ridge
    if kkt_config is None:
        kkt_config = KKTConfig(task=default_kkt_task(victim.train_config.loss, victim.train_config.weight_decay))
    task = kkt_config.task
    if labels is not None or task == "regression":
        problem = Problem(victim_params=victim.params, model=victim.model,
                          labels=None if labels is None else jnp.asarray(labels))
        return landscape.kkt_objective(problem, kkt_config, kkt_hyper, ridge)

    def f(images: jax.Array) -> jax.Array:  # labels for however many candidates x holds
        chosen = jnp.asarray(candidate_labels(victim.label_counts, images.shape[0], task))
        problem = Problem(victim_params=victim.params, model=victim.model, labels=chosen)
        return landscape.kkt_objective(problem, kkt_config, kkt_hyper, ridge)(images)

    return f


def _objective_options(spec, run: dict, best: int) -> dict:
    """The objective's options for a finished run: its ``KKTConfig`` and the ``Hyper`` of its
    best run ``best`` (α sets the attacked network's sharpness), read from run.json."""
    hyper = Hyper(lr_x=run["run_lr_x"][best], lr_lambda=run["run_lr_lambda"][best],
                  alpha=run["run_alpha"][best], lambda_min=run["run_lambda_min"][best])
    return {"kkt_config": spec.kkt, "kkt_hyper": hyper}


def _landscape_point_bytes(victim: Victim, labels, spec, dtype) -> int:
    """Device bytes of one point of the profiled objective, which holds a (q, P) Jacobian (q = m
    candidates, times the outputs for regression): 4·q·P numbers of ``dtype``. Returns them."""
    q = len(labels) * (victim.model.n_out if spec.kkt.task == "regression" else 1)
    return 4 * q * count_params(victim.params) * np.dtype(dtype).itemsize


register_descriptor(Method(
    name="kkt", converged=Convergence("final_relative_residual", KKT_CONVERGED_RESIDUAL, "relative_residual"),
    mismatch_key="final_relative_residual", objective=_objective, objective_options=_objective_options,
    validate_search_ranges=search_ranges, default_dtype=DEFAULT_DTYPE,
    dtype_reason="benchmarks/precision.py: float32 is safe for KKT", landscape_point_bytes=_landscape_point_bytes))
