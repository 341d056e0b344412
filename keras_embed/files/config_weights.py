"""The weights a model config declares, counted from the parsed config alone.

Keras allocates a layer's weights when it builds the layer, before it reads any stored
value, so a config declaring a billion units costs gigabytes even when the file stores
a few bytes. `declared_weights` counts what the stock weight-carrying layers of a config
will allocate, without building anything, so that `io.load_model` can refuse a config
that declares far more than its file stores.

Example:
    >>> declared_weights('{"class_name": "Dense", "config": {"units": 3}, '
    ...                  '"build_config": {"input_shape": [null, 4]}}')
    15

A layer's input comes from its `build_config`, which Keras 3 and tf_keras write for every
built layer and build it from. Where it is missing (legacy `.h5` configs record none),
every input axis counts as the largest size the config names (a dimension of a shape, a
layer's width), and the features a Dense-like layer reads from the last axis as the
largest product of a shape's dimensions when the config also holds a Flatten or Reshape
(which move other axes into the last). Layers that grow a tensor before a Flatten (more
filters, UpSampling) are not seen then: `Declared.unbuilt` names the layers counted so.
"""

import dataclasses
import json
import math

_INPUT_KEYS = ("batch_shape", "batch_input_shape", "input_shape")  # where a config names a model input
_SHAPE_KEYS = (*_INPUT_KEYS, "target_shape", "output_shape")
_WIDTH_KEYS = ("units", "filters", "output_dim", "num_tokens")  # the last axis of a layer's output
_WRAPPERS = ("Bidirectional", "TimeDistributed", "RNN", "SpectralNormalization")  # build what they hold on their input


def _size(value):
    """A positive integer size from a config value, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _is_shape(value):
    return isinstance(value, list) and all(item is None or _size(item) for item in value)


def _shapes(value):
    """Every shape (a list of sizes and nulls) in a config value, nested lists and dicts
    included, in order."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if _is_shape(item):
            found += [item] if item else []
        elif isinstance(item, (list, dict)):
            stack += reversed(list(item.values() if isinstance(item, dict) else item))
    return found


class _Input:
    """A layer input as far as the config tells: its sizes without the batch axis, or,
    when unknown, bounds on them: `bound` on one axis, `size` on a product of axes,
    `features` on the last axis of a layer that reads it as features (Dense-like)."""

    def __init__(self, sizes=None, bound=0, size=0, features=0):
        self.sizes, self.bound, self.size, self.features_bound = sizes, bound, size, features

    def axis(self, index):
        """The size of one axis (1 when unknown or missing: Keras then refuses to build)."""
        if self.sizes is None:
            return self.bound
        try:
            return self.sizes[index] or 1
        except (IndexError, TypeError):
            return 1

    def features(self):
        """The size of the last axis, read as features."""
        return self.features_bound if self.sizes is None else self.axis(-1)

    def product(self, axes=None):
        """The product of the sizes of `axes` (default: all)."""
        if self.sizes is None:
            return self.bound if axes is not None and len(axes) == 1 else self.size
        return math.prod(self.axis(index) for index in (range(len(self.sizes)) if axes is None else axes))


def _axes(value, default=-1):
    value = default if value is None else value
    return [value] if isinstance(value, int) else [axis for axis in value if isinstance(axis, int)]


def _kernel(config):
    """Positions of a convolution kernel: the product of `kernel_size`."""
    size = config.get("kernel_size", 1)
    return math.prod(_size(side) for side in size) if isinstance(size, list) else _size(size)


def _channels(inputs, config):
    return inputs.axis(0 if config.get("data_format") == "channels_first" else -1)


def _lora(inputs, outputs, config):
    """Weights of a LoRA adapter (`lora_rank`) on an inputs x outputs kernel."""
    return _size(config.get("lora_rank")) * (inputs + outputs)


def _dense(inputs, config):
    units = _size(config.get("units"))
    features = inputs[0].features()
    return (features + 1) * units + _lora(features, units, config)


def _convolution(inputs, config):  # Conv*D and Conv*DTranspose: kernel positions x channels per group x filters
    filters, groups = _size(config.get("filters")), _size(config.get("groups", 1)) or 1
    return (_kernel(config) * -(-_channels(inputs[0], config) // groups) + 1) * filters


def _depthwise(inputs, config):
    return _channels(inputs[0], config) * _size(config.get("depth_multiplier", 1)) * (_kernel(config) + 1)


def _separable(inputs, config):
    depthwise = _channels(inputs[0], config) * _size(config.get("depth_multiplier", 1))
    filters = _size(config.get("filters"))
    return depthwise * _kernel(config) + (depthwise + 1) * filters


def _embedding(inputs, config):
    rows, columns = _size(config.get("input_dim")), _size(config.get("output_dim"))
    return rows * columns + _lora(rows, columns, config)


def _recurrent(gates):
    """A recurrent layer (or cell) with `gates` kernels over its input and its state."""

    def weights(inputs, config):
        units = _size(config.get("units"))
        return gates * units * (inputs[0].features() + units + 2)  # 2: GRU's second bias (reset_after)

    return weights


def _convolutional_recurrent(inputs, config):
    filters = _size(config.get("filters"))
    return 4 * filters * (_kernel(config) * (_channels(inputs[0], config) + filters) + 1)


def _normalization(per_channel):
    """A normalization layer with `per_channel` weights over its `axis` (default -1)."""

    def weights(inputs, config):
        return per_channel * inputs[0].product(_axes(config.get("axis")))

    return weights


def _prelu(inputs, config):
    shared = {axis - 1 for axis in _axes(config.get("shared_axes"), default=[])}  # shared_axes count the batch
    sizes = inputs[0].sizes
    return inputs[0].product(None if sizes is None else [axis for axis in range(len(sizes)) if axis not in shared])


def _adapted_normalization(inputs, config):  # Normalization: mean, variance, count
    return 2 * inputs[0].product(_axes(config.get("axis"))) + 1


def _attention_inputs(inputs):
    """(query, value, key) widths of an attention layer (value defaults to query, key to value)."""
    query = inputs[0].features()
    value = inputs[1].features() if len(inputs) > 1 else query
    return query, value, inputs[2].features() if len(inputs) > 2 else value


def _multi_head_attention(inputs, config):
    query, value, key = _attention_inputs(inputs)
    heads, key_dim = _size(config.get("num_heads")), _size(config.get("key_dim"))
    value_dim = _size(config.get("value_dim")) or key_dim
    output = config.get("output_shape")
    output = math.prod(_size(size) for size in output) if isinstance(output, list) else _size(output) or query
    return heads * (key_dim * (query + key + 2) + value_dim * (value + 1 + output)) + output


def _group_query_attention(inputs, config):
    query, value, key = _attention_inputs(inputs)
    query_heads, key_value_heads = _size(config.get("num_query_heads")), _size(config.get("num_key_value_heads"))
    head_dim = _size(config.get("head_dim"))
    return head_dim * (query_heads * (2 * query + 2) + key_value_heads * (key + value + 2)) + query


def _einsum_dense(inputs, config):
    """EinsumDense: each kernel axis takes its size from the input or the output it names."""
    try:
        sources, output_spec = str(config.get("equation")).split("->")
        input_spec, kernel_spec = sources.split(",")
    except ValueError:
        return 0
    output_shape = config.get("output_shape")
    output_shape = output_shape if isinstance(output_shape, list) else [output_shape]
    known = [1, *inputs[0].sizes] if inputs[0].sizes is not None else None
    sizes = {}
    for spec, shape in ((output_spec, output_shape), (input_spec, known)):
        letters = spec.replace("...", "")
        for offset, letter in enumerate(reversed(letters)):  # both align at the right, past any ellipsis
            in_range = shape is not None and offset < len(shape)
            sizes[letter] = (_size(shape[-1 - offset]) or 1) if in_range else inputs[0].bound or 1
    kernel = math.prod(sizes.get(letter, 1) for letter in kernel_spec.replace("...", ""))
    bias = math.prod(sizes.get(letter, 1) for letter in str(config.get("bias_axes") or ""))
    return kernel + bias + _lora(kernel, 0, config)


def _additive_attention(inputs, config):
    return inputs[0].features() + 2


def _bidirectional(inputs, config):
    """Without a `backward_layer`, Keras builds a second copy of `layer`."""
    return 0 if isinstance(config.get("backward_layer"), dict) else _node_weights(config.get("layer"), [inputs])


_LAYER_WEIGHTS = {  # weights Keras allocates for a layer, from its inputs and config
    "Dense": _dense,
    "EinsumDense": _einsum_dense,
    "Embedding": _embedding,
    **dict.fromkeys(("Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"),
                    _convolution),
    **dict.fromkeys(("DepthwiseConv1D", "DepthwiseConv2D"), _depthwise),
    **dict.fromkeys(("SeparableConv1D", "SeparableConv2D"), _separable),
    **dict.fromkeys(("SimpleRNN", "SimpleRNNCell"), _recurrent(1)),
    **dict.fromkeys(("LSTM", "LSTMCell"), _recurrent(4)),
    **dict.fromkeys(("GRU", "GRUCell"), _recurrent(3)),
    **dict.fromkeys(("ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D"), _convolutional_recurrent),
    "BatchNormalization": _normalization(4),
    "LayerNormalization": _normalization(2),
    "GroupNormalization": _normalization(2),
    "RMSNormalization": _normalization(1),
    "Normalization": _adapted_normalization,
    "PReLU": _prelu,
    "MultiHeadAttention": _multi_head_attention,
    "GroupQueryAttention": _group_query_attention,
    "Attention": lambda inputs, config: 2,
    "AdditiveAttention": _additive_attention,
    "Bidirectional": _bidirectional,
}


def _built_inputs(build_config):
    """The inputs a build_config builds a layer with, or None: its input_shape (one shape
    or several), or its shapes_dict in the order query, value, key (attention layers)."""
    if not isinstance(build_config, dict):
        return None
    shapes = build_config.get("shapes_dict")
    if isinstance(shapes, dict):
        found = [shapes.get(f"{name}_shape") for name in ("query", "value", "key")]
        shapes = [shape for shape in found if _is_shape(shape) and shape] or _shapes(shapes)
    else:
        shapes = _shapes(build_config.get("input_shape"))
    return [_Input(shape[1:]) for shape in shapes] or None


def _node_weights(node, candidates):
    """The most weights a layer node allocates over `candidates`, each a list of inputs."""
    if not isinstance(node, dict) or not isinstance(node.get("config"), dict):
        return 0
    count = _LAYER_WEIGHTS.get(str(node.get("class_name")))
    return 0 if count is None else max(count(inputs, node["config"]) for inputs in candidates)


def _flattens(node):
    """Whether a layer node moves other axes into the last one, to a size no config entry
    names: a Flatten, or a Reshape whose target_shape ends in -1."""
    target = node.get("config", {}).get("target_shape") if isinstance(node.get("config"), dict) else None
    reshapes = node.get("class_name") == "Reshape" and not (isinstance(target, list) and target and _size(target[-1]))
    return node.get("class_name") == "Flatten" or reshapes


def _named(config):
    """What a config names, in one walk: layer widths, dimensions and products of its
    shapes, the shapes of model inputs and build_configs, whether a layer flattens, and
    how many objects (layers, initializers, policies...) it serializes."""
    named = {"widths": [0], "dimensions": [0], "products": [0], "inputs": [], "flattens": False, "objects": 0}
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            named["flattens"] = named["flattens"] or _flattens(node)
            named["objects"] += "class_name" in node and isinstance(node.get("config"), dict)
            for key, value in node.items():
                shapes = _shapes(value) if key in _SHAPE_KEYS or key == "build_config" else []
                named["widths"] += [_size(value)] if key in _WIDTH_KEYS else []
                named["dimensions"] += [_size(size) for shape in shapes for size in shape]
                named["products"] += [_Input(shape).product() for shape in shapes]
                named["inputs"] += shapes if key in _INPUT_KEYS or key == "build_config" else []
            stack += node.values()
        elif isinstance(node, list):
            stack += node
    return named


def _unknown_input(named):
    """Bounds on the input of a layer whose config does not record it (see the module docstring)."""
    bound, size = max(named["widths"] + named["dimensions"]), max(named["products"])
    return _Input(bound=bound, size=max(bound, size), features=max(bound, size) if named["flattens"] else bound)


def _layer_nodes(config):
    """[(layer node, inputs of its enclosing wrapper or None)] of every weight-carrying
    layer in a parsed config, nested ones included."""
    found, stack = [], [(config, None)]
    while stack:
        node, enclosing = stack.pop()
        if isinstance(node, dict):
            if str(node.get("class_name")) in _LAYER_WEIGHTS and isinstance(node.get("config"), dict):
                found.append((node, enclosing))
            if str(node.get("class_name")) in _WRAPPERS:
                enclosing = _built_inputs(node.get("build_config")) or enclosing
            stack += [(value, enclosing) for value in node.values()]
        elif isinstance(node, list):
            stack += [(value, enclosing) for value in node]
    return found


def _parse(config_text):
    try:
        return json.loads(config_text)
    except (TypeError, ValueError, RecursionError):
        return None


@dataclasses.dataclass(frozen=True)
class Declared:
    """What a model config declares, counted without building it.

    Attributes:
        weights: weights its stock weight-carrying layers allocate (see the module docstring).
        unbuilt: names of those layers without a build_config in a config that names an
            input shape: Keras then builds them from the graph, with inputs the config does
            not record (Keras 3 and tf_keras record one for every layer they built).
        objects: objects (layers, initializers, policies...) it serializes; a weights
            file's HDF5 groups and headers grow with them.
    """

    weights: int
    unbuilt: tuple
    objects: int


def declared(config_text):
    """The `Declared` figures of a model config (all 0 if the text is not JSON)."""
    config = _parse(config_text)
    named = _named(config)
    unknown, total, unbuilt = [_unknown_input(named)], 0, []
    for node, enclosing in _layer_nodes(config):
        built = _built_inputs(node.get("build_config"))
        if built is None and enclosing is None:
            unbuilt.append(str(node["config"].get("name", node.get("class_name"))))
        candidates = [built or (None if enclosing else unknown), enclosing]
        total += _node_weights(node, [inputs for inputs in candidates if inputs is not None])
    return Declared(total, tuple(unbuilt) if named["inputs"] else (), named["objects"])


def declared_weights(config_text):
    """Number of weights the stock weight-carrying layers of a model config declare (0 if
    the text is not JSON); see the module docstring for how inputs are found.

    Example:
        >>> declared_weights('{"class_name": "Embedding", "config": {"input_dim": 10, "output_dim": 4}}')
        40
    """
    return declared(config_text).weights
