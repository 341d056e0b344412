"""Reads a Keras model into a `Graph`: a registry from layer class to what it becomes.

Example:
    >>> graph = read_model(keras.saving.load_model("saved_models/digits_widened.keras"))
    >>> graph.widths
    [64, 48, 10]
"""

import keras

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


def _read_dense(layer, chain, leading):
    config = layer.get_config()
    if config.get("lora_rank") or layer.kernel.dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise UnsupportedLayerError(
            f"layer '{layer.name}' (Dense) is quantized or uses LoRA; merge or dequantize it first"
        )
    bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
    chain.append(
        DenseLayer(
            name=layer.name,
            kernel=keras.ops.convert_to_numpy(layer.kernel),
            bias=bias,
            activations=(_activation_name(layer, layer.activation),),
            config=config,
        )
    )


def _follow(chain, leading, layer, activation=None):
    """Attaches an elementwise layer to the last Dense read (or to the input)."""
    serialized = keras.layers.serialize(layer)
    if not chain:
        leading.append(serialized)
        return
    last = chain[-1]
    extra = () if activation is None else (activation,)
    chain[-1] = DenseLayer(
        last.name, last.kernel, last.bias, last.activations + extra, last.config,
        last.followers + (serialized,),
    )


def _read_activation(layer, chain, leading):
    _follow(chain, leading, layer, _activation_name(layer, layer.activation))


def _read_dropout(layer, chain, leading):
    _follow(chain, leading, layer)  # a no-op at inference


_READERS = {
    keras.layers.Dense: _read_dense,
    keras.layers.Activation: _read_activation,
    keras.layers.Dropout: _read_dropout,
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
    chain, leading = [], []
    for layer in model.layers:
        if type(layer) is keras.layers.InputLayer:
            continue
        reader = _READERS.get(type(layer))
        if reader is None:
            raise _unsupported(layer)
        reader(layer, chain, leading)
    if not sequential:
        _check_chain(model)
    return Graph(
        name=model.name, input=spec, layers=tuple(chain), leading=tuple(leading), sequential=sequential
    )
