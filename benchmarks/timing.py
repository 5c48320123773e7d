"""How the benchmark scripts time things: blocked wall-clock seconds, medians over repeats,
and the machine's load, in one place so that every script measures the same way.

- jax dispatches asynchronously, so every timed result is ``jax.block_until_ready``-ed
  before the clock stops (:func:`block`, :func:`timed`); otherwise a timer measures the
  dispatch, not the work.
- :func:`median_seconds` calls once untimed first (compilation, caches), then reports the
  median of the repeats: on a shared machine a neighbour's load adds long outliers, which a
  median ignores and a mean does not. :func:`median_paired_difference` interleaves two
  variants so that a change of load hits both halves of a pair alike.
- :class:`Stopwatch` times a block of statements, wall-clock and this process's CPU time;
  CPU seconds per wall second below the cores XLA uses means other jobs shared them.
- :func:`load_average`, :func:`load_text` and :func:`machine_is_busy` report the load that
  the scripts print beside their timings.

The scripts run as ``python benchmarks/NAME.py`` from the repository root; each puts this
folder on ``sys.path`` and imports this module as ``timing``. jax is imported only when a
result is blocked, so importing this module does not import jax.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def block(tree: Any) -> Any:
    """``jax.block_until_ready(tree)``: wait until every array in ``tree`` is computed."""
    import jax

    return jax.block_until_ready(tree)


def timed(fn: Callable, *args) -> tuple[Any, float]:
    """(result, seconds) of one call ``fn(*args)``, the result blocked before the clock stops."""
    start = time.perf_counter()
    out = block(fn(*args))
    return out, time.perf_counter() - start


def median_seconds(fn: Callable, *args, repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` blocked calls, after one untimed
    warm-up call (``warmup=False``: no warm-up, e.g. for host work that compiles nothing)."""
    if warmup:
        block(fn(*args))
    return statistics.median(timed(fn, *args)[1] for _ in range(repeats))


def median_paired_difference(slow: Callable, fast: Callable, *args, repeats: int) -> tuple[float, float, float]:
    """Median of (time of slow(*args) − time of fast(*args)) over interleaved pairs, so that
    a change of machine load hits both halves of a pair alike. Returns (difference, slow, fast)."""
    block(slow(*args))
    block(fast(*args))
    slow_times, fast_times = [], []
    for _ in range(repeats):
        slow_times.append(timed(slow, *args)[1])
        fast_times.append(timed(fast, *args)[1])
    difference = statistics.median(a - b for a, b in zip(slow_times, fast_times))
    return difference, statistics.median(slow_times), statistics.median(fast_times)


class Stopwatch:
    """Times the statements of a ``with`` block: ``seconds`` (wall clock) and ``cpu_seconds``
    (CPU time of this process, all threads). Nothing is blocked: block the results inside.

        with Stopwatch() as clock:
            ...
        print(clock.seconds, clock.cpu_seconds / clock.seconds)
    """

    def __init__(self) -> None:
        self.seconds = float("nan")
        self.cpu_seconds = float("nan")

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = time.process_time() - self._cpu


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages."""
    return list(os.getloadavg())


def load_text() -> str:
    """The load averages as printed: "1min / 5min / 15min", two decimals each."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_is_busy(fraction: float = 0.5) -> bool:
    """Whether the 1-minute load average exceeds ``fraction`` of the CPUs: timings then run
    slower and noisier than on an idle machine (memory figures are not affected)."""
    return os.getloadavg()[0] > fraction * (os.cpu_count() or 1)
