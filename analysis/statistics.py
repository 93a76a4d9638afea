"""The statistics of order sensitivity, as pure functions on arrays (scipy and statsmodels do the work).

Conventions: accuracies are fractions; `correct` matrices are [samples, orderings] of 0/1, rows matched by
sample_id, so every column holds the same samples in a different stream order.

The order analysis (issue 25): `order_analysis` (kinds fixed, orderings within a kind and seeds random), then, in the
report, `adjust` across rows and `verdicts`; `chaos_sd` from replicated cells; `tail_summary`; `ORDER_DEFINITIONS`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import linalg, optimize, stats


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
    row_of, col_of = {o: i for i, o in enumerate(rows)}, {s: j for j, s in enumerate(cols)}
    grid = np.full((len(rows), len(cols)), np.nan)
    for value, o, s in zip(values, orderings, seeds):
        grid[row_of[o], col_of[s]] = value
    return grid, rows, cols


# The crossed model of one kind's grid: y[o, s] = mu + a_o + b_s + e_os, a ~ N(0, v_order), b ~ N(0, v_seed),
# e ~ N(0, v_resid), no interaction (Searle, Casella & McCulloch 1992, Variance Components, ch. 4 and 6).


def two_way_anova(grid) -> dict:
    """Sums of squares, degrees of freedom and mean squares of a complete [orderings, seeds] grid (leading axes, if
    any, are a batch). E[MS_order] = v_resid + s v_order, E[MS_seed] = v_resid + k v_seed, E[MS_resid] = v_resid,
    and the three are independent chi-squares under the model: the strata of the balanced design."""
    grid = np.asarray(grid, dtype=float)
    k, s = grid.shape[-2:]
    grand = grid.mean(axis=(-2, -1), keepdims=True)
    rows, cols = grid.mean(axis=-1, keepdims=True), grid.mean(axis=-2, keepdims=True)
    ss = {"order": s * ((rows - grand) ** 2).sum(axis=(-2, -1)),
          "seed": k * ((cols - grand) ** 2).sum(axis=(-2, -1)),
          "resid": ((grid - rows - cols + grand) ** 2).sum(axis=(-2, -1))}
    df = {"order": k - 1, "seed": s - 1, "resid": (k - 1) * (s - 1)}
    ms = {name: ss[name] / df[name] if df[name] else np.full_like(ss[name], np.nan) for name in ss}
    return {"ss": ss, "df": df, "ms": ms, "n_orderings": k, "n_seeds": s, "mean": grand[..., 0, 0]}


def reml_balanced(anova: dict) -> tuple[float, float, float]:
    """Closed-form REML variances (v_order, v_seed, v_resid) of a complete grid of >= 2 orderings and >= 2 seeds.

    On a balanced grid the REML log-likelihood splits over the ANOVA strata (the grand mean's stratum drops out):
        l = -(n - 1)/2 log(2 pi) - 1/2 sum_j [df_j log(lam_j) + SS_j / lam_j],   j in {order, seed, resid},
    with lam_order = v_resid + s v_order, lam_seed = v_resid + k v_seed, lam_resid = v_resid. Each stratum alone
    is maximised at lam_j = MS_j; the variances being >= 0 asks lam_order >= lam_resid and lam_seed >= lam_resid, a
    simple tree order with the residual at its root. Its maximum is the isotonic regression of the MS_j with weights
    df_j (Thompson 1962, Ann. Math. Stat. 33:273; Barlow, Bartholomew, Bremner & Brunk 1972): pool the factor of
    the smaller mean square into the residual while it lies below the pooled residual,
    lam_resid = sum SS / sum df, then the other. A pooled factor's variance is 0 (the boundary); an unpooled one's is
    (MS_j - lam_resid) / (the other factor's levels). tests/test_order_analysis.py checks it against a direct
    maximisation of the exact REML likelihood (`reml_loglik`).
    """
    ss, df, ms = anova["ss"], anova["df"], anova["ms"]
    if df["resid"] < 1:
        raise ValueError(f"REML needs >= 2 orderings and >= 2 seeds, got {anova['n_orderings']} x {anova['n_seeds']}")
    pooled_ss, pooled_df = float(ss["resid"]), df["resid"]
    factors = {"order": float(ms["order"]), "seed": float(ms["seed"])}
    for name in sorted(factors, key=factors.get):
        if factors[name] >= pooled_ss / pooled_df:
            break
        pooled_ss, pooled_df = pooled_ss + float(ss[name]), pooled_df + df[name]
    v_resid = pooled_ss / pooled_df
    levels = {"order": anova["n_seeds"], "seed": anova["n_orderings"]}
    v_order, v_seed = (max(factors[name] - v_resid, 0.0) / levels[name] for name in ("order", "seed"))
    return v_order, v_seed, v_resid


def crossed_design(grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The observed cells of a grid (NaN: missing) as y and the ordering and seed indicator matrices."""
    grid = np.asarray(grid, dtype=float)
    rows, cols = np.nonzero(np.isfinite(grid))
    return grid[rows, cols], np.eye(grid.shape[0])[rows], np.eye(grid.shape[1])[cols]


def reml_loglik(grid, v_order: float, v_seed: float, v_resid: float) -> float:
    """The exact REML log-likelihood of the crossed model at the given variances, on the observed cells:
    -1/2 [(n - 1) log(2 pi) + log|V| + log|1'V^-1 1| + y'P y], P = V^-1 - V^-1 1 (1'V^-1 1)^-1 1'V^-1 (Harville
    1977, JASA 72:320; the convention of statsmodels' MixedLM.loglike, which leaves out +1/2 log|X'X|)."""
    y, z_order, z_seed = crossed_design(grid)
    n = len(y)
    cov = v_order * z_order @ z_order.T + v_seed * z_seed @ z_seed.T + v_resid * np.eye(n)
    factor = linalg.cho_factor(cov)
    inv_one, inv_y = linalg.cho_solve(factor, np.ones(n)), linalg.cho_solve(factor, y)
    information = inv_one.sum()
    quadratic = y @ inv_y - (inv_one @ y) ** 2 / information
    log_det = 2 * np.log(np.diag(factor[0])).sum()
    return float(-0.5 * ((n - 1) * math.log(2 * math.pi) + log_det + math.log(information) + quadratic))


def _profiled_reml(ratios, y, z_order, z_seed) -> tuple[float, np.ndarray, dict]:
    """Minus the REML log-likelihood with v_resid profiled out, its gradient, and the GLS pieces, at the variance
    ratios (v_order, v_seed) / v_resid. With H = I + g_o Z_o Z_o' + g_s Z_s Z_s' and q = y'P_H y: v_resid = q/(n-1),
    l = -(n - 1)/2 (log(2 pi q / (n - 1)) + 1) - 1/2 (log|H| + log 1'H^-1 1),
    dl/dg_j = -1/2 [tr(Z_j' P_H Z_j) - (n - 1) |Z_j' P_H y|^2 / q].
    H is never formed: with W = [sqrt(g_o) Z_o, sqrt(g_s) Z_s] and D = I + W'W (orderings + seeds square),
    H^-1 = I - W D^-1 W' (Woodbury) and |H| = |D|, so the work stays at the size of the factors' levels."""
    n = len(y)
    w = np.hstack([math.sqrt(ratios[0]) * z_order, math.sqrt(ratios[1]) * z_seed])
    d = np.eye(w.shape[1]) + w.T @ w
    cholesky = np.linalg.cholesky(d)

    def inv_h(v):
        return v - w @ np.linalg.solve(d, w.T @ v)

    inv_one, inv_y = inv_h(np.ones(n)), inv_h(y)
    information = inv_one.sum()
    mu = float(inv_one @ y / information)
    py = inv_y - inv_one * mu
    q = float(y @ py)
    log_det = 2 * np.log(np.diag(cholesky)).sum()
    loglik = -0.5 * ((n - 1) * (math.log(2 * math.pi * q / (n - 1)) + 1) + log_det + math.log(information))
    gradient = []
    for z in (z_order, z_seed):
        cross = w.T @ z  # tr(Z'H^-1 Z) = tr(Z'Z) - tr(D^-1 W'Z Z'W)
        trace = z.sum() - np.sum(cross * np.linalg.solve(d, cross)) - np.sum((z.T @ inv_one) ** 2) / information
        gradient.append(-0.5 * (trace - (n - 1) * np.sum((z.T @ py) ** 2) / q))
    return -loglik, -np.array(gradient), {"mu": mu, "v_resid": q / (n - 1)}


def fit_crossed_numerically(grid) -> tuple[float, float, float, float]:
    """REML fit of the crossed model on a grid with missing cells (NaN): (mu, v_order, v_seed, v_resid).

    The residual variance is profiled out and the two variance ratios (>= 0) searched by SLSQP with the analytic
    gradient (`_profiled_reml`) from several starts, the boundary ones included; the best optimum is kept and mu is
    its GLS mean. tests/test_order_analysis.py checks its log-likelihood against the closed form on complete grids.
    """
    y, z_order, z_seed = crossed_design(grid)
    if z_order.sum(axis=0).min() < 1 or z_seed.sum(axis=0).min() < 1:
        raise ValueError("a crossed fit needs every ordering and every seed observed at least once")
    additive = np.hstack([z_order, z_seed])
    residual = y - additive @ np.linalg.lstsq(additive, y, rcond=None)[0]
    if np.abs(residual).max() <= 1e-12 * max(1.0, np.abs(y).max()):  # rounding of an exact fit
        raise ValueError("the observed cells fit y = mu + a_o + b_s exactly: the REML likelihood has no maximum")

    def objective(ratios):
        return _profiled_reml(ratios, y, z_order, z_seed)[:2]

    starts = [(0.0, 0.0), (1.0, 1.0), (100.0, 1.0), (1.0, 100.0)]  # ratios of 0 to 100: SDs 0 to 10x the residual
    # SLSQP: bounded, and free of the multi-threaded BLAS calls that make L-BFGS-B crawl on a busy machine
    fits = [optimize.minimize(objective, start, jac=True, method="SLSQP", bounds=[(0.0, None)] * 2,
                              options={"ftol": 1e-15, "maxiter": 2000}) for start in starts]
    ratios = min(fits, key=lambda fit: fit.fun).x
    gls = _profiled_reml(ratios, y, z_order, z_seed)[2]
    return gls["mu"], float(ratios[0] * gls["v_resid"]), float(ratios[1] * gls["v_resid"]), gls["v_resid"]


def fit_crossed(grid: np.ndarray) -> tuple[float, float, float, float]:
    """REML fit of y[o, s] = mu + a_o + b_s + e_os: (mu, v_order, v_seed, v_resid). A complete grid: the closed
    form (`reml_balanced`); a grid with missing cells (NaN): the numerical search (`fit_crossed_numerically`)."""
    grid = np.asarray(grid, dtype=float)
    if grid.shape[0] < 2 or grid.shape[1] < 2:
        raise ValueError(f"a crossed fit needs >= 2 orderings and >= 2 seeds, got a {grid.shape[0]} x "
                         f"{grid.shape[1]} grid")
    if np.isfinite(grid).all():
        return (float(grid.mean()), *reml_balanced(two_way_anova(grid)))
    return fit_crossed_numerically(grid)


def mls_interval(ms_1, df_1, ms_2, df_2, confidence: float = 0.95) -> tuple:
    """Modified large-sample (MLS) interval for theta_1 - theta_2, where MS_i estimates theta_i on df_i degrees of
    freedom (independent scaled chi-squares); bounds below 0 are set to 0 (the difference is a variance).

    Graybill & Wang (1980), JASA 75:869, for the difference by Ting, Burdick, Graybill, Jeyaratnam & Lu (1990),
    J. Stat. Comput. Simul. 35:135, as given in Burdick & Graybill (1992), Confidence Intervals on Variance
    Components (the difference of two expected mean squares). Exact when either mean square's variance vanishes.
    Works on arrays.
    """
    tail = (1 - confidence) / 2
    f1_high, f1_low = (stats.chi2.ppf(q, df_1) / df_1 for q in (1 - tail, tail))  # F(df_1, inf) quantiles
    f2_high, f2_low = (stats.chi2.ppf(q, df_2) / df_2 for q in (1 - tail, tail))
    f12_high, f12_low = (stats.f.ppf(q, df_1, df_2) for q in (1 - tail, tail))
    g1, g2 = 1 - 1 / f1_high, 1 - 1 / f2_high
    h1, h2 = 1 / f1_low - 1, 1 / f2_low - 1
    g12 = ((f12_high - 1) ** 2 - g1**2 * f12_high**2 - h2**2) / f12_high
    h12 = ((1 - f12_low) ** 2 - h1**2 * f12_low**2 - g2**2) / f12_low
    estimate = ms_1 - ms_2
    low = estimate - np.sqrt(g1**2 * ms_1**2 + h2**2 * ms_2**2 + g12 * ms_1 * ms_2)
    high = estimate + np.sqrt(h1**2 * ms_1**2 + g2**2 * ms_2**2 + h12 * ms_1 * ms_2)
    return np.maximum(low, 0.0), np.maximum(high, 0.0)


def ordering_permutation_test(grid, resamples: int = 9999, seed: int = 0) -> dict:
    """Permutation F test of the ordering with the seed as a block (restricted permutations).

    Anderson, M. J. and ter Braak, C. J. F. (2003). Permutation tests for multi-factorial analysis of variance.
    J. Statistical Computation and Simulation 73(2), 85-113. Under H0 (the ordering has no effect beyond what any
    perturbation does) a seed's column of accuracies is exchangeable across orderings, so each column is permuted
    independently (column 0 kept: permuting every column alike leaves F as it is); the statistic is the two-way
    ANOVA's F = MS(ordering) / MS(residual). Within a permutation SS(ordering) + SS(residual) is fixed, so F is
    increasing in SS(ordering), which is what is compared (rounding ties within 1e-9 of that total count as ties).
    Vectorised: `resamples` permutations by argsort of uniform draws from numpy's default_rng(`seed`).
    Monte Carlo p = (1 + #{F* >= F}) / (1 + resamples), valid at every `resamples` (Phipson & Smyth 2010).
    The design has (k!)^(s-1) arrangements, so no p below `min_p` = max(1/(k!)^(s-1), 1/(resamples + 1)).
    F without any residual scatter is the largest finite float (it stays comparable and JSON-safe).
    """
    grid = np.asarray(grid, dtype=float)
    k, s = grid.shape
    anova = two_way_anova(grid)
    ss_order, total = float(anova["ss"]["order"]), float(anova["ss"]["order"] + anova["ss"]["resid"])
    ms_resid = float(anova["ms"]["resid"])
    if ms_resid > 0:
        statistic = float(anova["ms"]["order"]) / ms_resid
    else:
        statistic = np.finfo(float).max if ss_order > 0 else 0.0
    order = np.argsort(np.random.default_rng(seed).random((resamples, s - 1, k)), axis=2)  # [R, column, row]
    row_sums = grid[:, 0] + grid[:, 1:].T[np.arange(s - 1)[:, None], order].sum(axis=1)
    ss_permuted = s * ((row_sums / s - grid.mean()) ** 2).sum(axis=1)
    exceed = int((ss_permuted >= ss_order - 1e-9 * total).sum())
    return {"test": PERMUTATION_TEST, "statistic": statistic, "p_value": (1 + exceed) / (1 + resamples),
            "resamples": resamples, "min_p": smallest_p(k, s, resamples)}


def smallest_p(n_orderings: int, n_seeds: int, resamples: int) -> float:
    """The smallest p the permutation test can give on a k x s grid: max(1/(k!)^(s-1), 1/(resamples + 1))."""
    return max(math.exp(-(n_seeds - 1) * math.lgamma(n_orderings + 1)), 1 / (resamples + 1))


PERMUTATION_TEST = "permutation F test of ordering within seeds (Anderson & ter Braak 2003)"


def sd_with_interval(values: np.ndarray, alpha: float) -> tuple[float, tuple[float, float]]:
    """The sample SD (ddof 1) and its chi-square interval, for a factor that is the grid's only source of spread."""
    sd, df = float(np.std(values, ddof=1)), len(values) - 1
    return sd, tuple(math.sqrt(df * sd**2 / stats.chi2.ppf(q, df)) for q in (1 - alpha, alpha))


# ------------------------------------------------------------------------------ the order analysis (issue 25)


@dataclass(frozen=True)
class AnalysisOptions:
    """What `analyse_orders` may be told beyond `order_analysis`'s signature (report.* in params overrides)."""

    confidence: float = 0.95  # the report's level (params report.confidence); alpha = 1 - confidence
    resamples: int = 9999  # permutations of the F test: p resolves to 1/(resamples + 1) (Phipson & Smyth 2010)
    seed: int = 0  # the permutation generator's seed: the same p on every machine
    power: float = 0.8  # power at which the smallest detectable effect is stated (Cohen 1988's convention)
    seed_reaches: bool = False  # the seed perturbs every input of every method (the last-bit perturbation,
    #   run.last_bit): a grid the seed leaves unchanged is then a method the perturbation does not move, and its
    #   orderings are tested; False: such a grid may be a method the seed never reached ("no control")


KIND_CONTRAST_TEST = "Welch t test on per-ordering means (seed effect cancels)"
KIND_CONTRAST_INTERVAL = "Welch-Satterthwaite t interval"
SD_INTERVAL = "MLS (Graybill-Wang) interval on REML SD"
REQUIRED_COLUMNS = ("kind", "ordering", "seed", "accuracy")
ROW_COLUMNS = ["term", "kind", "estimate", "ci_low", "ci_high", "p_value", "verdict", "test", "interval",
               "statistic", "df", "df_residual", "estimate_se", "min_p", "mde", "n_orderings", "n_seeds", "mean",
               "sd_orderings", "sd_seed", "sd_residual", "note", "reference"]


def main_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of the kind/ordering model, checked: replicate 0 (or no `replicate` column). Rows with replicate > 0
    repeat a cell under a last-bit perturbation alone; they measure chaos (`chaos_sd`) and would otherwise weigh
    their cells twice."""
    missing = [c for c in REQUIRED_COLUMNS if c not in runs.columns]
    if missing:
        raise ValueError(f"runs lack the column(s) {missing}; they have {list(runs.columns)}")
    if runs.empty:
        raise ValueError("runs is empty: no accuracy to analyse")
    accuracy = pd.to_numeric(runs["accuracy"], errors="coerce")
    bad = ~np.isfinite(accuracy) | (accuracy < 0) | (accuracy > 1)
    if bad.any():
        raise ValueError(f"accuracy must be a fraction in [0, 1]; {run_name(runs[bad].iloc[0])} has "
                         f"{python(runs[bad].iloc[0]['accuracy'])!r}")
    replicate = (runs["replicate"].fillna(0) if "replicate" in runs.columns else pd.Series(0, index=runs.index))
    if (replicate < 0).any():
        raise ValueError(f"replicate must be >= 0; {run_name(runs[replicate < 0].iloc[0])} has "
                         f"{python(replicate[replicate < 0].iloc[0])!r}")
    main = runs.loc[replicate == 0, list(REQUIRED_COLUMNS)].assign(accuracy=accuracy[replicate == 0])
    duplicated = main.duplicated(["kind", "ordering", "seed"])
    if duplicated.any():
        raise ValueError(f"two runs of {run_name(main[duplicated].iloc[0])} (give repeats a replicate > 0)")
    return main


def python(value):
    """A numpy scalar as the Python value it holds (for messages)."""
    return value.item() if isinstance(value, np.generic) else value


def run_name(row) -> str:
    """A run as a message names it."""
    return f"kind {python(row['kind'])!r}, ordering {python(row['ordering'])!r}, seed {python(row['seed'])!r}"


def kind_grids(runs: pd.DataFrame, reference_kind: str | None = None) -> dict[str, np.ndarray]:
    """Each kind's complete [orderings, seeds] grid of main runs (first-seen order), the reference kind first. Every
    kind must have every seed of the reference (the contrasts cancel the seed effect only over the same seeds)."""
    main = main_runs(runs)
    grids = {}
    for kind, sub in main.groupby("kind", sort=False):
        grid, orderings, seeds = accuracy_grid(sub["accuracy"], sub["ordering"], sub["seed"])
        if np.isnan(grid).any():
            holes = [f"({python(orderings[o])!r}, seed {python(seeds[s])!r})"
                     for o, s in zip(*np.nonzero(np.isnan(grid)))]
            raise ValueError(f"kind {kind!r} misses {len(holes)} run(s) of its orderings x seeds grid: "
                             f"{', '.join(holes[:5])}{' ...' if len(holes) > 5 else ''}")
        grids[kind] = (grid, {python(seed) for seed in seeds})
    if reference_kind is not None and reference_kind not in grids:
        raise ValueError(f"reference kind {reference_kind!r} has no runs; the kinds are {list(grids)}")
    reference_seeds = grids[reference_kind][1] if reference_kind is not None else None
    for kind, (_, seeds) in grids.items():
        if reference_seeds is not None and seeds != reference_seeds:
            raise ValueError(f"kind {kind!r} has seeds {sorted(seeds, key=str)} but the reference {reference_kind!r} "
                             f"has {sorted(reference_seeds, key=str)}: a contrast needs the same seeds")
    ordered = ([reference_kind] if reference_kind is not None else []) + [k for k in grids if k != reference_kind]
    return {kind: grids[kind][0] for kind in ordered}


def kind_contrast(kind_means, reference_means, confidence: float = 0.95) -> dict:
    """A kind's mean accuracy minus the reference kind's, from the per-ordering means (each averaged over the same
    seeds, so the seed effect b_s cancels), with Welch's t test and its Welch-Satterthwaite interval (Welch 1947,
    Biometrika 34:28; scipy.stats.ttest_ind(equal_var=False)): valid when the kinds' spreads between orderings
    differ. Assumes the seed effect is shared by the kinds (no kind x seed interaction).
    Both kinds without any spread: the difference is exact (p = 0 if it is not 0, else 1).
    """
    kind_means, reference_means = np.asarray(kind_means, float), np.asarray(reference_means, float)
    estimate = float(kind_means.mean() - reference_means.mean())
    out = {"estimate": estimate, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "statistic": math.nan,
           "df": math.nan, "estimate_se": math.nan, "min_p": 0.0, "test": KIND_CONTRAST_TEST,
           "interval": KIND_CONTRAST_INTERVAL, "note": ""}
    if len(kind_means) < 2 or len(reference_means) < 2:
        return {**out, "min_p": math.nan, "note": "too few orderings"}
    flat_kind, flat_reference = is_constant(kind_means), is_constant(reference_means)
    if flat_kind and flat_reference:
        return {**out, "ci_low": estimate, "ci_high": estimate, "p_value": float(estimate == 0), "estimate_se": 0.0,
                "statistic": math.inf if estimate else 0.0, "interval": "exact: no spread between orderings"}
    if flat_kind or flat_reference:  # Welch with one variance 0 is the other side's one-sample t (df = n - 1)
        sign, varying, constant = ((-1, reference_means, kind_means[0]) if flat_kind
                                   else (1, kind_means, reference_means[0]))
        result = stats.ttest_1samp(varying, constant)
        interval = result.confidence_interval(confidence)
        # the varying side's mean interval, less the flat side's value: the difference's interval
        low, high = sorted(sign * (float(bound) - constant) for bound in (interval.low, interval.high))
        return {**out, "ci_low": low, "ci_high": high, "p_value": float(result.pvalue), "df": float(result.df),
                "statistic": sign * float(result.statistic),
                "estimate_se": float(varying.std(ddof=1) / math.sqrt(len(varying)))}
    welch = welch_contrast(kind_means, reference_means, confidence)
    return {**out, **{name: float(value) for name, value in welch.items()}}


def is_constant(values) -> bool:
    """All values equal up to rounding (means of the same accuracies summed in another order differ in the last
    bits; real accuracies differ by at least 1/n_samples)."""
    values = np.asarray(values, dtype=float)
    return bool(np.ptp(values) <= ROUNDING * max(1.0, float(np.abs(values).max())))


ROUNDING = 1e-12  # relative: far below one sample in 10^6 (accuracies move in steps of 1/n), far above float eps


def welch_contrast(kind_means, reference_means, confidence: float = 0.95) -> dict:
    """Welch's t test and interval of mean(kind_means) - mean(reference_means) along the last axis (leading axes: a
    batch), by scipy.stats.ttest_ind(equal_var=False); needs >= 2 values on each side and some spread."""
    result = stats.ttest_ind(kind_means, reference_means, axis=-1, equal_var=False)
    interval = result.confidence_interval(confidence)
    se = np.sqrt(np.var(kind_means, axis=-1, ddof=1) / np.shape(kind_means)[-1]
                 + np.var(reference_means, axis=-1, ddof=1) / np.shape(reference_means)[-1])
    return {"estimate": np.mean(kind_means, axis=-1) - np.mean(reference_means, axis=-1), "ci_low": interval.low,
            "ci_high": interval.high, "p_value": result.pvalue, "statistic": result.statistic, "df": result.df,
            "estimate_se": se}


def within_kind_spread(grid, confidence: float = 0.95, resamples: int = 9999, seed: int = 0,
                       seed_reaches: bool = False) -> dict:
    """The random-effect SD of the ordering on one kind's [orderings, seeds] grid: REML estimate (closed form), MLS
    interval for v_order = (E[MS_order] - E[MS_resid]) / s (`mls_interval`), permutation F test within seeds
    (`ordering_permutation_test`). Degenerate grids get NaNs and a note, never an exception:
    - < 2 orderings: "too few orderings"; 1 seed: "no seed replicate" (the ordering and the residual are confounded);
    - every ordering alike under each seed: SD 0 exactly, p = 1;
    - the seed changes nothing (every column alike) but the orderings differ: the SD over orderings with its
      chi-square interval. Where the seed is known to reach the method (`seed_reaches`: its features' last bits
      move under every seed), the method is not moved by the perturbation, so the permutation test runs (an ordering
      effect consistent under every seed gives its design's smallest p); else "seed has no effect: no control" and
      no test: the seed may never have reached it.
    """
    grid = np.asarray(grid, dtype=float)
    k, s = grid.shape
    means = grid.mean(axis=1)
    out = {"estimate": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "statistic": math.nan,
           "df": k - 1, "df_residual": (k - 1) * (s - 1), "estimate_se": math.nan, "min_p": math.nan,
           "test": PERMUTATION_TEST, "interval": SD_INTERVAL, "n_orderings": k, "n_seeds": s,
           "mean": float(grid.mean()), "sd_orderings": float(means.std(ddof=1)) if k > 1 else math.nan,
           "sd_seed": math.nan, "sd_residual": math.nan, "note": ""}
    if k < 2 or s < 2:
        return {**out, "note": "too few orderings" if k < 2 else "no seed replicate"}
    if np.all(grid == grid[:1]):
        return {**out, "estimate": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0,
                "min_p": smallest_p(k, s, resamples),
                "sd_residual": 0.0, "sd_seed": float(grid[0].std(ddof=1)),
                "interval": "exact: every ordering gives the same accuracy under each seed"}
    if np.all(grid == grid[:, :1]):
        sd, (low, high) = sd_with_interval(grid[:, 0], (1 - confidence) / 2)
        stable = {**out, "estimate": sd, "ci_low": low, "ci_high": high, "sd_seed": 0.0, "sd_residual": 0.0,
                  "interval": "SD over orderings, chi-square interval (the seed does not change the runs)"}
        if not seed_reaches:
            return {**stable, "note": "seed has no effect: no control"}
        test = ordering_permutation_test(grid, resamples, seed)
        return {**stable, "p_value": test["p_value"], "statistic": test["statistic"], "min_p": test["min_p"]}
    anova = two_way_anova(grid)
    v_order, v_seed, v_resid = reml_balanced(anova)
    low, high = mls_interval(float(anova["ms"]["order"]), k - 1, float(anova["ms"]["resid"]), (k - 1) * (s - 1),
                             confidence)
    test = ordering_permutation_test(grid, resamples, seed)
    return {**out, "estimate": math.sqrt(v_order), "ci_low": math.sqrt(low / s), "ci_high": math.sqrt(high / s),
            "p_value": test["p_value"], "statistic": test["statistic"], "min_p": test["min_p"],
            "sd_seed": math.sqrt(v_seed), "sd_residual": math.sqrt(v_resid)}


def analyse_orders(runs: pd.DataFrame, *, reference_kind: str = "shuffle", margin: float | None = None,
                   options: AnalysisOptions | None = None) -> pd.DataFrame:
    """`order_analysis` with its options (level, permutations, generator seed, power) spelled out."""
    options = options or AnalysisOptions()
    grids = kind_grids(runs, reference_kind)
    reference_means = grids[reference_kind].mean(axis=1)
    rows = []
    for kind, grid in grids.items():
        spread = within_kind_spread(grid, options.confidence, options.resamples, options.seed, options.seed_reaches)
        if kind != reference_kind:
            contrast = kind_contrast(grid.mean(axis=1), reference_means, options.confidence)
            rows.append({**spread, "df_residual": math.nan, **contrast, "term": "kind", "kind": kind})
        rows.append({**spread, "term": "ordering", "kind": kind})
    frame = pd.DataFrame(rows, columns=ROW_COLUMNS).assign(reference=reference_kind)
    alpha = 1 - options.confidence
    frame["mde"] = min_detectable(frame, alpha, options.power)
    frame["verdict"] = verdicts(frame, frame["p_value"], alpha=alpha, margin=margin, n_tests=1)
    return frame


def order_analysis(runs: pd.DataFrame, *, reference_kind: str = "shuffle", margin: float | None = None
                   ) -> pd.DataFrame:
    """Does the order matter, beyond chance? One row per (term, kind) of one (stream, method)'s runs.

    Model: accuracy y = mu_kind + a_ordering(kind) + b_seed + e; kinds fixed, orderings within a kind and seeds
    random (`ORDER_DEFINITIONS`). Input: one row per run, columns `kind`, `ordering` (an ordering is (kind,
    ordering): labels may repeat across kinds), `seed`, `accuracy` (a fraction), optional `replicate` (rows with
    replicate > 0 are left to `chaos_sd`). Every kind must hold a complete orderings x seeds grid over the
    reference's seeds. Output (`ROW_COLUMNS`):
    - term "kind", one row per kind other than the reference: its contrast with the reference kind (`kind_contrast`);
    - term "ordering", one row per kind, the reference included: the random-effect SD of the ordering within that
      kind (`within_kind_spread`);
    - `p_value` unadjusted; `verdict` by `verdicts` at alpha = 1 - 0.95 without adjustment, `mde` at that alpha
      (the report adjusts across its rows and calls `verdicts` and `min_detectable` again). `margin` (accuracy
      units, e.g. 0.01 for 1 point) enables the equivalence verdict.
    Closed forms and one vectorised permutation test per kind: well under 0.2 s for 4 kinds of 11 x 3.
    """
    return analyse_orders(runs, reference_kind=reference_kind, margin=margin)


def corrected_threshold(alpha: float, n_tests: int) -> float:
    """The threshold a row's p must pass when it is the only discovery among `n_tests`: alpha / n_tests (Holm's
    first step and BH's smallest rank alike). A design whose smallest p is above it can never pass."""
    return alpha / max(n_tests, 1)


def could_pass(p_values, min_p, method: str = "fdr_bh", alpha: float = 0.05) -> np.ndarray:
    """Per row: whether it would pass the adjustment had its design given the smallest p it can give (`min_p`),
    every other row's p as observed. A row that could not is underpowered *in this report*: under BH the threshold
    a row faces grows with the discoveries beside it (rank r of m: alpha r / m), so a small design (4 orderings x 3
    seeds, p >= 1/576) passes among many discoveries and not alone. NaN rows (no test) are False."""
    p_values = np.asarray(p_values, dtype=float)
    min_p = np.asarray(min_p, dtype=float)
    out = np.zeros(len(p_values), dtype=bool)
    for i in np.flatnonzero(np.isfinite(p_values) & np.isfinite(min_p)):
        best = p_values.copy()
        best[i] = min(min_p[i], p_values[i])
        out[i] = adjust(best, method)[i] < alpha
    return out


def row_thresholds(p_values, method: str = "fdr_bh", alpha: float = 0.05) -> np.ndarray:
    """The p each tested row must reach to pass, given the other rows' discoveries: with R of the m rows rejected
    besides it, BH's alpha (R + 1) / m, Holm's alpha / (m - R) (the step it would be taken at). NaN untested."""
    p_values = np.asarray(p_values, dtype=float)
    tested = np.isfinite(p_values)
    m = int(tested.sum())
    rejected = adjust(p_values, method) < alpha
    out = np.full(len(p_values), np.nan)
    for i in np.flatnonzero(tested):
        others = int(rejected.sum()) - int(rejected[i])
        out[i] = alpha * (others + 1) / m if method == "fdr_bh" else alpha / (m - others)
    return out


def min_detectable(rows: pd.DataFrame, threshold, power: float = 0.8) -> pd.Series:
    """The smallest effect each row detects with `power` at the (corrected) `threshold` (one for all rows, or one
    per row: `row_thresholds`), in accuracy units.
    - ordering rows: the SD(order) at which the F test on (k - 1, (k - 1)(s - 1)) df rejects with that power given
      the residual SD: v_order = (F_crit / F_{1-power} - 1) v_resid / s, since MS_order / MS_resid ~
      (1 + s v_order / v_resid) F under the model; infinite where the design's smallest p is above the threshold;
    - kind rows: (t_{1-threshold/2} + t_power) x SE of the contrast, on its Welch df.
    """
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=float), (len(rows),))
    out = []
    for row, threshold in zip(rows.itertuples(), thresholds):
        if math.isnan(threshold):
            out.append(math.nan)
        elif row.term == "ordering":
            if math.isnan(row.min_p) or row.min_p > threshold:  # no test, or one that can never pass
                out.append(math.nan if math.isnan(row.min_p) else math.inf)
                continue
            df = (row.df, row.df_residual)
            ratio = stats.f.ppf(1 - threshold, *df) / stats.f.ppf(1 - power, *df)
            out.append(math.sqrt((ratio - 1) * row.sd_residual**2 / row.n_seeds))
        else:
            quantiles = stats.t.ppf(1 - threshold / 2, row.df) + stats.t.ppf(power, row.df)
            out.append(float(quantiles * row.estimate_se) if row.estimate_se > 0 else row.estimate_se)
    return pd.Series(out, index=rows.index, dtype=float)


def points(value: float) -> str:
    """An accuracy difference in percentage points, one decimal."""
    return f"{100 * value:.1f}"


def verdicts(rows: pd.DataFrame, adjusted_p, *, alpha: float = 0.05, margin: float | None = None,
             n_tests: int | None = None, passable=None) -> pd.Series:
    """One verdict per row of `order_analysis` (or of several concatenated: columns term, kind, estimate, ci_low,
    ci_high, min_p, note), from its p-value after adjustment across the report's rows.

    In this order:
    - a row without a test (NaN p) keeps its note ("too few orderings", "no seed replicate",
      "seed has no effect: no control");
    - adjusted p < alpha: "ordering matters within <kind>" / "<kind> costs X points [low, high]" ("gains" when
      positive);
    - equivalence, where `margin` (accuracy units) is given: "no larger than m points" when the interval lies
      within +-margin (kind rows: TOST at the interval's level, alpha/2 each side) or below it (ordering rows: the
      SD's upper bound). An exact zero (interval [0, 0]) is "no larger than 0.0 points" without a margin;
    - "underpowered": the row could not pass even at its design's smallest p: `passable` (from `could_pass`,
      the adjustment's own rule given the other rows), else the design's smallest p above
      `corrected_threshold(alpha, n_tests)` (the rule for a row alone); the smallest effect it could detect
      otherwise: `min_detectable`;
    - "inconclusive" otherwise. Failing to reject is never read as "no effect".
    `n_tests`: the rows adjusted together (default: the finite adjusted p-values given).
    """
    adjusted_p = np.asarray(adjusted_p, dtype=float)
    if len(adjusted_p) != len(rows):
        raise ValueError(f"{len(adjusted_p)} adjusted p-values for {len(rows)} rows")
    n_tests = int(np.isfinite(adjusted_p).sum()) if n_tests is None else n_tests
    threshold = corrected_threshold(alpha, n_tests)
    can_pass = (np.asarray(rows["min_p"], dtype=float) <= threshold) if passable is None else np.asarray(passable)
    out = []
    for row, p, passes in zip(rows.itertuples(), adjusted_p, can_pass):
        within = (margin is not None and -margin < row.ci_low and row.ci_high < margin
                  if row.term == "kind" else margin is not None and row.ci_high < margin)
        if row.note and not np.isfinite(p):
            out.append(row.note)
        elif p < alpha and row.term == "ordering":
            out.append(f"ordering matters within {row.kind}")
        elif p < alpha:
            sign = 1 if row.estimate > 0 else -1  # a cost's interval as costs: [smallest, largest]
            low, high = sorted((sign * row.ci_low, sign * row.ci_high))
            out.append(f"{row.kind} {'gains' if sign > 0 else 'costs'} {points(abs(row.estimate))} points "
                       f"[{points(low)}, {points(high)}]")
        elif within:
            out.append(f"no larger than {points(margin)} points")
        elif row.ci_low == 0 and row.ci_high == 0:  # exact: no spread at all, or no difference at all
            out.append(f"no larger than {points(0.0)} points")
        elif not passes:
            out.append("underpowered")
        else:
            out.append("inconclusive")
    return pd.Series(out, index=rows.index, dtype=object)


ADJUSTMENTS = {"fdr_bh": "Benjamini-Hochberg false discovery rate", "holm": "Holm step-down family-wise error"}


def adjust(p_values, method: str = "fdr_bh") -> np.ndarray:
    """p-values adjusted across a report's rows (statsmodels multipletests): "fdr_bh" (Benjamini & Hochberg 1995,
    JRSS B 57:289) or "holm" (Holm 1979, Scand. J. Stat. 6:65). NaN (rows without a test) stay NaN, outside the
    family."""
    if method not in ADJUSTMENTS:
        raise ValueError(f"adjustment {method!r} is not one of {list(ADJUSTMENTS)}")
    p_values = np.asarray(p_values, dtype=float)
    from statsmodels.stats.multitest import multipletests

    adjusted = np.full_like(p_values, np.nan)
    tested = np.isfinite(p_values)
    if tested.any():
        adjusted[tested] = multipletests(p_values[tested], method=method)[1]
    return adjusted


def replicate_variance(values, cells) -> tuple[float, int]:
    """The within-cell variance pooled over the cells that hold >= 2 values, sum (y - cell mean)^2 / df, and its
    df = sum (n_cell - 1); (NaN, 0) without a repeated cell. `cells`: one label per value."""
    values = np.asarray(values, dtype=float)
    _, index = np.unique(np.asarray(cells), return_inverse=True)
    counts = np.bincount(index)
    deviation = values - (np.bincount(index, weights=values) / counts)[index]
    repeated = counts[index] > 1
    df = int((counts[counts > 1] - 1).sum())
    return (float((deviation[repeated] ** 2).sum() / df), df) if df else (math.nan, 0)


def chi_square_sd_interval(variance: float, df: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact interval for a normal SD from a variance estimate on df degrees of freedom:
    sqrt(df variance / chi2_{1-a/2}), sqrt(df variance / chi2_{a/2}); NaN without df."""
    if not df:
        return math.nan, math.nan
    tail = (1 - confidence) / 2
    low, high = (math.sqrt(df * variance / stats.chi2.ppf(q, df)) for q in (1 - tail, tail))
    return low, high


def chaos_test(grid, chaos_variance: float, chaos_df: int) -> dict:
    """Do one kind's orderings differ more than replicates of one run do? Both at a fixed view seed: the variance
    between orderings within each seed, pooled, v = sum_s sum_o (y[o,s] - mean_s)^2 / (s (k - 1)) (the ordering's
    effect and its interaction with the seed; the seed's own effect removed), against the chaos variance of the
    replicates. Under "orderings differ only by chaos" (y[o,s] = mu + b_s + chaos) v estimates the chaos variance,
    so F = v / chaos variance on (s (k - 1), chaos df); upper-tail p. `between_sd` is sqrt(v)."""
    grid = np.asarray(grid, dtype=float)
    k, s = grid.shape
    between = float(((grid - grid.mean(axis=0, keepdims=True)) ** 2).sum() / (s * (k - 1))) if k > 1 else math.nan
    out = {"between_sd": math.sqrt(between) if k > 1 else math.nan}
    if not chaos_df:
        return {**out, "statistic": math.nan, "p_value": math.nan, "note": "no replicates"}
    if k < 2:
        return {**out, "statistic": math.nan, "p_value": math.nan, "note": "too few orderings"}
    if chaos_variance == 0 and between == 0:
        return {**out, "statistic": math.nan, "p_value": math.nan, "note": "no spread at all"}
    statistic = between / chaos_variance if chaos_variance > 0 else math.inf
    return {**out, "statistic": statistic, "p_value": float(stats.f.sf(statistic, s * (k - 1), chaos_df)),
            "note": ""}


def chaos_sd(runs: pd.DataFrame, *, confidence: float = 0.95) -> pd.DataFrame:
    """The pure-chaos SD, measured from cells repeated under a last-bit perturbation alone, and per kind whether the
    orderings differ more than that chaos makes them differ (one row per kind).

    Cells are (kind, ordering, seed); the rows of a cell differ only by `replicate` (0 is the main run). The chaos
    variance is the within-cell variance pooled over every repeated cell of the frame (all kinds: one method on one
    stream; `replicate_variance`), with its chi-square interval for the SD. Per kind, `chaos_test` on the main
    runs' grid. "chaotic" is True when its F is not significant at alpha = 1 - confidence: the orderings differ no
    more than replicates of one run do. Its size is checked by simulation in tests/test_calibration_stats.py.
    """
    main_runs(runs)  # the checks
    cells = list(zip(runs["kind"], runs["ordering"], runs["seed"]))
    labels = pd.factorize(pd.Series(cells, index=runs.index))[0]
    variance, df = replicate_variance(pd.to_numeric(runs["accuracy"]), labels)
    low, high = chi_square_sd_interval(variance, df, confidence)
    repeated = int((np.bincount(labels) > 1).sum())
    rows = []
    for kind, grid in kind_grids(runs).items():
        test = chaos_test(grid, variance, df)
        rows.append({"kind": kind, "chaos_sd": math.sqrt(variance) if df else math.nan, "ci_low": low,
                     "ci_high": high, "df": df, "n_cells": repeated, "n_orderings": grid.shape[0],
                     "n_seeds": grid.shape[1], **test,
                     "chaotic": None if math.isnan(test["p_value"]) else bool(test["p_value"] >= 1 - confidence),
                     "test": "F = variance between orderings within seeds / chaos variance",
                     "interval": "chi-square interval"})
    return pd.DataFrame(rows)


def tail_summary(values, fraction: float = 0.1) -> dict:
    """Expected tail accuracy, exactly: the mean of the worst `fraction` of the runs as a fractional mean, the worst
    floor(fraction n) runs plus the matching fraction of the next (the expected shortfall of the runs' empirical
    distribution; Acerbi & Tasche 2002, J. Banking & Finance 26:1487). Below one run's worth, the worst run."""
    values = np.sort(np.asarray(values, dtype=float))
    n = len(values)
    if n == 0 or not 0 < fraction <= 1:
        raise ValueError(f"the tail needs runs and a fraction in (0, 1]; got {n} runs, fraction {fraction}")
    runs = round(fraction * n, 9)  # 0.1 x 30 is 3.0000000000000004
    whole = math.floor(runs)
    part = runs - whole
    value = (values[:whole].sum() + (part * values[whole] if part else 0.0)) / runs
    label = f"worst {whole} of {n} runs" if not part else f"worst {fraction:.0%} of {n} runs ({runs:g} runs)"
    return {"value": float(value), "k": whole, "n": n, "runs": runs, "label": label}


ORDER_DEFINITIONS = {
    "model": "run accuracy y = mu_kind + a_ordering(kind) + b_seed + e: the stream's kind (i.i.d. shuffle, "
             "class-blocked, ...) is fixed; the ordering within its kind, a ~ N(0, sd_order(kind)^2), and the view "
             "seed, b ~ N(0, sd_seed^2), are random and crossed; e ~ N(0, sd_residual^2). Each kind's orderings x "
             "seeds grid is fitted by closed-form REML (balanced two-way crossed model, the boundary pooled); runs "
             "repeated under a last-bit perturbation (replicate > 0) are left to the chaos SD",
    "kind_contrast": "a kind's mean accuracy minus the i.i.d. shuffle's, over per-ordering means averaged over the "
                     "same seeds (the seed effect cancels): Welch's t test and its Welch-Satterthwaite 95% interval "
                     "(Welch 1947), valid when the kinds scatter differently; n = orderings of each kind",
    "sd_order": "within a kind, the REML SD of the ordering's random effect, with a modified large-sample (MLS) 95% "
                "interval (Graybill & Wang 1980; Ting et al. 1990; Burdick & Graybill 1992) for (E[MS_order] - "
                "E[MS_residual]) / seeds, bounds below 0 set to 0; n = orderings x seeds",
    "ordering_test": "permutation F test of the ordering within seeds (Anderson & ter Braak 2003): each seed's "
                     "column permuted independently across orderings, F = MS(ordering) / MS(residual), Monte Carlo "
                     "p = (1 + #{F* >= F}) / (1 + R); a k x s grid has (k!)^(s-1) arrangements, so its smallest p "
                     "(min_p) is max(1/(k!)^(s-1), 1/(R+1))",
    "adjustment": "p-values adjusted across all tested rows of the report (statsmodels multipletests; Holm 1979 "
                  "family-wise, or Benjamini & Hochberg 1995 false discovery rate); both p-values are printed",
    "equivalence": "'no larger than m points' only when the 95% interval lies within +-m (a kind's contrast: two "
                   "one-sided tests at 2.5% each) or the SD's 95% upper bound is below m (report.equivalence_margin)",
    "verdicts": "'ordering matters within <kind>' / '<kind> costs X points [CI]' when the adjusted p < alpha; else "
                "'no larger than m points' (equivalence); else 'underpowered' when the design's smallest p cannot "
                "pass alpha / (tested rows); else 'inconclusive'",
    "min_detectable": "the smallest effect detected with 80% power at the corrected threshold: for SD(order), "
                      "sqrt((F_crit / F_0.2 - 1) sd_residual^2 / seeds), since MS(ordering) / MS(residual) is "
                      "(1 + seeds sd_order^2 / sd_residual^2) times an F variable; for a contrast, "
                      "(t_crit + t_0.8) x its SE; infinite where the design's smallest p cannot pass",
    "chaos_sd": "pure chaos: the SD between runs of one cell (same kind, ordering and view seed) that differ only "
                "by a seeded perturbation at the last bit of the feature cache's precision, pooled over repeated "
                "cells, chi-square 95% interval; 'chaotic' when F = (variance between a kind's orderings within each "
                "view seed) / chaos variance is not significant: at one seed the orderings differ no more than "
                "replicates of one run",
    "tail": "expected tail accuracy: the mean of exactly the worst 10% of the runs, fractional (the worst floor(n/10) "
            "runs plus the matching fraction of the next), per kind",
}
