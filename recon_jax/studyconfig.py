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

**Size axes.** A victim table may carry a ``sweep`` sub-table: each key a VictimSpec or
TrainConfig field, each value a non-empty list of settings. The table expands into one victim
per combination (the Cartesian product, the last key varying fastest), e.g. the width and size
axes of an identifiability study::

    [victims.mlp]
    activation = "gelu"
    inits = ["gaussian:0.1", "heldout"]   # optional: this table's inits replace the study's
    [victims.mlp.sweep]
    hidden = [[16], [64]]         # list-valued fields sweep lists: one list per victim
    n_per_class = [1, 10]         # -> victims mlp-h16-n1, mlp-h16-n10, mlp-h64-n1, mlp-h64-n10

A swept key may not also be set in the table itself; a key of ``[data]`` is overridden by the
sweep. Expanded victims are named ``<table>-<part>-<part>...``, one part per swept key in the
order written: ``n<value>`` for ``n_per_class``, ``h<w1>x<w2>...`` for ``hidden`` (``hnone`` for
``[]``), ``wd<value>`` for ``weight_decay``, the bare value for a string (``mlp-relu``) and
``<key><value>`` for any other key (``affine-seed3``). Integers print as written, floats in
Python's ``g`` format (``1e-3`` -> ``0.001``, ``1e-5`` -> ``1e-05``), booleans as
``true``/``false``; characters a name may not hold become ``.``. So ``[victims.affine]`` with
``n_per_class = [1, 5]`` gives ``affine-n1`` and ``affine-n5``, and ``[victims.affine_wd]`` with
``weight_decay = [1e-4, 1e-3]`` gives ``affine_wd-wd0.0001`` and ``affine_wd-wd0.001``. Victims
and cells are ordered by table (in file order), then by this product; a name that two tables
produce is an error. ``--set victims.affine.sweep.n_per_class=[1,2]`` overrides a sweep like any
other value, and ``--extend`` reuses the cells of the expanded victims whose settings did not change.

**Per-victim initialisations.** ``inits = [...]`` in a victim table replaces the study's
``inits`` for that table's victims (all of a sweep's), e.g. to run ``gt-noise`` and
``heldout`` controls at a few sizes only.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import re
import tomllib
from pathlib import Path

from recon_jax import bilevel, kkt
from recon_jax.errors import ConfigError
from recon_jax.initialisation import parse_init
from recon_jax.problems import default_kkt_task
from recon_jax.reconstruct import ReconstructionSpec
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
SWEEP_KEYS = VICTIM_KEYS | TRAIN_KEYS
SWEEP_PREFIXES = {"n_per_class": "n", "hidden": "h", "weight_decay": "wd"}
"""Name part prefixes of the common size axes (module doc); any other key uses its own name."""
_FIELD_TYPES = {f.name: str(f.type) for cls in (VictimSpec, TrainConfig) for f in dataclasses.fields(cls)}
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9._-]+")


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
    victim_inits: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    """Victims whose table sets its own ``inits``, and those inits (they replace ``inits``)."""

    def inits_for(self, victim: str) -> tuple[str, ...]:
        return self.victim_inits.get(victim, self.inits)

    def cells(self) -> list[Cell]:
        """All cells, victim-major, then method, init, seed (the order of the summary)."""
        return [Cell(v, m, i, s) for v in self.victims for m in self.methods for i in self.inits_for(v)
                for s in self.seeds]

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


def _name_value(value) -> str:
    """One swept value as it appears in a victim name (module doc)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, (list, tuple)):
        return "x".join(_name_value(v) for v in value) if value else "none"
    if value is None:
        return "none"
    return str(value)


def sweep_name(table_name: str, combination: dict) -> str:
    """``affine`` + {n_per_class: 5} -> ``affine-n5``; {hidden: [64], n_per_class: 10} ->
    ``-h64-n10``; {weight_decay: 1e-3} -> ``-wd0.001``; strings appear bare (module doc)."""
    parts = []
    for key, value in combination.items():
        text = _name_value(value) if isinstance(value, str) else SWEEP_PREFIXES.get(key, key) + _name_value(value)
        parts.append(re.sub("_{2,}", "_", _NOT_IN_NAME.sub(".", text)).strip("."))
    return "-".join([table_name, *parts])


def _check_sweep_value(key: str, value, where: str) -> None:
    """A swept value has the type its field takes: lists for tuple fields, numbers for numeric ones."""
    kind = _FIELD_TYPES.get(key, "")
    if kind.startswith("tuple") and not isinstance(value, list):
        raise ConfigError(f"{where}: {key} takes a list, so its sweep lists lists, e.g. {key} = [[16], [64]]; "
                          f"got {value!r}")
    numeric = kind.split(" | ")[0] in ("int", "float")
    if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{where}: {key} takes a number, got {value!r}")
    if kind.split(" | ")[0] == "int" and isinstance(value, float):
        raise ConfigError(f"{where}: {key} takes an integer, got {value!r}")


def expand_sweep(name: str, table: dict) -> list[tuple[str, dict]]:
    """A victim table -> [(victim name, table with one combination of its sweep)], the product
    of the sweep's lists in the order written, last key fastest; [(name, table)] without a sweep.

    ``{"model": "affine", "sweep": {"n_per_class": [1, 5]}}`` ->
    ``[("affine-n1", {"model": "affine", "n_per_class": 1}), ("affine-n5", {..., "n_per_class": 5})]``.
    """
    table = dict(table)
    sweep = table.pop("sweep", None)
    if sweep is None:
        return [(name, table)]
    where = f"[victims.{name}.sweep]"
    if not isinstance(sweep, dict) or not sweep:
        raise ConfigError(f"{where} must be a table of KEY = [values], e.g. n_per_class = [1, 2, 5]")
    _check_keys(sweep, SWEEP_KEYS, where)
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {key} must be a non-empty list of values, e.g. {key} = "
                              f"{'[[16], [64]]' if _FIELD_TYPES.get(key, '').startswith('tuple') else '[1, 2, 5]'}; "
                              f"got {values!r}")
        for value in values:
            _check_sweep_value(key, value, where)
        if len({json.dumps(v) for v in values}) != len(values):
            raise ConfigError(f"{where}: {key} lists a value twice: {values}")
        if key in table:
            raise ConfigError(f"[victims.{name}]: {key} is both set ({table[key]!r}) and swept; remove one")
    keys = list(sweep)
    expanded = []
    for values in itertools.product(*(sweep[k] for k in keys)):
        combination = dict(zip(keys, values))
        expanded.append((sweep_name(name, combination), {**table, **combination}))
    return expanded


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
    if table.get("arch") == "cnn":
        # A cnn's ``hidden`` are dense layers after its conv blocks: none unless asked for, as on
        # the CLI (VictimSpec's default of one 1000-wide layer is the MLP's).
        table.setdefault("hidden", [])
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
            if isinstance(table, dict):
                table.pop("dataset", None)
                if isinstance(table.get("sweep"), dict):
                    table["sweep"].pop("dataset", None)
        raw["data"] = data
    victims, victim_inits = {}, {}
    for tname, table in raw["victims"].items():
        _check_name(tname, "victim")
        if not isinstance(table, dict):
            raise ConfigError(f"[victims.{tname}] must be a table of victim settings, e.g. model = \"affine\"")
        table = dict(table)
        own_inits = table.pop("inits", None)
        if own_inits is not None:
            own_inits = _parse_inits(own_inits, f"[victims.{tname}] inits")
        for vname, expanded in expand_sweep(tname, table):
            _check_name(vname, "victim")
            if vname in victims:
                raise ConfigError(f"two victims are named {vname!r} ([victims.{tname}] and an earlier table); "
                                  "rename a table")
            victims[vname] = victim_spec({**data, **expanded}, f"[victims.{tname}]" + (
                f" (sweep: {vname})" if vname != tname else ""))
            if own_inits is not None:
                victim_inits[vname] = own_inits
    methods = {}
    for mname, table in raw["methods"].items():
        _check_name(mname, "method")
        methods[mname] = method_entry(mname, table)
    inits = _parse_inits(raw.get("inits", ["gaussian:0.1"]), "inits")
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
    used = set(inits) if len(victim_inits) < len(victims) else set()
    used |= {i for own in victim_inits.values() for i in own}
    missing = sorted(set(landscape.inits) - used)
    if missing:
        raise ConfigError(f"[landscape] inits {missing} are not among the study's inits {sorted(used)}")
    if landscape.points_1d < 3 or landscape.points_2d < 3:
        raise ConfigError("[landscape] points_1d and points_2d must be >= 3")
    mini = raw.get("minima", {})
    _check_keys(mini, {f.name for f in dataclasses.fields(MinimaConfig)}, "[minima]")
    minima = MinimaConfig(**mini)
    study_name = name or raw.get("name", "study")
    if dataset is not None and not study_name.endswith(f"-{dataset}"):
        study_name = f"{study_name}-{dataset}"
    config = StudyConfig(name=study_name, victims=victims, methods=methods, inits=inits, seeds=seeds,
                         n_inits=n_inits, landscape=landscape, minima=minima, victim_inits=victim_inits,
                         figures=bool(raw.get("figures", True)), description=str(raw.get("description", "")),
                         source={**raw, "name": study_name})
    for cell in config.cells():  # builds every spec: bad values fail here, before any work
        try:
            config.spec(cell)
        except TypeError as err:
            raise ConfigError(f"[methods.{cell.method}]: {err}") from err
    return config


def _parse_inits(inits, where: str) -> tuple[str, ...]:
    """A non-empty list of distinct initialisations, each in its canonical form."""
    if not isinstance(inits, (list, tuple)) or not inits:
        raise ConfigError(f"{where} must list at least one initialisation, e.g. inits = [\"gaussian:0.1\"]")
    inits = tuple(str(parse_init(i)) for i in inits)
    if len(set(inits)) != len(inits):
        raise ConfigError(f"{where} lists a duplicate: {list(inits)}")
    return inits


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


def select_tables(raw: dict, key: str, names: str | None) -> dict:
    """``raw`` with only the ``[key.NAME]`` tables (key "victims" or "methods") that ``names``
    lists, a comma-separated string (None: all), so that the part of a grid a machine can
    afford runs from the same file, e.g. ``--victims affine,affine_wd,control``. The kept
    cells are the same cells as in the whole grid (``--extend`` later adds the rest to the same
    folder). An unknown name is refused with the list of names there are.
    """
    if names is None:
        return raw
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    tables = raw.get(key) if isinstance(raw.get(key), dict) else {}
    unknown = [n for n in wanted if n not in tables]
    if not wanted or unknown:
        raise ConfigError(f"--{key} {names!r}: no [{key}.NAME] table named {', '.join(unknown) or '(none given)'}; "
                          f"this study has {', '.join(tables) or 'none'}")
    raw = copy.deepcopy(raw)
    raw[key] = {n: tables[n] for n in tables if n in wanted}
    return raw


def needs_float64(raw: dict) -> bool:
    """True if any victim or method of the parsed file runs in float64 (the default dtype), so
    JAX's x64 mode must be on before the config is validated."""
    data = raw.get("data", {}) if isinstance(raw.get("data"), dict) else {}
    tables = []
    for t in (raw.get("victims") or {}).values():
        if isinstance(t, dict):
            sweep = t.get("sweep") if isinstance(t.get("sweep"), dict) else {}
            dtypes = sweep["dtype"] if isinstance(sweep.get("dtype"), list) and sweep["dtype"] else [None]
            tables += [{**data, **t, **({"dtype": d} if d else {})} for d in dtypes]  # a swept dtype: each value
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
