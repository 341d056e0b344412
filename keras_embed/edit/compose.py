"""Composes a producer that is linear on the data with the one producer reading it.

Producer P's channels compute a = slope * z + intercept on the data (z its pre-activation),
through elementwise layers only, and B reads a. In canonical kernels (*spatial, inputs,
outputs) the two make one layer when:
- P is pointwise (Dense, or a 1x1 convolution of stride 1): B's kernel absorbs P's, B's
  bias the constant part; exact when B does not pad with zeros or the constant part is 0;
- B is pointwise: P's kernel, strides and padding with B's outputs;
- both are `valid` (not transposed), P of stride 1: one `valid` layer whose kernel spans
  both (usually larger than the two together).
The merged layer keeps B's name and activation. A pointwise P may also be read through
layers that commute with its map (Flatten, Concatenate, average pooling; max pooling when
the map scales each channel by a positive factor, as a lift does), by one producer or
several: then it is moved into each of them (`move_into_readers`): their rows for P's
channels become rows for P's inputs.

Example:
    >>> merged = compose_layers(producer, reader, slope, intercept)
    >>> merged.name == reader.name
    True
"""

import dataclasses

import numpy as np

from keras_embed.edit.channels import ChannelMap, layout_gather, read_inputs


def _full(kernel_p, kernel_b):
    """Two `valid` kernels (the first of stride 1) as one of size kp + kb - 1: each tap
    of the reader shifts a copy of the producer's kernel."""
    spatial = tuple(p + b - 1 for p, b in zip(kernel_p.shape[:-2], kernel_b.shape[:-2]))
    kernel = np.zeros(spatial + (kernel_p.shape[-2], kernel_b.shape[-1]))
    for tap in np.ndindex(*kernel_b.shape[:-2]):
        window = tuple(slice(start, start + size) for start, size in zip(tap, kernel_p.shape[:-2]))
        kernel[window] += kernel_p @ kernel_b[tap]
    return kernel


def compose_layers(producer, reader, slope, intercept):
    """The node computing reader(slope * producer's pre-activation + intercept), or None
    when that is not one layer (see the module docstring)."""
    p_entry, b_entry = producer.entry, reader.entry
    p_geometry, b_geometry = p_entry.geometry(producer), b_entry.geometry(reader)
    p_bias, b_bias = p_entry.bias(producer), b_entry.bias(reader)
    scaled = p_entry.kernel(producer) * slope
    constant = (0.0 if p_bias is None else p_bias) * slope + intercept
    b_kernel = b_entry.kernel(reader)
    b_bias = np.zeros(b_kernel.shape[-1]) if b_bias is None else b_bias
    absorbed = constant @ b_kernel.reshape(-1, *b_kernel.shape[-2:]).sum(axis=0) + b_bias
    if p_geometry.pointwise:
        if b_entry.reads_zero_padding(reader) and np.any(constant != 0):
            return None
        kernel = scaled.reshape(scaled.shape[-2:]) @ b_kernel
        return b_entry.with_weights(reader, kernel, absorbed)
    if b_geometry.pointwise:
        kernel = scaled @ b_kernel.reshape(b_kernel.shape[-2:])
        config = {**producer.config, "activation": reader.config.get("activation", "linear")}
        template = dataclasses.replace(producer, name=reader.name, inputs=reader.inputs, config=config, shape=reader.shape)
        return p_entry.with_weights(template, kernel, absorbed)
    unpadded = p_geometry.padding == b_geometry.padding == "valid" and not (p_geometry.transposed or b_geometry.transposed)
    plain = all(step == 1 for step in p_geometry.strides) and all(rate == 1 for rate in p_geometry.dilation + b_geometry.dilation)
    if unpadded and plain and len(p_geometry.kernel_size) == len(b_geometry.kernel_size):
        kernel = _full(scaled, b_kernel)
        return b_entry.with_weights(reader, kernel, absorbed, kernel_size=kernel.shape[:-2])
    return None


def _readers_through(graph, start, monotone):
    """(producers reading `start`'s output, the nodes on the way) through layers that commute
    with a pointwise affine map (`monotone`: also with max pooling), or None when another
    layer or a model output is on the way."""
    readers, path, frontier = [], [], [start]
    while frontier:
        name = frontier.pop()
        if name in graph.outputs:
            return None
        for reader in (graph.by_name[item] for item in graph.readers[name]):
            if reader.role == "produces":
                readers.append(reader)
            elif reader.entry.passes == "affine" or (monotone and reader.entry.passes == "monotone"):
                path.append(reader)
                frontier.append(reader.name)
            else:
                return None
    return readers, path


def move_into_readers(graph, producer, chain, slope, intercept):
    """The graph without pointwise `producer` (and the elementwise `chain` after it), each
    producer reading it (see `_readers_through`) reading its input instead, or None."""
    kernel, bias = producer.entry.kernel(producer), producer.entry.bias(producer)
    if not producer.entry.geometry(producer).pointwise:
        return None
    mix = kernel.reshape(kernel.shape[-2:]) * slope  # (inputs, channels): what the readers see, per position
    constant = (0.0 if bias is None else bias) * slope + intercept
    diagonal = mix.shape[0] == mix.shape[1] and np.all(mix == np.diag(np.diag(mix))) and np.all(np.diag(mix) > 0)
    end = chain[-1].name if chain else producer.name
    found = _readers_through(graph, end, monotone=diagonal)
    if found is None or not found[0]:
        return None
    readers, path = found
    if np.any(constant != 0) and any(reader.entry.reads_zero_padding(reader) for reader in readers):
        return None
    maps = {graph.group_of(producer.name): ChannelMap(np.arange(mix.shape[0]), mix, constant)}
    gone = {producer.name} | {node.name for node in chain}
    changed = {reader.name: read_inputs(graph, reader, maps) for reader in readers}
    changed.update({node.name: dataclasses.replace(node, shape=node.shape[:-1] + (len(layout_gather(graph, node.name, maps)),))
                    for node in path})
    nodes = [dataclasses.replace(changed.get(node.name, node),
                                 inputs=tuple(producer.inputs[0] if source == end else source for source in node.inputs))
             for node in graph.nodes if node.name not in gone]
    return graph.with_nodes(nodes)


def collapsed(graph, edit):
    """The graph `edit` (a `Collapse`) makes, or None when its producer composes with
    nothing: with the one producer reading it (`compose_layers`), else moved into its readers."""
    producer = graph.by_name.get(edit.layer)
    if producer is None or producer.role != "produces" or producer.width != edit.width:
        return None
    slope, intercept = np.asarray(edit.slopes), np.asarray(edit.intercepts)
    found = graph.elementwise_chain(producer)
    if found is not None:
        chain, reader = found
        merged = compose_layers(producer, reader, slope, intercept)
        if merged is not None:
            merged = dataclasses.replace(merged, inputs=producer.inputs)
            gone = {producer.name} | {node.name for node in chain}
            return graph.with_nodes(merged if node.name == reader.name else node
                                    for node in graph.nodes if node.name not in gone)
    return move_into_readers(graph, producer, graph.elementwise_after(producer), slope, intercept)


def compose(graph, edit):
    """The graph with `edit`'s (a `Collapse`) producer composed into what reads it (`collapsed`).

    Raises:
        ValueError: it composes with nothing (at the width it was planned for).
    """
    result = collapsed(graph, edit)
    if result is None:
        raise ValueError(f"collapse was planned for layer '{edit.layer}' of width {edit.width}; "
                         "at that width it composes with no layer reading it")
    return result
