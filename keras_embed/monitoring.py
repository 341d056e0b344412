"""Redundancy of a network on a probe set, as the callbacks report it during training.

Per hidden layer: the effective width (units left after removing zero-out, dead and
constant units and merging units whose activation vectors on the probe set have cosine
>= `cos`, exact duplicates included), the fraction of units in a linear regime, and
whether the layer is linearized. One pass of `stats.collect` provides it all.

Example:
    >>> summary = layer_redundancy(read_model(model), x_probe, cos=0.999)
    >>> summary["hidden"].effective_width, summary["hidden"].linear_fraction
    (16, 0.0)
"""

import dataclasses

import keras
import numpy as np

from keras_embed.activations import evaluate
from keras_embed.analysis import find_redundancy
from keras_embed.linearity import unit_regimes
from keras_embed.stats import collect


@dataclasses.dataclass(frozen=True)
class LayerRedundancy:
    """What one hidden layer carries on the probe set.

    Attributes:
        width: units.
        effective_width: units left after removing redundant ones (at least 1).
        linear_fraction: share of units in a linear regime on the probe set.
        groups: groups of units (index lists, two or more) whose activations are parallel,
            the first representing the group.
        scales: per group, each unit's activation norm divided by the first's.
    """

    width: int
    effective_width: int
    linear_fraction: float
    groups: tuple
    scales: tuple = ()

    @property
    def linearized(self):
        return self.linear_fraction == 1.0

    @property
    def redundant(self):
        return self.effective_width < self.width or self.linearized


def activation_groups(gram, units, cos):
    """Greedy groups among `units` whose activation vectors have cosine >= `cos`.

    Cosines come from the Gram matrix of the activations; the unit with the largest
    activation energy represents its group. Returns index lists, one per group.
    """
    energy = np.diag(gram)[units]
    norms = np.sqrt(np.maximum(energy, 1e-300))
    cosines = gram[np.ix_(units, units)] / np.outer(norms, norms)
    free = np.ones(len(units), dtype=bool)
    groups = []
    for first in np.argsort(-energy, kind="stable"):
        if free[first]:
            members = np.flatnonzero(free & (cosines[first] >= cos))
            free[members] = False
            groups.append([int(units[member]) for member in [first, *members[members != first]]])
    return groups


class GraphProbe:
    """A stand-in for `stats.probe_model(graph)` that computes [z_0, a_0, z_1, a_1, ...] in
    float64 NumPy from the graph's own weights: nothing to build or load each epoch.

    Example:
        >>> collect(graph, x, probe=GraphProbe(graph))
    """

    def __init__(self, graph):
        self.graph = graph

    def predict_on_batch(self, batch):
        value = np.asarray(batch, dtype=np.float64)
        for config in self.graph.leading:  # weightless Activation/Dropout layers before the first Dense
            value = np.asarray(keras.ops.convert_to_numpy(keras.layers.deserialize(config)(value, training=False)),
                               dtype=np.float64)
        outputs = []
        for layer in self.graph.layers[:-1]:
            z = value @ layer.kernel + (0.0 if layer.bias is None else layer.bias)
            value = evaluate(layer.activations, z)
            outputs += [z, value]
        return outputs


def layer_redundancy(graph, x, cos=0.999, rtol=1e-6, lin_tol=1e-4):
    """`LayerRedundancy` of every hidden layer of `graph` on probe inputs `x`, by name."""
    stats = collect(graph, x, batch_size=len(x), gram=True, probe=GraphProbe(graph))
    zero_out = {edit.layer: set(edit.zero_out) for edit in find_redundancy(graph, rtol)}
    summary = {}
    for layer in graph.layers[:-1]:
        layer_stats = stats.layers[layer.name]
        regime = unit_regimes(layer, layer_stats, lin_tol, rtol)
        live = [unit for unit in range(layer.width) if not regime.constant[unit] and unit not in zero_out[layer.name]]
        gram = layer_stats.gram[:-1, :-1]
        groups = activation_groups(gram, np.asarray(live, dtype=int), cos) if live else []
        shared = [group for group in groups if len(group) > 1]
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        summary[layer.name] = LayerRedundancy(
            layer.width, max(1, len(groups)), float(regime.linear.mean()),
            tuple(tuple(group) for group in shared),
            tuple(tuple(float(norms[unit] / max(norms[group[0]], 1e-300)) for unit in group) for group in shared),
        )
    return summary
