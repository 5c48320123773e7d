"""The study runner: config validation, outputs, and resumption after kill -9."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from recon_jax import study, studyconfig
from recon_jax.errors import ConfigError

# Three digit classes, one training image each: a study of 4 cells that runs in seconds.
TINY = {
    "name": "tiny",
    "n_inits": 2,
    "seeds": [0],
    "inits": ["gt-noise:0.05", "gaussian:0.1"],
    "data": {"dataset": "digits", "n_per_class": 1, "classes": [0, 1, 2], "weight_decay": 1e-2},
    "victims": {"affine": {"model": "affine"}},
    "methods": {"bilevel": {"method": "bilevel", "steps": 30, "learning_rate": 0.02, "segment": 10},
                "kkt": {"method": "kkt", "steps": 200, "learning_rate": 0.01, "lr_lambda": 0.5, "segment": 50,
                        "kkt": {"optimizer": "adam"}}},
    "landscape": {"inits": ["gaussian:0.1"], "points_1d": 5, "points_2d": 3},
}


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown key(s) bogus in the study file; valid keys:"),
    ({"victims": {}}, "needs at least one [victims.NAME] table"),
    ({"victims": {"a": {"model": "conv"}}}, "model must be 'affine' or 'mlp'"),
    ({"victims": {"a": {"model": "mlp"}}}, "model 'mlp' needs hidden = [widths]"),
    ({"victims": {"a": {"hiden": [3]}}}, "unknown key(s) hiden in [victims.a]"),
    ({"methods": {"m": {"method": "gan"}}}, "method must be 'bilevel' or 'kkt'"),
    ({"methods": {"m": {"method": "bilevel", "inner": {"tolerance": 1}}}}, "unknown key(s) tolerance in [methods.m.inner]"),
    ({"methods": {"m": {"method": "kkt", "kkt": {"task": "ranking"}}}}, "unknown KKT task 'ranking'"),
    ({"inits": ["uniform:1"]}, "unknown --init 'uniform:1'"),
    ({"inits": []}, "inits must list at least one"),
    ({"landscape": {"inits": ["heldout"]}}, "[landscape] inits ['heldout'] are not among the study's inits"),
    ({"seeds": [1, 1]}, "seeds must be a non-empty list of distinct integers"),
    ({"victims": {"a__b": {"model": "affine"}}}, "victim name 'a__b' must use only"),
])
def test_config_errors_name_the_problem(change, message):
    with pytest.raises(ConfigError) as err:
        studyconfig.config_from_dict({**TINY, **change})
    assert message in str(err.value)


def test_config_files_and_overrides(tmp_path):
    (tmp_path / "s.toml").write_text('n_inits = 1\ninits = ["heldout"]\n[victims.a]\nmodel = "affine"\n'
                                     '[methods.b]\nmethod = "bilevel"\nsteps = 5\n[methods.b.inner]\nmaxiter = 50\n')
    config = studyconfig.load_config(tmp_path / "s.toml")
    assert config.name == "s" and [c.id for c in config.cells()] == ["a__b__heldout__s0"]
    spec = config.spec(config.cells()[0])
    assert spec.bilevel.steps == 5 and spec.bilevel.inner.maxiter == 50 and spec.bilevel.inner.tol is None  # by dtype
    renamed = studyconfig.load_config(tmp_path / "s.toml", dataset="cifar10")
    assert renamed.name == "s-cifar10" and renamed.victims["a"].dataset == "cifar10"
    (tmp_path / "bad.toml").write_text("n_inits = [")
    with pytest.raises(ConfigError, match="cannot parse"):
        studyconfig.load_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        studyconfig.load_config(tmp_path / "missing.toml")


def test_overrides():
    raw = studyconfig.apply_overrides(TINY, ["methods.bilevel.steps=7", "n_inits=3", "inits=['heldout']",
                                              "data.dataset=mnist", "landscape.inits=[]"])
    assert raw["methods"]["bilevel"]["steps"] == 7 and raw["n_inits"] == 3 and raw["inits"] == ["heldout"]
    assert raw["data"]["dataset"] == "mnist" and TINY["n_inits"] == 2  # a copy
    with pytest.raises(ConfigError, match="--set takes KEY=VALUE"):
        studyconfig.apply_overrides(TINY, ["steps"])
    with pytest.raises(ConfigError, match="'name' is not a table"):
        studyconfig.apply_overrides(TINY, ["name.x=1"])


def test_a_subset_of_tables_gives_the_same_cells_as_the_whole_grid():
    raw = {**TINY, "victims": {"affine": {"model": "affine"}, "mlp": {"hidden": [4]}, "wide": {"hidden": [8]}}}
    whole = studyconfig.config_from_dict(raw, name="g")
    part = studyconfig.config_from_dict(studyconfig.select_tables(
        studyconfig.select_tables(raw, "victims", "wide, affine"), "methods", "kkt"), name="g")
    ids = [c.id for c in part.cells()]
    assert set(part.victims) == {"affine", "wide"} and {c.method for c in part.cells()} == {"kkt"}
    assert len(ids) == 2 * 2 and set(ids) <= {c.id for c in whole.cells()}
    for cell in part.cells():  # the same spec as in the whole grid
        match = next(c for c in whole.cells() if c.id == cell.id)
        assert part.spec(cell) == whole.spec(match)
    assert studyconfig.select_tables(raw, "victims", None) is raw and set(raw["victims"]) == {"affine", "mlp", "wide"}
    with pytest.raises(ConfigError, match="no \\[victims.NAME\\] table named mlpx; this study has affine, mlp, wide"):
        studyconfig.select_tables(raw, "victims", "affine,mlpx")
    with pytest.raises(ConfigError, match="no \\[methods.NAME\\] table named \\(none given\\)"):
        studyconfig.select_tables(raw, "methods", " , ")


def test_default_study_is_valid_and_on_digits():
    config = studyconfig.default_config()
    assert all(v.dataset == "digits" for v in config.victims.values())
    assert {m.method for m in config.methods.values()} == {"bilevel", "kkt"}
    assert any(i.startswith("gt-noise") for i in config.inits) and any(i.startswith("gaussian") for i in config.inits)


def test_kkt_task_default_holds_exactly_for_weight_decay():
    config = studyconfig.config_from_dict(TINY)
    kkt_cell = next(c for c in config.cells() if c.method == "kkt")
    assert config.spec(kkt_cell).kkt.task == "regression"  # ce + weight decay: the exact Φ form


def test_study_outputs(tmp_path):
    config = studyconfig.config_from_dict(TINY)
    results = study.run_study(config, tmp_path / "s", echo=lambda line: None)
    out = tmp_path / "s"
    assert len(results) == 4
    rows = _rows(out / "summary.csv")
    assert [r["cell"] for r in rows] == [c.id for c in config.cells()]
    assert set(study.ID_COLUMNS + study.METRIC_COLUMNS) == set(rows[0])
    by = {(r["method"], r["init"]): r for r in results}
    for method in ("bilevel", "kkt"):
        near, far = by[method, "gt-noise:0.05"], by[method, "gaussian:0.1"]
        assert near["init_distance"] < far["init_distance"]
        assert near["own_ssim"] > far["own_ssim"]
        assert 0.0 <= far["membership_auc_distance"] <= 1.0
        assert far["landscape_at_truth"] is not None and far["distinct_minima"] >= 1
    # The bilevel objective vanishes at the true images of a certified victim.
    assert by["bilevel", "gaussian:0.1"]["landscape_at_truth"] < 1e-6
    assert by["bilevel", "gt-noise:0.05"]["victim_stationary"] is True
    figures = {p.name for p in (out / "figures").iterdir()}
    for name in ("own_ssim_vs_init_distance.png", "auc_vs_init_distance.png", "nn_ssim_vs_init_distance.png",
                 "sorted_ssim_affine_bilevel.png", "slice1d_affine_kkt.png",
                 "slice2d_affine__bilevel__gaussian=0.1__s0.png", "grid_affine__kkt__gt-noise=0.05__s0.png"):
        assert name in figures
    report = (out / "report.md").read_text()
    assert "| affine | bilevel | gt-noise:0.05 |" in report and "](figures/auc_vs_init_distance.png)" in report
    # Every image column names its mapping to [0,1]; summary.csv records them per cell.
    assert "| own SSIM [minmax] | own SSIM [clip] | train good [minmax] |" in report
    assert "init dist [clip]" in report and "Haim et al. (2022)" in report and "BRI" + "EF" not in report  # no internal notes
    assert {(r["ssim_mapping"], r["distance_mapping"]) for r in rows} == {("minmax", "clip")}
    assert all(0 <= float(r["own_ssim_clip"]) <= 1 for r in rows)
    for r in results:
        run = json.loads((out / "cells" / r["cell"] / "run" / "run.json").read_text())
        evaluation = json.loads((out / "cells" / r["cell"] / "run" / "evaluation.json").read_text())
        assert run["image_mapping"] == evaluation["image_mapping"] == r["ssim_mapping"] == "minmax"
        with np.load(out / "cells" / r["cell"] / "run" / "reconstructions.npz") as f:
            assert str(f["image_mapping"]) == "minmax"
    saved = json.loads((out / "results.json").read_text())
    assert [c["cell"] for c in saved["cells"]] == [c.id for c in config.cells()]
    # A rerun reuses every cell; a different config in the same folder is refused.
    lines = []
    study.run_study(config, out, echo=lines.append, report=False)
    assert sum("done earlier, reused" in line for line in lines) == 4
    other = studyconfig.config_from_dict({**TINY, "n_inits": 3})
    with pytest.raises(ConfigError, match="holds a study with a different config"):
        study.run_study(other, out, echo=lambda line: None)
    # --extend: a config with one init fewer reuses the cells whose run, victim and evaluation
    # settings are unchanged, and lists only its own cells.
    smaller = studyconfig.config_from_dict({**TINY, "inits": ["gaussian:0.1"]})
    lines = []
    results = study.run_study(smaller, out, echo=lines.append, report=False, extend=True)
    assert [r["init"] for r in results] == ["gaussian:0.1"] * 2
    assert sum("done earlier, reused" in line for line in lines) == 2
    assert len(_rows(out / "summary.csv")) == 2
    # A changed run setting reruns the cell from scratch in its old folder.
    changed = studyconfig.apply_overrides({**TINY, "inits": ["gaussian:0.1"]}, ["methods.kkt.steps=100"])
    results = study.run_study(studyconfig.config_from_dict(changed), out, echo=lines.append, report=False, extend=True)
    assert [r["spec"]["kkt"]["steps"] for r in results if r["method"] == "kkt"] == [100]


def test_own_ssim_and_good_counts_judge_the_same_mapped_images(tmp_path):
    """The study's own figures and the protocol's good counts map reconstructions to [0,1]
    the same way ("minmax"): with one run whose slot j is training image j's nearest
    reconstruction, own SSIM is the protocol's median training SSIM and the own good rate its
    good count. Under "clip" (what own SSIM used before) both would differ."""
    from recon_jax import metrics
    from recon_jax.evaluation import evaluate_reconstructions

    rng = np.random.default_rng(0)
    train = rng.uniform(0.1, 0.7, (3, 8, 8, 1))  # not spanning [0, 1]: min-max scaling changes them, clip does not
    held = rng.uniform(0.1, 0.7, (4, 8, 8, 1))
    labels, mean = np.arange(3), train.mean(axis=0, keepdims=True)
    centered = (0.6 * (train - mean) + 0.05 * rng.standard_normal(train.shape))[None]  # (K=1, m=3)
    np.savez(tmp_path / "reconstructions.npz", centered=centered, labels=labels,
             init_centered=0.1 * rng.standard_normal(centered.shape))
    threshold = 0.85
    result = evaluate_reconstructions(centered, train, held, mean, good_threshold=threshold)
    np.testing.assert_array_equal(result["train_nearest_reconstruction"], [0, 1, 2])  # the slots' pairing
    own = study._own_figures(tmp_path, {"train_images": train, "train_labels": labels, "mean": mean}, threshold,
                             result["image_mapping"])
    assert own["ssim_mapping"] == result["image_mapping"] == "minmax" and own["distance_mapping"] == "clip"
    assert own["own_ssim"] == pytest.approx(result["train_median_ssim"], abs=1e-12)
    assert round(own["own_good_rate"] * 3) == result["train_good_count"] == 1
    clipped = np.asarray(metrics.ssim(np.asarray(metrics.to_unit(centered[0], mean, "clip")), train))
    assert own["own_ssim_clip"] == pytest.approx(np.median(clipped), abs=1e-12)
    assert abs(np.median(clipped) - own["own_ssim"]) > 0.05 and np.sum(clipped > threshold) != 1


def _study_command(config_path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "recon_jax", "study", "--config", str(config_path), "--out", str(out),
            "--no-figures"]


def test_kill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    raw = {**TINY, "inits": ["gt-noise:0.05", "gt-noise:0.5", "heldout", "gaussian:0.1"], "landscape": {}}
    config_path = tmp_path / "study.json"
    config_path.write_text(json.dumps(raw))
    env = {**os.environ, "RECON_JAX_JAX_CACHE": os.environ.get("RECON_JAX_TEST_JAX_CACHE", str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "recon_jax-tests-jax"))}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_study_command(config_path, clean), check=True, env=env, capture_output=True)

    process = subprocess.Popen(_study_command(config_path, killed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(killed.glob("cells/*/cell.json"))) < 2 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(p.parent.name for p in killed.glob("cells/*/cell.json"))
    assert 2 <= len(finished) < 8, "the kill should land mid-study"
    assert not (killed / "summary.csv").exists()
    stamps = {name: (killed / "cells" / name / "cell.json").stat().st_mtime_ns for name in finished}

    rerun = subprocess.run(_study_command(config_path, killed), check=True, env=env, capture_output=True, text=True)
    assert rerun.stderr.count("done earlier, reused") == len(finished)
    assert all((killed / "cells" / name / "cell.json").stat().st_mtime_ns == stamps[name] for name in finished)
    assert (killed / "summary.csv").read_text() == (clean / "summary.csv").read_text()
    rows = _rows(clean / "summary.csv")
    assert len(rows) == 8 and all(np.isfinite(float(r["final_loss_median"])) for r in rows)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.toml")),
                         ids=lambda p: p.name)
def test_experiment_configs_are_valid(path):
    config = studyconfig.load_config(path)
    assert config.cells() and config.description
    assert studyconfig.load_config(path, dataset="cifar10").name.endswith("-cifar10")


def test_cell_key_records_the_engine_that_runs():
    """A bilevel cell is keyed by the engine that runs it, not by the setting "auto": "auto" and
    the engine it picks are the same cell, and a change of what "auto" picks reruns the cells
    it affects. Cells saved while the key held the setting are reused where "auto" then picked
    the engine it picks now (amortized for the convex affine victim, implicit for hidden layers)."""
    from recon_jax import bilevel

    raw = {**TINY, "victims": {"affine": {"model": "affine"}, "mlp": {"hidden": [4], "activation": "gelu"}}}
    config = studyconfig.config_from_dict(raw)
    cells = {(c.victim, c.method): c for c in config.cells() if c.init == "gaussian:0.1"}
    affine, mlp, kkt = cells["affine", "bilevel"], cells["mlp", "bilevel"], cells["affine", "kkt"]
    engine = lambda cfg, cell: study.cell_key(cfg, cell)["spec"]["bilevel"]["engine"]
    assert engine(config, affine) == "amortized" and engine(config, mlp) == bilevel.engine_for("auto", convex=False)
    explicit = {name: studyconfig.config_from_dict(studyconfig.apply_overrides(
        raw, [f'methods.bilevel.bilevel.engine="{name}"'])) for name in ("amortized", "implicit")}
    assert study.cell_key(explicit["amortized"], affine) == study.cell_key(config, affine)  # auto = what it picks
    assert study.cell_key(explicit["implicit"], affine) != study.cell_key(config, affine)

    def legacy(cell, cfg=config):  # a cell.json written while the key held the setting (and both tables)
        key = study.cell_key(cfg, cell)
        spec = cfg.spec(cell)
        key["spec"]["bilevel"] = {**key["spec"].get("bilevel", {}), "engine": spec.bilevel.engine}
        key["spec"].setdefault("kkt", None if spec.kkt is None else dataclasses.asdict(spec.kkt))
        return {"key": key}

    mlp_auto_was_implicit = bilevel.engine_for("auto", convex=False) == "implicit"
    assert study.reusable(legacy(affine), config, affine) and study.reusable(legacy(kkt), config, kkt)
    assert study.reusable(legacy(mlp), config, mlp) == mlp_auto_was_implicit
    assert study.reusable(legacy(mlp), explicit["implicit"], mlp)  # it ran the implicit engine
    assert study.reusable(legacy(affine), explicit["amortized"], affine)
    assert not study.reusable(legacy(affine), explicit["implicit"], affine)
    # Cells from before keys existed (compared by spec) follow the same rule.
    assert study.reusable({"spec": legacy(affine)["key"]["spec"]}, config, affine)
    assert study.reusable({"spec": legacy(mlp)["key"]["spec"]}, config, mlp) == mlp_auto_was_implicit
    assert not study.reusable(None, config, mlp)


def test_cell_key_records_the_adjoint_solver_that_runs():
    """The amortized engine's adjoint solver is in the key as it runs ("auto": CG for a convex
    inner problem, MINRES otherwise); the implicit engine does not use it, so its key leaves it
    out and its cells stay reusable. A cell saved before the solver was a setting ran CG: it is
    reused where CG runs now, and rerun where MINRES does."""
    from recon_jax import bilevel

    raw = {**TINY, "victims": {"affine": {"model": "affine"}, "mlp": {"hidden": [4], "activation": "gelu"}}}
    configs = {(engine, solver): studyconfig.config_from_dict(studyconfig.apply_overrides(
        raw, [f'methods.bilevel.bilevel.engine="{engine}"', f'methods.bilevel.bilevel.adjoint_solver="{solver}"']))
        for engine in ("amortized", "implicit") for solver in bilevel.ADJOINT_SOLVERS}
    cells = {c.victim: c for c in configs["amortized", "auto"].cells() if c.method == "bilevel" and c.init == "gaussian:0.1"}
    table = lambda engine, solver, victim: study.cell_key(configs[engine, solver], cells[victim])["spec"]["bilevel"]
    assert table("amortized", "auto", "affine")["adjoint_solver"] == "cg"
    assert table("amortized", "auto", "mlp")["adjoint_solver"] == "minres"
    assert "adjoint_solver" not in table("implicit", "minres", "mlp")
    assert len({json.dumps(table("implicit", s, "mlp"), sort_keys=True) for s in bilevel.ADJOINT_SOLVERS}) == 1

    def saved_before_the_setting(engine, victim):
        key = study.cell_key(configs[engine, "cg"], cells[victim])
        key["spec"]["bilevel"].pop("adjoint_solver", None)
        return {"key": key}

    for solver in bilevel.ADJOINT_SOLVERS:
        assert study.reusable(saved_before_the_setting("implicit", "mlp"), configs["implicit", solver], cells["mlp"])
        assert study.reusable(saved_before_the_setting("amortized", "mlp"), configs["amortized", solver],
                              cells["mlp"]) == (solver == "cg")
        assert study.reusable(saved_before_the_setting("amortized", "affine"), configs["amortized", solver],
                              cells["affine"]) == (solver != "minres")


def test_cell_key_records_the_refresh_solver_that_runs():
    """The amortized engine's refresh solver is in the key as it runs ("auto": Newton for a convex
    inner problem, ``recon_jax.lbfgs`` otherwise), with the Newton budgets only where Newton runs.
    A cell saved before the setting ran jaxopt's L-BFGS: it is reused only where that runs now
    ("jaxopt"). A key of the first naming (before ``refresh_names``) said "lbfgs" for jaxopt's."""
    from recon_jax import bilevel

    raw = {**TINY, "victims": {"affine": {"model": "affine"}, "mlp": {"hidden": [4], "activation": "gelu"}}}
    configs = {solver: studyconfig.config_from_dict(studyconfig.apply_overrides(
        raw, [f'methods.bilevel.bilevel.refresh_solver="{solver}"'])) for solver in bilevel.REFRESH_SOLVERS}
    cells = {c.victim: c for c in configs["auto"].cells() if c.method == "bilevel" and c.init == "gaussian:0.1"}
    table = lambda solver, victim: study.cell_key(configs[solver], cells[victim])["spec"]["bilevel"]
    assert table("auto", "affine")["refresh_solver"] == "newton" and "refresh_cg" in table("auto", "affine")
    assert table("auto", "mlp")["refresh_solver"] == "lbfgs" and "refresh_cg" not in table("auto", "mlp")
    assert table("auto", "mlp") == table("lbfgs", "mlp") != table("jaxopt", "mlp")
    assert table("auto", "affine") == table("newton", "affine")
    assert table("auto", "mlp")["refresh_names"] == study.REFRESH_NAMES

    def saved(victim, solver=None):
        """A key saved before the setting existed (solver None), or by the first naming."""
        key = study.cell_key(configs["jaxopt"], cells[victim])
        for name in ("refresh_solver", "refresh_names", *study.REFRESH_BUDGETS):
            key["spec"]["bilevel"].pop(name, None)
        if solver is not None:
            key["spec"]["bilevel"]["refresh_solver"] = solver
        return {"key": key}

    for solver in bilevel.REFRESH_SOLVERS:
        for victim in ("mlp", "affine"):
            assert study.reusable(saved(victim), configs[solver], cells[victim]) == (solver == "jaxopt")
            # First naming: "lbfgs" was jaxopt's, and "auto" resolved to Newton (convex) or jaxopt's.
            assert study.reusable(saved(victim, "lbfgs"), configs[solver], cells[victim]) == (solver == "jaxopt")
        assert study.reusable(saved("mlp", "auto"), configs[solver], cells["mlp"]) == (solver == "jaxopt")
    # A key written now is reused by the same setting, and by "auto" where that picks it.
    now = {"key": study.cell_key(configs["lbfgs"], cells["mlp"])}
    assert study.reusable(now, configs["auto"], cells["mlp"]) and not study.reusable(now, configs["jaxopt"], cells["mlp"])


def test_a_cell_key_holds_only_its_own_attacks_settings():
    """A new or changed bilevel setting does not rerun KKT cells, nor a KKT setting bilevel cells,
    including cells saved while keys held both tables."""
    config = studyconfig.config_from_dict(TINY)
    kkt_cell = next(c for c in config.cells() if c.method == "kkt")
    bilevel_cell = next(c for c in config.cells() if c.method == "bilevel")
    assert "bilevel" not in study.cell_key(config, kkt_cell)["spec"]
    assert "kkt" not in study.cell_key(config, bilevel_cell)["spec"]
    for cell, other, table in ((kkt_cell, "bilevel", {"engine": "auto", "steps": 1000, "made_up_old_field": 1}),
                               (bilevel_cell, "kkt", {"made_up_old_field": 1})):
        key = study.cell_key(config, cell)
        saved = {"key": {**key, "spec": {**key["spec"], other: table}}}
        assert study.reusable(saved, config, cell)
        assert study.reusable({"spec": saved["key"]["spec"]}, config, cell)
