"""Random-search ranges: the ``(lo, hi)`` bounds a sweep draws hyperparameters from.

Both attacks can sweep by random search (``recon-jax sweep --runs R``): the KKT attack over
the reference's ranges (``kkt.search_ranges``), the bilevel attack over a log-uniform
learning rate and initial scale (``bilevel.search_ranges``). :func:`resolve_ranges` is the
one place a user's overrides of such ranges are applied and checked, before any work.
"""

from __future__ import annotations

import math

from recon_jax.errors import ConfigError


def resolve_ranges(overrides: dict | None, defaults: dict, positive: dict, what: str = "") -> dict:
    """``defaults`` {name: (lo, hi)} with ``overrides`` applied, each checked before any work.

    A range is two finite numbers lo <= hi (lo == hi fixes the value); a name in ``positive``
    also needs lo > 0, and its value there says why (e.g. "log-uniform"). ``what`` names the
    search in the error for an unknown name (e.g. "bilevel ").
    """
    ranges = dict(defaults)
    for name, bounds in (overrides or {}).items():
        if name not in defaults:
            raise ConfigError(f"unknown {what}search range {name!r}; choose among {', '.join(defaults)}")
        try:
            lo, hi = (float(b) for b in bounds)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"search range {name} must be two numbers lo, hi; got {bounds!r}") from err
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ConfigError(f"search range {name} must have finite lo <= hi, got ({lo}, {hi})")
        if name in positive and lo <= 0:
            raise ConfigError(f"search range {name} is {positive[name]} and needs lo > 0, got ({lo}, {hi})")
        ranges[name] = (lo, hi)
    return ranges
