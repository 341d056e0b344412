"""What each TensorFlow op of a plain SavedModel's serving graph becomes in Keras layers.

One entry per op type in `OPS`; each reads an `Op` (the op, the layer or constant value
of each of its inputs) and returns the `Layer` of its output (`savedmodel_layers`):

    MatMul, Conv2D, DepthwiseConv2dNative   Dense, Conv2D, DepthwiseConv2D (constant kernel;
                                            strides, dilations, SAME or VALID padding)
    Conv2DBackpropInput                     Conv2DTranspose (its output size static)
    StridedSlice                            Cropping2D (unit steps, height and width only)
    SpaceToBatchND, conv, BatchToSpaceND    a dilated Conv2D or DepthwiseConv2D (how TensorFlow
                                            writes one with SAME padding)
    BiasAdd, AddV2, Add, Sub, Mul, RealDiv, Neg, FusedBatchNorm(V2, V3)
                                            by constants: a per-channel affine map
    AddV2, Add / Mul of two layers          Add / Multiply (silu, hard_silu when they are)
    ConcatV2                                Concatenate
    Relu, Relu6, Elu, Selu, Tanh, Sigmoid, Softplus, Softmax, LeakyRelu (alpha 0.2)
                                            the activation (Activation, or folded)
    MaxPool, AvgPool, Pad                   MaxPooling2D, AveragePooling2D, ZeroPadding2D
    Mean, Max over height and width         GlobalAveragePooling2D, GlobalMaxPooling2D (keepdims)
    Reshape, Squeeze                        Flatten (to rows) or Reshape (static shapes)
    ExpandDims, Tile, Reshape               UpSampling2D (Keras' repeat of height, width or both)
    Reshape, MatMul, Reshape                Dense on more than two axes (tf.tensordot)
    Mean, SquaredDifference, Rsqrt, ...     LayerNormalization, and Erfc the exact gelu
                                            (`savedmodel_patterns`)
    Identity, IdentityN                     nothing

Anything else, or an entry's op in a form it cannot rebuild exactly, raises
`UnsupportedLayerError` naming the op.

Example:
    >>> translate(Op(relu6_op, [conv_layer], [None], graph)).config["activation"]
    'relu6'
"""

import dataclasses

import numpy as np

from keras_embed.errors import UnsupportedLayerError
from keras_embed.files import savedmodel_patterns as patterns
from keras_embed.files.savedmodel_patterns import Unfinished

ACTIVATIONS = {"Relu": "relu", "Relu6": "relu6", "Elu": "elu", "Selu": "selu", "Tanh": "tanh",
               "Sigmoid": "sigmoid", "Softplus": "softplus", "Softmax": "softmax", "LeakyRelu": "leaky_relu"}
BATCHNORMS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
POOLING = {"MaxPool": "MaxPooling2D", "AvgPool": "AveragePooling2D"}
GLOBAL_POOLING = {"Mean": "GlobalAveragePooling2D", "Max": "GlobalMaxPooling2D"}
_LEAKY_SLOPE = 0.2  # keras.activations.leaky_relu's slope


def unsupported(ops, why="ops keras-embed cannot rebuild as Keras layers"):
    """The error for `ops` of a serving graph that cannot be rebuilt, listing what can."""
    return UnsupportedLayerError(
        f"the SavedModel's serving graph holds {why}: {', '.join(sorted(set(ops)))}; "
        f"supported ops: {', '.join(OPS)}"
    )


@dataclasses.dataclass(frozen=True)
class Op:
    """One op of the path: the `tf.Operation`, for each of its inputs the `Layer` computing
    it (None for a constant) and its constant value (None for a layer), and the
    `LayerGraph` the result goes into."""

    op: object
    layers: list
    constants: list
    graph: object

    @property
    def kind(self):
        return self.op.type

    @property
    def data(self):
        """The layers among the inputs, in input order."""
        return [layer for layer in self.layers if layer is not None]

    def attr(self, name):
        value = self.op.get_attr(name)
        return value.decode() if isinstance(value, bytes) else value

    def refuse(self, why):
        return unsupported([self.kind], f"a {self.kind} {why}")

    def only_first_is_data(self):
        """The one layer input, which must come first with constants after it."""
        if len(self.data) != 1 or self.layers[0] is None:
            raise self.refuse("whose input is not its first operand or whose weights are not constants")
        return self.layers[0]


def _window(op):
    """Strides, padding and dilation of a convolution or pooling op, as Keras config."""
    if op.attr("data_format") != "NHWC" or op.attr("padding") not in ("SAME", "VALID"):
        raise op.refuse("that is not NHWC with SAME or VALID padding")
    config = {"strides": tuple(op.attr("strides")[1:3]), "padding": op.attr("padding").lower()}
    if "dilations" in op.op.node_def.attr:
        config["dilation_rate"] = tuple(op.attr("dilations")[1:3])
    return config


def _matmul(op):
    data = op.only_first_is_data()
    if op.attr("transpose_a"):
        raise op.refuse("whose input is transposed")
    kernel = op.constants[1].T if op.attr("transpose_b") else op.constants[1]
    units = kernel.shape[1]
    return op.graph.add("Dense", {"units": units, "activation": "linear"}, [kernel, np.zeros(units)], [data])


def _convolution(op, kind, config, bias_width):
    """A Conv2D or DepthwiseConv2D layer; on a SpaceToBatchND (TensorFlow's dilated
    convolution) it stays unfinished until the BatchToSpaceND after it."""
    data = op.only_first_is_data()
    config = {**config, "activation": "linear", **_window(op)}
    if data.kind == "SpaceToBatch" and (config["padding"] != "valid" or config["strides"] != (1, 1)):
        raise op.refuse("with strides or padding inside a dilated convolution")
    return op.graph.add(kind, config, [op.constants[1], np.zeros(bias_width)], [data])


def _conv2d(op):
    """Conv2D; a kernel reading fewer channels than the input has is a grouped one."""
    kernel, channels = op.constants[1], op.op.inputs[0].shape[-1]
    if channels is None or channels % kernel.shape[2]:
        raise op.refuse("whose input channels are not static or not a multiple of its kernel's")
    config = {"filters": kernel.shape[-1], "kernel_size": kernel.shape[:2]}
    if channels != kernel.shape[2]:
        config["groups"] = channels // kernel.shape[2]
    return _convolution(op, "Conv2D", config, kernel.shape[-1])


def _depthwise(op):
    kernel = op.constants[1]  # (height, width, channels, multiplier)
    return _convolution(op, "DepthwiseConv2D", {"kernel_size": kernel.shape[:2], "depth_multiplier": kernel.shape[3]},
                        kernel.shape[2] * kernel.shape[3])


def _conv_transpose(op):
    """Conv2DBackpropInput (Conv2DTranspose): its output size comes from the op's static
    output shape (the input_sizes operand is a shape computation), matched by output_padding."""
    if len(op.data) != 1 or op.layers[2] is None or op.constants[1] is None:
        raise op.refuse("whose input is not its third operand or whose kernel is not a constant")
    window, kernel, shape = _window(op), op.constants[1], op.op.outputs[0].shape
    if window.pop("dilation_rate", (1, 1)) != (1, 1) or not shape[1:].is_fully_defined():
        raise op.refuse("with dilations or without a static output size")
    size, wanted = np.asarray(op.op.inputs[2].shape[1:3]), np.asarray(shape[1:3])
    reach, strides = np.asarray(kernel.shape[:2]), np.asarray(window["strides"])
    same = window["padding"] == "same"
    natural = size * strides if same else size * strides + np.maximum(reach - strides, 0)  # Keras' own sizes
    config = {"filters": kernel.shape[2], "kernel_size": kernel.shape[:2], "activation": "linear", **window}
    if tuple(natural) != tuple(wanted):  # Keras: (size - 1) stride + kernel - 2 pad + output_padding
        padding = wanted - (size - 1) * strides - reach + (2 * (reach // 2) if same else 0)
        config["output_padding"] = tuple(int(pad) for pad in padding)
    return op.graph.add("Conv2DTranspose", config, [kernel, np.zeros(kernel.shape[2])], [op.layers[2]])


def _strided_slice(op):
    """A slice of height and width only, with unit steps: Cropping2D."""
    data, shape = op.only_first_is_data(), op.op.inputs[0].shape
    begin, end, steps = (np.asarray(value) for value in op.constants[1:4])
    masks = [op.attr(f"{kind}_mask") for kind in ("begin", "end", "ellipsis", "new_axis", "shrink_axis")]
    if len(shape) != 4 or not shape[1:3].is_fully_defined() or begin.shape != (4,) or np.any(steps != 1) or any(masks[2:]):
        raise op.refuse("that is not a unit-step slice of a 4-D tensor's height and width")
    bounds = [slice(None if masks[0] >> axis & 1 else int(begin[axis]), None if masks[1] >> axis & 1 else int(end[axis]))
              for axis in range(4)]
    full = [bounds[axis].indices(10**9)[:2] == (0, 10**9) for axis in (0, 3)]
    spans = [bounds[axis].indices(int(shape[axis]))[:2] for axis in (1, 2)]
    if not all(full) or any(stop <= start for start, stop in spans):
        raise op.refuse("of the batch or channel axis, or empty")
    cropping = tuple((start, int(shape[axis]) - stop) for axis, (start, stop) in zip((1, 2), spans))
    return op.graph.add("Cropping2D", {"cropping": cropping}, (), [data])


def _space_to_batch(op):
    data, block, paddings = op.only_first_is_data(), op.constants[1], op.constants[2]
    if np.shape(block) != (2,) or np.shape(paddings) != (2, 2):
        raise op.refuse("of other than height and width")
    return op.graph.add("SpaceToBatch", {"block": tuple(int(size) for size in block), "paddings": paddings}, (),
                        [data])


def _batch_to_space(op):
    """Finishes a dilated convolution: the block is its dilation, and the padding
    SpaceToBatchND added less what this op crops is its padding (SAME or VALID)."""
    conv, block, crops = op.only_first_is_data(), op.constants[1], op.constants[2]
    space = conv.inputs[0] if conv.inputs else None
    if not (conv.kind in ("Conv2D", "DepthwiseConv2D") and space.kind == "SpaceToBatch" and conv.readers == 1
            and tuple(int(size) for size in block) == space.config["block"] and np.shape(crops) == (2, 2)):
        raise op.refuse("that does not end a dilated convolution")
    padding = (space.config["paddings"] - crops).astype(int)
    reach = (np.asarray(conv.config["kernel_size"]) - 1) * np.asarray(space.config["block"])
    same = np.stack([reach // 2, reach - reach // 2], axis=1)
    if np.any(padding) and not np.array_equal(padding, same):
        raise op.refuse("whose convolution is padded other than SAME or VALID")
    conv.config.update(dilation_rate=space.config["block"], padding="same" if np.any(padding) else "valid")
    conv.inputs = [space.inputs[0]]
    return conv


def _per_channel(op, value, layer):
    """A constant operand as a scalar or one value per channel of `layer`, else unsupported."""
    shape = np.shape(value)
    if (layer.width is not None and len(shape) <= len(op.op.outputs[0].shape) and all(size == 1 for size in shape[:-1])
            and (not shape or shape[-1] in (1, layer.width))):
        return np.reshape(value, -1) if shape and shape[-1] == layer.width else np.reshape(value, ())
    raise op.refuse(f"with a constant that is not one value per channel (shape {shape})")


def _operands(op):
    """(the layer, the per-channel constant, whether the layer is the first operand) of a
    binary op with one constant operand."""
    if len(op.data) != 1:
        raise op.refuse("of these operands")
    first = op.layers[0] is not None
    layer, value = (op.layers[0], op.constants[1]) if first else (op.layers[1], op.constants[0])
    return layer, _per_channel(op, value, layer), first


def _add(op):
    if len(op.data) == 2:
        return op.graph.add("Add", {}, (), op.data)
    layer, value, _ = _operands(op)
    return op.graph.affine(layer, 1.0, value)


def _sub(op):
    layer, value, first = _operands(op)
    return op.graph.affine(layer, 1.0, -value) if first else op.graph.affine(layer, -1.0, value)


def _mul(op):
    if len(op.data) == 2:
        return op.graph.multiply(*op.data)
    layer, value, _ = _operands(op)
    return op.graph.affine(layer, value, 0.0)


def _real_div(op):
    layer, value, first = _operands(op)
    if not first:
        raise op.refuse("of a constant by a layer (a reciprocal)")
    return op.graph.affine(layer, 1.0 / value, 0.0)


def _neg(op):
    return op.graph.affine(op.only_first_is_data(), -1.0, 0.0)


def _batchnorm(op):
    data = op.only_first_is_data()
    if op.attr("is_training") or op.attr("data_format") not in ("NHWC", "NDHWC"):
        raise op.refuse("in training mode or not channels-last")
    gamma, beta, mean, variance = op.constants[1:5]
    scale = gamma / np.sqrt(variance + op.attr("epsilon"))
    return op.graph.affine(data, scale, beta - mean * scale)


def _activation(op):
    if op.kind == "LeakyRelu" and not np.isclose(op.attr("alpha"), _LEAKY_SLOPE):
        raise op.refuse(f"with alpha {op.attr('alpha'):g} (only {_LEAKY_SLOPE})")
    return op.graph.activation(op.only_first_is_data(), ACTIVATIONS[op.kind])


def _pool(op):
    config = {"pool_size": tuple(op.attr("ksize")[1:3]), **_window(op)}
    return op.graph.add(POOLING[op.kind], config, (), [op.only_first_is_data()])


def _global_pool(op):
    data = op.only_first_is_data()
    axes = sorted(int(axis) % 4 for axis in np.atleast_1d(op.constants[1]))
    if axes != [1, 2] or len(op.op.inputs[0].shape) != 4:
        raise op.refuse("over axes other than height and width")
    return op.graph.add(GLOBAL_POOLING[op.kind], {"keepdims": bool(op.attr("keep_dims"))}, (), [data])


def _expand_dims(op):
    """The first step of Keras' `ops.repeat` (UpSampling2D): a new axis to tile."""
    axis = int(op.constants[1]) % (len(op.op.inputs[0].shape) + 1)
    return op.graph.add("Expanded", {"axis": axis}, (), [op.only_first_is_data()])


def _tile(op):
    data, multiples = op.only_first_is_data(), np.asarray(op.constants[1]).reshape(-1)
    if data.kind != "Expanded" or np.any(np.delete(multiples, data.config["axis"]) != 1):
        raise op.refuse("other than along a new axis (Keras' repeat)")
    return op.graph.add("Tiled", {"axis": data.config["axis"], "repeats": int(multiples[data.config["axis"]])}, (),
                        data.inputs)


def _repeat(op, tiled, shape):
    """The end of Keras' repeat of height or width: UpSampling2D (merged with a repeat of the
    other axis just before it, as UpSampling2D itself writes one)."""
    axis, repeats, source = tiled.config["axis"] - 1, tiled.config["repeats"], tiled.inputs[0]
    expected = list(op.op.inputs[0].shape)
    expected[axis:axis + 2] = [None if expected[axis] is None else expected[axis] * repeats]
    if len(shape) != 4 or axis not in (1, 2) or list(shape) != expected:
        raise op.refuse("that does not end a repeat of height or width")
    size = (repeats, 1) if axis == 1 else (1, repeats)
    if (axis == 2 and source.kind == "UpSampling2D" and source.readers == 1 and source.config["size"][1] == 1):
        source.config["size"] = (source.config["size"][0], repeats)
        return source
    return op.graph.add("UpSampling2D", {"size": size, "interpolation": "nearest"}, (), [source])


def _starts_tensordot(op):
    """Whether this Reshape makes every position of a tensor of more than two axes a row for a
    MatMul whose result is reshaped back to the positions (`tf.tensordot`, a Dense on it)."""
    source, rows = list(op.op.inputs[0].shape), list(op.op.outputs[0].shape)
    if len(source) < 3 or rows != [source[0] * int(np.prod(source[1:-1])), source[-1]]:
        return False
    matmuls = op.op.outputs[0].consumers()
    back = matmuls[0].outputs[0].consumers() if len(matmuls) == 1 and matmuls[0].type == "MatMul" else []
    return (len(back) == 1 and back[0].type == "Reshape"
            and list(back[0].outputs[0].shape) == source[:-1] + [matmuls[0].outputs[0].shape[-1]])


def _unrows(op, dense, shape):
    """The end of a Dense on a tensor of more than two axes: the Dense on the tensor itself."""
    rows = dense.inputs[0]
    if list(shape) != [*rows.config["shape"][:-1], dense.config["units"]]:
        raise op.refuse("that does not restore the positions a Dense was applied to")
    dense.inputs = list(rows.inputs)
    return dense


def _reshape(op):
    """Reshape and Squeeze to a static shape: Flatten to rows, the end of a repeat, a Dense on
    more than two axes, else a Keras Reshape (the input's batch size is fixed while reading)."""
    data, shape = op.only_first_is_data(), op.op.outputs[0].shape
    if len(shape) < 2 or not shape.is_fully_defined():
        raise op.refuse("to a shape that is not static, or without a batch axis")
    if data.kind == "Tiled":
        return _repeat(op, data, shape)
    if data.kind == "Dense" and data.inputs[0].kind == "Rows":
        return _unrows(op, data, shape)
    if _starts_tensordot(op):
        return op.graph.add("Rows", {"shape": tuple(op.op.inputs[0].shape)}, (), [data])
    if shape[0] != op.op.inputs[0].shape[0]:
        raise op.refuse("that merges the batch axis with others")
    if len(shape) == 2:
        return op.graph.add("Flatten", {}, (), [data])
    return op.graph.add("Reshape", {"target_shape": tuple(shape[1:])}, (), [data])


def _concat(op):
    if any(layer is None for layer in op.layers[:-1]) or op.constants[-1] is None:
        raise op.refuse("of constants with layers")
    axis = int(op.constants[-1]) % len(op.op.outputs[0].shape)
    if axis == 0:
        raise op.refuse("along the batch axis")
    return op.graph.add("Concatenate", {"axis": axis - len(op.op.outputs[0].shape)}, (), op.layers[:-1])


def _pad(op):
    data, paddings = op.only_first_is_data(), np.asarray(op.constants[1])
    if op.kind == "PadV2" and np.any(op.constants[2] != 0):
        raise op.refuse("with a value other than zero")
    if paddings.shape != (4, 2) or np.any(paddings[[0, 3]] != 0):
        raise op.refuse("of other than height and width")
    return op.graph.add("ZeroPadding2D", {"padding": tuple(tuple(int(side) for side in pair)
                                                           for pair in paddings[1:3])}, (), [data])


def _transpose(op):
    if list(np.asarray(op.constants[1]).reshape(-1)) != list(range(len(op.op.inputs[0].shape))):
        raise op.refuse("that permutes axes")
    return op.only_first_is_data()


def _identity(op):
    """Its inputs; an IdentityN passes constants on too (None: the input's constant)."""
    return op.only_first_is_data() if op.kind == "Identity" else list(op.layers)


OPS = {
    "MatMul": _matmul, "Conv2D": _conv2d, "DepthwiseConv2dNative": _depthwise, "Conv2DBackpropInput": _conv_transpose,
    "StridedSlice": _strided_slice,
    "BiasAdd": _add, "AddV2": _add, "Add": _add, "Sub": _sub, "Mul": _mul, "RealDiv": _real_div, "Neg": _neg,
    **dict.fromkeys(BATCHNORMS, _batchnorm), **dict.fromkeys(ACTIVATIONS, _activation),
    **dict.fromkeys(POOLING, _pool), **dict.fromkeys(GLOBAL_POOLING, _global_pool),
    "Reshape": _reshape, "Squeeze": _reshape, "ConcatV2": _concat, "Pad": _pad, "PadV2": _pad,
    "SpaceToBatchND": _space_to_batch, "BatchToSpaceND": _batch_to_space, "ExpandDims": _expand_dims,
    "Tile": _tile, "Transpose": _transpose, "Identity": _identity, "IdentityN": _identity,
    **dict.fromkeys(patterns.OPS, patterns.step),
}


_REPEAT = "repeat (ExpandDims, Tile, Reshape)"
UNFINISHED = {
    "SpaceToBatch": Unfinished("dilated convolution (SpaceToBatchND, convolution, BatchToSpaceND)",
                               ("Conv2D", "DepthwiseConv2dNative"), ("BatchToSpaceND",)),
    "Rows": Unfinished("Dense on more than two axes (Reshape, MatMul, Reshape)", ("MatMul",), ("Reshape",)),
    "Expanded": Unfinished(_REPEAT, ("Tile",)),
    "Tiled": Unfinished(_REPEAT, ("Reshape",)),
    **patterns.UNFINISHED,
}


def translate(op):
    """The `Layer` (a list for IdentityN) of what `op` computes."""
    for layer in op.data:
        inside = [(UNFINISHED[layer.kind], UNFINISHED[layer.kind].readers)] if layer.kind in UNFINISHED else [
            (UNFINISHED[reader.kind], UNFINISHED[reader.kind].next) for reader in layer.inputs
            if reader.kind in UNFINISHED and UNFINISHED[reader.kind].next]
        for pattern, allowed in inside:
            if op.kind not in allowed:
                raise op.refuse(f"inside a {pattern.pattern}")
    return patterns.step(op) if patterns.applies(op) else OPS[op.kind](op)
