"""Builds a stock Keras model from a `Graph`: it loads without keras-embed installed.

Layers keep their names and configs, inputs their names, shapes and dtypes; a graph read
from a Sequential model that is still a chain comes back Sequential. Nodes read from one
layer come back as that layer while they still fit in it (`fusions`: a SeparableConv2D);
a probe builds every node as its own layer. A *probe* returns
chosen tensors instead of the outputs: node outputs by name, and "NAME/z" for the
pre-activation of a producer with a fused activation.

Example:
    >>> model = build_model(read_model(original))
    >>> model.count_params() <= original.count_params()
    True
    >>> probe = build_model(graph, outputs=["hidden/z", "hidden"])
"""

import dataclasses

import keras
import numpy as np


def _is_chain(graph):
    return len(graph.inputs) == 1 and len(graph.outputs) == 1 and all(
        len(node.inputs) <= 1 and len(graph.readers[node.name]) <= 1 for node in graph.nodes)


def _split(node):
    """(the node without its fused activation, the activation name), or (node, None)."""
    activation = node.config.get("activation", "linear")
    if node.role != "produces" or activation == "linear" or node.entry.function(node) is None:
        return node, None  # nothing to split off (a recurrent layer's activation acts inside it)
    return dataclasses.replace(node, config={**node.config, "activation": "linear"}), activation


def fusions(graph):
    """Node name -> (Keras class, config, weights) of the one layer it is built as together
    with the node it reads (its registry entry's `fuse`: a SeparableConv2D's two parts), where
    nothing else reads that node and it is no output."""
    found = {}
    for node in graph.nodes:
        if len(node.inputs) == 1:
            source = graph.by_name[node.inputs[0]]
            if graph.readers[source.name] == [node.name] and source.name not in graph.outputs:
                fused = node.entry.fuse(node, source)
                if fused is not None:
                    found[node.name] = fused
    return found


def _layers(graph, fused, probed=()):
    """(node, Keras layer, weights, names of the nodes it reads, activation split off for a
    probe or None) of every node but the inputs and those built into their reader's layer
    (`fused`, from `fusions`); the producers in `probed` without their activation (`_split`)."""
    absorbed = {graph.by_name[name].inputs[0] for name in fused}
    for node in graph.nodes:
        if node.role == "input" or node.name in absorbed:
            continue
        if node.name in fused:
            kind, config, weights = fused[node.name]
            yield node, getattr(keras.layers, kind).from_config(config), weights, graph.by_name[node.inputs[0]].inputs, None
        else:
            built, activation = _split(node) if node.name in probed else (node, None)
            yield node, built.entry.layer(built), node.weights, node.inputs, activation


def _tensors(graph, probed, fused):
    """Node name -> output tensor (and "NAME/z" for the producers in `probed`), with the
    (layer, weights) pairs to load."""
    tensors = {node.name: keras.Input(shape=node.shape, dtype=node.config.get("dtype"), name=node.name)
               for node in graph.inputs}
    layers = []
    for node, layer, weights, inputs, activation in _layers(graph, fused, probed):
        arguments = [tensors[source] for source in inputs]
        tensors[node.name] = tensors[f"{node.name}/z"] = node.entry.call(node, layer, arguments)
        if activation is not None:
            tensors[node.name] = keras.layers.Activation(activation, name=f"{node.name}_probe_activation",
                                                         dtype=node.config.get("dtype"))(tensors[node.name])
        layers.append((layer, weights))
    return tensors, layers


def _output(tensors, name):
    """The tensor `name` names: a node's output, "NAME/z" a producer's pre-activation, "NAME/mask"
    the mask Keras propagates with a node's output (all true where it propagates none)."""
    if not name.endswith("/mask"):
        return tensors[name]
    tensor = tensors[name[:-len("/mask")]]
    mask = getattr(tensor, "_keras_mask", None)
    return mask if mask is not None else keras.ops.ones_like(tensor[..., 0], dtype="bool")


def load_weights(layers):
    """Sets the weights of each (Keras layer, float64 weights) pair, in the layer's dtypes."""
    for layer, weights in layers:
        if len(weights):
            dtypes = [keras.backend.standardize_dtype(weight.dtype) for weight in layer.weights]
            layer.set_weights([np.asarray(weight, dtype=dtype) for weight, dtype in zip(weights, dtypes)])


def build_model(graph, outputs=None):
    """A new Keras model of stock layers computing what `graph` describes.

    Args:
        graph: the `Graph`.
        outputs: for a probe, the tensors to return (node names, "NAME/z" for a
            producer's pre-activation, "NAME/mask" for the mask Keras propagates with a
            node's output); default: the graph's outputs.
    """
    fused = fusions(graph) if outputs is None else {}  # a probe may return any node's output
    if outputs is None and graph.sequential and _is_chain(graph):
        source = graph.inputs[0]
        layers = [(layer, weights) for _, layer, weights, _, _ in _layers(graph, fused)]
        inputs = keras.Input(shape=source.shape, dtype=source.config.get("dtype"), name=source.name)
        model = keras.Sequential([inputs, *(layer for layer, _ in layers)], name=graph.name)
    else:
        tensors, layers = _tensors(graph, {name[:-2] for name in outputs or () if name.endswith("/z")}, fused)
        result = [_output(tensors, name) for name in (graph.outputs if outputs is None else outputs)]
        inputs = [tensors[node.name] for node in graph.inputs]
        model = keras.Model(inputs if len(inputs) > 1 else inputs[0], result if len(result) > 1 else result[0],
                            name=graph.name)
    load_weights(layers)
    return model


class Prober:
    """Runs a probe model on batches, returning its outputs as a list of float64 arrays:
    eagerly for the first `EAGER_CALLS` batches (tracing a new model costs more than a few
    batches), then through Keras' traced `predict_on_batch`. Keep one across passes over
    the same probe (the monitor does) to trace it once.

    Example:
        >>> a, z = Prober(build_model(graph, outputs=["hidden", "hidden/z"]))(batch)
    """

    EAGER_CALLS = 2

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls <= self.EAGER_CALLS:
            values = self.model(batch, training=False)
        else:
            values = self.model.predict_on_batch(batch)
        values = values if isinstance(values, (list, tuple)) else [values]
        return [np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float64) for value in values]


def write_weights(model, graph):
    """Sets the weights of every layer of `model` that `graph` has a node of the same name
    for (a graph read with `fold=False` from that model, or a probe built from its graph);
    a layer built from two nodes (`fusions`) gets their weights together."""
    nodes, fused = graph.by_name, fusions(graph)

    def weights(layer):
        found = fused.get(layer.name)
        return found[2] if found is not None and found[0] == type(layer).__name__ else nodes[layer.name].weights

    load_weights([(layer, weights(layer)) for layer in model.layers if layer.name in nodes])
