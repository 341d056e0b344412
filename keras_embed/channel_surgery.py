"""Applies channel edits to a `Network`: one `ChannelMap` per group, every layer follows.

A `ChannelMap` says which old channel each new channel copies (`keep`: the producers'
output weights and per-channel layers are gathered by it) and how readers' input weights
combine (`mix`, new x old: a merged channel's row is added into its representative's,
a split channel's row is shared among its copies, a removed channel's row is dropped or,
when it is a linear combination of kept channels on the data, spread over theirs) and
which constant each old channel adds on top (`shift`, folded into the readers' biases).
Rows of removed channels that carry a constant value are likewise folded into the
reader's bias (`constants`: node name -> value per position of its output, NaN where not
constant). Because the map is applied to every space of a group, channels coupled by an
`Add` stay aligned.

Example:
    >>> maps = {"c2": ChannelMap.removing(width=8, removed=[3], merges={5: (1, 1.0)})}
    >>> smaller = apply_maps(network, maps)
"""

import dataclasses

import numpy as np

from keras_embed.network import PER_CHANNEL, PRODUCERS


@dataclasses.dataclass(frozen=True)
class ChannelMap:
    """The edit of one group (see module docstring): `keep` (new,), `mix` (new, old) and
    `shift` (old,), None for no shift."""

    keep: np.ndarray
    mix: np.ndarray
    shift: np.ndarray | None = None

    @classmethod
    def identity(cls, width):
        return cls(np.arange(width), np.eye(width))

    @classmethod
    def removing(cls, width, removed=(), merges=None):
        """Drops `removed` channels and every key of `merges` ({channel: (kept, scale)}:
        that channel equals `scale` times `kept` on the data, so its row is added, scaled)."""
        merges = merges or {}
        gone = set(removed) | set(merges)
        keep = np.array([channel for channel in range(width) if channel not in gone], dtype=int)
        mix = np.zeros((len(keep), width))
        index = {channel: row for row, channel in enumerate(keep)}
        mix[np.arange(len(keep)), keep] = 1.0
        for channel, (kept, scale) in merges.items():
            mix[index[kept], channel] += scale
        return cls(keep, mix)

    @classmethod
    def splitting(cls, width, channel, alpha):
        """Appends a copy of `channel`; readers' row splits as `alpha` (old) and `1 - alpha` (copy)."""
        keep = np.append(np.arange(width), channel)
        mix = np.vstack([np.eye(width), np.eye(width)[channel] * (1.0 - alpha)])
        mix[channel, channel] = alpha
        return cls(keep, mix)


def _segment_maps(network, name, maps):
    for segment in network.layout(name):
        yield maps.get(segment.group) or ChannelMap.identity(segment.size)


def layout_gather(network, name, maps):
    """Old position of every new position on node `name`'s last axis."""
    parts, offset = [], 0
    for segment, channel_map in zip(network.layout(name), _segment_maps(network, name, maps)):
        parts.append(offset + channel_map.keep)
        offset += segment.size
    return np.concatenate(parts) if parts else np.zeros(0, dtype=int)


def layout_mix(network, name, maps):
    """The (new positions, old positions) reader matrix of node `name`'s output."""
    blocks = [channel_map.mix for channel_map in _segment_maps(network, name, maps)]
    mix = np.zeros((sum(block.shape[0] for block in blocks), sum(block.shape[1] for block in blocks)))
    row = column = 0
    for block in blocks:
        mix[row:row + block.shape[0], column:column + block.shape[1]] = block
        row, column = row + block.shape[0], column + block.shape[1]
    return mix


def layout_shift(network, name, maps):
    """The constant each old position of node `name`'s output adds to its readers."""
    shifts = [np.zeros(segment.size) if channel_map.shift is None else channel_map.shift
              for segment, channel_map in zip(network.layout(name), _segment_maps(network, name, maps))]
    return np.concatenate(shifts) if shifts else np.zeros(0)


def _read_inputs(node, network, maps, constants):
    """A producer's kernel and bias after its input positions changed."""
    kernel, *bias = node.weights
    source = node.inputs[0]
    mix = layout_mix(network, source, maps)
    dropped = ~mix.any(axis=0)
    rows = np.moveaxis(kernel, -2, 0)  # (positions, ..., out)
    live = dropped & (np.abs(rows).reshape(len(rows), -1).max(axis=1) > 0)
    values = layout_shift(network, source, maps)
    if live.any() or np.any(values != 0):  # NaN: a row the rules judged negligible
        values[live] += np.nan_to_num(constants.get(source, np.full(len(rows), np.nan))[live], nan=0.0)
        if node.kind == "Conv2D" and node.config["padding"] != "valid" and max(node.config["kernel_size"]) > 1 \
                and np.any(values != 0):
            raise ValueError(f"internal: a constant read by '{node.name}' through zero padding cannot be folded")
        shift = np.tensordot(values, rows, axes=(0, 0))
        shift = shift.reshape(-1, shift.shape[-1]).sum(axis=0)
        bias = [(bias[0] if bias else np.zeros(kernel.shape[-1])) + shift]
    kernel = np.moveaxis(np.tensordot(mix, rows, axes=(1, 0)), 0, -2)
    return kernel, bias


def apply_maps(network, maps, constants=None):
    """A new `Network` with every group in `maps` changed (see module docstring)."""
    constants = constants or {}
    nodes = []
    for node in network.nodes:
        weights, config = node.weights, node.config
        if node.kind in PRODUCERS:
            kernel, bias = _read_inputs(node, network, maps, constants)
            own = maps.get(network.groups[node.name])
            if own is not None:
                kernel, bias = kernel[..., own.keep], [weight[own.keep] for weight in bias]
            weights = (kernel, *bias)
            config = {**config, "use_bias": bool(bias)}
        elif node.kind in PER_CHANNEL:
            gather = layout_gather(network, node.inputs[0], maps)
            weights = tuple(weight[..., gather, :] if weight.ndim == 4 else weight[gather] for weight in node.weights)
        width = len(layout_gather(network, node.name, maps))
        nodes.append(dataclasses.replace(node, weights=weights, config=config, shape=node.shape[:-1] + (width,)))
    return dataclasses.replace(network, nodes=tuple(nodes))
