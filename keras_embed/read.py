"""Reads a Keras model into a `Graph`: a registry from layer class to what it becomes.

BatchNormalization (inference statistics) is folded into the adjacent Dense layer, so the
graph, and every model built from it, has none.

Example:
    >>> graph = read_model(keras.saving.load_model("saved_models/digits_widened.keras"))
    >>> graph.widths
    [64, 48, 10]
"""

import dataclasses

import keras
import numpy as np

from keras_embed import activations
from keras_embed.errors import InputError, UnsupportedLayerError
from keras_embed.graph import DenseLayer, Graph, InputSpec


def _activation_name(layer, activation):
    name = activations.name_of(activation)
    if name is None:
        raise UnsupportedLayerError(
            f"layer '{layer.name}' ({type(layer).__name__}) uses a custom activation; "
            "only Keras built-in activations are supported"
        )
    return name


class _Chain:
    """The Dense layers read so far, the layers before the first one, and a pending
    input-side affine map (from a BatchNormalization that follows an activation)."""

    def __init__(self):
        self.layers, self.leading = [], []
        self.pending = self.pending_name = None

    def follow(self, layer, activation=None):
        """Attaches an elementwise layer to the last Dense read (or to the input)."""
        serialized = keras.layers.serialize(layer)
        if not self.layers:
            self.leading.append(serialized)
            return
        last = self.layers[-1]
        extra = () if activation is None else (activation,)
        self.layers[-1] = dataclasses.replace(
            last, activations=last.activations + extra, followers=last.followers + (serialized,)
        )


def _read_dense(layer, chain):
    config = layer.get_config()
    if config.get("lora_rank") or layer.kernel.dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise UnsupportedLayerError(
            f"layer '{layer.name}' (Dense) is quantized or uses LoRA; merge or dequantize it first"
        )
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    bias = keras.ops.convert_to_numpy(layer.bias).astype(np.float64) if layer.use_bias else None
    if chain.pending is not None:  # x -> scale * x + shift feeds this layer
        scale, shift = chain.pending
        bias = (np.zeros(kernel.shape[1]) if bias is None else bias) + shift @ kernel
        kernel = scale[:, None] * kernel
        chain.pending = None
    chain.layers.append(DenseLayer(
        name=layer.name, kernel=kernel, bias=bias,
        activations=(_activation_name(layer, layer.activation),), config=config,
    ))


def _read_activation(layer, chain):
    if chain.pending is not None and _activation_name(layer, layer.activation) != "linear":
        raise UnsupportedLayerError(
            f"layer '{chain.pending_name}' (BatchNormalization) sits between two activations (before "
            f"'{layer.name}'); it can be folded only into a Dense layer next to it"
        )
    chain.follow(layer, _activation_name(layer, layer.activation))


def _read_dropout(layer, chain):
    chain.follow(layer)  # a no-op at inference


def _read_batchnorm(layer, chain):
    """Folds inference-mode BatchNormalization into the Dense before it (when nothing
    nonlinear sits between them) or into the Dense after it."""
    config = layer.get_config()
    axis = config["axis"][0] if isinstance(config["axis"], (list, tuple)) else config["axis"]
    if axis not in (-1, len(layer.input.shape) - 1):
        raise UnsupportedLayerError(f"layer '{layer.name}' (BatchNormalization) normalizes axis {axis}; only the last axis is supported")
    mean = keras.ops.convert_to_numpy(layer.moving_mean).astype(np.float64)
    variance = keras.ops.convert_to_numpy(layer.moving_variance).astype(np.float64)
    gamma = keras.ops.convert_to_numpy(layer.gamma).astype(np.float64) if layer.scale else 1.0
    beta = keras.ops.convert_to_numpy(layer.beta).astype(np.float64) if layer.center else 0.0
    scale = gamma / np.sqrt(variance + layer.epsilon)
    shift = beta - mean * scale
    last = chain.layers[-1] if chain.layers else None
    if chain.pending is None and last is not None and set(last.activations) == {"linear"}:
        bias = shift if last.bias is None else last.bias * scale + shift
        chain.layers[-1] = last.with_weights(last.kernel * scale, bias)
    elif chain.pending is None:
        chain.pending, chain.pending_name = (scale, shift), layer.name
    else:  # two in a row: compose
        chain.pending = (chain.pending[0] * scale, chain.pending[1] * scale + shift)


_READERS = {
    keras.layers.Dense: _read_dense,
    keras.layers.Activation: _read_activation,
    keras.layers.Dropout: _read_dropout,
    keras.layers.BatchNormalization: _read_batchnorm,
}
SUPPORTED_LAYERS = ("InputLayer",) + tuple(cls.__name__ for cls in _READERS)


def _unsupported(layer):
    return UnsupportedLayerError(
        f"layer '{layer.name}' ({type(layer).__name__}) is not supported; "
        f"supported layers: {', '.join(SUPPORTED_LAYERS)}"
    )


def _history_names(node):
    """Names of the layers whose outputs feed a serialized inbound node."""
    if isinstance(node, dict):
        if "keras_history" in node:
            return [node["keras_history"][0]]
        return [name for value in node.values() for name in _history_names(value)]
    if isinstance(node, (list, tuple)):
        return [name for value in node for name in _history_names(value)]
    return []


def _check_chain(model):
    """Raises unless every layer of a functional model feeds only the next one."""
    config = model.get_config()
    previous = None
    for layer_config in config["layers"]:
        nodes = layer_config.get("inbound_nodes", [])
        sources = _history_names(nodes)
        if previous is not None and (len(nodes) != 1 or sources != [previous]):
            raise UnsupportedLayerError(
                f"layer '{layer_config['name']}' is not fed by the single layer before it; "
                "only chains of layers are supported (no branches or shared layers)"
            )
        previous = layer_config["name"]
    outputs = config["output_layers"]
    if isinstance(outputs[0], str):  # a single output is stored unnested
        outputs = [outputs]
    if [entry[0] for entry in outputs] != [previous]:
        raise UnsupportedLayerError("the model output is not its last layer; only chains are supported")


def _input_spec(model):
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise InputError(f"model '{model.name}' has no defined input; build it with keras.Input first")
    if len(inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedLayerError(
            f"model '{model.name}' has {len(inputs)} inputs and {len(model.outputs)} outputs; "
            "only single-input, single-output models are supported"
        )
    tensor = inputs[0]
    return InputSpec(name=tensor.name, shape=tuple(tensor.shape[1:]), dtype=str(tensor.dtype))


def read_model(model):
    """Reads a Sequential or functional chain of supported layers into a `Graph`.

    Args:
        model: a built `keras.Model`.

    Returns:
        The `Graph`; the model itself is not modified.

    Raises:
        UnsupportedLayerError: for any other layer or structure; it names the layer.
        InputError: when `model` is not a built Keras model.
    """
    if not isinstance(model, keras.Model):
        raise InputError(f"expected a keras.Model, got {type(model).__name__}")
    spec = _input_spec(model)
    sequential = type(model) is keras.Sequential
    if not sequential:
        _check_chain(model)
    if len({id(layer) for layer in model.layers}) != len(model.layers):
        raise UnsupportedLayerError(
            f"model '{model.name}' uses a layer more than once (a shared layer); only chains of distinct layers are supported"
        )
    chain = _Chain()
    for layer in model.layers:
        if type(layer) is keras.layers.InputLayer:
            continue
        reader = _READERS.get(type(layer))
        if reader is None:
            raise _unsupported(layer)
        reader(layer, chain)
    if chain.pending is not None:
        raise UnsupportedLayerError(
            f"layer '{chain.pending_name}' (BatchNormalization) follows the last Dense layer's activation and "
            "cannot be folded; only BatchNormalization next to a Dense layer is supported"
        )
    return Graph(
        name=model.name, input=spec, layers=tuple(chain.layers), leading=tuple(chain.leading), sequential=sequential
    )


def read_chain(model):
    """`read_model(model)`, or None when `model` is not a Dense chain (then see
    `network.read_network`, which names what neither path supports).

    Example:
        >>> graph = read_chain(model)
        >>> graph is None            # a Conv2D network
        True
    """
    try:
        return read_model(model)
    except UnsupportedLayerError:
        return None
