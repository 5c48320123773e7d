"""How much device memory one initialisation needs: the model behind automatic chunk sizes.

A chunk of K initialisations runs as one compiled ``jit(vmap(run))`` segment
(``recon_jax.batching``). Its device footprint is, to XLA's buffer assignment,

    bytes(K) = fixed + K · per_init

where ``fixed`` is what every device holds once (θ*, labels) and ``per_init`` is the
slope estimated here, in words of the run's dtype (×itemsize for bytes), from the parameter
count P, the largest weight matrix P_max = max_l d_{l−1}·d_l, the images or candidates
I = (number of images) × h·w·c, the activations A = (number of images) × Σ_l d_l (hidden
widths and outputs), and the history records R (5 per step and initialisation, × segment):

    bilevel   per_init = (4·s + c_θ + 2·[cg residual]) · P + c_x · I + 4 · A + R
                 s      L-BFGS history size (``InnerConfig.history_size``): the s pairs of
                        θ-vectors (θ_k+1 − θ_k, ∇_k+1 − ∇_k), each held twice, because a
                        vmapped while-loop keeps the loop state and the body's updated copy
                 c_θ    other θ-sized vectors of the inner solve and the adjoint (θ, ∇L, the
                        search direction, the line search's trial point and gradient, the
                        warm starts, the probe, CG's x, r, p and A·p), again double-buffered:
                        13 for the jaxopt backend, 14 for custom_vjp
                 2      the CG-residual diagnostic (``record_cg_residual``): H·v and the residual
                 c_x    image-sized arrays: x, its gradient and the update, the optimiser's moments
                        (Adam 2, SGD momentum 1), the VJP's ∂/∂x buffers:
                        jaxopt 7, custom_vjp 5 with Adam; one fewer with SGD
    kkt       per_init = c_x · I + 2 · P_max + c_a · A + R
                 c_x    4 with SGD (x, its momentum, ∇_x and the update; state updated in
                        place), 6 with Adam (two moments)
                 2      the largest layer's G_l = ∇_{W_l}[(1/m) Σ_j λ_j φ_j] and its residual or
                        cotangent: XLA schedules the layers' terms one after another, so only
                        one layer's pair is live at the peak, and θ* itself is ``fixed``
                 c_a    per candidate and unit, the forward values and the double backward's
                        cotangents: 3 for relu (the attacked modified relu) and tanh, 4 for
                        softplus, 5 for gelu (its second derivative keeps erf and exp terms)
    fixed   = P words (θ*, shared by all initialisations on a device, held once per device)

The coefficients are counts of arrays that XLA keeps live at the program's peak, read off
``jax.jit(...).lower(...).compile().memory_analysis()`` (argument + output + temp − alias
bytes) of the library's own vmapped segments (10 steps) on CPU for chunk sizes K = 1, 8, 32,
with the slope d bytes / d K (least squares) compared to the model. ``python -m
recon_jax.memory [--reference]`` prints this table; ``tests/test_memory.py`` asserts the
ratio on cases outside it. JAX 0.10.2 CPU, float64, 2026-11-28 (float32 gives the same word
counts, i.e. half the bytes):

    case                                               measured MiB/init  model MiB/init  model/measured
    bilevel 64-10 affine, N=20, jaxopt, s=10                       0.351           0.348   0.989
    bilevel 3072-10 affine, N=10, jaxopt, s=10                    14.515          14.539   1.002
    bilevel 3072-10 affine, N=100, jaxopt, s=10                   29.277          29.332   1.002
    bilevel 3072-64-10 gelu, N=10, jaxopt, s=10                   84.488          84.463   1.000
    bilevel 784-256-10 gelu, N=20, jaxopt, s=10                   86.257          86.405   1.002
    bilevel 3072-10 affine, N=10, jaxopt, s=5                      9.849           9.850   1.000
    bilevel 3072-10 affine, N=10, custom_vjp, s=10                14.288          14.305   1.001
    bilevel 3072-64-10 gelu, N=10, custom_vjp, s=10               86.917          85.500   0.984
    kkt 192-64-64-1 relu, m=20, sgd                                0.348           0.364   1.047
    kkt 192-64-64-1 relu, m=200, sgd                               2.157           1.950   0.904
    kkt 192-512-512-1 relu, m=40, sgd                              5.204           5.173   0.994
    kkt 3072-128-128-1 relu, m=40, sgd                             9.998           9.986   0.999
    kkt 784-1000-1 gelu, m=200, sgd                               24.514          24.385   0.995
    kkt 192-64-64-1 relu, m=20, adam                               0.406           0.423   1.040
    kkt 192-64-4 tanh, m=20, multiclass, sgd                       0.339           0.336   0.993
    benchmark shapes (compiled at K = 2, 4, not run):
    bilevel 3072-10 affine, N=100, jaxopt                         29.319          29.332   1.000
    bilevel 3072-1000-10 gelu, N=100, jaxopt                    1313.175        1313.171   1.000
    kkt 3072-1000-1000-1 relu, m=1000, sgd                       170.632         186.425   1.093

So the bilevel model is within 2% of the compiled slope for affine and one-hidden-layer
victims, and the KKT model within 10% from 192-64-64-1 to the reference 3072-1000-1000-1
with m = 1000. These are XLA:CPU's static buffer assignments; a GPU build fuses
differently, so ``benchmarks/gpu.py`` prints its measured peak
(``memory_stats()['peak_bytes_in_use']``) beside this estimate. ``batching.auto_chunk_size``
plans for a fraction of the free memory (25% on CPU, whose memory other processes share;
50% on accelerators, whose JAX pool is already 75% of the device), which leaves room for
the model's error, the ``finish`` program and the host transfers.

Architectures without a formula (anything but ``models.MLP``, see ``has_formula``) are sized
by a compiled probe, ``probe_estimate``: the segment program compiled (not run) at K = 1 and
K = 2, per_init = bytes(2) − bytes(1) and fixed = bytes(1) − per_init.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

N_RECORDS = 5  # history records per step: bilevel (outer_loss, objective, inner_grad_norm,
# inner_iterations, cg_residual) and kkt (kkt_loss, stationarity, box_penalty, lambda_penalty,
# relative_residual)
BILEVEL_THETA_VECTORS = {"jaxopt": 13, "custom_vjp": 14}  # c_θ, besides the 4·s of the history
BILEVEL_IMAGE_VECTORS = {"jaxopt": 7, "custom_vjp": 5}  # c_x with Adam (SGD: one fewer)
BILEVEL_ACTIVATION_VECTORS = 4
KKT_IMAGE_VECTORS = {"sgd": 4, "adam": 6}
KKT_LAYER_VECTORS = 2
KKT_ACTIVATION_VECTORS = {"relu": 3, "modified_relu": 3, "tanh": 3, "softplus": 4, "gelu": 5}


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Device bytes of a chunk: ``fixed`` once per device plus ``per_init`` per initialisation.

    ``terms`` breaks ``per_init`` down (bytes per named term) for messages and reports.
    """

    per_init: int
    fixed: int
    terms: dict

    def total(self, k: int) -> int:
        """Bytes of a chunk of k initialisations on one device."""
        return self.fixed + int(k) * self.per_init

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / 2**20:.1f}" for name, value in self.terms.items())
        return f"{self.per_init / 2**20:.1f} MiB per initialisation ({parts} MiB) + {self.fixed / 2**20:.1f} MiB shared"


def _estimate(terms_words: dict, fixed_words: int, itemsize: int) -> Estimate:
    terms = {name: int(words) * itemsize for name, words in terms_words.items()}
    return Estimate(per_init=sum(terms.values()), fixed=int(fixed_words) * itemsize, terms=terms)


def bilevel_estimate(*, n_params: int, n_images: int, image_size: int, widths: Sequence[int], itemsize: int,
                     history_size: int = 10, backend: str = "jaxopt", record_cg_residual: bool = True,
                     optimizer: str = "adam", segment: int = 100) -> Estimate:
    """The bilevel model of the module docstring. ``image_size`` = h·w·c; ``widths`` = hidden widths and
    the output count (Σ_l d_l); ``segment`` = steps per compiled segment (history records)."""
    theta = (4 * history_size + BILEVEL_THETA_VECTORS[backend] + (2 if record_cg_residual else 0)) * n_params
    images = (BILEVEL_IMAGE_VECTORS[backend] - (optimizer != "adam")) * n_images * image_size
    return _estimate({"theta_vectors": theta, "images": images,
                      "activations": BILEVEL_ACTIVATION_VECTORS * n_images * sum(widths),
                      "records": N_RECORDS * segment}, n_params, itemsize)


def kkt_estimate(*, n_params: int, m: int, image_size: int, hidden: Sequence[int], n_out: int, activation: str,
                 itemsize: int, optimizer: str = "sgd", segment: int = 100) -> Estimate:
    """The KKT model of the module docstring for an MLP image_size-hidden-n_out and m candidates."""
    dims = (image_size, *hidden, n_out)
    largest_layer = max(a * b for a, b in zip(dims[:-1], dims[1:]))
    return _estimate({"candidates": KKT_IMAGE_VECTORS[optimizer] * m * image_size,
                      "largest_layer": KKT_LAYER_VECTORS * largest_layer,
                      "activations": KKT_ACTIVATION_VECTORS.get(activation, 5) * m * (sum(hidden) + n_out),
                      "records": N_RECORDS * segment}, n_params, itemsize)


def for_bilevel(victim, config, itemsize: int, segment: int = 100) -> Estimate:
    """``bilevel_estimate`` for a ``checkpoint.Victim`` and a ``bilevel.BilevelConfig``."""
    from recon_jax.models import count_params

    return bilevel_estimate(n_params=count_params(victim.params), n_images=victim.n_train,
                            image_size=math.prod(victim.image_shape),
                            widths=(*victim.model.hidden, victim.model.n_out), itemsize=itemsize,
                            history_size=config.inner.history_size, backend=config.inner.backend,
                            record_cg_residual=config.record_cg_residual, optimizer=config.optimizer,
                            segment=min(segment, max(config.steps, 1)))


def for_kkt(victim, config, m: int, itemsize: int, segment: int = 100) -> Estimate:
    """``kkt_estimate`` for a ``checkpoint.Victim``, a ``kkt.KKTConfig`` and m candidates."""
    from recon_jax.models import count_params

    return kkt_estimate(n_params=count_params(victim.params), m=m, image_size=math.prod(victim.image_shape),
                        hidden=victim.model.hidden, n_out=victim.model.n_out, activation=victim.model.activation,
                        itemsize=itemsize, optimizer=config.optimizer, segment=min(segment, max(config.steps, 1)))


def has_formula(model) -> bool:
    """Whether the formulas above apply to the victim's architecture (MLPs, affine included);
    for any other, ``recon_jax.reconstruct`` sizes chunks with ``probe_estimate``."""
    from recon_jax.models import MLP

    return isinstance(model, MLP)


# --------------------------------------------------------------------------- measuring


def compiled_bytes(compiled) -> int:
    """Argument + output + temp − alias bytes of a compiled XLA program (its static footprint)."""
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("memory_analysis() is unavailable on this backend")
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def segment_bytes(init, run, finish, start, hyper, k: int, segment: int) -> int:
    """Compiled bytes of ``run_batched``'s segment program for a chunk of k on one device, without running it.

    ``start`` and ``hyper`` are ONE initialisation's inputs (no batch axis); only their shapes matter.
    """
    import jax
    import jax.numpy as jnp

    from recon_jax import batching

    where = batching.placement(1)
    program = batching.batched_program(init, run, finish, where)
    batch = lambda a: jax.ShapeDtypeStruct((k, *jnp.shape(a)), jnp.asarray(a).dtype, sharding=where.batch)
    start_k, hyper_k = jax.tree_util.tree_map(batch, start), jax.tree_util.tree_map(batch, hyper)
    state = jax.eval_shape(program.init, start_k, hyper_k)
    state = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where.batch), state)
    return compiled_bytes(program.run.lower(state, hyper_k, segment, 0).compile())


def measured_per_init(init, run, finish, start, hyper, segment: int, ks: Sequence[int] = (1, 8, 32)) -> dict:
    """The per-initialisation slope of ``segment_bytes`` over chunk sizes ``ks`` (least squares).

    Returns {"ks", "bytes" (per k), "slope", "intercept"}.
    """
    sizes = [segment_bytes(init, run, finish, start, hyper, k, segment) for k in ks]
    slope, intercept = np.polyfit(np.asarray(ks, float), np.asarray(sizes, float), 1)
    return {"ks": list(ks), "bytes": sizes, "slope": float(slope), "intercept": float(intercept)}


def probe_estimate(init, run, finish, start, hyper, segment: int) -> Estimate:
    """The compiled probe, for architectures without a formula: compile (do not run) the
    vmapped segment program at chunk sizes K = 1 and K = 2 and read off the line
    bytes(K) = fixed + K · per_init through the two points,

        per_init = bytes(2) − bytes(1),      fixed = bytes(1) − per_init

    with bytes(K) = argument + output + temp − alias bytes (``segment_bytes``). ``start`` and
    ``hyper`` are ONE run's inputs (no batch axis). Two compiles of the segment program: seconds
    for small victims, more for large ones. Both figures are clipped at 0 (XLA may share
    buffers differently at K = 1); ``per_init`` is at least one byte.
    """
    one, two = (segment_bytes(init, run, finish, start, hyper, k, segment) for k in (1, 2))
    per_init = max(two - one, 1)
    return Estimate(per_init=per_init, fixed=max(one - per_init, 0), terms={"compiled_probe": per_init})


# --------------------------------------------------------------------------- checking the model


def bilevel_case(hidden: Sequence[int], image_shape: Sequence[int], n_images: int, n_out: int = 10, *,
                 backend: str = "jaxopt", history_size: int = 10, optimizer: str = "adam", segment: int = 10,
                 activation: str = "gelu", record_cg_residual: bool = True, dtype=None) -> dict:
    """A bilevel program on a random victim (memory does not depend on the values), with its estimate.

    Returns {"name", "program": (init, run, finish, start, hyper) for one initialisation, "segment", "estimate"}.
    """
    import jax
    import jax.numpy as jnp

    from recon_jax import bilevel
    from recon_jax.models import MLP, count_params, init_params
    from recon_jax.objectives import make_objective
    from recon_jax.solvers import InnerConfig

    dtype = jnp.zeros(()).dtype if dtype is None else jnp.dtype(dtype)
    model = MLP(n_out=n_out, hidden=tuple(hidden), activation=activation)
    params = init_params(model, jax.random.key(0), image_shape, dtype)
    problem = bilevel.Problem(victim_params=params, labels=jnp.arange(n_images) % n_out,
                              objective=make_objective(model.apply, "ce", 1e-3))
    config = bilevel.BilevelConfig(steps=segment, optimizer=optimizer, record_cg_residual=record_cg_residual,
                                   inner=InnerConfig(backend=backend, history_size=history_size))
    attack = bilevel.attack(config, problem)
    program = (attack.init_state, attack.run_steps, attack.evaluate,
               jnp.zeros((n_images, *image_shape), dtype),
               bilevel.Hyper(*(jnp.zeros((), dtype) for _ in range(3))))
    estimate = bilevel_estimate(n_params=count_params(params), n_images=n_images, image_size=math.prod(image_shape),
                                widths=(*hidden, n_out), itemsize=dtype.itemsize, history_size=history_size,
                                backend=backend, optimizer=optimizer, record_cg_residual=record_cg_residual,
                                segment=segment)
    dims = "-".join(map(str, (math.prod(image_shape), *hidden, n_out)))
    kind = activation if hidden else "affine"
    name = f"bilevel {dims} {kind}, N={n_images}, {backend}, s={history_size}, {optimizer}"
    return {"name": name, "program": program, "segment": segment, "estimate": estimate}


def kkt_case(hidden: Sequence[int], image_shape: Sequence[int], m: int, n_out: int = 1, *, activation: str = "relu",
             optimizer: str = "sgd", segment: int = 10, dtype=None) -> dict:
    """A KKT program (binary for one output, multiclass otherwise) on a random victim, with its estimate."""
    import jax
    import jax.numpy as jnp

    from recon_jax import kkt
    from recon_jax.models import MLP, count_params, init_params

    dtype = jnp.zeros(()).dtype if dtype is None else jnp.dtype(dtype)
    task = "binary" if n_out == 1 else "multiclass"
    model = MLP(n_out=n_out, hidden=tuple(hidden), activation=activation,
                use_bias=(True,) + (False,) * len(hidden))
    params = init_params(model, jax.random.key(0), image_shape, dtype)
    counts = (m // 2, m - m // 2) if n_out == 1 else tuple(m // n_out + (c < m % n_out) for c in range(n_out))
    problem = kkt.Problem(victim_params=params, labels=jnp.asarray(kkt.candidate_labels(counts, m, task)), model=model)
    config = kkt.KKTConfig(steps=segment, task=task, optimizer=optimizer)
    attack = kkt.attack(config, problem)
    program = (attack.init_state, attack.run_steps, attack.evaluate,
               (jnp.zeros((m, *image_shape), dtype), jnp.zeros((m,), dtype)),
               kkt.Hyper(*(jnp.zeros((), dtype) for _ in range(4))))
    estimate = kkt_estimate(n_params=count_params(params), m=m, image_size=math.prod(image_shape), hidden=hidden,
                            n_out=n_out, activation=activation, itemsize=dtype.itemsize, optimizer=optimizer,
                            segment=segment)
    dims = "-".join(map(str, (math.prod(image_shape), *hidden, n_out)))
    return {"name": f"kkt {dims} {activation}, m={m}, {task}, {optimizer}", "program": program, "segment": segment,
            "estimate": estimate}


def check(case: dict, ks: Sequence[int] = (1, 8, 32)) -> dict:
    """Measure a case's per-initialisation slope and compare it with its estimate (ratio = model / measured)."""
    measured = measured_per_init(*case["program"], segment=case["segment"], ks=ks)
    return {"name": case["name"], **measured, "model": case["estimate"].per_init,
            "ratio": case["estimate"].per_init / measured["slope"]}


CHECK_CASES = (
    lambda: bilevel_case((), (8, 8, 1), 20),
    lambda: bilevel_case((), (32, 32, 3), 10),
    lambda: bilevel_case((), (32, 32, 3), 100),
    lambda: bilevel_case((64,), (32, 32, 3), 10),
    lambda: bilevel_case((256,), (28, 28, 1), 20),
    lambda: bilevel_case((), (32, 32, 3), 10, history_size=5),
    lambda: bilevel_case((), (32, 32, 3), 10, backend="custom_vjp"),
    lambda: bilevel_case((64,), (32, 32, 3), 10, backend="custom_vjp"),
    lambda: kkt_case((64, 64), (8, 8, 3), 20),
    lambda: kkt_case((64, 64), (8, 8, 3), 200),
    lambda: kkt_case((512, 512), (8, 8, 3), 40),
    lambda: kkt_case((128, 128), (32, 32, 3), 40),
    lambda: kkt_case((1000,), (28, 28, 1), 200, activation="gelu"),
    lambda: kkt_case((64, 64), (8, 8, 3), 20, optimizer="adam"),
    lambda: kkt_case((64,), (8, 8, 3), 20, n_out=4, activation="tanh"),
)
REFERENCE_CASES = (  # the benchmarks' shapes, compiled (not run) at K = 2 and 4
    lambda: bilevel_case((), (32, 32, 3), 100),
    lambda: bilevel_case((1000,), (32, 32, 3), 100),
    lambda: kkt_case((1000, 1000), (32, 32, 3), 1000),
)


def main(argv=None) -> int:
    """Print the model against XLA's compiled footprint for ``CHECK_CASES`` (and the benchmark shapes)."""
    import argparse
    import datetime
    import os
    import platform

    import jax

    parser = argparse.ArgumentParser(prog="python -m recon_jax.memory", description=main.__doc__)
    parser.add_argument("--reference", action="store_true", help="also the benchmark shapes (compiled only)")
    parser.add_argument("--float32", action="store_true", help="float32 instead of float64")
    args = parser.parse_args(argv)
    if not args.float32:
        jax.config.update("jax_enable_x64", True)
    print(f"recon_jax memory model vs memory_analysis() of the compiled segment | {datetime.date.today()} | "
          f"jax {jax.__version__} {jax.default_backend()} | {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs | {'float32' if args.float32 else 'float64'}")
    print(f"{'case':<60} {'K':>9} {'measured MiB/init':>18} {'model MiB/init':>15} {'model/measured':>15}")
    runs = [(c, (1, 8, 32)) for c in CHECK_CASES] + ([(c, (2, 4)) for c in REFERENCE_CASES] if args.reference else [])
    for make, ks in runs:
        result = check(make(), ks)
        print(f"{result['name']:<60} {','.join(map(str, ks)):>9} {result['slope'] / 2**20:18.3f} "
              f"{result['model'] / 2**20:15.3f} {result['ratio']:15.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
