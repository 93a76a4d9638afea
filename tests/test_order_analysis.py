"""The order analysis of issue 25 on hand-made grids: exact REML fits, the contract of `order_analysis`, the pieces
(contrast, spread, permutation test, MLS), the verdicts, the adjustment, the chaos SD and the tail."""
import math
from itertools import permutations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from analysis import statistics as st

pytestmark = pytest.mark.filterwarnings("error")  # no silenced warnings: none may be raised either

ISSUE_GRID = np.array([[143, 144, 144], [142, 141, 140], [123, 124, 122], [146, 147, 149], [161, 161, 161],
                       [157, 155, 157], [141, 143, 142]]) / 300  # issue 25, item 2: counts out of 300


def frame_of(grids: dict, **columns) -> pd.DataFrame:
    """Runs of several kinds from their [orderings, seeds] grids; the same labels o0, o1, ... in every kind."""
    rows = [{"kind": kind, "ordering": f"o{o}", "seed": 10 + s, "accuracy": float(grid[o, s]), **columns}
            for kind, grid in grids.items() for o in range(grid.shape[0]) for s in range(grid.shape[1])]
    return pd.DataFrame(rows)


def crossed(rng, n_orderings, n_seeds, sd_order, sd_seed=0.01, sd_residual=0.01, mean=0.5):
    return (mean + rng.normal(0, sd_order, (n_orderings, 1)) + rng.normal(0, sd_seed, (1, n_seeds))
            + rng.normal(0, sd_residual, (n_orderings, n_seeds)))


def random_grid(rng):
    """A grid of 2-8 orderings x 2-5 seeds whose components are often 0 (fits on the boundary)."""
    k, s = int(rng.integers(2, 9)), int(rng.integers(2, 6))
    sd_order, sd_seed = rng.choice([0.0, 0.002, 0.01, 0.05], 2)
    return crossed(rng, k, s, sd_order, sd_seed, float(rng.choice([0.003, 0.01])))


# ------------------------------------------------------------------------------------------------ exact fits


def test_the_issue_grid_gives_the_reml_optimum():
    mu, v_order, v_seed, v_resid = st.fit_crossed(ISSUE_GRID)
    assert 100 * math.sqrt(v_order) == pytest.approx(4.08, abs=0.005)
    assert v_seed == 0 and 100 * math.sqrt(v_resid) == pytest.approx(0.33, abs=0.005)
    assert mu == pytest.approx(ISSUE_GRID.mean())
    # The issue's log-likelihoods leave out the constant -(n - 1)/2 log(2 pi) (n = 21 runs) that reml_loglik keeps
    constant = 10 * math.log(2 * math.pi)
    assert st.reml_loglik(ISSUE_GRID, v_order, v_seed, v_resid) + constant == pytest.approx(84.2, abs=0.05)
    old = st.reml_loglik(ISSUE_GRID, 0.0373**2, 0.0097**2, 0.0034**2) + constant  # today's fit_crossed, per issue
    assert old == pytest.approx(80.3, abs=0.05)


def test_the_boundary_pools_the_smaller_factor_first():
    """Seeds alike (MS_seed < MS_resid) and orderings barely apart: both pooled; the residual is all the spread."""
    grid = np.array([[0.50, 0.51, 0.49], [0.51, 0.49, 0.50], [0.49, 0.50, 0.51]])
    anova = st.two_way_anova(grid)
    assert anova["ms"]["seed"] < anova["ms"]["resid"] and anova["ms"]["order"] < anova["ms"]["resid"]
    assert st.fit_crossed(grid)[1:] == pytest.approx((0.0, 0.0, grid.var(ddof=1)))


def reml_slopes(grid, variances, step=1e-5):
    """v_j x dl/dv_j of the exact REML log-likelihood, dimensionless (v_resid x dl/dv_j for a component at 0, by a
    one-sided difference; central elsewhere)."""
    slopes = []
    for j, v in enumerate(variances):
        scale = v if v > 0 else variances[2]
        up, down = list(variances), list(variances)
        up[j], down[j] = v + step * scale, max(v - step * scale, 0.0)
        slopes.append(scale * (st.reml_loglik(grid, *up) - st.reml_loglik(grid, *down)) / (up[j] - down[j]))
    return slopes


def test_the_closed_form_is_the_maximum_of_the_exact_reml_likelihood():
    """On random complete grids the closed form satisfies the maximum's conditions (slope 0 inside, <= 0 at a
    boundary) and the direct maximisation of the exact likelihood (the numerical fit) does not beat it."""
    rng = np.random.default_rng(11)
    boundaries = 0
    for _ in range(40):
        grid = random_grid(rng)
        closed = st.fit_crossed(grid)[1:]
        numeric = st.fit_crossed_numerically(grid)[1:]
        best = st.reml_loglik(grid, *closed)
        assert st.reml_loglik(grid, *numeric) == pytest.approx(best, abs=1e-6)
        assert st.reml_loglik(grid, *numeric) <= best + 1e-8
        for v, slope in zip(closed, reml_slopes(grid, closed)):
            assert slope <= 1e-3 if v == 0 else abs(slope) <= 1e-3
        boundaries += closed[0] == 0 or closed[1] == 0
    assert boundaries >= 10  # the pooling was exercised


def test_the_numerical_fit_handles_missing_cells():
    rng = np.random.default_rng(12)
    for _ in range(10):
        grid = crossed(rng, 6, 4, 0.02)
        grid[rng.integers(0, 6, 3), rng.integers(0, 4, 3)] = np.nan
        mu, *variances = st.fit_crossed(grid)
        for v, slope in zip(variances, reml_slopes(grid, variances)):
            assert slope <= 1e-3 if v == 0 else abs(slope) <= 1e-3
        assert np.nanmin(grid) < mu < np.nanmax(grid)


def test_fits_that_do_not_exist_say_why():
    with pytest.raises(ValueError, match="2 orderings and >= 2 seeds"):
        st.fit_crossed(np.ones((5, 1)))
    additive = np.array([0.1, 0.5, 0.3])[:, None] + np.array([0.0, 0.02, 0.05])[None, :]
    additive[0, 0] = np.nan
    with pytest.raises(ValueError, match="exactly"):
        st.fit_crossed(additive)


# --------------------------------------------------------------------------------------- the pieces


def test_mls_is_the_chi_square_interval_when_the_subtracted_mean_square_is_zero():
    low, high = st.mls_interval(2.0, 6, 0.0, 12, 0.95)
    from scipy import stats

    assert low == pytest.approx(6 * 2.0 / stats.chi2.ppf(0.975, 6))
    assert high == pytest.approx(6 * 2.0 / stats.chi2.ppf(0.025, 6))


def test_mls_bounds_bracket_the_anova_estimate_and_stop_at_zero():
    low, high = st.mls_interval(np.array([5.0, 1.0, 0.5]), 6, np.array([1.0, 1.0, 1.0]), 12, 0.95)
    assert np.all(low <= np.maximum(np.array([4.0, 0.0, -0.5]), 0)) and np.all(high >= [4.0, 0.0, 0.0])
    assert low[1] == 0 and low[2] == 0 and high[2] > 0


def test_the_permutation_test_by_hand_on_a_small_grid():
    """3 orderings x 2 seeds: F and its exact permutation p-value, enumerated here; the smallest p is 1/3!."""
    grid = np.array([[0.60, 0.62], [0.50, 0.53], [0.40, 0.41]])

    def f(y):
        grand, rows, cols = y.mean(), y.mean(1, keepdims=True), y.mean(0, keepdims=True)
        return (2 * ((rows - grand) ** 2).sum() / 2) / (((y - rows - cols + grand) ** 2).sum() / 2)

    arrangements = [np.stack([grid[:, 0], grid[list(p), 1]], axis=1) for p in permutations(range(3))]
    exact = np.mean([f(y) >= f(grid) * (1 - 1e-9) for y in arrangements])  # 1 of 6
    test = st.ordering_permutation_test(grid, resamples=20000, seed=1)
    assert test["statistic"] == pytest.approx(f(grid))
    assert test["p_value"] == pytest.approx(exact, abs=0.01) and test["min_p"] == pytest.approx(1 / 6)
    assert st.ordering_permutation_test(grid, resamples=20000, seed=1) == test  # a fixed generator


def test_the_smallest_p_of_a_design():
    assert st.smallest_p(3, 3, 9999) == pytest.approx(1 / 36)  # the mixture's 3 x 3 grid (issue 25, item 4)
    assert st.smallest_p(11, 3, 9999) == pytest.approx(1 / 10000)
    assert st.smallest_p(7, 1, 9999) == 1.0


def test_the_kind_contrast_by_hand():
    """Welch on per-ordering means: [0.50, 0.52, 0.54] vs [0.60, 0.61, 0.62, 0.63]: difference -0.0950,
    SE^2 = 0.0004/3 + 0.0000166667/4, df = SE^4 / (0.000133333^2/2 + 0.00000416667^2/3)."""
    out = st.kind_contrast([0.50, 0.52, 0.54], [0.60, 0.61, 0.62, 0.63])
    se2 = 0.0004 / 3 + (0.01**2 * 5 / 3) / 4
    df = se2**2 / ((0.0004 / 3) ** 2 / 2 + ((0.01**2 * 5 / 3) / 4) ** 2 / 3)
    assert out["estimate"] == pytest.approx(-0.095) and out["estimate_se"] == pytest.approx(math.sqrt(se2))
    assert out["df"] == pytest.approx(df)
    from scipy import stats

    half = stats.t.ppf(0.975, df) * math.sqrt(se2)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((-0.095 - half, -0.095 + half))


def test_a_kind_contrast_without_spread_is_exact():
    out = st.kind_contrast([0.4, 0.4], [0.5, 0.5, 0.5])
    assert out["ci_low"] == out["ci_high"] == pytest.approx(-0.1) and out["p_value"] == 0.0
    assert st.kind_contrast([0.5, 0.5], [0.5, 0.5])["p_value"] == 1.0
    single = st.kind_contrast([0.4], [0.5, 0.6])
    assert math.isnan(single["ci_low"]) and single["note"] == "too few orderings"


# ------------------------------------------------------------------------------------ order_analysis


def test_one_row_per_term_and_kind_with_labels_repeated_across_kinds():
    rng = np.random.default_rng(1)
    grids = {"shuffle": crossed(rng, 5, 3, 0.005), "separate": crossed(rng, 4, 3, 0.03, mean=0.4),
             "cyclic": crossed(rng, 6, 3, 0.0)}
    out = st.order_analysis(frame_of(grids))
    assert list(zip(out["term"], out["kind"])) == [("ordering", "shuffle"), ("kind", "separate"),
                                                   ("ordering", "separate"), ("kind", "cyclic"),
                                                   ("ordering", "cyclic")]
    assert {"term", "kind", "estimate", "ci_low", "ci_high", "p_value", "verdict"} <= set(out.columns)
    separate = out[(out.term == "kind") & (out.kind == "separate")].iloc[0]
    assert separate["estimate"] == pytest.approx(grids["separate"].mean() - grids["shuffle"].mean())
    assert separate["verdict"].startswith("separate costs ") and separate["p_value"] < 0.05
    spread = out[(out.term == "ordering") & (out.kind == "separate")].iloc[0]
    assert spread["n_orderings"] == 4 and spread["n_seeds"] == 3
    assert spread["estimate"] == pytest.approx(math.sqrt(st.fit_crossed(grids["separate"])[1]))
    assert spread["ci_low"] <= spread["estimate"] <= spread["ci_high"]


def test_the_reference_kind_alone_and_another_reference():
    rng = np.random.default_rng(2)
    grid = crossed(rng, 7, 3, 0.02)
    out = st.order_analysis(frame_of({"shuffle": grid}))
    assert list(out["term"]) == ["ordering"] and out.loc[0, "p_value"] < 0.05
    assert out.loc[0, "verdict"] == "ordering matters within shuffle"
    other = st.order_analysis(frame_of({"a": grid, "b": grid + 0.01}), reference_kind="b")
    assert other.loc[other.term == "kind", "kind"].tolist() == ["a"]
    assert other.loc[other.term == "kind", "estimate"].iloc[0] == pytest.approx(-0.01)


def test_degenerate_complete_grids_never_raise():
    grids = {"shuffle": np.full((4, 3), 0.5),  # every run alike
             "one_ordering": np.array([[0.4, 0.41, 0.42]]),
             "one_seed": np.array([[0.4], [0.5], [0.45]]),
             "no_control": np.array([[0.3] * 3, [0.36] * 3, [0.33] * 3]),  # the seed changes nothing
             "additive": np.array([0.1, 0.5, 0.3])[:, None] + np.array([0.0, 0.02, 0.05])[None, :]}
    frame = frame_of(grids)
    one_seed = frame[frame.kind == "one_seed"]
    with pytest.raises(ValueError, match="one_seed.*same seeds"):  # a contrast needs the reference's seeds
        st.order_analysis(frame)
    out = st.order_analysis(frame[frame.kind != "one_seed"])
    by = {(t, k): row for t, k, row in zip(out.term, out.kind, out.itertuples())}
    assert by["ordering", "shuffle"].estimate == 0 and by["ordering", "shuffle"].p_value == 1.0
    assert by["ordering", "shuffle"].verdict == "no larger than 0.0 points"
    assert by["ordering", "one_ordering"].verdict == "too few orderings"
    assert by["kind", "one_ordering"].verdict == "too few orderings" and math.isnan(by["kind", "one_ordering"].ci_low)
    assert by["ordering", "no_control"].verdict == "seed has no effect: no control"
    assert by["ordering", "no_control"].estimate == pytest.approx(np.std([0.3, 0.36, 0.33], ddof=1))
    assert by["kind", "no_control"].interval.startswith("Welch")  # the reference has no spread, this kind does
    assert by["ordering", "additive"].statistic > 1e12 and by["ordering", "additive"].p_value < 0.05  # no residual
    alone = st.order_analysis(one_seed, reference_kind="one_seed")
    assert alone.loc[0, "verdict"] == "no seed replicate" and math.isnan(alone.loc[0, "estimate"])


def test_replicates_are_left_out_of_the_model():
    rng = np.random.default_rng(3)
    runs = frame_of({"shuffle": crossed(rng, 5, 3, 0.01), "separate": crossed(rng, 5, 3, 0.01)}, replicate=0)
    repeats = runs.iloc[[0, 0, 7]].assign(replicate=[1, 2, 1], accuracy=[0.0, 1.0, 0.9])
    with_repeats = pd.concat([runs, repeats], ignore_index=True)
    pd.testing.assert_frame_equal(st.order_analysis(with_repeats), st.order_analysis(runs.drop(columns="replicate")))


@pytest.mark.parametrize("change, message", [
    (lambda f: f.drop(columns="seed"), r"lack the column\(s\) \['seed'\]"),
    (lambda f: f.assign(accuracy=f.accuracy.where(f.index != 4, 57.0)), "'shuffle', ordering 'o1', seed 11 has 57"),
    (lambda f: pd.concat([f, f.iloc[[2]]]), "two runs of kind 'shuffle', ordering 'o0', seed 12"),
    (lambda f: f.drop(index=5), r"kind 'shuffle' misses 1 run\(s\).*\('o1', seed 12\)"),
    (lambda f: f.assign(kind="blocked"), "reference kind 'shuffle' has no runs; the kinds are \\['blocked'\\]"),
    (lambda f: f.iloc[:0], "empty"),
])
def test_bad_input_names_the_culprit(change, message):
    runs = frame_of({"shuffle": np.random.default_rng(4).uniform(0.4, 0.6, (3, 3))})
    with pytest.raises(ValueError, match=message):
        st.order_analysis(change(runs))


# ------------------------------------------------------------------------------ verdicts and adjustment


def rows(*specs) -> pd.DataFrame:
    base = {"estimate": 0.0, "ci_low": 0.0, "ci_high": 0.0, "min_p": 1e-4, "note": "", "df": 6.0, "df_residual": 12.0,
            "estimate_se": 0.01, "sd_residual": 0.01, "n_seeds": 3}
    return pd.DataFrame([{**base, **spec} for spec in specs])


def test_each_verdict():
    table = rows(
        {"term": "ordering", "kind": "separate", "estimate": 0.03, "ci_low": 0.02, "ci_high": 0.06},
        {"term": "kind", "kind": "separate", "estimate": -0.147, "ci_low": -0.191, "ci_high": -0.102},
        {"term": "kind", "kind": "dirichlet", "estimate": 0.021, "ci_low": 0.005, "ci_high": 0.037},
        {"term": "kind", "kind": "cyclic", "estimate": 0.001, "ci_low": -0.004, "ci_high": 0.006},
        {"term": "ordering", "kind": "shuffle", "estimate": 0.002, "ci_low": 0.0, "ci_high": 0.008},
        {"term": "ordering", "kind": "mixture", "estimate": 0.01, "ci_low": 0.0, "ci_high": 0.04, "min_p": 1 / 36},
        {"term": "ordering", "kind": "hardest", "estimate": 0.01, "ci_low": 0.0, "ci_high": 0.04},
        {"term": "ordering", "kind": "one", "note": "too few orderings", "ci_low": math.nan, "ci_high": math.nan},
    )
    p = [0.001, 0.0001, 0.01, 0.7, 0.3, 0.3, 0.2, math.nan]
    out = st.verdicts(table, p, alpha=0.05, margin=0.01).tolist()
    assert out == ["ordering matters within separate", "separate costs 14.7 points [10.2, 19.1]",
                   "dirichlet gains 2.1 points [0.5, 3.7]", "no larger than 1.0 points", "no larger than 1.0 points",
                   "underpowered", "inconclusive", "too few orderings"]  # 7 tests: alpha / 7 < 1/36
    assert st.verdicts(table, p, alpha=0.05).tolist()[3:5] == ["inconclusive", "inconclusive"]  # no margin
    assert not any("distinguishable" in v for v in out)


def test_underpowered_depends_on_the_corrected_threshold():
    table = rows({"term": "ordering", "kind": "mixture", "ci_high": 0.04, "min_p": 1 / 36})
    assert st.verdicts(table, [0.2], alpha=0.05, n_tests=1).tolist() == ["inconclusive"]  # 1/36 < 0.05
    assert st.verdicts(table, [0.2], alpha=0.05, n_tests=21).tolist() == ["underpowered"]  # 1/36 > 0.05/21
    assert st.min_detectable(table, 0.05 / 21).iloc[0] == math.inf


def test_the_smallest_detectable_effects_by_their_formulas():
    from scipy import stats

    table = rows({"term": "ordering", "kind": "x"}, {"term": "kind", "kind": "y"})
    mde = st.min_detectable(table, 0.01, power=0.8)
    ratio = stats.f.ppf(0.99, 6, 12) / stats.f.ppf(0.2, 6, 12)
    assert mde.iloc[0] == pytest.approx(math.sqrt((ratio - 1) * 0.01**2 / 3))
    assert mde.iloc[1] == pytest.approx((stats.t.ppf(0.995, 6) + stats.t.ppf(0.8, 6)) * 0.01)


def test_adjust_uses_statsmodels_and_keeps_untested_rows_out():
    p = np.array([0.01, math.nan, 0.04, 0.03, 0.2])
    for method in ("fdr_bh", "holm"):
        adjusted = st.adjust(p, method)
        assert math.isnan(adjusted[1])
        assert adjusted[[0, 2, 3, 4]] == pytest.approx(multipletests(p[[0, 2, 3, 4]], method=method)[1])
    with pytest.raises(ValueError, match="'bonferroni' is not one of"):
        st.adjust(p, "bonferroni")


# ------------------------------------------------------------------------------------------ chaos, tail


def test_chaos_sd_by_hand():
    """Two repeated cells: (0.50, 0.52) and (0.40, 0.41, 0.45): SS = 0.0002 + 0.0014, df = 1 + 2."""
    runs = frame_of({"shuffle": np.array([[0.50, 0.60], [0.40, 0.70], [0.55, 0.65]])}, replicate=0)
    repeats = pd.DataFrame([("shuffle", "o0", 10, 0.52, 1), ("shuffle", "o1", 10, 0.41, 1),
                            ("shuffle", "o1", 10, 0.45, 2)], columns=list(runs.columns))
    out = st.chaos_sd(pd.concat([runs, repeats], ignore_index=True)).iloc[0]
    assert out["df"] == 3 and out["n_cells"] == 2
    assert out["chaos_sd"] == pytest.approx(math.sqrt(0.0016 / 3))
    from scipy import stats

    assert out["ci_high"] == pytest.approx(math.sqrt(0.0016 / stats.chi2.ppf(0.025, 3)))
    # between orderings at one seed: seed means 0.4833 and 0.65; squares pooled over the 2 seeds on 2 x (3 - 1) df
    grid = np.array([[0.50, 0.60], [0.40, 0.70], [0.55, 0.65]])
    between = ((grid - grid.mean(axis=0)) ** 2).sum() / 4
    assert out["between_sd"] == pytest.approx(math.sqrt(between))
    assert out["statistic"] == pytest.approx(between / (0.0016 / 3))
    assert out["p_value"] == pytest.approx(stats.f.sf(between / (0.0016 / 3), 4, 3))
    assert out["chaotic"] == (out["p_value"] >= 0.05)


def test_chaos_without_replicates_says_so():
    out = st.chaos_sd(frame_of({"shuffle": np.array([[0.5, 0.6], [0.4, 0.7]])})).iloc[0]
    assert out["note"] == "no replicates" and out["chaotic"] is None and math.isnan(out["chaos_sd"])


def test_a_method_whose_orderings_differ_like_its_replicates_is_chaotic():
    rng = np.random.default_rng(5)
    noise = rng.normal(0, 0.01, (7, 3, 3))  # [ordering, seed, replicate]: pure chaos
    rows_ = [{"kind": "shuffle", "ordering": f"o{o}", "seed": s, "accuracy": 0.5 + noise[o, s, r], "replicate": r}
             for o in range(7) for s in range(3) for r in range(3)]
    out = st.chaos_sd(pd.DataFrame(rows_)).iloc[0]
    assert out["chaotic"] and out["ci_low"] < 0.01 < out["ci_high"] and out["df"] == 42


def test_the_tail_is_exactly_ten_percent():
    values = np.arange(21) / 20  # worst: 0, 0.05, then 0.1 of 0.1
    out = st.tail_summary(values)
    assert out["value"] == pytest.approx((0 + 0.05 + 0.1 * 0.1) / 2.1) and out["k"] == 2 and out["n"] == 21
    assert out["label"] == "worst 10% of 21 runs (2.1 runs)"
    assert st.tail_summary(np.arange(30))["label"] == "worst 3 of 30 runs"
    assert st.tail_summary(np.arange(30))["value"] == pytest.approx(1.0)
    assert st.tail_summary([0.7, 0.3, 0.5])["value"] == 0.3  # under one run's worth: the worst run
    with pytest.raises(ValueError, match="0 runs"):
        st.tail_summary([])


def test_a_contrast_against_a_kind_without_spread_is_centred_on_the_difference():
    """One side flat (e.g. class-blocked orderings that all give the same accuracy): the one-sample t interval of
    the other side's mean, less the flat value, holds the estimate, on either side."""
    varying, flat = np.array([0.4278, 0.4256, 0.4156, 0.4211, 0.4278]), np.full(2, 0.4289)
    for kind, reference, sign in ((flat, varying, -1), (varying, flat, 1)):
        out = st.kind_contrast(kind, reference)
        half = stats.t.ppf(0.975, 4) * varying.std(ddof=1) / math.sqrt(5)
        assert out["estimate"] == pytest.approx(sign * (varying.mean() - 0.4289))
        assert (out["ci_low"], out["ci_high"]) == pytest.approx((out["estimate"] - half, out["estimate"] + half))


def test_a_small_design_passes_among_discoveries_and_not_alone():
    """BH's threshold grows with the discoveries beside a row: min_p 1/576 (4 orderings x 3 seeds) passes when half
    of 40 rows are discoveries, and not when it would be the only one (alpha / 40 = 0.00125)."""
    from analysis.statistics import could_pass, row_thresholds

    alone = np.r_[0.3, np.full(39, 0.5)]
    crowded = np.r_[0.3, np.full(19, 1e-6), np.full(20, 0.5)]
    min_p = np.full(40, 1 / 576)
    assert not could_pass(alone, min_p, "fdr_bh", 0.05)[0]
    assert could_pass(crowded, min_p, "fdr_bh", 0.05)[0]
    assert row_thresholds(crowded, "fdr_bh", 0.05)[0] == pytest.approx(0.05 * 20 / 40)
    assert row_thresholds(alone, "fdr_bh", 0.05)[0] == pytest.approx(0.05 / 40)
    # Holm's step for the same row: alpha / (m - R) = 0.05 / 21 with 19 rows rejected besides it
    assert row_thresholds(crowded, "holm", 0.05)[0] == pytest.approx(0.05 / 21)
    assert could_pass(crowded, min_p, "holm", 0.05)[0]  # 1/576 < 0.05 / 21
    assert not could_pass(crowded, np.full(40, 1 / 36), "holm", 0.05)[0]  # 3 orderings x 3 seeds: 1/36 > 0.05 / 21
    assert not could_pass(np.r_[np.nan, alone[1:]], min_p, "fdr_bh", 0.05)[0]  # no test, nothing to pass


def test_a_method_the_perturbation_does_not_move_gets_its_orderings_tested_where_the_seed_reaches_it():
    """Every seed gives the same accuracies: with a seed that reaches every input (the last-bit perturbation) the
    orderings' consistent differences are an order effect at the design's smallest p; without, no control."""
    grid = np.repeat(np.array([[0.40], [0.43], [0.47], [0.50]]), 3, axis=1)  # 4 orderings x 3 identical seeds
    unreached = st.within_kind_spread(grid, resamples=9999, seed_reaches=False)
    assert unreached["note"] == "seed has no effect: no control" and math.isnan(unreached["p_value"])
    reached = st.within_kind_spread(grid, resamples=9999, seed_reaches=True)
    assert reached["note"] == "" and reached["min_p"] == pytest.approx(1 / 576)
    assert reached["p_value"] == pytest.approx(1 / 576, rel=0.3)  # Monte Carlo: all columns permuted alike
    assert reached["estimate"] == pytest.approx(unreached["estimate"]) == pytest.approx(grid[:, 0].std(ddof=1))
    alike = st.within_kind_spread(np.full((4, 3), 0.45), seed_reaches=True)
    assert alike["p_value"] == 1.0 and alike["estimate"] == 0.0  # nothing differs: no effect, exactly
