"""Benchmark of run_batched's chunk checkpoints: how much a segment's wall time grows when its
state is written after it, synchronously (the old way) or by the background writer (now).

What is measured: the wall time of each segment of ``batching.run_batched`` (the interval
between two ``progress`` calls, the first segment, which compiles, left out; median over the
rest), with checkpoints written in five ways:

- ``none``: no ``checkpoint_dir`` (the compute alone);
- ``sync-compressed``: the state copied to the host and written with ``np.savez_compressed``
  in the main thread before the next segment starts (what ``_save_chunk`` did before);
- ``sync-uncompressed``: the same with ``np.savez`` (``_save_chunk(..., writer=None)``);
- ``async``: the library's default: host copy (``jax.device_get``) before the next segment
  is launched, uncompressed write in the background thread;
- ``async-device-copy``: the other ordering: the state copied ON THE DEVICE (``jnp.copy``,
  queued behind the segment), the next segment launched at once, and the device-to-host
  copy done in the writer thread too. It needs a second device copy of the chunk's state.

Two programs:

(a) synthetic: K = 8 runs whose state is ``--state-mb`` MB in all (float64; the whole state
    changes every step) and whose step burns a fixed amount of compute (a chain of 256×256
    matmuls, ``--work`` of them), one step per segment; the default takes about 1 s a segment
    on one core. This isolates the checkpoint's cost from the method.
(b) a small real run: ``reconstruct.reconstruct`` (bilevel, 16 initialisations, 8 steps,
    segment 2) against a digits victim 64-256-10 gelu trained here, with the library's
    checkpoints, as before (sync-compressed) and as now (async), and without checkpoints.
    Its checkpoint (θ, the L-BFGS history, the adjoint, images, Adam moments of 16 runs) is 5 MB.
    The programs are compiled once (a persistent compilation cache in a temporary folder).

XLA is pinned to one thread (``--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1``) so that on a CPU, as on an accelerator, the computation
owns one core and the writer thread can use another. Run from the repository root:

    python benchmarks/checkpoint.py [--state-mb 256] [--work 300] [--repeats 2] [--only a|b] [--json PATH]

About 3 minutes on 2 cores. The 1-minute load average is printed at the start and the end.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

from recon_jax import batching  # noqa: E402
from recon_jax.artifacts import atomic_save_npz  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py
from timing import block, load_average, load_text, median_seconds  # noqa: E402

HIDDEN_B = 256  # (b)'s victim width: θ has 19k parameters, a checkpoint of 16 runs about 5 MB
MODES = ("none", "sync-compressed", "sync-uncompressed", "async", "async-device-copy")


def _old_save_chunk(path, state, history, steps_done, **_):
    """``_save_chunk`` before the background writer: host copy, compressed, in the main thread."""
    leaves = jax.tree_util.tree_leaves(state)
    arrays = {f"state_{i:04d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays.update({f"history_{k}": np.asarray(v) for k, v in history.items()})
    atomic_save_npz(path, steps_done=np.asarray(steps_done), **arrays)


def _sync_uncompressed(path, state, history, steps_done, **_):
    batching._write_chunk(path, batching._chunk_arrays(state, history, steps_done))


_LAZY = "__device_snapshot__"


def _device_copy_save(path, state, history, steps_done, *, writer=None):
    """Ordering C: snapshot on the device, launch on; the host copy happens in the writer thread."""
    writer.wait()
    snapshot = jax.tree_util.tree_map(jnp.copy, state)  # queued behind the segment; not donated
    writer.submit(path, {_LAZY: (snapshot, history, steps_done)})


def _lazy_write(path, arrays, write=batching._write_chunk):
    if _LAZY in arrays:
        arrays = batching._chunk_arrays(*arrays[_LAZY])
    write(path, arrays)


class _Mode:
    """Patch batching for one mode, restore on exit."""

    def __init__(self, mode: str):
        self.mode = mode

    def __enter__(self):
        self.saved = batching._save_chunk, batching._write_chunk
        if self.mode == "sync-compressed":
            batching._save_chunk = _old_save_chunk
        elif self.mode == "sync-uncompressed":
            batching._save_chunk = _sync_uncompressed
        elif self.mode == "async-device-copy":
            batching._save_chunk = _device_copy_save
            batching._write_chunk = _lazy_write
        return self

    def __exit__(self, *exc):
        batching._save_chunk, batching._write_chunk = self.saved


def _synthetic(state_mb: float, work: int):
    k = 8
    size = int(state_mb * 2**20 / 8 / k)
    w = jnp.asarray(np.random.default_rng(0).standard_normal((256, 256)) / 16.0)

    def init(x, h):
        return {"x": x, "step": jnp.zeros((), jnp.int32)}

    def run(state, h, n, start=0):
        def step(s, _):
            burn = jax.lax.fori_loop(0, work, lambda i, a: jnp.tanh(a @ w), jnp.full((256, 256), s["x"][0] * 1e-3))
            x = s["x"] * h + burn.mean()  # every element changes every step
            return {"x": x, "step": s["step"] + 1}, {"mean": x.mean()}
        return jax.lax.scan(step, state, None, length=n)

    x0 = jnp.asarray(np.random.default_rng(1).standard_normal((k, size)))
    hyper = jnp.linspace(0.9, 0.99, k)
    return init, run, lambda s, h: {"total": s["x"].sum()}, x0, hyper


def _segment_times(call) -> tuple[list[float], float]:
    stamps = []
    start = time.perf_counter()
    call(lambda done, total: stamps.append(time.perf_counter()))
    total = time.perf_counter() - start
    return list(np.diff(stamps)), total


def _pieces(init, x0, hyper) -> dict:
    """The parts of one checkpoint, timed alone (median of 3): host copy, uncompressed and
    compressed atomic writes (both fsynced)."""
    state = block(jax.jit(jax.vmap(init))(x0, hyper))
    history = {"mean": np.zeros((len(x0), 1))}
    folder = Path(tempfile.mkdtemp(prefix="ckpt-bench-pieces-"))
    timed = lambda f: median_seconds(f, repeats=3, warmup=False)

    try:
        arrays = batching._chunk_arrays(state, history, 1)
        out = {"host_copy_s": timed(lambda: batching._chunk_arrays(state, history, 1)),
               "write_uncompressed_s": timed(lambda: batching._write_chunk(folder / "u.npz", arrays)),
               "write_compressed_s": timed(lambda: atomic_save_npz(folder / "c.npz", **arrays))}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("  one checkpoint, timed alone: " + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.3f} s" for k, v in out.items()))
    return out


def part_a(state_mb: float, work: int, repeats: int, steps: int = 6) -> dict:
    init, run, finish, x0, hyper = _synthetic(state_mb, work)
    print(f"(a) synthetic: K = 8, state {state_mb:g} MB, {work} 256x256 matmuls per step, {steps} segments of 1 step")
    results, reference = {"pieces": _pieces(init, x0, hyper)}, None
    for mode in MODES:
        per_segment, totals = [], []
        for _ in range(repeats):
            folder = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
            try:
                with _Mode(mode):
                    box = {}
                    times, total = _segment_times(lambda progress: box.setdefault("out", batching.run_batched(
                        init, run, finish, x0, hyper, steps=steps, segment=1, progress=progress,
                        checkpoint_dir=None if mode == "none" else folder / "chunks")))
                states = box["out"][0]
                if reference is None:
                    reference = np.asarray(states["x"])
                assert np.array_equal(np.asarray(states["x"]), reference), f"{mode} changed the result"
                if mode != "none":
                    with np.load(folder / "chunks" / "chunk_0000.npz") as f:
                        assert int(f["steps_done"]) == steps
                        np.testing.assert_array_equal(f["state_0001"], reference)  # leaves: step, x
                per_segment += times[1:]  # the first interval follows the second segment (no compile)
                totals.append(total)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        results[mode] = {"segment_s_median": float(np.median(per_segment)), "segment_s_all": per_segment,
                         "total_s_median": float(np.median(totals))}
        print(f"  {mode:<20} segment {np.median(per_segment):6.3f} s (median of {len(per_segment)}; "
              f"min {min(per_segment):.3f}, max {max(per_segment):.3f})   whole run {np.median(totals):6.2f} s")
    base = results["none"]["segment_s_median"]
    for mode in MODES[1:]:
        results[mode]["overhead_s"] = results[mode]["segment_s_median"] - base
    return results


def part_b(repeats: int) -> dict:
    import recon_jax.reconstruct as rec
    from recon_jax import bilevel
    from recon_jax.reconstruct import ReconstructionSpec, reconstruct
    from recon_jax.training import TrainConfig
    from recon_jax.victim import VictimSpec, train_and_save

    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-b-"))
    jax.config.update("jax_compilation_cache_dir", str(root / "jax-cache"))  # compile once for all modes
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        victim = root / "victim"
        train_and_save(VictimSpec(n_per_class=2, hidden=(HIDDEN_B,), train=TrainConfig()), victim)
        spec = ReconstructionSpec(method="bilevel", init="gaussian:0.1", n_inits=16, segment=2, chunk_size=16,
                                  bilevel=bilevel.BilevelConfig(steps=8))
        print(f"(b) reconstruct: bilevel, digits 64-{HIDDEN_B}-10 gelu victim (2 images per class), 16 inits, "
              "8 steps, segment 2")
        results = {}
        for mode in ("none", "sync-compressed", "async"):
            per_segment, totals, sizes = [], [], []
            for r in range(repeats):
                out = root / f"run-{mode}-{r}"
                def sizing(path, arrays, write=batching._write_chunk):
                    sizes.append(sum(a.nbytes for a in arrays.values()))
                    write(path, arrays)

                def no_folder(*a, **kw):  # reconstruct always checkpoints: "none" runs without a folder
                    return batching.run_batched(*a, **{**kw, "checkpoint_dir": None})

                with _Mode(mode):
                    batching._write_chunk, rec.run_batched = sizing, (no_folder if mode == "none" else rec.run_batched)
                    try:
                        times, total = _segment_times(lambda progress: reconstruct(victim, out, spec,
                                                                                   progress=progress))
                    finally:
                        rec.run_batched = batching.run_batched
                per_segment += times[1:]
                totals.append(total)
            results[mode] = {"segment_s_median": float(np.median(per_segment)), "segment_s_all": per_segment,
                             "total_s_median": float(np.median(totals)),
                             "state_mb": (max(sizes) / 2**20) if sizes else 0.0}
            print(f"  {mode:<20} segment {np.median(per_segment):6.3f} s (median of {len(per_segment)})   "
                  f"reconstruct {np.median(totals):6.2f} s" + (f"   checkpoint {max(sizes) / 2**20:.1f} MB"
                                                             if sizes else ""))
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-mb", type=float, default=256.0)
    parser.add_argument("--work", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=("a", "b"), default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    print(f"load average at start: {load_text()}; {os.cpu_count()} CPUs; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}; jax {jax.__version__}")
    out = {"argv": sys.argv[1:], "load_average_start": load_average()}
    if args.only in (None, "a"):
        out["synthetic"] = part_a(args.state_mb, args.work, args.repeats)
    if args.only in (None, "b"):
        out["reconstruct"] = part_b(args.repeats)
    out["load_average_end"] = load_average()
    print(f"load average at end: {load_text()}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
