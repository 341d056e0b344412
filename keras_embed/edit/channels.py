"""Channel maps: one group's channels kept, merged, split or refitted, in every layer at once.

A `ChannelMap` says which old channel each new one copies (`keep`: producers gather their
output channels by it, per-channel layers theirs) and how the rows of every producer
reading a tensor that holds the group combine (`mix`, new x old: a merged channel's row is
added, scaled, into its representative's; a split channel's row is shared by its copies; a
refitted group's rows are spread over the kept channels), with the constants the old
channels leave (`shift`, and `folds` per tensor position) going into the readers' biases.
Because the map is applied to every producer of a group, channels an `Add` joins stay aligned.

Example:
    >>> maps = {"c2": ChannelMap.removing(width=8, removed=[3], merges=[Merge(1, (5,), (1.0,))])}
    >>> smaller = apply_maps(graph, maps)
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ChannelMap:
    """One group's edit: `keep` (new,) old channel of each new one, `mix` (new, old) how
    readers' rows combine, `shift` (old,) or None the constant each old channel leaves,
    `scale` (new,) or None a factor on the producers' new channels."""

    keep: np.ndarray
    mix: np.ndarray
    shift: np.ndarray | None = None
    scale: np.ndarray | None = None

    @classmethod
    def removing(cls, width, removed=(), merges=()):
        """Drops `removed` channels and the `Merge`d ones (their rows added, scaled, to the kept one's)."""
        gone = set(removed)
        keep = np.array([channel for channel in range(width) if channel not in gone], dtype=int)
        mix = np.zeros((len(keep), width))
        row = {channel: index for index, channel in enumerate(keep)}
        mix[np.arange(len(keep)), keep] = 1.0
        for merge in merges:
            mix[row[merge.keep], list(merge.units)] += merge.scales
        return cls(keep, mix)

    @classmethod
    def splitting(cls, width, channel, alpha):
        """Appends a copy of `channel`; readers' row splits as 1 - alpha (old) and alpha (copy)."""
        keep = np.append(np.arange(width), channel)
        mix = np.vstack([np.eye(width), np.eye(width)[channel] * alpha])
        mix[channel, channel] = 1.0 - alpha
        return cls(keep, mix)


def _segment_maps(graph, name, maps):
    """(offset, size, ChannelMap or None) per segment of node `name`'s last axis."""
    offset = 0
    for segment in graph.layout(name):
        yield offset, segment.size, maps.get(segment.group)
        offset += segment.size


def layout_gather(graph, name, maps):
    """Old position of every new position on node `name`'s last axis."""
    parts = [offset + (np.arange(size) if found is None else found.keep)
             for offset, size, found in _segment_maps(graph, name, maps)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=int)


def _mixed_rows(graph, source, maps, rows):
    """A reader's input rows (old positions, ...) recombined for the new positions."""
    parts = [rows[offset:offset + size] if found is None else np.tensordot(found.mix, rows[offset:offset + size], axes=1)
             for offset, size, found in _segment_maps(graph, source, maps)]
    return np.concatenate(parts)


def _shift(graph, source, maps, folds):
    """The constant each old position of `source` adds to its readers."""
    shift = np.zeros(sum(size for _, size, _ in _segment_maps(graph, source, maps)))
    for offset, size, found in _segment_maps(graph, source, maps):
        if found is not None and found.shift is not None:
            shift[offset:offset + size] += found.shift
    for position, value in folds.get(source, ()):
        shift[position] += value
    return shift


def read_inputs(graph, node, maps, folds=None):
    """A producer after the channels of its input changed (`maps`, `folds`: see `apply_maps`)."""
    source, entry, folds = node.inputs[0], node.entry, folds or {}
    if not any(segment.group in maps for segment in graph.layout(source)) and source not in folds:
        return node
    kernel, bias = entry.kernel(node), entry.bias(node)
    rows = np.moveaxis(kernel, -2, 0)  # (old positions, *spatial, outputs)
    shift = _shift(graph, source, maps, folds)
    if np.any(shift != 0):
        if entry.reads_zero_padding(node):
            raise ValueError(f"internal: '{node.name}' reads a constant through zero padding; it cannot fold")
        extra = np.tensordot(shift, rows, axes=1).reshape(-1, kernel.shape[-1]).sum(axis=0)
        bias = (0.0 if bias is None else bias) + extra
    return entry.with_weights(node, np.moveaxis(_mixed_rows(graph, source, maps, rows), 0, -2), bias)


def apply_maps(graph, maps, folds=None):
    """A new graph with the groups in `maps` ({group: ChannelMap}) changed; `folds`
    ({source: [(position, value)]}) are constants readers of `source` absorb."""
    folds = folds or {}
    nodes = []
    for node in graph.nodes:
        if node.role == "produces":
            node = read_inputs(graph, node, maps, folds)
            own = maps.get(graph.group_of(node.name))
            if own is not None:
                node = node.entry.select_outputs(node, own)
        elif node.inputs and node.weights:
            node = node.entry.gather(node, layout_gather(graph, node.inputs[0], maps))
        width = len(layout_gather(graph, node.name, maps))
        nodes.append(dataclasses.replace(node, shape=node.shape[:-1] + (width,)))
    return graph.with_nodes(nodes)
