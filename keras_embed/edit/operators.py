"""Function-preserving growth: the embeddings of the Embedding Principle, on any graph.

`widen` is the one-step splitting embedding T^alpha_{l,s}: channel s of a group is copied
in every producer and per-channel layer of the group, and every reader's weights for it
split as (1 - alpha) and alpha, so the outputs are the same for every input. `add_null`
is the null embedding (a new channel no reader uses); `add_constant`, `rescale` and
`permute` are the other function-preserving moves. `deepen` is the depth paper's critical
lifting: a new pointwise relu layer that computes the identity on the given data. They
are the oracle of the tests of the rules: growing a model with them, `prune` must give
back no more parameters and the same outputs.

A layer is named, or given by its index among the producers of editable groups (for a
Dense chain: the hidden layers).

Example:
    >>> wide = widen(graph, "hidden", unit=3, alpha=0.25)
    >>> wide.node("hidden").width == graph.node("hidden").width + 1
    True
"""

import dataclasses
import math
import numbers

import numpy as np

from keras_embed.edit.heads import split_head
from keras_embed.edit.plan import Split
from keras_embed.edit.channels import ChannelMap, apply_maps
from keras_embed.edit.surgery import apply_round
from keras_embed.errors import check_number
from keras_embed.find.constants import weight_constants
from keras_embed.find.weight_rules import signatures


def editable_layer(graph, layer):
    """The producer `layer` (a name, or an index among the producers of editable groups)
    and its group.

    Raises:
        ValueError: no such layer, or it produces channels that cannot change (a model
            output's, or a group a layer mixes, like a softmax).
    """
    editable = [node for node in graph.producers if graph.group_of(node.name) in graph.editable_groups()]
    if isinstance(layer, str) and layer.isdigit() and layer not in graph.by_name:
        layer = int(layer)
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        if not editable:
            raise ValueError(f"no hidden layer {layer}: no layer of this model has channels that can change (those of "
                             "inputs and outputs, and groups a softmax or a normalization mixes, are fixed)")
        if not 0 <= layer < len(editable):
            raise ValueError(f"no hidden layer {layer}; there are {len(editable)} hidden layers "
                             f"({', '.join(node.name for node in editable) or 'none'})")
        node = editable[layer]
    elif layer in graph.by_name and graph.by_name[layer].role == "produces":
        node = graph.by_name[layer]
        if node not in editable:
            raise ValueError(f"layer {layer!r} produces channels that cannot change (a model output's, or mixed by a "
                             "softmax or normalization); choose a hidden layer")
    else:
        raise ValueError(f"no hidden layer {layer!r}; hidden layers are: {', '.join(node.name for node in editable) or 'none'}")
    return node, graph.group_of(node.name)


def _check_channel(graph, node, group, unit):
    width = graph.group_width(group)
    if isinstance(unit, bool) or not isinstance(unit, (int, np.integer)) or not 0 <= unit < width:
        raise ValueError(f"layer '{node.name}' has units 0..{width - 1}. Received: unit={unit!r}")


def widen(graph, layer, unit, alpha=0.5):
    """Splits channel `unit` of `layer`'s group into two with the same incoming weights.

    Args:
        graph: the `Graph` to grow.
        layer: a hidden layer (name or index).
        unit: the channel to split.
        alpha: the copy takes alpha of the readers' weights, the original keeps 1 - alpha;
            any finite number.

    Returns:
        A new `Graph` whose group is one channel wider (the copy is the last channel); for
        a MultiHeadAttention `layer`, `unit` is a head and the layer gets one more head
        (`heads.split_head`).
    """
    if isinstance(layer, str) and graph.by_name.get(layer) is not None and graph.by_name[layer].entry.has_heads:
        return split_head(graph, layer, int(unit), check_number("alpha", alpha))
    node, group = editable_layer(graph, layer)
    _check_channel(graph, node, group, unit)
    return apply_round(graph, (Split(group, graph.group_width(group), int(unit), check_number("alpha", alpha)),))


def _set_new_channel(graph, group, producer, incoming, bias):
    """The graph with the last channel of `group` made by `incoming` and `bias` in
    `producer` and by zeros in the group's other producers. A producer reading `group`
    itself (a residual branch) reads the new channel too: weight 0 there."""
    nodes = []
    for node in graph.nodes:
        if node.role == "produces" and graph.group_of(node.name) == group:
            entry = node.entry
            kernel, own_bias = entry.kernel(node).copy(), entry.bias(node)
            kernel[..., -1] = 0.0
            if node.name == producer.name:
                new_inputs = [int(occurrence[-1]) for occurrence in graph.positions(node.inputs[0], group)]
                old_inputs = np.delete(np.arange(kernel.shape[-2]), new_inputs)
                kernel[..., old_inputs, -1] = incoming
            if own_bias is not None:
                own_bias = own_bias.copy()
                own_bias[-1] = bias if node.name == producer.name else 0.0
            node = entry.with_weights(node, kernel, own_bias)
        nodes.append(node)
    return graph.with_nodes(nodes)


def add_null(graph, layer, bias=0.0, incoming=None):
    """Adds a channel that no reader uses (zero reader weights).

    Args:
        graph: the `Graph` to grow.
        layer: a hidden layer (name or index); the new channel's weights are set there
            (zeros in the group's other producers).
        bias: its bias (0 for a layer without bias).
        incoming: its incoming weights, shaped like one output channel of the kernel
            (default zeros, the paper's null neuron).
    """
    node, group = editable_layer(graph, layer)
    if node.entry.own_rows(node) is not None:
        raise ValueError(f"layer '{node.name}' is recurrent: its units grow by --widen (a copy of a unit), not by a "
                         "null or constant unit")
    bias = check_number("bias", bias)
    kernel = node.entry.kernel(node)
    if node.entry.bias(node) is None and bias != 0:
        raise ValueError(f"layer '{node.name}' has no bias. Received: bias={bias}")
    incoming = np.zeros(kernel.shape[:-1]) if incoming is None else np.asarray(incoming, dtype=np.float64)
    if incoming.shape != kernel.shape[:-1]:
        raise ValueError(f"incoming must have shape {kernel.shape[:-1]}. Received: {incoming.shape}")
    grown = apply_round(graph, (Split(group, graph.group_width(group), 0, 0.0),))  # a copy no reader weighs
    return _set_new_channel(grown, group, grown.node(node.name), incoming, bias)


def _single_reader(graph, group, name):
    readers = [(reader, source, occurrence) for reader, source in graph.readers_of(group)
               for occurrence in graph.positions(source, group)]
    if len(readers) != 1 or readers[0][0].entry.bias(readers[0][0]) is None:
        raise ValueError(f"layer '{name}' and the one layer reading it need a bias to hold a constant unit")
    return readers[0]


def add_constant(graph, layer, bias, outgoing):
    """Adds a channel with zero incoming weights: it holds sigma(bias) on every input.

    The reader's bias loses sigma(bias) * outgoing, so the function is the same; `prune`
    folds such a channel back into that bias. Needs one reader, with a bias, that does not
    pad with zeros.

    Args:
        graph: the `Graph` to grow.
        layer: a hidden layer (name or index), with a bias.
        bias: the new channel's bias.
        outgoing: its reader weights, shaped like one input row of the reader's kernel
            (for a Dense reader: one per output).
    """
    node, group = editable_layer(graph, layer)
    if node.entry.bias(node) is None:
        raise ValueError(f"layer '{node.name}' and the one layer reading it need a bias to hold a constant unit")
    reader, source, _ = _single_reader(graph, group, node.name)
    rows = np.moveaxis(reader.entry.kernel(reader), -2, 0)
    outgoing = np.asarray(outgoing, dtype=np.float64)
    if outgoing.shape != rows.shape[1:]:
        raise ValueError(f"outgoing must have shape {rows.shape[1:]}. Received: {outgoing.shape}")
    if reader.entry.reads_zero_padding(reader):
        raise ValueError(f"layer '{reader.name}' pads with zeros, where a constant channel is not constant")
    grown = add_null(graph, layer, bias)
    position = graph.group_width(group)  # the new channel's index (the tensor holds only this group: one reader)
    value = weight_constants(grown)[source][position]
    reader = grown.node(reader.name)
    kernel = np.moveaxis(reader.entry.kernel(reader), -2, 0).copy()
    kernel[position] = outgoing
    shifted = reader.entry.bias(reader) - value * outgoing.reshape(-1, outgoing.shape[-1]).sum(axis=0)
    changed = reader.entry.with_weights(reader, np.moveaxis(kernel, 0, -2), shifted)
    return grown.with_nodes(changed if item.name == reader.name else item for item in grown.nodes)


def rescale(graph, layer, unit, factor):
    """Scales the incoming weights and bias of channel `unit` by `factor` > 0 and its reader
    weights by 1 / `factor`: the identity where the channel's path commutes with positive
    scaling (relu, leaky_relu, linear), as in the width paper's Appendix A.1."""
    node, group = editable_layer(graph, layer)
    _check_channel(graph, node, group, unit)
    if not (isinstance(factor, numbers.Real) and factor > 0 and math.isfinite(factor)) or not signatures(graph, group)[2]:
        raise ValueError(f"rescaling needs a finite factor > 0 and a relu, leaky_relu or linear path. "
                         f"Received: factor={factor}, layer '{node.name}'")
    incoming = np.ones(graph.group_width(group))
    incoming[unit] = factor
    return apply_maps(graph, {group: ChannelMap(np.arange(len(incoming)), np.diag(1.0 / incoming), scale=incoming)})


def permute(graph, layer, order):
    """Reorders the channels of `layer`'s group: new channel k is old channel order[k]."""
    node, group = editable_layer(graph, layer)
    order = np.asarray(order)
    width = graph.group_width(group)
    if not np.issubdtype(order.dtype, np.integer) or sorted(order.tolist()) != list(range(width)):
        raise ValueError(f"order must be a permutation of 0..{width - 1}. Received: order={order.tolist()}")
    return apply_maps(graph, {group: ChannelMap(order, np.eye(width)[order])})


def _unique(graph, base):
    return next(f"{base}{suffix}" for suffix in ["", *range(2, len(graph.nodes) + 2)] if f"{base}{suffix}" not in graph.by_name)


def _shifted_readers(graph, start):
    """(producer, tensor it reads) for every producer that sees a shift added to `start`'s
    output, through layers that pass shifts on (pooling, Flatten, Concatenate).

    Raises:
        ValueError: naming a layer on the way that does not, or a model output reached.
    """
    found, frontier = [], [start]
    while frontier:
        name = frontier.pop()
        if name in graph.outputs:
            raise ValueError(f"'{start}' reaches the model output '{name}' without a Dense or convolution on the way; "
                             "deepen a layer further from the output")
        for reader in (graph.by_name[item] for item in graph.readers[name]):
            if reader.role == "produces":
                found.append((reader, name))
            elif reader.entry.passes is not None:  # a shift is a monotone map
                frontier.append(reader.name)
            else:
                raise ValueError(f"layer '{reader.name}' ({reader.kind}) reads '{start}' and does not pass a shift on, "
                                 "so a lift there would change the outputs; deepen another layer")
    return found


def deepen(graph, layer, lower, margin=1.0, name=None):
    """Critical lifting: inserts a pointwise relu layer with identity kernel after `layer`
    (after the Activation layers that follow it).

    Its bias kappa = margin - lower puts every pre-activation at or above `margin` on the
    data, where relu is the identity; every producer reading the lift (directly, or through
    pooling, Flatten or Concatenate, which pass a shift on) loses kappa's contribution in
    its bias, so the outputs are unchanged on the data. A reader that pads with zeros cannot
    absorb a bias: then `layer`'s output must be non-negative on the data and kappa is 0.

    Args:
        graph: the `Graph` to deepen.
        layer: a hidden producer (name or index).
        lower: per channel, the least value the layers after it see on the data
            (`pipeline.lower_bounds`).
        margin: distance kept from the relu kink, > 0.
        name: the new layer's name (default '<layer>_lift', made unique).

    Returns:
        A new `Graph` with one more layer.
    """
    margin = check_number("margin", margin, low=0, low_open=True)
    node, _ = editable_layer(graph, layer)
    lower = np.asarray(lower, dtype=np.float64)
    if lower.shape != (node.width,) or not np.all(np.isfinite(lower)):
        raise ValueError(f"deepen needs {node.width} finite lower bounds and margin > 0. "
                         f"Received: lower shape {lower.shape}, margin={margin}")
    chain = graph.elementwise_after(node)
    source = chain[-1] if chain else node
    readers = _shifted_readers(graph, source.name)
    kappa = margin - lower
    padded = [reader.name for reader, _ in readers if reader.entry.reads_zero_padding(reader)]
    if padded:
        if np.any(lower < 0):
            raise ValueError(f"layer '{padded[0]}' reads '{node.name}' with zero padding, and '{node.name}' is negative "
                             "on the data; deepen after a layer whose output is non-negative (e.g. relu)")
        kappa = np.zeros_like(lower)
    lift = node.entry.pointwise_identity(node, name or _unique(graph, f"{node.name}_lift"), source.name, kappa)
    nodes = []
    for item in graph.nodes:
        inputs = tuple(lift.name if reads == source.name else reads for reads in item.inputs)
        nodes.append(dataclasses.replace(item, inputs=inputs))
        if item.name == source.name:
            nodes.append(lift)
    lifted = graph.with_nodes(nodes)
    group = lifted.group_of(lift.name)
    folds = {tensor: [(int(position), -float(kappa[channel])) for occurrence in lifted.positions(tensor, group)
                      for channel, position in enumerate(occurrence)]
             for tensor in {tensor if tensor != source.name else lift.name for _, tensor in readers}}
    return apply_maps(lifted, {}, folds)
