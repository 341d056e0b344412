"""Applies a `Plan` to a `Graph`, returning a new graph; the input graph is never changed.

Each `LayerEdit` of hidden layer l removes columns of layer l and recombines the rows of
layer l+1: a merged unit's outgoing weights are added (scaled) to those of the unit it
merges into, and a constant unit's contribution sigma * w_out joins the next bias. A
`Collapse` replaces layers l and l+1 by their composition.

Example:
    >>> plan = plan_exact(graph)                 # keras_embed.compress
    >>> apply_plan(graph, plan).widths
    [16, 10]
"""

import dataclasses

import numpy as np



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
    if len(edit.constant_values) != len(edit.constant):
        raise ValueError(f"plan for layer '{edit.layer}' gives {len(edit.constant_values)} values for {len(edit.constant)} constant units")


def _mixing_matrix(edit, kept):
    """(kept units, old units): row k of the new next kernel is mixing[k] @ old kernel."""
    position = {unit: row for row, unit in enumerate(kept)}
    mixing = np.zeros((len(kept), edit.width))
    mixing[np.arange(len(kept)), kept] = 1.0
    for merge in edit.merges:
        mixing[position[merge.keep], list(merge.units)] = merge.scales
    return mixing


def _folded_bias(edit, next_layer):
    """Next layer bias with the constant units' outputs folded in (None if none needed)."""
    if not edit.constant and next_layer.bias is None:
        return None
    bias = np.zeros(next_layer.width) if next_layer.bias is None else next_layer.bias.copy()
    if edit.constant:
        bias += np.asarray(edit.constant_values) @ next_layer.kernel[list(edit.constant)]
    return bias


def _remove_units(graph, edit):
    index = graph.hidden_index(edit.layer)
    layer, next_layer = graph.layers[index], graph.layers[index + 1]
    _check(edit, layer)
    kept = list(edit.kept_units)
    new_layer = layer.with_weights(layer.kernel[:, kept], None if layer.bias is None else layer.bias[kept])
    new_next = next_layer.with_weights(_mixing_matrix(edit, kept) @ next_layer.kernel, _folded_bias(edit, next_layer))
    return graph.replace_layers({index: new_layer, index + 1: new_next})


def _collapse(graph, edit):
    """W' = W_l diag(slopes) W_{l+1}, b' = (b_l * slopes + intercepts) W_{l+1} + b_{l+1}."""
    index = graph.hidden_index(edit.layer)
    layer, next_layer = graph.layers[index], graph.layers[index + 1]
    if edit.layer != layer.name or edit.width != layer.width or len(edit.slopes) != layer.width:
        raise ValueError(f"collapse was planned for layer '{edit.layer}' of width {edit.width}, found width {layer.width}")
    slopes, intercepts = np.asarray(edit.slopes), np.asarray(edit.intercepts)
    own_bias = np.zeros(layer.width) if layer.bias is None else layer.bias
    bias = (own_bias * slopes + intercepts) @ next_layer.kernel
    if next_layer.bias is not None:
        bias = bias + next_layer.bias
    elif not np.any(bias):
        bias = None
    merged = next_layer.with_weights((layer.kernel * slopes) @ next_layer.kernel, bias)
    return dataclasses.replace(graph, layers=graph.layers[:index] + (merged,) + graph.layers[index + 2:])


def _refit(graph, edit):
    index = graph.hidden_index(edit.layer)
    layer, next_layer = graph.layers[index], graph.layers[index + 1]
    kept = list(edit.kept)
    if edit.width != layer.width or np.shape(edit.next_kernel) != (len(kept), next_layer.width):
        raise ValueError(f"refit was planned for layer '{edit.layer}' of width {edit.width}, found width {layer.width}")
    new_layer = layer.with_weights(layer.kernel[:, kept], None if layer.bias is None else layer.bias[kept])
    return graph.replace_layers({index: new_layer, index + 1: next_layer.with_weights(edit.next_kernel, edit.next_bias)})


_APPLY = {"LayerEdit": _remove_units, "Collapse": _collapse, "Refit": _refit}


def apply_edit(graph, edit):
    """Applies one `LayerEdit`, `Collapse` or `Refit`; returns a new `Graph`."""
    return _APPLY[type(edit).__name__](graph, edit)


def apply_plan(graph, plan):
    """Applies every round of `plan` in order; returns a new `Graph`."""
    for edit in plan.edits():
        graph = apply_edit(graph, edit)
    return graph
