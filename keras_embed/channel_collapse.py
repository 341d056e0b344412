"""Folds a layer that computes linearly on the data into the layer that reads it.

A Dense or Conv2D layer P whose channels are all in a linear regime on the data
(a = slope * z + intercept, from `linearity.unit_regimes`), followed only by
Activation/Dropout layers and read by exactly one Dense or Conv2D layer B, composes with
B into one layer when the composition is a layer of the same kind:
- Dense then Dense;
- a 1x1 convolution (stride 1) then any convolution: B's kernel absorbs P's, B's
  bias the constant part, exact when B has no zero padding (`valid` or 1x1) or the
  constant part is zero;
- any convolution then a 1x1 convolution (stride 1): P's kernel, strides and padding
  with B's outputs;
- two `valid` convolutions, the first of stride 1: one `valid` convolution whose kernel
  spans both (usually larger than the two together, so only with `allow_growth`).
The merged layer keeps B's name and activation. It is skipped when it would hold more
weights than P and B together, unless `allow_growth`.

Example:
    >>> network, collapsed, skipped = collapse_linear(network, regimes)
    >>> collapsed
    ['lift_c1']
"""

import dataclasses

import numpy as np

from keras_embed.network import PRODUCERS


def linear_chain(network, producer):
    """(elementwise nodes after `producer`, the single Dense/Conv2D reading them) or None."""
    chain, name = [], producer.name
    while True:
        readers = network.readers[name]
        if len(readers) != 1:
            return None
        reader = network.by_name[readers[0]]
        if reader.kind in ("Activation", "Dropout"):
            chain.append(reader)
            name = reader.name
        elif reader.kind in PRODUCERS and reader.inputs == (name,):
            return chain, reader
        else:
            return None


def candidates(network):
    """Producers that may fold into their reader: not holding the input or output
    channels, not coupled with other layers by an Add."""
    for node in network.nodes:
        group = network.groups.get(node.name)
        if node.kind in PRODUCERS and group not in network.frozen_groups and network.spaces(group) == [node]:
            found = linear_chain(network, node)
            if found is not None:
                yield node, *found


def _is_1x1(node):
    return node.kind == "Conv2D" and tuple(node.config["kernel_size"]) == (1, 1) and tuple(node.config["strides"]) == (1, 1)


def compose(producer, reader, slope, intercept):
    """The weights and config of the layer computing reader(slope * producer_z + intercept),
    or None when that is not one layer of the reader's kind without padding effects."""
    p_kernel, *p_bias = producer.weights
    r_kernel, *r_bias = reader.weights
    constant = (p_bias[0] if p_bias else 0.0) * slope + intercept
    r_bias = r_bias[0] if r_bias else np.zeros(r_kernel.shape[-1])
    scaled = p_kernel * slope
    if producer.kind == reader.kind == "Dense":
        return (scaled @ r_kernel, constant @ r_kernel + r_bias), reader.config
    if _is_1x1(producer) and reader.kind == "Conv2D":
        pads = reader.config["padding"] != "valid" and tuple(reader.config["kernel_size"]) != (1, 1)
        if pads and np.any(np.abs(constant) > 0):
            return None
        kernel = np.einsum("im,hwmo->hwio", scaled[0, 0], r_kernel)
        return (kernel, np.einsum("m,hwmo->o", constant, r_kernel) + r_bias), reader.config
    if producer.kind == "Conv2D" and _is_1x1(reader):
        kernel = np.einsum("hwim,mo->hwio", scaled, r_kernel[0, 0])
        config = {**reader.config, **{key: producer.config[key] for key in ("kernel_size", "strides", "padding")}}
        return (kernel, constant @ r_kernel[0, 0] + r_bias), config
    if producer.kind == reader.kind == "Conv2D" and _unpadded(producer) and tuple(producer.config["strides"]) == (1, 1) \
            and _unpadded(reader):
        weights = _compose_full(scaled, r_kernel, constant, r_bias)
        return weights, {**reader.config, "kernel_size": weights[0].shape[:2]}
    return None


def _unpadded(node):
    return node.config["padding"] == "valid"


def _compose_full(scaled, r_kernel, constant, r_bias):
    """Two `valid` convolutions (the first with stride 1) as one, of kernel size
    (ph + rh - 1, pw + rw - 1): the reader's taps shift copies of the producer's kernel."""
    (ph, pw, inputs, _), (rh, rw, _, outputs) = scaled.shape, r_kernel.shape
    kernel = np.zeros((ph + rh - 1, pw + rw - 1, inputs, outputs))
    for row in range(rh):
        for column in range(rw):
            kernel[row:row + ph, column:column + pw] += np.einsum("hwim,mo->hwio", scaled, r_kernel[row, column])
    return kernel, np.einsum("m,hwmo->o", constant, r_kernel) + r_bias


def collapse_linear(network, regimes, allow_growth=False):
    """Folds every linear-on-the-data producer into its reader (see module docstring).

    Args:
        regimes: producer name -> `Regimes` of its channels along its chain (from
            `linearity.unit_regimes`); producers missing here are left alone.

    Returns:
        (new network, names of the folded layers, names linear but kept because merging grows).
    """
    collapsed, skipped = [], []
    while True:
        for producer, chain, reader in candidates(network):
            regime = regimes.get(producer.name)
            if regime is None or not regime.linear.all() or producer.name in skipped:
                continue
            composed = compose(producer, reader, regime.slope, regime.intercept)
            if composed is None:
                continue
            weights, config = composed
            if sum(weight.size for weight in weights) > producer.params + reader.params and not allow_growth:
                skipped.append(producer.name)
                continue
            merged = dataclasses.replace(reader, weights=weights, config={**config, "use_bias": True}, inputs=producer.inputs)
            gone = {producer.name} | {node.name for node in chain}
            nodes = tuple(merged if node.name == reader.name else node for node in network.nodes if node.name not in gone)
            network = dataclasses.replace(network, nodes=nodes)
            collapsed.append(producer.name)
            break
        else:
            return network, collapsed, skipped
