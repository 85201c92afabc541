"""Statistics over seeds and between models, computed with `scipy.stats`.

A figure from one training run moves with its seed, so kernorm reports a
configuration over several seeds (mean, standard deviation and a Student t
95 % confidence interval, clipped to what the figure can be), compares two
configurations over matched seeds (the same seed gives both the same initial
weights and data order where their networks allow it; a difference without
spread over the seeds is not testable), and compares two single models image
by image (McNemar's exact test). This module needs no TensorFlow.
"""

import math

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
POWER = 0.8
# The step an accuracy on MNIST's 10,000 test images moves in, in percentage points: one image.
RESOLUTION = 0.01


def describe(values, bounds=(-math.inf, math.inf)):
    """Mean, sample standard deviation and t confidence interval of the mean of `values`.

    With few seeds the t interval can reach past what the figure can be (two
    seeds of an accuracy: below 0 or above 100 %), so it is clipped to
    `bounds`; the mean lies within them, so clipping never drops it from the
    interval, and `clipped` says when the interval was cut.

    Args:
        values: one figure per seed.
        bounds: `(low, high)`, the range the figure cannot leave, e.g. `(0, 1)`
            for an accuracy.

    Returns:
        A dict: `n`, `mean`, `sd`, `ci` (`[low, high]`), `clipped` and
        `values`; `sd` is None for fewer than two values, `ci` also for values
        that do not vary (the t interval has no spread to work with).
    """
    values = [float(v) for v in values]
    n = len(values)
    result = {"n": n, "mean": values[0] if values else None, "sd": None, "ci": None, "clipped": False,
              "values": values}
    if n < 2:
        return result
    if len(set(values)) == 1:
        return {**result, "sd": 0.0}
    ci, clipped = bounded_interval(stats.ttest_1samp(values, 0.0), bounds)
    return {**result, "mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)), "ci": ci,
            "clipped": clipped}


def bounded_interval(test, bounds):
    """The `CONFIDENCE` interval of a scipy t-test result, clipped to `bounds`: `([low, high], clipped)`."""
    ci = test.confidence_interval(CONFIDENCE)
    low, high = float(max(ci.low, bounds[0])), float(min(ci.high, bounds[1]))
    return [low, high], (low, high) != (ci.low, ci.high)


def paired(a, b, resolution=RESOLUTION, bounds=(-math.inf, math.inf)):
    """Compares `b` with `a` over matched seeds: `b - a`.

    The differences are first rounded to a multiple of `resolution`: the float
    noise of `100 * accuracy` (0.030000000000001 against 0.03) would otherwise
    split the Wilcoxon test's ties, and give a difference that is the same on
    every seed a spread it does not have. A difference without spread leaves
    the paired t-test undefined (its mean over a standard error of 0): it is
    not testable with these seeds, and `t_p` and `ci` are None, never p = 0.

    Args:
        a, b: one figure per seed each, in the same seed order (at least 2);
            accuracies in percent.
        resolution: the step the figures move in.
        bounds: `(low, high)`, the range the difference cannot leave, e.g.
            `(-100, 100)` for accuracies in percent: its interval is clipped
            to it, as `describe`'s.

    Returns:
        A dict: `n`, `difference` (mean of `b - a`), `sd` (standard deviation
        of the differences), `spread` (whether they vary), `ci` (the
        difference's t confidence interval), `clipped`, `t_p` (paired t-test),
        `wilcoxon_p` (Wilcoxon signed-rank, exact for small n; 1 when every
        difference is 0).
    """
    differences = np.rint((np.asarray(b, float) - np.asarray(a, float)) / resolution) * resolution
    result = {"n": len(differences), "difference": float(differences.mean()), "sd": 0.0, "spread": False,
              "ci": None, "clipped": False, "t_p": None,
              "wilcoxon_p": float(stats.wilcoxon(differences).pvalue) if differences.any() else 1.0}
    if len(set(differences)) == 1:
        return result
    test = stats.ttest_1samp(differences, 0.0)
    ci, clipped = bounded_interval(test, bounds)
    return {**result, "sd": float(differences.std(ddof=1)), "spread": True, "ci": ci, "clipped": clipped,
            "t_p": float(test.pvalue)}


def holm(pvalues):
    """Holm's step-down correction of `pvalues` for the family they form (scipy has none).

    The i-th smallest p is multiplied by (m − i + 1), each adjusted p is made at
    least the one before it, and all are capped at 1. A p of None (a comparison
    that could not be tested) counts in the family's m but is never rejected:
    it stays None.

    Returns:
        The adjusted p-values, in the order given.
    """
    m = len(pvalues)
    ranked = [1.0 if p is None else p for p in pvalues]
    adjusted, running = [0.0] * m, 0.0
    for rank, index in enumerate(np.argsort(ranked, kind="stable")):
        running = max(running, min(1.0, (m - rank) * ranked[index]))
        adjusted[index] = running
    return [None if p is None else q for p, q in zip(pvalues, adjusted)]


def detectable_difference(sd, n, alpha=ALPHA, power=POWER):
    """The smallest mean difference a two-sided paired t-test at level `alpha` over `n` seeds finds with `power`.

    Args:
        sd: the standard deviation of the paired differences, above 0.
        n: seeds (pairs), at least 2.
        alpha: the level the test's p is compared with: for a family of m
            Holm-corrected comparisons, the strictest is `ALPHA / m`.
        power: the probability of finding a difference of that size.

    Returns:
        The difference, in the units of `sd`'s figures. The power of the test
        comes from the noncentral t distribution; the chance of rejecting in
        the wrong direction, negligible at this power, is left out.
    """
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(effect):  # power at a difference of effect·sd, less the power asked for
        nc = effect * math.sqrt(n)
        return stats.nct.sf(critical, df, nc) - power

    high = 100.0
    while shortfall(high) < 0:  # two seeds at a strict level need hundreds of sd
        high *= 10
    return float(optimize.brentq(shortfall, 1e-6, high) * sd)


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
