"""Victim folders: released weights, their training config, and (apart) the ground truth.

A victim folder holds

    victim.msgpack   θ*, flax msgpack serialization (no pickle)          what the attacker may use
    victim.json      architecture, loss, λ_wd, dtype, label counts,       what the attacker may use
                     stationarity figures, data provenance and indices
    preprocessing.npz ``mean``: the per-pixel training mean the network's  what the attacker may use
                     inputs have subtracted (its input normalisation,
                     shipped with the model like any preprocessing)
    data.npz         train_images, train_labels, heldout_images,          evaluation only: attacks
                     heldout_labels (float32 [0,1] NHWC) and ``mean``     never read it

``victim.json`` is written last, so its presence marks a complete folder.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import serialization

from recon_jax.artifacts import atomic_save_npz, atomic_write_bytes, atomic_write_json, read_json, versions
from recon_jax.errors import CheckpointError
from recon_jax.models import describe, model_config, model_from_config
from recon_jax.precision import cast_tree, resolve_dtype
from recon_jax.training import TrainConfig, TrainReport

FORMAT = "recon_jax.victim/1"
PARAMS_FILE, META_FILE, DATA_FILE = "victim.msgpack", "victim.json", "data.npz"
PREPROCESSING_FILE = "preprocessing.npz"


@dataclasses.dataclass(frozen=True)
class Victim:
    """A released network as the attacker sees it: θ*, architecture and training recipe.

    ``label_counts[c]`` is how many training images have label c (labels are taken as known
    and class-balanced, as in Runkel et al. 2024); it is metadata, not the images.
    """

    model: nn.Module
    params: dict
    image_shape: tuple[int, int, int]
    train_config: TrainConfig
    report: dict
    label_counts: tuple[int, ...]
    class_names: tuple[str, ...]
    meta: dict
    input_mean: np.ndarray | None = None  # (1, h, w, c) training mean; None for folders written before it was released

    @property
    def n_train(self) -> int:
        return int(sum(self.label_counts))

    def known_labels(self) -> np.ndarray:
        """The class-balanced label vector (N,) implied by ``label_counts``, sorted by class."""
        return np.repeat(np.arange(len(self.label_counts)), self.label_counts).astype(np.int32)


def save_victim(directory: str | os.PathLike, *, model: nn.Module, params, image_shape, train_config: TrainConfig,
                report: TrainReport, data, seed: int, extra: dict | None = None) -> Path:
    """Write a victim folder atomically. ``data`` is a ``recon_jax.data.VictimData``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / PARAMS_FILE, serialization.to_bytes(jax.device_get(params)))
    atomic_save_npz(directory / DATA_FILE,
                    train_images=np.asarray(data.train.images, np.float32),
                    train_labels=np.asarray(data.train.labels, np.int64),
                    heldout_images=np.asarray(data.heldout.images, np.float32),
                    heldout_labels=np.asarray(data.heldout.labels, np.int64),
                    mean=np.asarray(data.mean, np.float32))
    atomic_save_npz(directory / PREPROCESSING_FILE, mean=np.asarray(data.mean, np.float32))
    counts = np.bincount(np.asarray(data.train.labels), minlength=len(data.train.class_names))
    meta = {
        "format": FORMAT,
        "model": model_config(model),
        "image_shape": list(image_shape),
        "train_config": dataclasses.asdict(train_config),
        "seed": seed,
        "label_counts": counts.tolist(),
        "class_names": list(data.train.class_names),
        "task": data.task,
        "data": data.to_json(),
        "versions": versions(),
        **report.to_dict(),
        **(extra or {}),
    }
    atomic_write_json(directory / META_FILE, meta)
    return directory


def load_params(path: str | os.PathLike, model: nn.Module, image_shape) -> dict:
    """Read θ* from a msgpack file and check it against ``model``'s parameter shapes.

    Raises CheckpointError naming the parameter and both shapes when they differ.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no parameter file at {path}; expected a victim folder written by `recon-jax train`")
    try:
        restored = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable msgpack checkpoint ({err}); re-run `recon-jax train`") from err
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
    flat_expected = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    flat_found = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(restored)}
    arch = describe(model, image_shape)
    missing = sorted(set(flat_expected) - set(flat_found))
    extra = sorted(set(flat_found) - set(flat_expected))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not fit the architecture {arch}: parameters missing from the checkpoint "
            f"{missing or 'none'}, unexpected in it {extra or 'none'}; load it with the architecture it was saved with")
    for name, spec in flat_expected.items():
        found = np.shape(flat_found[name])
        if tuple(found) != tuple(spec.shape):
            raise CheckpointError(
                f"checkpoint {path} does not fit the architecture {arch}: parameter {name} has shape "
                f"{tuple(found)} in the checkpoint but the architecture expects {tuple(spec.shape)}")
        if not np.all(np.isfinite(flat_found[name])):
            raise CheckpointError(f"checkpoint {path}: parameter {name} has non-finite values; the victim is unusable")
    return jax.tree_util.tree_map(jnp.asarray, restored)


def load_victim(directory: str | os.PathLike, dtype: str | None = None) -> Victim:
    """Load what an attacker may use from a victim folder; never touches ``data.npz``.

    ``dtype`` casts θ* (default: the dtype the victim was trained in; float64 needs x64 mode).
    """
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"{directory} is not a victim folder (no {META_FILE}); create one with `recon-jax train --out {directory}`")
    try:
        meta = read_json(meta_path)
    except ValueError as err:
        raise CheckpointError(f"{meta_path} is not valid JSON ({err}); re-run `recon-jax train`") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    model = model_from_config(meta["model"])
    image_shape = tuple(int(s) for s in meta["image_shape"])
    params = load_params(directory / PARAMS_FILE, model, image_shape)
    params = cast_tree(params, resolve_dtype(dtype or meta["train_config"]["dtype"]))
    report_keys = {f.name for f in dataclasses.fields(TrainReport)}
    input_mean = None
    if (directory / PREPROCESSING_FILE).is_file():
        try:
            with np.load(directory / PREPROCESSING_FILE, allow_pickle=False) as f:
                input_mean = np.asarray(f["mean"])
        except Exception as err:
            raise CheckpointError(f"{directory / PREPROCESSING_FILE} is corrupt ({err}); re-run `recon-jax train`") from err
        if input_mean.size != int(np.prod(image_shape)):
            raise CheckpointError(f"{directory / PREPROCESSING_FILE} holds a mean of shape {input_mean.shape}, which does "
                                  f"not fit images of shape {image_shape}; re-run `recon-jax train`")
        input_mean = input_mean.reshape(1, *image_shape)
    return Victim(model=model, params=params, image_shape=image_shape,
                  train_config=TrainConfig(**meta["train_config"]),
                  report={k: meta[k] for k in report_keys if k in meta},
                  label_counts=tuple(int(c) for c in meta["label_counts"]),
                  class_names=tuple(meta["class_names"]), meta=meta, input_mean=input_mean)


def load_ground_truth(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Evaluation only: the victim's training and held-out images, labels and ``mean``.

    Attacks must never call this; it exists for metrics, and for the ``gt-noise``
    initialisation that the paper studies as an oracle.
    """
    path = Path(directory) / DATA_FILE
    if not path.is_file():
        raise CheckpointError(f"no ground truth at {path}; the victim folder is incomplete")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as err:
        raise CheckpointError(f"{path} is corrupt ({err}); re-run `recon-jax train`") from err
