"""Multi-host studies on JAX's own distributed runtime (``jax.distributed``).

    ctx = distributed.initialize(coordinator="host0:1234", num_processes=2, process_id=0)
    study.run_study(config, out, process_index=ctx.process_index, process_count=ctx.process_count,
                    barrier=ctx.barrier)

Settings come from arguments, else from the environment (``RECON_JAX_COORDINATOR``,
``RECON_JAX_NUM_PROCESSES``, ``RECON_JAX_PROCESS_ID``), else, with ``auto=True``, from
JAX's cluster auto-detection (SLURM, Open MPI, Kubernetes/GKE TPU pods, ...: whatever
``jax.distributed.initialize()`` with no arguments recognises). With none of them the run is
single-process and nothing is initialised.

How a study uses it (``recon_jax.study.run_study``): process 0 trains the victims; all
processes meet at a barrier; process p runs the cells whose index ≡ p (mod P), each cell
vmapped and sharded over that process's *local* devices; all meet at a second barrier; process
0 reads every cell's ``cell.json`` and writes results.json, summary.csv, figures and the
report, once. The output folder must be visible to every process (a shared filesystem, as on
any cluster). Resumption works exactly as for one process: finished cells are skipped by
whichever process owns them, whatever the process count of the earlier run.

Barriers are ``jax.experimental.multihost_utils.sync_global_devices``, a collective over all
devices of all processes; on CPU it needs JAX's gloo collectives, which ``initialize``
selects before the backend starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

from recon_jax.errors import ConfigError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "RECON_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "RECON_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RECON_JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Context:
    """Where this process stands: its index, the process count, and a barrier."""

    process_index: int = 0
    process_count: int = 1
    barrier: Callable[[str], None] | None = None

    @property
    def is_main(self) -> bool:
        return self.process_index == 0


def _int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from err


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            environ: dict | None = None) -> tuple[str | None, int | None, int | None]:
    """(coordinator, num_processes, process_id) from the arguments, else the environment; checked."""
    environ = os.environ if environ is None else environ
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _int(environ.get(ENV_NUM_PROCESSES),
                                                                         ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _int(environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ConfigError("multi-host needs all three of --coordinator HOST:PORT, --num-processes N and "
                          f"--process-id I (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
                          "or --distributed auto on a cluster JAX recognises")
    if num_processes is not None:
        if num_processes < 1:
            raise ConfigError(f"--num-processes must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        if ":" not in coordinator:
            raise ConfigError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    return coordinator, num_processes, process_id


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False) -> Context:
    """Start ``jax.distributed`` if asked to (module doc) and return this process's Context.

    Must run before any JAX computation (it selects the CPU collectives and connects to the
    coordinator). A single-process run returns ``Context()`` without touching JAX.
    """
    coordinator, num_processes, process_id = resolve(coordinator, num_processes, process_id)
    if num_processes is None and not auto:
        return Context()
    if num_processes == 1:
        return Context()
    import jax
    from jax.experimental import multihost_utils

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes is None:
        jax.distributed.initialize()  # cluster auto-detection
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    index, count = jax.process_index(), jax.process_count()
    log.info("process %d of %d; %d local and %d global devices", index, count, jax.local_device_count(),
             jax.device_count())

    def barrier(name: str) -> None:
        multihost_utils.sync_global_devices(f"recon_jax:{name}")

    return Context(process_index=index, process_count=count, barrier=barrier)
