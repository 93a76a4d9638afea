"""The statistics of order sensitivity, as pure functions on arrays (scipy and statsmodels do the work).

Conventions: accuracies are fractions; `correct` matrices are [samples, orderings] of 0/1, rows matched by
sample_id, so every column holds the same samples in a different stream order.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def t_interval(values, confidence: float = 0.95) -> dict:
    """Mean of `values` with a Student-t interval on n-1 degrees of freedom (NaN bounds below two values)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "half_width": math.nan, "n": n, "df": max(n - 1, 0)}
    sd = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1) * sd / math.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "n": n, "df": n - 1}


def binomial_se(accuracy: float, n: int) -> float:
    """Standard error of one run's accuracy from sampling alone: sqrt(p (1 - p) / n)."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else math.nan


def order_spread(accuracies, sample_counts) -> dict:
    """Between-ordering SD of accuracy next to the within-run sampling SE (mean binomial SE over the runs)."""
    accuracies = np.asarray(accuracies, dtype=float)
    within = float(np.mean([binomial_se(a, n) for a, n in zip(accuracies, sample_counts)]))
    between = float(accuracies.std(ddof=1)) if len(accuracies) > 1 else math.nan
    return {"between_sd": between, "within_se": within,
            "ratio": between / within if within and not math.isnan(between) else math.nan}


def cochran_q(correct) -> dict:
    """Cochran's Q test that the orderings share one probability of a correct answer per sample.

    Cochran, W. G. (1950). The comparison of percentages in matched samples. Biometrika 37(3/4), 256-266.
    Q ~ chi-square with k-1 df under the null. When no sample's correctness changes with the order (an
    order-independent method), Q is 0 and p is 1.
    """
    from statsmodels.stats.contingency_tables import cochrans_q

    correct = np.asarray(correct, dtype=float)
    k = correct.shape[1] if correct.ndim == 2 else 0
    if k < 2:
        return {"q": math.nan, "df": max(k - 1, 0), "p_value": math.nan, "discordant_samples": 0}
    discordant = int((correct.min(axis=1) != correct.max(axis=1)).sum())
    if discordant == 0:
        return {"q": 0.0, "df": k - 1, "p_value": 1.0, "discordant_samples": 0}
    result = cochrans_q(correct)
    return {"q": float(result.statistic), "df": int(result.df), "p_value": float(result.pvalue),
            "discordant_samples": discordant}


def paired_difference(correct, reference, confidence: float = 0.95, resamples: int = 2000, seed: int = 0,
                      groups=None) -> dict:
    """Accuracy of a method minus a reference's, paired by sample within each run, combined over orderings.

    `correct` [samples, runs]; `reference` [samples] (order-independent) or [samples, runs]; `groups` names each
    run's ordering (several runs of one ordering: its seeds, averaged), default one ordering per run.
    Two intervals, each over what its n counts:
    - over orderings: Student-t on the k per-ordering differences (k-1 df), from 2 orderings on;
    - over samples: percentile bootstrap of the mean per-sample difference (averaged over runs), the
      samples resampled with replacement and kept paired across runs (scipy.stats.bootstrap).
    """
    correct = np.asarray(correct, dtype=float)
    reference = np.asarray(reference, dtype=float)
    if reference.ndim == 1:
        reference = np.repeat(reference[:, None], correct.shape[1], axis=1)
    per_sample = (correct - reference).mean(axis=1)
    per_run = (correct - reference).mean(axis=0)
    groups = list(range(correct.shape[1])) if groups is None else list(groups)
    names = list(dict.fromkeys(groups))
    per_ordering = np.array([per_run[[g == name for g in groups]].mean() for name in names])
    over_orderings = t_interval(per_ordering, confidence)
    if np.all(per_sample == per_sample[0]):
        low = high = float(per_sample[0])
    else:
        boot = stats.bootstrap((per_sample,), np.mean, confidence_level=confidence, n_resamples=resamples,
                               method="percentile", random_state=np.random.default_rng(seed))
        low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    return {"mean_diff": float(per_ordering.mean()), "per_ordering": per_ordering.tolist(),
            "n_orderings": len(names), "n_runs": int(correct.shape[1]), "n_samples": int(correct.shape[0]),
            "ci_orderings": [over_orderings["low"], over_orderings["high"]], "ci_samples": [low, high]}


def half_width_by_count(values, confidence: float = 0.95) -> list[dict]:
    """The t-interval half-width after the first k values, k = 2..n (the evidence as orderings accumulate)."""
    values = list(values)
    return [{"orderings": k, "half_width": t_interval(values[:k], confidence)["half_width"]}
            for k in range(2, len(values) + 1)]


# ------------------------------------------------------------------------------------ order against chance


def accuracy_grid(values, orderings, seeds) -> tuple[np.ndarray, list, list]:
    """Run accuracies as a complete [orderings, seeds] grid (rows and columns in first-seen order)."""
    rows, cols = list(dict.fromkeys(orderings)), list(dict.fromkeys(seeds))
    grid = np.full((len(rows), len(cols)), np.nan)
    for value, o, s in zip(values, orderings, seeds):
        grid[rows.index(o), cols.index(s)] = value
    return grid, rows, cols


def fit_crossed(grid: np.ndarray):
    """REML fit of y[o, s] = mu + a_o + b_s + e_os, a ~ N(0, s_o^2), b ~ N(0, s_s^2), e ~ N(0, s_e^2), crossed
    random effects as statsmodels writes them (one group, a variance component per factor); (mu, variances)."""
    import warnings

    import pandas as pd
    from statsmodels.regression.mixed_linear_model import MixedLM

    n_o, n_s = grid.shape
    if np.ptp(grid) == 0:  # every run alike: nothing varies (the likelihood has no interior optimum)
        return float(grid.mean()), 0.0, 0.0, 0.0
    frame = pd.DataFrame({"y": grid.ravel(), "ordering": np.repeat(np.arange(n_o), n_s),
                          "seed": np.tile(np.arange(n_s), n_o), "all": 0})
    model = MixedLM.from_formula("y ~ 1", groups="all", re_formula="0", data=frame,
                                 vc_formula={"ordering": "0 + C(ordering)", "seed": "0 + C(seed)"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # boundary fits (a component at 0) warn; they are valid estimates
        try:
            result = model.fit(reml=True, method=["lbfgs", "powell"])
        except (np.linalg.LinAlgError, ValueError):
            result = model.fit(reml=True, method="nm", maxiter=2000)
    names = model.exog_vc.names
    variances = {name: max(float(v), 0.0) for name, v in zip(names, result.vcomp)}
    return float(result.fe_params.iloc[0]), variances["ordering"], variances["seed"], max(float(result.scale), 0.0)


def order_effect_test(grid: np.ndarray, resamples: int = 9999, seed: int = 0) -> dict:
    """Permutation test of the ordering's effect with the seed as a block (restricted permutations).

    Anderson, M. J. and ter Braak, C. J. F. (2003). Permutation tests for multi-factorial analysis of variance.
    J. Statistical Computation and Simulation 73(2), 85-113. Under H0 (the ordering has no effect beyond what
    any perturbation does), the accuracies of one seed's column are exchangeable across orderings, so each seed's
    column is permuted independently; the statistic is the two-way ANOVA's F = MS(ordering) / MS(residual): a
    consistent ordering effect across seeds against the ordering-by-seed scatter (where chaotic methods put
    their spread). scipy.stats.permutation_test with permutation_type="pairings" permutes each sample (column).
    """
    n_o, n_s = grid.shape

    def f_ordering(*columns, axis=-1):
        y = np.stack(columns, axis=-1)  # [..., orderings, seeds]
        grand = y.mean(axis=(-2, -1), keepdims=True)
        rows, cols = y.mean(axis=-1, keepdims=True), y.mean(axis=-2, keepdims=True)
        ms_order = n_s * ((rows - grand) ** 2).sum(axis=(-2, -1)) / (n_o - 1)
        ms_resid = ((y - rows - cols + grand) ** 2).sum(axis=(-2, -1)) / ((n_o - 1) * (n_s - 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            # An ordering effect with no scatter at all is the largest F there is; the largest finite float, not
            # inf, so that scipy's tie tolerance (relative to the observed value) stays defined.
            return np.where(ms_resid > 0, ms_order / ms_resid, np.where(ms_order > 0, np.finfo(float).max, 0.0))

    result = stats.permutation_test([grid[:, s] for s in range(n_s)], f_ordering, permutation_type="pairings",
                                    n_resamples=resamples, alternative="greater", vectorized=True,
                                    random_state=np.random.default_rng(seed))
    return {"test": "permutation F test of ordering within seeds (Anderson & ter Braak 2003)",
            "statistic": float(result.statistic), "p_value": float(result.pvalue), "resamples": resamples}


def tail_accuracy(values, fraction: float = 0.1) -> float:
    """Expected tail accuracy: the mean of the worst `fraction` of the runs (at least one), as OGA reports it."""
    values = np.sort(np.asarray(values, dtype=float))
    return float(values[: max(1, math.ceil(fraction * len(values)))].mean())


def sd_with_interval(values: np.ndarray, alpha: float) -> tuple[float, tuple[float, float]]:
    """The sample SD (ddof 1) and its chi-square interval, for a factor that is the grid's only source of spread."""
    sd, df = float(np.std(values, ddof=1)), len(values) - 1
    return sd, tuple(math.sqrt(df * sd**2 / stats.chi2.ppf(q, df)) for q in (1 - alpha, alpha))


def variance_components(values, orderings, seeds, confidence: float = 0.95, bootstrap: int = 100,
                        resamples: int = 9999, seed: int = 0, order_independent: bool = False) -> dict:
    """SD(order), SD(seed), SD(residual) of run accuracy on an orderings x seeds grid, with intervals and the
    order-effect test.

    The model: `fit_crossed` (REML, statsmodels MixedLM). Intervals: percentile parametric bootstrap, `bootstrap`
    grids simulated from the fitted model and refitted. An order-independent method's orderings reorder the same
    records, so SD(order) and the residual are 0 by construction and SD(seed) is the SD over seeds with its
    chi-square interval. A method the seed does not reach (every ordering gives the same accuracy under every
    seed: it reads only the original view) has no control on this grid: SD(order) is the SD over orderings with
    its chi-square interval, SD(seed) and the residual are 0, and the verdict says so ("seed has no effect: no
    control"), instead of a test whose null has nothing to permute against. Fewer than 3 orderings or 2 seeds:
    "too few cells".
    """
    grid, rows, cols = accuracy_grid(values, orderings, seeds)
    out = {"n_orderings": len(rows), "n_seeds": len(cols), "n_cells": int(np.isfinite(grid).sum()),
           "tail_accuracy": tail_accuracy(grid[np.isfinite(grid)]), "mean": float(np.nanmean(grid))}
    empty = {"sd_order": None, "sd_order_ci": [None, None], "sd_seed": None, "sd_seed_ci": [None, None],
             "sd_residual": None, "sd_residual_ci": [None, None], "test": None, "p_value": None}
    if not np.isfinite(grid).all() or len(rows) < 3 or len(cols) < 2:
        return {**out, **empty, "verdict": "too few cells", "interval": None}
    alpha = (1 - confidence) / 2
    if order_independent:
        sd, (low, high) = sd_with_interval(grid.mean(axis=0), alpha)
        return {**out, **empty, "sd_order": 0.0, "sd_order_ci": [0.0, 0.0], "sd_seed": sd, "sd_seed_ci": [low, high],
                "sd_residual": 0.0, "sd_residual_ci": [0.0, 0.0], "verdict": "order-independent",
                "interval": "SD over seeds, chi-square interval"}
    if not order_independent and np.all(grid == grid[:, :1]):
        sd, (low, high) = sd_with_interval(grid[:, 0], alpha)
        return {**out, **empty, "sd_order": sd, "sd_order_ci": [low, high], "sd_seed": 0.0, "sd_seed_ci": [0.0, 0.0],
                "sd_residual": 0.0, "sd_residual_ci": [0.0, 0.0], "verdict": "seed has no effect: no control",
                "interval": "SD over orderings, chi-square interval (the seed does not change the records)"}
    try:
        mu, v_order, v_seed, v_resid = fit_crossed(grid)
    except (np.linalg.LinAlgError, ValueError) as error:
        return {**out, **empty, "verdict": f"model did not fit ({error})", "interval": None}
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        simulated = (mu + rng.normal(0, math.sqrt(v_order), (len(rows), 1))
                     + rng.normal(0, math.sqrt(v_seed), (1, len(cols)))
                     + rng.normal(0, math.sqrt(v_resid), grid.shape))
        try:
            draws.append(np.sqrt(fit_crossed(simulated)[1:]))
        except (np.linalg.LinAlgError, ValueError):
            continue  # a draw the optimiser cannot fit is left out (the count is reported)
    draws = np.array(draws) if draws else np.zeros((1, 3))
    low, high = np.quantile(draws, [alpha, 1 - alpha], axis=0)
    test = order_effect_test(grid, resamples, seed)
    verdict = "order > chance" if test["p_value"] < 1 - confidence else "not distinguishable from chance"
    return {**out, "sd_order": math.sqrt(v_order), "sd_order_ci": [float(low[0]), float(high[0])],
            "sd_seed": math.sqrt(v_seed), "sd_seed_ci": [float(low[1]), float(high[1])],
            "sd_residual": math.sqrt(v_resid), "sd_residual_ci": [float(low[2]), float(high[2])],
            "test": test["test"], "statistic": test["statistic"], "p_value": test["p_value"], "verdict": verdict,
            "interval": f"percentile parametric bootstrap, {len(draws)} of {bootstrap} refits"}
