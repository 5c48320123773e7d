"""From a dataset name to a saved, certified victim: the pipeline behind ``recon-jax train``.

``VictimSpec`` holds every choice (data selection, architecture, objective, solver,
precision, seed). ``train_and_save(spec, out)`` validates all of it before any work, loads
and selects the data, trains to a stationarity certificate and writes the victim folder
(see ``recon_jax.checkpoint``). Rerunning with an identical spec on a finished folder
returns the saved report instead of training again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import jax

from recon_jax import checkpoint, data
from recon_jax.artifacts import json_roundtrip, read_json
from recon_jax.errors import ConfigError
from flax import linen as nn

from recon_jax.models import ARCHITECTURES, CNN, MLP, init_params
from recon_jax.objectives import check_loss
from recon_jax.precision import resolve_dtype
from recon_jax.training import TrainConfig, TrainReport, train_victim

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VictimSpec:
    """Everything that determines a victim. Defaults give a small gelu MLP on ``digits``.

    ``arch`` names the architecture (``models.ARCHITECTURES``): "mlp" uses ``hidden``,
    ``use_bias`` and ``first_layer_init_scale``; "cnn" uses ``channels`` (one 3×3 conv block
    each) and ``hidden`` as its dense hidden widths after the conv blocks.
    """

    dataset: str = "digits"
    split: str | None = None
    data_dir: str | None = None
    n_per_class: int = 10
    classes: tuple[int, ...] | None = None
    binary_positive: tuple[int, ...] | None = None
    n_heldout: int | None = None
    mean: str = "pixel"
    hidden: tuple[int, ...] = (1000,)
    activation: str = "gelu"
    softplus_beta: float = 1.0
    use_bias: bool | tuple[bool, ...] = True
    first_layer_init_scale: float | None = None
    train: TrainConfig = TrainConfig()
    seed: int = 0
    arch: str = "mlp"
    channels: tuple[int, ...] = ()

    def n_classes(self) -> int:
        """Number of labels the victim sees (2 for a binary grouping)."""
        if self.binary_positive:
            return 2
        if self.classes is not None:
            return len(self.classes)
        return -1  # known only once the dataset is loaded

    def n_out(self, n_classes: int) -> int:
        """C outputs for ce (and one-hot mse); one output for logistic and binary mse."""
        if self.train.loss == "logistic" or (self.train.loss == "mse" and n_classes == 2 and self.binary_positive):
            return 1
        return n_classes

    def model(self, n_classes: int) -> nn.Module:
        if self.arch == "mlp":
            if self.channels:
                raise ConfigError(f"channels={self.channels} are for arch 'cnn'; an mlp takes hidden widths only")
            return MLP(n_out=self.n_out(n_classes), hidden=tuple(self.hidden), activation=self.activation,
                       softplus_beta=self.softplus_beta, use_bias=self.use_bias,
                       first_layer_init_scale=self.first_layer_init_scale)
        if self.arch == "cnn":
            if self.use_bias is not True or self.first_layer_init_scale is not None:
                raise ConfigError("use_bias and first_layer_init_scale are mlp options; a cnn has biases in every "
                                  "layer and LeCun-normal initialisation")
            return CNN(n_out=self.n_out(n_classes), channels=tuple(self.channels), activation=self.activation,
                       dense_hidden=tuple(self.hidden), softplus_beta=self.softplus_beta)
        known = ", ".join(ARCHITECTURES)
        raise ConfigError(f"VictimSpec cannot build architecture {self.arch!r}; choose one of {known} "
                          "(a newly registered architecture needs a branch in VictimSpec.model)")

    def to_json(self) -> dict:
        """The spec as JSON. An mlp spec has no ``arch``/``channels`` keys, exactly as before the
        cnn existed, so that earlier victim folders are still recognised as the same victim."""
        spec = dataclasses.asdict(self)
        if self.arch == "mlp" and not self.channels:
            del spec["arch"], spec["channels"]
        return spec


def validate(spec: VictimSpec) -> None:
    """Check everything that can be checked without data, so bad input fails in milliseconds."""
    resolve_dtype(spec.train.dtype)
    if spec.n_per_class < 1:
        raise ConfigError(f"--n-per-class must be >= 1, got {spec.n_per_class}")
    if spec.n_heldout is not None and spec.n_heldout < 0:
        raise ConfigError(f"--n-heldout must be >= 0, got {spec.n_heldout}")
    n_classes = spec.n_classes()
    spec.model(max(n_classes, 2))  # validates activation, widths, biases
    if n_classes > 0:
        check_loss(spec.train.loss, spec.n_out(n_classes), n_classes)


def train_and_save(spec: VictimSpec, out: str | os.PathLike, *, overwrite: bool = False,
                   progress=None) -> TrainReport | dict:
    """Train the victim ``spec`` describes and write it to ``out``; returns its report.

    A finished folder with the same spec is reused (its saved report is returned as a
    dict); one with a different spec is an error unless ``overwrite``.
    """
    out = Path(out)
    validate(spec)
    meta_path = out / checkpoint.META_FILE
    if meta_path.is_file() and not overwrite:
        saved = read_json(meta_path)
        if saved.get("spec") == json_roundtrip(spec.to_json()):
            log.info("%s already holds this victim; reusing it", out)
            return saved
        raise ConfigError(f"{out} already holds a different victim; choose another --out or pass --overwrite")

    source = data.load_dataset(spec.dataset, split=spec.split, data_dir=spec.data_dir)
    selected = data.select(source, n_per_class=spec.n_per_class, classes=spec.classes,
                           binary_positive=spec.binary_positive, n_heldout=spec.n_heldout,
                           seed=spec.seed, mean=spec.mean)
    n_classes = len(selected.train.class_names)
    check_loss(spec.train.loss, spec.n_out(n_classes), n_classes)
    model = spec.model(n_classes)
    dtype = resolve_dtype(spec.train.dtype)
    params0 = init_params(model, jax.random.key(spec.seed), selected.train.shape, dtype)
    params, report = train_victim(
        model, params0, selected.train_centered(), selected.train.labels, spec.train,
        heldout_images=selected.heldout_centered(), heldout_labels=selected.heldout.labels, progress=progress)
    checkpoint.save_victim(out, model=model, params=params, image_shape=selected.train.shape,
                           train_config=spec.train, report=report, data=selected, seed=spec.seed,
                           extra={"spec": spec.to_json()})
    return report



def parse_int_list(text: str | None) -> tuple[int, ...] | None:
    """"1,3,5" -> (1, 3, 5); empty or None -> None."""
    if text is None or text.strip() == "":
        return None
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError as err:
        raise ConfigError(f"expected a comma-separated list of integers, got {text!r}") from err


def parse_bias(text: str, n_layers: int) -> bool | tuple[bool, ...]:
    """"all"/"none" or a per-layer list such as "1,0,0"."""
    if text == "all":
        return True
    if text == "none":
        return False
    flags = parse_int_list(text) or ()
    if len(flags) != n_layers or any(f not in (0, 1) for f in flags):
        raise ConfigError(f"--bias takes all, none, or {n_layers} comma-separated 0/1 flags, got {text!r}")
    return tuple(bool(f) for f in flags)
