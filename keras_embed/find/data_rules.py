"""Layers that compute linearly on the data: the depth paper's critical lifting, undone.

A producer whose channels are all linear on the calibration data (`measure.regimes`)
composes with what reads it when `edit.compose` can: with the one producer reading it
through elementwise layers (Dense then Dense, a pointwise layer before or after a
convolution, two `valid` convolutions), or, a pointwise one, into every producer reading it
through Flatten, Concatenate and pooling. The composition is skipped when the result would
hold more weights (a bottleneck), unless `allow_growth`. Dead and constant channels on the
data are the weight rules' business (`weight_rules`, with data constants).

Example:
    >>> collapses, skipped = plan_collapses(graph, producer_regimes(graph, stats))
    >>> [edit.layer for edit in collapses]
    ['hidden_lift']
"""

from keras_embed.edit.compose import collapsed
from keras_embed.edit.plan import Collapse


def collapse_candidates(graph):
    """Producers that may compose (not an Embedding): alone in an editable group."""
    for node in graph.producers:
        group = graph.group_of(node.name)
        if node.entry.composes and group not in graph.frozen_groups and graph.spaces(group) == [node]:
            yield node


def plan_collapses(graph, regimes, allow_growth=False):
    """Collapses every producer linear on the data into what reads it, first to last.

    Args:
        graph: the `Graph`, with `regimes` matching its current channels.
        regimes: `Regimes` by producer name (collapsing a layer leaves the others valid:
            the layers reading it compute the same pre-activations).
        allow_growth: collapse even when the result holds more weights.

    Returns:
        (tuple of `Collapse`, names of linear producers kept because merging would grow).
    """
    edits, grows = [], []
    progress = True
    while progress:
        progress = False
        for producer in collapse_candidates(graph):
            regime = regimes.get(producer.name)
            if regime is None or not regime.linear.all() or producer.name in grows:
                continue
            edit = Collapse(producer.name, producer.width, tuple(map(float, regime.slope)),
                            tuple(map(float, regime.intercept)))
            result = collapsed(graph, edit)
            if result is None:
                continue
            if result.params > graph.params and not allow_growth:
                grows.append(producer.name)
                continue
            graph = result
            edits.append(edit)
            progress = True
            break
    return tuple(edits), grows
