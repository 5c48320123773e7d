"""Evaluation metrics: hand-checked values, kornia/torch reference values, real digits.

Reference values marked "kornia 0.6.8" were computed once, outside this repository, with
kornia 0.6.8 (the version Haim et al. pin) on torch 1.13 in float64, on the inputs built
here by formula. kornia builds its Gaussian window in float32, which moves SSIM by ~1e-7;
with that window rebuilt in float64 kornia's code gives our value to 1e-16.
"""

import math
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from recon_jax import metrics
from recon_jax.errors import ConfigError, DataError
from recon_jax.evaluation import evaluate_reconstructions

C1, C2, EPS = 1e-4, 9e-4, 1e-12  # (0.01 L)², (0.03 L)², kornia's eps; L = 1


# --- SSIM ---------------------------------------------------------------------------------


def test_gaussian_window_is_kornias():
    e = math.exp(-1 / 4.5)  # exp(−1²/(2·1.5²))
    np.testing.assert_allclose(metrics.gaussian_window(3), [e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e)], rtol=1e-15)
    np.testing.assert_allclose(metrics.gaussian_window(3), [0.30780, 0.38440, 0.30780], atol=1e-5)
    with pytest.raises(ConfigError):
        metrics.gaussian_window(4)


def test_ssim_identical_images_is_one():
    rng = np.random.default_rng(0)
    a = rng.random((3, 6, 7, 3))
    np.testing.assert_allclose(metrics.ssim(a, a), 1.0, atol=1e-7)
    np.testing.assert_allclose(metrics.dssim(a, a), 0.0, atol=1e-7)
    # Per pixel, SSIM(a, a) = den/(den + ε). Where a is locally flat and black, den = C1·C2 =
    # 9e-8, so kornia's ε = 1e-12 leaves 1 − 1.1e-5 there: "≈ 1" means within 1e-4 below.
    black = np.zeros((1, 4, 4, 1))
    np.testing.assert_allclose(metrics.ssim(black, black), [C1 * C2 / (C1 * C2 + EPS)], rtol=1e-12)


@pytest.mark.parametrize("mu_a, mu_b", [(0.2, 0.7), (0.5, 0.5), (0.0, 1.0)])
def test_ssim_constant_images_closed_form(mu_a, mu_b):
    # Variances and covariance vanish, so SSIM = (2μaμb + C1)·C2 / ((μa² + μb² + C1)·C2 + ε).
    a, b = np.full((1, 4, 5, 2), mu_a), np.full((1, 4, 5, 2), mu_b)
    expected = (2 * mu_a * mu_b + C1) * C2 / ((mu_a**2 + mu_b**2 + C1) * C2 + EPS)
    np.testing.assert_allclose(metrics.ssim(a, b), [expected], rtol=1e-8)


def test_ssim_3x3_by_hand():
    # a: a single 1 in the centre of a 3x3 image. With reflect padding (row −1 -> row 1,
    # row 3 -> row 1) the centre pixel's weight in the window of row p is
    #   p = 0: taps g0 (row −1 = row 1) + g2 (row 1) = 2·g0;  p = 1: g1;  p = 2: 2·g0,
    # so w = (2g0, g1, 2g0) and at pixel (i, j) the local mean is m = w_i·w_j.
    # Since a² = a, G∗a² = m too, so σa² = m − m² =: v.
    g0, g1, _ = metrics.gaussian_window(3)
    w = [2 * g0, g1, 2 * g0]
    m = np.array([[w[i] * w[j] for j in range(3)] for i in range(3)])
    v = m - m**2
    # g0 = e/(1 + 2e) = 0.800737/2.601475 = 0.307801, g1 = 1/2.601475 = 0.384397;
    # corner m = 0.615603² = 0.378967, edge m = 0.615603·0.384397 = 0.236636, centre m = 0.147761
    np.testing.assert_allclose(m[0, 0], 0.378967, atol=1e-6)
    np.testing.assert_allclose(m[0, 1], 0.236636, atol=1e-6)
    np.testing.assert_allclose(m[1, 1], 0.147761, atol=1e-6)
    a = np.zeros((3, 3, 1))
    a[1, 1, 0] = 1.0

    # b = 0: μb = σb² = σab = 0, so SSIM(i,j) = C1·C2 / ((m² + C1)(v + C2) + ε), tiny.
    by_hand = np.mean(C1 * C2 / ((m**2 + C1) * (v + C2) + EPS))
    np.testing.assert_allclose(metrics.ssim(a, np.zeros_like(a)), by_hand, rtol=1e-9)
    assert by_hand < 1e-4

    # b = a/2: μb = m/2, G∗b² = m/4, G∗ab = m/2, so σb² = v/4 and σab = v/2:
    #   SSIM(i,j) = (m² + C1)(v + C2) / ((1.25·m² + C1)(1.25·v + C2) + ε) ≈ 1/1.25² = 0.64.
    by_hand = np.mean((m**2 + C1) * (v + C2) / ((1.25 * m**2 + C1) * (1.25 * v + C2) + EPS))
    np.testing.assert_allclose(metrics.ssim(a, a / 2), by_hand, rtol=1e-9)
    np.testing.assert_allclose(by_hand, 0.64, atol=2e-3)


def _formula_pair():
    i, j, c = np.meshgrid(np.arange(5), np.arange(6), np.arange(2), indexing="ij")
    return (0.5 + 0.4 * np.sin(i + 2 * j + c))[None], (0.5 + 0.4 * np.cos(2 * i - j + 3 * c))[None]


def test_ssim_matches_kornia_reference_values():
    a, b = _formula_pair()  # (1, 5, 6, 2): two channels, non-square, every pixel on a border
    ours = float(metrics.ssim(a, b)[0])
    # kornia 0.6.8 with its Gaussian window rebuilt in float64: identical computation.
    np.testing.assert_allclose(ours, 0.0058249140714866565, rtol=1e-10)
    # stock kornia 0.6.8 (float32 window), float64 images.
    np.testing.assert_allclose(ours, 0.005824659230600043, atol=1e-6)


def test_ssim_broadcasts_and_matrix_matches_pairs():
    rng = np.random.default_rng(1)
    queries, references = rng.random((4, 6, 5, 3)), rng.random((3, 6, 5, 3))
    pairwise = np.asarray(metrics.ssim(queries[:, None], references[None]))
    assert pairwise.shape == (4, 3)
    np.testing.assert_allclose(pairwise[2, 1], metrics.ssim(queries[2], references[1]), rtol=1e-12)
    # Blocks of 2 references (the last one padded) give the same matrix.
    blocked = metrics.ssim_matrix(queries, references, max_block_elements=2 * 4 * 6 * 5 * 3)
    np.testing.assert_allclose(blocked, pairwise, rtol=1e-12)
    np.testing.assert_allclose(metrics.ssim(queries, references[0]), pairwise[:, 0], rtol=1e-12)  # broadcast


# --- PSNR, MSE, unit range, parameter mismatch ---------------------------------------------


def test_psnr_and_mse_closed_forms():
    a, b = np.full((2, 4, 4, 3), 0.25), np.full((2, 4, 4, 3), 0.75)
    np.testing.assert_allclose(metrics.mse(a, b), [0.25, 0.25])
    np.testing.assert_allclose(metrics.psnr(a, b), [10 * np.log10(4)] * 2)  # 6.0206 dB
    c = a.copy()
    c[:, :2] += 0.1  # half the pixels off by 0.1: MSE = 0.01/2, PSNR = 10 log10(200)
    np.testing.assert_allclose(metrics.mse(a, c), [0.005, 0.005], rtol=1e-12)
    np.testing.assert_allclose(metrics.psnr(a, c), [10 * np.log10(200)] * 2, rtol=1e-12)
    assert np.isinf(metrics.psnr(a, a)).all()


def test_to_unit_range():
    mean = np.full((1, 2, 2, 1), 0.5)
    centered = np.array([[[[-0.5], [0.0]], [[0.25], [0.5]]]])  # + mean: 0, 0.5, 0.75, 1
    np.testing.assert_allclose(metrics.to_unit_range(centered, mean)[0, :, :, 0], [[0, 0.5], [0.75, 1]])
    scaled = metrics.to_unit_range(3 * centered + 1, None)  # min-max undoes an affine map
    np.testing.assert_allclose(scaled, metrics.to_unit_range(centered, mean), atol=1e-15)
    runs = np.random.default_rng(2).normal(size=(3, 4, 5, 5, 2))  # (K, n, h, w, c)
    unit = np.asarray(metrics.to_unit_range(runs, np.zeros((1, 5, 5, 2))))
    assert unit.shape == runs.shape
    np.testing.assert_allclose(unit.min(axis=(2, 3, 4)), 0.0)
    np.testing.assert_allclose(unit.max(axis=(2, 3, 4)), 1.0)
    np.testing.assert_array_equal(metrics.to_unit_range(np.ones((1, 2, 2, 1)), None), 0.0)  # constant: no 0/0


def test_to_unit_both_mappings_by_hand():
    mean = np.full((1, 2, 2, 1), 0.25)
    centered = np.array([[[[-0.5], [0.0]], [[0.25], [0.75]]],  # + mean: -0.25, 0.25, 0.5, 1 (leaves [0, 1])
                         [[[-0.05], [0.15]], [[0.35], [0.55]]]])  # + mean: 0.2, 0.4, 0.6, 0.8 (inside [0, 1])
    clip = np.asarray(metrics.to_unit(centered, mean, "clip"))
    np.testing.assert_allclose(clip[..., 0], [[[0, 0.25], [0.5, 1]], [[0.2, 0.4], [0.6, 0.8]]], atol=1e-15)
    minmax = np.asarray(metrics.to_unit(centered, mean, "minmax"))  # (v - min) / (max - min) per image
    np.testing.assert_allclose(minmax[..., 0], [[[0, 0.4], [0.6, 1]], [[0, 1 / 3], [2 / 3, 1]]], atol=1e-15)
    assert metrics.PROTOCOL_MAPPING == "minmax" and set(metrics.IMAGE_MAPPINGS) == {"minmax", "clip"}
    np.testing.assert_array_equal(metrics.to_unit_range(centered, mean), minmax)
    with pytest.raises(ConfigError, match="unknown image mapping 'unit'; choose one of minmax, clip"):
        metrics.to_unit(centered, mean, "unit")
    # reconstruct.to_unit (reconstructions.npz's images) is the same function, in float32.
    from recon_jax import reconstruct

    images, note = reconstruct.to_unit(centered, {"mean": mean})
    assert images.dtype == np.float32 and reconstruct.IMAGE_MAPPING == "minmax" and "min-max" in note
    np.testing.assert_allclose(images, minmax, atol=1e-7)
    np.testing.assert_allclose(reconstruct.to_unit(centered, {"mean": mean}, "clip")[0], clip, atol=1e-7)
    with pytest.raises(ConfigError, match="needs the training mean"):
        reconstruct.to_unit(centered, None, "clip")


def test_parameter_mismatch():
    victim = {"w": jnp.array([[1.0, 2.0], [2.0, 0.0]]), "b": jnp.array([1.0, 0.0])}  # ‖θ*‖² = 10
    params = {"w": victim["w"].at[0, 0].add(1.0), "b": victim["b"].at[1].add(2.0)}  # ‖θ − θ*‖² = 1 + 4
    np.testing.assert_allclose(metrics.parameter_mismatch(params, victim), 0.5)
    assert float(metrics.parameter_mismatch(victim, victim)) == 0.0


def test_parameter_mismatch_is_the_bilevel_outer_loss():
    # metrics computes it without importing the attack; the two must stay the same quantity.
    from recon_jax import bilevel

    rng = np.random.default_rng(3)
    victim = {"w": jnp.asarray(rng.standard_normal((5, 3))), "b": jnp.asarray(rng.standard_normal(3))}
    params = {"w": jnp.asarray(rng.standard_normal((5, 3))), "b": jnp.asarray(rng.standard_normal(3))}
    assert float(metrics.parameter_mismatch(params, victim)) == float(bilevel.parameter_loss("l2", params, victim))


def test_importing_metrics_and_data_leaves_out_the_attacks():
    code = ("import sys, recon_jax.metrics, recon_jax.data; "
            "loaded = {'recon_jax.bilevel', 'recon_jax.solvers', 'jaxopt'} & set(sys.modules); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- NCC and matching -----------------------------------------------------------------------


def test_bicubic_half_matches_torch_by_hand():
    # x[i, j] = i + 10 j on 6x4. Each output pixel takes taps (−0.09375, 0.59375, 0.59375,
    # −0.09375) on rows 2i−1..2i+2, clamped. Rows: i'=0: 0·(−0.09375+0.59375) + 1·0.59375
    # − 2·0.09375 = 0.40625; i'=1: −0.09375 + 1.1875 + 1.78125 − 0.375 = 2.5;
    # i'=2: −0.28125 + 2.375 + 2.96875 − 0.46875 (row 6 -> 5) = 4.59375. Columns (of 4):
    # j'=0: 0.40625; j'=1: −0.09375 + 1.1875 + 1.78125 − 0.28125 (col 4 -> 3) = 2.59375.
    i, j = np.meshgrid(np.arange(6.0), np.arange(4.0), indexing="ij")
    out = metrics.downsample_half_bicubic((i + 10 * j)[None, :, :, None])[0, :, :, 0]
    by_hand = np.array([0.40625, 2.5, 4.59375])[:, None] + 10 * np.array([0.40625, 2.59375])[None, :]
    np.testing.assert_allclose(out, by_hand, rtol=1e-15)
    # torch.nn.functional.interpolate(x, scale_factor=0.5, mode='bicubic') on the same input:
    np.testing.assert_allclose(out, [[4.46875, 26.34375], [6.5625, 28.4375], [8.65625, 30.53125]], rtol=1e-15)


def test_ncc_reference_is_its_own_nearest_neighbour():
    rng = np.random.default_rng(3)
    references = rng.random((6, 8, 8, 3))
    queries = references[[4, 1, 5]] + 0.01 * rng.normal(size=(3, 8, 8, 3))
    for downsample in (True, False):
        d = metrics.ncc_distances(queries, references, downsample=downsample)
        assert d.shape == (3, 6)
        np.testing.assert_array_equal(np.argmin(d, axis=1), [4, 1, 5])
        assert np.all(np.diag(metrics.ncc_distances(references, references, downsample=downsample)) == 0.0)


def test_ncc_invariant_to_per_channel_affine_intensity():
    rng = np.random.default_rng(4)
    queries, references = rng.random((3, 8, 6, 3)), rng.random((4, 8, 6, 3))
    scale, shift = np.array([0.5, 2.0, 7.0]), np.array([-1.0, 0.3, 10.0])
    for downsample in (True, False):
        d = metrics.ncc_distances(queries, references, downsample=downsample)
        np.testing.assert_allclose(metrics.ncc_distances(scale * queries + shift, references, downsample=downsample), d, atol=1e-12)
        # Plain L2 is not invariant.
        assert not np.allclose(metrics.ncc_distances(scale * queries + shift, references, downsample, standardise=False),
                               metrics.ncc_distances(queries, references, downsample, standardise=False))


def test_ncc_values():
    # Standardised, d = 2(1 − ρ̄): ρ = 1 -> 0, ρ = −1 -> 4, uncorrelated (ρ = 0) -> 2.
    x = np.array([1.0, -1.0, 1.0, -1.0]).reshape(1, 2, 2, 1)
    y = np.array([1.0, 1.0, -1.0, -1.0]).reshape(1, 2, 2, 1)
    d = metrics.ncc_distances(np.concatenate([x, -x, y]), x, downsample=False)
    np.testing.assert_allclose(d[:, 0], [0.0, 4.0, 2.0], atol=1e-15)
    # Plain L2 per value: mean((x − 0)²) = 1, mean((x − (−x))²) = 4.
    np.testing.assert_allclose(metrics.ncc_distances(np.concatenate([0 * x, -x]), x, False, False)[:, 0], [1.0, 4.0])


def test_nearest_both_ways():
    d = np.array([[3.0, 0.5, 9.0], [1.0, 2.0, 0.1]])  # 2 queries x 3 references
    nn = metrics.nearest(d)
    np.testing.assert_array_equal(nn.query_of_reference, [1, 0, 1])
    np.testing.assert_allclose(nn.reference_distance, [1.0, 0.5, 0.1])
    np.testing.assert_array_equal(nn.reference_of_query, [1, 2])
    np.testing.assert_allclose(nn.query_distance, [0.5, 0.1])


def test_hungarian_beats_greedy_by_hand():
    # Greedy takes the smallest entry (0,0) = 1 and is then forced into (1,1) = 100: total 101.
    # The optimum pairs (0,1) and (1,0): 2 + 2 = 4.
    d = np.array([[1.0, 2.0], [2.0, 100.0]])
    greedy, optimal = metrics.match_greedy(d), metrics.match_hungarian(d)
    np.testing.assert_array_equal(greedy.query_index, [0, 1])
    np.testing.assert_array_equal(greedy.reference_index, [0, 1])
    assert greedy.total == 101.0
    np.testing.assert_array_equal(optimal.query_index, [1, 0])  # ordered by reference
    np.testing.assert_array_equal(optimal.reference_index, [0, 1])
    assert optimal.total == 4.0


def test_matching_is_one_to_one_on_rectangles():
    d = np.random.default_rng(5).random((7, 4))  # more queries than references
    for matching in (metrics.match_greedy(d), metrics.match_hungarian(d)):
        np.testing.assert_array_equal(matching.reference_index, np.arange(4))
        assert len(set(matching.query_index.tolist())) == 4
    assert metrics.match_hungarian(d).total <= metrics.match_greedy(d).total
    assert len(metrics.match_greedy(d.T).query_index) == 4


# --- Membership -----------------------------------------------------------------------------


def test_membership_auc_hand_values():
    assert metrics.membership_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert metrics.membership_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert metrics.membership_auc([1.0, 2.0, 5.0], [5.0, 1.0, 2.0]) == 0.5  # identical sets
    # train [3, 1] vs held [2, 0]: pairs (3>2, 3>0, 1<2, 1>0) -> 3/4.
    assert metrics.membership_auc([3.0, 1.0], [2.0, 0.0]) == 0.75
    # Ties count ½: train [1] vs held [1, 0] -> (½ + 1)/2.
    assert metrics.membership_auc([1.0], [1.0, 0.0]) == 0.75
    assert metrics.membership_auc([7.0, 7.0], [7.0]) == 0.5


def test_membership_auc_swap_sums_to_one():
    rng = np.random.default_rng(6)
    train, held = rng.integers(0, 5, 11).astype(float), rng.integers(0, 5, 8).astype(float)  # many ties
    assert metrics.membership_auc(train, held) + metrics.membership_auc(held, train) == 1.0
    brute = np.mean([(t > h) + 0.5 * (t == h) for t in train for h in held])
    assert metrics.membership_auc(train, held) == pytest.approx(brute, abs=1e-15)
    with pytest.raises(DataError):
        metrics.membership_auc([np.nan], [1.0])


def test_nearest_is_train_rate():
    rng = np.random.default_rng(7)
    train, held = rng.random((5, 8, 8, 1)), rng.random((3, 8, 8, 1))
    mean = train.mean(axis=0, keepdims=True)
    on_train = metrics.nearest_is_train_rate(train - mean, train, held, mean)
    assert on_train.rate == 1.0 and on_train.chance == 5 / 8
    assert metrics.nearest_is_train_rate(held - mean, train, held, mean).rate == 0.0
    assert metrics.nearest_is_train_rate(held, train, held).rate == 0.0  # no mean: compared as given
    # An image in both pools is an exact tie: it counts ½.
    both = metrics.nearest_is_train_rate(train[:1], train, np.concatenate([held, train[:1]]))
    assert both.rate == 0.5


# --- Full evaluation on real digits -------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    images = load_digits().images / 16.0
    images = images[images.reshape(len(images), -1).max(axis=1) == 1.0]  # span exactly [0, 1]
    images = images[:, :, :, None]
    train, held = images[:20], images[20:40]
    return train, held, train.mean(axis=0, keepdims=True)


def test_evaluate_perfect_train_reconstructions(digits):
    train, held, mean = digits
    result = evaluate_reconstructions(train - mean, train, held, mean)
    np.testing.assert_array_equal(result["train_nearest_reconstruction"], np.arange(20))
    np.testing.assert_array_equal(result["train_nearest_distance"], 0.0)
    np.testing.assert_allclose(result["train_ssim"], 1.0, atol=1e-4)
    np.testing.assert_allclose(result["train_dssim"], 0.0, atol=1e-4)
    assert np.all(result["train_psnr"] > 100) and np.all(result["train_mse"] < 1e-20)
    assert result["train_good_count"] == result["train_hungarian_good_count"] == 20
    np.testing.assert_array_equal(result["train_hungarian_reconstruction"], np.arange(20))
    # Held-out images are only approximated by other digits.
    assert result["heldout_mean_ssim"] < result["train_mean_ssim"] - 0.1
    assert result["heldout_good_count"] < 20
    assert np.all(result["heldout_best_ssim"] < 0.999)
    assert np.all(np.diff(result["heldout_ssim_sorted"]) <= 0)
    np.testing.assert_allclose(np.sort(result["heldout_ssim"])[::-1], result["heldout_ssim_sorted"])
    assert result["membership_auc_distance"] == 1.0
    assert result["membership_auc_best_ssim"] == 1.0
    assert result["nearest_is_train_rate"] == 1.0 and result["nearest_is_train_chance"] == 0.5
    assert result["n_reconstructions"] == 20
    # Every training image is recovered better than any held-out image is matched.
    assert result["heldout_max_ssim"] == pytest.approx(np.max(result["heldout_ssim"]))
    assert result["heldout_max_ssim"] < 0.999 and result["train_above_heldout_count"] == 20


def test_evaluate_heldout_reconstructions_is_the_mirror(digits):
    train, held, mean = digits
    result = evaluate_reconstructions(held - mean, train, held, mean)
    np.testing.assert_allclose(result["heldout_ssim"], 1.0, atol=1e-4)
    assert result["heldout_good_count"] == 20 and result["train_good_count"] < 20
    assert result["membership_auc_distance"] == 0.0
    assert result["membership_auc_best_ssim"] == 0.0
    assert result["nearest_is_train_rate"] == 0.0
    assert result["heldout_max_ssim"] == pytest.approx(1.0, abs=1e-4) and result["train_above_heldout_count"] == 0


def test_evaluate_union_of_both_pools_gives_no_evidence(digits):
    # Reconstructions reproduce BOTH pools (pooled as K = 2 runs): every image has a
    # reconstruction at distance exactly 0, so distance-based membership is exactly 0.5.
    train, held, mean = digits
    runs = np.stack([train - mean, held - mean])  # (K=2, n, h, w, c)
    result = evaluate_reconstructions(runs, train, held, mean, downsample=False, standardise=False)
    assert result["n_reconstructions"] == 40
    np.testing.assert_array_equal(result["heldout_nearest_reconstruction"], np.arange(20, 40))
    assert result["membership_auc_distance"] == 0.5
    assert result["nearest_is_train_rate"] == 0.5
    np.testing.assert_allclose(result["train_ssim"], 1.0, atol=1e-4)
    np.testing.assert_allclose(result["heldout_ssim"], 1.0, atol=1e-4)


def test_evaluate_rejects_diverged_reconstructions(digits):
    train, held, mean = digits
    runs = np.stack([train - mean, train - mean])
    runs[1, 3, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="1 of 40 reconstructions"):
        evaluate_reconstructions(runs, train, held, mean)


def test_extraction_score_is_the_mean_of_the_ten_smallest_dssims():
    from recon_jax.evaluation import extraction_score

    values = np.linspace(0.0, 0.5, 30)[::-1]
    assert extraction_score(values) == pytest.approx(np.linspace(0.0, 0.5, 30)[:10].mean())
    assert extraction_score(np.array([0.2, 0.4])) == pytest.approx(0.3)  # fewer than 10: all of them
