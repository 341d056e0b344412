"""The embedding operators for convolutional and branching models: split a channel,
insert a layer that is the identity on the data.

`widen_channel` is the width paper's T^alpha on channels: a filter is copied and the
readers' weights for it are split alpha / 1 - alpha, in every branch its `Add` group
couples, so the outputs are the same for every input. `deepen_after` is critical lifting
for a Dense or Conv2D layer L read by one layer B: it inserts a 1x1 Conv2D (or a Dense)
with identity kernel, relu and a bias shift keeping every pre-activation at least
`margin` on the data, and subtracts the shift's effect from B's bias. When B reads with
zero padding (a k x k `same` convolution) the shift must be zero, which needs L's output
to be non-negative on the data (e.g. after a relu).

Example:
    >>> wide = widen_channel(network, "c2", channel=3, alpha=0.25)
    >>> deep = deepen_after(wide, "c1", lower=stats["c1"].a_min)
"""

import dataclasses

import keras
import numpy as np

from keras_embed.channel_collapse import linear_chain
from keras_embed.channel_surgery import ChannelMap, apply_maps


def widen_channel(network, layer, channel, alpha=0.5):
    """Splits `channel` of the Dense/Conv2D `layer` (and of every layer its Add group couples).

    Raises:
        ValueError: no such layer or channel, or the layer holds the model's output channels.
    """
    node = network.node(layer)
    if node.kind not in ("Dense", "Conv2D"):
        raise ValueError(f"layer {layer!r} is a {node.kind}; widen a Dense or Conv2D layer")
    group = network.groups[node.name]
    if group in network.frozen_groups:
        raise ValueError(f"layer {layer!r} produces the model's output channels; widen a hidden layer")
    if not 0 <= channel < node.width:
        raise ValueError(f"layer {layer!r} has channels 0..{node.width - 1}; got {channel}")
    return apply_maps(network, {group: ChannelMap.splitting(node.width, channel, alpha)})


def _folds_shift(reader):
    return reader.kind == "Dense" or reader.config["padding"] == "valid" or tuple(reader.config["kernel_size"]) == (1, 1)


def deepen_after(network, layer, lower, margin=1.0):
    """Inserts an identity relu layer after `layer` (see module docstring).

    Args:
        lower: per channel, the smallest value of `layer`'s output (after its activation
            and following Activation/Dropout layers) on the data.
        margin: smallest pre-activation of the new layer on the data, where the reader
            can absorb a shift.

    Raises:
        ValueError: the layer is not read by exactly one Dense/Conv2D, or needs a shift its
            zero-padded reader cannot absorb.
    """
    node = network.node(layer)
    found = linear_chain(network, node) if node.kind in ("Dense", "Conv2D") else None
    if found is None:
        raise ValueError(f"layer {layer!r} must be a Dense or Conv2D read (through Activation/Dropout) by one Dense or Conv2D layer")
    chain, reader = found
    lower = np.asarray(lower, dtype=np.float64)
    if _folds_shift(reader):
        shift = np.maximum(0.0, margin - lower)
    elif np.all(lower >= 0):
        shift = np.zeros_like(lower)
    else:
        raise ValueError(f"layer {reader.name!r} reads {layer!r} with zero padding, and {layer!r} is negative on the data; "
                         "deepen after a layer whose output is non-negative (e.g. relu)")
    source = chain[-1] if chain else node
    name = f"lift_{node.name}"
    if name in network.by_name:
        raise ValueError(f"layer {layer!r} was already deepened (there is a layer {name!r})")
    width = node.width
    if node.kind == "Conv2D":
        config = keras.layers.Conv2D(width, 1, activation="relu", name=name).get_config()
        kernel = np.eye(width)[None, None]
        r_kernel, *r_bias = reader.weights
        absorbed = np.einsum("m,hwmo->o", shift, r_kernel) if reader.kind == "Conv2D" else shift @ r_kernel
    else:
        config = keras.layers.Dense(width, activation="relu", name=name).get_config()
        kernel = np.eye(width)
        r_kernel, *r_bias = reader.weights
        absorbed = shift @ r_kernel
    lift = type(node)(name, node.kind, (source.name,), config, (kernel, shift), source.shape)
    bias = (r_bias[0] if r_bias else np.zeros(r_kernel.shape[-1])) - absorbed
    reader = dataclasses.replace(reader, inputs=(name,), weights=(r_kernel, bias), config={**reader.config, "use_bias": True})
    nodes = []
    for item in network.nodes:
        nodes.append(reader if item.name == reader.name else item)
        if item.name == source.name:
            nodes.append(lift)
    return dataclasses.replace(network, nodes=tuple(nodes))


def output_minimum(network, layer, data, batch_size=256):
    """Per channel, the smallest value on `data` of what `layer`'s reader sees (its output
    after following Activation/Dropout layers): the `lower` of `deepen_after`."""
    from keras_embed.data import batches, check_inputs
    from keras_embed.network import build_network, probe_outputs

    node = network.node(layer)
    found = linear_chain(network, node) if node.kind in ("Dense", "Conv2D") else None
    end = found[0][-1].name if found and found[0] else node.name
    probe = build_network(network, outputs=[end])
    lowest = np.full(node.width, np.inf)
    for batch in batches(data, batch_size):
        values = probe_outputs(probe, check_inputs(batch, probe))[0]
        lowest = np.minimum(lowest, values.reshape(-1, node.width).min(axis=0))
    return lowest
