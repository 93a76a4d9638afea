"""Each statistic of the report on hand-made inputs with answers derived by hand."""
import math

import numpy as np
import pytest

from analysis import statistics as st


def test_t_interval_on_three_values():
    # mean 0.6, SD 0.1 (ddof 1), t(0.975, df=2) = 4.302653 -> half-width 4.302653 * 0.1 / sqrt(3) = 0.2484138
    out = st.t_interval([0.5, 0.6, 0.7], 0.95)
    assert out["mean"] == pytest.approx(0.6) and out["df"] == 2 and out["n"] == 3
    assert out["half_width"] == pytest.approx(0.2484138, abs=1e-6)
    assert out["low"] == pytest.approx(0.6 - 0.2484138, abs=1e-6)


def test_t_interval_needs_two_values():
    out = st.t_interval([0.4], 0.95)
    assert out["mean"] == 0.4 and math.isnan(out["half_width"])


def test_binomial_se_and_order_spread():
    assert st.binomial_se(0.5, 100) == pytest.approx(0.05)
    spread = st.order_spread([0.5, 0.6, 0.7], [100, 100, 100])
    # within: mean of sqrt(.25/100), sqrt(.24/100), sqrt(.21/100) = (0.05 + 0.0489898 + 0.0458258) / 3
    assert spread["within_se"] == pytest.approx((0.05 + 0.0489898 + 0.0458258) / 3, abs=1e-6)
    assert spread["between_sd"] == pytest.approx(0.1)
    assert spread["ratio"] == pytest.approx(0.1 / spread["within_se"])


def test_cochrans_q_by_hand():
    correct = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0], [1, 0, 0]])
    # k = 3; column totals C = [5, 3, 1], N = 9; row totals R = [2, 1, 3, 0, 2, 1], sum R^2 = 19
    # Q = (k - 1) (k sum C^2 - N^2) / (k N - sum R^2) = 2 (3 * 35 - 81) / (27 - 19) = 2 * 24 / 8 = 6
    out = st.cochran_q(correct)
    assert out["q"] == pytest.approx(6.0) and out["df"] == 2
    assert out["p_value"] == pytest.approx(math.exp(-3.0), rel=1e-6)  # chi2(2) survival: exp(-Q/2)
    assert out["discordant_samples"] == 4


def test_cochrans_q_of_an_order_independent_method_is_zero():
    correct = np.array([[1, 1, 1], [0, 0, 0], [1, 1, 1]])
    out = st.cochran_q(correct)
    assert out["q"] == 0.0 and out["p_value"] == 1.0 and out["discordant_samples"] == 0


def test_paired_difference_by_sample_within_ordering():
    correct = np.array([[1, 1], [0, 1], [1, 0], [1, 1]])  # 4 samples x 2 orderings
    reference = np.array([1, 0, 0, 1])  # order-independent reference
    # ordering 0: (0 + 0 + 1 + 0) / 4 = 0.25; ordering 1: (0 + 1 + 0 + 0) / 4 = 0.25
    # per-sample means over orderings: [0, 0.5, 0.5, 0]
    out = st.paired_difference(correct, reference, 0.95, resamples=500, seed=0)
    assert out["mean_diff"] == pytest.approx(0.25)
    assert out["per_ordering"] == [0.25, 0.25]
    assert out["ci_orderings"] == pytest.approx([0.25, 0.25])  # no spread across orderings
    low, high = out["ci_samples"]
    assert 0.0 <= low <= 0.25 <= high <= 0.5
    assert out["n_samples"] == 4 and out["n_orderings"] == 2


def test_paired_difference_against_a_per_ordering_reference():
    correct = np.array([[1, 0, 1], [1, 1, 0]])
    reference = np.array([[0, 0, 1], [1, 1, 1]])
    # per ordering: o0 (1 + 0) / 2 = 0.5, o1 (0 + 0) / 2 = 0, o2 (0 - 1) / 2 = -0.5
    out = st.paired_difference(correct, reference, 0.95, resamples=200)
    assert out["per_ordering"] == [0.5, 0.0, -0.5] and out["mean_diff"] == pytest.approx(0.0)
    assert out["ci_orderings"][0] < 0 < out["ci_orderings"][1]


def test_half_width_shrinks_as_orderings_accumulate():
    values = [0.50, 0.52, 0.49, 0.51, 0.50, 0.505]
    rows = st.half_width_by_count(values)
    assert [r["orderings"] for r in rows] == [2, 3, 4, 5, 6]
    assert rows[-1]["half_width"] < rows[0]["half_width"]
    assert rows[0]["half_width"] == pytest.approx(st.t_interval(values[:2])["half_width"])


# ------------------------------------------------------------------------------------ order against chance


def test_the_permutation_test_by_hand_on_a_small_grid():
    """3 orderings x 2 seeds: F and its exact permutation p-value, enumerated here."""
    from itertools import permutations

    grid = np.array([[0.60, 0.62], [0.50, 0.53], [0.40, 0.41]])

    def f(y):
        grand, rows, cols = y.mean(), y.mean(1, keepdims=True), y.mean(0, keepdims=True)
        ms_o = 2 * ((rows - grand) ** 2).sum() / 2
        ms_e = ((y - rows - cols + grand) ** 2).sum() / 2
        return ms_o / ms_e

    observed = f(grid)
    perms = list(permutations(range(3)))
    stats_all = [f(np.stack([grid[list(p), 0], grid[list(q), 1]], axis=1)) for p in perms for q in perms]
    exact = np.mean([s >= observed * (1 - 1e-9) for s in stats_all])  # 6 of 36: the identity pairing, 6 ways
    test = st.ordering_permutation_test(grid, resamples=20000, seed=1)
    assert test["statistic"] == pytest.approx(observed)
    assert test["p_value"] == pytest.approx(exact, abs=0.01)


def test_an_order_effect_without_any_scatter_gets_a_proper_p_value():
    """y = order + seed exactly (no residual): F is the largest float, and the p-value counts the permutations that
    keep it, never 0."""
    grid = np.array([0.1, 0.5, 0.3, 0.7])[:, None] + np.array([0.0, 0.02, 0.05])[None, :]
    test = st.ordering_permutation_test(grid, resamples=2000, seed=0)
    assert np.isfinite(test["statistic"]) and 0 < test["p_value"] < 0.05
