"""Data-driven width compression with compensation (`prune --mode data`).

Per hidden layer, input to output: one streaming pass gathers the Gram matrix of the
layer's activations [a, 1] (computed through the *already compressed* prefix, so errors
do not compound) and their cross-products with the next layer's pre-activations in the
reference network. Greedy forward selection picks the units that best reproduce those
pre-activations; ridge least squares refits the next layer's kernel and bias.

Example:
    >>> compressed = compress_widths(graph, x, tolerance=1e-3)    # per-layer relative residual
    >>> compressed.widths
    [37, 10]
"""

import dataclasses
import math

import numpy as np

from keras_embed.data import batches, check_inputs
from keras_embed.plan import Refit
from keras_embed.stats import one_blas_thread, probe_model
from keras_embed.surgery import apply_edit

RIDGE = 1e-8


@dataclasses.dataclass(frozen=True)
class RegressionStats:
    """Sums over the data: gram = [a,1]^T [a,1], cross = [a,1]^T z, energy = sum z^2."""

    gram: np.ndarray
    cross: np.ndarray
    energy: float
    samples: int


def regression_stats(graph, index, reference, data, batch_size=256):
    """One pass: activations of hidden layer `index` of `graph` against the
    pre-activations of layer `index + 1` of `reference` (same input, same next width)."""
    current, target = probe_model(graph, index + 1), probe_model(reference, index + 2)
    width, next_width = graph.layers[index].width, reference.layers[index + 1].width
    gram, cross = np.zeros((width + 1, width + 1)), np.zeros((width + 1, next_width))
    energy, samples = 0.0, 0
    with one_blas_thread():
        for batch in batches(data, batch_size):
            batch = check_inputs(batch, graph.input)
            a = np.asarray(current.predict_on_batch(batch)[-1], dtype=np.float64).reshape(-1, width)
            z = np.asarray(target.predict_on_batch(batch)[-2], dtype=np.float64).reshape(-1, next_width)
            augmented = np.column_stack([a, np.ones(len(a))])
            gram += augmented.T @ augmented
            cross += augmented.T @ z
            energy += float((z**2).sum())
            samples += len(a)
    return RegressionStats(gram, cross, energy, samples)


def greedy_selection(gram, cross, energy, intercept=True):
    """Forward selection of the columns of [a, 1] that best fit z by least squares.

    With `intercept`, the constant column (last) is taken first; then, one at a time, the
    unit whose residual (after projecting out those chosen) reduces the residual energy of
    z most. This is pivoted Cholesky on `gram`, scored by the fit of `cross`. Without
    `intercept`, `gram` and `cross` hold no constant column and nothing is taken first.

    Returns:
        (units in the order chosen, residual energy after the constant (or after nothing,
        without `intercept`) and after each unit).
    """
    size = gram.shape[0]
    factor = np.zeros((size, size))
    residual_gram = np.diag(gram).astype(np.float64).copy()
    residual_cross = np.array(cross, dtype=np.float64)
    floor = 1e-12 * np.maximum(np.diag(gram), 1e-300)
    chosen, energies = [], [] if intercept else [max(energy, 0.0)]
    pivot = size - 1 if intercept else _best_pivot(residual_gram, residual_cross, floor, chosen)
    while pivot is not None:
        step = len(chosen)
        column = gram[:, pivot] - factor[:, :step] @ factor[pivot, :step]
        factor[:, step] = column / math.sqrt(residual_gram[pivot])
        projection = residual_cross[pivot] / math.sqrt(residual_gram[pivot])
        residual_cross -= np.outer(factor[:, step], projection)
        residual_gram -= factor[:, step] ** 2
        energy -= float(projection @ projection)
        chosen.append(pivot)
        energies.append(max(energy, 0.0))
        pivot = _best_pivot(residual_gram, residual_cross, floor, chosen)
    return chosen[1:] if intercept else chosen, energies


def _best_pivot(residual_gram, residual_cross, floor, chosen):
    """The column not yet chosen whose residual explains most of `residual_cross` (None
    when every column left is numerically spanned by those chosen)."""
    usable = residual_gram > floor
    usable[chosen] = False
    if not usable.any():
        return None
    score = np.where(usable, (residual_cross**2).sum(axis=1) / np.where(usable, residual_gram, 1.0), -np.inf)
    return int(np.argmax(score))


def refit(gram, cross, units, ridge=RIDGE, intercept=True):
    """Ridge least squares of z on [a_units, 1] (on a_units alone without `intercept`,
    the bias then 0): returns (kernel rows, bias)."""
    columns = list(units) + ([gram.shape[0] - 1] if intercept else [])
    sub = gram[np.ix_(columns, columns)]
    regularizer = ridge * max(float(np.mean(np.diag(sub))), 1e-300) * np.eye(len(columns))
    solution = np.linalg.solve(sub + regularizer, cross[columns])
    return solution[:len(units)], solution[len(units)] if intercept else np.zeros(cross.shape[1])


def units_to_keep(energies, width, tolerance=None, keep_ratio=None):
    """How many units: `keep_ratio` of `width`, or the fewest whose residual energy is at
    most `tolerance` times that of the constant fit alone."""
    if keep_ratio is not None:
        return max(1, min(width, math.ceil(keep_ratio * width)))
    baseline = energies[0]
    for count, energy in enumerate(energies[1:], start=1):
        if energy <= tolerance * baseline:
            return count
    return max(1, len(energies) - 1)


def compress_layer(graph, index, stats, tolerance=None, keep_ratio=None):
    """Compresses hidden layer `index` of `graph` from its `regression_stats`; returns
    (new graph, the `Refit` edit)."""
    order, energies = greedy_selection(stats.gram, stats.cross, stats.energy)
    layer = graph.layers[index]
    count = units_to_keep(energies, layer.width, tolerance, keep_ratio)
    rest = [unit for unit in range(layer.width) if unit not in order]  # explain nothing (e.g. dead on the data)
    units = sorted((list(order) + rest)[:count])  # a layer keeps at least one unit
    kernel, bias = refit(stats.gram, stats.cross, units)
    edit = Refit(layer.name, layer.width, tuple(units), kernel.tolist(), bias.tolist())
    return apply_edit(graph, edit), edit


def compress_widths(graph, data, tolerance=None, keep_ratio=None, batch_size=256, cache=None):
    """Compresses every hidden layer of `graph`, input to output.

    Args:
        graph: the reference `Graph`; the result approximates its outputs on `data`.
        data: calibration inputs (array, dataset or iterable of batches).
        tolerance: per layer, keep the fewest units whose refit leaves at most this
            fraction of the next layer's (centered) pre-activation energy unexplained.
        keep_ratio: instead, keep this fraction of each layer's units.
        cache: a dict reused across calls on the same `graph` and `data`: a layer's
            `regression_stats` are gathered once for each choice of units kept before it
            (the attempts of `search` share most of them).

    Returns:
        (compressed `Graph`, tuple of `Refit` edits).
    """
    if (tolerance is None) == (keep_ratio is None):
        raise ValueError("give exactly one of tolerance and keep_ratio")
    cache = {} if cache is None else cache
    current, edits = graph, []
    for index in range(len(graph.layers) - 1):
        prefix = (index,) + tuple(edit.kept for edit in edits)
        if prefix not in cache:
            cache[prefix] = regression_stats(current, index, graph, data, batch_size)
        current, edit = compress_layer(current, index, cache[prefix], tolerance, keep_ratio)
        edits.append(edit)
    return current, tuple(edits)


def _largest(attempt, low, high, steps):
    """Bisection for the largest knob in [low, high] whose attempt meets the rule.

    `attempt(knob)` returns (meets rule, result). Returns the result of the largest knob
    found to meet it, or of `low` when none does (the caller's check then fails honestly).
    """
    meets, result = attempt(high)
    if meets:
        return result
    best = None
    for _ in range(steps):
        middle = (low + high) / 2
        meets, candidate = attempt(middle)
        if meets:
            low, best = middle, candidate
        else:
            high = middle
    return best if best is not None else attempt(low)[1]


def search(compress, rule, judge, narrowest, steps=10):
    """The compression that meets `rule` on the data `judge` measures on.

    keep_ratio applies directly; target_params bisects the keep ratio (from `narrowest`
    to 1); accuracy and output-error rules bisect the per-layer tolerance (log scale,
    1e-8 to 1).

    Args:
        compress: `compress(tolerance=..., keep_ratio=...)` -> a result, e.g.
            `functools.partial(compress_widths, graph, x)`.
        judge: maps a result to (figures, params) for `rule.holds`.
        narrowest: the smallest keep ratio worth trying (one unit of the widest layer).

    Returns:
        the result of `compress` for the largest compression found to meet `rule` (of the
        smallest when none does: the caller's check then fails honestly).
    """
    if rule.kind == "keep_ratio":
        return compress(keep_ratio=rule.value)

    def attempt(knob):
        result = compress(keep_ratio=knob) if rule.kind == "target_params" else compress(tolerance=10.0**knob)
        return rule.holds(*judge(result)), result

    if rule.kind == "target_params":
        return _largest(attempt, narrowest, 1.0, steps)
    return _largest(attempt, -8.0, 0.0, steps)
