"""Victim architectures: one pure Flax (linen) ``MLP`` for affine, shallow and deep nets.

The network is used only through ``model.init`` / ``model.apply`` on plain parameter
pytrees, so every attack can treat θ as an ordinary pytree and differentiate through it.

    𝒩(θ; x) = W_L σ(… σ(W_1 vec(x) + b_1) …) + b_L

The network computes in the dtype of θ: each layer casts its input to its kernel's dtype,
so float32 images fed to a float64 θ* compute in float64 (and float64 images fed to a float32
θ compute in float32); the parameters are never cast. ``init_params(model, key, shape, dtype)``
creates θ in ``dtype``. Keeping images and θ in one dtype is the job of the library's entry
points (see ``recon_jax.precision``).

``hidden=()`` is the affine model 𝒩(θ; x) = W vec(x) + b; ``hidden=(1000,)`` has one
hidden layer; ``hidden=(1000, 1000)`` is the reference architecture of Haim et al. 2022
(with ``use_bias=(True, False, False)`` and ``first_layer_init_scale=1e-4``).

Which activations the bilevel method can certify (see ``training.certify``): the implicit
function theorem needs ∇_θL(θ*) = 0 and an invertible Hessian, i.e. a twice
differentiable training loss. gelu, softplus and tanh (and the affine model) are smooth,
and full-batch L-BFGS drives ‖∇L‖ to round-off. relu is not differentiable at 0: L-BFGS
and gradient descent stall at its kinks (measured ‖∇L‖ ≈ 3e-4 after 3000 iterations on
100 MNIST images), so relu victims are reported as not stationary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from recon_jax.errors import ConfigError

ACTIVATIONS: dict[str, Callable] = {}
"""Activations a victim may be trained with: name -> factory(softplus_beta, alpha) -> σ.
Add one with ``register_activation`` (one line); ``activation_fn`` looks names up here."""
SMOOTH_ACTIVATIONS: list[str] = []
"""The registered activations with σ'' ≠ 0 (``register_activation(..., smooth=True)``)."""
ATTACK_ACTIVATIONS: dict[str, Callable] = {}
"""Activations only for the attacked copy of a network (KKT attack, Haim et al. 2022); never for training."""


def register_activation(name: str, factory: Callable, *, smooth: bool = False, attack_only: bool = False) -> None:
    """Register σ under ``name``: ``factory(softplus_beta, alpha) -> σ`` with σ elementwise,
    (...) -> (...). ``smooth``: σ has a nonzero second derivative (the bilevel certificate and
    the KKT attack's double backward rely on it); ``attack_only``: for attacked copies only."""
    (ATTACK_ACTIVATIONS if attack_only else ACTIVATIONS)[name] = factory
    if smooth and name not in SMOOTH_ACTIVATIONS:
        SMOOTH_ACTIVATIONS.append(name)


@jax.custom_jvp
def modified_relu(z: jax.Array, alpha: jax.Array) -> jax.Array:
    """ReLU forward, sigmoid(α z) as its derivative (Haim et al. 2022), at every order:

        σ(z) = max(z, 0) exactly,   σ'(z) := sigmoid(α z),   σ''(z) = α sigmoid(α z)(1 − sigmoid(α z)).

    The JVP rule returns ``modified_relu`` itself as its primal output, so relu *values*
    reached in higher-order differentiation are again differentiated with sigmoid(α z). This
    matters for the KKT attack's double backward: G = ∇_θ[...] contains relu values (e.g.
    ∇_{W₂} ∝ relu(z)), and the reference implementation (a PyTorch autograd Function)
    differentiates those with sigmoid(α z) too; returning ``jax.nn.relu(z)`` would give them
    the true step derivative. Equivalently, every derivative is that of softplus(α z)/α while
    the value is relu's. With the true relu, σ'' = 0 almost everywhere and the attack's second
    derivatives through the network vanish. ``alpha`` may be a traced (vmapped) value.
    """
    return jax.nn.relu(z)


@modified_relu.defjvp
def _modified_relu_jvp(primals, tangents):
    z, alpha = primals
    z_dot, _ = tangents  # α is a hyperparameter: no derivative with respect to it
    return modified_relu(z, alpha), jax.nn.sigmoid(alpha * z) * z_dot


def activation_fn(name: str, softplus_beta: float = 1.0, alpha: float = 100.0) -> Callable[[jax.Array], jax.Array]:
    """Return σ for an activation name.

    softplus with sharpness β is σ(z) = log(1 + exp(βz)) / β, which tends to relu as β → ∞.
    gelu is the exact (erf) form, so second derivatives are exact too. ``modified_relu``
    (attack copies only) uses ``alpha``, see ``modified_relu``.
    """
    factory = ACTIVATIONS.get(name) or ATTACK_ACTIVATIONS.get(name)
    if factory is None:
        raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return factory(softplus_beta, alpha)


def _softplus(beta: float, alpha: float) -> Callable[[jax.Array], jax.Array]:
    """σ(z) = log(1 + exp(βz)) / β, β > 0."""
    if not beta > 0:
        raise ConfigError(f"softplus sharpness must be > 0, got {beta}; pass e.g. softplus_beta=1.0")
    return lambda z: jax.nn.softplus(beta * z) / beta


register_activation("relu", lambda beta, alpha: jax.nn.relu)
register_activation("gelu", lambda beta, alpha: lambda z: jax.nn.gelu(z, approximate=False), smooth=True)
register_activation("softplus", _softplus, smooth=True)
register_activation("tanh", lambda beta, alpha: jnp.tanh, smooth=True)
register_activation("modified_relu", lambda beta, alpha: lambda z: modified_relu(z, jnp.asarray(alpha, z.dtype)),
                    attack_only=True)


class Dense(nn.Module):
    """One affine layer that computes in its parameters' dtype: h (n, d_in) -> (n, width),

        y = cast(h, dtype(W)) W + b,      W: (d_in, width),  b: (width,) (if ``use_bias``)

    The same parameter tree and arithmetic as ``flax.linen.Dense`` (``kernel``, ``bias``;
    ``lax.dot_general`` at default precision), except for the dtype rule: at initialisation
    W and b are created in h's dtype; when applied, h is cast to W's dtype, so the compute
    dtype is θ's, never the input's.
    """

    features: int
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (h.shape[-1], self.features), h.dtype)
        h = h.astype(kernel.dtype)
        y = lax.dot_general(h, kernel, (((h.ndim - 1,), (0,)), ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), kernel.dtype)
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class MLP(nn.Module):
    """Multilayer perceptron on flattened NHWC images.

    Attributes:
      n_out: number of outputs (C classes, or 1 for a binary/regression victim).
      hidden: widths of the hidden layers; ``()`` gives the affine model.
      activation: one of ``ACTIVATIONS``.
      softplus_beta: sharpness β of softplus (ignored otherwise).
      use_bias: one bool for all layers, or one per layer (``len(hidden) + 1``).
      first_layer_init_scale: if set, the first kernel is drawn N(0, s²) (the reference
        uses s = 1e-4); otherwise LeCun-normal like the other layers.
      alpha: sharpness α of ``modified_relu`` (attack copies only; may be traced, so an
        attacked copy ``model.clone(activation="modified_relu", alpha=a)`` can be vmapped over a).

    ``__call__`` maps images (n, h, w, c) (or one image (h, w, c)) to outputs (n, n_out), in
    θ's dtype (the images are cast to it, see ``Dense``).
    Parameters are ``{"params": {"layer_0": {"kernel": (d_in, d_1), "bias": (d_1,)}, ...}}``.
    """

    n_out: int
    hidden: tuple[int, ...] = ()
    activation: str = "gelu"
    softplus_beta: float = 1.0
    use_bias: bool | tuple[bool, ...] = True
    first_layer_init_scale: float | None = None
    alpha: float = 100.0

    def __post_init__(self):
        # Validate before any parameter is created, so a bad config fails fast.
        if self.n_out < 1:
            raise ConfigError(f"n_out must be >= 1, got {self.n_out}")
        if any(int(h) < 1 for h in self.hidden):
            raise ConfigError(f"hidden widths must be >= 1, got {self.hidden}")
        if self.activation not in ACTIVATIONS and self.activation not in ATTACK_ACTIVATIONS:
            activation_fn(self.activation)  # raises the "unknown activation" error
        if self.activation == "softplus":
            activation_fn(self.activation, self.softplus_beta)
        n_layers = len(self.hidden) + 1
        if not isinstance(self.use_bias, bool) and len(self.use_bias) != n_layers:
            raise ConfigError(
                f"use_bias has {len(self.use_bias)} entries but the net has {n_layers} layers "
                f"(hidden={self.hidden}); give one bool per layer or a single bool")
        if self.first_layer_init_scale is not None and not self.first_layer_init_scale > 0:
            raise ConfigError(f"first_layer_init_scale must be > 0, got {self.first_layer_init_scale}")
        super().__post_init__()

    @property
    def layer_biases(self) -> tuple[bool, ...]:
        n_layers = len(self.hidden) + 1
        if isinstance(self.use_bias, bool):
            return (self.use_bias,) * n_layers
        return tuple(bool(b) for b in self.use_bias)

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        single = images.ndim == 3
        h = images.reshape((1 if single else images.shape[0], -1))
        sigma = activation_fn(self.activation, self.softplus_beta, self.alpha)
        widths = tuple(self.hidden) + (self.n_out,)
        for i, (width, bias) in enumerate(zip(widths, self.layer_biases)):
            kernel_init = nn.initializers.lecun_normal()
            if i == 0 and self.first_layer_init_scale is not None:
                kernel_init = nn.initializers.normal(self.first_layer_init_scale)
            h = Dense(width, use_bias=bias, kernel_init=kernel_init, name=f"layer_{i}")(h)
            if i < len(widths) - 1:
                h = sigma(h)
        return h[0] if single else h


def init_params(model: MLP, key: jax.Array, image_shape: Sequence[int], dtype=jnp.float32):
    """θ₀ = model.init(key, x) for one dummy image of shape (h, w, c): every leaf in ``dtype``.

    The initial draws are made in ``dtype`` (a float64 θ₀ is not a float32 draw widened)."""
    return model.init(key, jnp.zeros((1, *image_shape), dtype))


def count_params(params) -> int:
    """Total number of scalars in a parameter pytree."""
    return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


def expected_param_count(model: MLP, image_shape: Sequence[int]) -> int:
    """Σ_l d_{l-1}·d_l + [bias_l]·d_l, with d_0 = h·w·c: a closed form to check against."""
    dims = (math.prod(image_shape), *model.hidden, model.n_out)
    return sum(d_in * d_out + (d_out if bias else 0)
               for d_in, d_out, bias in zip(dims[:-1], dims[1:], model.layer_biases))


class Architecture(NamedTuple):
    """A victim architecture: its flax module class and ``from_config(cfg) -> module``, the
    inverse of ``model_config`` (``cfg`` is the ``model`` entry of victim.json)."""

    cls: type
    from_config: Callable[[dict], nn.Module]


ARCHITECTURES: dict[str, Architecture] = {}
"""Victim architectures by name (victim.json's ``model.arch``, absent for "mlp")."""


def register_architecture(name: str, cls: type, from_config: Callable[[dict], nn.Module]) -> None:
    """Register a victim architecture (one line); ``model_from_config`` dispatches on its name."""
    ARCHITECTURES[name] = Architecture(cls=cls, from_config=from_config)


def architecture_name(model: nn.Module) -> str:
    """The registered name of ``model``'s architecture (ConfigError if it has none)."""
    for name, entry in ARCHITECTURES.items():
        if type(model) is entry.cls:
            return name
    raise ConfigError(f"{type(model).__name__} is not a registered architecture; register it with "
                      "models.register_architecture")


def model_config(model: nn.Module) -> dict:
    """The architecture as a JSON-serialisable dict (inverse: ``model_from_config``). An MLP's
    dict has no ``arch`` key (the default, as in every victim.json written before the
    registry); another architecture's records its registered name and its dataclass fields."""
    arch = architecture_name(model)
    if arch != "mlp":
        return {"arch": arch, **{f.name: getattr(model, f.name) for f in dataclasses.fields(model)
                                 if f.name not in ("parent", "name")}}
    cfg = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
           if f.name in ("n_out", "hidden", "activation", "softplus_beta", "use_bias",
                         "first_layer_init_scale")}
    cfg["hidden"] = list(cfg["hidden"])
    if not isinstance(cfg["use_bias"], bool):
        cfg["use_bias"] = list(cfg["use_bias"])
    return cfg


def model_from_config(cfg: dict) -> nn.Module:
    """Rebuild a model from ``model_config`` output, by its ``arch`` (default "mlp")."""
    arch = cfg.get("arch", "mlp")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch].from_config(cfg)


def _mlp_from_config(cfg: dict) -> MLP:
    """Rebuild an ``MLP`` from ``model_config`` output."""
    use_bias = cfg.get("use_bias", True)
    return MLP(n_out=int(cfg["n_out"]), hidden=tuple(int(h) for h in cfg.get("hidden", ())),
               activation=cfg.get("activation", "gelu"),
               softplus_beta=float(cfg.get("softplus_beta", 1.0)),
               use_bias=use_bias if isinstance(use_bias, bool) else tuple(use_bias),
               first_layer_init_scale=cfg.get("first_layer_init_scale"))


register_architecture("mlp", MLP, _mlp_from_config)
