"""Run folders: atomic writes, so a crash never leaves a half-written file.

Every file is written to a temporary sibling, flushed and fsynced, then moved into place
with ``os.replace`` (atomic on POSIX). A reader sees either the old file or the new one.
"""

from __future__ import annotations

import io
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; create parent folders as needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """JSON with sorted keys and NaN written as null-free ``NaN`` (Python's json default)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def atomic_save_npz(path: str | os.PathLike, **arrays) -> Path:
    """``np.savez_compressed`` to ``path`` atomically (no object arrays: loads with allow_pickle=False)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return atomic_write_bytes(path, buffer.getvalue())


def read_json(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def json_roundtrip(obj):
    """The value as it reads back from JSON (tuples become lists): for comparing configs."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return str(obj)
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def versions() -> dict:
    """Library versions and platform, recorded in every run folder."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("recon_jax", "jax", "jaxlib", "flax", "optax", "jaxopt", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import jax

        out["backend"] = jax.default_backend()
        out["devices"] = [str(d) for d in jax.devices()]
    except Exception as err:  # a broken backend must not stop us from recording the rest
        out["backend"] = f"unavailable: {err}"
    return out
