"""The command line: the train -> reconstruct pipeline on digits, and clear errors on bad input."""

import json

import numpy as np
import pytest

from recon_jax import metrics
from recon_jax.cli import main


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "victim"
    assert main(["train", "--dataset", "digits", "--n-per-class", "2", "--model", "affine", "--loss", "ce",
                 "--weight-decay", "1e-3", "--dtype", "float64", "--seed", "0", "--out", str(out)]) == 0
    return out


def test_train_writes_a_certified_victim(victim, capsys):
    meta = json.loads((victim / "victim.json").read_text())
    assert meta["stationary"] and meta["grad_norm"] <= 1e-8 and meta["n_params"] == 64 * 10 + 10
    assert "digits" in json.dumps(meta["data"]["provenance"]["source"])
    assert meta["data"]["provenance"]["selection"]["n_per_class"] == 2 and len(meta["data"]["train_indices"]) == 20
    # Rerunning the same command reuses the folder.
    assert main(["train", "--dataset", "digits", "--n-per-class", "2", "--model", "affine", "--out", str(victim)]) == 0
    assert "wrote" in capsys.readouterr().out


def test_train_two_hidden_layers_binary_task(tmp_path):
    out = tmp_path / "binary"
    assert main(["train", "--n-per-class", "5", "--binary-positive", "1,3,5,7,9", "--hidden", "32,32",
                 "--bias", "1,0,0", "--first-layer-init-scale", "1e-2", "--loss", "logistic", "--out", str(out)]) == 0
    meta = json.loads((out / "victim.json").read_text())
    assert meta["model"]["hidden"] == [32, 32] and meta["model"]["n_out"] == 1
    assert meta["label_counts"] == [5, 5] and meta["task"] == "binary"


def test_reconstruct_writes_the_run_folder(victim, tmp_path):
    out = tmp_path / "run"
    assert main(["reconstruct", "--victim", str(victim), "--method", "bilevel", "--init", "gaussian:0.1",
                 "--n-inits", "3", "--steps", "20", "--lr", "0.01", "--seed", "0", "--out", str(out)]) == 0
    with np.load(out / "reconstructions.npz") as f:
        assert f["images"].shape == (3, 20, 8, 8, 1) and f["init_images"].shape == (3, 20, 8, 8, 1)
        assert 0 <= f["images"].min() and f["images"].max() <= 1
        # images are the candidates as the protocol scores them: mean added back, min-max scaled per image
        assert str(f["image_mapping"]) == "minmax"
        with np.load(victim / "data.npz") as data:
            mean = data["mean"]
        np.testing.assert_allclose(f["images"], metrics.to_unit(f["centered"], mean, "minmax"), atol=1e-6)
        np.testing.assert_allclose(f["init_images"], metrics.to_unit(f["init_centered"], mean, "minmax"), atol=1e-6)
    with np.load(out / "history.npz") as f:
        assert set(f.files) >= {"outer_loss", "inner_grad_norm", "inner_iterations", "cg_residual"}
        assert f["outer_loss"].shape == (3, 20)
    run = json.loads((out / "run.json").read_text())
    assert run["image_mapping"] == "minmax" and "min-max" in run["image_mapping_note"]
    assert len(run["final_outer_loss"]) == 3 and run["seconds"] > 0 and "jax" in run["versions"]
    assert run["spec"]["bilevel"]["steps"] == 20 and not (out / "chunks").exists()
    assert all(final < first for final, first in zip(run["final_outer_loss"], np.load(out / "history.npz")["outer_loss"][:, 0]))


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["train", "--dataset", "idx:/nonexistent/folder"], "/nonexistent/folder"),
    (["train", "--weight-decay", "-1"], "weight decay must be >= 0"),
    (["train", "--activation", "swish"], "unknown activation 'swish'"),
    (["train", "--n-per-class", "500"], "class"),
    (["train", "--loss", "logistic"], "binary task"),
    (["reconstruct", "--victim", "/nonexistent"], "not a victim folder"),
    (["sweep", "--victim", "/nonexistent", "--runs", "2", "--search-range", "lr"], "--search-range takes NAME=LO,HI"),
    (["sweep", "--victim", "/nonexistent", "--runs", "2", "--search-range", "beta=1,2"], "unknown bilevel search range"),
    (["sweep", "--victim", "/nonexistent", "--runs", "2", "--search-range", "lr=0,1"],
     "search range lr is log-uniform and needs lo > 0"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path, capsys):
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recon-jax: error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "victim.json").exists()


@pytest.mark.parametrize("init, message", [("uniform:1", "unknown --init"), ("gaussian", "needs a value"),
                                           ("interp:2", "<= 1")])
def test_bad_init_is_refused_before_work(victim, init, message, tmp_path, capsys):
    assert main(["reconstruct", "--victim", str(victim), "--init", init, "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


def test_hyperparameter_lists_become_one_vmapped_grid(victim, tmp_path):
    out = tmp_path / "grid"
    assert main(["reconstruct", "--victim", str(victim), "--n-inits", "2", "--lr", "0.01,0.05", "--tv-weight", "0",
                 "--steps", "5", "--init", "heldout", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["n_runs"] == 4 and run["run_learning_rate"] == [0.01, 0.05, 0.01, 0.05]
    assert run["run_init_index"] == [0, 0, 1, 1]
    with np.load(out / "reconstructions.npz") as f:
        assert f["images"].shape[0] == 4
        np.testing.assert_array_equal(f["init_centered"][0], f["init_centered"][1])  # same init, two lrs
        assert not np.array_equal(f["init_centered"][0], f["init_centered"][2])      # a different held-out draw
        assert not np.allclose(f["centered"][0], f["centered"][1])                   # the lr mattered


@pytest.fixture(scope="module")
def binary_relu_victim(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "binary-relu"
    with pytest.warns(UserWarning, match="NOT stationary"):  # relu + GD: reported honestly
        assert main(["train", "--n-per-class", "3", "--binary-positive", "1,3,5,7,9", "--hidden", "16,16",
                     "--bias", "1,0,0", "--activation", "relu", "--loss", "logistic", "--weight-decay", "0",
                     "--solver", "gd", "--lr", "0.5", "--maxiter", "300", "--out", str(out)]) == 0
    return out


def test_kkt_reconstruct_sweep_and_evaluate(binary_relu_victim, tmp_path):
    run = tmp_path / "kkt"
    assert main(["reconstruct", "--victim", str(binary_relu_victim), "--method", "kkt", "--init", "gaussian:1e-3",
                 "--n-inits", "2", "--steps", "30", "--alpha", "50,300", "--out", str(run)]) == 0
    summary = json.loads((run / "run.json").read_text())
    assert summary["final_loss_name"] == "kkt_loss" and summary["n_runs"] == 4
    assert summary["run_alpha"] == [50.0, 300.0, 50.0, 300.0] and summary["spec"]["kkt"]["task"] == "binary"
    with np.load(run / "reconstructions.npz") as f:
        assert f["images"].shape == (4, 12, 8, 8, 1) and list(f["labels"]) == [0] * 6 + [1] * 6  # m = 2N
    with np.load(run / "history.npz") as f:
        assert f["kkt_loss"].shape == (4, 30) and np.all(f["kkt_loss"][:, -1] < f["kkt_loss"][:, 0])

    sweep = tmp_path / "sweep"
    assert main(["sweep", "--victim", str(binary_relu_victim), "--method", "kkt", "--runs", "3", "--seeds", "2",
                 "--steps", "10", "--pool", "2", "--search-range", "lr=1e-3,1e-2", "--search-range", "alpha=40,60",
                 "--out", str(sweep)]) == 0
    summary = json.loads((sweep / "run.json").read_text())
    assert summary["n_runs"] == 6 and len(set(summary["run_lr_x"])) == 3 and len(summary["run_init_scale"]) == 6
    assert all(1e-3 <= lr <= 1e-2 for lr in summary["run_lr_x"]) and all(40 <= a <= 60 for a in summary["run_alpha"])
    assert summary["spec"]["search_ranges"] == {"lr": [1e-3, 1e-2], "alpha": [40.0, 60.0]}
    losses = np.asarray(summary["final_outer_loss"])
    assert list(losses[summary["ranking"]]) == sorted(losses)
    with np.load(sweep / "pooled.npz") as f:
        assert f["images"].shape == (24, 8, 8, 1) and list(np.unique(f["runs"])) == sorted(summary["ranking"][:2])

    assert main(["evaluate", "--run", str(sweep), "--plain-l2", "--pool-by-score", "2"]) == 0
    evaluation = json.loads((sweep / "evaluation.json").read_text())
    assert evaluation["n_reconstructions"] == 72 and evaluation["n_train"] == evaluation["n_heldout"] == 6
    assert 0 <= evaluation["membership_auc_distance"] <= 1 and len(evaluation["per_run_train_good_count"]) == 6
    # The reference's extraction score ranks the runs (lower is better) and pools the best two.
    scores = np.asarray(evaluation["per_run_extraction_score"])
    assert evaluation["evaluated_runs"] == list(range(6)) and np.all((0 <= scores) & (scores <= 1))
    assert list(scores[evaluation["score_ranking"]]) == sorted(scores)
    assert evaluation["pooled_by_score"]["runs"] == evaluation["score_ranking"][:2]
    assert evaluation["pooled_by_score"]["n_reconstructions"] == 24
    with np.load(sweep / "pooled_by_score.npz") as f:
        assert f["centered"].shape == (24, 8, 8, 1) and sorted(set(f["runs"])) == sorted(evaluation["score_ranking"][:2])
