"""The per-initialisation memory model (recon_jax.memory) against XLA's compiled footprint.

Each check compiles (does not run) the library's vmapped segment program for several chunk
sizes K, takes the slope of argument + output + temp − alias bytes over K, and requires the
model to be within 25% of it. The cases differ from the ones the coefficients were read off
(the table in recon_jax.memory's docstring, which has K = 1, 8, 32 for every case). A bilevel
compile takes 5-12 s on a 2-core CPU, so the bilevel checks here use two chunk sizes each; the
KKT ones use K = 1, 8, 32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon_jax import batching, checkpoint, data, memory
from recon_jax.errors import ConfigError
from recon_jax.kkt import KKTConfig
from recon_jax.models import MLP, init_params
from recon_jax.reconstruct import ReconstructionSpec, reconstruct
from recon_jax.training import TrainConfig, TrainReport

TOLERANCE = (0.75, 1.25)


def _assert_model_matches(case: dict, ks) -> dict:
    result = memory.check(case, ks)
    assert result["slope"] > 0
    assert TOLERANCE[0] <= result["ratio"] <= TOLERANCE[1], result
    return result


@pytest.mark.parametrize("case, ks", [
    ("memory.bilevel_case((16,), (8, 8, 1), 12, 4, history_size=6)", (8, 32)),
    ("memory.bilevel_case((), (6, 6, 3), 8, 3, backend='custom_vjp', history_size=4, optimizer='sgd')", (1, 8)),
], ids=["jaxopt-hidden", "custom_vjp-affine-sgd"])
def test_bilevel_model_matches_the_compiled_slope(case, ks):
    # In a subprocess compiled with LLVM -O0: the same buffer assignment (XLA's, before LLVM),
    # in about half the compile time of the default flags.
    code = ("import json, warnings; warnings.filterwarnings('ignore'); import jax; "
            "jax.config.update('jax_enable_x64', True); from recon_jax import memory; "
            f"print(json.dumps(memory.check({case}, {ks!r})))")
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["slope"] > 0 and TOLERANCE[0] <= result["ratio"] <= TOLERANCE[1], result


def test_kkt_model_matches_the_compiled_slope():
    for case in (memory.kkt_case((48, 32), (6, 6, 3), 30),
                 memory.kkt_case((40,), (8, 8, 1), 24, n_out=3, activation="gelu", optimizer="adam"),
                 memory.kkt_case((24, 24), (10, 10, 1), 16, activation="softplus")):
        _assert_model_matches(case, (1, 8, 32))


def test_estimates_scale_with_precision_history_and_optimizer():
    base = dict(n_params=1000, n_images=10, image_size=64, widths=(32, 10), itemsize=8)
    f64 = memory.bilevel_estimate(**base)
    assert memory.bilevel_estimate(**{**base, "itemsize": 4}).per_init * 2 == f64.per_init
    more_history = memory.bilevel_estimate(**base, history_size=11)
    assert more_history.per_init - f64.per_init == 4 * 1000 * 8  # one more (s, y) pair, double-buffered
    sgd = memory.bilevel_estimate(**base, optimizer="sgd")
    assert f64.per_init - sgd.per_init == 10 * 64 * 8  # one image-sized moment fewer
    assert f64.total(3) == f64.fixed + 3 * f64.per_init and f64.fixed == 1000 * 8
    kkt = memory.kkt_estimate(n_params=5000, m=20, image_size=64, hidden=(50,), n_out=1, activation="relu", itemsize=8)
    assert kkt.terms["largest_layer"] == 2 * 64 * 50 * 8
    assert "MiB per initialisation" in kkt.describe()


def _victim_folder(path):
    victim_data = data.select(data.load_dataset("digits"), n_per_class=2, classes=(0, 1), seed=0)
    model = MLP(n_out=2, hidden=(), activation="gelu")
    report = TrainReport(grad_norm=1.0, grad_norm_rel=1.0, loss=1.0, train_accuracy=1.0, heldout_accuracy=None,
                         n_params=130, iterations=0, stationary=True, certify_tol=1e-8, seconds=0.0, solver="none",
                         dtype="float64", note="random weights for a memory test")
    params = init_params(model, jax.random.key(0), (8, 8, 1), jnp.float64)
    return checkpoint.save_victim(path, model=model, params=params,
                                  image_shape=(8, 8, 1), train_config=TrainConfig(loss="ce", weight_decay=1e-2),
                                  report=report, data=victim_data, seed=0)


@pytest.mark.parametrize("method", ["bilevel", "kkt"])
def test_a_run_that_cannot_fit_one_initialisation_says_so_before_it_starts(tmp_path, monkeypatch, method):
    victim = _victim_folder(tmp_path / "victim")
    monkeypatch.setattr(batching, "available_memory_bytes", lambda devices=None: 5_000)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"one initialisation needs about [0-9.e-]+ GiB .* only [0-9.e-]+ GiB is "
                                          r"budgeted .*; use fewer images or candidates, a smaller victim, float32"):
        reconstruct(victim, out, ReconstructionSpec(method=method, n_inits=2))
    with pytest.raises(ConfigError, match=r"but a device has only [0-9.e-]+ GiB free"):
        reconstruct(victim, out, ReconstructionSpec(method=method, n_inits=2, chunk_size=1))
    assert not (out / "spec.json").exists() and not (out / "chunks").exists()  # nothing started


def test_reconstruct_plans_chunks_from_the_model(tmp_path, monkeypatch):
    victim = checkpoint.load_victim(_victim_folder(tmp_path / "victim"))
    from recon_jax.bilevel import BilevelConfig

    estimate = memory.for_bilevel(victim, BilevelConfig(), 8, segment=100)
    free = 4 * (estimate.fixed + 3 * estimate.per_init)  # 25% of it holds 3 initialisations
    monkeypatch.setattr(batching, "available_memory_bytes", lambda devices=None: free)
    assert batching.auto_chunk_size(10, estimate.per_init, fixed_bytes=estimate.fixed) == 3
    assert np.isclose(estimate.per_init, 8 * (55 * 130 + 7 * 4 * 64 + 4 * 4 * 2 + 5 * 100))


def test_compiled_probe_agrees_with_the_formula_on_an_mlp():
    # The probe (two compiles, K = 1 and 2) is the fallback for architectures without a formula;
    # on MLPs, which have one, it must agree with it to within a factor of ~3.
    for case in (memory.kkt_case((32,), (6, 6, 1), 20), memory.kkt_case((24, 16), (4, 4, 3), 12, optimizer="adam")):
        init, run, finish, start, hyper = case["program"]
        probe = memory.probe_estimate(init, run, finish, start, hyper, case["segment"])
        ratio = probe.per_init / case["estimate"].per_init
        assert 1 / 3 <= ratio <= 3, (case["name"], probe, case["estimate"])
        assert probe.fixed >= 0 and probe.terms == {"compiled_probe": probe.per_init}


def test_reconstruct_sizes_chunks_with_the_probe_without_a_formula(tmp_path, monkeypatch):
    folder = _victim_folder(tmp_path / "victim")
    task = ReconstructionSpec(method="kkt").kkt_config(checkpoint.load_victim(folder)).task
    spec = ReconstructionSpec(method="kkt", n_inits=2, segment=5, kkt=KKTConfig(task=task, steps=5))
    formula = reconstruct(folder, tmp_path / "formula", spec)["bytes_per_run_estimate"]
    calls = []
    probe = memory.probe_estimate
    monkeypatch.setattr(memory, "has_formula", lambda model: False)
    monkeypatch.setattr(memory, "probe_estimate", lambda *a: calls.append(a) or probe(*a))
    probed = reconstruct(folder, tmp_path / "probe", spec)["bytes_per_run_estimate"]
    assert len(calls) == 1 and calls[0][-1] == 5  # one probe, at the run's segment length
    assert 1 / 3 <= probed / formula <= 3, (probed, formula)
