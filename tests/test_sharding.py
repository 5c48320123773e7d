"""Sharding the batch of initialisations over local devices (recon_jax.batching).

The multi-device checks run in a subprocess: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
must be set before jax is imported, and this test process has long imported it with one CPU device.

Why the equality checks compile with ``--xla_backend_optimization_level=0``: a sharded program
is compiled through XLA's SPMD pipeline and an unsharded one is not, and on x86 the two can
differ in where LLVM contracts a multiply and an add into one FMA (measured: jaxopt's zoom line
search then differs by ~1e-16 after 3 L-BFGS iterations, and when that flips a tolerance test
the bilevel results differ by ~1e-8). Without FMA contraction (LLVM -O0, or
``--xla_cpu_max_isa=SSE4_2``) the per-initialisation arithmetic is the same whatever the device
count, and the results are bitwise equal. The KKT attack (no tolerance-terminated loops) is also
checked with the default compiler flags, to 1e-12.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon_jax import batching
from recon_jax.errors import ConfigError

STRICT_FLAGS = "--xla_backend_optimization_level=0"

SCRIPT = textwrap.dedent(r'''
    import json, sys, warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from pathlib import Path
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from recon_jax import batching, checkpoint, data, kkt, bilevel
    from recon_jax.errors import ConfigError
    from recon_jax.models import CNN, MLP, init_params
    from recon_jax.reconstruct import ReconstructionSpec, reconstruct
    from recon_jax.solvers import InnerConfig
    from recon_jax.training import TrainConfig, TrainReport

    method, device_counts, out = sys.argv[1], [int(d) for d in sys.argv[2].split(",")], Path(sys.argv[3])
    arch = sys.argv[4] if len(sys.argv) > 4 else "affine"
    result = {"n_devices": jax.local_device_count()}

    # A tiny victim folder: 2 digit classes x 2 images of 8x8, an affine model with random weights
    # (what is compared is the same program on different device counts, not the attack's success).
    victim_data = data.select(data.load_dataset("digits"), n_per_class=2, classes=(0, 1), seed=0)
    model = CNN(n_out=2, channels=(2,)) if arch == "cnn" else MLP(n_out=2, hidden=(), activation="gelu")
    params = init_params(model, jax.random.key(0), (8, 8, 1), jnp.float64)
    report = TrainReport(grad_norm=1.0, grad_norm_rel=1.0, loss=1.0, train_accuracy=1.0, heldout_accuracy=None,
                         n_params=sum(a.size for a in jax.tree_util.tree_leaves(params)), iterations=0, stationary=False, certify_tol=1e-8, seconds=0.0,
                         solver="none", dtype="float64", note="random weights for a sharding test")
    victim_dir = checkpoint.save_victim(out / "victim", model=model, params=params, image_shape=(8, 8, 1),
                                        train_config=TrainConfig(loss="ce", weight_decay=1e-2), report=report,
                                        data=victim_data, seed=0)

    if method == "errors":
        try:
            batching.select_devices(9)
        except ConfigError as err:
            result["select_devices_9"] = str(err)
        try:
            reconstruct(victim_dir, out / "too-many", ReconstructionSpec(n_inits=2, devices=9))
        except ConfigError as err:
            result["reconstruct_devices_9"] = str(err)
        print(json.dumps(result))
        sys.exit(0)

    if method == "bilevel":
        spec = ReconstructionSpec(method="bilevel", init="gaussian:0.1", n_inits=13, segment=2,
                                  # The implicit engine is bitwise device-count independent. The amortized
                                  # engine is not: its masked CG and Armijo tests at round-off level
                                  # flip with XLA's batch-size-dependent reductions (recon_jax.bilevel).
                                  bilevel=bilevel.BilevelConfig(steps=2, engine="implicit",
                                                                inner=InnerConfig(backend="custom_vjp")))
    else:
        # float64 (KKT's default is float32): the 1e-12 agreement below is a float64 statement.
        spec = ReconstructionSpec(method="kkt", init="gaussian:0.01", n_inits=13, learning_rate=0.05, segment=3,
                                  dtype="float64", kkt=kkt.KKTConfig(steps=3, task="regression"))

    # Record how run_batched's chunk state is placed when it checkpoints a segment.
    placements = []
    save_chunk = batching._save_chunk
    def recording_save_chunk(path, state, history, steps_done, **kwargs):
        leaf = state.images
        placements.append({"spec": str(leaf.sharding.spec), "devices": len(leaf.sharding.device_set),
                           "shards": len(leaf.addressable_shards),
                           "shard_devices": len({s.device for s in leaf.addressable_shards}),
                           "shard_rows": sorted({s.data.shape[0] for s in leaf.addressable_shards}),
                           "rows": leaf.shape[0]})
        save_chunk(path, state, history, steps_done, **kwargs)
    batching._save_chunk = recording_save_chunk

    runs = {}
    for d in device_counts:
        placements.clear()
        summary = reconstruct(victim_dir, out / f"run-{d}", spec.__class__(**{**spec.__dict__, "devices": d}))
        arrays = {}
        for name in ("reconstructions.npz", "history.npz"):
            with np.load(out / f"run-{d}" / name) as f:
                arrays.update({f"{name}:{k}": f[k] for k in f.files if f[k].dtype.kind != "U"})  # not image_mapping
        arrays["final_outer_loss"] = np.asarray(summary["final_outer_loss"])
        runs[d] = arrays
        result[f"placement_{d}"] = placements[0]
        result[f"chunk_size_{d}"] = summary["chunk_size"]
        result[f"devices_{d}"] = summary["devices"]
    reference = runs[device_counts[-1]]
    for d in device_counts[:-1]:
        # NaN marks "not measured at this step" (the amortized engine's refresh_correction between
        # refreshes): equal where both are NaN.
        result[f"bitwise_{d}"] = all(np.array_equal(runs[d][k], reference[k], equal_nan=True) for k in reference)
        result[f"max_abs_diff_{d}"] = max(float(np.nanmax(np.abs(runs[d][k].astype(float) - reference[k].astype(float)),
                                                          initial=0.0))
                                          for k in reference if runs[d][k].size)
        result[f"max_abs_diff_by_key_{d}"] = {
            k: float(np.nanmax(np.abs(runs[d][k].astype(float) - reference[k].astype(float)), initial=0.0))
            for k in reference if runs[d][k].size}
        result[f"allclose_1e-12_{d}"] = all(np.allclose(runs[d][k], reference[k], rtol=1e-12, atol=1e-12, equal_nan=True)
                                            for k in reference)
    result["n_runs"] = int(len(reference["final_outer_loss"]))
    result["finite"] = bool(np.all(np.isfinite(reference["final_outer_loss"])))
    print(json.dumps(result))
''')


def _run(tmp_path, method: str, devices: str, flags: str = STRICT_FLAGS, arch: str = "affine") -> dict:
    script = tmp_path / "sharding_check.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {flags}".strip(),
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(script), method, devices, str(tmp_path), arch], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_sharded_over(result: dict, d: int, rows: int) -> None:
    placement = result[f"placement_{d}"]
    assert placement["spec"] == str(jax.sharding.PartitionSpec(batching.AXIS))
    assert placement["devices"] == placement["shards"] == placement["shard_devices"] == d
    assert placement["rows"] == rows and placement["shard_rows"] == [rows // d]


def test_bilevel_reconstruction_on_8_devices_equals_1_device(tmp_path):
    result = _run(tmp_path, "bilevel", "8,1")
    assert result["n_devices"] == 8 and result["n_runs"] == 13 and result["finite"]
    assert result["devices_8"] == 8 and result["devices_1"] == 1
    _assert_sharded_over(result, 8, 16)  # K = 13 padded to a multiple of 8
    _assert_sharded_over(result, 1, 13)
    assert result["bitwise_8"], result["max_abs_diff_8"]


@pytest.mark.parametrize("method", ["bilevel", "kkt"])
def test_a_cnn_victim_shards_like_an_mlp(tmp_path, method):
    """A convolutional victim through the same sharded program: 13 runs padded to 16 over 8
    devices agree with 1 device to round-off (KKT) or to the inner solve's tolerance (bilevel).
    Not bit for bit, unlike the affine victim: the convolution's patch products are reduced in
    an order that depends on how many runs share a device (KKT: 8.9e-16 at most), and on this
    nonconvex inner problem (random CNN weights) such a difference flips an L-BFGS stopping
    test, so a run's inner iteration count may differ (measured: by 29) while its images move
    by 5e-9."""
    result = _run(tmp_path, method, "8,1", arch="cnn")
    assert result["n_devices"] == 8 and result["n_runs"] == 13 and result["finite"]
    _assert_sharded_over(result, 8, 16)
    diffs = result["max_abs_diff_by_key_8"]
    if method == "kkt":
        assert result["allclose_1e-12_8"], diffs
    else:
        for key in ("reconstructions.npz:centered", "final_outer_loss", "history.npz:outer_loss"):
            assert diffs[key] <= 1e-7, (key, diffs[key])


def test_kkt_run_on_8_and_3_devices_equals_1_device(tmp_path):
    result = _run(tmp_path, "kkt", "8,3,1")
    assert result["n_devices"] == 8 and result["n_runs"] == 13 and result["finite"]
    _assert_sharded_over(result, 8, 16)
    _assert_sharded_over(result, 3, 15)  # 13 rounded up to a multiple of 3
    assert result["bitwise_8"] and result["bitwise_3"], (result["max_abs_diff_8"], result["max_abs_diff_3"])


def test_kkt_run_with_default_compiler_flags_agrees_to_1e12(tmp_path):
    result = _run(tmp_path, "kkt", "8,1", flags="")
    _assert_sharded_over(result, 8, 16)
    diffs = result["max_abs_diff_by_key_8"]
    assert result["allclose_1e-12_8"], sorted(diffs.items(), key=lambda kv: -kv[1])[:6]


def test_more_devices_than_available_is_a_clear_error(tmp_path):
    result = _run(tmp_path, "errors", "9")
    for key in ("select_devices_9", "reconstruct_devices_9"):
        assert "9 devices were asked for, but this process sees only 8 local cpu device(s)" in result[key]
        assert "--devices 8 or fewer" in result[key]


# --------------------------------------------------------------------------- in this process (one CPU device)


def test_device_selection_and_rounding():
    where = batching.placement()
    assert where.n_devices == len(jax.local_devices())
    assert [where.round_up(n) for n in (1, 2, 7)] == [-(-n // where.n_devices) * where.n_devices for n in (1, 2, 7)]
    with pytest.raises(ConfigError, match="sees only"):
        batching.select_devices(len(jax.local_devices()) + 1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="positive integer"):
            batching.select_devices(bad)


def test_auto_chunk_size_uses_each_devices_share(monkeypatch):
    cpu = jax.local_devices()[0]
    monkeypatch.setattr(batching, "select_devices", lambda devices=None: [cpu] * (4 if devices is None else devices))
    monkeypatch.setattr(batching, "available_memory_bytes", lambda devices=None: 4_000_000)
    # 25% of 4 MB per device = 1 MB; 100 kB shared leaves 900 kB = 9 initialisations per device.
    assert batching.auto_chunk_size(1000, 100_000, fixed_bytes=100_000) == 36
    assert batching.auto_chunk_size(1000, 100_000, devices=2) == 20
    assert batching.auto_chunk_size(5, 100_000) == 8  # at least one per device, a multiple of 4
    with pytest.raises(ConfigError, match=r"one initialisation needs about 0\.0014 GiB .* only 0\.000931 GiB is "
                                          r"budgeted \(25% of the 0\.00373 GiB free per device\)"):
        batching.auto_chunk_size(1, 1_500_000)


def _toy_functions():
    def run(state, h, n, start=0):
        def body(c, _):
            return {"x": c["x"] * h + 1.0, "k": c["k"] + 1}, {"sum": c["x"].sum()}
        return jax.lax.scan(body, state, None, length=n)

    return (lambda x, h: {"x": x, "k": jnp.zeros((), jnp.int32)}, run, lambda s, h: {"total": s["x"].sum()})


def test_resume_keeps_the_chunk_size_it_was_written_with(tmp_path):
    init, run, finish = _toy_functions()
    x0, hyper = jnp.arange(10.0).reshape(5, 2), jnp.linspace(0.5, 0.9, 5)
    states, history, final = batching.run_batched(init, run, finish, x0, hyper, steps=4, segment=2, chunk_size=2)
    # An interrupted run written with chunk size 2, whose chunk 0 had finished (marked by +1000).
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    marked = {"x": states["x"][:2] + 1000.0, "k": states["k"][:2]}
    batching._save_chunk(chunks / "chunk_0000.npz", marked, {k: v[:2] for k, v in history.items()}, 4)
    (chunks / batching.LAYOUT_FILE).write_text(json.dumps({"n_inits": 5, "chunk_size": 2}))
    # Resumed with another (e.g. automatic) chunk size: the saved one is kept and chunk 0 is reused.
    resumed, resumed_history, _ = batching.run_batched(init, run, finish, x0, hyper, steps=4, segment=2,
                                                        chunk_size=5, checkpoint_dir=chunks)
    np.testing.assert_array_equal(resumed["x"][:2], marked["x"])
    np.testing.assert_array_equal(resumed["x"][2:], states["x"][2:])
    np.testing.assert_array_equal(resumed_history["sum"], history["sum"])
    assert json.loads((chunks / batching.LAYOUT_FILE).read_text()) == {"n_inits": 5, "chunk_size": 2}
