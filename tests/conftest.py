"""Shared test fixtures.

Tests that need real data outside the repository (the MNIST and CIFAR-10 test splits in the
folder named by ``$RECON_JAX_SHARED_DATA``, laid out as ``docs/data.md`` describes, or the
Debian package ``dataset-fashion-mnist``) skip with a reason when it is absent, except under CI
(``$CI`` set), where missing data is a failure: CI must never go green by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import jax
import pytest

# Gradient and stationarity tests run in float64 (as optimistix's conftest does); float32
# paths are exercised by casting explicitly.
jax.config.update("jax_enable_x64", True)
# Many tests compile the same solver programs; XLA's persistent cache lets them share one
# compilation (a per-user folder, so repeated suite runs are faster too).
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "RECON_JAX_TEST_JAX_CACHE", str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "recon_jax-tests-jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

SHARED_DATA_ENV = "RECON_JAX_SHARED_DATA"
"""Names the real-data folder of the tests (``mnist/`` IDX files, ``cifar10_test.npz``); unset, they skip."""


def shared_data_dir() -> Path | None:
    """``$RECON_JAX_SHARED_DATA``, or None when it is not set."""
    folder = os.environ.get(SHARED_DATA_ENV)
    return Path(folder) if folder else None


def _require_path(path: str | os.PathLike, why: str = "") -> Path:
    path = Path(path)
    if not path.exists():
        message = f"needs {path}{f' ({why})' if why else ''}, which is absent"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must provide it", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def require_path() -> Callable[..., Path]:
    """``require_path(path, why="")`` returns ``path``; skips (fails under $CI) if it is absent."""
    return _require_path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; skips (fails under $CI) if it is absent."""
    folder = shared_data_dir()
    if folder is None:
        message = f"needs real data: set {SHARED_DATA_ENV} to the folder holding mnist/ and cifar10_test.npz"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must provide it", pytrace=False)
        pytest.skip(message)
    return _require_path(folder, f"shared real data named by {SHARED_DATA_ENV}")
