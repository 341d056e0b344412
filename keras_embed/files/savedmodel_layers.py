"""The Keras layers a plain SavedModel's serving graph becomes, gathered before any is built.

`savedmodel_ops` reads the graph op by op into a `LayerGraph`: a DAG of `Layer`s (a stock
Keras class name, its config, its weights, the layers it reads). While it grows, what a
neighbouring layer can absorb exactly is folded into it, so that the model keeps the shape
Keras gave it before export:

- a per-channel affine map (a bias, a scale, an inference batch normalization, a
  division by a constant) goes into the Dense or convolution before it, or into the
  affine map before it, when nothing else reads that layer; otherwise it stays an
  `Affine`, built as an inference-only BatchNormalization layer;
- an activation goes into the Dense or convolution before it on the same condition;
- `relu6(x + 3) / 6` becomes `hard_sigmoid(x)` (also when the 3 went into a bias),
  `x * sigmoid(x)` becomes `silu(x)` and `x * hard_sigmoid(x)` becomes `hard_silu(x)`
  (Keras' own definitions) when their inner values have no other reader.

`Layer.readers` counts the reads of a layer's value (by ops, and by the signature's
output); a fold or a pattern only ever replaces a layer read once.

Example:
    >>> graph = LayerGraph()
    >>> dense = graph.add("Dense", {"units": 2}, [kernel, bias], [graph.add("Input", {})])
    >>> dense.width, dense.readers = 2, 1                # what the op reading it sets
    >>> graph.affine(dense, 2.0, 1.0) is dense        # folded into its kernel and bias
    True
    >>> build_model(dense, source).layers[-1].__class__.__name__
    'Dense'
"""

import dataclasses

import keras
import numpy as np

from keras_embed.errors import UnsupportedLayerError
from keras_embed.files.savedmodel_ops import UNFINISHED

LINEAR = ("Dense", "Conv2D", "DepthwiseConv2D", "Conv2DTranspose")  # a kernel and a bias an affine map folds into
_EPSILON = 1e-3  # BatchNormalization's default, kept as the epsilon of an Affine layer
_HARD_SIGMOID_SHIFT, _HARD_SIGMOID_SCALE = 3.0, 1.0 / 6.0  # hard_sigmoid(x) = relu6(x + 3) / 6
_CLASSES = {"Affine": keras.layers.BatchNormalization}


@dataclasses.dataclass(eq=False)
class Layer:
    """A Keras layer to build: `kind` (a `keras.layers` class name, or 'Affine', 'Input'),
    its `config`, `weights`, the `inputs` it reads, the `width` of its output's last axis
    (None when unknown) and how many times it is read (`readers`)."""

    kind: str
    config: dict
    weights: list
    inputs: list
    width: int | None = None
    readers: int = 0

    @property
    def open_linear(self):
        """A Dense or convolution with nothing applied after it."""
        return self.kind in LINEAR and self.config.get("activation", "linear") == "linear"

    def is_activation(self, name):
        return self.kind == "Activation" and self.config["activation"] == name


def _is_constant(values, constant):
    return np.allclose(values, constant, rtol=0.0, atol=1e-7)


class LayerGraph:
    """The layers read so far from a serving graph, with the folds above."""

    def add(self, kind, config, weights=(), inputs=()):
        """A new layer reading `inputs` (their readers were counted with the ops that read them)."""
        return Layer(kind, dict(config), list(weights), list(inputs))

    def affine(self, layer, scale, shift):
        """`layer`'s value times `scale` plus `shift` (scalars or one per channel)."""
        if layer.width is None:
            raise UnsupportedLayerError("the SavedModel's serving graph scales or shifts a tensor whose number of "
                                        "channels is not static, which keras-embed cannot rebuild as Keras layers")
        scale = np.broadcast_to(np.asarray(scale, np.float64), (layer.width,))
        shift = np.broadcast_to(np.asarray(shift, np.float64), (layer.width,))
        if np.all(scale == 1.0) and np.all(shift == 0.0):  # silu's x * beta with beta 1
            return layer
        hard_sigmoid = self._hard_sigmoid(layer, scale, shift)
        if hard_sigmoid is not None:
            return hard_sigmoid
        if layer.readers == 1 and layer.open_linear:
            kernel, bias = layer.weights
            per_output = scale
            if layer.kind == "DepthwiseConv2D":  # (h, w, channels, multiplier)
                per_output = scale.reshape(kernel.shape[2:])
            elif layer.kind == "Conv2DTranspose":  # (h, w, outputs, inputs)
                per_output = scale[:, None]
            layer.weights = [kernel * per_output, bias * scale + shift]
            return layer
        if layer.readers == 1 and layer.kind == "Affine":
            before_scale, before_shift = layer.weights
            layer.weights = [before_scale * scale, before_shift * scale + shift]
            return layer
        return self.add("Affine", {"epsilon": _EPSILON}, [scale.copy(), shift.copy()], [layer])

    def activation(self, layer, name):
        """`name` (a Keras activation) applied to `layer`'s value."""
        if layer.readers == 1 and layer.open_linear:
            layer.config["activation"] = name
            return layer
        return self.add("Activation", {"activation": name}, (), [layer])

    def multiply(self, first, second):
        """`first * second`: silu or hard_silu when one is the sigmoid or hard sigmoid of the
        other, else a Multiply layer (it broadcasts a (1, 1, channels) gate)."""
        for value, gate in ((first, second), (second, first)):
            for sigmoid, product in (("sigmoid", "silu"), ("hard_sigmoid", "hard_silu")):
                if gate.is_activation(sigmoid) and gate.readers == 1 and gate.inputs[0] is value:
                    value.readers -= 1  # the gate's read; the product's read is the Mul's
                    return self.activation(value, product)
        return self.add("Multiply", {}, (), [first, second])

    def _hard_sigmoid(self, layer, scale, shift):
        """hard_sigmoid(z - 3) for relu6(z) / 6 where `layer` is relu6(z) read once: a Dense or
        convolution with relu6 (its bias moves by -3), or relu6 of an affine map adding 3."""
        if not (layer.readers == 1 and _is_constant(scale, _HARD_SIGMOID_SCALE) and _is_constant(shift, 0.0)):
            return None
        if layer.kind in LINEAR and layer.config.get("activation") == "relu6":
            kernel, bias = layer.weights
            layer.weights, layer.config["activation"] = [kernel, bias - _HARD_SIGMOID_SHIFT], "hard_sigmoid"
            return layer
        shifted = layer.inputs[0] if layer.is_activation("relu6") else None
        if not (shifted is not None and shifted.kind == "Affine" and shifted.readers == 1
                and _is_constant(shifted.weights[0], 1.0) and _is_constant(shifted.weights[1], _HARD_SIGMOID_SHIFT)):
            return None
        return self.activation(shifted.inputs[0], "hard_sigmoid")


def _weights_of(layer):
    if layer.kind != "Affine":
        return layer.weights
    scale, shift = layer.weights  # inference batch normalization: gamma x / sqrt(1 - eps + eps) + beta
    return [scale, shift, np.zeros_like(scale), np.full_like(scale, 1.0 - _EPSILON)]


def build_model(output, source, name="savedmodel"):
    """The functional Keras model computing `output` (a `Layer`) from `source` (the
    serving graph's input tensor); layers nothing reads on the way are left out."""
    inputs = keras.Input(shape=tuple(source.shape[1:]), dtype=source.dtype.name, name="input")
    built, weighted = {}, []

    def tensor_of(layer):
        order, pending = [], [(layer, False)]
        while pending:  # iterative post-order: deep graphs (DenseNet) exceed Python's recursion limit
            current, expanded = pending.pop()
            if id(current) in built:
                continue
            if expanded:
                built[id(current)] = call(current)
                continue
            pending.append((current, True))
            pending += [(reader, False) for reader in current.inputs if id(reader) not in built]
        return built[id(layer)]

    def call(layer):
        if layer.kind == "Input":
            return inputs
        if layer.kind in UNFINISHED:
            raise UnsupportedLayerError(f"the SavedModel's serving graph ends inside a {UNFINISHED[layer.kind].pattern}"
                                        ", which keras-embed cannot rebuild as Keras layers")
        keras_layer = _CLASSES.get(layer.kind) or getattr(keras.layers, layer.kind)
        keras_layer = keras_layer(**layer.config)
        arguments = [built[id(reader)] for reader in layer.inputs]
        outputs = keras_layer(arguments if len(arguments) > 1 else arguments[0])
        if layer.weights:
            weighted.append((keras_layer, _weights_of(layer)))
        return outputs

    outputs = tensor_of(output)
    for keras_layer, weights in weighted:
        keras_layer.set_weights([np.asarray(weight, dtype=keras_layer.weights[0].dtype) for weight in weights])
    return keras.Model(inputs, outputs, name=name)
