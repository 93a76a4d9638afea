"""Calibration of the order analysis (issue 25, item 3): simulated grids with known truth, fixed seeds.

Each statistic is checked on the same code `order_analysis` runs: the closed forms are vectorised over a batch of
grids (`two_way_anova`, `mls_interval`, `welch_contrast`), and a cross-check ties each batch to the per-grid function
the analysis calls. Units: accuracy fractions; P is one percentage point. Monte Carlo SE of a 5% rate at N = 4000:
0.34%; of a 95% coverage at N = 2000: 0.49%.
"""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import statistics as st

pytestmark = pytest.mark.filterwarnings("error")

P = 0.01  # one percentage point of accuracy


def grids(rng, n, n_orderings, n_seeds, sd_order, sd_seed=1 * P, sd_residual=1 * P, mean=0.5):
    """n grids y[o, s] = mean + a_o + b_s + e_os: [n, orderings, seeds]."""
    return (mean + rng.normal(0, sd_order, (n, n_orderings, 1)) + rng.normal(0, sd_seed, (n, 1, n_seeds))
            + rng.normal(0, sd_residual, (n, n_orderings, n_seeds)))


def sd_intervals(batch, confidence=0.95):
    """The SD(order) MLS interval of every grid of a batch, as `within_kind_spread` computes it."""
    k, s = batch.shape[1:]
    anova = st.two_way_anova(batch)
    low, high = st.mls_interval(anova["ms"]["order"], k - 1, anova["ms"]["resid"], (k - 1) * (s - 1), confidence)
    return np.sqrt(low / s), np.sqrt(high / s)


@pytest.mark.parametrize("n_orderings", [5, 7])
@pytest.mark.parametrize("sd_order", [0.0, 2 * P, 8 * P])
def test_the_sd_order_interval_covers(sd_order, n_orderings):
    batch = grids(np.random.default_rng(100 + n_orderings), 2000, n_orderings, 3, sd_order)
    low, high = sd_intervals(batch)
    coverage = np.mean((low <= sd_order) & (sd_order <= high))
    assert coverage >= 0.93, f"MLS coverage {coverage:.3f} at SD(order) {sd_order / P} points"
    for grid, lo, hi in zip(batch[:20], low, high):  # the batch is what the analysis computes
        spread = st.within_kind_spread(grid, resamples=19)
        assert (spread["ci_low"], spread["ci_high"]) == pytest.approx((lo, hi))


def test_the_permutation_test_keeps_its_size_on_null_grids():
    """No ordering effect, seed and residual SD of 1 point, 7 x 3 grids; R = 199 permutations (fewer than the
    report's 9999, for speed: the Monte Carlo p is valid at any R)."""
    batch = grids(np.random.default_rng(200), 2000, 7, 3, 0.0)
    p = np.array([st.ordering_permutation_test(grid, resamples=199, seed=i)["p_value"] for i, grid in enumerate(batch)])
    assert np.mean(p <= 0.05) <= 0.06
    assert st.within_kind_spread(batch[0], resamples=199, seed=0)["p_value"] == p[0]


def kinds(rng, n, n_reference, n_kind, sd_reference, sd_kind, shift=0.0, sd_residual=1 * P):
    """Per-ordering means (over 3 shared seeds) of a reference kind and another kind, [n, orderings] each."""
    seeds = rng.normal(0, 1 * P, (n, 1, 3))
    reference = grids(rng, n, n_reference, 3, sd_reference, 0.0, sd_residual) + seeds
    other = grids(rng, n, n_kind, 3, sd_kind, 0.0, sd_residual, mean=0.5 + shift) + seeds
    return other.mean(axis=2), reference.mean(axis=2)


@pytest.mark.parametrize("n_reference, n_kind, sd_reference, sd_kind", [
    (7, 7, 1 * P, 4 * P),  # the other kind scatters 4x more
    (7, 7, 4 * P, 1 * P),
    (11, 5, 1 * P, 4 * P),  # fewer orderings on the side that scatters more: Welch's hardest case here
])
def test_the_kind_contrast_covers_and_keeps_its_size(n_reference, n_kind, sd_reference, sd_kind):
    other, reference = kinds(np.random.default_rng(300 + n_kind), 4000, n_reference, n_kind, sd_reference, sd_kind)
    welch = st.welch_contrast(other, reference)
    assert np.mean(welch["p_value"] < 0.05) <= 0.06
    assert np.mean((welch["ci_low"] <= 0) & (0 <= welch["ci_high"])) >= 0.93
    for o, r, low, p in zip(other[:10], reference[:10], welch["ci_low"], welch["p_value"]):
        contrast = st.kind_contrast(o, r)
        assert contrast["ci_low"] == pytest.approx(low) and contrast["p_value"] == pytest.approx(p)


def test_order_analysis_reports_what_the_pieces_compute():
    """The wiring: a contrast row is Welch on per-ordering means, an ordering row is the MLS interval and the
    permutation p of its kind's grid."""
    rng = np.random.default_rng(400)
    reference, other = grids(rng, 1, 7, 3, 1 * P)[0], grids(rng, 1, 5, 3, 4 * P, mean=0.45)[0]
    runs = pd.DataFrame([{"kind": kind, "ordering": o, "seed": s, "accuracy": grid[o, s]}
                         for kind, grid in (("shuffle", reference), ("separate", other))
                         for o in range(grid.shape[0]) for s in range(3)])
    out = st.analyse_orders(runs, options=st.AnalysisOptions(resamples=199)).set_index(["term", "kind"])
    welch = st.welch_contrast(other.mean(axis=1), reference.mean(axis=1))
    assert out.loc[("kind", "separate"), "ci_low"] == pytest.approx(welch["ci_low"])
    assert out.loc[("kind", "separate"), "p_value"] == pytest.approx(welch["p_value"])
    low, high = sd_intervals(other[None])
    assert out.loc[("ordering", "separate"), ["ci_low", "ci_high"]].tolist() == pytest.approx([low[0], high[0]])
    assert out.loc[("ordering", "separate"), "p_value"] == st.ordering_permutation_test(other, 199)["p_value"]


def test_equivalence_is_rarely_claimed_at_the_margin():
    """True difference = the margin (1 point), true SD(order) = the margin (2 points): "no larger than m points"
    must be an error at most 5-6% of the time (it is TOST at 2.5% a side, by the 95% intervals)."""
    rng = np.random.default_rng(500)

    def claimed_contrast(shift):
        other, reference = kinds(rng, 4000, 7, 7, 0.3 * P, 0.6 * P, shift=shift, sd_residual=0.3 * P)
        welch = st.welch_contrast(other, reference)
        rows = pd.DataFrame({**welch, "term": "kind", "kind": "separate", "note": "", "min_p": 0.0})
        return np.mean(st.verdicts(rows, welch["p_value"], margin=1 * P, n_tests=1) == "no larger than 1.0 points")

    def claimed_sd(sd):
        low, high = sd_intervals(grids(rng, 4000, 11, 3, sd))
        rows = pd.DataFrame({"ci_low": low, "ci_high": high, "term": "ordering", "kind": "separate", "note": "",
                             "estimate": 0.0, "min_p": 1e-4})
        return np.mean(st.verdicts(rows, np.ones(len(rows)), margin=2 * P, n_tests=1) == "no larger than 2.0 points")

    assert claimed_contrast(1 * P) <= 0.05 and claimed_sd(2 * P) <= 0.05
    assert claimed_contrast(0.0) > 0.5 and claimed_sd(0.5 * P) > 0.5  # and it can be claimed: not vacuous


def test_the_smallest_detectable_sd_is_detected_with_80_percent_power():
    """At SD(order) = min_detectable (7 x 3, residual 1 point, threshold 0.05 / 21), the F test rejects ~80%."""
    threshold = 0.05 / 21
    row = pd.DataFrame([{"term": "ordering", "min_p": 1e-4, "df": 6, "df_residual": 12, "sd_residual": 1 * P,
                         "n_seeds": 3}])
    sd = st.min_detectable(row, threshold, power=0.8).iloc[0]
    anova = st.two_way_anova(grids(np.random.default_rng(600), 4000, 7, 3, sd))
    power = np.mean(stats.f.sf(anova["ms"]["order"] / anova["ms"]["resid"], 6, 12) < threshold)
    assert 0.77 <= power <= 0.83


@pytest.mark.parametrize("design", ["three cells, two repeats each", "every cell, one repeat"])
def test_the_chaos_test_keeps_its_size(design):
    """Pure chaos: every run of a cell, and every ordering, differs by the same noise (SD 1 point) around a shared
    seed effect. "not chaotic" (p < 0.05) must be rare. Repeating every cell once makes the test conservative (the
    main run enters both the ordering means and the chaos variance); checked to stay valid."""
    rng = np.random.default_rng(700)
    repeated = [(0, 0), (1, 1), (2, 2)] if design.startswith("three") else [(o, s) for o in range(7) for s in range(3)]
    extra = 2 if design.startswith("three") else 1
    labels = np.repeat(np.arange(len(repeated)), extra + 1)
    rejected = []
    for _ in range(1000):
        seeds = rng.normal(0, 1 * P, 3)
        main = 0.5 + seeds + rng.normal(0, 1 * P, (7, 3))
        cells = [np.r_[main[o, s], 0.5 + seeds[s] + rng.normal(0, 1 * P, extra)] for o, s in repeated]
        variance, df = st.replicate_variance(np.concatenate(cells), labels)
        rejected.append(st.chaos_test(main, variance, df)["p_value"] < 0.05)
    assert np.mean(rejected) <= 0.06


def test_the_chaos_interval_covers():
    rng = np.random.default_rng(800)
    covered = []
    for _ in range(1000):
        values = 0.5 + rng.normal(0, 1 * P, (4, 3))  # 4 cells x 3 runs
        variance, df = st.replicate_variance(values.ravel(), np.repeat(np.arange(4), 3))
        low, high = st.chi_square_sd_interval(variance, df, 0.95)
        covered.append(low <= 1 * P <= high)
    assert np.mean(covered) >= 0.93


def test_an_interaction_larger_than_chaos_is_beyond_chaos_and_a_pure_seed_effect_is_not():
    """Orderings that differ at a seed by more than replicates do (an ordering x seed interaction of SD 3 points
    against chaos of 1) are found beyond chaos most of the time; a large seed effect alone (SD 5 points, shared by the
    orderings) is removed and does not count."""
    rng = np.random.default_rng(900)
    beyond, seed_only = [], []
    labels = np.repeat(np.arange(2), 3)
    for _ in range(400):
        seeds = rng.normal(0, 5 * P, 3)
        replicates = np.r_[0.5 + rng.normal(0, 1 * P, 3), 0.5 + rng.normal(0, 1 * P, 3)]
        variance, df = st.replicate_variance(replicates, labels)
        interacting = 0.5 + seeds + rng.normal(0, 3 * P, (5, 3))
        chaotic = 0.5 + seeds + rng.normal(0, 1 * P, (5, 3))
        beyond.append(st.chaos_test(interacting, variance, df)["p_value"] < 0.05)
        seed_only.append(st.chaos_test(chaotic, variance, df)["p_value"] < 0.05)
    assert np.mean(beyond) > 0.6 and np.mean(seed_only) <= 0.06
