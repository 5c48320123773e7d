"""Run a single-initialisation method for K initialisations: vmapped, sharded, chunked, resumable.

The method is given as two plain functions of ONE initialisation,

    init(x0, hyper) -> state      run(state, hyper, n_steps, start) -> (state, history)      finish(state, hyper) -> dict

(``start``: the index of the segment's first step, the same for the whole batch)

and ``run_batched`` applies ``jax.vmap`` at the edge: K initialisations are split into
chunks of at most ``chunk_size`` (the last chunk is padded by repeating its final element,
so every chunk reuses one compiled program), and each chunk runs ``segment`` steps at a
time. After every segment the chunk's state is written atomically to ``checkpoint_dir``
(as host numpy arrays); a rerun with the same folder continues from there and reuses
finished chunks, so an interruption loses at most one segment of one chunk (two while a
write is still in flight: see below).

**Checkpoints are written in the background.** After a segment, the state is copied to
the host (``jax.device_get``, then a copy of any array that shares memory with a device
buffer), which must happen before the next segment is launched, since ``run`` donates
(reuses) the state's buffers; the copy then goes to ONE writer thread
(:class:`CheckpointWriter`) and the next segment starts while it is written. The file is an
uncompressed ``np.savez`` streamed to a temporary sibling, fsynced and moved into place with
``os.replace``, so a crash at any moment (``kill -9`` included) leaves the previous complete
checkpoint or the new complete one, never a partial file that a rerun would load (leftover
temporary files are removed when the next run starts). At most one write is in flight: the
next segment's save first waits for the previous write to finish (so one host copy of a
chunk's state exists at a time and the writes of one file happen in order), and
``run_batched`` waits for the last write before it returns or re-raises. An error in the
writer thread is raised in the calling thread at that wait.

**Sharding across local devices.** The batch axis of every chunk is split over the local
devices (``devices=None``: all of them; an int: the first that many): a 1-D ``Mesh`` over the
axis ``"inits"``, the batched inputs placed with ``NamedSharding(mesh, P("inits"))``, and each
program is ``jit(shard_map(vmap(f)))``: every device runs ``vmap(f)`` on its own
chunk/devices initialisations, θ* and the labels (constants of the program) replicated. The
devices never exchange data, not even to stop a loop: a data-dependent ``while_loop`` (an
accurate inner solve) stops when the slowest initialisation *on that device* does. (Under a
plain ``jit(vmap(f))`` of sharded inputs its predicate would be an all-reduce over the whole
batch: every device would wait for the slowest initialisation anywhere, and on XLA:CPU with
as many simulated devices as cores that rendezvous was seen to stall until its 40 s timeout
killed the process.) Chunk sizes are rounded up to a multiple of the device count (the
padding repeats the last element, as above). The results do not depend on the device count
beyond round-off: a vmapped program never mixes the batch, and tests hold 8 devices against
1 to 1e-12.

Per-initialisation diagnostics stay per initialisation: vmap never mixes the batch, and
the methods freeze an initialisation whose loss or gradient becomes non-finite.

The automatic chunk size (``auto_chunk_size``) is the per-device share of free memory
divided by ``recon_jax.memory``'s per-initialisation estimate, times the device count.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import math
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from recon_jax.artifacts import atomic_save_npz_uncompressed, atomic_write_json, temporary_siblings
from recon_jax.errors import ConfigError

log = logging.getLogger(__name__)

AXIS = "inits"  # the mesh axis the batch of initialisations is split over
LAYOUT_FILE = "layout.json"  # in checkpoint_dir: the chunking a resumed run must keep
# Share of each device's free memory the automatic chunk size plans for: CPU memory is shared
# with other processes; an accelerator's JAX pool is already 75% of the device (recon_jax.memory).
MEMORY_FRACTION = {"cpu": 0.25}
ACCELERATOR_MEMORY_FRACTION = 0.5


def select_devices(devices: int | None = None) -> list:
    """The first ``devices`` local devices (all of them for None); a clear error if there are fewer."""
    available = jax.local_devices()
    if devices is None:
        return list(available)
    if isinstance(devices, bool) or not isinstance(devices, (int, np.integer)) or devices < 1:
        raise ConfigError(f"devices must be a positive integer (or unset for all local devices), got {devices!r}")
    if devices > len(available):
        kind = available[0].platform if available else "?"
        raise ConfigError(
            f"{devices} devices were asked for, but this process sees only {len(available)} local {kind} "
            f"device(s); pass --devices {len(available)} or fewer, or leave it unset to use all of them"
            + (" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is imported "
               "splits the host into N devices)" if kind == "cpu" else ""))
    return list(available[:devices])


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a batch lives: a 1-D mesh over ``devices`` and the shardings of batched and shared data."""

    mesh: Mesh

    @property
    def devices(self) -> list:
        return list(self.mesh.devices.flat)

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def batch(self) -> NamedSharding:
        """Leading (initialisation) axis split over the devices, the other axes whole."""
        return NamedSharding(self.mesh, PartitionSpec(AXIS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def round_up(self, n: int) -> int:
        """The smallest multiple of the device count that is >= n."""
        return -(-int(n) // self.n_devices) * self.n_devices

    def put(self, tree):
        """Place a pytree whose leaves all have the batch as their leading axis."""
        return jax.device_put(tree, self.batch)


def placement(devices: int | None = None) -> Placement:
    """A ``Placement`` over the first ``devices`` local devices (all for None)."""
    return Placement(Mesh(np.array(select_devices(devices)), (AXIS,)))


@dataclasses.dataclass(frozen=True)
class BatchedProgram:
    """The jitted, vmapped, sharded programs ``run_batched`` executes on each chunk.

    ``init(x0, hyper)``, ``run(state, hyper, n)`` (n static) and ``finish(state, hyper)``
    take batched inputs placed with ``placement.put`` and return batched outputs with the
    same sharding. ``run`` donates its state (the previous segment's state is not kept).
    """

    init: Callable
    run: Callable
    finish: Callable
    placement: Placement


def batched_program(init: Callable, run: Callable, finish: Callable, where: Placement) -> BatchedProgram:
    """vmap the single-initialisation functions over each device's slice of the batch, with
    ``jax.shard_map`` over ``where``'s devices, and jit them.

    Each device runs ``vmap(f)`` on its own chunk/devices initialisations as a program of its
    own: the stopping test of a data-dependent loop (a refresh's Newton iterations, an L-BFGS
    solve) is taken over that device's slice only, so no device waits for the slowest
    initialisation on another, and the programs contain no collective at all. (A plain
    ``jit(vmap(f))`` over sharded inputs would turn every such test into a cross-device
    all-reduce, whose rendezvous can also stall XLA:CPU when simulated devices outnumber cores.)
    """
    spec = PartitionSpec(AXIS)
    per_device = functools.partial(jax.shard_map, mesh=where.mesh, out_specs=spec, check_vma=False)

    def run_segment(state, hyper, n_steps, start):
        # ``start`` (the first step's index) is shared by the batch: replicated, and traced (no recompile per segment).
        body = lambda s, h, first: jax.vmap(run, in_axes=(0, 0, None, None))(s, h, n_steps, first)
        return per_device(body, in_specs=(spec, spec, PartitionSpec()))(state, hyper, start)

    return BatchedProgram(
        init=jax.jit(per_device(jax.vmap(init), in_specs=(spec, spec))),
        run=jax.jit(run_segment, static_argnums=2, donate_argnums=0),
        finish=jax.jit(per_device(jax.vmap(finish), in_specs=(spec, spec))),
        placement=where)


PROGRAM_CACHE_SIZE = 8
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()


def _cached_program(init: Callable, run: Callable, finish: Callable, where: Placement) -> BatchedProgram:
    """``batched_program`` for these very function objects and devices, built once per process.

    Calling the same jitted wrappers again lets ``jax.jit`` reuse its traced and compiled
    programs; fresh wrappers would be traced and lowered anew on every ``run_batched`` call
    (seconds per call for the bilevel engines, most of a small study cell). Callers that run
    the same method on the same victim many times (a study's cells) pass the same functions
    (``recon_jax.reconstruct`` keeps them per victim and spec). The last ``PROGRAM_CACHE_SIZE``
    programs are kept.
    """
    key = (init, run, finish, tuple(d.id for d in where.devices))
    program = _PROGRAMS.pop(key, None) or batched_program(init, run, finish, where)
    _PROGRAMS[key] = program
    while len(_PROGRAMS) > PROGRAM_CACHE_SIZE:
        _PROGRAMS.popitem(last=False)
    return program


def available_memory_bytes(devices: int | None = None) -> int:
    """Free memory per device for the first ``devices`` local devices (all for None).

    On an accelerator: the smallest (allocator limit − bytes in use) among them. On CPU the
    devices share the host's memory: MemAvailable divided by their number.
    """
    chosen = select_devices(devices)
    free = []
    for device in chosen:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "bytes_limit" in stats:
            free.append(int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    if free:
        return min(free)
    return _host_available_bytes() // max(1, len(chosen))


def proc_kib_field(path: str, field: str) -> int | None:
    """A "Field:  N kB" line of a /proc file (e.g. MemAvailable in /proc/meminfo, VmHWM in
    /proc/self/status) in bytes, or None where the file or the field is absent."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _host_available_bytes() -> int:
    available = proc_kib_field("/proc/meminfo", "MemAvailable")
    return 4 << 30 if available is None else available


def auto_chunk_size(n_inits: int, bytes_per_init: int, fraction: float | None = None, *,
                    devices: int | None = None, fixed_bytes: int = 0) -> int:
    """Largest chunk whose estimated footprint fits in ``fraction`` of each device's free memory
    (default: 25% on CPU, 50% on an accelerator).

    Each of the n devices holds chunk/n initialisations (``bytes_per_init`` each) plus
    ``fixed_bytes`` that every device holds once (θ*, labels). The result is at least one
    initialisation per device, a multiple of n, and at most ``n_inits`` rounded up to one.
    Raises ConfigError, before any work, when even one initialisation does not fit.
    """
    chosen = select_devices(devices)
    n_devices = len(chosen)
    if fraction is None:
        fraction = MEMORY_FRACTION.get(chosen[0].platform, ACCELERATOR_MEMORY_FRACTION)
    free = available_memory_bytes() if devices is None else available_memory_bytes(devices)
    budget = fraction * free
    if bytes_per_init + fixed_bytes > budget:
        raise ConfigError(
            f"one initialisation needs about {bytes_per_init / 2**30:.3g} GiB "
            f"(+ {fixed_bytes / 2**30:.3g} GiB shared) but only {budget / 2**30:.3g} GiB is budgeted "
            f"({fraction:.0%} of the {free / 2**30:.3g} GiB free per device); use fewer images or candidates, a "
            "smaller victim, float32, a smaller L-BFGS history, or a device with more memory")
    per_device = int((budget - fixed_bytes) // bytes_per_init)
    per_device = max(1, min(per_device, math.ceil(n_inits / n_devices)))
    return per_device * n_devices


def check_fits(chunk_size: int, bytes_per_init: int, *, devices: int | None = None, fixed_bytes: int = 0) -> None:
    """For a chunk size the user chose: ConfigError, before any work, if even one initialisation
    cannot fit in a device's free memory; a warning if the whole chunk's share may not."""
    n_devices = len(select_devices(devices))
    free = available_memory_bytes() if devices is None else available_memory_bytes(devices)
    if bytes_per_init + fixed_bytes > free:
        raise ConfigError(
            f"one initialisation needs about {bytes_per_init / 2**30:.3g} GiB (+ {fixed_bytes / 2**30:.3g} GiB shared) "
            f"but a device has only {free / 2**30:.3g} GiB free; use fewer images or candidates, a smaller victim, "
            "float32, a smaller L-BFGS history, or a device with more memory")
    per_device = math.ceil(chunk_size / n_devices)
    if per_device * bytes_per_init + fixed_bytes > free:
        log.warning("a chunk of %d over %d device(s) needs about %.2f GiB per device, more than the %.2f GiB free; "
                    "lower --chunk-size (at most %d per device fit)", chunk_size, n_devices,
                    (per_device * bytes_per_init + fixed_bytes) / 2**30, free / 2**30,
                    max(1, (free - fixed_bytes) // bytes_per_init))


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


def _owned(array) -> np.ndarray:
    """``array`` as a host numpy array that shares no memory with a device buffer.

    On the CPU backend ``np.asarray`` of a jax array is a zero-copy view of the device
    buffer; a writer thread holding such a view would keep XLA from reusing (donating) it,
    so the next segment would silently copy its input, and any in-place reuse would change
    the bytes being written. A copy costs one memcpy on the host.
    """
    array = np.asarray(array)
    return array if array.base is None and array.flags.owndata else array.copy()


def _chunk_arrays(state, history: dict, steps_done: int) -> dict[str, np.ndarray]:
    """The checkpoint's contents as host arrays (``jax.device_get`` starts every leaf's
    device-to-host transfer before waiting on any)."""
    leaves = [_owned(leaf) for leaf in jax.device_get(jax.tree_util.tree_leaves(state))]
    arrays = {f"state_{i:04d}": leaf for i, leaf in enumerate(leaves)}
    arrays.update({f"history_{k}": np.asarray(v) for k, v in history.items()})
    arrays["steps_done"] = np.asarray(steps_done)
    return arrays


def _write_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write one chunk checkpoint: uncompressed, atomically (tmp + fsync + os.replace)."""
    atomic_save_npz_uncompressed(path, arrays)


class CheckpointWriter:
    """A single background thread that writes chunk checkpoints, at most one in flight.

    ``submit(path, arrays)`` hands host arrays to the thread and returns at once; ``wait()``
    blocks until the write in flight (if any) has finished and re-raises, in the calling
    thread, an exception it raised; ``close()`` waits and stops the thread. ``submit`` waits
    first, so writes happen one at a time and in order (a queue of depth 1).
    """

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: tuple[BaseException, Path] | None = None
        self._thread: threading.Thread | None = None

    def submit(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        self.wait()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="recon_jax-checkpoint-writer", daemon=True)
            self._thread.start()
        self._queue.put((Path(path), arrays))

    def wait(self) -> None:
        self._queue.join()
        if self._error is not None:
            error, path = self._error
            self._error = None
            error.add_note(f"(raised while writing the checkpoint {path} in the background)")
            raise error

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for the write in flight and stop the thread. With ``raise_errors=False`` (the
        caller is already propagating an exception) a write error is logged, not raised."""
        try:
            if raise_errors:
                self.wait()
            else:
                self._queue.join()
                if self._error is not None:
                    log.error("writing the checkpoint %s failed: %r", self._error[1], self._error[0])
                    self._error = None
        finally:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                self._thread = None

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                path, arrays = item
                del item
                try:
                    _write_chunk(path, arrays)
                except BaseException as err:  # noqa: BLE001 - handed to the main thread by wait()
                    self._error = (err, path)
                del arrays  # drop the host copy before the next segment's is taken
            finally:
                self._queue.task_done()


def _save_chunk(path: Path, state, history: dict, steps_done: int, *,
                writer: CheckpointWriter | None = None) -> None:
    """Checkpoint a chunk: copy its state to the host now (before the next segment donates
    its buffers), then write it, in the background if ``writer`` is given (after the
    previous background write has finished), else before returning."""
    if writer is None:
        _write_chunk(path, _chunk_arrays(state, history, steps_done))
        return
    writer.wait()  # one host copy at a time; writes of one file in order
    writer.submit(path, _chunk_arrays(state, history, steps_done))


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
        state = jax.tree_util.tree_unflatten(treedef, [np.asarray(a, w.dtype) for a, w in zip(loaded, leaves)])
        return state, history, int(f["steps_done"])


def _resume_chunk_size(checkpoint_dir: Path | None, n_inits: int, chunk_size: int, where: Placement) -> int:
    """The chunk size the checkpoints in ``checkpoint_dir`` were written with, if any (else ``chunk_size``).

    An automatic chunk size depends on free memory at start-up; a resumed run must keep the
    one its chunk files were written with, or they would not fit.
    """
    if checkpoint_dir is None or not (checkpoint_dir / LAYOUT_FILE).is_file():
        return chunk_size
    with open(checkpoint_dir / LAYOUT_FILE) as f:
        layout = json.load(f)
    saved = int(layout.get("chunk_size", chunk_size))
    if layout.get("n_inits") != n_inits or saved == chunk_size:
        return chunk_size
    if saved % where.n_devices:
        raise ConfigError(f"{checkpoint_dir} holds chunks of {saved} initialisations, which do not split over "
                          f"{where.n_devices} devices; resume with a device count that divides {saved}, "
                          "or use a new --out")
    log.info("resuming with the saved chunk size %d (this start would have chosen %d)", saved, chunk_size)
    return saved


def run_batched(init: Callable, run: Callable, finish: Callable, x0, hyper, *, steps: int,
                chunk_size: int | None = None, segment: int | None = None,
                checkpoint_dir: str | os.PathLike | None = None,
                progress: Callable[[int, int], None] | None = None,
                devices: int | None = None):
    """vmap ``init``/``run``/``finish`` over the leading axis of ``x0`` (K, ...) and ``hyper``,
    with each chunk's batch sharded over ``devices`` local devices (None: all; see module doc).

    ``finish(state, hyper) -> dict`` gives final per-initialisation figures. Returns
    ``(states, history, final)`` as host numpy arrays: the final states (leading axis K),
    ``{name: (K, steps)}``, and ``{name: (K,)}``. ``progress(steps_done_total, steps_total)``
    is called after each segment. ``chunk_size`` (default: K) is rounded up to a multiple of
    the device count.
    """
    where = placement(devices)
    n_inits = jax.tree_util.tree_leaves(x0)[0].shape[0]
    chunk_size = n_inits if chunk_size is None else int(chunk_size)
    if chunk_size < 1:
        raise ConfigError(f"chunk size must be >= 1, got {chunk_size}")
    chunk_size = where.round_up(min(chunk_size, n_inits))
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    chunk_size = _resume_chunk_size(checkpoint_dir, n_inits, chunk_size, where)
    if checkpoint_dir is not None:
        atomic_write_json(checkpoint_dir / LAYOUT_FILE, {"n_inits": n_inits, "chunk_size": chunk_size})
        for leftover in temporary_siblings(checkpoint_dir / "chunk_*.npz"):  # from a write a crash cut short
            leftover.unlink(missing_ok=True)
    segment = balanced_segment(steps, segment)
    program = _cached_program(init, run, finish, where)
    n_chunks = math.ceil(n_inits / chunk_size)
    log.info("%d initialisations in %d chunk(s) of %d, sharded over %d %s device(s)", n_inits, n_chunks, chunk_size,
             where.n_devices, where.devices[0].platform)
    writer = CheckpointWriter() if checkpoint_dir is not None else None
    try:
        states, histories, finals = _run_chunks(program, x0, hyper, where, n_inits, n_chunks, chunk_size, steps,
                                                segment, checkpoint_dir, progress, writer)
    except BaseException:
        if writer is not None:
            writer.close(raise_errors=False)  # the last checkpoint is complete on disk before we re-raise
        raise
    if writer is not None:
        writer.close()
    cat = lambda parts: jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts)
    history = {k: np.concatenate([h[k] for h in histories]) for k in histories[0]}
    return cat(states), history, cat(finals)


def balanced_segment(steps: int, segment: int | None) -> int:
    """The segment length run_batched uses: the same NUMBER of segments as ``segment`` asks for,
    ⌈steps / segment⌉, made as equal as possible, length ⌈steps / ⌈steps / segment⌉⌉.

    ``run`` is traced and compiled once per distinct segment length (``n_steps`` is a static
    scan length), so 150 steps at ``segment=100`` run as 75 + 75 (one program) rather than
    100 + 50 (two). A checkpoint is then written at most ``segment`` steps apart, as asked.
    """
    if not steps:
        return 1
    segment = max(1, min(int(segment or steps), steps))
    return math.ceil(steps / math.ceil(steps / segment))


def _run_chunks(program: BatchedProgram, x0, hyper, where: Placement, n_inits: int, n_chunks: int, chunk_size: int,
                steps: int, segment: int, checkpoint_dir: Path | None, progress, writer: CheckpointWriter | None):
    """run_batched's loop over chunks and segments: per chunk, (states, history, final) on the host."""
    states, histories, finals = [], [], []
    total = n_chunks * steps
    for c in range(n_chunks):
        index = np.arange(c * chunk_size, min((c + 1) * chunk_size, n_inits))
        x0_c = where.put(_pad(_take(x0, index), chunk_size))
        hyper_c = where.put(_pad(_take(hyper, index), chunk_size))
        state = program.init(x0_c, hyper_c)
        del x0_c  # the state holds what it needs; free the initial images' buffers during the run
        history: dict = {}
        done = 0
        path = checkpoint_dir / f"chunk_{c:04d}.npz" if checkpoint_dir else None
        if path is not None and path.is_file():
            state, history, done = _load_chunk(path, state)
            state = where.put(state)
            log.info("chunk %d: resuming after %d of %d steps", c, done, steps)
        while done < steps:
            n = min(segment, steps - done)
            state, record = program.run(state, hyper_c, n, done)
            record = {k: np.asarray(v) for k, v in record.items()}
            history = {k: np.concatenate([history[k], v], axis=1) if k in history else v for k, v in record.items()}
            done += n
            if path is not None:
                _save_chunk(path, state, history, done, writer=writer)
            if progress is not None:
                progress(c * steps + done, total)
        final = {k: np.asarray(v) for k, v in program.finish(state, hyper_c).items()}
        keep = slice(0, len(index))
        states.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[keep], state))
        histories.append({k: v[keep] for k, v in history.items()})
        finals.append({k: v[keep] for k, v in final.items()})
    return states, histories, finals
