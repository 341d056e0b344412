"""Function-preserving growth: the width embeddings of the Embedding Principle.

`widen` is the one-step splitting embedding T^alpha_{l,s} (unit s of layer l is copied,
its outgoing weights split as (1 - alpha) and alpha); `add_null` is the null embedding
(a new unit with zero outgoing weights); `add_constant`, `rescale` and `permute` are
the other function-preserving moves. Each returns a new `Graph` computing the same
function for every input. `deepen` is the depth paper's critical lifting: a new layer
that computes the identity on the given data. They are the oracle of the tests of
`apply_plan`.

Example:
    >>> wide = widen(graph, "hidden", unit=3, alpha=0.25)
    >>> wide.layers[0].width == graph.layers[0].width + 1
    True
"""

import dataclasses

import keras
import numpy as np

from keras_embed import activations
from keras_embed.graph import DenseLayer


def _hidden_pair(graph, layer):
    index = graph.hidden_index(layer)
    hidden = graph.layers[index]
    if not activations.is_elementwise(hidden.activations):
        raise ValueError(f"layer '{hidden.name}' mixes its units ({', '.join(hidden.activations)}); it cannot grow")
    return index, hidden, graph.layers[index + 1]


def _check_unit(layer, unit):
    if not (isinstance(unit, (int, np.integer)) and 0 <= unit < layer.width):
        raise ValueError(f"layer '{layer.name}' has units 0..{layer.width - 1}. Received: unit={unit}")


def _grow(graph, index, incoming, bias, next_kernel):
    """Appends one unit to hidden layer `index`; `next_kernel` already has its row."""
    layer, next_layer = graph.layers[index], graph.layers[index + 1]
    new_bias = None if layer.bias is None else np.append(layer.bias, bias)
    return graph.replace_layers({
        index: layer.with_weights(np.column_stack([layer.kernel, incoming]), new_bias),
        index + 1: next_layer.with_weights(next_kernel, next_layer.bias),
    })


def widen(graph, layer, unit, alpha=0.5):
    """Splits `unit` of hidden `layer` into two units with the same incoming weights.

    Args:
        graph: the `Graph` to grow.
        layer: hidden layer name or index.
        unit: index of the unit to split.
        alpha: the copy takes alpha of the outgoing weights, the original keeps 1 - alpha;
            any real number.

    Returns:
        A new `Graph` whose layer is one unit wider (the copy is the last unit).
    """
    index, hidden, next_layer = _hidden_pair(graph, layer)
    _check_unit(hidden, unit)
    next_kernel = np.vstack([next_layer.kernel, alpha * next_layer.kernel[unit]])
    next_kernel[unit] *= 1.0 - alpha
    bias = None if hidden.bias is None else hidden.bias[unit]
    return _grow(graph, index, hidden.kernel[:, unit], bias, next_kernel)


def add_null(graph, layer, bias=0.0, incoming=None):
    """Adds a unit whose outgoing weights are zero (its output is never used).

    Args:
        graph: the `Graph` to grow.
        layer: hidden layer name or index.
        bias: the new unit's bias (must be 0 for a layer without bias).
        incoming: its incoming weights (default zeros, the paper's null neuron).
    """
    index, hidden, next_layer = _hidden_pair(graph, layer)
    if hidden.bias is None and bias != 0:
        raise ValueError(f"layer '{hidden.name}' has no bias. Received: bias={bias}")
    incoming = np.zeros(hidden.kernel.shape[0]) if incoming is None else np.asarray(incoming, dtype=np.float64)
    if incoming.shape != (hidden.kernel.shape[0],):
        raise ValueError(f"incoming must have shape ({hidden.kernel.shape[0]},). Received: {incoming.shape}")
    return _grow(graph, index, incoming, bias, np.vstack([next_layer.kernel, np.zeros(next_layer.width)]))


def permute(graph, layer, order):
    """Reorders the units of hidden `layer`: new unit k is old unit order[k]."""
    index, hidden, next_layer = _hidden_pair(graph, layer)
    order = np.asarray(order)
    if not np.issubdtype(order.dtype, np.integer) or sorted(order.tolist()) != list(range(hidden.width)):
        raise ValueError(f"order must be a permutation of 0..{hidden.width - 1}. Received: order={order.tolist()}")
    return graph.replace_layers({
        index: hidden.with_weights(hidden.kernel[:, order], None if hidden.bias is None else hidden.bias[order]),
        index + 1: next_layer.with_weights(next_layer.kernel[order], next_layer.bias),
    })


def add_constant(graph, layer, bias, outgoing):
    """Adds a unit with zero incoming weights: it outputs sigma(bias) on every input.

    The next layer's bias is reduced by sigma(bias) * outgoing, so the function is the
    same; `prune` folds such a unit back into that bias.

    Args:
        graph: the `Graph` to grow.
        layer: hidden layer name or index (its layer and the next must have a bias).
        bias: the new unit's bias.
        outgoing: its outgoing weights, one per unit of the next layer.
    """
    index, hidden, next_layer = _hidden_pair(graph, layer)
    outgoing = np.asarray(outgoing, dtype=np.float64)
    if hidden.bias is None or next_layer.bias is None:
        raise ValueError(f"layer '{hidden.name}' and the next layer need a bias to hold a constant unit")
    if outgoing.shape != (next_layer.width,):
        raise ValueError(f"outgoing must have shape ({next_layer.width},). Received: {outgoing.shape}")
    grown = _grow(graph, index, np.zeros(hidden.kernel.shape[0]), bias, np.vstack([next_layer.kernel, outgoing]))
    grown_next = grown.layers[index + 1]
    shift = activations.evaluate(hidden.activations, np.array([bias]))[0] * outgoing
    return grown.replace_layers({index + 1: grown_next.with_weights(grown_next.kernel, grown_next.bias - shift)})


def rescale(graph, layer, unit, factor):
    """Scales the incoming weights and bias of `unit` by `factor` > 0 and its outgoing
    weights by 1 / `factor`: the identity for positively homogeneous activations
    (relu, leaky_relu, linear), as in the width paper's Appendix A.1."""
    index, hidden, next_layer = _hidden_pair(graph, layer)
    _check_unit(hidden, unit)
    if factor <= 0 or not activations.is_positively_homogeneous(hidden.activations):
        raise ValueError(
            f"rescaling needs factor > 0 and a relu, leaky_relu or linear layer. "
            f"Received: factor={factor}, activations={hidden.activations}"
        )
    kernel, next_kernel = hidden.kernel.copy(), next_layer.kernel.copy()
    kernel[:, unit] *= factor
    next_kernel[unit] /= factor
    bias = None if hidden.bias is None else hidden.bias.copy()
    if bias is not None:
        bias[unit] *= factor
    return graph.replace_layers({
        index: hidden.with_weights(kernel, bias),
        index + 1: next_layer.with_weights(next_kernel, next_layer.bias),
    })


def deepen(graph, layer, lower, margin=1.0, name=None):
    """Critical lifting: inserts Dense(width, relu) with identity kernel after hidden `layer`.

    Its bias kappa = margin - lower puts every pre-activation at or above `margin` on the
    data, where relu is the identity; the next layer's bias drops by kappa @ W_next, so the
    outputs are unchanged on the data (and on every input whose `layer` outputs stay
    above `lower - margin`).

    Args:
        graph: the `Graph` to deepen.
        layer: hidden layer name or index.
        lower: per unit, the least output of `layer` on the data
            (`collect(graph, x).layers[name].a_min`).
        margin: distance kept from the relu kink, > 0.
        name: the new layer's name (default '<layer>_lift', made unique).

    Returns:
        A new `Graph` with one more layer.
    """
    index = graph.hidden_index(layer)
    hidden, next_layer = graph.layers[index], graph.layers[index + 1]
    lower = np.asarray(lower, dtype=np.float64)
    if lower.shape != (hidden.width,) or not np.all(np.isfinite(lower)) or not margin > 0:
        raise ValueError(
            f"deepen needs {hidden.width} finite lower bounds and margin > 0. "
            f"Received: lower shape {lower.shape}, margin={margin}"
        )
    names = {item.name for item in graph.layers}
    name = name or next(f"{hidden.name}_lift{suffix}" for suffix in ["", *range(2, len(names) + 2)]
                        if f"{hidden.name}_lift{suffix}" not in names)
    kappa = margin - lower
    config = keras.layers.Dense(hidden.width, activation="relu", name=name, dtype=hidden.config.get("dtype")).get_config()
    lift = DenseLayer(name, np.eye(hidden.width), kappa, ("relu",), config)
    next_bias = (np.zeros(next_layer.width) if next_layer.bias is None else next_layer.bias) - kappa @ next_layer.kernel
    return dataclasses.replace(
        graph,
        layers=graph.layers[: index + 1] + (lift, next_layer.with_weights(next_layer.kernel, next_bias)) + graph.layers[index + 2:],
    )
