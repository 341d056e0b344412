"""The one duplicate grouping: rows of a matrix that lie within a tolerance of each other.

Every rule that looks for copies uses it: exact duplicates (incoming weights within
`rtol`, max-abs), the condense merge and the monitor's near copies (cosine at least `c`,
that is unit vectors within sqrt(2 (1 - c)) in Euclidean distance). Sorting by a random
projection keeps it near-linear: rows within `tol` have projections within `tol` times
the direction's dual norm, so each row is compared only with its neighbours in that order,
in NumPy.

Example:
    >>> close_groups(np.array([[1.0, 2.0], [5.0, 5.0], [1.0, 2.0 + 1e-9]]), tol=1e-6)
    [[0, 2]]
    >>> cosine_groups(np.array([[1.0, 0.0], [2.0, 1e-4], [0.0, 1.0]]), cos=0.999)
    [[0, 1]]
"""

import math

import numpy as np

_NORMS = {"max": (np.inf, 1), "l2": (2, 2)}  # metric -> (its order, the order of its dual norm)


def close_groups(vectors, tol, metric="max"):
    """Groups rows of `vectors` within `tol` of the group's first row (in projection order).

    Args:
        vectors: (rows, features) array.
        tol: largest distance to the first row of a group.
        metric: "max" (largest absolute difference) or "l2" (Euclidean distance).

    Returns:
        Lists of row indices with at least two members, each sorted.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if len(vectors) < 2:
        return []
    order_of_norm, dual = _NORMS[metric]
    direction = np.random.default_rng(0).standard_normal(vectors.shape[1])
    projection = vectors @ direction
    order = np.argsort(projection, kind="stable")
    sorted_projection = projection[order]
    scale = 1.0 + float(np.abs(vectors).max(initial=0.0))
    window = (tol + 1e-12 * scale) * np.linalg.norm(direction, ord=dual)
    grouped = np.zeros(len(vectors), dtype=bool)
    groups = []
    for position, first in enumerate(order):
        if grouped[first]:
            continue
        end = np.searchsorted(sorted_projection, sorted_projection[position] + window, side="right")
        others = order[position + 1:end]
        others = others[~grouped[others]]
        if not len(others):
            continue
        distance = np.linalg.norm(vectors[others] - vectors[first], ord=order_of_norm, axis=1)
        members = others[distance <= tol]
        if len(members):
            grouped[members] = True
            groups.append(sorted(int(row) for row in [first, *members]))
    return groups


def cosine_groups(vectors, cos):
    """Groups rows whose directions have cosine at least `cos` with the group's first row
    (zero rows are left alone): `close_groups` of the unit vectors in Euclidean distance."""
    norms = np.linalg.norm(vectors, axis=1)
    live = np.flatnonzero(norms > 0)
    units = vectors[live] / norms[live, None]
    return [[int(live[row]) for row in group]
            for group in close_groups(units, math.sqrt(max(2.0 * (1.0 - cos), 0.0)), metric="l2")]
