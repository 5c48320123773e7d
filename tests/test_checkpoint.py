"""Victim folders: roundtrip, separation of ground truth, mismatches and corruption."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from recon_jax import checkpoint
from recon_jax.artifacts import atomic_write_bytes
from recon_jax.errors import CheckpointError
from recon_jax.models import MLP, init_params
from recon_jax.victim import VictimSpec, train_and_save
from recon_jax.training import TrainConfig


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("victim")
    train_and_save(VictimSpec(n_per_class=3, hidden=(16,), train=TrainConfig()), out)
    return out


def test_folder_contents_and_metadata(victim_dir):
    assert sorted(p.name for p in victim_dir.iterdir()) == ["data.npz", "preprocessing.npz", "victim.json",
                                                             "victim.msgpack"]
    meta = json.loads((victim_dir / "victim.json").read_text())
    for key in ("grad_norm", "grad_norm_rel", "loss", "train_accuracy", "heldout_accuracy", "n_params",
                "iterations", "stationary", "seconds", "model", "train_config", "data", "label_counts", "versions"):
        assert key in meta, key
    assert meta["stationary"] is True and meta["label_counts"] == [3] * 10
    assert meta["train_config"]["weight_decay"] == 1e-3 and meta["train_config"]["dtype"] == "float64"
    assert len(meta["data"]["train_indices"]) == 30
    with np.load(victim_dir / "data.npz", allow_pickle=False) as f:
        assert f["train_images"].shape == (30, 8, 8, 1) and f["train_images"].dtype == np.float32
        assert f["heldout_images"].shape == (30, 8, 8, 1) and f["mean"].shape == (1, 8, 8, 1)
        assert 0 <= f["train_images"].min() and f["train_images"].max() <= 1
        mean = f["mean"]
    # The input normalisation ships with the model: the attacker's view holds the same mean.
    with np.load(victim_dir / "preprocessing.npz", allow_pickle=False) as f:
        assert sorted(f.files) == ["mean"]
        np.testing.assert_array_equal(f["mean"], mean)


def test_load_victim_roundtrip_without_ground_truth(victim_dir, tmp_path):
    victim = checkpoint.load_victim(victim_dir)
    assert victim.model == MLP(n_out=10, hidden=(16,), activation="gelu")
    assert victim.n_train == 30 and list(victim.known_labels()) == sorted(list(range(10)) * 3)
    with np.load(victim_dir / "data.npz", allow_pickle=False) as f:
        np.testing.assert_array_equal(victim.input_mean, f["mean"])
    # The attacker's view never needs data.npz: a folder without it still loads.
    for name in ("victim.json", "victim.msgpack", "preprocessing.npz"):
        (tmp_path / name).write_bytes((victim_dir / name).read_bytes())
    again = checkpoint.load_victim(tmp_path)
    for a, b in zip(jax.tree_util.tree_leaves(victim.params), jax.tree_util.tree_leaves(again.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again.input_mean, victim.input_mean)
    # Folders written before the mean was released still load, without it.
    (tmp_path / "preprocessing.npz").unlink()
    assert checkpoint.load_victim(tmp_path).input_mean is None


def test_preprocessing_file_that_does_not_fit_is_refused(victim_dir, tmp_path):
    for name in ("victim.json", "victim.msgpack"):
        (tmp_path / name).write_bytes((victim_dir / name).read_bytes())
    np.savez(tmp_path / "preprocessing.npz", mean=np.zeros((1, 7, 7, 1), np.float32))
    with pytest.raises(CheckpointError, match=r"mean of shape \(1, 7, 7, 1\).*images of shape \(8, 8, 1\)"):
        checkpoint.load_victim(tmp_path)
    (tmp_path / "preprocessing.npz").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="preprocessing.npz is corrupt"):
        checkpoint.load_victim(tmp_path)


def test_mismatched_architecture_names_both_shapes(victim_dir):
    wrong = MLP(n_out=10, hidden=(32,), activation="gelu")
    with pytest.raises(CheckpointError, match=r"layer_0.*has shape \(16,\) in the checkpoint but the "
                                              r"architecture expects \(32,\)"):
        checkpoint.load_params(victim_dir / "victim.msgpack", wrong, (8, 8, 1))
    deeper = MLP(n_out=10, hidden=(16, 16))
    with pytest.raises(CheckpointError, match="missing from the checkpoint.*layer_2"):
        checkpoint.load_params(victim_dir / "victim.msgpack", deeper, (8, 8, 1))


def test_missing_and_corrupt_checkpoints(tmp_path, victim_dir):
    with pytest.raises(CheckpointError, match="not a victim folder.*recon-jax train"):
        checkpoint.load_victim(tmp_path)
    (tmp_path / "victim.json").write_text((victim_dir / "victim.json").read_text())
    (tmp_path / "victim.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable msgpack checkpoint"):
        checkpoint.load_victim(tmp_path)
    (tmp_path / "victim.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load_victim(tmp_path)


def test_non_finite_parameters_are_refused(tmp_path):
    model = MLP(n_out=2)
    params = init_params(model, jax.random.key(0), (2, 2, 1))
    params = jax.tree_util.tree_map(lambda p: p.at[0].set(jnp.nan), params)
    (tmp_path / "p.msgpack").write_bytes(serialization.to_bytes(params))
    with pytest.raises(CheckpointError, match="non-finite"):
        checkpoint.load_params(tmp_path / "p.msgpack", model, (2, 2, 1))


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_rerun_reuses_identical_victim_and_refuses_a_different_one(victim_dir):
    from recon_jax.errors import ConfigError

    saved = train_and_save(VictimSpec(n_per_class=3, hidden=(16,), train=TrainConfig()), victim_dir)
    assert isinstance(saved, dict) and saved["stationary"]
    with pytest.raises(ConfigError, match="already holds a different victim.*--overwrite"):
        train_and_save(VictimSpec(n_per_class=4, hidden=(16,)), victim_dir)


# ---------------------------------------------------------------------------------------
# run_batched's chunk checkpoints: written in the background, atomically
# ---------------------------------------------------------------------------------------

import subprocess
import sys
import textwrap
import threading
import time

from recon_jax import batching

TOY = textwrap.dedent('''
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)

    def toy():
        """A method whose state changes every step (x <- x*h + 1), with a per-step record."""
        def run(state, h, n, start=0):
            def body(c, _):
                return {"x": c["x"] * h + 1.0, "k": c["k"] + 1}, {"sum": c["x"].sum()}
            return jax.lax.scan(body, state, None, length=n)
        return (lambda x, h: {"x": x, "k": jnp.zeros((), jnp.int32)}, run, lambda s, h: {"total": s["x"].sum()})

    X0 = jnp.arange(5 * 3000, dtype=jnp.float64).reshape(5, 3000) / 1000.0
    HYPER = jnp.linspace(0.5, 0.9, 5, dtype=jnp.float64)
''')
_toy_namespace: dict = {}
exec(TOY, _toy_namespace)


def _toy_run(**kw):
    init, run, finish = _toy_namespace["toy"]()
    return batching.run_batched(init, run, finish, _toy_namespace["X0"], _toy_namespace["HYPER"], steps=6,
                                chunk_size=2, segment=2, **kw)


def _assert_same(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def _writer_threads():
    return [t for t in threading.enumerate() if t.name == "recon_jax-checkpoint-writer"]


def test_slow_background_writer_gives_identical_results_and_resumes_exactly(tmp_path, monkeypatch):
    reference = _toy_run()
    write = batching._write_chunk
    written = []

    def slow_write(path, arrays):
        time.sleep(0.2)  # slower than a segment: the next segment runs while this one is written
        written.append((path.name, int(arrays["steps_done"]), threading.current_thread().name))
        write(path, arrays)

    monkeypatch.setattr(batching, "_write_chunk", slow_write)
    _assert_same(_toy_run(checkpoint_dir=tmp_path / "full"), reference)
    assert [(name, steps) for name, steps, _ in written] == [(f"chunk_{c:04d}.npz", s) for c in range(3)
                                                             for s in (2, 4, 6)]
    assert {thread for _, _, thread in written} == {"recon_jax-checkpoint-writer"}
    assert not _writer_threads()  # joined before run_batched returned
    with np.load(tmp_path / "full" / "chunk_0002.npz", allow_pickle=False) as f:  # the last write is complete
        assert int(f["steps_done"]) == 6 and f["history_sum"].shape == (2, 6)
        assert f.zip.getinfo("state_0000.npy").compress_type == 0  # np.savez: stored, not deflated

    # Interrupted after chunk 1's first segment: that segment's write (in flight when the
    # interrupt is raised) is on disk before run_batched re-raises, and resuming is exact.
    def interrupt(done, total):
        if done == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _toy_run(checkpoint_dir=tmp_path / "cut", progress=interrupt)
    assert not _writer_threads()
    with np.load(tmp_path / "cut" / "chunk_0001.npz", allow_pickle=False) as f:
        assert int(f["steps_done"]) == 2
    calls = []
    _assert_same(_toy_run(checkpoint_dir=tmp_path / "cut", progress=lambda done, total: calls.append(done)),
                 reference)
    assert calls == [10, 12, 14, 16, 18]  # chunk 0 reused; chunk 1 continued from step 2


@pytest.mark.parametrize("failing_write", [2, 9])  # mid-run (raised at the next save), the last (raised at the end)
def test_a_background_write_error_is_raised_in_the_caller(tmp_path, monkeypatch, failing_write):
    write, calls = batching._write_chunk, []

    def failing(path, arrays):
        calls.append(path)
        if len(calls) == failing_write:
            raise OSError(28, "No space left on device")
        write(path, arrays)

    monkeypatch.setattr(batching, "_write_chunk", failing)
    with pytest.raises(OSError, match="No space left on device") as err:
        _toy_run(checkpoint_dir=tmp_path)
    assert any("in the background" in note for note in getattr(err.value, "__notes__", []))
    assert len(calls) == failing_write  # the next save raises it, before another write starts
    assert not _writer_threads()


KILLED_WRITER = TOY + textwrap.dedent('''
    import sys, time
    from recon_jax import artifacts, batching

    writes = []

    def stalling(path, arrays):
        """Complete the first two writes; write half of the third, then stall (to be killed)."""
        writes.append(path)
        def write(f):
            if len(writes) < 3:
                return __import__("numpy").savez(f, **arrays)
            import io, numpy
            buffer = io.BytesIO()
            numpy.savez(buffer, **arrays)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            print("HALF-WRITTEN", flush=True)
            time.sleep(600)
        artifacts.atomic_write_stream(path, write)

    batching.atomic_save_npz_uncompressed = stalling
    init, run, finish = toy()
    batching.run_batched(init, run, finish, X0, HYPER, steps=6, chunk_size=2, segment=2, checkpoint_dir=sys.argv[1])
''')


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_complete_file(tmp_path):
    script, chunks = tmp_path / "killed_writer.py", tmp_path / "chunks"
    script.write_text(KILLED_WRITER)
    process = subprocess.Popen([sys.executable, str(script), str(chunks)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert process.stdout.readline().strip() == "HALF-WRITTEN"
    finally:
        process.kill()  # SIGKILL, mid-write
        process.wait()
    partial = list(chunks.glob(".chunk_0000.npz.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the cut-short write, under a name no one loads
    with np.load(chunks / "chunk_0000.npz", allow_pickle=False) as f:  # the previous write, whole
        assert int(f["steps_done"]) == 4 and f["state_0001"].shape == (2, 3000)  # leaves: k, x
    calls = []
    _assert_same(_toy_run(checkpoint_dir=chunks, progress=lambda done, total: calls.append(done)), _toy_run())
    assert calls[0] == 6  # resumed chunk 0 after step 4
    assert not list(chunks.glob(".*.tmp"))  # the leftover was removed
