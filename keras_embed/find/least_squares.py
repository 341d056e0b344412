"""The least-squares fits of the data mode: sums over the data and a ridge solve on chosen columns.

Example:
    >>> rows, constant = refit(stats.gram, stats.cross, [0, 3])   # columns 0 and 3 of [a, 1], and the constant
"""

import dataclasses

import numpy as np

RIDGE = 1e-8


@dataclasses.dataclass(frozen=True)
class RegressionStats:
    """Sums over the data: gram = [a,1]^T [a,1], cross = [a,1]^T (r L), energy = sum ||r L||^2."""

    gram: np.ndarray
    cross: np.ndarray
    energy: float


def refit(gram, cross, columns, ridge=RIDGE, intercept=True):
    """Ridge least squares of the target on [a_columns, 1] (on a_columns alone without
    `intercept`, the constant then 0): returns (rows for the columns, constant row)."""
    chosen = list(columns) + ([gram.shape[0] - 1] if intercept else [])
    sub = gram[np.ix_(chosen, chosen)]
    regularizer = ridge * max(float(np.mean(np.diag(sub))), 1e-300) * np.eye(len(chosen))
    solution = np.linalg.solve(sub + regularizer, cross[chosen])
    return solution[:len(columns)], solution[len(columns)] if intercept else np.zeros(cross.shape[1])
