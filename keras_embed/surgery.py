"""Applies a `Plan` to a `Graph`, returning a new graph; the input graph is never changed.

Each `LayerEdit` of hidden layer l removes columns of layer l and recombines the rows of
layer l+1: a merged unit's outgoing weights are added (scaled) to those of the unit it
merges into, and a constant unit's contribution sigma(b) * w_out joins the next bias.

Example:
    >>> plan = plan_exact(graph)                 # keras_embed.compress
    >>> apply_plan(graph, plan).widths
    [16, 10]
"""

import numpy as np

from keras_embed import activations


def _check(edit, layer):
    """Validates an edit against the layer before anything is computed."""
    if edit.layer != layer.name or edit.width != layer.width:
        raise ValueError(
            f"plan was made for layer '{edit.layer}' of width {edit.width}, "
            f"found '{layer.name}' of width {layer.width}"
        )
    removed = edit.removed_units
    keeps = [merge.keep for merge in edit.merges]
    if len(set(removed)) != len(removed) or set(removed) & set(keeps):
        raise ValueError(f"plan for layer '{edit.layer}' removes a unit twice or removes a kept unit")
    if any(not 0 <= unit < layer.width for unit in (*removed, *keeps)):
        raise ValueError(f"plan for layer '{edit.layer}' names a unit outside 0..{layer.width - 1}")
    if edit.width_after < 1:
        raise ValueError(f"plan for layer '{edit.layer}' removes every unit")


def _mixing_matrix(edit, kept):
    """(kept units, old units): row k of the new next kernel is mixing[k] @ old kernel."""
    position = {unit: row for row, unit in enumerate(kept)}
    mixing = np.zeros((len(kept), edit.width))
    mixing[np.arange(len(kept)), kept] = 1.0
    for merge in edit.merges:
        mixing[position[merge.keep], list(merge.units)] = merge.scales
    return mixing


def _folded_bias(edit, layer, next_layer):
    """Next layer bias with the constant units' outputs folded in (None if none needed)."""
    if not edit.constant and next_layer.bias is None:
        return None
    bias = np.zeros(next_layer.width) if next_layer.bias is None else next_layer.bias.copy()
    if edit.constant:
        constant = list(edit.constant)
        own_bias = np.zeros(len(constant)) if layer.bias is None else layer.bias[constant]
        bias += activations.evaluate(layer.activations, own_bias) @ next_layer.kernel[constant]
    return bias


def apply_edit(graph, edit):
    """Applies one `LayerEdit`; returns a new `Graph`."""
    index = graph.hidden_index(edit.layer)
    layer, next_layer = graph.layers[index], graph.layers[index + 1]
    _check(edit, layer)
    kept = [unit for unit in range(layer.width) if unit not in set(edit.removed_units)]
    new_layer = layer.with_weights(layer.kernel[:, kept], None if layer.bias is None else layer.bias[kept])
    new_next = next_layer.with_weights(
        _mixing_matrix(edit, kept) @ next_layer.kernel, _folded_bias(edit, layer, next_layer)
    )
    return graph.replace_layers({index: new_layer, index + 1: new_next})


def apply_plan(graph, plan):
    """Applies every round of `plan` in order; returns a new `Graph`."""
    for edit in plan.edits():
        graph = apply_edit(graph, edit)
    return graph
