"""Rules that hold on the calibration data: dead and constant units, linearized layers.

Example:
    >>> regimes = layer_regimes(graph, collect(graph, x))
    >>> edits = find_data_redundancy(graph, regimes)       # dead and constant units
    >>> collapses, skipped = plan_collapses(graph, regimes)
"""

import numpy as np

from keras_embed import activations
from keras_embed.linearity import DEFAULT_LIN_TOL, unit_regimes
from keras_embed.plan import Collapse, LayerEdit
from keras_embed.surgery import apply_edit


def layer_regimes(graph, stats=None, lin_tol=DEFAULT_LIN_TOL, rtol=1e-6):
    """`Regimes` of every hidden layer, by name (without `stats`: only linear activations)."""
    return {
        layer.name: unit_regimes(layer, None if stats is None else stats.layers[layer.name], lin_tol, rtol)
        for layer in graph.layers[:-1]
    }


def _layer_edit(layer, regime):
    constant = regime.constant.copy()
    if constant.all():  # a layer never drops below one unit
        constant[0] = False
    dead = constant & (regime.value == 0)
    folded = np.flatnonzero(constant & ~dead)
    return LayerEdit(
        layer.name,
        layer.width,
        dead=tuple(int(unit) for unit in np.flatnonzero(dead)),
        constant=tuple(int(unit) for unit in folded),
        constant_values=tuple(float(value) for value in regime.value[folded]),
    )


def find_data_redundancy(graph, regimes):
    """Units that are dead (zero) or constant on the data, per hidden layer with any.

    Returns:
        A tuple of `LayerEdit`, one per hidden layer that has such units.
    """
    edits = []
    for layer in graph.layers[:-1]:
        if activations.is_elementwise(layer.activations):
            edit = _layer_edit(layer, regimes[layer.name])
            if edit.removed_units:
                edits.append(edit)
    return tuple(edits)


def plan_collapses(graph, regimes, allow_growth=False):
    """Collapses every linearized hidden layer into the next, first to last.

    Args:
        graph: the `Graph`, with `regimes` matching its current units.
        regimes: `Regimes` by layer name (collapsing a layer leaves the next one's valid:
            its units compute the same pre-activations).
        allow_growth: collapse even when the merged layer has more weights than the two.

    Returns:
        (tuple of `Collapse`, names of linearized layers skipped because they would grow).
    """
    edits, skipped = [], []
    for name in [layer.name for layer in graph.layers[:-1]]:
        index = graph.hidden_index(name)
        layer, next_layer = graph.layers[index], graph.layers[index + 1]
        regime = regimes[name]
        if not regime.linear.all():
            continue
        merged_params = (layer.kernel.shape[0] + 1) * next_layer.width
        if merged_params > layer.params + next_layer.params and not allow_growth:
            skipped.append(name)
            continue
        edit = Collapse(name, layer.width, tuple(map(float, regime.slope)), tuple(map(float, regime.intercept)))
        graph = apply_edit(graph, edit)
        edits.append(edit)
    return tuple(edits), skipped
