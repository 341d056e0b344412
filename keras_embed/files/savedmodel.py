"""Plain SavedModels (no Keras metadata): the serving graph rebuilt as a stock Keras model.

A SavedModel from Keras 3 `model.export()` or TF Serving keeps a TensorFlow graph, not
Keras layers. Its serving signature is read as a checked graph of constants without
running anything from the file (`savedmodel_read`), every value that does not depend on
the input is then computed once, and the ops on the path from the input to the output
are read in order:

    MatMul, Conv2D            a Dense or Conv2D layer (the constant operand is the kernel)
    BiasAdd, AddV2, Add, Sub  a per-channel constant added to the last layer's bias
    Mul                       a per-channel scale folded into the last layer
    FusedBatchNorm(V2, V3)    inference batch normalization, folded the same way
    Relu, Relu6, Elu, Selu, Tanh, Sigmoid, Softplus, Softmax, LeakyRelu (alpha 0.2)
                              the activation of the last layer (an Activation layer
                              when that one already has one)
    MaxPool, AvgPool, Mean over height and width, Reshape to rows   pooling and Flatten
    Identity                  nothing

A per-channel scale or shift after an activation becomes a BatchNormalization layer.
The path must be a chain: one input, one output, every op reading one input-dependent
tensor. Anything else raises `UnsupportedLayerError` listing the ops found.

Example:
    >>> model = read_savedmodel("exported/")      # from keras_model.export("exported/")
    >>> [type(layer).__name__ for layer in model.layers]
    ['InputLayer', 'Dense', 'Dense']
"""

import keras
import numpy as np

from keras_embed.errors import UnsupportedLayerError
from keras_embed.files.savedmodel_read import read_serving_graph

ACTIVATIONS = {"Relu": "relu", "Relu6": "relu6", "Elu": "elu", "Selu": "selu", "Tanh": "tanh",
               "Sigmoid": "sigmoid", "Softplus": "softplus", "Softmax": "softmax", "LeakyRelu": "leaky_relu"}
ADDITIONS = ("BiasAdd", "AddV2", "Add", "Sub")
BATCHNORMS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
POOLING = {"MaxPool": keras.layers.MaxPooling2D, "AvgPool": keras.layers.AveragePooling2D}
GLOBAL_POOLING = {"Mean": keras.layers.GlobalAveragePooling2D, "Max": keras.layers.GlobalMaxPooling2D}
SUPPORTED_OPS = ("MatMul", "Conv2D", *ADDITIONS, "Mul", *BATCHNORMS, *ACTIVATIONS, *POOLING, *GLOBAL_POOLING,
                 "Reshape", "Identity")
_SHAPE_OPS = ("Shape", "StridedSlice", "Pack", "Cast", "Prod", "ConcatV2")  # compute a Reshape's target shape
_LEAKY_SLOPE = 0.2  # keras.activations.leaky_relu's slope


def _unsupported(ops, why="ops keras-embed cannot rebuild as Keras layers"):
    return UnsupportedLayerError(
        f"the SavedModel's serving graph holds {why}: {', '.join(sorted(set(ops)))}; "
        f"supported ops: {', '.join(SUPPORTED_OPS)}"
    )


def _data_path(graph, source):
    """(main path ops in graph order, names of every op that depends on `source`, names of
    the shape computations of Reshape among them: Shape and what reads only it)."""
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
    stray = [op.type for op in path if op.type in _SHAPE_OPS]
    if stray or any(op.type not in _SHAPE_OPS for op in graph.get_operations() if op.name in shape_ops):
        raise _unsupported(stray or [op.type for op in graph.get_operations() if op.name in shape_ops],
                           "shape computations outside a Reshape")
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


class _Builder:
    """Keras layers of the chain read so far, with the pending per-channel affine map."""

    def __init__(self):
        self.layers = []  # [kind, config, weights]; the open one is the last
        self.scale = self.shift = None

    def open_linear(self):
        """The last layer if it is Dense or Conv2D with nothing applied after it."""
        last = self.layers[-1] if self.layers else None
        return last if last and last[0] in ("Dense", "Conv2D") and last[1]["activation"] == "linear" else None

    def affine(self, scale, shift, width):
        scale = np.broadcast_to(scale, (width,)).astype(np.float64)
        shift = np.broadcast_to(shift, (width,)).astype(np.float64)
        linear = self.open_linear()
        if linear is not None and self.scale is None:
            kernel, bias = linear[2]
            linear[2] = [kernel * scale, bias * scale + shift]
            return
        if self.scale is None:
            self.scale, self.shift = np.ones(width), np.zeros(width)
        self.scale, self.shift = self.scale * scale, self.shift * scale + shift

    def flush(self):
        """Emits the pending affine map as an inference-only BatchNormalization layer."""
        if self.scale is None:
            return
        epsilon = 1e-3
        weights = [self.scale, self.shift, np.zeros_like(self.scale), np.full_like(self.scale, 1.0 - epsilon)]
        self.layers.append(["BatchNormalization", {"epsilon": epsilon}, weights])
        self.scale = self.shift = None

    def add(self, kind, config, weights=()):
        self.flush()
        self.layers.append([kind, config, list(weights)])

    def activation(self, name):
        linear = self.open_linear()
        if linear is not None and self.scale is None:
            linear[1]["activation"] = name
        else:
            self.add("Activation", {"activation": name})


def _per_channel(value, width, op):
    """`value` as a per-channel vector (or scalar) of the last axis, else unsupported."""
    squeezed = np.squeeze(value)
    if squeezed.ndim == 0 or squeezed.shape == (width,):
        return squeezed
    raise _unsupported([op.type], f"a {op.type} with a constant that is not per channel (shape {value.shape})")


def _read_op(op, builder, data, constants, width):
    """Adds what one op of the path computes to `builder`."""
    others = [constants.get(tensor.name) for tensor in op.inputs if tensor.name != data.name]
    kind = op.type
    if kind == "MatMul":
        if op.get_attr("transpose_a") or op.inputs[0].name != data.name:
            raise _unsupported([kind], "a MatMul whose input is transposed or on the right")
        kernel = others[0].T if op.get_attr("transpose_b") else others[0]
        builder.add("Dense", {"units": kernel.shape[1], "activation": "linear"}, [kernel, np.zeros(kernel.shape[1])])
    elif kind == "Conv2D":
        padding = op.get_attr("padding").decode()
        if op.get_attr("data_format") != b"NHWC" or padding not in ("SAME", "VALID") or op.inputs[0].name != data.name:
            raise _unsupported([kind], "a Conv2D that is not NHWC with SAME or VALID padding")
        kernel = others[0]
        builder.add("Conv2D", {"filters": kernel.shape[-1], "kernel_size": kernel.shape[:2], "activation": "linear",
                               "strides": tuple(op.get_attr("strides")[1:3]), "padding": padding.lower(),
                               "dilation_rate": tuple(op.get_attr("dilations")[1:3])},
                    [kernel, np.zeros(kernel.shape[-1])])
    elif kind in ADDITIONS:
        if len(others) != 1 or others[0] is None:
            raise _unsupported([kind], f"a {kind} of two input-dependent tensors (a branching graph)")
        shift = _per_channel(others[0], width, op)
        negate = kind == "Sub"
        if negate and op.inputs[0].name != data.name:  # c - x
            builder.affine(-1.0, shift, width)
        else:
            builder.affine(1.0, -shift if negate else shift, width)
    elif kind == "Mul":
        if len(others) != 1 or others[0] is None:
            raise _unsupported([kind], "a Mul of two input-dependent tensors")
        builder.affine(_per_channel(others[0], width, op), 0.0, width)
    elif kind in BATCHNORMS:
        if op.get_attr("is_training") or op.get_attr("data_format") not in (b"NHWC", b"NDHWC"):
            raise _unsupported([kind], f"a {kind} in training mode or not channels-last")
        gamma, beta, mean, variance = others[:4]
        scale = gamma / np.sqrt(variance + op.get_attr("epsilon"))
        builder.affine(scale, beta - mean * scale, width)
    elif kind in ACTIVATIONS:
        if kind == "LeakyRelu" and not np.isclose(op.get_attr("alpha"), _LEAKY_SLOPE):
            raise _unsupported([kind], f"a LeakyRelu with alpha {op.get_attr('alpha'):g} (only {_LEAKY_SLOPE})")
        builder.activation(ACTIVATIONS[kind])
    elif kind in POOLING:
        padding = op.get_attr("padding").decode()
        if op.get_attr("data_format") != b"NHWC" or padding not in ("SAME", "VALID"):
            raise _unsupported([kind], f"a {kind} that is not NHWC with SAME or VALID padding")
        builder.add(kind, {"pool_size": tuple(op.get_attr("ksize")[1:3]),
                           "strides": tuple(op.get_attr("strides")[1:3]), "padding": padding.lower()})
    elif kind in GLOBAL_POOLING:
        axes = sorted(int(axis) % 4 for axis in np.atleast_1d(others[0]))
        if axes != [1, 2] or op.get_attr("keep_dims") or len(data.shape) != 4:
            raise _unsupported([kind], f"a {kind} over axes other than height and width")
        builder.add(kind, {})
    elif kind == "Reshape":
        if len(op.outputs[0].shape) != 2 or op.inputs[0].name != data.name:
            raise _unsupported([kind], "a Reshape to other than rows of features")
        builder.add("Flatten", {})


_LAYERS = {"Dense": keras.layers.Dense, "Conv2D": keras.layers.Conv2D, "Activation": keras.layers.Activation,
           "BatchNormalization": keras.layers.BatchNormalization, "Flatten": keras.layers.Flatten,
           **POOLING, **GLOBAL_POOLING}


def _build(builder, source):
    inputs = keras.Input(shape=tuple(source.shape[1:]), dtype=source.dtype.name, name="input")
    outputs, layers = inputs, []
    for kind, config, weights in builder.layers:
        layer = _LAYERS[kind](**config)
        outputs = layer(outputs)
        layers.append((layer, weights))
    for layer, weights in layers:
        if weights:
            layer.set_weights([np.asarray(weight, dtype=layer.weights[0].dtype) for weight in weights])
    return keras.Model(inputs, outputs, name="savedmodel")


def read_savedmodel(path):
    """Rebuilds a plain SavedModel's serving graph as a Keras model of stock layers.

    Args:
        path: the SavedModel folder.

    Returns:
        A functional `keras.Model` computing what the serving signature computes.

    Raises:
        UnsupportedLayerError: what `read_serving_graph` refuses (ops with side effects,
            unreadable folders, several inputs or outputs), branching graphs, and ops
            outside `SUPPORTED_OPS` (all of them are listed).
        InputError: a damaged checkpoint.
    """
    serving = read_serving_graph(path)
    graph, source, output = serving.graph, serving.input, serving.output
    if not source.dtype.is_floating or len(source.shape) < 2:
        raise UnsupportedLayerError(f"SavedModel '{path}' takes a {source.dtype.name} input of shape "
                                    f"{source.shape}; only float inputs with a batch axis are supported")
    path_ops, dependent, shape_ops = _data_path(graph, source)
    unknown = [op.type for op in path_ops if op.type not in SUPPORTED_OPS]
    if unknown:
        raise _unsupported(unknown)
    constants = _constants(graph, path_ops, dependent)
    builder, data = _Builder(), source
    for op in path_ops:
        inputs = [tensor for tensor in op.inputs if tensor.op.name in dependent - shape_ops]
        if len(inputs) != 1 or inputs[0].name != data.name:
            raise _unsupported([op.type], f"a {op.type} that does not read the previous op (a branching graph)")
        _read_op(op, builder, data, constants, int(data.shape[-1]) if data.shape[-1] is not None else 0)
        data = op.outputs[0]
    if data.name != output.name:
        raise UnsupportedLayerError("the SavedModel's output is not the end of its input's chain of ops")
    builder.flush()
    return _build(builder, source)
