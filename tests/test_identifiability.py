"""Size axes of study configs, the size columns of summary.csv, and the identifiability map:
bootstrap intervals, the AUC transition, and a tiny sweep study end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from recon_jax import cli, identifiability, study, studyconfig
from recon_jax.errors import ConfigError

BASE = {
    "name": "sizes",
    "n_inits": 2,
    "inits": ["gaussian:0.1"],
    "data": {"dataset": "digits", "n_per_class": 2, "weight_decay": 1e-3},
    "methods": {"bilevel": {"method": "bilevel", "steps": 5}, "kkt": {"method": "kkt", "steps": 10}},
}
SWEEPS = {
    "affine": {"model": "affine", "sweep": {"n_per_class": [1, 2, 5]}},
    "mlp": {"activation": "gelu", "sweep": {"hidden": [[16], [64, 64]], "n_per_class": [1, 3]}},
    "affine_wd": {"model": "affine", "n_per_class": 5, "sweep": {"weight_decay": [1e-4, 1e-3, 1e-2]}},
    "plain": {"model": "affine"},
}


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ---- size axes


def test_sweep_expands_to_the_product_in_written_order():
    config = studyconfig.config_from_dict({**BASE, "victims": SWEEPS})
    assert list(config.victims) == [
        "affine-n1", "affine-n2", "affine-n5",
        "mlp-h16-n1", "mlp-h16-n3", "mlp-h64x64-n1", "mlp-h64x64-n3",
        "affine_wd-wd0.0001", "affine_wd-wd0.001", "affine_wd-wd0.01",
        "plain"]
    assert len(config.cells()) == 11 * 2 * 1 * 1  # victims × methods × inits × seeds
    v = config.victims
    assert [v[f"affine-n{n}"].n_per_class for n in (1, 2, 5)] == [1, 2, 5]
    assert v["affine-n5"].hidden == () and v["plain"].n_per_class == 2  # [data] applies where nothing is swept
    assert v["mlp-h64x64-n3"].hidden == (64, 64) and v["mlp-h64x64-n3"].n_per_class == 3
    assert v["mlp-h16-n1"].activation == "gelu"
    assert [v[f"affine_wd-wd{w}"].train.weight_decay for w in ("0.0001", "0.001", "0.01")] == [1e-4, 1e-3, 1e-2]
    assert all(v[f"affine_wd-wd{w}"].n_per_class == 5 for w in ("0.0001", "0.001", "0.01"))
    for name in config.victims:  # every expanded name is a valid victim name
        studyconfig._check_name(name, "victim")


def test_sweep_names_of_other_keys():
    assert studyconfig.sweep_name("m", {"activation": "relu", "seed": 3, "hidden": []}) == "m-relu-seed3-hnone"
    assert studyconfig.sweep_name("a", {"weight_decay": 1e-5, "softplus_beta": 2.0}) == "a-wd1e-05-softplus_beta2"
    assert studyconfig.sweep_name("a", {"loss": "a b/c"}) == "a-a.b.c"


def test_sweep_overrides_and_float64_detection():
    raw = studyconfig.apply_overrides({**BASE, "victims": {"affine": SWEEPS["affine"]}},
                                      ["victims.affine.sweep.n_per_class=[3,4]", "victims.affine.sweep.seed=[0,1]"])
    assert list(studyconfig.config_from_dict(raw).victims) == ["affine-n3-seed0", "affine-n3-seed1",
                                                               "affine-n4-seed0", "affine-n4-seed1"]
    float32 = {**BASE, "methods": {}, "victims": {"a": {"dtype": "float32", "sweep": {"n_per_class": [1]}}}}
    assert not studyconfig.needs_float64(float32)
    assert studyconfig.needs_float64({**float32, "victims": {"a": {"sweep": {"dtype": ["float32", "float64"]}}}})


@pytest.mark.parametrize("victims, message", [
    ({"a": {"sweep": {"width": [16]}}}, "unknown key(s) width in [victims.a.sweep]; valid keys: acceleration"),
    ({"a": {"sweep": {"n_per_class": []}}}, "n_per_class must be a non-empty list of values"),
    ({"a": {"sweep": {"n_per_class": 3}}}, "n_per_class must be a non-empty list of values"),
    ({"a": {"sweep": {}}}, "[victims.a.sweep] must be a table of KEY = [values]"),
    ({"a": {"sweep": [1]}}, "[victims.a.sweep] must be a table of KEY = [values]"),
    ({"a": {"sweep": {"hidden": [16, 64]}}}, "hidden takes a list, so its sweep lists lists, e.g. hidden = [[16], [64]]"),
    ({"a": {"sweep": {"n_per_class": [1.5]}}}, "n_per_class takes an integer"),
    ({"a": {"sweep": {"weight_decay": ["big"]}}}, "weight_decay takes a number"),
    ({"a": {"sweep": {"n_per_class": [1, 1]}}}, "n_per_class lists a value twice"),
    ({"a": {"n_per_class": 2, "sweep": {"n_per_class": [1]}}}, "n_per_class is both set (2) and swept"),
    ({"a-n1": {"model": "affine"}, "a": {"sweep": {"n_per_class": [1]}}}, "two victims are named 'a-n1'"),
    ({"a": {"sweep": {"n_per_class": [0]}}}, "--n-per-class must be >= 1"),
    ({"a": {"inits": []}}, "[victims.a] inits must list at least one initialisation"),
    ({"a": {"inits": ["uniform:1"]}}, "unknown --init 'uniform:1'"),
    ({"a": {"inits": ["heldout", "heldout"]}}, "[victims.a] inits lists a duplicate"),
])
def test_sweep_and_inits_errors_name_the_problem(victims, message):
    with pytest.raises(ConfigError) as err:
        studyconfig.config_from_dict({**BASE, "victims": victims})
    assert message in str(err.value)


def test_per_victim_inits_replace_the_study_inits():
    victims = {"affine": {"model": "affine", "sweep": {"n_per_class": [1, 2]}},
               "control": {"model": "affine", "inits": ["gt-noise:0.05", "heldout"], "sweep": {"n_per_class": [1]}}}
    config = studyconfig.config_from_dict({**BASE, "seeds": [0, 1], "victims": victims})
    assert config.inits_for("affine-n1") == ("gaussian:0.1",)
    assert config.inits_for("control-n1") == ("gt-noise:0.05", "heldout")
    assert [(c.victim, c.init) for c in config.cells() if c.method == "bilevel" and c.seed == 0] == [
        ("affine-n1", "gaussian:0.1"), ("affine-n2", "gaussian:0.1"),
        ("control-n1", "gt-noise:0.05"), ("control-n1", "heldout")]
    assert len(config.cells()) == 4 * 2 * 2
    # A landscape init must be run by some victim.
    ok = studyconfig.config_from_dict({**BASE, "victims": victims, "landscape": {"inits": ["heldout"]}})
    assert ok.landscape.inits == ("heldout",)
    with pytest.raises(ConfigError, match="not among the study's inits"):
        studyconfig.config_from_dict({**BASE, "victims": victims, "landscape": {"inits": ["gaussian:0.01"]}})


# ---- bootstrap


def test_bootstrap_interval_covers_the_true_mean_at_its_level():
    """Percentile intervals of the mean of 30 N(μ, 1) samples: over 200 repeated experiments
    the 95% interval covers μ in 0.9-0.99 of them, and the 50% interval in about half."""
    rng = np.random.default_rng(0)
    mu, covered95, covered50 = 1.5, 0, 0
    for _ in range(200):
        sample = mu + rng.standard_normal(30)
        wide = identifiability.bootstrap_interval(sample, level=0.95, n_resamples=400, rng=rng)
        narrow = identifiability.percentile_interval(wide.replicates, 0.5)
        covered95 += wide.low <= mu <= wide.high
        covered50 += narrow[0] <= mu <= narrow[1]
        assert wide.estimate == pytest.approx(sample.mean()) and wide.low < narrow[0] < narrow[1] < wide.high
    assert 0.9 <= covered95 / 200 <= 0.99
    assert 0.38 <= covered50 / 200 <= 0.62


def test_bootstrap_interval_is_seeded_and_takes_a_resampling_function():
    values = np.arange(10.0)
    a = identifiability.bootstrap_interval(values, np.median, n_resamples=50, rng=3)
    b = identifiability.bootstrap_interval(values, np.median, n_resamples=50, rng=3)
    np.testing.assert_array_equal(a.replicates, b.replicates)
    c = identifiability.bootstrap_interval(lambda g: float(g.integers(0, 2)), n_resamples=200, rng=0, estimate=0.5)
    assert c.estimate == 0.5 and set(c.replicates) == {0.0, 1.0} and (c.low, c.high) == (0.0, 1.0)
    # Order statistics: with B = 40 and level 0.9 the bounds are the 2nd and 38th smallest replicates.
    low, high = identifiability.percentile_interval(np.arange(40.0)[::-1], 0.9)
    assert (low, high) == (1.0, 37.0)
    assert identifiability.percentile_interval([np.nan, 1.0, np.inf], 0.5) == (1.0, np.inf)


# ---- the AUC of a multiset of runs is the evaluation's


def test_auc_of_runs_equals_the_evaluation_auc():
    from recon_jax.evaluation import evaluate_reconstructions

    rng = np.random.default_rng(1)
    train, held = rng.uniform(0, 1, (6, 8, 8, 1)), rng.uniform(0, 1, (7, 8, 8, 1))
    mean = train.mean(axis=0, keepdims=True)
    centered = np.concatenate([(train[:4] - mean)[None] + 0.3 * rng.standard_normal((2, 4, 8, 8, 1)),
                               0.3 * rng.standard_normal((1, 4, 8, 8, 1))])  # K = 3 runs of m = 4
    distances = identifiability.per_run_distances(centered, train, held, mean)
    assert distances.train.shape == (3, 6) and distances.heldout.shape == (3, 7)
    for runs in ([0, 1, 2], [2], [0, 2]):
        expected = evaluate_reconstructions(centered[runs], train, held, mean, best_ssim=False)
        assert identifiability.auc_of_runs(distances, runs) == expected["membership_auc_distance"]
    assert identifiability.auc_of_runs(distances, [0, 0, 2]) == identifiability.auc_of_runs(distances, [0, 2])
    one_seed = identifiability.point_bootstrap([distances], n_resamples=50, rng=0)
    assert one_seed.estimate == identifiability.auc_of_runs(distances)
    assert np.all((one_seed.replicates >= 0) & (one_seed.replicates <= 1))


# ---- the transition


def test_transition_interpolates_in_log_ratio():
    # Crossing between r = 2 (AUC 0.9) and r = 4 (AUC 0.6), halfway: log r = log 2 + ½ log 2.
    found = identifiability.transition_ratio([4.0, 1.0, 8.0, 2.0], [0.6, 1.0, 0.5, 0.9])
    assert found.ratio == pytest.approx(2 * math.sqrt(2), rel=1e-12) and found.reason == ""
    # The first downward crossing counts, a later one does not; τ reached exactly is not below it.
    assert identifiability.transition_ratio([1, 2, 4, 8], [0.8, 0.7, 0.9, 0.5]).ratio == pytest.approx(math.sqrt(2))
    assert identifiability.transition_ratio([1, 10], [0.75, 0.5]).ratio == pytest.approx(1.0)
    assert identifiability.transition_ratio([1, 3, 9], [0.9, 0.8, 0.74]).ratio == pytest.approx(
        3 * 3 ** ((0.8 - 0.75) / (0.8 - 0.74)))
    above = identifiability.transition_ratio([1, 2], [0.9, 0.8])
    below = identifiability.transition_ratio([1, 2, 4], [0.6, 0.8, 0.9])
    single = identifiability.transition_ratio([1, 2], [0.9, np.nan])
    assert math.isnan(above.ratio) and "above the grid" in above.reason and above.bound == math.inf
    assert math.isnan(below.ratio) and "below the grid" in below.reason and below.bound == 0.0
    assert math.isnan(single.ratio) and "a crossing needs two" in single.reason and math.isnan(single.bound)
    assert found.bound == found.ratio


def test_curve_transition_interval_from_replicate_curves():
    ratios, aucs = np.array([1.0, 2.0, 4.0]), np.array([1.0, 0.9, 0.6])
    # Replicate curves (columns): the estimate's; one at τ exactly at r = 2 (crosses there); one
    # crossing a quarter of the way further; one that stays above τ (+inf).
    replicates = np.array([[1.0, 1.0, 1.0, 1.0], [0.9, 0.75, 0.9, 0.9], [0.6, 0.6, 0.7, 0.8]])
    row = identifiability.curve_transition(ratios, aucs, replicates, level=0.5)
    assert row["transition"] == pytest.approx(2 * math.sqrt(2))
    # Crossings sorted: 2, 2·2^½, 2·2^¾, inf; the 50% interval is the 1st and 3rd of the 4 (⌈4·¼⌉, ⌈4·¾⌉).
    assert (row["transition_low"], row["transition_high"]) == pytest.approx((2.0, 2 * 2 ** 0.75))
    assert row["replicates_crossing"] == 0.75 and row["n_points"] == 3 and row["ratio_max"] == 4.0


def test_weight_decay_groups_and_figures(tmp_path):
    def point(victim, wd, n, auc, arch="affine", method="bilevel", spec_n=None):
        spec = {"n_per_class": spec_n or n, "hidden": [], "train": {"weight_decay": wd}}
        ratio = n * 10 * 64 / 650
        return {"victim": victim, "method": method, "init": "gaussian:0.1", "arch": arch, "n_train": n * 10,
                "unknowns_per_param": ratio, "weight_decay": wd, "auc": auc, "auc_low": auc - 0.1,
                "auc_high": min(auc + 0.1, 1), "converged_fraction": 0.5, "own_ssim": auc / 2, "spec": spec,
                "replicates": np.full(20, auc)}

    points = [point("a-n1", 1e-3, 1, 1.0), point("a-n5", 1e-3, 5, 0.6), point("a-n2", 1e-3, 2, 0.9),
              point("wd-wd0.0001", 1e-4, 5, 0.7), point("wd-wd0.001", 1e-3, 5, 0.6), point("wd-wd0.01", 1e-2, 5, 0.5)]
    groups = identifiability.weight_decay_groups(points)
    assert len(groups) == 1
    (members,) = groups.values()  # wd-wd0.001 is the same victim as a-n5 and is kept once
    assert [p["victim"] for p in members] == ["wd-wd0.0001", "a-n5", "wd-wd0.01"]
    rows = identifiability.transitions(points)
    by_wd = {r["weight_decay"]: r for r in rows}
    assert by_wd[1e-3]["n_points"] == 3 and by_wd[1e-3]["transition"] == pytest.approx(
        math.exp(math.log(1280 / 650) + (0.9 - 0.75) / 0.3 * math.log(5 / 2)))
    assert by_wd[1e-4]["n_points"] == 1 and math.isnan(by_wd[1e-4]["transition"])
    # The crossing in images: N = (N·D/P)·P/D, here P/D = 650/64, the same interpolation in log N.
    assert by_wd[1e-3]["transition_n_train"] == pytest.approx(by_wd[1e-3]["transition"] * 650 / 64)
    assert by_wd[1e-3]["transition_n_train"] == pytest.approx(math.exp(math.log(20) + (0.9 - 0.75) / 0.3 * math.log(5 / 2)))
    assert by_wd[1e-3]["transition_n_train_low"] <= by_wd[1e-3]["transition_n_train"] <= by_wd[1e-3]["transition_n_train_high"]
    written = identifiability._figures(points, tmp_path, 0.75, 0.95)
    assert set(written) == {"auc_vs_unknowns_gaussian=0.1.png", "converged_vs_unknowns_gaussian=0.1.png",
                            "own_ssim_vs_unknowns_gaussian=0.1.png", "weight_decay_gaussian=0.1.png",
                            "auc_vs_n_train_gaussian=0.1.png"}
    assert all((tmp_path / name).stat().st_size > 1000 for name in written)


# ---- end to end: a sweep study on digits, summary.csv columns, `recon-jax identifiability`

TINY_SWEEP = {
    "name": "tiny-sweep",
    "n_inits": 2,
    "seeds": [0],
    "inits": ["gaussian:0.1"],
    "figures": False,
    "data": {"dataset": "digits", "weight_decay": 1e-2},
    "victims": {"affine": {"model": "affine", "sweep": {"n_per_class": [1, 2]}}},
    "methods": {"bilevel": {"method": "bilevel", "steps": 5, "learning_rate": 0.02, "segment": 5}},
}


def test_sweep_study_columns_and_identifiability_cli(tmp_path, capsys):
    config = studyconfig.config_from_dict(TINY_SWEEP)
    out = tmp_path / "s"
    results = study.run_study(config, out, echo=lambda line: None)
    assert [r["victim"] for r in results] == ["affine-n1", "affine-n2"]
    rows = _rows(out / "summary.csv")
    columns = list(rows[0])
    assert columns[:len(study.ID_COLUMNS)] == list(study.ID_COLUMNS)
    for name in ("n_train", "n_params", "unknowns_per_param", "arch", "weight_decay", "n_per_class", "final_loss",
                 "converged_fraction", "method", "init", "membership_auc_distance", "own_ssim",
                 "train_above_heldout_count"):
        assert name in columns
    assert columns[-10:] == list(study.METRIC_COLUMNS[-10:])  # the new columns come last
    # Hand count: 8×8×1 digits, 10 classes, affine: P = 64·10 + 10 = 650; N = 10 · n_per_class.
    for row, n in zip(rows, (1, 2)):
        assert int(row["n_train"]) == 10 * n and int(row["n_pixels"]) == 64 and int(row["n_params"]) == 650
        assert float(row["unknowns_per_param"]) == pytest.approx(10 * n * 64 / 650, rel=1e-15)
        assert row["arch"] == "affine" and float(row["weight_decay"]) == 1e-2 and int(row["n_per_class"]) == n
        assert row["final_loss"] == row["final_loss_median"]
        run = json.loads((out / "cells" / row["cell"] / "run" / "run.json").read_text())
        losses = np.asarray(run["final_outer_loss"])
        assert float(row["converged_fraction"]) == np.mean(~np.asarray(run["diverged"]) & (losses <= 1e-6))
        assert row["converged_criterion"] == "outer_loss <= 1e-06"

    assert cli.main(["identifiability", "--study", str(out), "--resamples", "100"]) == 0
    printed = capsys.readouterr().out
    assert "2 points; wrote" in printed and "bilevel affine gaussian:0.1" in printed
    table = _rows(out / "identifiability" / "identifiability.csv")
    assert list(table[0]) == list(identifiability.POINT_COLUMNS)
    assert [r["victim"] for r in table] == ["affine-n1", "affine-n2"]
    for point, row in zip(table, rows):
        assert float(point["auc"]) == float(row["membership_auc_distance"])  # the evaluation's AUC, exactly
        assert float(point["auc_low"]) <= float(point["auc_high"]) and point["resamples"] == "100"
        assert point["unknowns_per_param"] == row["unknowns_per_param"] and int(point["n_runs"]) == 2
    transitions = _rows(out / "identifiability" / "transitions.csv")
    assert list(transitions[0]) == list(identifiability.TRANSITION_COLUMNS)
    assert len(transitions) == 1 and transitions[0]["n_points"] == "2"
    figures = {p.name for p in (out / "identifiability" / "figures").iterdir()}
    assert {"auc_vs_unknowns_gaussian=0.1.png", "converged_vs_unknowns_gaussian=0.1.png",
            "own_ssim_vs_unknowns_gaussian=0.1.png"} <= figures
    assert "](figures/auc_vs_unknowns_gaussian=0.1.png)" in (out / "identifiability" / "identifiability.md").read_text()
    # A study folder without results.json is refused with the fix.
    assert cli.main(["identifiability", "--study", str(tmp_path / "missing")]) == 2
    assert "run `recon-jax study` to the end first" in capsys.readouterr().err


def test_identifiability_pools_studies_of_one_dataset(tmp_path, capsys):
    """Two studies' points on one curve: a victim trained with the same spec in both is counted once
    (the first study's), the transition is read across them, and the pooled map needs --out;
    studies of different datasets, or one named twice, are refused before any work."""
    first, second = tmp_path / "a", tmp_path / "b"
    study.run_study(studyconfig.config_from_dict(TINY_SWEEP), first, echo=lambda line: None)
    raw = json.loads(json.dumps(TINY_SWEEP))
    raw["name"] = "tiny-sweep-larger"
    raw["victims"]["affine"]["sweep"]["n_per_class"] = [2, 4]
    study.run_study(studyconfig.config_from_dict(raw), second, echo=lambda line: None)

    out = tmp_path / "pooled"
    assert cli.main(["identifiability", "--study", str(first), "--study", str(second), "--out", str(out),
                     "--resamples", "50", "--no-figures"]) == 0
    assert "4 points; wrote" in capsys.readouterr().out
    table = _rows(out / "identifiability.csv")
    assert [(r["study"], r["victim"]) for r in table] == [("a", "affine-n1"), ("a", "affine-n2"), ("b", "affine-n2"),
                                                          ("b", "affine-n4")]
    alone = _rows(first / "summary.csv")
    assert [float(r["auc"]) for r in table[:2]] == [float(r["membership_auc_distance"]) for r in alone]
    (curve,) = _rows(out / "transitions.csv")
    assert curve["n_points"] == "3"  # n1, n2 (once), n4
    assert float(curve["ratio_min"]) == pytest.approx(10 * 64 / 650) and float(curve["ratio_max"]) == pytest.approx(
        40 * 64 / 650)
    assert "`a` + `b`" in (out / "identifiability.md").read_text()

    assert cli.main(["identifiability", "--study", str(first), "--study", str(second)]) == 2
    assert "give the output folder (--out DIR)" in capsys.readouterr().err
    assert cli.main(["identifiability", "--study", str(first), "--study", str(first), "--out", str(out)]) == 2
    assert "is given twice" in capsys.readouterr().err
    meta_path = second / "victims" / "affine-n4" / "victim.json"
    meta = json.loads(meta_path.read_text())
    meta["spec"]["dataset"] = "mnist"
    meta_path.write_text(json.dumps(meta))
    assert cli.main(["identifiability", "--study", str(first), "--study", str(second), "--out", str(out)]) == 2
    assert "different datasets" in capsys.readouterr().err
