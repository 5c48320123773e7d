"""GPU benchmark: initialisation-steps per second, achieved FLOP/s against the device's peak, peak memory.

Three cases, each the library's own vmapped, sharded segment program (``recon_jax.batching``),
compiled ahead, run once to warm up (the first outer steps from random images cost the most
inner iterations) and then timed over ``steps`` steps:

    (i)   bilevel, affine 3072-10, 100 CIFAR-10 images (10 per class), K = 1024 initialisations
    (ii)  bilevel, 3072-1000-10 gelu, 100 CIFAR-10 images, K = 64 initialisations
    (iii) KKT, 3072-1000-1000-1 relu (bias in the first layer only, Haim et al.), m = 1000
          candidates, R = 16 runs with different hyperparameters

``--reduced`` keeps every code path but shrinks the sizes so that a 2-core CPU finishes in a
few minutes: (i) 20 images, K = 8; (ii) 3072-32-10 gelu, 10 images, K = 4; (iii) 3072-64-64-1,
m = 40, R = 4; fewer steps.

Victims are trained in the script: (i) and (ii) with the library's L-BFGS
(``training.train_victim``, cross-entropy, λ_wd = 1e-3), capped at 500 iterations (100 with
--reduced), and the certificate is printed; (iii) takes θ from 20 L-BFGS steps of the logistic
loss on 500 images (250 vehicles, 250 animals; 10 with --reduced): a KKT step costs the same
whatever θ is, so the victim need not be converged. Images are CIFAR-10 (the test split, looked
up as ``recon-jax datasets`` says, e.g. ``RECON_JAX_DATA=/path/to/data``); with ``--synthetic``,
or when CIFAR-10 is absent, uniform random images of CIFAR's shape (no network is needed).

FLOPs are model FLOPs (matrix multiplies, 2 per multiply-add), derived here:

- KKT: ``kkt.flops_per_step`` per run and step (14·m·P − 4·m·d₀·d₁, derived in its docstring).
- bilevel, per initialisation and outer step: E·F_g + (C + 1)·F_hvp + F_xvjp, with, for an
  MLP with layer weight counts P_l (P_w = Σ P_l) on N images,
    F_g    = 6·N·P_w − 2·N·P_1   one value-and-gradient of the training loss (forward 2NP_w,
                                 weight gradients 2NP_w, activation gradients 2N(P_w − P_1))
    F_hvp  = 16·N·P_w − 10·N·P_1 one Hessian-vector product (forward-over-reverse: each of the
                                 gradient's matmuls has a tangent per operand that depends on θ;
                                 the primal weight gradients themselves are not needed, −2NP_w)
    F_xvjp = 12·N·P_w − 4·N·P_1  the VJP −(∂_x∇_θL)ᵀv that gives ∇_x (the double backward of a
                                 KKT step, 14mP − 4m·d₀d₁, less the unused primal weight gradients)
  E = value-and-gradient evaluations of the inner L-BFGS per step = (inner iterations, read from
  the timed run's history, per step and initialisation) × (evaluations per iteration, counted by
  jaxopt on a probe solve of initialisation 0 at the final state); C = adjoint CG iterations,
  counted on the same probe (from the warm start the library uses); the + 1 is the HVP of the
  CG-residual diagnostic. XLA's own count of F_g, F_hvp and F_xvjp (``cost_analysis``, which
  also counts elementwise work) is printed beside the analytic one.

Achieved FLOP/s = FLOPs of the timed steps / their wall time; the device's peak comes from a
table of dense peaks by ``device_kind`` (H200, H100, A100; fp64 = the FP64 tensor-core peak,
which cuBLAS DGEMM uses; "unknown" on CPU). Peak memory: on GPU, ``memory_stats()
['peak_bytes_in_use']`` of the device (each case runs in its own subprocess, so the peak is
that case's, victim training included); on CPU, the compiled segment's static footprint
(argument + output + temp − alias, ``memory_analysis()``) and the process's peak RSS
(``VmHWM``). Both sit beside ``recon_jax.memory``'s estimate for the chunk.

Precision: ``--dtype float64`` (default) or ``float32``. With float32, matmuls run in true
float32 (``jax_default_matmul_precision = "highest"``) unless ``--tf32`` asks for TensorFloat-32
(``"tensorfloat32"``; JAX's own default on recent NVIDIA GPUs); both are no-ops on CPU.

Command (from the repository root):

    python benchmarks/gpu.py [--reduced] [--synthetic] [--dtype float64|float32] [--tf32]
                             [--case i|ii|iii|all] [--devices N] [--out results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recon_jax import batching, bilevel, data, kkt, memory  # noqa: E402
from recon_jax.errors import ReconJaxError  # noqa: E402
from recon_jax.models import MLP, count_params, init_params  # noqa: E402
from recon_jax.objectives import make_objective  # noqa: E402
from recon_jax.solvers import InnerConfig, probed  # noqa: E402
from recon_jax.training import TrainConfig, train_victim  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py
from timing import Stopwatch, block, timed  # noqa: E402

CIFAR_SHAPE = (32, 32, 3)
CASES = ("i", "ii", "iii")

# Dense peak TFLOP/s by device kind (NVIDIA data sheets, SXM unless named; no sparsity).
# fp64 is the FP64 tensor-core rate, which cuBLAS DGEMM reaches on these parts.
PEAK_TFLOPS = {
    "H200": {"float64": 67.0, "float32": 67.0, "tf32": 494.7, "bfloat16": 989.4},
    "H100 PCIe": {"float64": 51.0, "float32": 51.0, "tf32": 378.0, "bfloat16": 756.0},
    "H100": {"float64": 67.0, "float32": 67.0, "tf32": 494.7, "bfloat16": 989.4},
    "A100": {"float64": 19.5, "float32": 19.5, "tf32": 156.0, "bfloat16": 312.0},
}

SIZES = {
    "full": {
        "i": dict(hidden=(), n_per_class=10, k=1024, warm_steps=5, steps=5, train_maxiter=500),
        "ii": dict(hidden=(1000,), n_per_class=10, k=64, warm_steps=3, steps=3, train_maxiter=500),
        "iii": dict(hidden=(1000, 1000), n_train=500, runs=16, warm_steps=20, steps=50, train_maxiter=20),
    },
    "reduced": {
        "i": dict(hidden=(), n_per_class=2, k=8, warm_steps=2, steps=2, train_maxiter=100),
        "ii": dict(hidden=(32,), n_per_class=1, k=4, warm_steps=2, steps=2, train_maxiter=100),
        "iii": dict(hidden=(64, 64), n_train=20, runs=4, warm_steps=5, steps=10, train_maxiter=20),
    },
}


# --------------------------------------------------------------------------- machine


def peak_tflops(device, dtype_name: str, tf32: bool) -> float | None:
    """The device's dense peak for the arithmetic in use, or None ("unknown", e.g. on CPU)."""
    kind = getattr(device, "device_kind", "")
    key = "tf32" if (tf32 and dtype_name == "float32") else dtype_name
    for name, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" is listed before "H100"
        if all(word in kind for word in name.split()):
            return peaks.get(key)
    return None


def vm_hwm_bytes() -> int | None:
    """Peak resident set size of this process (VmHWM), or None where /proc is absent."""
    return batching.proc_kib_field("/proc/self/status", "VmHWM")


def device_peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def machine() -> dict:
    device = jax.local_devices()[0]
    return {"backend": jax.default_backend(), "device_kind": device.device_kind,
            "local_devices": jax.local_device_count(), "jax": jax.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "platform": platform.platform()}


# --------------------------------------------------------------------------- data and victims


def images_for(n_per_class: int | None, synthetic: bool, *, binary_n: int | None = None, seed: int = 0):
    """(centered images (N,32,32,3), labels (N,), source) of CIFAR-10 or synthetic; binary: vehicles vs animals."""
    if not synthetic:
        try:
            ds = data.load_dataset("cifar10")
            if binary_n is not None:
                chosen = data.select(ds, n_per_class=binary_n // 2, binary_positive=(0, 1, 8, 9), seed=seed)
            else:
                chosen = data.select(ds, n_per_class=n_per_class, seed=seed)
            return chosen.train_centered(), np.asarray(chosen.train.labels), "CIFAR-10 test split"
        except ReconJaxError as err:
            print(f"  CIFAR-10 not found ({str(err).splitlines()[0][:120]}...); using synthetic images", flush=True)
    n_classes = 2 if binary_n is not None else 10
    n = binary_n if binary_n is not None else 10 * n_per_class
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 1.0, (n, *CIFAR_SHAPE)).astype(np.float32)
    labels = np.repeat(np.arange(n_classes), n // n_classes)
    return images - images.mean(axis=0, keepdims=True), labels, "synthetic U[0,1] images of CIFAR-10's shape"


def train(model, images, labels, loss: str, maxiter: int, dtype, weight_decay: float = 1e-3):
    config = TrainConfig(loss=loss, weight_decay=weight_decay, maxiter=maxiter, dtype=jnp.dtype(dtype).name)
    params0 = init_params(model, jax.random.key(0), CIFAR_SHAPE, dtype)
    with Stopwatch() as clock, warnings.catch_warnings():  # the certificate is printed below; KKT victims need none
        warnings.simplefilter("ignore")
        params, report = train_victim(model, params0, jnp.asarray(images, dtype), jnp.asarray(labels), config)
    print(f"  victim: {count_params(params):,} parameters, {report.iterations} L-BFGS iterations in "
          f"{clock.seconds:.1f} s, ||grad L|| = {report.grad_norm:.2e} (stationary: {report.stationary})",
          flush=True)
    return params, report


# --------------------------------------------------------------------------- FLOP counts


def layer_weights(model: MLP, image_shape) -> list[int]:
    dims = (math.prod(image_shape), *model.hidden, model.n_out)
    return [a * b for a, b in zip(dims[:-1], dims[1:])]


def bilevel_piece_flops(model: MLP, image_shape, n: int) -> dict:
    """Analytic matmul FLOPs of the pieces of an outer step (see the module docstring)."""
    p = layer_weights(model, image_shape)
    p_w, p_1 = sum(p), p[0]
    return {"grad": 6 * n * p_w - 2 * n * p_1, "hvp": 16 * n * p_w - 10 * n * p_1, "xvjp": 12 * n * p_w - 4 * n * p_1}


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _bilevel_benchmark_module():
    """benchmarks/bilevel.py, for its CG iteration counter (imported under another name)."""
    spec = importlib.util.spec_from_file_location("recon_jax_bilevel_benchmark", Path(__file__).with_name("bilevel.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bilevel_probe(problem: bilevel.Problem, config: bilevel.BilevelConfig, state_0: bilevel.OuterState) -> dict:
    """Evaluations per inner L-BFGS iteration and adjoint CG iterations, on one initialisation's state."""
    import jaxopt

    inner = config.inner
    zeros = jax.tree_util.tree_map(jnp.zeros_like, problem.victim_params)
    solver = jaxopt.LBFGS(fun=probed(problem.objective), tol=inner.tol, maxiter=inner.maxiter,
                          history_size=inner.history_size, jit=True)
    params, solver_state = jax.jit(lambda s: solver.run(s.inner_params, s.images, problem.labels, zeros))(state_0)
    iterations = max(1, int(solver_state.iter_num))
    evaluations = int(solver_state.num_grad_eval)

    counter = _bilevel_benchmark_module().count_cg_iterations

    @jax.jit
    def cg_iterations(params, s):
        g = jax.grad(lambda p: bilevel.parameter_loss(config.outer_loss, p, problem.victim_params))(params)
        grad_theta = lambda p: jax.grad(problem.objective)(p, s.images, problem.labels)
        op = lambda v: jax.tree_util.tree_map(lambda a, b: a + inner.cg_ridge * b,
                                              jax.jvp(grad_theta, (params,), (v,))[1], v)
        negative = lambda tree: jax.tree_util.tree_map(jnp.negative, tree)  # jaxopt solves H u = −g, u = −v
        return counter(op, negative(g), negative(s.adjoint), tol=inner.cg_tol, maxiter=inner.cg_maxiter)[0]

    return {"evaluations_per_iteration": evaluations / iterations, "probe_inner_iterations": iterations,
            "cg_iterations": int(cg_iterations(params, state_0))}


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    name: str
    description: str
    init: object
    run: object
    finish: object
    start: object  # batched (K, ...)
    hyper: object  # batched (K,)
    k: int
    warm_steps: int
    steps: int
    estimate: memory.Estimate
    flops: object  # (history after the timed steps, final state) -> FLOPs of the timed steps, all inits
    extra: dict


def bilevel_case(name: str, sizes: dict, dtype, synthetic: bool) -> Case:
    images, labels, source = images_for(sizes["n_per_class"], synthetic)
    model = MLP(n_out=10, hidden=sizes["hidden"], activation="gelu")
    params, report = train(model, images, labels, "ce", sizes["train_maxiter"], dtype)
    objective = make_objective(model.apply, "ce", 1e-3)
    problem = bilevel.Problem(victim_params=params, labels=jnp.asarray(labels), objective=objective)
    tol = 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-5
    config = bilevel.BilevelConfig(steps=sizes["steps"], inner=InnerConfig(tol=tol, cg_tol=tol))
    k, n = sizes["k"], len(labels)
    x0 = 0.1 * jax.random.normal(jax.random.key(1), (k, *images.shape), dtype)
    hyper = bilevel.Hyper(learning_rate=jnp.full((k,), 0.01, dtype), box_weight=jnp.zeros(k, dtype),
                          tv_weight=jnp.zeros(k, dtype))
    pieces = bilevel_piece_flops(model, CIFAR_SHAPE, n)
    x = jnp.asarray(images, dtype)
    y = jnp.asarray(labels)
    grad_theta = lambda p, x: jax.grad(objective)(p, x, y)
    xla = {"grad": xla_flops(lambda p, x: jax.value_and_grad(objective)(p, x, y), params, x),
           "hvp": xla_flops(lambda p, v, x: jax.jvp(lambda q: grad_theta(q, x), (p,), (v,))[1], params, params, x),
           "xvjp": xla_flops(lambda p, v, x: jax.vjp(lambda z: grad_theta(p, z), x)[1](v)[0], params, params, x)}

    def flops(history, states):
        state_0 = jax.tree_util.tree_map(lambda a: a[0], states)
        probe = bilevel_probe(problem, config, state_0)
        iterations = float(np.sum(history["inner_iterations"]))  # over all inits and timed steps
        init_steps = history["inner_iterations"].size
        evaluations = iterations * probe["evaluations_per_iteration"]
        total = (evaluations * pieces["grad"]
                 + init_steps * ((probe["cg_iterations"] + 1) * pieces["hvp"] + pieces["xvjp"]))
        return total, {**probe, "mean_inner_iterations": iterations / init_steps,
                       "flops_pieces": pieces, "xla_flops_pieces": xla}

    dims = "-".join(map(str, (math.prod(CIFAR_SHAPE), *sizes["hidden"], 10)))
    estimate = memory.bilevel_estimate(n_params=count_params(params), n_images=n, image_size=math.prod(CIFAR_SHAPE),
                                       widths=(*sizes["hidden"], 10), itemsize=jnp.dtype(dtype).itemsize,
                                       segment=sizes["steps"])
    kind = "gelu" if sizes["hidden"] else "affine"
    return Case(name=name, description=f"bilevel {dims} {kind}, {n} images ({source}),"
                f" K={k}", init=lambda x, h: bilevel.init_state(config, problem, x),
                run=lambda s, h, n, i=0: bilevel.run_steps(config, problem, h, s, n, i),
                finish=lambda s, h: bilevel.evaluate(config, problem, s), start=x0, hyper=hyper, k=k,
                warm_steps=sizes["warm_steps"], steps=sizes["steps"], estimate=estimate, flops=flops,
                extra={"victim_grad_norm": report.grad_norm, "victim_stationary": report.stationary,
                       "victim_iterations": report.iterations, "images": source})


def kkt_case(name: str, sizes: dict, dtype, synthetic: bool) -> Case:
    images, labels, source = images_for(None, synthetic, binary_n=sizes["n_train"])
    hidden = sizes["hidden"]
    model = MLP(n_out=1, hidden=hidden, activation="relu", use_bias=(True,) + (False,) * len(hidden))
    params, report = train(model, images, labels, "logistic", sizes["train_maxiter"], dtype, weight_decay=0.0)
    m, r = 2 * len(labels), sizes["runs"]
    config = kkt.KKTConfig(steps=sizes["steps"], task="binary")
    problem = kkt.Problem(victim_params=params, labels=jnp.asarray(kkt.candidate_labels((m // 2, m // 2), m)),
                          model=model)
    hyper, scale = kkt.sample_hyper(jax.random.key(2), r, dtype=dtype)
    hyper = kkt.Hyper(lr_x=jnp.full((r,), 1e-3, dtype), lr_lambda=hyper.lr_lambda, alpha=hyper.alpha,
                      lambda_min=hyper.lambda_min)  # one moderate lr: the timing must not see diverged runs
    x0 = 1e-3 * jax.random.normal(jax.random.key(3), (r, m, *CIFAR_SHAPE), dtype)
    lambdas = jax.random.uniform(jax.random.key(4), (r, m), dtype)
    per_step = kkt.flops_per_step(model, CIFAR_SHAPE, m)
    estimate = memory.kkt_estimate(n_params=count_params(params), m=m, image_size=math.prod(CIFAR_SHAPE), hidden=hidden,
                                   n_out=1, activation="relu", itemsize=jnp.dtype(dtype).itemsize,
                                   segment=sizes["steps"])
    dims = "-".join(map(str, (math.prod(CIFAR_SHAPE), *hidden, 1)))
    return Case(name=name, description=f"kkt {dims} relu, m={m} ({source}), R={r}",
                init=lambda start, h: kkt.init_state(config, problem, *start),
                run=lambda s, h, n, i=0: kkt.run_steps(config, problem, h, s, n, i),
                finish=lambda s, h: kkt.evaluate(config, problem, h, s), start=(x0, lambdas), hyper=hyper, k=r,
                warm_steps=sizes["warm_steps"], steps=sizes["steps"], estimate=estimate,
                flops=lambda history, states: (per_step * history["kkt_loss"].size, {"flops_per_run_step": per_step}),
                extra={"victim_iterations": report.iterations, "images": source})


def run_case(name: str, args) -> dict:
    dtype = jnp.dtype(args.dtype)
    sizes = SIZES["reduced" if args.reduced else "full"][name]
    print(f"\n[{name}] building ...", flush=True)
    case = (kkt_case if name == "iii" else bilevel_case)(name, sizes, dtype, args.synthetic)
    print(f"[{name}] {case.description}", flush=True)
    where = batching.placement(args.devices)
    k_padded = where.round_up(case.k)
    pad = lambda tree: jax.tree_util.tree_map(
        lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], k_padded - a.shape[0], axis=0)]) if k_padded > a.shape[0]
        else a, tree)
    program = batching.batched_program(case.init, case.run, case.finish, where)
    start, hyper = where.put(pad(case.start)), where.put(pad(case.hyper))
    state = block(program.init(start, hyper))
    del start

    with Stopwatch() as clock:
        warm = program.run.lower(state, hyper, case.warm_steps, 0).compile()
        measured = warm if case.steps == case.warm_steps else program.run.lower(state, hyper, case.steps, 0).compile()
    compile_seconds = clock.seconds
    static_bytes = memory.compiled_bytes(measured)

    (state, _), warm_seconds = timed(warm, state, hyper)
    (state, history), seconds = timed(measured, state, hyper)

    history = {key: np.asarray(v)[: case.k] for key, v in history.items()}
    states = jax.tree_util.tree_map(lambda a: a[: case.k], state)
    total_flops, flop_details = case.flops(history, states)
    init_steps = case.k * case.steps
    device = jax.local_devices()[0]
    peak = peak_tflops(device, dtype.name, args.tf32)
    achieved = total_flops / seconds
    per_device = -(-k_padded // where.n_devices)
    result = {
        "case": name, "description": case.description, "dtype": dtype.name, "tf32": args.tf32,
        "devices": where.n_devices, "k": case.k, "k_padded": k_padded, "warm_steps": case.warm_steps,
        "steps": case.steps, "compile_s": compile_seconds, "warm_s": warm_seconds, "timed_s": seconds,
        "init_steps_per_s": init_steps / seconds, "flops_timed": total_flops,
        "flops_per_init_step": total_flops / init_steps, "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak, "fraction_of_peak": None if peak is None else achieved / (peak * 1e12 * where.n_devices),
        "peak_bytes_device": device_peak_bytes(), "compiled_segment_bytes": static_bytes,
        "vm_hwm_bytes": vm_hwm_bytes(), "model_bytes_per_device": case.estimate.total(per_device),
        "model_bytes_per_init": case.estimate.per_init, "diverged": int(np.sum(np.asarray(states.diverged))),
        **flop_details, **case.extra,
    }
    print_result(result)
    return result


def print_result(r: dict) -> None:
    gib = lambda b: "-" if b is None else f"{b / 2**30:.2f} GiB"
    peak = "unknown" if r["peak_tflops"] is None else f"{r['peak_tflops']:.1f} TFLOP/s/device"
    share = "" if r["fraction_of_peak"] is None else f" = {100 * r['fraction_of_peak']:.1f}% of peak"
    measured = r["peak_bytes_device"] if r["peak_bytes_device"] is not None else r["compiled_segment_bytes"]
    print(f"[{r['case']}] {r['description']}, {r['dtype']}{' (TF32)' if r['tf32'] else ''}, {r['devices']} device(s)\n"
          f"      compile {r['compile_s']:.1f} s, warm-up {r['warm_steps']} steps {r['warm_s']:.2f} s, "
          f"timed {r['steps']} steps {r['timed_s']:.3f} s\n"
          f"      {r['init_steps_per_s']:.2f} init-steps/s | "
          f"{r['flops_per_init_step'] / 1e9:.3f} GFLOP per init-step | "
          f"{r['achieved_tflops'] * 1e3:.2f} GFLOP/s achieved, device peak {peak}{share}\n"
          f"      memory: device peak {gib(r['peak_bytes_device'])}, "
          f"compiled segment {gib(r['compiled_segment_bytes'])}, "
          f"process VmHWM {gib(r['vm_hwm_bytes'])}; model {gib(r['model_bytes_per_device'])} per device "
          f"(model / measured {r['model_bytes_per_device'] / measured:.2f})", flush=True)
    if "mean_inner_iterations" in r:
        print(f"      inner L-BFGS: {r['mean_inner_iterations']:.1f} iterations per step, "
              f"{r['evaluations_per_iteration']:.2f} evaluations per iteration (probe); adjoint CG "
              f"{r['cg_iterations']} iterations (probe); analytic / XLA GFLOP: "
              + ", ".join(f"{k} {r['flops_pieces'][k] / 1e9:.4g} / {r['xla_flops_pieces'][k] / 1e9:.4g}"
                          for k in r["flops_pieces"]), flush=True)


def configure(args) -> None:
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if args.tf32:
        jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    elif args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reduced", action="store_true", help="small sizes for a CPU (same code paths)")
    parser.add_argument("--synthetic", action="store_true", help="random images of CIFAR-10's shape")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--tf32", action="store_true", help="TensorFloat-32 matmuls (float32 on NVIDIA GPUs)")
    parser.add_argument("--case", choices=(*CASES, "all"), default="all")
    parser.add_argument("--devices", type=int, default=None, help="local devices to shard over (default: all)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--in-process", action="store_true",
                        help="run the cases in this process (default: one subprocess each, so peaks are per case)")
    args = parser.parse_args(argv)
    if args.tf32 and args.dtype != "float32":
        parser.error("--tf32 applies to --dtype float32")
    cases = CASES if args.case == "all" else (args.case,)
    info = {"command": " ".join([Path(sys.executable).name, *(sys.argv if argv is None else ["gpu.py", *argv])]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "mode": "reduced" if args.reduced else "full"}
    if args.in_process or len(cases) == 1:
        configure(args)
        info["machine"] = machine()
        print(f"recon_jax GPU benchmark | {info['date']} | {info['command']}\n"
              f"{info['machine']['local_devices']} x {info['machine']['device_kind']} ({info['machine']['backend']}), "
              f"jax {jax.__version__}, {info['machine']['cpu']} with {info['machine']['cpu_count']} CPUs", flush=True)
        results = [run_case(name, args) for name in cases]
    else:
        # One subprocess per case, so that each device peak is that case's alone. This process
        # never touches the backend: on a GPU it would otherwise take JAX's memory pool first.
        print(f"recon_jax GPU benchmark | {info['date']} | {info['command']}", flush=True)
        flags = [flag for flag, on in (("--reduced", args.reduced), ("--synthetic", args.synthetic),
                                       ("--tf32", args.tf32)) if on]
        flags += ["--dtype", args.dtype] + ([] if args.devices is None else ["--devices", str(args.devices)])
        results = []
        for name in cases:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "case.json"
                done = subprocess.run([sys.executable, __file__, *flags, "--case", name, "--out", str(out)])
                if done.returncode != 0 or not out.is_file():
                    print(f"[{name}] FAILED (exit status {done.returncode})", flush=True)
                    results.append({"case": name, "failed": done.returncode})
                    continue
                child = json.loads(out.read_text())
                info.setdefault("machine", child.get("machine"))
                results.extend(child["results"])
        print_summary(results)
    if args.out:
        Path(args.out).write_text(json.dumps({**info, "results": results}, indent=2, default=float))
        print(f"wrote {args.out}")
    return 0 if all("failed" not in r for r in results) else 1


def print_summary(results: list) -> None:
    print(f"\n{'case':<5} {'init-steps/s':>13} {'GFLOP/init-step':>16} {'achieved GFLOP/s':>17} {'% peak':>7} "
          f"{'peak mem GiB':>13} {'model GiB':>10}")
    for r in results:
        if "failed" in r:
            print(f"{r['case']:<5} FAILED")
            continue
        measured = r["peak_bytes_device"] if r["peak_bytes_device"] is not None else r["compiled_segment_bytes"]
        share = "-" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.1f}"
        print(f"{r['case']:<5} {r['init_steps_per_s']:13.2f} {r['flops_per_init_step'] / 1e9:16.3f} "
              f"{r['achieved_tflops'] * 1e3:17.2f} {share:>7} {measured / 2**30:13.3f} "
              f"{r['model_bytes_per_device'] / 2**30:10.3f}")


if __name__ == "__main__":
    sys.exit(main())
