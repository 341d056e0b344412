"""Breaking the symmetry of parallel channels: the monitor's escape from an embedded critical point.

Channels k of a parallel set compute about scale_k times the first one's values, so what
their readers see is first * sum_k scale_k row_k; new random shares of that sum keep it
(on the probe set), and small noise on the set's incoming weights in every producer of the
group makes the copies differ, so training can move them apart.

Example:
    >>> moved, sets = break_symmetry(graph, summary, np.random.default_rng(0), noise=1e-3)
    >>> sets
    3
"""

import numpy as np


def _resplit(node, positions, members, scales, shares):
    """`node` (a reader) with its rows for `members` at every occurrence re-split by `shares`."""
    entry = node.entry
    rows = np.moveaxis(entry.kernel(node), -2, 0).copy()
    scales = np.reshape(scales, (-1,) + (1,) * (rows.ndim - 1))
    for occurrence in positions:
        chosen = occurrence[members]
        total = (scales * rows[chosen]).sum(axis=0)
        rows[chosen] = np.reshape(shares, scales.shape) * total / scales
    return entry.with_weights(node, np.moveaxis(rows, 0, -2), entry.bias(node))


def _perturb(node, members, rng, noise):
    """`node` (a producer) with noise on its output channels `members`, relative to their largest weight."""
    entry = node.entry
    kernel = entry.kernel(node).copy()
    spread = noise * (float(np.abs(kernel[..., members]).max(initial=0.0)) + 1e-12)
    kernel[..., members] += rng.normal(0.0, spread, kernel[..., members].shape)
    return entry.with_weights(node, kernel, entry.bias(node))


def break_symmetry(graph, summary, rng, noise=1e-3):
    """The graph with every parallel set of `summary` ({group: `probe.GroupRedundancy`})
    re-split among its readers and perturbed in its producers; returns (graph, sets moved)."""
    nodes, moved = dict(graph.by_name), 0
    for group, redundancy in summary.items():
        for members, scales in zip(redundancy.groups, redundancy.scales):
            moved += 1
            members, shares = list(members), rng.dirichlet(np.ones(len(members)))
            for reader, source in graph.readers_of(group):
                nodes[reader.name] = _resplit(nodes[reader.name], graph.positions(source, group), members, scales, shares)
            for producer in graph.spaces(group):
                nodes[producer.name] = _perturb(nodes[producer.name], members, rng, noise)
    return graph.with_nodes(nodes[node.name] for node in graph.nodes), moved
