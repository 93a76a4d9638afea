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


def paired_difference(correct, reference, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """Accuracy of a method minus a reference's, paired by sample within each ordering, combined over orderings.

    `correct` [samples, orderings]; `reference` [samples] (order-independent) or [samples, orderings].
    Two intervals, each over what its n counts:
    - over orderings: Student-t on the k per-ordering differences (k-1 df), from 2 orderings on;
    - over samples: percentile bootstrap of the mean per-sample difference (averaged over orderings), the
      samples resampled with replacement and kept paired across orderings (scipy.stats.bootstrap).
    """
    correct = np.asarray(correct, dtype=float)
    reference = np.asarray(reference, dtype=float)
    if reference.ndim == 1:
        reference = np.repeat(reference[:, None], correct.shape[1], axis=1)
    per_sample = (correct - reference).mean(axis=1)
    per_ordering = (correct - reference).mean(axis=0)
    over_orderings = t_interval(per_ordering, confidence)
    if np.all(per_sample == per_sample[0]):
        low = high = float(per_sample[0])
    else:
        boot = stats.bootstrap((per_sample,), np.mean, confidence_level=confidence, n_resamples=resamples,
                               method="percentile", random_state=np.random.default_rng(seed))
        low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    return {"mean_diff": float(per_ordering.mean()), "per_ordering": per_ordering.tolist(),
            "n_orderings": int(correct.shape[1]), "n_samples": int(correct.shape[0]),
            "ci_orderings": [over_orderings["low"], over_orderings["high"]], "ci_samples": [low, high]}


def half_width_by_count(values, confidence: float = 0.95) -> list[dict]:
    """The t-interval half-width after the first k values, k = 2..n (the evidence as orderings accumulate)."""
    values = list(values)
    return [{"orderings": k, "half_width": t_interval(values[:k], confidence)["half_width"]}
            for k in range(2, len(values) + 1)]
