"""Statistics over seeds and between models, computed with `scipy.stats`.

A figure from one training run moves with its seed, so kernorm reports a
configuration over several seeds (mean, standard deviation and a Student t
95 % confidence interval), compares two configurations over matched seeds
(the same seed gives both the same initial weights and data order where their
networks allow it), and compares two single models image by image (McNemar's
exact test). This module needs no TensorFlow.
"""

import math

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
POWER = 0.8


def describe(values):
    """Mean, sample standard deviation and t confidence interval of the mean of `values`.

    Args:
        values: one figure per seed.

    Returns:
        A dict: `n`, `mean`, `sd`, `ci` (`[low, high]`) and `values`; `sd` and
        `ci` are None for fewer than two values.
    """
    values = [float(v) for v in values]
    n = len(values)
    if n < 2:
        return {"n": n, "mean": values[0] if values else None, "sd": None, "ci": None, "values": values}
    ci = stats.ttest_1samp(values, 0.0).confidence_interval(CONFIDENCE)
    return {"n": n, "mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)),
            "ci": [float(ci.low), float(ci.high)], "values": values}


def paired(a, b):
    """Compares `b` with `a` over matched seeds: `b - a`.

    Args:
        a, b: one figure per seed each, in the same seed order (at least 2).

    Returns:
        A dict: `n`, `difference` (mean of `b - a`), `ci` (its t confidence
        interval), `t_p` (paired t-test), `wilcoxon_p` (Wilcoxon signed-rank,
        exact for small n; 1 when every difference is 0) and `detectable`
        (`detectable_difference` for these seeds' spread).
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    differences = b - a
    n = len(differences)
    if not differences.any():  # no difference at all: scipy's tests have no spread to work with
        return {"n": n, "difference": 0.0, "ci": [0.0, 0.0], "t_p": 1.0, "wilcoxon_p": 1.0, "detectable": 0.0}
    test = stats.ttest_rel(b, a)
    ci = test.confidence_interval(CONFIDENCE)
    return {"n": n, "difference": float(differences.mean()), "ci": [float(ci.low), float(ci.high)],
            "t_p": float(test.pvalue), "wilcoxon_p": float(stats.wilcoxon(differences).pvalue),
            "detectable": detectable_difference(float(differences.std(ddof=1)), n)}


def holm(pvalues):
    """Holm's step-down correction of `pvalues` for the family they form (scipy has none).

    The i-th smallest p is multiplied by (m − i + 1), each adjusted p is made at
    least the one before it, and all are capped at 1.

    Returns:
        The adjusted p-values, in the order given.
    """
    m = len(pvalues)
    adjusted, running = [0.0] * m, 0.0
    for rank, index in enumerate(np.argsort(pvalues, kind="stable")):
        running = max(running, min(1.0, (m - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


def detectable_difference(sd, n, alpha=ALPHA, power=POWER):
    """The smallest mean difference a two-sided paired t-test over `n` seeds finds with `power`.

    Args:
        sd: the standard deviation of the paired differences.
        n: seeds (pairs), at least 2.
        alpha: the test's significance level.
        power: the probability of finding a difference of that size.

    Returns:
        The difference, in the units of `sd`'s figures. The power of the test
        comes from the noncentral t distribution; the chance of rejecting in
        the wrong direction, negligible at this power, is left out.
    """
    if sd == 0:
        return 0.0
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(effect):  # power at a difference of effect·sd, less the power asked for
        nc = effect * math.sqrt(n)
        return stats.nct.sf(critical, df, nc) - power

    return float(optimize.brentq(shortfall, 1e-6, 100.0) * sd)


def mcnemar(predicted_a, predicted_b, labels):
    """McNemar's exact test between two models' predictions on the same images.

    Args:
        predicted_a, predicted_b: each model's predicted class per image.
        labels: the true classes.

    Returns:
        A dict: `a_only` (images only model a gets right), `b_only`,
        `accuracy_a`, `accuracy_b` and `p` (exact binomial test of `b_only`
        among the discordant images; 1 when there are none).
    """
    right_a = np.asarray(predicted_a) == np.asarray(labels)
    right_b = np.asarray(predicted_b) == np.asarray(labels)
    a_only, b_only = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    p = stats.binomtest(b_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "accuracy_a": float(right_a.mean()),
            "accuracy_b": float(right_b.mean()), "p": float(p)}
