"""Units of two models of one architecture matched before they are compared.

A hidden layer's units (a channel group's channels) can be permuted without changing the
function, so two trainings of one recipe may find the same solution with its units in
another order, far apart in weight space. Per editable channel group (`model.graph`), the
activations readers see (its first producer after its activation) and the pre-activations
(which still tell apart units that are dead on the data) are correlated between the models
on the data, over every row and position; the assignment of the second model's channels to
the first's that maximises the summed mean of the two correlations is solved exactly
(`scipy.optimize.linear_sum_assignment`); the second model's channels are then permuted
(`edit.operators.permute`, the function unchanged). Both models come back as keras-embed
rebuilds them (BatchNormalization folded where it folds), so they stay of one architecture.

Example:
    >>> first, second, matched = align(model_a, model_b, x)
    >>> matched["dense"]        # mean correlation of the matched units
    0.93
"""

import numpy as np
from scipy.optimize import linear_sum_assignment

from keras_embed.edit.operators import permute
from keras_embed.model.build import build_model
from keras_embed.model.read import read_model


def _seen(graph, group):
    """(the pre-activation of `group`'s first producer, the node whose output holds `group`
    as its readers see it: that producer after the elementwise layers that follow it)."""
    producer = graph.spaces(group)[0]
    chain = graph.elementwise_after(producer)
    return f"{producer.name}/z", (chain[-1] if chain else producer).name


def _standardized(values):
    values = np.asarray(values, dtype=np.float64).reshape(-1, np.shape(values)[-1])
    values = values - values.mean(axis=0)
    scale = values.std(axis=0)
    return values / np.where(scale > 0, scale, 1.0)


def _correlation(first, second):
    first, second = _standardized(first), _standardized(second)
    return first.T @ second / len(first)


def matching(firsts, seconds):
    """(order, mean correlation): second's channel order[k] best matches first's channel k,
    by the mean correlation over the pairs of (rows, channels) arrays `firsts`, `seconds`."""
    correlation = np.mean([_correlation(first, second) for first, second in zip(firsts, seconds)], axis=0)
    rows, columns = linear_sum_assignment(correlation, maximize=True)
    return columns[np.argsort(rows)], float(correlation[rows, columns].mean())


def align(model_a, model_b, x, batch_size=256):
    """(model_a rebuilt, model_b rebuilt with its channels matched to model_a's, {group: mean
    correlation of the matched channels})."""
    graphs = [read_model(model) for model in (model_a, model_b)]
    groups = [graph.editable_groups() for graph in graphs]  # in the same order: one architecture, any layer names
    seen = []
    for graph, names in zip(graphs, groups):
        probe = build_model(graph, outputs=[name for group in names for name in _seen(graph, group)])
        parts = probe.predict(x, batch_size=batch_size, verbose=0)
        seen.append(list(zip(parts[::2], parts[1::2])))
    aligned, matched = graphs[1], {}
    for group, other, first, second in zip(*groups, *seen):
        order, matched[group] = matching(first, second)
        aligned = permute(aligned, graphs[1].spaces(other)[0].name, order)
    return build_model(graphs[0]), build_model(aligned), matched
