"""The swap test (recon_jax.swap): pairs, the deltas against a brute-force loop with a closed-form
objective, batching, and the identifiability map's swap columns on a tiny study."""

from __future__ import annotations

import csv

import jax.numpy as jnp
import numpy as np
import pytest

from recon_jax import cli, swap
from recon_jax.errors import ConfigError


def _objective(target):
    """A closed-form set objective f(x) = ‖Σ_j x_j − T‖² (x (m, h, w, c), T (h, w, c))."""
    return lambda x: jnp.sum((jnp.sum(x, axis=0) - target) ** 2)


def test_pairs_cover_the_slots_of_each_candidates_class():
    cand, slot = swap.swap_pairs([0, 1, 0, 2], [2, 0, 0])
    assert cand.tolist() == [0, 1, 1, 2, 2] and slot.tolist() == [3, 0, 2, 0, 2]
    with pytest.raises(ConfigError, match=r"classes \[5\] have no reconstruction slot"):
        swap.swap_pairs([0, 1], [0, 5])


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_deltas_equal_a_brute_force_loop(batch_size):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 3, 1))
    slots = np.array([0, 1, 0, 1])
    candidates = rng.normal(size=(5, 3, 3, 1))
    labels = np.array([1, 0, 0, 1, 1])
    target = x.sum(axis=0) + 0.1
    f = _objective(target)
    result = swap.swap_deltas(f, x, slots, candidates, labels, batch_size=batch_size)
    f0 = float(np.sum((x.sum(axis=0) - target) ** 2))
    assert result.f_reconstruction == pytest.approx(f0, rel=1e-12)
    for i, label in enumerate(labels):
        values = {}
        for j in np.flatnonzero(slots == label):
            swapped = x.copy()
            swapped[j] = candidates[i]
            values[j] = float(np.sum((swapped.sum(axis=0) - target) ** 2))
        best = min(values, key=values.get)
        assert result.deltas[i] == pytest.approx(values[best] - f0, rel=1e-10, abs=1e-12)
        assert result.best_slot[i] == best
    assert result.evaluations == 1 + sum(int((slots == y).sum()) for y in labels)


def test_a_member_swapped_in_scores_above_a_stranger():
    """Slot 0 holds a perturbed copy of image a; f is minimised by the set (a, b). Swapping a in
    lowers f (Δ < 0); a stranger raises it: AUC_swap = 1, and 0 with the roles exchanged."""
    a, b = np.ones((1, 2, 2, 1)), -np.ones((1, 2, 2, 1))
    x = np.concatenate([a + 0.3, b])
    f = _objective((a + b)[0])
    result = swap.swap_deltas(f, x, [0, 0], np.concatenate([a, 3 * a]), [0, 0])
    assert result.deltas[0] < 0 < result.deltas[1]
    assert swap.swap_auc(result.deltas[:1], result.deltas[1:]) == 1.0
    assert swap.swap_auc(result.deltas[1:], result.deltas[:1]) == 0.0
    low, high = swap.swap_interval(result.deltas[:1], result.deltas[1:], n_resamples=20)
    assert low == high == 1.0


def test_bad_input_is_refused():
    f = _objective(np.zeros((2, 2, 1)))
    with pytest.raises(ConfigError, match="same image shape"):
        swap.swap_deltas(f, np.zeros((2, 2, 2, 1)), [0, 0], np.zeros((1, 3, 3, 1)), [0])
    with pytest.raises(ConfigError, match="one label per"):
        swap.swap_deltas(f, np.zeros((2, 2, 2, 1)), [0], np.zeros((1, 2, 2, 1)), [0])


TINY = {
    "name": "swap", "n_inits": 2, "inits": ["gaussian:0.1"],
    "data": {"dataset": "digits", "n_per_class": 1, "weight_decay": 1e-2},
    "victims": {"affine": {"model": "affine"}},
    "methods": {"bilevel": {"method": "bilevel", "steps": 5}, "kkt": {"method": "kkt", "steps": 10}},
}


def test_identifiability_swap_columns_and_cache(tmp_path, capsys, monkeypatch):
    from recon_jax import study, studyconfig

    out = tmp_path / "s"
    study.run_study(studyconfig.config_from_dict(TINY), out, echo=lambda line: None)
    assert cli.main(["identifiability", "--study", str(out), "--resamples", "50", "--swap", "--swap-batch", "16"]) == 0
    with open(out / "identifiability" / "identifiability.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["bilevel", "kkt"]
    for row in rows:
        auc = float(row["auc_swap"])
        assert 0.0 <= float(row["auc_swap_low"]) <= auc <= float(row["auc_swap_high"]) <= 1.0
        assert (out / "cells" / row["swap_cell"] / "swap.npz").is_file() and row["swap_nonfinite"] == "0"
    assert (out / "identifiability" / "figures" / "swap_vs_distance_gaussian=0.1.png").is_file()
    # A rerun reuses the cached deltas: the objective is never evaluated again.
    monkeypatch.setattr(swap, "swap_deltas", lambda *a, **k: pytest.fail("recomputed a cached cell"))
    assert cli.main(["identifiability", "--study", str(out), "--resamples", "50", "--swap", "--swap-batch", "16"]) == 0
    with open(out / "identifiability" / "identifiability.csv") as f:
        assert [r["auc_swap"] for r in csv.DictReader(f)] == [r["auc_swap"] for r in rows]
