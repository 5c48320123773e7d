"""benchmarks/engines.py end to end on the embedded digits: both engines' studies, the side-by-side
table and its JSON (tiny budgets; the script's numbers are measured in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
name = "engines-tiny"
n_inits = 2
seeds = [0]
inits = ["gaussian:0.1"]
figures = false

[data]
dataset = "digits"
n_per_class = 1
classes = [0, 1, 2]
weight_decay = 1e-2

[victims.mlp]
hidden = [4]
activation = "gelu"

[methods.bilevel]
method = "bilevel"
steps = 4
learning_rate = 0.02
segment = 4

[methods.bilevel.bilevel]
refresh_every = 2

[methods.kkt]
method = "kkt"
steps = 10
"""


def _script():
    spec = importlib.util.spec_from_file_location("engines_benchmark", ROOT / "benchmarks" / "engines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engines_benchmark_runs_both_engines_side_by_side(tmp_path, capsys):
    engines = _script()
    config = tmp_path / "tiny.toml"
    config.write_text(CONFIG)
    out, report = tmp_path / "out", tmp_path / "engines.json"
    assert engines.main(["--config", str(config), "--out", str(out), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "| mlp__bilevel__gaussian=0.1__s0 |" in printed and "largest |dAUC|" in printed
    result = json.loads(report.read_text())
    (row,) = result["rows"]  # the kkt method is left out: only bilevel cells are compared
    assert result["verdict"] in ("AGREE", "DIFFER")
    for engine in engines.ENGINES:
        run = json.loads((out / engine / "cells" / row["cell"] / "run" / "run.json").read_text())
        assert run["engine"] == engine
        assert 0.0 <= row[f"membership_auc_distance_{engine}"] <= 1.0
    # The refresh at step 2 is the one after step 0; its correction is a finite relative distance.
    assert np.isfinite(row["largest_refresh_correction"]) and row["largest_refresh_correction"] >= 0
    # A rerun reuses every cell of both studies.
    assert engines.main(["--config", str(config), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("done earlier, reused") == 2
    with pytest.raises(SystemExit, match="not a bilevel method"):
        engines.main(["--config", str(config), "--out", str(out), "--methods", "kkt"])


def test_engines_benchmark_missing_figures_are_nan():
    """A figure a cell lacks (every run diverged: AUC None) becomes NaN rather than a crash."""
    engines = _script()
    assert np.isnan(engines._number(None)) and engines._number(3) == 3.0
