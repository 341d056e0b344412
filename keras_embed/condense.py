"""The width paper's data-free merge of near-duplicate units (`prune --mode condense`).

Units of a positively homogeneous layer (relu, leaky_relu, linear) whose normalized
incoming weights (bias included) have cosine similarity >= `cos` form a group; each
group becomes its largest unit j, with outgoing weight sum_k a_k ||w_k|| / ||w_j||.
Units of negligible amplitude ||w_in|| * ||w_out|| are dropped. An approximation:
cheap, and the baseline the data mode must beat.

Example:
    >>> edits = plan_condense(graph, cos=0.9)
    >>> apply_plan(graph, Plan((edits,))).widths
    [58, 10]
"""

import numpy as np

from keras_embed import activations
from keras_embed.plan import LayerEdit, Merge

NEGLIGIBLE = 1e-3


def cosine_groups(vectors, cos):
    """Greedy groups: each unassigned row, largest norm first, takes the unassigned rows
    whose cosine with it is at least `cos`. Returns (representative, members) pairs."""
    norms = np.linalg.norm(vectors, axis=1)
    unit = vectors / np.where(norms > 0, norms, 1.0)[:, None]
    free = norms > 0
    groups = []
    for first in np.argsort(-norms, kind="stable"):
        if not free[first]:
            continue
        free[first] = False
        members = np.flatnonzero(free & (unit @ unit[first] >= cos))
        free[members] = False
        if len(members):
            groups.append((int(first), [int(member) for member in members]))
    return groups


def _layer_edit(layer, next_layer, cos, negligible):
    incoming = np.column_stack([layer.kernel.T, np.zeros(layer.width) if layer.bias is None else layer.bias])
    norms = np.linalg.norm(incoming, axis=1)
    amplitude = norms * np.linalg.norm(next_layer.kernel, axis=1)
    dropped = amplitude <= negligible * amplitude.max(initial=0.0)
    if dropped.all():
        dropped[np.argmax(amplitude)] = False
    merges = []
    if activations.is_positively_homogeneous(layer.activations):
        kept = np.flatnonzero(~dropped)
        for first, members in cosine_groups(incoming[kept], cos):
            keep, units = int(kept[first]), [int(kept[member]) for member in members]
            merges.append(Merge(keep, tuple(units), tuple(float(norms[unit] / norms[keep]) for unit in units)))
    return LayerEdit(layer.name, layer.width, negligible=tuple(int(unit) for unit in np.flatnonzero(dropped)),
                     merges=tuple(merges))


def plan_condense(graph, cos, negligible=NEGLIGIBLE):
    """One `LayerEdit` per hidden layer with elementwise activations that changes anything."""
    if not -1 <= cos <= 1:
        raise ValueError(f"cos must be in [-1, 1]. Received: cos={cos}")
    edits = []
    for layer, next_layer in zip(graph.layers, graph.layers[1:]):
        if activations.is_elementwise(layer.activations):
            edit = _layer_edit(layer, next_layer, cos, negligible)
            if edit.removed_units:
                edits.append(edit)
    return tuple(edits)
