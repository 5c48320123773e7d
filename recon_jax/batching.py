"""Run a single-initialisation method for K initialisations: vmapped, chunked, resumable.

The method is given as two plain functions of ONE initialisation,

    init(x0, hyper) -> state      run(state, hyper, n_steps) -> (state, history)      finish(state, hyper) -> dict

and ``run_batched`` applies ``jax.vmap`` at the edge: K initialisations are split into
chunks of at most ``chunk_size`` (the last chunk is padded by repeating its final element,
so every chunk reuses one compiled program), and each chunk runs ``segment`` steps at a
time. After every segment the chunk's state is written atomically to ``checkpoint_dir``;
a rerun with the same folder continues from there and reuses finished chunks, so an
interruption loses at most one segment of one chunk.

Per-initialisation diagnostics stay per initialisation: vmap never mixes the batch, and
the methods freeze an initialisation whose loss or gradient becomes non-finite.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from recon_jax.artifacts import atomic_save_npz
from recon_jax.errors import ConfigError

log = logging.getLogger(__name__)


def available_memory_bytes() -> int:
    """Free memory of the default device: the accelerator's allocator limit, or MemAvailable on CPU."""
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def auto_chunk_size(n_inits: int, bytes_per_init: int, fraction: float = 0.25) -> int:
    """Largest chunk whose estimated footprint fits in ``fraction`` of free memory (≥ 1)."""
    budget = fraction * available_memory_bytes()
    if bytes_per_init > budget:
        raise ConfigError(
            f"one initialisation needs about {bytes_per_init / 2**30:.2f} GiB but only {budget / 2**30:.2f} GiB "
            "is budgeted; use fewer images, a smaller victim, float32, or a device with more memory")
    return max(1, min(n_inits, int(budget // bytes_per_init)))


def _take(tree, index):
    return jax.tree_util.tree_map(lambda a: a[index], tree)


def _pad(tree, size: int):
    """Pad the leading axis to ``size`` by repeating the last element."""
    def pad(a):
        a = jnp.asarray(a)
        if a.shape[0] == size:
            return a
        return jnp.concatenate([a, jnp.repeat(a[-1:], size - a.shape[0], axis=0)])
    return jax.tree_util.tree_map(pad, tree)


def _save_chunk(path: Path, state, history: dict, steps_done: int) -> None:
    leaves = jax.tree_util.tree_leaves(state)
    arrays = {f"state_{i:04d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays.update({f"history_{k}": np.asarray(v) for k, v in history.items()})
    atomic_save_npz(path, steps_done=np.asarray(steps_done), **arrays)


def _load_chunk(path: Path, template):
    """(state, history, steps_done) from ``path``, checked against ``template``'s structure."""
    with np.load(path, allow_pickle=False) as f:
        leaves, treedef = jax.tree_util.tree_flatten(template)
        loaded = [f[f"state_{i:04d}"] for i in range(len(leaves))]
        for have, want in zip(loaded, leaves):
            if have.shape != want.shape:
                raise ConfigError(f"{path} does not match this run (a leaf of shape {have.shape}, expected "
                                  f"{want.shape}); it was written by a different configuration: use a new --out")
        history = {k[len("history_"):]: f[k] for k in f.files if k.startswith("history_")}
        state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a, w.dtype) for a, w in zip(loaded, leaves)])
        return state, history, int(f["steps_done"])


def run_batched(init: Callable, run: Callable, finish: Callable, x0, hyper, *, steps: int,
                chunk_size: int | None = None, segment: int | None = None,
                checkpoint_dir: str | os.PathLike | None = None,
                progress: Callable[[int, int], None] | None = None):
    """vmap ``init``/``run``/``finish`` over the leading axis of ``x0`` (K, ...) and ``hyper``.

    ``finish(state, hyper) -> dict`` gives final per-initialisation figures. Returns
    ``(states, history, final)``: the final states (leading axis K), ``{name: (K, steps)}``,
    and ``{name: (K,)}``. ``progress(steps_done_total, steps_total)`` is called after each segment.
    """
    n_inits = jax.tree_util.tree_leaves(x0)[0].shape[0]
    chunk_size = n_inits if chunk_size is None else int(chunk_size)
    if chunk_size < 1:
        raise ConfigError(f"chunk size must be >= 1, got {chunk_size}")
    chunk_size = min(chunk_size, n_inits)
    segment = max(1, min(int(segment or steps), steps)) if steps else 1
    batched_init = jax.jit(jax.vmap(init))
    batched_finish = jax.jit(jax.vmap(finish))
    batched_run = jax.jit(jax.vmap(run, in_axes=(0, 0, None)), static_argnums=2)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    n_chunks = math.ceil(n_inits / chunk_size)
    states, histories, finals = [], [], []
    total = n_chunks * steps
    for c in range(n_chunks):
        index = np.arange(c * chunk_size, min((c + 1) * chunk_size, n_inits))
        x0_c, hyper_c = _pad(_take(x0, index), chunk_size), _pad(_take(hyper, index), chunk_size)
        state = batched_init(x0_c, hyper_c)
        history: dict = {}
        done = 0
        path = checkpoint_dir / f"chunk_{c:04d}.npz" if checkpoint_dir else None
        if path is not None and path.is_file():
            state, history, done = _load_chunk(path, state)
            log.info("chunk %d: resuming after %d of %d steps", c, done, steps)
        while done < steps:
            n = min(segment, steps - done)
            state, record = batched_run(state, hyper_c, n)
            record = {k: np.asarray(v) for k, v in record.items()}
            history = {k: np.concatenate([history[k], v], axis=1) if k in history else v for k, v in record.items()}
            done += n
            if path is not None:
                _save_chunk(path, state, history, done)
            if progress is not None:
                progress(c * steps + done, total)
        final = {k: np.asarray(v) for k, v in batched_finish(state, hyper_c).items()}
        keep = slice(0, len(index))
        states.append(_take(state, keep))
        histories.append({k: v[keep] for k, v in history.items()})
        finals.append({k: v[keep] for k, v in final.items()})
    cat = lambda parts: jax.tree_util.tree_map(lambda *a: np.concatenate([np.asarray(x) for x in a]), *parts)
    history = {k: np.concatenate([h[k] for h in histories]) for k in histories[0]}
    return cat(states), history, cat(finals)
