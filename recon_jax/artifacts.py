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
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

import numpy as np


TMP_SUFFIX = ".tmp"


def temporary_siblings(path: str | os.PathLike) -> list[Path]:
    """The temporary files an interrupted atomic write of ``path`` may have left
    (``.NAME.XXXX.tmp`` beside it): never read, safe to delete when no write is in progress."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"))


def atomic_write_stream(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary sibling of ``path``, fsync it, then ``os.replace``
    it onto ``path``; create parent folders as needed. A crash at any moment (SIGKILL
    included) leaves ``path`` as it was or complete, never partly written; the temporary
    file is removed on an exception (a SIGKILL leaves it behind, under a name no reader
    opens: see :func:`temporary_siblings`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; create parent folders as needed."""
    return atomic_write_stream(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """JSON with sorted keys and NaN written as null-free ``NaN`` (Python's json default)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def atomic_save_npz(path: str | os.PathLike, **arrays) -> Path:
    """``np.savez_compressed`` to ``path`` atomically (no object arrays: loads with allow_pickle=False)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_save_npz_uncompressed(path: str | os.PathLike, arrays: dict) -> Path:
    """``np.savez`` (no compression) of ``arrays`` streamed to ``path`` atomically: for large,
    frequently rewritten files (checkpoints) where zlib would cost more than the disk saves.
    Loads with ``np.load(..., allow_pickle=False)`` like :func:`atomic_save_npz`."""
    return atomic_write_stream(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


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
