"""Redundancy of a network on a probe set, as the callbacks report it during training.

Per editable channel group (a Dense chain's hidden layer): the effective width (channels
left after zero-out channels, channels constant on the probe set, and merging channels
whose values on it have cosine >= `cos`, exact duplicates included), and the share of its
producers' channels in a linear regime. One statistics pass provides it all.

Example:
    >>> summary = probe_redundancy(read_model(model, fold=False), x_probe, cos=0.999)
    >>> summary["hidden"].effective_width, summary["hidden"].linear_fraction
    (16, 0.0)
"""

import dataclasses

import numpy as np

from keras_embed.files.data import row_count
from keras_embed.find.grouping import cosine_groups
from keras_embed.find.weight_rules import zero_out_channels
from keras_embed.measure.regimes import producer_regimes
from keras_embed.measure.statistics import collect, group_request, producer_requests
from keras_embed.model.read import fold_batchnorm


@dataclasses.dataclass(frozen=True)
class GroupRedundancy:
    """What one group carries on the probe set.

    Attributes:
        width: channels.
        effective_width: channels left after removing redundant ones (at least 1).
        linear_fraction: share of its producers' channels in a linear regime on the probe set.
        groups: sets of channels (index lists, two or more) whose values are parallel, the
            first, the one of largest energy, representing the set.
        scales: per set, each channel's norm divided by the first's.
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


def parallel_sets(gram, channels, cos):
    """Sets of `channels` whose value vectors (with Gram matrix `gram`) have cosine >= `cos`,
    the one of largest energy first; every channel is in one set (singletons included)."""
    energy = np.diag(gram)[channels]
    values, vectors = np.linalg.eigh(gram[np.ix_(channels, channels)])
    rows = vectors * np.sqrt(np.maximum(values, 0.0))  # rows with these inner products
    sets = cosine_groups(rows, cos)
    grouped = {member for group in sets for member in group}
    sets += [[row] for row in range(len(channels)) if row not in grouped]
    return [[int(channels[row]) for row in sorted(group, key=lambda row: -energy[row])] for group in sets]


def probe_redundancy(graph, x, cos=0.999, rtol=1e-6, lin_tol=1e-4, probe=None):
    """`GroupRedundancy` of every approximable group of `graph` on probe inputs `x`, by group,
    measured on the graph with its BatchNormalization folded (what `prune` sees: a linear
    convolution read through BatchNormalization and relu is not linear).

    Args:
        probe: a model built for `probe_requests(graph)` of the folded graph, to reuse (see `collect`).
    """
    graph = fold_batchnorm(graph)
    requests = probe_requests(graph)
    stats = collect(graph, x, requests, batch_size=row_count(x), probe=probe)
    regimes = producer_regimes(graph, {name: stats[("z", name)] for name in _producers(graph)}, lin_tol, rtol)
    summary = {}
    for group in graph.approximable_groups():
        values = stats[("a", group)]
        scale = max(float(np.abs([values.a_min, values.a_max]).max(initial=0.0)), 1e-30)
        constant = values.a_max - values.a_min <= rtol * scale
        live = np.flatnonzero(~constant & ~zero_out_channels(graph, group, rtol))
        gram = values.gram[:-1, :-1]
        sets = parallel_sets(gram, live, cos) if len(live) else []
        shared = [members for members in sets if len(members) > 1]
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        linear = np.concatenate([regimes[node.name].linear for node in graph.spaces(group)])
        summary[group] = GroupRedundancy(
            graph.group_width(group), max(1, len(sets)), float(linear.mean()), tuple(tuple(members) for members in shared),
            tuple(tuple(float(norms[unit] / max(norms[members[0]], 1e-300)) for unit in members) for members in shared),
        )
    return summary


def _producers(graph):
    return [node.name for group in graph.approximable_groups() for node in graph.spaces(group)]


def probe_requests(graph):
    """The statistics `probe_redundancy` needs: each approximable group's values with their
    Gram, and its producers' regimes."""
    producers = producer_requests(graph, [graph.by_name[name] for name in _producers(graph)])
    return {**{("z", name): request for name, request in producers.items()},
            **{("a", group): group_request(graph, group, gram=True) for group in graph.approximable_groups()}}
