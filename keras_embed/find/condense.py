"""The width paper's data-free merge of near-duplicate channels (`prune --mode condense`).

In a group whose path commutes with positive scaling (relu, leaky_relu, linear, pooling),
channels whose incoming weights (bias included, every producer of the group) have cosine
similarity >= `cos` become one: the largest, channel j, with reader weight
sum_k a_k ||w_k|| / ||w_j||. Channels of negligible amplitude ||w_in|| * ||w_out|| are
dropped in every group. An approximation: cheap, and the baseline the data mode must beat.

Example:
    >>> edits = plan_condense(graph, cos=0.9)
    >>> apply_round(graph, edits).widths
    [58, 10]
"""

import numpy as np

from keras_embed.edit.plan import GroupEdit, Merge
from keras_embed.find.grouping import cosine_groups
from keras_embed.find.weight_rules import signatures

NEGLIGIBLE = 1e-3


def _outgoing_norms(graph, group):
    """Per channel, the norm of every reader's rows for it."""
    squares = np.zeros(graph.group_width(group))
    for reader, source in graph.readers_of(group):
        rows = np.moveaxis(reader.entry.kernel(reader), -2, 0)
        for occurrence in graph.positions(source, group):
            squares += (rows[occurrence].reshape(len(occurrence), -1) ** 2).sum(axis=1)
    return np.sqrt(squares)


def _group_edit(graph, group, cos, negligible):
    incoming, _, homogeneous = signatures(graph, group)
    norms = np.linalg.norm(incoming, axis=1)
    amplitude = norms * _outgoing_norms(graph, group)
    dropped = amplitude <= negligible * amplitude.max(initial=0.0)
    if dropped.all():
        dropped[np.argmax(amplitude)] = False
    merges = []
    if homogeneous:
        kept = np.flatnonzero(~dropped)
        for members in cosine_groups(incoming[kept], cos):
            members = [int(kept[member]) for member in members]
            keep = max(members, key=lambda channel: norms[channel])
            units = [channel for channel in members if channel != keep]
            merges.append(Merge(keep, tuple(units), tuple(float(norms[unit] / norms[keep]) for unit in units)))
    return GroupEdit(group, graph.group_width(group), negligible=tuple(int(channel) for channel in np.flatnonzero(dropped)),
                     merges=tuple(merges))


def plan_condense(graph, cos, negligible=NEGLIGIBLE):
    """One `GroupEdit` per approximable group that loses channels."""
    if not -1 <= cos <= 1:
        raise ValueError(f"cos must be in [-1, 1]. Received: cos={cos}")
    edits = (_group_edit(graph, group, cos, negligible) for group in graph.approximable_groups())
    return tuple(edit for edit in edits if edit.removed_units)
