"""Convolutional and branching models as a graph of layers whose tensors carry channels.

A `Network` is the functional graph of a Keras model (Dense, Conv2D, DepthwiseConv2D,
BatchNormalization, pooling, padding, Flatten, Add, Concatenate, Activation, Dropout),
weights as read-only float64 arrays. Channels play the role of neurons: every Dense or
Conv2D output is a *space* of channels; layers that act per channel pass it on; `Add`
couples the spaces of its inputs into one *group* (their channels are kept, removed or
split together, so a residual network stays valid); `Concatenate` lays groups side by
side; `Flatten` repeats a layout once per spatial position. `layout(node)` says which
group and channel every position of the node's last axis holds.

BatchNormalization right after a Dense or Conv2D with no activation (and no other
reader) is folded into it, as for chains.

Example:
    >>> network = read_network(model)
    >>> network.layout("flatten")[:2]          # (slot, group, channels) segments
    [Segment(slot=0, group='conv_2', size=8), Segment(slot=1, group='conv_2', size=8)]
    >>> build_network(network).count_params() <= model.count_params()
    True
"""

import dataclasses
import functools
import math

import keras
import numpy as np

from keras_embed.errors import InputError, UnsupportedLayerError
from keras_embed.graph import frozen_array
from keras_embed.read import _activation_name, _history_names

PRODUCERS = ("Dense", "Conv2D")
PER_CHANNEL = ("BatchNormalization", "DepthwiseConv2D")
ELEMENTWISE = ("Activation", "Dropout")
SPATIAL = ("MaxPooling2D", "AveragePooling2D", "ZeroPadding2D")
GLOBAL = ("GlobalAveragePooling2D", "GlobalMaxPooling2D")
FLATTENING = ("Flatten", "Reshape")
MERGING = ("Add", "Concatenate")
SUPPORTED = ("InputLayer",) + PRODUCERS + PER_CHANNEL + ELEMENTWISE + SPATIAL + GLOBAL + FLATTENING + MERGING


@dataclasses.dataclass(frozen=True)
class Node:
    """One layer of a `Network`.

    Args:
        name: the Keras layer name.
        kind: the Keras class name (one of `SUPPORTED`).
        inputs: names of the nodes it reads, in order.
        config: the layer's `get_config()`.
        weights: its weights in `get_weights()` order, float64.
        shape: its output shape without the batch axis.
    """

    name: str
    kind: str
    inputs: tuple
    config: dict = dataclasses.field(compare=False)
    weights: tuple = ()
    shape: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "weights", tuple(frozen_array(weight) for weight in self.weights))

    @property
    def activation(self):
        """The activation name of a Dense, Conv2D, DepthwiseConv2D or Activation ('linear' else)."""
        return self.config.get("activation", "linear")

    @property
    def width(self):
        """Channels of the output (its last axis)."""
        return self.shape[-1]

    @property
    def params(self):
        return sum(weight.size for weight in self.weights)

    @property
    def flops(self):
        """Multiply-adds x 2 plus bias adds per input sample, for Dense, Conv2D and
        DepthwiseConv2D (other layers: 0)."""
        if self.kind not in PRODUCERS + ("DepthwiseConv2D",):
            return 0
        positions = math.prod(self.shape[:-1])
        return sum(2 * weight.size if weight.ndim > 1 else weight.size for weight in self.weights) * positions


@dataclasses.dataclass(frozen=True)
class Segment:
    """Positions of a layout: `size` channels of `group`, at spatial `slot` (Flatten)."""

    slot: int
    group: str
    size: int


@dataclasses.dataclass(frozen=True)
class Network:
    """A single-input, single-output functional graph of `Node`s in topological order."""

    name: str
    input_name: str
    input_shape: tuple
    input_dtype: str
    nodes: tuple
    output: str

    @functools.cached_property
    def by_name(self):
        return {node.name: node for node in self.nodes}

    def node(self, name):
        """The node called `name`.

        Raises:
            ValueError: naming the nodes there are.
        """
        if name not in self.by_name:
            raise ValueError(f"no layer {name!r}; layers are: {', '.join(self.by_name)}")
        return self.by_name[name]

    @functools.cached_property
    def readers(self):
        """Node name -> names of the nodes that read it."""
        readers = {node.name: [] for node in self.nodes}
        for node in self.nodes:
            for source in node.inputs:
                readers[source].append(node.name)
        return readers

    @functools.cached_property
    def groups(self):
        """Space (producer or input name) -> its group (the representative space)."""
        parent = {}

        def find(space):
            parent.setdefault(space, space)
            while parent[space] != space:
                parent[space] = parent[parent[space]]
                space = parent[space]
            return space

        find(self.input_name)
        for node in self.nodes:
            if node.kind in PRODUCERS:
                find(node.name)
            elif node.kind == "Add":
                spaces = [self._single_space(source, node) for source in node.inputs]
                for space in spaces[1:]:
                    parent[find(space)] = find(spaces[0])
        return {space: find(space) for space in parent}

    def _single_space(self, source, add):
        """The one space a tensor entering an Add carries (Add of concatenations is refused)."""
        while True:
            node = self.by_name[source]
            if node.kind in PRODUCERS or node.kind == "InputLayer":
                return node.name
            if node.kind in MERGING and node.kind != "Add" or node.kind in FLATTENING:
                raise UnsupportedLayerError(
                    f"layer '{add.name}' (Add) adds the output of '{node.name}' ({node.kind}); only tensors of one "
                    "Dense/Conv2D output (through per-channel layers) can be added"
                )
            source = node.inputs[0]

    @functools.cached_property
    def layouts(self):
        """Node name -> the `Segment`s of the last axis of its output, in order."""
        layouts = {}
        for node in self.nodes:
            if node.kind == "InputLayer" or node.kind in PRODUCERS:
                layouts[node.name] = [Segment(0, self.groups[node.name], node.width)]
            elif node.kind == "Concatenate":
                layouts[node.name] = [segment for source in node.inputs for segment in layouts[source]]
            elif node.kind in FLATTENING:
                source = layouts[node.inputs[0]]
                slots = math.prod(self.by_name[node.inputs[0]].shape[:-1])
                layouts[node.name] = [Segment(slot * len(source) + index, segment.group, segment.size)
                                      for slot in range(slots) for index, segment in enumerate(source)]
            else:
                layouts[node.name] = layouts[node.inputs[0]]
        return layouts

    def layout(self, name):
        """The `Segment`s of the last axis of node `name`'s output, in order."""
        return self.layouts[name]

    def positions(self, name, group):
        """Indices on node `name`'s last axis holding channels of `group`, as an
        (occurrences, channels) array (one row per segment of that group)."""
        rows, offset = [], 0
        for segment in self.layout(name):
            if segment.group == group:
                rows.append(np.arange(offset, offset + segment.size))
            offset += segment.size
        return np.array(rows, dtype=int) if rows else np.zeros((0, 0), dtype=int)

    @functools.cached_property
    def frozen_groups(self):
        """Groups whose channels cannot change: the input's and the model output's."""
        return {self.groups[self.input_name]} | {segment.group for segment in self.layout(self.output)}

    def group_width(self, group):
        return next(self.by_name[space].width for space, root in self.groups.items() if root == group)

    def spaces(self, group):
        """Producer nodes whose output channels form `group`."""
        return [self.by_name[space] for space, root in self.groups.items() if root == group and space != self.input_name]

    def editable_groups(self):
        """Groups of Dense/Conv2D channels that rules and operators may change, in graph order."""
        seen = []
        for node in self.nodes:
            if node.kind in PRODUCERS and self.groups[node.name] not in self.frozen_groups | set(seen):
                seen.append(self.groups[node.name])
        return seen

    @property
    def params(self):
        return sum(node.params for node in self.nodes)

    @property
    def flops(self):
        return sum(node.flops for node in self.nodes)


def _check_layer(layer):
    kind = type(layer).__name__
    if kind not in SUPPORTED or type(layer) is not getattr(keras.layers, kind):
        raise UnsupportedLayerError(
            f"layer '{layer.name}' ({kind}) is not supported; supported layers: {', '.join(SUPPORTED)}"
        )
    config = layer.get_config()
    if kind in ("Conv2D", "DepthwiseConv2D"):
        if tuple(config.get("dilation_rate", (1, 1))) != (1, 1) or config.get("groups", 1) != 1 \
                or config.get("data_format", "channels_last") != "channels_last" or config.get("depth_multiplier", 1) != 1:
            raise UnsupportedLayerError(
                f"layer '{layer.name}' ({kind}) uses dilation, groups, depth_multiplier or channels_first; "
                "only channels_last, dilation 1, groups 1, depth_multiplier 1 are supported"
            )
    if kind == "Reshape" and len(config["target_shape"]) != 1:
        raise UnsupportedLayerError(f"layer '{layer.name}' (Reshape) does more than flatten; only Reshape((n,)) is supported")
    if kind == "Concatenate" and config["axis"] not in (-1, len(layer.output.shape) - 1):
        raise UnsupportedLayerError(f"layer '{layer.name}' (Concatenate) joins axis {config['axis']}; only the channel axis is supported")
    if kind == "BatchNormalization":
        axis = config["axis"][0] if isinstance(config["axis"], (list, tuple)) else config["axis"]
        if axis not in (-1, len(layer.input.shape) - 1):
            raise UnsupportedLayerError(f"layer '{layer.name}' (BatchNormalization) normalizes axis {axis}; only the last axis is supported")
    if "activation" in config:
        config["activation"] = _activation_name(layer, layer.activation)
    return kind, config


def _fold_batchnorm(nodes, readers):
    """Folds each BatchNormalization into the Dense/Conv2D before it when that layer has no
    activation and no other reader. Returns the nodes left and {folded name: its producer}."""
    kept, renamed = {}, {}
    for node in nodes:
        node = dataclasses.replace(node, inputs=tuple(renamed.get(source, source) for source in node.inputs))
        source = kept.get(node.inputs[0]) if node.inputs else None
        if node.kind == "BatchNormalization" and source is not None and source.kind in PRODUCERS \
                and source.activation == "linear" and readers[source.name] == [node.name]:
            scale, shift = _batchnorm_affine(node)
            kernel, *bias = source.weights
            bias = (bias[0] if bias else 0.0) * scale + shift
            kept[source.name] = dataclasses.replace(source, weights=(kernel * scale, bias), config={**source.config, "use_bias": True})
            renamed[node.name] = source.name
        else:
            kept[node.name] = node
    return list(kept.values()), renamed


def _batchnorm_affine(node):
    """(scale, shift) of an inference-mode BatchNormalization node."""
    weights = list(node.weights)
    gamma = weights.pop(0) if node.config.get("scale", True) else 1.0
    beta = weights.pop(0) if node.config.get("center", True) else 0.0
    mean, variance = weights
    scale = gamma / np.sqrt(variance + node.config["epsilon"])
    return scale * np.ones_like(mean), beta - mean * scale


def read_network(model):
    """Reads a functional or Sequential Keras model of supported layers into a `Network`.

    Raises:
        UnsupportedLayerError: other layers, shared layers, several inputs or outputs.
        InputError: `model` is not a built Keras model.
    """
    if not isinstance(model, keras.Model):
        raise InputError(f"expected a keras.Model, got {type(model).__name__}")
    if not getattr(model, "inputs", None) or len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedLayerError(f"model '{model.name}' must have one input and one output")
    tensor = model.inputs[0]
    input_name = tensor.name if type(model) is keras.Sequential else _endpoint(model, "input_layers")
    nodes = [Node(input_name, "InputLayer", (), {}, (), tuple(tensor.shape[1:]))]
    sources = _sources(model, input_name)
    if len({id(layer) for layer in model.layers}) != len(model.layers):
        raise UnsupportedLayerError(f"model '{model.name}' uses a layer more than once (a shared layer); it is not supported")
    for layer in model.layers:
        if type(layer) is keras.layers.InputLayer:
            continue
        kind, config = _check_layer(layer)
        if sources[layer.name] is None:
            raise UnsupportedLayerError(f"layer '{layer.name}' is called more than once (a shared layer); it is not supported")
        weights = [np.asarray(weight, dtype=np.float64) for weight in layer.get_weights()]
        nodes.append(Node(layer.name, kind, tuple(sources[layer.name]), config, tuple(weights), tuple(layer.output.shape[1:])))
    readers = {node.name: [] for node in nodes}
    for node in nodes:
        for source in node.inputs:
            readers[source].append(node.name)
    nodes, renamed = _fold_batchnorm(nodes, readers)
    output = model.layers[-1].name if type(model) is keras.Sequential else _endpoint(model, "output_layers")
    output = renamed.get(output, output)
    return Network(model.name, input_name, tuple(tensor.shape[1:]), str(tensor.dtype), tuple(nodes), output)


def _endpoint(model, key):
    """The layer name of a functional model's single input or output."""
    entries = model.get_config()[key]
    return entries[0] if isinstance(entries[0], str) else entries[0][0]  # one entry may be stored unnested


def _sources(model, input_name):
    """Layer name -> names of the layers it reads (None for a layer called more than once)."""
    if type(model) is keras.Sequential:
        names = [input_name] + [layer.name for layer in model.layers]
        return {name: [previous] for previous, name in zip(names, names[1:])}
    return {
        entry["name"]: _history_names(entry["inbound_nodes"]) if len(entry.get("inbound_nodes", [])) == 1 else None
        for entry in model.get_config()["layers"]
    }


def _layer(node):
    config = dict(node.config, name=node.name)
    if node.kind == "Dense":
        config["units"] = node.width
    elif node.kind == "Conv2D":
        config["filters"] = node.width
    elif node.kind == "Reshape":
        config["target_shape"] = (node.width,)
    return getattr(keras.layers, node.kind).from_config(config)


def _tensors(network, inputs, split_activations=False):
    """Node name -> its output tensor on `inputs`, with the (layer, node) pairs to load.
    With `split_activations`, Dense/Conv2D layers compute without their activation, which
    follows as an Activation layer, and "name/z" holds each pre-activation."""
    tensors, layers = {network.input_name: inputs}, []
    for node in network.nodes[1:]:
        split = split_activations and node.kind in PRODUCERS and node.activation != "linear"
        layer = _layer(dataclasses.replace(node, config={**node.config, "activation": "linear"}) if split else node)
        arguments = [tensors[source] for source in node.inputs]
        tensors[node.name] = tensors[f"{node.name}/z"] = layer(arguments if node.kind in MERGING else arguments[0])
        if split:
            tensors[node.name] = keras.layers.Activation(node.activation, name=f"{node.name}_probe_activation")(tensors[node.name])
        layers.append((layer, node))
    return tensors, layers


def _load_weights(layers):
    for layer, node in layers:
        if node.weights:
            dtypes = [keras.backend.standardize_dtype(weight.dtype) for weight in layer.weights]
            layer.set_weights([np.asarray(weight, dtype=dtype) for weight, dtype in zip(node.weights, dtypes)])


def probe_outputs(probe, batch):
    """The outputs of a probe from `build_network(..., outputs=names)` on `batch`, as a list
    (Keras returns a lone array when there is one name)."""
    values = probe.predict_on_batch(batch)
    return [np.asarray(value) for value in values] if isinstance(values, (list, tuple)) else [np.asarray(values)]


def build_network(network, outputs=None, split_activations=False):
    """A new functional Keras model of stock layers computing what `network` describes.

    With `outputs` (node names, "name/z" for a pre-activation; see `_tensors`), a probe
    model returning those tensors instead of the network's output.
    """
    inputs = keras.Input(shape=network.input_shape, dtype=network.input_dtype, name=network.input_name)
    tensors, layers = _tensors(network, inputs, split_activations)
    result = tensors[network.output] if outputs is None else [tensors[name] for name in outputs]
    model = keras.Model(inputs, result, name=network.name)
    _load_weights(layers)
    return model
