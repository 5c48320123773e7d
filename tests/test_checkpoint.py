"""Victim folders: roundtrip, separation of ground truth, mismatches and corruption."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from recon_jax import checkpoint
from recon_jax.artifacts import atomic_write_bytes
from recon_jax.errors import CheckpointError
from recon_jax.models import MLP, init_params
from recon_jax.victim import VictimSpec, train_and_save
from recon_jax.training import TrainConfig


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("victim")
    train_and_save(VictimSpec(n_per_class=3, hidden=(16,), train=TrainConfig()), out)
    return out


def test_folder_contents_and_metadata(victim_dir):
    assert sorted(p.name for p in victim_dir.iterdir()) == ["data.npz", "preprocessing.npz", "victim.json",
                                                             "victim.msgpack"]
    meta = json.loads((victim_dir / "victim.json").read_text())
    for key in ("grad_norm", "grad_norm_rel", "loss", "train_accuracy", "heldout_accuracy", "n_params",
                "iterations", "stationary", "seconds", "model", "train_config", "data", "label_counts", "versions"):
        assert key in meta, key
    assert meta["stationary"] is True and meta["label_counts"] == [3] * 10
    assert meta["train_config"]["weight_decay"] == 1e-3 and meta["train_config"]["dtype"] == "float64"
    assert len(meta["data"]["train_indices"]) == 30
    with np.load(victim_dir / "data.npz", allow_pickle=False) as f:
        assert f["train_images"].shape == (30, 8, 8, 1) and f["train_images"].dtype == np.float32
        assert f["heldout_images"].shape == (30, 8, 8, 1) and f["mean"].shape == (1, 8, 8, 1)
        assert 0 <= f["train_images"].min() and f["train_images"].max() <= 1
        mean = f["mean"]
    # The input normalisation ships with the model: the attacker's view holds the same mean.
    with np.load(victim_dir / "preprocessing.npz", allow_pickle=False) as f:
        assert sorted(f.files) == ["mean"]
        np.testing.assert_array_equal(f["mean"], mean)


def test_load_victim_roundtrip_without_ground_truth(victim_dir, tmp_path):
    victim = checkpoint.load_victim(victim_dir)
    assert victim.model == MLP(n_out=10, hidden=(16,), activation="gelu")
    assert victim.n_train == 30 and list(victim.known_labels()) == sorted(list(range(10)) * 3)
    with np.load(victim_dir / "data.npz", allow_pickle=False) as f:
        np.testing.assert_array_equal(victim.input_mean, f["mean"])
    # The attacker's view never needs data.npz: a folder without it still loads.
    for name in ("victim.json", "victim.msgpack", "preprocessing.npz"):
        (tmp_path / name).write_bytes((victim_dir / name).read_bytes())
    again = checkpoint.load_victim(tmp_path)
    for a, b in zip(jax.tree_util.tree_leaves(victim.params), jax.tree_util.tree_leaves(again.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again.input_mean, victim.input_mean)
    # Folders written before the mean was released still load, without it.
    (tmp_path / "preprocessing.npz").unlink()
    assert checkpoint.load_victim(tmp_path).input_mean is None


def test_preprocessing_file_that_does_not_fit_is_refused(victim_dir, tmp_path):
    for name in ("victim.json", "victim.msgpack"):
        (tmp_path / name).write_bytes((victim_dir / name).read_bytes())
    np.savez(tmp_path / "preprocessing.npz", mean=np.zeros((1, 7, 7, 1), np.float32))
    with pytest.raises(CheckpointError, match=r"mean of shape \(1, 7, 7, 1\).*images of shape \(8, 8, 1\)"):
        checkpoint.load_victim(tmp_path)
    (tmp_path / "preprocessing.npz").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="preprocessing.npz is corrupt"):
        checkpoint.load_victim(tmp_path)


def test_mismatched_architecture_names_both_shapes(victim_dir):
    wrong = MLP(n_out=10, hidden=(32,), activation="gelu")
    with pytest.raises(CheckpointError, match=r"layer_0.*has shape \(16,\) in the checkpoint but the "
                                              r"architecture expects \(32,\)"):
        checkpoint.load_params(victim_dir / "victim.msgpack", wrong, (8, 8, 1))
    deeper = MLP(n_out=10, hidden=(16, 16))
    with pytest.raises(CheckpointError, match="missing from the checkpoint.*layer_2"):
        checkpoint.load_params(victim_dir / "victim.msgpack", deeper, (8, 8, 1))


def test_missing_and_corrupt_checkpoints(tmp_path, victim_dir):
    with pytest.raises(CheckpointError, match="not a victim folder.*recon-jax train"):
        checkpoint.load_victim(tmp_path)
    (tmp_path / "victim.json").write_text((victim_dir / "victim.json").read_text())
    (tmp_path / "victim.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable msgpack checkpoint"):
        checkpoint.load_victim(tmp_path)
    (tmp_path / "victim.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load_victim(tmp_path)


def test_non_finite_parameters_are_refused(tmp_path):
    model = MLP(n_out=2)
    params = init_params(model, jax.random.key(0), (2, 2, 1))
    params = jax.tree_util.tree_map(lambda p: p.at[0].set(jnp.nan), params)
    (tmp_path / "p.msgpack").write_bytes(serialization.to_bytes(params))
    with pytest.raises(CheckpointError, match="non-finite"):
        checkpoint.load_params(tmp_path / "p.msgpack", model, (2, 2, 1))


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_rerun_reuses_identical_victim_and_refuses_a_different_one(victim_dir):
    from recon_jax.errors import ConfigError

    saved = train_and_save(VictimSpec(n_per_class=3, hidden=(16,), train=TrainConfig()), victim_dir)
    assert isinstance(saved, dict) and saved["stationary"]
    with pytest.raises(ConfigError, match="already holds a different victim.*--overwrite"):
        train_and_save(VictimSpec(n_per_class=4, hidden=(16,)), victim_dir)
