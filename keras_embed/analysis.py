"""Finds exactly redundant hidden units from the weights alone (no data needed).

The redundancy is what the width embeddings of the Embedding Principle leave behind:
zero-out units (null embedding), zero-in units (constant output), and duplicate units
(one-step splitting; for positively homogeneous activations also positive multiples).

Example:
    >>> edits = find_redundancy(read_model(model), rtol=1e-6)
    >>> edits[0].removed()
    {'zero_out': 1, 'constant': 0, 'duplicate': 3}
"""

import numpy as np

from keras_embed import activations
from keras_embed.plan import LayerEdit, Merge


def _max_abs(array, axis=None):
    return np.abs(array).max(axis=axis, initial=0.0)


def close_groups(vectors, tol):
    """Groups rows of `vectors` that lie within `tol` (max-abs) of the group's first row.

    Sorting by a random projection keeps this near-linear: rows within `tol` have
    projections within `tol * |direction|_1`, so each row is compared with its
    neighbours only.

    Returns:
        Lists of row indices with at least two members, each sorted.
    """
    direction = np.random.default_rng(0).standard_normal(vectors.shape[1])
    projection = vectors @ direction
    order = np.argsort(projection, kind="stable")
    window = (tol + 1e-12 * (1.0 + _max_abs(vectors))) * np.abs(direction).sum()
    grouped = np.zeros(len(vectors), dtype=bool)
    groups = []
    for position, first in enumerate(order):
        if grouped[first]:
            continue
        members = [first]
        for other in order[position + 1:]:
            if projection[other] - projection[first] > window:
                break
            if not grouped[other] and _max_abs(vectors[other] - vectors[first]) <= tol:
                members.append(other)
                grouped[other] = True
        if len(members) > 1:
            groups.append(sorted(int(unit) for unit in members))
    return groups


def _merges(incoming, candidates, homogeneous, rtol):
    """Duplicate groups among `candidates` (unit indices), with their output scales."""
    vectors = incoming[candidates]
    norms = np.linalg.norm(vectors, axis=1)
    norms[norms == 0] = 1.0  # only a spared all-zero unit, which has nothing to merge with
    if homogeneous:  # sigma(c z) = c sigma(z): compare directions, keep the norms as scales
        groups = close_groups(vectors / norms[:, None], rtol)
    else:
        groups = close_groups(vectors, rtol * _max_abs(incoming))
    merges = []
    for group in groups:
        keep, *rest = group
        scales = [float(norms[unit] / norms[keep]) if homogeneous else 1.0 for unit in rest]
        merges.append(Merge(int(candidates[keep]), tuple(int(candidates[unit]) for unit in rest), tuple(scales)))
    return merges


def _layer_edit(layer, next_layer, rtol):
    empty = LayerEdit(layer.name, layer.width)
    if not activations.is_elementwise(layer.activations):
        return empty  # softmax-like units depend on each other: no unit can go alone
    bias = np.zeros(layer.width) if layer.bias is None else layer.bias
    incoming = np.column_stack([layer.kernel.T, bias])  # (units, inputs + 1)
    outgoing = next_layer.kernel  # (units, next units)

    zero_out = _max_abs(outgoing, axis=1) <= rtol * _max_abs(outgoing)
    zero_in = _max_abs(layer.kernel.T, axis=1) <= rtol * _max_abs(incoming)
    constant = zero_in & ~zero_out
    if np.all(zero_out | constant):  # a layer never drops below one unit
        spared = np.flatnonzero(zero_out | constant)[0]
        zero_out[spared] = constant[spared] = False
    candidates = np.flatnonzero(~(zero_out | constant))
    merges = _merges(incoming, candidates, activations.is_positively_homogeneous(layer.activations), rtol)
    constant = np.flatnonzero(constant)
    return LayerEdit(
        layer.name,
        layer.width,
        zero_out=tuple(int(unit) for unit in np.flatnonzero(zero_out)),
        constant=tuple(int(unit) for unit in constant),
        constant_values=tuple(float(value) for value in activations.evaluate(layer.activations, bias[constant])),
        merges=tuple(merges),
    )


def find_redundancy(graph, rtol=1e-6):
    """One pass over the hidden layers of `graph`; nothing is changed.

    Args:
        graph: the `Graph` to inspect.
        rtol: relative tolerance. Weights count as zero when at most `rtol` times the
            largest of their matrix; units are duplicates when their incoming weights and
            bias differ by at most `rtol` times the largest (after normalizing, for
            positively homogeneous activations).

    Returns:
        One `LayerEdit` per hidden layer, in order.
    """
    if rtol < 0:
        raise ValueError(f"rtol must be non-negative. Received: rtol={rtol}")
    return tuple(
        _layer_edit(layer, next_layer, rtol) for layer, next_layer in zip(graph.layers, graph.layers[1:])
    )
