"""Victim architectures: pure Flax (linen) modules, ``MLP`` for affine, shallow and deep nets
and ``CNN`` for a small convolutional net, registered by name in ``ARCHITECTURES``.

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
import jax.extend.core
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


class Conv(nn.Module):
    """One 'SAME' convolution that computes in its parameters' dtype, like ``Dense``:
    h (n, H, W, c_in) -> (n, H, W, features),

        y[n, i, j, o] = Σ_{di, dj, c} cast(h)[n, i + di − p, j + dj − p, c] K[di, dj, c, o] + b[o],
        K: (k, k, c_in, features),  b: (features,),  p = ⌊(k − 1)/2⌋,

    with zero padding so that H and W are kept (what ``lax.conv_general_dilated`` computes with
    NHWC/HWIO, stride 1, padding 'SAME'). The parameters are ``kernel`` and ``bias`` as in
    ``flax.linen.Conv``.

    It is computed as one matrix product of the image patches (``image_patches``: (n, H, W,
    k·k·c_in)) with K reshaped to (k·k·c_in, features), not by ``lax.conv_general_dilated``.
    The attacks vmap one run over many initialisations, each with its own θ; a convolution
    whose kernel is batched becomes a grouped convolution, which XLA:CPU runs several times
    slower than the same work as a batched matrix product (measured on 2 cores, CNN 16-32 on
    100 CIFAR-10 images, gradient of the loss vmapped over 2 parameter sets: 5.4 s against
    0.72 s). The patches cost k² times the input's memory.
    """

    features: int
    kernel_size: int = 3

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        shape = (self.kernel_size, self.kernel_size, h.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, h.dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), kernel.dtype)
        patches = image_patches(h.astype(kernel.dtype), self.kernel_size)
        return patches @ kernel.reshape(-1, self.features) + bias


def image_patches(h: jax.Array, k: int) -> jax.Array:
    """The k×k neighbourhoods of every pixel, zero-padded 'SAME': (n, H, W, c) -> (n, H, W, k·k·c),

        patches[n, i, j, (di·k + dj)·c + c'] = h_pad[n, i + di, j + dj, c'],

    with h_pad padded by ⌊(k − 1)/2⌋ rows/columns before and the rest after (XLA's 'SAME'),
    so that ``patches @ K.reshape(k·k·c, −1)`` is the stride-1 'SAME' convolution with an HWIO
    kernel K. Built from k² slices (no convolution op), so it batches under vmap as plain
    indexing does.
    """
    n, height, width, c = h.shape
    low = (k - 1) // 2
    padded = jnp.pad(h, ((0, 0), (low, k - 1 - low), (low, k - 1 - low), (0, 0)))
    return jnp.concatenate([padded[:, di:di + height, dj:dj + width, :] for di in range(k) for dj in range(k)],
                           axis=-1)


def average_pool(h: jax.Array) -> jax.Array:
    """2×2 average pooling with stride 2: (n, H, W, c) -> (n, ⌊H/2⌋, ⌊W/2⌋, c),

        y[n, i, j, c] = ¼ Σ_{a, b ∈ {0, 1}} h[n, 2i + a, 2j + b, c]

    (a trailing odd row or column is dropped). It is linear in h."""
    n, height, width, c = h.shape
    h = h[:, : 2 * (height // 2), : 2 * (width // 2)]
    return h.reshape(n, height // 2, 2, width // 2, 2, c).mean(axis=(2, 4))


class CNN(nn.Module):
    """A small convolutional net on NHWC images:

        h_0 = x,   h_k = pool(σ(conv_k(h_{k−1}))),  k = 1…K   (3×3 'SAME' conv, 2×2 average pool)
        𝒩(θ; x) = W_L σ(… σ(W_1 vec(h_K) + b_1) …) + b_L      (``dense_hidden`` layers, then the head)

    Pooling is by *average*, not max: average pooling is linear, so 𝒩 is exactly as smooth
    as σ. Max pooling is only piecewise smooth (not differentiable where two inputs of a
    window tie, and its Hessian ignores which input wins), which would break what the
    bilevel attack needs: a training loss that is twice differentiable in θ, so that the
    stationarity certificate ∇_θL(θ*) = 0 is reachable and the implicit function theorem
    (Runkel et al. 2024) gives θ(x) with an invertible Hessian; and the KKT attack's mixed
    derivatives ∂²φ/∂θ∂x (Haim et al. 2022), which max pooling would route through one
    input per window only.

    Attributes:
      n_out: number of outputs.
      channels: output channels of the conv blocks; each block halves H and W, so the image
        needs H, W ≥ 2^len(channels).
      activation: one of ``ACTIVATIONS`` (or an attack-only one for attacked copies).
      dense_hidden: widths of dense hidden layers after flattening; ``()``: the head follows.
      softplus_beta: sharpness β of softplus (ignored otherwise).
      alpha: sharpness α of ``modified_relu`` (attack copies only; may be traced).

    ``__call__`` maps images (n, h, w, c) (or one image (h, w, c)) to outputs (n, n_out), in
    θ's dtype. Parameters: ``conv_k`` {kernel (3, 3, c_in, c_k), bias (c_k,)} for each block,
    then ``dense_l`` {kernel (d_in, d_l), bias (d_l,)} for the dense layers and the head.
    """

    n_out: int
    channels: tuple[int, ...] = (16, 32)
    activation: str = "gelu"
    dense_hidden: tuple[int, ...] = ()
    softplus_beta: float = 1.0
    alpha: float = 100.0

    def __post_init__(self):
        if self.n_out < 1:
            raise ConfigError(f"n_out must be >= 1, got {self.n_out}")
        if not self.channels or any(int(c) < 1 for c in self.channels):
            raise ConfigError(f"a CNN needs at least one conv block with >= 1 channels, got channels={self.channels}; "
                              "pass e.g. --channels 16,32")
        if any(int(h) < 1 for h in self.dense_hidden):
            raise ConfigError(f"dense hidden widths must be >= 1, got {self.dense_hidden}")
        if self.activation not in ACTIVATIONS and self.activation not in ATTACK_ACTIVATIONS:
            activation_fn(self.activation)  # raises the "unknown activation" error
        if self.activation == "softplus":
            activation_fn(self.activation, self.softplus_beta)
        super().__post_init__()

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        single = images.ndim == 3
        h = images[None] if single else images
        sigma = activation_fn(self.activation, self.softplus_beta, self.alpha)
        for k, width in enumerate(self.channels):
            if min(h.shape[1], h.shape[2]) < 2:
                raise ConfigError(f"images of shape {tuple(images.shape[-3:])} are too small for {len(self.channels)} "
                                  f"conv blocks (each halves height and width); use fewer --channels")
            h = average_pool(sigma(Conv(int(width), name=f"conv_{k}")(h)))
        h = h.reshape((h.shape[0], -1))
        widths = tuple(self.dense_hidden) + (self.n_out,)
        for i, width in enumerate(widths):
            h = Dense(int(width), name=f"dense_{i}")(h)
            if i < len(widths) - 1:
                h = sigma(h)
        return h[0] if single else h


def init_params(model: nn.Module, key: jax.Array, image_shape: Sequence[int], dtype=jnp.float32):
    """θ₀ = model.init(key, x) for one dummy image of shape (h, w, c): every leaf in ``dtype``.

    The initial draws are made in ``dtype`` (a float64 θ₀ is not a float32 draw widened)."""
    return model.init(key, jnp.zeros((1, *image_shape), dtype))


def count_params(params) -> int:
    """Total number of scalars in a parameter pytree."""
    return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


def expected_param_count(model: nn.Module, image_shape: Sequence[int]) -> int:
    """A closed form to check ``count_params`` against, with d_0 = h·w·c for an MLP:

        MLP   Σ_l d_{l−1}·d_l + [bias_l]·d_l
        CNN   Σ_k (9·c_{k−1} + 1)·c_k  +  Σ_l (d_{l−1} + 1)·d_l,
              c_0 = c, d_0 = ⌊h/2^K⌋·⌊w/2^K⌋·c_K (each of the K blocks halves h and w)
    """
    if isinstance(model, CNN):
        h, w, c = image_shape
        convs = sum((9 * c_in + 1) * c_out for c_in, c_out in zip((c, *model.channels[:-1]), model.channels))
        for _ in model.channels:
            h, w = h // 2, w // 2
        dims = (h * w * model.channels[-1], *model.dense_hidden, model.n_out)
        return convs + sum((d_in + 1) * d_out for d_in, d_out in zip(dims[:-1], dims[1:]))
    dims = (math.prod(image_shape), *model.hidden, model.n_out)
    return sum(d_in * d_out + (d_out if bias else 0)
               for d_in, d_out, bias in zip(dims[:-1], dims[1:], model.layer_biases))


def _never(model: nn.Module) -> bool:
    return False


class Architecture(NamedTuple):
    """A victim architecture: its flax module class and ``from_config(cfg) -> module``, the
    inverse of ``model_config`` (``cfg`` is the ``model`` entry of victim.json), and what the
    attacks may ask of it without knowing the class:

    - ``linear_in_params(model)``: whether 𝒩(θ; x) is linear in θ (then a convex loss plus
      weight decay is strongly convex in θ; see ``recon_jax.problems``). Default: never.

    FLOP counts need nothing from the registry: ``layer_macs`` reads the dense and
    convolution layers from the module's own program.
    """

    cls: type
    from_config: Callable[[dict], nn.Module]
    linear_in_params: Callable[[nn.Module], bool] = _never


ARCHITECTURES: dict[str, Architecture] = {}
"""Victim architectures by name (victim.json's ``model.arch``, absent for "mlp")."""


def register_architecture(name: str, cls: type, from_config: Callable[[dict], nn.Module], *,
                          linear_in_params: Callable[[nn.Module], bool] = _never) -> None:
    """Register a victim architecture (one line); ``model_from_config`` dispatches on its name.
    The keyword capabilities are described in ``Architecture``."""
    ARCHITECTURES[name] = Architecture(cls=cls, from_config=from_config, linear_in_params=linear_in_params)


def architecture_name(model: nn.Module) -> str:
    """The registered name of ``model``'s architecture (ConfigError if it has none)."""
    for name, entry in ARCHITECTURES.items():
        if type(model) is entry.cls:
            return name
    raise ConfigError(f"{type(model).__name__} is not a registered architecture; register it with "
                      "models.register_architecture")


def architecture(model: nn.Module) -> Architecture:
    """The registry entry of ``model``'s architecture (ConfigError if it has none)."""
    return ARCHITECTURES[architecture_name(model)]


def is_linear_in_params(model: nn.Module) -> bool:
    """Whether 𝒩(θ; x) is linear in θ (the affine model), per the architecture's registry entry."""
    return bool(architecture(model).linear_in_params(model))


def activation_label(model: nn.Module) -> str:
    """The victim's activation name, or "affine" for a network linear in θ (no activation applies)."""
    if is_linear_in_params(model):
        return "affine"
    return str(getattr(model, "activation", "unknown"))


def with_activation(model: nn.Module, activation: str, alpha) -> nn.Module:
    """A copy of ``model`` with activation σ replaced by ``activation`` (sharpness ``alpha``,
    possibly traced, for ``modified_relu``): the attacked copy of the KKT attack (Haim et al.
    2022). Works for any architecture whose module has ``activation`` and ``alpha`` fields."""
    names = {f.name for f in dataclasses.fields(model)}
    if not {"activation", "alpha"} <= names:
        raise ConfigError(f"architecture {architecture_name(model)!r} has no `activation` and `alpha` fields, so its "
                          f"activation cannot be swapped for {activation!r}; add both fields to {type(model).__name__} "
                          "(as MLP and CNN have) or train the victim with a smooth activation (gelu, softplus, tanh)")
    return model.clone(activation=activation, alpha=alpha)


def layer_macs(model: nn.Module, image_shape: Sequence[int]) -> tuple[int, ...]:
    """Multiply-adds per sample of each weight layer, in forward order: F_l for layer l.

        dense  d_in → d_out                      F = d_in · d_out
        conv   k_h×k_w, c_in → c_out on H'×W'     F = H' · W' · k_h · k_w · c_in / groups · c_out

    Read from the model's own program, not from a formula per architecture: the forward pass
    on one image of shape ``image_shape`` (h, w, c) is traced abstractly (no FLOPs are spent)
    and every ``dot_general`` and ``conv_general_dilated`` counts ∏(output shape) × (the
    contracted size), nested calls included. Any architecture built from dense and
    convolution layers is therefore covered; for an MLP with widths d_0 = h·w·c, …, d_L the
    result is (d_0 d_1, …, d_{L−1} d_L). Elementwise work (activations, pooling, biases) is not counted.
    """
    shape = tuple(int(s) for s in image_shape)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape), jnp.float32)))
    closed = jax.make_jaxpr(lambda p, x: model.apply(p, x))(params, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
    macs: list[int] = []

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                macs.append(math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract))
            elif name == "conv_general_dilated":
                rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
                kernel = eqn.invars[1].aval.shape
                per_output = kernel[rhs_spec[1]] * math.prod(kernel[d] for d in rhs_spec[2:])
                macs.append(math.prod(eqn.outvars[0].aval.shape) * per_output)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(closed.jaxpr)
    if not macs:
        raise ConfigError(f"{describe(model, shape)} has no dense or convolution layer to count")
    return tuple(macs)


def describe(model: nn.Module, image_shape: Sequence[int]) -> str:
    """A one-line description of the architecture for messages."""
    if type(model) is MLP:
        return (f"MLP(hidden={model.hidden}, n_out={model.n_out}, use_bias={model.use_bias}) "
                f"on images {tuple(image_shape)}")
    fields = ", ".join(f"{k}={v}" for k, v in model_config(model).items() if k != "arch")
    return f"{type(model).__name__}({fields}) on images {tuple(image_shape)}"


def model_config(model: nn.Module) -> dict:
    """The architecture as a JSON-serialisable dict (inverse: ``model_from_config``). An MLP's
    dict has no ``arch`` key (the default, as in every victim.json written before the
    registry); another architecture's records its registered name and its dataclass fields."""
    arch = architecture_name(model)
    if arch != "mlp":
        return {"arch": arch, **{f.name: _jsonable(getattr(model, f.name)) for f in dataclasses.fields(model)
                                 if f.name not in ("parent", "name")}}
    cfg = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
           if f.name in ("n_out", "hidden", "activation", "softplus_beta", "use_bias",
                         "first_layer_init_scale")}
    cfg["hidden"] = list(cfg["hidden"])
    if not isinstance(cfg["use_bias"], bool):
        cfg["use_bias"] = list(cfg["use_bias"])
    return cfg


def _jsonable(value):
    """Tuples as lists, as JSON stores them."""
    return list(value) if isinstance(value, tuple) else value


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


def _cnn_from_config(cfg: dict) -> CNN:
    """Rebuild a ``CNN`` from ``model_config`` output."""
    return CNN(n_out=int(cfg["n_out"]), channels=tuple(int(c) for c in cfg.get("channels", (16, 32))),
               activation=cfg.get("activation", "gelu"),
               dense_hidden=tuple(int(h) for h in cfg.get("dense_hidden", ())),
               softplus_beta=float(cfg.get("softplus_beta", 1.0)), alpha=float(cfg.get("alpha", 100.0)))


register_architecture("mlp", MLP, _mlp_from_config, linear_in_params=lambda model: not model.hidden)
register_architecture("cnn", CNN, _cnn_from_config)
