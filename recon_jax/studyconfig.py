"""Study configurations: a TOML (or JSON) file in, a validated grid of cells out.

A study is the grid  victims × methods × initialisations × seeds. Every cell is one
``recon_jax.reconstruct`` run (``n_inits`` initialisations × the method's hyperparameters,
one vmapped program) against one victim, judged against the training set and the held-out
pool. The file format (all tables optional except ``victims`` and ``methods``)::

    name = "c1-mnist"             # used for the default output folder runs/<name>
    n_inits = 4                   # initialisations per cell
    seeds = [0]                   # one cell per seed (different initial draws)
    inits = ["gt-noise:0.05", "gt-noise:0.5", "heldout", "gaussian:0.1"]

    [data]                        # defaults for every victim (VictimSpec / TrainConfig fields)
    dataset = "mnist"
    n_per_class = 2

    [victims.affine]              # one table per victim; keys override [data]
    model = "affine"              # or hidden = [256], activation = "gelu"
    weight_decay = 1e-3

    [methods.bilevel]             # one table per method entry (several per method are fine)
    method = "bilevel"
    steps = 1000                  # shortcut for [methods.X.bilevel] steps / [methods.X.kkt] steps
    learning_rate = 0.01          # any ReconstructionSpec field
    [methods.bilevel.inner]       # InnerConfig fields (bilevel only)
    maxiter = 500
    [methods.kkt]
    method = "kkt"
    steps = 3000
    [methods.kkt.kkt]             # KKTConfig fields; task defaults from the victim's loss

    [landscape]                   # 1-D / 2-D objective slices for cells with these inits
    inits = ["gaussian:0.1"]
    points_1d = 21
    points_2d = 11

    [minima]                      # distinct-minima count among a cell's runs
    objective_rtol = 1.0          # runs with f <= f_best + atol + rtol·f_best reach "the same" objective
    objective_atol = 1e-6
    distance_threshold = 0.1      # NCC set distance above which two such runs are distinct minima

Everything is validated when the file is read, before any work starts: unknown keys name
the valid ones, and every victim, method and initialisation is built once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import tomllib
from pathlib import Path

from recon_jax import bilevel, kkt
from recon_jax.errors import ConfigError
from recon_jax.initialisation import parse_init
from recon_jax.reconstruct import ReconstructionSpec, default_kkt_task
from recon_jax.solvers import InnerConfig
from recon_jax.training import TrainConfig
from recon_jax.victim import VictimSpec, validate

STUDY_KEYS = {"name", "description", "n_inits", "seeds", "inits", "data", "victims", "methods", "landscape",
              "minima", "figures"}
VICTIM_KEYS = {f.name for f in dataclasses.fields(VictimSpec)} - {"train"} | {"model"}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
SPEC_KEYS = {f.name for f in dataclasses.fields(ReconstructionSpec)} - {"method", "init", "n_inits", "seed",
                                                                       "bilevel", "kkt"}
METHOD_KEYS = SPEC_KEYS | {"method", "steps", "bilevel", "kkt", "inner"}
BILEVEL_KEYS = {f.name for f in dataclasses.fields(bilevel.BilevelConfig)} - {"inner"}
KKT_KEYS = {f.name for f in dataclasses.fields(kkt.KKTConfig)}
INNER_KEYS = {f.name for f in dataclasses.fields(InnerConfig)}
DEFAULT_STEPS = {"bilevel": 1000, "kkt": 5000}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass(frozen=True)
class LandscapeConfig:
    inits: tuple[str, ...] = ()
    points_1d: int = 21
    points_2d: int = 11
    extend: float = 0.25


@dataclasses.dataclass(frozen=True)
class MinimaConfig:
    objective_rtol: float = 1.0
    objective_atol: float = 1e-6
    distance_threshold: float = 0.1


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """One method table: its name, and the raw settings resolved per victim by ``spec_for``."""

    name: str
    method: str
    settings: dict

    def spec_for(self, victim: VictimSpec, init: str, n_inits: int, seed: int) -> ReconstructionSpec:
        """The ReconstructionSpec of one cell: defaults by the victim's dtype and loss, as the CLI's."""
        s = copy.deepcopy(self.settings)
        steps = s.pop("steps", DEFAULT_STEPS[self.method])
        # Tolerances left None are resolved from the run's dtype (recon_jax.precision.default_tolerances).
        inner = {"tol": None, "cg_tol": None, **s.pop("inner", {})}
        bilevel_table = {"steps": steps, **s.pop("bilevel", {})}
        kkt_table = {"steps": steps, "task": default_kkt_task(victim.train.loss, victim.train.weight_decay), **s.pop("kkt", {})}
        if self.method == "kkt":
            s.setdefault("box_weight", 0.0)  # the KKT box weight lives in KKTConfig
        return ReconstructionSpec(
            method=self.method, init=init, n_inits=n_inits, seed=seed,
            bilevel=bilevel.BilevelConfig(**_tuples(bilevel_table), inner=InnerConfig(**inner)),
            kkt=kkt.KKTConfig(**kkt_table) if self.method == "kkt" else None, **_tuples(s))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell of the grid: a reconstruction run and its evaluation."""

    victim: str
    method: str
    init: str
    seed: int

    @property
    def id(self) -> str:
        init = self.init.replace(":", "=")
        return f"{self.victim}__{self.method}__{init}__s{self.seed}"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    name: str
    victims: dict[str, VictimSpec]
    methods: dict[str, MethodEntry]
    inits: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    n_inits: int = 4
    landscape: LandscapeConfig = LandscapeConfig()
    minima: MinimaConfig = MinimaConfig()
    figures: bool = True
    description: str = ""
    source: dict = dataclasses.field(default_factory=dict, compare=False)

    def cells(self) -> list[Cell]:
        """All cells, victim-major, then method, init, seed (the order of the summary)."""
        return [Cell(v, m, i, s) for v in self.victims for m in self.methods for i in self.inits for s in self.seeds]

    def spec(self, cell: Cell) -> ReconstructionSpec:
        return self.methods[cell.method].spec_for(self.victims[cell.victim], cell.init, self.n_inits, cell.seed)

    def to_json(self) -> dict:
        return self.source


def _tuples(table: dict) -> dict:
    """TOML arrays -> tuples (dataclass fields are hashable tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; valid keys: {', '.join(sorted(allowed))}")


def _check_name(name: str, where: str) -> None:
    if not _NAME.match(name) or "__" in name:
        raise ConfigError(f"{where} name {name!r} must use only letters, digits, '.', '_' or '-' (no '__')")


def victim_spec(table: dict, where: str) -> VictimSpec:
    """A VictimSpec from a flat table of VictimSpec and TrainConfig fields (``model = "affine"``
    is ``hidden = []``)."""
    _check_keys(table, VICTIM_KEYS | TRAIN_KEYS, where)
    table = dict(table)
    model = table.pop("model", None)
    if model not in (None, "affine", "mlp"):
        raise ConfigError(f"{where}: model must be 'affine' or 'mlp', got {model!r}")
    if model == "affine":
        table["hidden"] = []
    elif model == "mlp" and not table.get("hidden"):
        raise ConfigError(f"{where}: model 'mlp' needs hidden = [widths], e.g. hidden = [256]")
    train = TrainConfig(**_tuples({k: table.pop(k) for k in list(table) if k in TRAIN_KEYS}))
    try:
        spec = VictimSpec(**_tuples(table), train=train)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from err
    validate(spec)
    return spec


def method_entry(name: str, table: dict) -> MethodEntry:
    where = f"[methods.{name}]"
    _check_keys(table, METHOD_KEYS, where)
    method = table.get("method", name)
    if method not in DEFAULT_STEPS:
        raise ConfigError(f"{where}: method must be 'bilevel' or 'kkt', got {method!r}")
    for key, allowed in (("bilevel", BILEVEL_KEYS), ("kkt", KKT_KEYS), ("inner", INNER_KEYS)):
        if key in table:
            if not isinstance(table[key], dict):
                raise ConfigError(f"{where}: {key} must be a table, e.g. [methods.{name}.{key}]")
            _check_keys(table[key], allowed, f"[methods.{name}.{key}]")
    if method == "kkt" and ("bilevel" in table or "inner" in table):
        raise ConfigError(f"{where}: a kkt method takes no bilevel/inner tables")
    if method == "bilevel" and "kkt" in table:
        raise ConfigError(f"{where}: a bilevel method takes no kkt table")
    settings = {k: v for k, v in table.items() if k != "method"}
    return MethodEntry(name=name, method=method, settings=settings)


def config_from_dict(raw: dict, *, name: str | None = None, dataset: str | None = None) -> StudyConfig:
    """Validate ``raw`` (the parsed file) completely and build the StudyConfig.

    ``dataset`` overrides ``[data] dataset`` (and every victim's), e.g. to run one claim's
    config on CIFAR-10 as well as MNIST; the study name then gets ``-<dataset>`` appended.
    """
    raw = copy.deepcopy(raw)
    _check_keys(raw, STUDY_KEYS, "the study file")
    for key in ("victims", "methods"):
        if not isinstance(raw.get(key), dict) or not raw[key]:
            raise ConfigError(f"the study file needs at least one [{key}.NAME] table")
    data = raw.get("data", {})
    if dataset is not None:
        data["dataset"] = dataset
        for table in raw["victims"].values():
            table.pop("dataset", None)
        raw["data"] = data
    victims = {}
    for vname, table in raw["victims"].items():
        _check_name(vname, "victim")
        victims[vname] = victim_spec({**data, **table}, f"[victims.{vname}]")
    methods = {}
    for mname, table in raw["methods"].items():
        _check_name(mname, "method")
        methods[mname] = method_entry(mname, table)
    inits = tuple(raw.get("inits", ["gaussian:0.1"]))
    if not inits:
        raise ConfigError("inits must list at least one initialisation, e.g. inits = [\"gaussian:0.1\"]")
    inits = tuple(str(parse_init(i)) for i in inits)
    if len(set(inits)) != len(inits):
        raise ConfigError(f"inits lists a duplicate: {list(inits)}")
    seeds = tuple(int(s) for s in raw.get("seeds", [0]))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {list(seeds)}")
    n_inits = int(raw.get("n_inits", 4))
    if n_inits < 1:
        raise ConfigError(f"n_inits must be >= 1, got {n_inits}")
    land = raw.get("landscape", {})
    _check_keys(land, {f.name for f in dataclasses.fields(LandscapeConfig)}, "[landscape]")
    landscape = LandscapeConfig(**_tuples(land))
    landscape = dataclasses.replace(landscape, inits=tuple(str(parse_init(i)) for i in landscape.inits))
    missing = sorted(set(landscape.inits) - set(inits))
    if missing:
        raise ConfigError(f"[landscape] inits {missing} are not among the study's inits {list(inits)}")
    if landscape.points_1d < 3 or landscape.points_2d < 3:
        raise ConfigError("[landscape] points_1d and points_2d must be >= 3")
    mini = raw.get("minima", {})
    _check_keys(mini, {f.name for f in dataclasses.fields(MinimaConfig)}, "[minima]")
    minima = MinimaConfig(**mini)
    study_name = name or raw.get("name", "study")
    if dataset is not None and not study_name.endswith(f"-{dataset}"):
        study_name = f"{study_name}-{dataset}"
    config = StudyConfig(name=study_name, victims=victims, methods=methods, inits=inits, seeds=seeds,
                         n_inits=n_inits, landscape=landscape, minima=minima,
                         figures=bool(raw.get("figures", True)), description=str(raw.get("description", "")),
                         source={**raw, "name": study_name})
    for cell in config.cells():  # builds every spec: bad values fail here, before any work
        try:
            config.spec(cell)
        except TypeError as err:
            raise ConfigError(f"[methods.{cell.method}]: {err}") from err
    return config


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """``["methods.bilevel.steps=100", "inits=['gaussian:0.1']"]`` applied to a copy of ``raw``.

    Keys are dotted paths into the file's tables (missing tables are created); values are TOML
    values (numbers, booleans, "strings", [arrays]), and a bare word is read as a string. The
    result is validated like the file itself.
    """
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE with a dotted key, e.g. methods.bilevel.steps=100; got {item!r}")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        *parents, leaf = [part.strip() for part in key.split(".")]
        table = raw
        for part in parents:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a table")
        table[leaf] = value
    return raw


def needs_float64(raw: dict) -> bool:
    """True if any victim or method of the parsed file runs in float64 (the default dtype), so
    JAX's x64 mode must be on before the config is validated."""
    data = raw.get("data", {}) if isinstance(raw.get("data"), dict) else {}
    tables = [{**data, **t} for t in (raw.get("victims") or {}).values() if isinstance(t, dict)]
    tables += [t for t in (raw.get("methods") or {}).values() if isinstance(t, dict) and t.get("dtype")]
    return not tables or any(t.get("dtype", "float64") == "float64" for t in tables)


def read_raw(path: str | os.PathLike) -> dict:
    """The parsed ``.toml`` or ``.json`` file, unvalidated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config {path} does not exist; see experiments/*.toml for examples")
    try:
        return json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot parse {path}: {err}") from err


def load_config(path: str | os.PathLike, *, dataset: str | None = None) -> StudyConfig:
    """Read a ``.toml`` or ``.json`` study file (see module doc) and validate it."""
    path = Path(path)
    raw = read_raw(path)
    return config_from_dict(raw, name=raw.get("name", path.stem), dataset=dataset)


DEFAULT_STUDY = {
    "name": "default-study",
    "description": "The default study: both attacks against an affine and a one-hidden-layer victim on the "
                   "embedded 8x8 digits, from near-ground-truth, held-out and random initialisations.",
    "n_inits": 4,
    "seeds": [0],
    "inits": ["gt-noise:0.05", "gt-noise:0.5", "heldout", "gaussian:0.1"],
    "data": {"dataset": "digits", "n_per_class": 2, "weight_decay": 1e-3},
    "victims": {"affine": {"model": "affine"},
                "mlp32": {"hidden": [32], "activation": "gelu"}},
    "methods": {"bilevel": {"method": "bilevel", "steps": 100, "learning_rate": 0.01,
                            "inner": {"tol": 1e-8, "cg_tol": 1e-8}},
                "kkt": {"method": "kkt", "steps": 2000, "learning_rate": 0.01, "lr_lambda": 1.0,
                        "kkt": {"optimizer": "adam"}}},
    "landscape": {"inits": ["gaussian:0.1"], "points_1d": 17, "points_2d": 7},
}


def default_config() -> StudyConfig:
    """The study ``recon-jax study`` runs with no arguments (digits, offline, minutes on 2 cores)."""
    return config_from_dict(DEFAULT_STUDY)
