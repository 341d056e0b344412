"""Reads a Keras model into the one `Graph`, and folds BatchNormalization where it is exact.

Sequential and functional models of the layers in `registry.REGISTRY` are read alike (a
subclass of the functional Model as the plain one of its layers); each layer's registry
entry reads its config and weights, into one node or a few in a row (a SeparableConv2D: its
depthwise part, then its pointwise part). The operations that only make the masks Keras
propagates (from an Embedding with mask_zero) are left out: the rebuilt layers make and hand
them on again. `fold_batchnorm` then moves
each inference-mode BatchNormalization into a neighbouring producer when that computes
the same: into the Dense/Conv2D before it (no activation between, only identity layers
such as Dropout, no other reader), or into every producer reading it (through identity
layers) when none of them pads with zeros. Otherwise the BatchNormalization stays, a
per-channel layer like any other.

Example:
    >>> graph = read_model(keras.saving.load_model("saved_models/digits_widened.keras"))
    >>> graph.widths
    [48, 36, 10]
"""

import dataclasses

import keras
import numpy as np

from keras_embed.errors import InputError, UnsupportedLayerError
from keras_embed.model import registry
from keras_embed.model.operations import as_layer
from keras_embed.model.graph import Graph, Node


def _history_names(node):
    """Names of the layers whose outputs feed a serialized inbound node."""
    if isinstance(node, dict):
        if "keras_history" in node:
            return [node["keras_history"][0]]
        return [name for value in node.values() for name in _history_names(value)]
    if isinstance(node, (list, tuple)):
        return [name for value in node for name in _history_names(value)]
    return []


def _endpoints(entries):
    """Layer names of a functional config's input_layers or output_layers (one entry may be stored unnested)."""
    return [entries[0]] if isinstance(entries[0], str) else [entry[0] for entry in entries]


MASK_KEYWORDS = ("mask", "query_mask", "value_mask", "key_mask")  # the masks Keras hands a layer from its inputs


def _topology(model):
    """(input names, {layer name: names of the layers it reads}, output names, {layer name:
    its serialized call (positional arguments, keyword arguments but masks)}, {layer name:
    names of the operations making the masks it is called with})."""
    if type(model) is keras.Sequential:
        names = [model.inputs[0].name] + [layer.name for layer in model.layers]
        return names[:1], {name: [previous] for previous, name in zip(names, names[1:])}, names[-1:], {}, {}
    config = model.get_config()
    sources, arguments, masks = {}, {}, {}
    for entry in config["layers"]:
        calls = entry.get("inbound_nodes", [])
        if len(calls) > 1:
            raise UnsupportedLayerError(f"layer '{entry['name']}' is called more than once (a shared layer); "
                                        "it is not supported")
        args, keywords = (calls[0].get("args", []), calls[0].get("kwargs", {})) if calls else ([], {})
        keywords = {key: value for key, value in sorted(keywords.items(), key=lambda item: item[0] == "attention_mask")
                    if key not in MASK_KEYWORDS}  # an attention mask is read last
        sources[entry["name"]] = _history_names([args, keywords])
        masks[entry["name"]] = _history_names([calls[0].get("kwargs", {}).get(key) for key in MASK_KEYWORDS] if calls else [])
        arguments[entry["name"]] = (args, keywords)
    return _endpoints(config["input_layers"]), sources, _endpoints(config["output_layers"]), arguments, masks


def _mask_operations(model, sources, masks):
    """Names of the operations (not layers) whose outputs only make masks: Keras computes them
    again from the layers' configs (an Embedding with mask_zero) when the model is rebuilt."""
    readers = {}
    for name, read in sources.items():
        for source in read:
            readers.setdefault(source, set()).add(name)
    made = {source for read in masks.values() for source in read}
    found = set()
    for operation in reversed(model.operations):
        name = operation.name
        if not isinstance(operation, keras.layers.Layer) and (name in made or name in readers) \
                and readers.get(name, set()) <= found:
            found.add(name)
    return found


def _check_masks(operation, mask_sources, mask_operations):
    """Refuses a layer called with a mask Keras would not hand it again on rebuild: one not
    made by mask operations, or given to a layer whose inputs carry no mask Keras propagated
    (a model read back from a file holds the mask operations twice: those its config recorded
    and those the layers' compute_mask made again, so the two cannot be told apart by identity)."""
    inputs = operation.input if isinstance(operation.input, (list, tuple)) else [operation.input]
    propagated = any(getattr(tensor, "_keras_mask", None) is not None for tensor in inputs)
    for source in mask_sources:
        if source not in mask_operations or not propagated:
            raise UnsupportedLayerError(f"layer '{operation.name}' ({type(operation).__name__}) is called with a mask "
                                        f"from '{source}'; only the masks Keras propagates by itself (from an "
                                        "Embedding with mask_zero=True) are supported")


def _operation_nodes(operation, sources, arguments, keywords):
    """The nodes of one layer (its entry's `read_nodes`, each reading the one before), or the
    node of a Keras op on symbolic tensors (`operations.as_layer`)."""
    if not isinstance(operation, keras.layers.Layer):
        kind, config = as_layer(operation, arguments)
        return [Node(operation.name, kind, sources, {**config, "name": operation.name, "dtype": operation.output.dtype},
                     shape=tuple(operation.output.shape[1:]))]
    nodes, reads, entry = [], sources, registry.entry_of(operation)
    entry.check_call(operation, keywords)
    for name, kind, config, weights, shape, *given in entry.read_nodes(operation):
        if given:
            reads = tuple(sources[item] if isinstance(item, int) else item for item in given[0])
        nodes.append(Node(name, kind, reads, config, tuple(weights), shape))
        reads = (name,)
    return nodes[:-1] + [entry.with_call(nodes[-1], keywords)]


def _plain(model):
    """`model`, or a plain functional model of its layers when it is a subclass of one whose
    config does not list them (keras-hub's backbones)."""
    if type(model) is keras.Sequential or "layers" in model.get_config():
        return model
    return keras.Model(model.inputs, model.outputs, name=model.name)


def _layers_within(model):
    """Every layer of `model` but its inputs and nested models, those of the nested models included."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers_within(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            yield layer


def _layer_nodes(model, bound=()):
    """(input names, nodes of every layer of `model` but its inputs, output names, names of
    the models nested in it), models nested in it read through: their layers join the graph, reading
    what the nested model read. `bound`: the outer names a nested model's inputs stand for."""
    model = _plain(model)
    input_names, sources, outputs, arguments, masks = _topology(model)
    rename, nodes, nested = dict(zip(input_names, bound)), [], []
    operations = model.layers if type(model) is keras.Sequential else model.operations
    mask_operations = _mask_operations(model, sources, masks) if masks else set()
    for operation in operations:
        if operation.name in mask_operations:
            continue
        _check_masks(operation, masks.get(operation.name, ()), mask_operations)
        reads = tuple(rename.get(source, source) for source in sources.get(operation.name, ()))
        if isinstance(operation, keras.Model):
            _, inner, inner_outputs, inner_nested = _layer_nodes(operation, reads)
            if len(inner_outputs) != 1:
                raise UnsupportedLayerError(f"nested model '{operation.name}' has {len(inner_outputs)} outputs; "
                                            "only nested models with one output are supported")
            nodes, nested, rename[operation.name] = nodes + inner, nested + [operation.name, *inner_nested], inner_outputs[0]
        elif not isinstance(operation, keras.layers.InputLayer):
            nodes += _operation_nodes(operation, reads, *arguments.get(operation.name, ([], {})))
    return input_names, nodes, [rename.get(name, name) for name in outputs], nested


def nonfinite_weight(model):
    """(layer name, weight name) of the first NaN or infinite weight of `model`, or None."""
    for layer in model.layers:
        for weight, values in zip(layer.weights, layer.get_weights()):
            if not np.all(np.isfinite(values)):
                return layer.name, weight.name
    return None


def check_finite_weights(model):
    """Refuses a model holding a NaN or infinite weight, naming the first layer that does.

    Raises:
        InputError: such a weight; nothing keras-embed computes from it would mean anything.

    Example:
        >>> check_finite_weights(model)
        InputError: layer 'dense' of model 'mlp' holds NaN or infinite weights (kernel); ...
    """
    found = nonfinite_weight(model)
    if found is not None:
        raise InputError(f"layer '{found[0]}' of model '{model.name}' holds NaN or infinite weights ({found[1]}); "
                         "the model is broken: retrain it or use an earlier checkpoint")


def read_model(model, fold=True):
    """Reads a built Sequential or functional Keras model into a `Graph`.

    Args:
        model: a built `keras.Model`; it is not modified.
        fold: fold BatchNormalization into neighbouring producers where exact
            (`fold_batchnorm`); without it, the graph holds one node per Keras layer, with
            the same weights.

    Raises:
        UnsupportedLayerError: a layer or structure the registry does not know; it names it.
        InputError: `model` is not a built Keras model, or holds non-finite weights.
    """
    if not isinstance(model, keras.Model):
        raise InputError(f"expected a keras.Model, got {type(model).__name__}")
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise InputError(f"model '{model.name}' has no defined input; build it with keras.Input first")
    check_finite_weights(model)
    if len({id(layer) for layer in model.layers}) != len(model.layers):
        raise UnsupportedLayerError(f"model '{model.name}' uses a layer more than once (a shared layer); "
                                    "it is not supported")
    registry.refuse_unknown(_layers_within(model))
    input_names, layers, outputs, nested = _layer_nodes(model)
    nodes = [Node(name, "InputLayer", (), {"dtype": keras.backend.standardize_dtype(tensor.dtype)},
                  shape=tuple(tensor.shape[1:])) for name, tensor in zip(input_names, inputs)] + layers
    names = [node.name for node in nodes]
    if len(set(names)) != len(names):
        clash = next(name for name in names if names.count(name) > 1)
        raise UnsupportedLayerError(f"model '{model.name}' has two layers that read as '{clash}' (one name in two "
                                    "nested models, or a SeparableConv2D NAME read as NAME_depthwise and NAME); rename one")
    graph = Graph(model.name, tuple(nodes), tuple(outputs), sequential=type(model) is keras.Sequential,
                  nested=tuple(nested))
    return fold_batchnorm(graph) if fold else graph


def _is_identity(node):
    """An elementwise node that is the identity at inference (Dropout, a linear Activation)."""
    return node.entry.elementwise and getattr(node.entry.function(node), "is_identity", False)


def _folds_forward(graph, node):
    """The producer an affine node folds into from before it (through identity layers, each
    read only by the next), or None."""
    source, path = graph.by_name[node.inputs[0]], []
    while _is_identity(source):
        path.append(source)
        source = graph.by_name[source.inputs[0]]
    alone = all(len(graph.readers[item.name]) == 1 and item.name not in graph.outputs for item in [source, *path])
    linear = source.role == "produces" and getattr(source.entry.function(source), "is_identity", False)
    return source if linear and alone else None


def _folds_backward(graph, node):
    """The producers reading an affine node (through identity layers), when it folds into
    every one of them (none pads with zeros, nothing else reads it), or None."""
    readers, frontier = [], [node.name]
    while frontier:
        name = frontier.pop()
        if name in graph.outputs or not graph.readers[name]:
            return None
        for reader in (graph.by_name[item] for item in graph.readers[name]):
            if _is_identity(reader):
                frontier.append(reader.name)
            elif reader.role == "produces" and reader.entry.composes and not reader.entry.reads_zero_padding(reader):
                readers.append(reader)
            else:
                return None
    return readers


def _scaled_output(producer, scale, shift):
    entry = producer.entry
    bias = entry.bias(producer)
    return entry.with_weights(producer, entry.kernel(producer) * scale, (0.0 if bias is None else bias) * scale + shift)


def _scaled_input(reader, scale, shift):
    """`reader` reading x * scale + shift instead of x."""
    entry = reader.entry
    kernel, bias = entry.kernel(reader), entry.bias(reader)
    moved = np.moveaxis(kernel, -2, 0)  # (inputs, *spatial, outputs)
    extra = np.tensordot(shift, moved, axes=(0, 0)).reshape(-1, kernel.shape[-1]).sum(axis=0)
    return entry.with_weights(reader, np.moveaxis(moved * scale.reshape((-1,) + (1,) * (moved.ndim - 1)), 0, -2),
                              (0.0 if bias is None else bias) + extra)


def _rewired(item, removed):
    """`item` reading `removed`'s input instead of `removed` (the same node when it does not
    read it: a new node copies its weights)."""
    if removed.name not in item.inputs:
        return item
    return dataclasses.replace(item, inputs=tuple(removed.inputs[0] if source == removed.name else source
                                                  for source in item.inputs))


def _fold_one(graph):
    """The graph with its first foldable affine node folded, or None when there is none."""
    for node in graph.nodes:
        affine = node.entry.affine(node)
        if affine is None:
            continue
        forward, backward = _folds_forward(graph, node), _folds_backward(graph, node)
        if forward is None and backward is None:
            continue
        if forward is not None:
            changed = {forward.name: _scaled_output(forward, *affine)}
        else:
            changed = {reader.name: _scaled_input(reader, *affine) for reader in backward}
        nodes = [_rewired(changed.get(item.name, item), node) for item in graph.nodes if item.name != node.name]
        outputs = tuple(node.inputs[0] if name == node.name else name for name in graph.outputs)
        return dataclasses.replace(graph, nodes=tuple(nodes), outputs=outputs)
    return None


def fold_batchnorm(graph):
    """The graph with every BatchNormalization (every per-channel affine layer: its
    registry entry's `affine`) folded where exact (see module docstring), one at a time
    until none folds (a second one may fold once the first has).

    Example:
        >>> [node.kind for node in fold_batchnorm(read_model(model, fold=False)).nodes]
        ['InputLayer', 'Dense', 'Dense']
    """
    while True:
        folded = _fold_one(graph)
        if folded is None:
            return graph
        graph = folded
