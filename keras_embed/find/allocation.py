"""Widths chosen across layers: one price on the error each kept channel saves, per parameter or FLOP it costs.

Each group's greedy selection (`refit.greedy_selection`; whole heads for an attention layer)
gives the energy of what its readers see that stays unexplained after each channel kept;
divided by the energy after the constant alone it is a share, comparable between groups.
At price p a group keeps the count k that minimises

    share(k) + p * k * cost / total

(cost: the parameters or FLOPs one channel of the group carries, in its producers, its
per-channel layers and its readers; total: the whole reference model's). A channel stays
exactly when the error it saves is worth more than p per share of the model it costs: one
ranking of every group's channels by marginal error per parameter (FLOP), where a uniform
keep ratio or tolerance treats a wide cheap layer like a narrow costly one. `refit.search`
moves p until the stopping rule holds.

Example:
    >>> count_at_price([1.0, 0.2, 0.05, 0.04], price=10.0, share=0.01)
    2
"""

import math

MEASURES = ("params", "flops")


def _amount(node, measure):
    return node.params if measure == "params" else node.flops


def channel_cost(graph, group, measure="params"):
    """Parameters (or FLOPs per sample) one channel of `group` carries in `graph`: its share
    of every node whose output holds it (producers, per-channel layers) and, in every
    producer reading it, the weights (multiply-adds) of one input channel, once per
    occurrence (a flattened channel occurs at every position).

    Example:
        >>> channel_cost(read_model(keras.Sequential([Input((4,)), Dense(8), Dense(3)])), "dense")
        8.0
    """
    cost = 0.0
    for name in graph.holders(group):
        node = graph.by_name[name]
        cost += _amount(node, measure) * len(graph.positions(name, group)) / max(node.width, 1)
    for reader, source in graph.readers_of(group):
        bias = reader.entry.bias(reader)
        outputs = 0 if bias is None else bias.size * (math.prod(reader.shape[:-1]) if measure == "flops" else 1)
        per_channel = (_amount(reader, measure) - outputs) / max(graph.by_name[source].width, 1)
        cost += per_channel * len(graph.positions(source, group))
    return cost


def head_cost(node, measure="params"):
    """Parameters (or FLOPs) one head of attention layer `node` carries."""
    return _amount(node, measure) / node.config["num_heads"]


def total(graph, measure="params"):
    """The whole graph's parameters or FLOPs per sample (at least 1)."""
    return max(graph.params if measure == "params" else graph.flops, 1)


def count_at_price(energies, price, share):
    """The count k >= 1 minimising energies[k] / energies[0] + price * share * k.

    Args:
        energies: unexplained energy after the constant alone (or nothing), then after
            each channel (head) in the order chosen.
        price: what one whole model's worth of cost is worth in unexplained share.
        share: one channel's cost as a share of the whole model (`channel_cost` / `total`).
    """
    baseline = energies[0]
    shares = [energy / baseline if baseline > 0 else 0.0 for energy in energies]
    return min(range(1, len(energies)), key=lambda count: shares[count] + price * share * count, default=1)
