"""What each Keras layer class means to keras-embed: one entry per class, and nowhere else.

An entry says the layer's channel role, how to read it and rebuild it with other
channel counts (stock Keras layers only), and what the rules may assume about it:

    produces       makes a new channel space from weights (Dense, Conv1D, Conv2D, Conv2DTranspose,
                   Embedding, the pointwise part of a SeparableConv2D); its kernel in the canonical form
                   (*spatial, inputs, outputs), whether it reads zero padding (then a
                   constant input cannot fold into its bias)
    keeps          keeps channel identity: elementwise (Activation, Dropout), per channel
                   with weights (BatchNormalization, DepthwiseConv2D), spatial (pooling,
                   padding, cropping, upsampling)
    merges         joins the groups of its inputs channel by channel (Add)
    concatenates   lays its inputs' channels side by side (Concatenate on the last axis)
    reshapes       repeats its input's channels once per spatial position (Flatten)
    input          a model input: its channels never change

Any entry may *freeze* the groups it sees when it mixes their channels (a softmax), and a
producer those it reads when it ties their channels together (a grouped convolution).
An entry may pick a *variant* by config (Conv2D with groups > 1, DepthwiseConv2D with
depth_multiplier > 1: block-diagonal producers), read a layer into several nodes in a row
(SeparableConv2D: a depthwise node, then a pointwise producer) and *fuse* them back into
one layer on build. Rules and edits ask the entry; they never test a layer's class.
Adding a layer type is one entry here plus its tests.

Example:
    >>> entry("Conv2D").role
    'produces'
    >>> entry("Conv2D").reads_zero_padding(node)      # a 3x3 'same' convolution
    True
"""

import dataclasses
import math

import keras
import numpy as np

from keras_embed.errors import UnsupportedLayerError
from keras_embed.model import activations


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where a producer's kernel reads: spatial `kernel_size`, `strides`, `padding`,
    `dilation` (all () for Dense, which acts on the last axis at every position); `transposed`
    for a transposed convolution (it composes with others only where it is pointwise)."""

    kernel_size: tuple = ()
    strides: tuple = ()
    padding: str = "valid"
    dilation: tuple = ()
    transposed: bool = False  # Conv2DTranspose: each output position reads the input unevenly

    @property
    def pointwise(self):
        """A 1x1 kernel of stride 1: it acts on every position alone."""
        return all(size == 1 for size in self.kernel_size) and all(step == 1 for step in self.strides)


def refuse_channels_first(layer, config):
    """Raises `UnsupportedLayerError` for a layer whose channels are not on the last axis."""
    if config.get("data_format", "channels_last") != "channels_last":
        raise UnsupportedLayerError(f"layer '{layer.name}' ({type(layer).__name__}) uses channels_first; "
                                    "only channels_last layers are supported")


def apply_known(function, values):
    """`function` on the known (not NaN) entries of `values`; NaN elsewhere."""
    known = ~np.isnan(values)
    out = np.full(len(values), np.nan)
    if function is not None:
        out[known] = function(values[known])
    return out


def _activation_name(layer):
    name = activations.name_of(layer.activation)
    if name is None:
        raise UnsupportedLayerError(f"layer '{layer.name}' ({type(layer).__name__}) uses a custom activation; "
                                    "only Keras built-in activations are supported")
    return name


class LayerType:
    """The default entry: a layer with no weights that keeps its input's channels."""

    role = "keeps"
    elementwise = False  # acts on every value alone (Activation, Dropout)
    commutes_with_scaling = False  # whatever its config (pooling, Add)
    passes = None  # the per-position maps it commutes with: "affine" (Flatten, average pooling), "monotone" (max pooling)
    has_heads = False  # its units are attention heads (`edit.heads`)

    def check(self, layer, config):
        """Raises `UnsupportedLayerError` for a configuration the entry cannot handle."""

    def variant(self, config):
        """The entry for a layer of this class with `config` (a grouped Conv2D, say, has its own)."""
        return self

    def read(self, layer):
        """(config, weights in the dtype of its variables) of a built Keras layer."""
        config = layer.get_config()
        if "activation" in config:
            config["activation"] = _activation_name(layer)
        self.check(layer, config)
        return config, layer.get_weights()

    def read_nodes(self, layer):
        """The graph nodes of a built Keras layer, each reading the one before (the first
        reads the layer's inputs, the last is the layer's output and has its name):
        [(name, kind, config, weights, output shape)]; a sixth item, where given, names what
        the node reads instead: the layer's inputs by position and nodes before it by name."""
        config, weights = self.read(layer)
        return [(layer.name, type(layer).__name__, config, weights, tuple(layer.output.shape[1:]))]

    def config(self, node):
        """The Keras config that rebuilds `node` at its current shape."""
        return dict(node.config, name=node.name)

    def layer(self, node):
        """A new stock Keras layer computing what `node` describes (weights not set)."""
        return getattr(keras.layers, node.kind).from_config(self.config(node))

    def function(self, node):
        """The `activations.Elementwise` an elementwise node applies, None otherwise."""
        return activations.IDENTITY if self.elementwise else None

    def freezes(self, node):
        """Whether the node mixes the channels of the groups it holds."""
        return False

    def freezes_inputs(self, node):
        """Whether a producer ties the channels of the groups it reads together (a grouped
        convolution), so they cannot change."""
        return False

    def check_call(self, layer, keywords):
        """Raises `UnsupportedLayerError` for call keywords (`{name: value}`, tensors by their
        layer's name) the rebuilt layer would not get."""

    def with_call(self, node, keywords):
        """`node` keeping the call keywords (`{name: value}`, as `check_call` takes them) its
        rebuilt layer must be called with again."""
        return node

    def call(self, node, layer, arguments):
        """`layer` (the Keras layer built for `node`) on the tensors the node reads, in order."""
        return layer(arguments if len(arguments) > 1 else arguments[0])

    def fuse(self, node, source):
        """(Keras class name, config, weights) of one stock layer computing `node` on what
        `source` (the node it reads, read by nothing else) reads, or None."""
        return None

    def homogeneous(self, node):
        """Whether the node commutes with scaling its input by a positive factor (a producer:
        its activation does), so a channel that is a multiple of another stays one."""
        function = self.function(node)
        return self.commutes_with_scaling or (function is not None and function.homogeneous)

    def flops(self, node):
        return 0

    def propagate(self, node, values, rtol=0.0):
        """Per position of the output, the value it holds on every input, from the
        values (NaN where unknown) of its inputs; weights within `rtol` of the largest
        count as zero."""
        return apply_known(self.function(node), values[0]) if self.elementwise else values[0]

    def gather(self, node, index):
        """The node keeping the channels `index` (old positions, in new order) of its input."""
        return node

    def channel_params(self, node):
        """Per channel of its input, the weights that act on it alone: (channels, k), or None."""
        return None

    def affine(self, node):
        """(scale, shift) per channel when the node computes x * scale + shift (then it may fold
        into a neighbouring producer), else None."""
        return None


class Input(LayerType):
    role = "input"

    def read(self, layer):
        return layer.get_config(), []


class Producer(LayerType):
    """Dense and convolutions: kernel (*spatial, inputs, outputs) and an optional bias."""

    role = "produces"
    width_key = "units"
    composes = True  # may merge with a producer before or after it when linear on the data
    statistics_suffice = True  # the approximate modes may change its channels from statistics of their values

    def geometry(self, node):
        return Geometry()

    def kernel(self, node):
        return node.weights[0]

    def bias(self, node):
        return node.weights[1] if len(node.weights) > 1 else None

    def stored_kernel(self, node, kernel):
        """A canonical kernel in the layout the Keras layer stores (the same for Dense, Conv2D)."""
        return kernel

    def with_weights(self, node, kernel, bias, **config):
        """A copy with a new canonical kernel and bias (None: no bias); `config` changes too."""
        stored = self.stored_kernel(node, kernel)
        weights = (stored,) if bias is None else (stored, bias)
        config = {**node.config, **config, **self._width(kernel.shape[-1]), "use_bias": bias is not None}
        return dataclasses.replace(node, weights=weights, config=config, shape=node.shape[:-1] + (kernel.shape[-1],))

    def _width(self, width):
        return {} if self.width_key is None else {self.width_key: width}

    def config(self, node):
        return dict(node.config, name=node.name, **self._width(node.width), use_bias=len(node.weights) > 1)

    def function(self, node):
        return activations.of_name(node.config.get("activation", "linear"))

    def freezes(self, node):
        return self.function(node) is None

    def reads_zero_padding(self, node):
        """Whether some output position reads zeros the layer pads its input with."""
        geometry = self.geometry(node)
        return geometry.padding != "valid" and any(size > 1 for size in geometry.kernel_size)

    def pointwise_identity(self, node, name, source, bias):
        """A new node of `node`'s kind reading `source`: pointwise, relu, identity kernel, `bias`."""
        width, rank = node.width, len(self.geometry(node).kernel_size)
        layer = getattr(keras.layers, node.kind)(width, *((1,) if rank else ()), activation="relu", name=name,
                                                 dtype=node.config.get("dtype"))
        kernel = np.eye(width).reshape((1,) * rank + (width, width))
        return dataclasses.replace(node, name=name, inputs=(source,), config=layer.get_config(), weights=(kernel, bias))

    def flops(self, node):
        positions = math.prod(node.shape[:-1])
        bias = self.bias(node)
        return positions * (2 * node.weights[0].size + (0 if bias is None else bias.size))

    def output_columns(self, node):
        """Every kernel weight, its last axis the output channels (the canonical kernel, or
        a smaller array holding the same weights)."""
        return self.kernel(node)

    def unit_columns(self, node):
        """Per output channel, every weight that makes it: (channels, k), the kernel's
        columns then the bias; channels with equal rows compute equal values."""
        kernel, bias = self.kernel(node), self.bias(node)
        return np.hstack([kernel.reshape(-1, kernel.shape[-1]).T] + ([] if bias is None else [bias[:, None]]))

    def own_rows(self, node):
        """The weights with which the layer reads its own output at the step before, rows
        its channels (a recurrent layer's recurrent kernel), or None."""
        return None

    def select_outputs(self, node, channel_map):
        """The node producing its old channels `channel_map.keep`, times `channel_map.scale`
        (an `edit.channels.ChannelMap`; its `mix` recombines what reads the channels)."""
        scale = 1.0 if channel_map.scale is None else channel_map.scale
        bias = self.bias(node)
        return self.with_weights(node, self.kernel(node)[..., channel_map.keep] * scale,
                                 None if bias is None else bias[channel_map.keep] * scale)

    def propagate(self, node, values, rtol=0.0):
        kernel, bias = self.output_columns(node), self.bias(node)
        scale = max(float(np.abs(kernel).max(initial=0.0)), 0.0 if bias is None else float(np.abs(bias).max(initial=0.0)))
        zero_in = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0, initial=0.0) <= rtol * scale
        pre = np.where(zero_in, 0.0 if bias is None else bias, np.nan)
        return apply_known(self.function(node), pre)


class Dense(Producer):
    def check(self, layer, config):
        if config.get("lora_rank") or layer.kernel.dtype not in ("float16", "bfloat16", "float32", "float64"):
            raise UnsupportedLayerError(f"layer '{layer.name}' (Dense) is quantized or uses LoRA; merge or dequantize it first")


class Conv(Producer):
    """Conv2D (groups 1; a grouped one is a `GroupedConv`)."""

    width_key = "filters"

    def variant(self, config):
        return GROUPED_CONV if config.get("groups", 1) != 1 else self

    def check(self, layer, config):
        refuse_channels_first(layer, config)

    def geometry(self, node):
        config = node.config
        return Geometry(tuple(config["kernel_size"]), tuple(config["strides"]), config["padding"],
                        tuple(config["dilation_rate"]))


def _pointwise_conv_lift(node, name, source, bias):
    """`Producer.pointwise_identity` as a stock pointwise Conv1D, Conv2D or Conv3D, whatever kind
    of convolution `node` is."""
    kind = f"Conv{len(node.entry.geometry(node).kernel_size)}D"
    return CONV.pointwise_identity(dataclasses.replace(node, kind=kind), name, source, bias)


class Embedding(Producer):
    """Embedding: its table (input_dim, output_dim) is the kernel of a Dense on one-hot
    tokens, its output dimensions a channel group. A bias (a BatchNormalization or Rescaling
    folded into it) moves every row of the table; it composes with no producer (tokens are
    no channels), and a layer lifted after it is a Dense.

    Example:
        >>> entry("Embedding").with_weights(node, table, shift).weights[0] == table + shift
    """

    width_key = "output_dim"
    composes = False

    def check(self, layer, config):
        if config.get("lora_rank") or config.get("embeddings_constraint"):
            raise UnsupportedLayerError(f"layer '{layer.name}' (Embedding) uses LoRA or a weight constraint; "
                                        "merge or drop it first")

    def bias(self, node):
        return None

    def with_weights(self, node, kernel, bias, **config):
        table = kernel if bias is None else kernel + bias
        config = {**node.config, **config, "output_dim": table.shape[-1]}
        return dataclasses.replace(node, weights=(table,), config=config, shape=node.shape[:-1] + (table.shape[-1],))

    def config(self, node):
        return dict(node.config, name=node.name, output_dim=node.width)

    def pointwise_identity(self, node, name, source, bias):
        return _dense_lift(node, name, source, bias)

    def flops(self, node):
        return 0  # a row lookup per position


def _dense_lift(node, name, source, bias):
    """`Producer.pointwise_identity` as a stock Dense, whatever kind of producer `node` is."""
    dense = dataclasses.replace(node, kind="Dense", config={"dtype": node.config.get("dtype")})
    return DENSE.pointwise_identity(dense, name, source, bias)


def _input_bias(weights):
    """The input bias of a recurrent layer's [kernel, recurrent_kernel, bias?] (GRU's
    `reset_after` bias (2, 3 units) holds it in its first row), or None."""
    if len(weights) < 3:
        return None
    return weights[2][0] if weights[2].ndim == 2 else weights[2]


def _with_input_weights(weights, kernel, bias, reset_after):
    """[kernel, recurrent_kernel, bias?] with a new input kernel and input bias."""
    if bias is None:
        return [kernel, weights[1]]
    stored = weights[2] if len(weights) > 2 else np.zeros((2, kernel.shape[-1]) if reset_after else kernel.shape[-1])
    return [kernel, weights[1], np.stack([bias, stored[1]]) if stored.ndim == 2 else bias]


GATES = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}  # gate blocks of a recurrent layer's kernels, in Keras' order
STATE_GATE = {"LSTM": 2, "GRU": 2, "SimpleRNN": 0}  # the block whose pre-activation makes the state (c, h~, h)


def _by_gate(weight, gates):
    """A recurrent weight (..., gates x units) as (..., gates, units)."""
    return weight.reshape(weight.shape[:-1] + (gates, -1))


class Recurrent(Producer):
    """LSTM, GRU and SimpleRNN. The input kernel (inputs, gates x units) is a reader's kernel
    like a Dense's (the gates are affine in it, so channels it reads merge, drop and refit
    exactly, with the constant part in the input bias). Its units are a channel group coupled
    across the gates and through the recurrence: a unit is its column in every gate block of
    the kernel, the recurrent kernel and the bias, and a row of the recurrent kernel, through
    which every unit reads it at the next step (`own_rows`, from a zero initial state: as
    through zero padding, only a zero folds there). Two units with equal columns hold equal
    values at every step (by induction from the equal initial state), so they merge exactly,
    the row of one added into the other's; a unit whose state-making block (LSTM's cell
    candidate, GRU's candidate, SimpleRNN's only one) has zero weights holds zero. Removing a
    unit changes the later steps of the others, which statistics of the layer's output do not
    see, so the approximate modes leave its units alone; nothing composes with it.

    Example:
        >>> entry("LSTM").unit_columns(node).shape    # 6 units reading 7 channels
        (6, 4 * 7 + 4 * 6 + 4)
    """

    composes = False
    statistics_suffice = False

    def check(self, layer, config):
        if config.get("stateful") or config.get("return_state") or config.get("go_backwards"):
            raise UnsupportedLayerError(f"layer '{layer.name}' ({type(layer).__name__}) is stateful, returns its "
                                        "state or runs backwards; only plain recurrent layers are supported")

    def freezes(self, node):
        return False

    def bias(self, node):
        return _input_bias(node.weights)

    def with_weights(self, node, kernel, bias, **config):
        weights = _with_input_weights(node.weights, kernel, bias, node.config.get("reset_after"))
        return dataclasses.replace(node, weights=tuple(weights),
                                   config={**node.config, **config, "use_bias": bias is not None})

    def config(self, node):
        return dict(node.config, name=node.name)

    def function(self, node):
        return None  # its activation acts inside the recurrence

    def unit_columns(self, node):
        gates = GATES[node.kind]
        return np.hstack([np.moveaxis(_by_gate(weight, gates), -1, 0).reshape(node.width, -1) for weight in node.weights])

    def own_rows(self, node):
        return node.weights[1]

    def select_outputs(self, node, channel_map):
        if channel_map.scale is not None or channel_map.shift is not None and np.any(channel_map.shift != 0):
            raise ValueError(f"internal: the units of recurrent layer '{node.name}' cannot be scaled or shifted")
        kernel, recurrent, *bias = node.weights
        recurrent = np.tensordot(channel_map.mix, recurrent, axes=1)  # the units read at the step before
        gates, keep = GATES[node.kind], channel_map.keep
        weights = [_by_gate(weight, gates)[..., keep].reshape(weight.shape[:-1] + (-1,)) for weight in (kernel, recurrent, *bias)]
        return dataclasses.replace(node, weights=tuple(weights), config={**node.config, "units": len(keep)})

    def propagate(self, node, values, rtol=0.0):
        """Zero for a unit whose state-making block has zero weights (within `rtol` of the
        layer's largest) when the activation maps 0 to 0; unknown otherwise (a unit of constant
        gates still varies with the step)."""
        gates, block = GATES[node.kind], STATE_GATE[node.kind]
        scale = max(float(np.abs(weight).max(initial=0.0)) for weight in node.weights)
        largest = np.max([np.abs(_by_gate(weight, gates)[..., block, :]).reshape(-1, node.width).max(axis=0)
                          for weight in node.weights], axis=0)
        maps_zero = activations.of_name(node.config.get("activation", "tanh"))(np.zeros(1))[0] == 0
        return np.where((largest <= rtol * scale) & maps_zero, 0.0, np.nan)

    def pointwise_identity(self, node, name, source, bias):
        return _dense_lift(node, name, source, bias)

    def flops(self, node):
        """Per output position (one without `return_sequences`: a lower bound)."""
        return 2 * math.prod(node.shape[:-1]) * sum(weight.size for weight in node.weights if weight.ndim == 2)


class Bidirectional(Recurrent):
    """Bidirectional around an LSTM, GRU or SimpleRNN: both directions' input kernels read the
    same channels, so their columns side by side are the reader's kernel; both directions'
    units are fixed."""

    RECURRENT = ("LSTM", "GRU", "SimpleRNN")

    def freezes(self, node):
        return True

    def propagate(self, node, values, rtol=0.0):
        return np.full(node.width, np.nan)

    def check(self, layer, config):
        for inner in (layer.forward_layer, layer.backward_layer):
            if type(inner).__name__ not in self.RECURRENT or type(inner) is not getattr(keras.layers, type(inner).__name__):
                raise UnsupportedLayerError(f"layer '{layer.name}' (Bidirectional) wraps {type(inner).__name__}; "
                                            f"only {', '.join(self.RECURRENT)} are supported inside it")
            if inner.stateful or inner.return_state:
                raise UnsupportedLayerError(f"layer '{layer.name}' (Bidirectional) is stateful or returns its state; "
                                            "only plain recurrent layers are supported")

    def _halves(self, node):
        half = len(node.weights) // 2
        return list(node.weights[:half]), list(node.weights[half:])

    def kernel(self, node):
        return np.concatenate([weights[0] for weights in self._halves(node)], axis=-1)

    def bias(self, node):
        biases = [_input_bias(weights) for weights in self._halves(node)]
        return None if biases[0] is None else np.concatenate(biases)

    def with_weights(self, node, kernel, bias, **config):
        split = self._halves(node)[0][0].shape[-1]
        kernels, biases = np.split(kernel, [split], axis=-1), [None, None] if bias is None else np.split(bias, [split])
        config = {**node.config, **config}
        weights = []
        for key, direction, part, shift in zip(("layer", "backward_layer"), self._halves(node), kernels, biases):
            inner = config[key]["config"]
            weights += _with_input_weights(direction, part, shift, inner.get("reset_after"))
            config[key] = {**config[key], "config": {**inner, "use_bias": shift is not None}}
        return dataclasses.replace(node, weights=tuple(weights), config=config)

    def config(self, node):
        """Without the wrapped layers' build configs: they would build for the input width read."""
        config = dict(node.config, name=node.name)
        for key in ("layer", "backward_layer"):
            config[key] = {name: value for name, value in config[key].items() if name != "build_config"}
        return config


class TimeDistributed(LayerType):
    """TimeDistributed around a layer that already acts on every position alone (Dense, an
    elementwise layer): read, and written back, as that layer itself under the wrapper's name."""

    def _inner(self, layer):
        inner = layer.layer
        kind = type(inner).__name__
        if not (known(inner) and kind in REGISTRY and (kind == "Dense" or entry(kind, inner.get_config()).elementwise)):
            raise UnsupportedLayerError(f"layer '{layer.name}' (TimeDistributed) wraps {kind}; only Dense and "
                                        "elementwise layers (Activation, Dropout, ...) are supported inside it")
        return inner

    def read_nodes(self, layer):
        inner = self._inner(layer)
        config, weights = entry_of(inner).read(inner)
        return [(layer.name, type(inner).__name__, dict(config, name=layer.name), weights, tuple(layer.output.shape[1:]))]


class MultiHeadAttention(LayerType):
    """MultiHeadAttention called on (query, value[, key]): it makes a channel space of its
    output width and fixes the width of that space and of every group it reads; its heads are
    units of their own (`edit.heads`). `use_causal_mask` is kept and passed again, an
    `attention_mask` tensor is read as the node's last input (`attention_inputs`), and the
    masks Keras propagates to it (from an Embedding with mask_zero) come back by themselves on
    rebuild.

    Example:
        >>> entry("MultiHeadAttention").attention_inputs(node)     # called as (x, x, attention_mask=m)
        ('x', 'x', 'x', 'm')
    """

    has_heads = True

    role = "produces"
    composes = False
    CALL_KEYWORDS = ("training", "return_attention_scores", "use_causal_mask", "attention_mask")
    KEPT = ("use_causal_mask", "attention_mask")  # what `with_call` keeps in the node's config

    def check(self, layer, config):
        if config.get("use_gate") or config.get("sliding_window") or layer.output_dense.kernel.ndim != 3:
            raise UnsupportedLayerError(f"layer '{layer.name}' (MultiHeadAttention) is gated, uses a sliding window "
                                        "or an output_shape of several axes; only plain attention is supported")

    def check_call(self, layer, keywords):
        used = sorted(key for key, value in keywords.items() if key not in self.CALL_KEYWORDS and value not in (None, False))
        if used or keywords.get("return_attention_scores"):
            raise UnsupportedLayerError(f"layer '{layer.name}' (MultiHeadAttention) is called with "
                                        f"{', '.join(used) or 'return_attention_scores'}; only attention returning "
                                        "its output alone, on query, value, key and attention_mask, is supported")

    def with_call(self, node, keywords):
        kept = {"use_causal_mask": bool(keywords.get("use_causal_mask")),
                "attention_mask": keywords.get("attention_mask") is not None}  # a tensor: the last input
        return dataclasses.replace(node, config={**node.config, **kept})

    def attention_inputs(self, node):
        """(query, value, key, attention mask or None): the names of what the node reads."""
        inputs = list(node.inputs)
        mask = inputs.pop() if node.config.get("attention_mask") else None
        return inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else inputs[1], mask

    def config(self, node):
        return {key: value for key, value in node.config.items() if key not in self.KEPT} | {"name": node.name}

    def call(self, node, layer, arguments):
        mask = arguments.pop() if node.config.get("attention_mask") else None
        return layer(*arguments, attention_mask=mask, use_causal_mask=node.config.get("use_causal_mask", False))

    def freezes(self, node):
        return True

    def freezes_inputs(self, node):
        return True

    def propagate(self, node, values, rtol=0.0):
        return np.full(node.width, np.nan)

    def flops(self, node):
        positions = math.prod(node.shape[:-1])
        heads = node.config["num_heads"] * (node.config["key_dim"] + (node.config["value_dim"] or node.config["key_dim"]))
        return 2 * positions * sum(weight.size for weight in node.weights) + 2 * positions * positions * heads


class GroupedConv(Conv):
    """Conv2D with groups > 1: output channel o reads only the input channels of its group
    (o // (filters / groups)). Its canonical kernel is the dense block-diagonal one, and it
    freezes the groups it reads and produces: removing or merging one channel would break
    the equal groups. What reaches it keeps the blocks (BatchNormalization folded into it,
    constants from its weights), and statistics run the Keras layer itself, so it is exact.
    Not supported: removing its output channels, even in whole sets of `groups`."""

    def groups(self, node):
        return node.config["groups"]

    def blocks(self, node):
        """The weights (*spatial, inputs per group, outputs)."""
        return node.weights[0]

    def from_blocks(self, node, blocks):
        """`blocks` in the layout the Keras layer stores."""
        return blocks

    def _same_group(self, node, inputs, outputs):
        groups = self.groups(node)
        return (np.arange(inputs)[:, None] // (inputs // groups)) == (np.arange(outputs)[None, :] // (outputs // groups))

    def kernel(self, node):
        blocks = self.blocks(node)
        per_group, outputs = blocks.shape[-2:]
        inputs = per_group * self.groups(node)
        return np.where(self._same_group(node, inputs, outputs), blocks[..., np.arange(inputs) % per_group, :], 0.0)

    def stored_kernel(self, node, kernel):
        inputs, outputs = kernel.shape[-2:]
        if np.any(kernel[..., ~self._same_group(node, inputs, outputs)] != 0):
            raise ValueError(f"internal: a new kernel for '{node.name}' mixes its {self.groups(node)} groups")
        per_group = inputs // self.groups(node)
        rows = (np.arange(outputs) // (outputs // self.groups(node))) * per_group + np.arange(per_group)[:, None]
        return self.from_blocks(node, np.take_along_axis(kernel, np.broadcast_to(rows, kernel.shape[:-2] + rows.shape), -2))

    def output_columns(self, node):
        return self.blocks(node)

    def freezes(self, node):
        return True

    def freezes_inputs(self, node):
        return True


class ConvTranspose(Conv):
    """Conv2DTranspose: Keras stores its kernel (*spatial, outputs, inputs), transposed here
    to and from the canonical (*spatial, inputs, outputs). Its output positions read the
    input unevenly (a stride leaves taps without input, the borders read fewer taps): like
    zero padding, so a constant input never folds into its bias, unless it is pointwise
    (1x1, stride 1); it composes with other layers only then."""

    def geometry(self, node):
        return dataclasses.replace(super().geometry(node), transposed=True)

    def kernel(self, node):
        return np.swapaxes(node.weights[0], -1, -2)

    def stored_kernel(self, node, kernel):
        return np.swapaxes(kernel, -1, -2)

    def reads_zero_padding(self, node):
        return not self.geometry(node).pointwise

    def flops(self, node):
        """Every input position times the whole kernel, plus the bias per output position."""
        geometry = self.geometry(node)
        output_padding = node.config.get("output_padding") or (None,) * len(geometry.kernel_size)
        inputs = math.prod(_transposed_input_length(*sizes, geometry.padding) for sizes in zip(
            node.shape[:-1], geometry.kernel_size, geometry.strides, geometry.dilation, output_padding))
        bias = self.bias(node)
        return 2 * inputs * node.weights[0].size + math.prod(node.shape[:-1]) * (0 if bias is None else bias.size)

    def pointwise_identity(self, node, name, source, bias):
        return _pointwise_conv_lift(node, name, source, bias)


def _transposed_input_length(output, kernel, stride, dilation, output_padding, padding):
    """The input length a transposed convolution makes `output` of (Keras' deconv_output_length inverted)."""
    kernel = kernel + (kernel - 1) * (dilation - 1)
    if output_padding is None:
        return (output - max(kernel - stride, 0)) // stride if padding == "valid" else output // stride
    pad = 0 if padding == "valid" else kernel // 2
    return (output - kernel + 2 * pad - output_padding) // stride + 1


class SeparableConv(Conv):
    """SeparableConv2D (and SeparableConv1D, with the 1-D layers below), read as two nodes:
    `NAME_depthwise`, a DepthwiseConv2D (its kernel size, strides, padding, dilation and depth
    multiplier; no bias, linear) that follows its input channels, then `NAME`, of this kind: a
    1x1 Conv2D producing the new channels, with the layer's activation and bias. So every rule
    and edit sees a depthwise layer and a producer. Built back as one SeparableConv2D while its
    depthwise part is read by it alone and still has no bias and no activation (`fuse`), else
    as DepthwiseConv2D and Conv2D."""

    DEPTHWISE = ("kernel_size", "strides", "padding", "data_format", "dilation_rate", "depth_multiplier",
                 "depthwise_initializer", "depthwise_regularizer", "depthwise_constraint")
    POINTWISE = ("filters", "activation", "use_bias", "bias_initializer", "bias_regularizer", "activity_regularizer",
                 "bias_constraint")
    RENAMED = {"kernel_initializer": "pointwise_initializer", "kernel_regularizer": "pointwise_regularizer",
               "kernel_constraint": "pointwise_constraint"}  # the pointwise Conv2D's key: the SeparableConv2D's

    def read_nodes(self, layer):
        config, (depthwise, pointwise, *bias) = self.read(layer)
        name, rank = f"{layer.name}_depthwise", len(config["kernel_size"])
        common = {"trainable": config["trainable"], "dtype": config["dtype"]}
        depthwise_config = {**common, "name": name, **{key: config[key] for key in self.DEPTHWISE},
                            "activation": "linear", "use_bias": False}
        pointwise_config = {**common, "name": layer.name, "kernel_size": (1,) * rank, "strides": (1,) * rank,
                            "padding": "valid", "data_format": "channels_last", "dilation_rate": (1,) * rank, "groups": 1,
                            **{key: config[key] for key in self.POINTWISE},
                            **{key: config[source] for key, source in self.RENAMED.items()}}
        shape = tuple(layer.output.shape[1:-1]) + (depthwise.shape[-2] * depthwise.shape[-1],)
        return [(name, f"DepthwiseConv{rank}D", depthwise_config, [depthwise], shape),
                (layer.name, type(layer).__name__, pointwise_config, [pointwise, *bias], tuple(layer.output.shape[1:]))]

    def layer(self, node):
        return getattr(keras.layers, f"Conv{len(node.config['kernel_size'])}D").from_config(self.config(node))

    def fuse(self, node, source):
        depthwise = f"DepthwiseConv{len(node.config['kernel_size'])}D"
        if source.kind != depthwise or source.config.get("activation", "linear") != "linear" \
                or len(source.weights) != 1 or not self.geometry(node).pointwise:
            return None
        config = {"name": node.name, "trainable": node.config["trainable"], "dtype": node.config["dtype"],
                  **{key: source.config[key] for key in self.DEPTHWISE},
                  **{key: node.config[key] for key in self.POINTWISE}, "filters": node.width, "use_bias": len(node.weights) > 1,
                  **{key: node.config[own] for own, key in self.RENAMED.items()}}
        return node.kind, config, [*source.weights, *node.weights]

    def pointwise_identity(self, node, name, source, bias):
        return _pointwise_conv_lift(node, name, source, bias)


class ChannelAffine(LayerType):
    """A layer computing x * scale + shift per channel (its `affine`): it may fold into a
    neighbouring producer, and commutes with positive scaling when it only scales up."""

    def homogeneous(self, node):
        scale, shift = self.affine(node)
        return bool((scale > 0).all() and (shift == 0).all())

    def propagate(self, node, values, rtol=0.0):
        scale, shift = self.affine(node)
        return values[0] * scale + shift


class PerChannel(LayerType):
    """A layer with weights per channel of its input, which the channel axis indexes."""

    axis = 0  # the weights' channel axis

    def gather(self, node, index):
        return dataclasses.replace(node, weights=tuple(np.take(weight, index, axis=self.axis) for weight in node.weights))

    def channel_params(self, node):
        return np.hstack([np.moveaxis(weight, self.axis, 0).reshape(weight.shape[self.axis], -1)
                          for weight in node.weights])


class BatchNormalization(PerChannel, ChannelAffine):
    def check(self, layer, config):
        axis = config["axis"][0] if isinstance(config["axis"], (list, tuple)) else config["axis"]
        if axis not in (-1, len(layer.input.shape) - 1):
            raise UnsupportedLayerError(f"layer '{layer.name}' (BatchNormalization) normalizes axis {axis}; "
                                        "only the last axis is supported")

    def affine(self, node):
        """(scale, shift) of the layer in inference mode, per channel."""
        weights = list(node.weights)
        gamma = weights.pop(0) if node.config.get("scale", True) else 1.0
        beta = weights.pop(0) if node.config.get("center", True) else 0.0
        mean, variance = weights
        scale = gamma / np.sqrt(variance + node.config["epsilon"])
        return scale * np.ones_like(mean), beta - mean * scale


def _per_channel(value, width):
    """A scalar or per-channel config value as `width` float64 values."""
    return np.broadcast_to(np.asarray(value, dtype=np.float64).reshape(-1), (width,)).copy()


class Rescaling(ChannelAffine):
    """x * scale + offset, where both are scalars or per-channel lists (kept in the config)."""

    def read(self, layer):
        config = layer.get_config()
        for key in ("scale", "offset"):  # a NumPy array is serialized as a dict; the layer holds the values
            config[key] = np.asarray(keras.ops.convert_to_numpy(getattr(layer, key)), np.float64).tolist()
        self.check(layer, config)
        return config, []

    def check(self, layer, config):
        for key in ("scale", "offset"):
            if np.size(config[key]) not in (1, layer.input.shape[-1]):
                raise UnsupportedLayerError(f"layer '{layer.name}' (Rescaling) has a {key} that is not a scalar "
                                            "or one value per channel; it is not supported")

    def affine(self, node):
        return _per_channel(node.config["scale"], node.width), _per_channel(node.config["offset"], node.width)

    def gather(self, node, index):
        config = dict(node.config)
        for key, values in zip(("scale", "offset"), self.affine(node)):
            if np.size(config[key]) > 1:
                config[key] = values[index].tolist()
        return dataclasses.replace(node, config=config)

    def channel_params(self, node):
        return np.stack(self.affine(node), axis=1)


class Normalization(ChannelAffine):
    """(x - mean) / max(sqrt(variance), epsilon) per channel, or its inverse. Read with its
    mean and variance in the config, per channel, whether they came adapted or given (an
    adapted layer written back holds them in its config, as weights Keras will not reload)."""

    def read(self, layer):
        config = layer.get_config()
        if tuple(config["axis"]) not in ((-1,), (len(layer.input.shape) - 1,)):
            raise UnsupportedLayerError(f"layer '{layer.name}' (Normalization) normalizes axis {config['axis']}; "
                                        "only the last axis is supported")
        width = layer.input.shape[-1]
        mean, variance = (_per_channel(keras.ops.convert_to_numpy(value), width) for value in (layer.mean, layer.variance))
        return dict(config, axis=(-1,), mean=mean.tolist(), variance=variance.tolist()), []

    def affine(self, node):
        mean, variance = np.asarray(node.config["mean"]), np.asarray(node.config["variance"])
        if node.config.get("invert"):
            return np.sqrt(variance), mean
        scale = 1.0 / np.maximum(np.sqrt(variance), keras.backend.epsilon())
        return scale, -mean * scale

    def gather(self, node, index):
        config = {key: np.asarray(node.config[key])[index].tolist() for key in ("mean", "variance")}
        return dataclasses.replace(node, config={**node.config, **config})

    def channel_params(self, node):
        return np.stack(self.affine(node), axis=1)


class LayerScale(LayerType):
    """ConvNeXt's `LayerScale` (x * gamma per channel), read as a stock per-channel `Rescaling`."""

    def read_nodes(self, layer):
        gamma = np.asarray(keras.ops.convert_to_numpy(layer.gamma), dtype=np.float64)
        config = {"name": layer.name, "dtype": layer.dtype_policy.name, "scale": gamma.tolist(), "offset": 0.0}
        return [(layer.name, "Rescaling", config, [], tuple(layer.output.shape[1:]))]


class CustomScaleLayer(LayerType):
    """InceptionResNetV2's residual `inputs[0] + inputs[1] * scale`, read as stock layers: a
    `Rescaling` of the branch (folded into the linear convolution before it), then an `Add`."""

    def read_nodes(self, layer):
        common, shape = {"dtype": layer.dtype_policy.name}, tuple(layer.output.shape[1:])
        scaled = f"{layer.name}_scale"
        return [(scaled, "Rescaling", {**common, "name": scaled, "scale": float(layer.scale), "offset": 0.0}, [], shape,
                 (1,)),
                (layer.name, "Add", {**common, "name": layer.name}, [], shape, (0, scaled))]


class ChannelNormalization(LayerType):
    """Normalizes over the channel axis (UnitNormalization; with per-channel weights,
    LayerNormalization, GroupNormalization, RMSNormalization): it mixes the channels, so it
    fixes its group's width."""

    def check(self, layer, config):
        axes = config["axis"] if isinstance(config["axis"], (list, tuple)) else [config["axis"]]
        if list(axes) not in ([-1], [len(layer.input.shape) - 1]):
            raise UnsupportedLayerError(f"layer '{layer.name}' ({type(layer).__name__}) normalizes axis "
                                        f"{config['axis']}; only the last axis is supported")

    def freezes(self, node):
        return True

    def propagate(self, node, values, rtol=0.0):
        return np.full(len(values[0]), np.nan)


class LayerNormalization(PerChannel, ChannelNormalization):
    pass


class DepthwiseConv(PerChannel):
    """DepthwiseConv1D and DepthwiseConv2D (depth_multiplier 1): each channel its own filter."""

    axis = -2  # kernel (*spatial, channels, 1); the bias has axis 0 = -1

    def variant(self, config):
        return MULTIPLIED_DEPTHWISE if config.get("depth_multiplier", 1) != 1 else self

    def check(self, layer, config):
        refuse_channels_first(layer, config)

    def gather(self, node, index):
        kernel, *bias = node.weights
        return dataclasses.replace(node, weights=(kernel[..., index, :], *(weight[index] for weight in bias)))

    def channel_params(self, node):
        kernel, *bias = node.weights
        return np.hstack([kernel[..., 0].reshape(-1, kernel.shape[-2]).T] + [weight[:, None] for weight in bias])

    def function(self, node):
        return activations.of_name(node.config.get("activation", "linear"))

    def freezes(self, node):
        return self.function(node) is None

    def homogeneous(self, node):
        return not node.config.get("use_bias", True) and super().homogeneous(node)

    def flops(self, node):
        kernel, *bias = node.weights
        return math.prod(node.shape[:-1]) * (2 * kernel.size + sum(weight.size for weight in bias))

    def propagate(self, node, values, rtol=0.0):
        kernel, *bias = node.weights
        bias = bias[0] if bias else np.zeros(len(values[0]))
        if node.config["padding"] == "valid" or max(node.config["kernel_size"]) == 1:
            pre = values[0] * kernel[..., 0].reshape(-1, kernel.shape[-2]).sum(axis=0) + bias
        else:  # zero padding: constant only where the input is 0
            pre = np.where(values[0] == 0, bias, np.nan)
        return apply_known(self.function(node), pre)


class MultipliedDepthwise(GroupedConv):
    """DepthwiseConv2D with depth_multiplier m > 1: output channel c * m + k reads input
    channel c alone. A grouped convolution with one group per input channel (its kernel
    (*spatial, channels, m) holds the blocks), frozen in the same way: it produces a new
    group of channels * m channels."""

    width_key = None

    def check(self, layer, config):
        DEPTHWISE.check(layer, config)

    def groups(self, node):
        return node.weights[0].shape[-2]

    def blocks(self, node):
        kernel = node.weights[0]
        return kernel.reshape(kernel.shape[:-2] + (1, -1))

    def from_blocks(self, node, blocks):
        return blocks.reshape(blocks.shape[:-2] + (self.groups(node), -1))


class Activation(LayerType):
    elementwise = True

    def function(self, node):
        return activations.of_name(node.config["activation"])

    def freezes(self, node):
        return self.function(node) is None


class ReLU(Activation):
    def function(self, node):
        config = node.config
        return activations.relu(config.get("max_value"), config.get("negative_slope", 0.0), config.get("threshold", 0.0))


class LeakyReLU(Activation):
    def function(self, node):
        return activations.leaky_relu(node.config.get("negative_slope", node.config.get("alpha", 0.3)))


class ELU(Activation):
    def function(self, node):
        return activations.elu(node.config.get("alpha", 1.0))


class Softmax(Activation):
    """Mixes the channels of the last axis: it fixes the width of the group it sees."""

    def check(self, layer, config):
        axes = config["axis"] if isinstance(config["axis"], (list, tuple)) else [config["axis"]]
        if list(axes) not in ([-1], [len(layer.input.shape) - 1]):
            raise UnsupportedLayerError(f"layer '{layer.name}' (Softmax) normalizes axis {config['axis']}; "
                                        "only the last axis is supported")

    def function(self, node):
        return None


class PReLU(PerChannel):
    """x above 0, a learned slope times x below, per channel (and per position unless shared)."""

    axis = -1
    commutes_with_scaling = True

    def check(self, layer, config):
        if layer.weights[0].shape[-1] != layer.input.shape[-1]:
            raise UnsupportedLayerError(f"layer '{layer.name}' (PReLU) shares its slope across channels; "
                                        "only slopes per channel (shared_axes without the last axis) are supported")

    def propagate(self, node, values, rtol=0.0):
        slopes = node.weights[0].reshape(-1, node.width)
        slope = np.where((slopes == slopes[0]).all(axis=0), slopes[0], np.nan)  # a constant stays one if shared
        return np.where(values[0] >= 0, values[0], slope * values[0])


class Identity(LayerType):
    """Layers that are the identity at inference (Identity, Dropout, GaussianNoise, RandomFlip and
    the other random image augmentations, ...)."""

    elementwise = True
    passes = "affine"


class Spatial(LayerType):
    """Pooling: a constant channel stays that constant; positive scaling and shifts commute,
    and every per-position affine map with average pooling (its weights sum to 1)."""

    commutes_with_scaling = True
    passes = "monotone"


class AveragePooling(Spatial):
    passes = "affine"


class ZeroPadding(Spatial):
    passes = None  # the padding stays 0

    def propagate(self, node, values, rtol=0.0):
        return np.where(values[0] == 0, 0.0, np.nan)  # the padding holds zeros


class Resampling(Spatial):
    """UpSampling2D (nearest, bilinear), Resizing (the same, without padding), Cropping2D and
    CenterCrop (a crop, or a bilinear resize when the input is smaller): every output value is an input value
    of the same channel, or a convex combination of its neighbours (bilinear), so channel
    identity is kept, a constant stays that constant, and every per-position affine map
    (per channel) commutes with it."""

    passes = "affine"
    INTERPOLATIONS = ("nearest", "bilinear")

    def check(self, layer, config):
        refuse_channels_first(layer, config)
        if config.get("interpolation", "nearest") not in self.INTERPOLATIONS:
            raise UnsupportedLayerError(f"layer '{layer.name}' ({type(layer).__name__}) uses interpolation "
                                        f"'{config['interpolation']}'; only {' or '.join(self.INTERPOLATIONS)} "
                                        "interpolation is supported")
        if config.get("pad_to_aspect_ratio"):
            raise UnsupportedLayerError(f"layer '{layer.name}' ({type(layer).__name__}) pads to the aspect ratio "
                                        "with a fill value; only resizing without padding is supported")


class Add(LayerType):
    role = "merges"
    commutes_with_scaling = True

    def propagate(self, node, values, rtol=0.0):
        return np.sum(values, axis=0)


class Subtract(Add):
    def propagate(self, node, values, rtol=0.0):
        return values[0] - values[1]


class Average(Add):
    def propagate(self, node, values, rtol=0.0):
        return np.mean(values, axis=0)


class Maximum(Add):
    def propagate(self, node, values, rtol=0.0):
        return np.max(values, axis=0)


class Minimum(Add):
    def propagate(self, node, values, rtol=0.0):
        return np.min(values, axis=0)


class Multiply(Add):
    """Channel by channel products (a squeeze-and-excitation gate): its inputs' groups join;
    a product of positive multiples is not the same multiple, so it does not commute."""

    commutes_with_scaling = False

    def propagate(self, node, values, rtol=0.0):
        return np.prod(values, axis=0)


class Concatenate(LayerType):
    role = "concatenates"
    commutes_with_scaling = True
    passes = "affine"

    def check(self, layer, config):
        if config["axis"] not in (-1, len(layer.output.shape) - 1):
            raise UnsupportedLayerError(f"layer '{layer.name}' (Concatenate) joins axis {config['axis']}; "
                                        "only the channel axis is supported")

    def propagate(self, node, values, rtol=0.0):
        return np.concatenate(values)


class Flatten(LayerType):
    role = "reshapes"
    commutes_with_scaling = True
    passes = "affine"

    def propagate(self, node, values, rtol=0.0):
        return np.tile(values[0], node.width // max(len(values[0]), 1))


class Reshape(Flatten):
    """Flattens to one axis; a reshape keeping the channel axis last is a `PositionReshape`."""

    def variant(self, config):
        return POSITION_RESHAPE if len(config["target_shape"]) != 1 else self

    def config(self, node):
        return dict(node.config, name=node.name, target_shape=(node.width,))


class PositionReshape(LayerType):
    """A Reshape moving positions around the channel axis, which stays last (to and from
    (1, 1, C) in squeeze-and-excitation blocks): it keeps channel identity."""

    commutes_with_scaling = True
    passes = "affine"

    def check(self, layer, config):
        if config["target_shape"][-1] != layer.input.shape[-1]:
            raise UnsupportedLayerError(f"layer '{layer.name}' (Reshape) moves values across the channel axis; "
                                        "only Reshape((n,)) and reshapes keeping the last axis are supported")

    def config(self, node):
        return dict(node.config, name=node.name, target_shape=(*node.config["target_shape"][:-1], node.width))


class Permute(LayerType):
    """Reorders the position axes; the channel axis must stay last."""

    commutes_with_scaling = True
    passes = "affine"

    def check(self, layer, config):
        if config["dims"][-1] != len(config["dims"]):
            raise UnsupportedLayerError(f"layer '{layer.name}' (Permute) moves the channel axis; "
                                        "only permutations keeping the last axis last are supported")


# Image augmentations that return their input unchanged at inference (RandomCrop crops: not one)
AUGMENTATIONS = ("RandomBrightness", "RandomColorDegeneration", "RandomColorJitter", "RandomContrast",
                 "RandomElasticTransform", "RandomErasing", "RandomFlip", "RandomGaussianBlur", "RandomGrayscale",
                 "RandomHue", "RandomInvert", "RandomPerspective", "RandomPosterization", "RandomRotation",
                 "RandomSaturation", "RandomSharpness", "RandomShear", "RandomTranslation", "RandomZoom", "AugMix",
                 "CutMix", "MixUp", "RandAugment")
INFERENCE_IDENTITIES = ("Identity", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
                        "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", *AUGMENTATIONS)
DENSE, CONV, GROUPED_CONV = Dense(), Conv(), GroupedConv()
POSITION_RESHAPE = PositionReshape()
DEPTHWISE, MULTIPLIED_DEPTHWISE = DepthwiseConv(), MultipliedDepthwise()  # the variants by depth_multiplier

REGISTRY = {
    "InputLayer": Input(),
    "Dense": DENSE,
    "Embedding": Embedding(),
    "Conv2D": CONV,
    "DepthwiseConv2D": DEPTHWISE,
    "DepthwiseConv1D": DEPTHWISE,
    "SeparableConv2D": SeparableConv(),
    "SeparableConv1D": SeparableConv(),
    "Conv2DTranspose": ConvTranspose(),
    "Conv1DTranspose": ConvTranspose(),
    "Conv3DTranspose": ConvTranspose(),
    "Conv1D": CONV,
    "Conv3D": CONV,
    "UpSampling2D": Resampling(),
    "Cropping2D": Resampling(),
    "UpSampling1D": Resampling(),
    "Cropping1D": Resampling(),
    "UpSampling3D": Resampling(),
    "Cropping3D": Resampling(),
    "Resizing": Resampling(),
    "CenterCrop": Resampling(),
    "BatchNormalization": BatchNormalization(),
    "Rescaling": Rescaling(),
    "Normalization": Normalization(),
    "Activation": Activation(),
    "ReLU": ReLU(),
    "LeakyReLU": LeakyReLU(),
    "ELU": ELU(),
    "PReLU": PReLU(),
    "Softmax": Softmax(),
    **dict.fromkeys(("LayerNormalization", "GroupNormalization", "RMSNormalization"), LayerNormalization()),
    "UnitNormalization": ChannelNormalization(),
    "MultiHeadAttention": MultiHeadAttention(),
    **dict.fromkeys(("LSTM", "GRU", "SimpleRNN"), Recurrent()),
    "Bidirectional": Bidirectional(),
    "TimeDistributed": TimeDistributed(),
    **{kind: Identity() for kind in INFERENCE_IDENTITIES},
    **dict.fromkeys(("MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D",
                     "GlobalMaxPooling3D"), Spatial()),
    **dict.fromkeys(("AveragePooling1D", "AveragePooling2D", "AveragePooling3D", "GlobalAveragePooling1D",
                     "GlobalAveragePooling2D", "GlobalAveragePooling3D"), AveragePooling()),
    "ZeroPadding1D": ZeroPadding(),
    "ZeroPadding2D": ZeroPadding(),
    "ZeroPadding3D": ZeroPadding(),
    "Add": Add(),
    "Subtract": Subtract(),
    "Average": Average(),
    "Maximum": Maximum(),
    "Minimum": Minimum(),
    "Multiply": Multiply(),
    "Concatenate": Concatenate(),
    "Flatten": Flatten(),
    "Reshape": Reshape(),
    "Permute": Permute(),
}
# Classes of keras.applications that Keras ships with the architectures, by module and name
APPLICATION_LAYERS = {"keras.src.applications.convnext.LayerScale": LayerScale(),
                      "keras.src.applications.inception_resnet_v2.CustomScaleLayer": CustomScaleLayer()}
SUPPORTED = tuple(REGISTRY) + tuple(name.rsplit(".", 1)[1] for name in APPLICATION_LAYERS)


def entry(kind, config=None):
    """The entry of a layer class name (see `REGISTRY`), of the variant `config` selects
    (a grouped Conv2D, a DepthwiseConv2D with depth_multiplier > 1)."""
    found = REGISTRY[kind]
    return found if config is None else found.variant(config)


def known(layer):
    """Whether the registry has an entry for `layer`'s exact class (a stock one, or one that
    `keras.applications` ships)."""
    kind = type(layer).__name__
    return (f"{type(layer).__module__}.{type(layer).__qualname__}" in APPLICATION_LAYERS
            or kind in REGISTRY and type(layer) is getattr(keras.layers, kind, None))


def refuse_unknown(layers):
    """Raises `UnsupportedLayerError` naming every one of `layers` the registry does not know
    (the first with its class, then the others by class), and the supported ones.

    Example:
        >>> refuse_unknown(bert_backbone.layers)
        UnsupportedLayerError: layer 'token_embedding' (ReversibleEmbedding) is not supported, nor are
        'position_embedding' (PositionEmbedding), 'transformer_layer_0', 'transformer_layer_1'
        (TransformerEncoder); keras-hub's layers are custom classes: ...
    """
    unknown = [layer for layer in layers if not known(layer)]
    if not unknown:
        return
    first, *others = unknown
    by_class = {}
    for layer in others:
        by_class.setdefault(type(layer).__name__, []).append(f"'{layer.name}'")
    also = "".join([", nor are " if others else ""] +
                   [", ".join(f"{', '.join(names)} ({kind})" for kind, names in by_class.items())])
    hub = any(type(layer).__module__.startswith("keras_hub") for layer in unknown)
    hint = ("; keras-hub's layers are custom classes: rebuild the model from stock Keras layers (a transformer from "
            "the Keras examples' encoder block: MultiHeadAttention, LayerNormalization, Dense) to prune it") if hub else ""
    raise UnsupportedLayerError(f"layer '{first.name}' ({type(first).__name__}) is not supported{also}{hint}; "
                                f"supported layers: {', '.join(SUPPORTED)}")


def vocabulary(layer):
    """The number of tokens `layer` reads (`input_dim` of an Embedding), None for other layers."""
    return layer.input_dim if known(layer) and type(layer).__name__ == "Embedding" else None


def runs_over_steps(layer):
    """Whether `layer` is recurrent (an RNN or a Bidirectional one): TFLite needs it unrolled."""
    return isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional))


def normalizes_batches(layer):
    """Whether `layer` is a BatchNormalization (its statistics follow the weights before it)."""
    return isinstance(layer, keras.layers.BatchNormalization)


def entry_of(layer):
    """The entry of a Keras layer: its exact class must be a stock one in `REGISTRY`.

    Raises:
        UnsupportedLayerError: naming the layer, its class and the supported ones.
    """
    refuse_unknown([layer])
    application = APPLICATION_LAYERS.get(f"{type(layer).__module__}.{type(layer).__qualname__}")
    return application if application is not None else entry(type(layer).__name__, layer.get_config())

