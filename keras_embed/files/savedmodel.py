"""Plain SavedModels (no Keras metadata): the serving graph rebuilt as a stock Keras model.

A SavedModel from Keras 3 `model.export()` or TF Serving keeps a TensorFlow graph, not
Keras layers. Its serving signature is read as a checked graph of constants without
running anything from the file (`savedmodel_read`), every value that does not depend on
the input is then computed once, and the ops on the paths from the input to the output
are read in graph order, each into Keras layers (`savedmodel_ops`, one entry per op
type), branches and merges included: the result is a DAG of stock layers
(`savedmodel_layers`, which also folds biases, scales and activations into the layer
before them where that is exact). An op outside `savedmodel_ops.OPS` raises
`UnsupportedLayerError` listing every such op found.

Example:
    >>> model = read_savedmodel("exported/")      # from keras_model.export("exported/")
    >>> [type(layer).__name__ for layer in model.layers]
    ['InputLayer', 'Dense', 'Dense']
"""

import numpy as np

from keras_embed.errors import UnsupportedLayerError
from keras_embed.files.savedmodel_layers import LayerGraph, build_model
from keras_embed.files.savedmodel_ops import OPS, Op, translate, unsupported
from keras_embed.files.savedmodel_read import read_serving_graph

_SHAPE_OPS = ("Shape", "StridedSlice", "Pack", "Cast", "Prod", "Mul", "ConcatV2", "GatherV2")  # compute a target shape
BATCH = 3  # the input's batch size while the graph is read: every static shape is then known
_SHAPE_OPERANDS = {"Reshape": 1, "Conv2DBackpropInput": 0}  # the operand a shape computation may be


def _data_path(graph, source):
    """(path ops in graph order, names of every op that depends on `source`, names of the
    shape computations among them: Shape and what reads only it, read only as a Reshape's
    target shape or a transposed convolution's output size)."""
    dependent, shape_ops, path = {source.op.name}, set(), []
    for op in graph.get_operations():
        readers = [tensor.op.name for tensor in op.inputs]
        if op.name in dependent or not dependent.intersection(readers):
            continue
        dependent.add(op.name)
        if op.type == "Shape" or shape_ops.issuperset(dependent.intersection(readers)):
            shape_ops.add(op.name)
        else:
            path.append(op)
    stray = [op.type for op in path if op.type in _SHAPE_OPS and op.type not in OPS]
    stray += [op.type for op in path for index, tensor in enumerate(op.inputs)
              if tensor.op.name in shape_ops and _SHAPE_OPERANDS.get(op.type) != index]
    if stray or any(op.type not in _SHAPE_OPS for op in graph.get_operations() if op.name in shape_ops):
        raise unsupported(stray or [op.type for op in graph.get_operations() if op.name in shape_ops],
                          "shape computations outside a Reshape's target shape or a "
                          "transposed convolution's output size")
    return path, dependent, shape_ops


def _constants(graph, ops, dependent):
    """Values of every input of `ops` that does not depend on the model input.

    The one place a graph from the file runs: a Session evaluates these constant
    subexpressions of the serving graph, which `read_serving_graph` has checked (only
    pure ops, variables already constants, no control edges).
    """
    import tensorflow as tf

    tensors = {tensor.name: tensor for op in ops for tensor in op.inputs if tensor.op.name not in dependent}
    with tf.compat.v1.Session(graph=graph) as session:
        values = session.run(tensors)
    return {name: np.asarray(value, dtype=np.float64) if value.dtype.kind == "f" else np.asarray(value)
            for name, value in values.items()}


def _reads(path_ops, data, output):
    """{tensor name: how many times the path ops (and the signature's output) read it}; an
    IdentityN reads only the inputs whose outputs are read (custom gradients pass on
    values the forward pass never uses)."""
    reads = {output.name: 1}
    for op in reversed(path_ops):
        for tensor, passed in zip(op.inputs, op.outputs if op.type == "IdentityN" else [None] * len(op.inputs)):
            if tensor.op.name in data and (passed is None or reads.get(passed.name)):
                reads[tensor.name] = reads.get(tensor.name, 0) + 1
    return reads


def _bind(values, tensor, layer, reads):
    """Makes `layer` the value of `tensor`: a layer the op returned from its inputs (a fold,
    an identity) trades the op's read for the tensor's readers."""
    layer.readers += reads.get(tensor.name, 0) - (1 if layer.readers else 0)
    last = tensor.shape[-1] if tensor.shape.rank else None
    layer.width = int(last) if last is not None else None
    values[tensor.name] = layer


def read_savedmodel(path):
    """Rebuilds a plain SavedModel's serving graph as a Keras model of stock layers.

    Args:
        path: the SavedModel folder.

    Returns:
        A functional `keras.Model` computing what the serving signature computes.

    Raises:
        UnsupportedLayerError: what `read_serving_graph` refuses (ops with side effects,
            unreadable folders, several inputs or outputs), and ops outside
            `savedmodel_ops.OPS` or in a form they cannot be rebuilt in (all of them are listed).
        InputError: a damaged checkpoint.
    """
    serving = read_serving_graph(path, batch=BATCH)
    graph, source, output = serving.graph, serving.input, serving.output
    if not source.dtype.is_floating or len(source.shape) < 2:
        raise UnsupportedLayerError(f"SavedModel '{path}' takes a {source.dtype.name} input of shape "
                                    f"{source.shape[1:]} per sample; only float inputs with a batch axis are "
                                    "supported: prune the Keras model it was exported from")
    path_ops, dependent, shape_ops = _data_path(graph, source)
    unknown = [op.type for op in path_ops if op.type not in OPS]
    if unknown:
        raise unsupported(unknown)
    constants = _constants(graph, path_ops, dependent)
    reads, layers, values = _reads(path_ops, dependent - shape_ops, output), LayerGraph(), {}
    _bind(values, source, layers.add("Input", {}), reads)
    for op in path_ops:
        results = translate(Op(op, [values.get(tensor.name) for tensor in op.inputs],
                               [constants.get(tensor.name) for tensor in op.inputs], layers))
        for tensor, read, layer in zip(op.outputs, op.inputs, results if isinstance(results, list) else [results]):
            if layer is None:  # an IdentityN passing a constant on
                constants[tensor.name] = constants[read.name]
            elif reads.get(tensor.name):
                _bind(values, tensor, layer, reads)
    if output.name not in values:
        raise UnsupportedLayerError("the SavedModel's output does not depend on its input")
    return build_model(values[output.name], source)
