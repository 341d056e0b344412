"""Which channels of a `Network` can go without changing its outputs, as `ChannelMap`s.

Rules act on groups (channels coupled by `Add` are judged across every branch):
- zero-out: every layer that reads the channel gives it zero weight;
- constant: the channel has the same value at every position (from the weights: a
  zero kernel slice in every producer, propagated through the per-channel and pooling
  layers; or, with data, from the statistics); its readers' biases absorb it. A
  constant other than 0 is folded only into readers without zero padding (Dense, 1x1 or
  `padding="valid"` convolutions), where it is exact;
- duplicate: two channels equal in every producer and per-channel layer (identical
  filters), or positive multiples where every layer on their way is positively
  homogeneous (relu family, pooling, Flatten, Concatenate, Add of equally scaled
  branches): readers add the row of one into the other's.
Groups holding the model's input or output are never changed.

Example:
    >>> maps, constants = find_channel_edits(network, weight_constants(network))
    >>> {group: len(m.keep) for group, m in maps.items()}
    {'c1': 6, 'c2': 4}
"""

import numpy as np

from keras_embed import activations
from keras_embed.channel_surgery import ChannelMap
from keras_embed.network import FLATTENING, GLOBAL, PER_CHANNEL, PRODUCERS
from keras_embed.network import _batchnorm_affine

_HOMOGENEOUS_PATH = ("Dropout", "MaxPooling2D", "AveragePooling2D", "ZeroPadding2D", "Add", "Concatenate") + GLOBAL + FLATTENING


def _unknown(width):
    return np.full(width, np.nan)


def _depthwise_constant(node, values):
    kernel, *bias = node.weights
    bias = bias[0] if bias else np.zeros(len(values))
    if node.config["padding"] == "valid" or max(node.config["kernel_size"]) == 1:
        out = values * kernel[:, :, :, 0].sum(axis=(0, 1)) + bias
    else:  # zero padding: constant only where the input is 0
        out = np.where(values == 0, bias, np.nan)
    return _activate(node.activation, out)


def _activate(activation, values):
    known = ~np.isnan(values)
    out = np.full(len(values), np.nan)
    out[known] = activations.evaluate((activation,), values[known])
    return out


def weight_constants(network):
    """Node name -> per position of its output, the value it holds on every input (NaN
    where that depends on the input), from the weights alone."""
    values = {}
    for node in network.nodes:
        sources = [values[source] for source in node.inputs]
        if node.kind == "InputLayer":
            values[node.name] = _unknown(node.width)
        elif node.kind in PRODUCERS:
            kernel, *bias = node.weights
            zero_in = ~np.abs(kernel).reshape(-1, kernel.shape[-1]).any(axis=0)
            pre = np.where(zero_in, bias[0] if bias else 0.0, np.nan)
            values[node.name] = _activate(node.activation, pre)
        elif node.kind in ("Activation", "Dropout"):
            values[node.name] = _activate(node.activation, sources[0])
        elif node.kind == "BatchNormalization":
            scale, shift = _batchnorm_affine(node)
            values[node.name] = sources[0] * scale + shift
        elif node.kind == "DepthwiseConv2D":
            values[node.name] = _depthwise_constant(node, sources[0])
        elif node.kind == "ZeroPadding2D":
            values[node.name] = np.where(sources[0] == 0, 0.0, np.nan)
        elif node.kind in FLATTENING:
            values[node.name] = np.tile(sources[0], node.width // max(len(sources[0]), 1))
        elif node.kind == "Add":
            values[node.name] = np.sum(sources, axis=0)
        elif node.kind == "Concatenate":
            values[node.name] = np.concatenate(sources)
        else:  # pooling: a constant stays that constant
            values[node.name] = sources[0]
    return values


def readers_of(network, group):
    """(reader, source) for every Dense/Conv2D reading a tensor that holds `group`."""
    return [
        (network.by_name[reader], node.name)
        for node in network.nodes
        if network.positions(node.name, group).size
        for reader in network.readers[node.name]
        if network.by_name[reader].kind in PRODUCERS
    ]


def _rows(reader, positions):
    """The reader's input weights at `positions`, one flat row per position."""
    rows = np.moveaxis(reader.weights[0], -2, 0)
    return rows[positions].reshape(len(positions), -1)


def folds_constants(reader):
    """True when `reader` sees no zero padding, so a constant input folds into its bias exactly."""
    return reader.kind == "Dense" or reader.config["padding"] == "valid" or max(reader.config["kernel_size"]) == 1


def removable(network, group, constants, rtol=1e-6):
    """Channels of `group` every reader can do without: zero-out or constant."""
    width = network.group_width(group)
    ok = np.ones(width, dtype=bool)
    for reader, source in readers_of(network, group):
        positions = network.positions(source, group)  # (occurrences, channels)
        scale = max(float(np.abs(reader.weights[0]).max(initial=0.0)), 1e-30)
        for occurrence in positions:
            zero = np.abs(_rows(reader, occurrence)).max(axis=1) <= rtol * scale
            value = constants.get(source, _unknown(network.by_name[source].width))[occurrence]
            folds = ~np.isnan(value) & (folds_constants(reader) | (value == 0))
            ok &= zero | folds
    return np.flatnonzero(ok)


def _signatures(network, group):
    """Per channel of `group`: the weights that define it in every producer and
    per-channel layer on its way, one row per channel."""
    parts = []
    for node in network.spaces(group):
        kernel, *bias = node.weights
        parts += [kernel.reshape(-1, kernel.shape[-1]).T] + [weight[:, None] for weight in bias]
    for node in network.nodes:
        if node.kind in PER_CHANNEL:
            for positions in network.positions(node.inputs[0], group):
                parts += [np.moveaxis(weight, -2 if weight.ndim == 4 else 0, 0)[positions].reshape(len(positions), -1)
                          for weight in node.weights]
    return np.hstack(parts)


def _homogeneous(network, group):
    """True when every layer between the group's producers and its readers commutes with
    positive scaling (so a channel that is a multiple of another stays one)."""
    if not all(activations.is_positively_homogeneous((node.activation,)) for node in network.spaces(group)):
        return False
    for node in network.nodes:
        if node.kind in PRODUCERS or node.kind == "InputLayer" or not network.positions(node.name, group).size:
            continue
        if node.kind == "Activation":
            if not activations.is_positively_homogeneous((node.activation,)):
                return False
        elif node.kind not in _HOMOGENEOUS_PATH:
            return False
    return True


def duplicates(network, group, candidates, rtol=1e-6):
    """{channel: (kept, scale)} among `candidates`: channels equal to `scale` times an
    earlier one (scale 1 unless the group's path is positively homogeneous)."""
    signatures = _signatures(network, group)
    homogeneous = _homogeneous(network, group)
    norms = np.linalg.norm(signatures, axis=1)
    tolerance = rtol * max(float(np.abs(signatures).max(initial=0.0)), 1e-30)
    merges, kept = {}, []
    for channel in candidates:
        for representative in kept:
            scale = norms[channel] / norms[representative] if norms[representative] > 0 else 0.0
            if not homogeneous and abs(scale - 1.0) > rtol:
                continue
            if scale > 0 and np.abs(signatures[channel] - scale * signatures[representative]).max() <= tolerance * max(scale, 1.0):
                merges[int(channel)] = (int(representative), float(scale))
                break
        else:
            kept.append(channel)
    return merges


def find_channel_edits(network, constants, rtol=1e-6):
    """One round of the rules on every editable group: ({group: ChannelMap}, constants)."""
    maps = {}
    for group in network.editable_groups():
        width = network.group_width(group)
        gone = set(removable(network, group, constants, rtol).tolist())
        if len(gone) == width:  # keep one channel: a layer of width 0 is not a layer
            gone.discard(min(gone))
        merges = duplicates(network, group, [channel for channel in range(width) if channel not in gone], rtol)
        if gone or merges:
            maps[group] = ChannelMap.removing(width, sorted(gone), merges)
    return maps
