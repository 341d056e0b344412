"""One-sided upper confidence bounds on what a compression costs, from the rows it is judged on.

An accuracy drop measured on n rows is a point estimate: with a few hundred rows one
prediction is 0.3 points. The two models are judged on the same rows, so only the rows
where they disagree about being right count: `losses` (right before, wrong after) and
`gains` (wrong before, right after); the drop is (losses - gains) / n. Its upper bound at
confidence C is the exact (Clopper-Pearson) upper bound of the loss share minus the exact
lower bound of the gain share, each at level (1 - C) / 2, so both hold together with
probability at least C (Bonferroni; no normal approximation, valid for any n). A model
that agrees with the original on every row is still only bounded at about 3.7 / n
points at 95%: rows, not luck, certify a small budget.

The relative output error ||outputs - reference|| / ||reference|| is bounded through the
mean squared error per row, with a one-sided Student t bound (asymptotic: it assumes the
mean of the rows' squared errors is close to normal, which holds for many rows of
bounded error, not for a handful of rows with rare large errors).

Example:
    >>> accuracy_drop_bound(losses=2, gains=1, rows=1000, confidence=0.95)   # 0.1 pp measured
    0.718...
    >>> rows_to_certify(losses=2, gains=1, rows=1000, budget=0.3, confidence=0.95)
    6750
"""

import math

import numpy as np
from scipy import stats


def accuracy_drop_bound(losses, gains, rows, confidence):
    """Upper bound, in percentage points, of the accuracy drop at `confidence` (see the module);
    `losses` and `gains` may be fractional (the beta quantiles extend to them smoothly)."""
    alpha = (1.0 - confidence) / 2
    upper_losses = 1.0 if losses >= rows else float(stats.beta.ppf(1 - alpha, losses + 1, rows - losses))
    lower_gains = 0.0 if gains <= 0 else float(stats.beta.ppf(alpha, gains, rows - gains + 1))
    return 100.0 * (upper_losses - lower_gains)


def rows_to_certify(losses, gains, rows, budget, confidence):
    """The fewest rows, at the same shares of losses and gains, whose bound is within
    `budget` points; None when the shares themselves exceed it (no row count would do)."""
    if 100.0 * (losses - gains) / rows >= budget:
        return None

    def certified(count):  # the shares scaled to `count` rows, not rounded: the bound then falls steadily
        return accuracy_drop_bound(losses * count / rows, gains * count / rows, count, confidence) <= budget

    if certified(rows):
        return rows
    low, high = rows, 2 * rows
    while not certified(high):
        low, high = high, 2 * high
    while high - low > max(1, low // 100):  # within 1%: the shares are estimates anyway
        middle = (low + high) // 2
        low, high = (low, middle) if certified(middle) else (middle, high)
    return high


def output_error_bound(squared_errors, reference_power, confidence):
    """Upper bound of the relative output error at `confidence` from each row's squared
    error (`squared_errors`) and the mean squared norm of the reference rows."""
    rows = len(squared_errors)
    if rows < 2 or reference_power <= 0:
        return math.inf
    mean = float(np.mean(squared_errors))
    spread = float(np.std(squared_errors, ddof=1)) / math.sqrt(rows)
    return math.sqrt(max(0.0, mean + float(stats.t.ppf(confidence, rows - 1)) * spread) / reference_power)
