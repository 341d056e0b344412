"""What each Keras layer class means to keras-embed: one entry per class, and nowhere else.

An entry says the layer's channel role, how to read it and rebuild it with other
channel counts (stock Keras layers only), and what the rules may assume about it:

    produces       makes a new channel space from weights (Dense, Conv2D); its kernel in the
                   canonical form (*spatial, inputs, outputs), whether it reads zero padding
                   (then a constant input cannot fold into its bias)
    keeps          keeps channel identity: elementwise (Activation, Dropout), per channel
                   with weights (BatchNormalization, DepthwiseConv2D), spatial (pooling,
                   padding)
    merges         joins the groups of its inputs channel by channel (Add)
    concatenates   lays its inputs' channels side by side (Concatenate on the last axis)
    reshapes       repeats its input's channels once per spatial position (Flatten)
    input          a model input: its channels never change

Any entry may *freeze* the groups it sees when it mixes their channels (a softmax).
Rules and edits ask the entry; they never test a layer's class. Adding a layer type is
one entry here plus its tests.

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
    `dilation` (all () for Dense, which acts on the last axis at every position)."""

    kernel_size: tuple = ()
    strides: tuple = ()
    padding: str = "valid"
    dilation: tuple = ()

    @property
    def pointwise(self):
        """A 1x1 kernel of stride 1: it acts on every position alone."""
        return all(size == 1 for size in self.kernel_size) and all(step == 1 for step in self.strides)


def _unknown(width):
    return np.full(width, np.nan)


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

    def check(self, layer, config):
        """Raises `UnsupportedLayerError` for a configuration the entry cannot handle."""

    def read(self, layer):
        """(config, float64 weights) of a built Keras layer."""
        config = layer.get_config()
        if "activation" in config:
            config["activation"] = _activation_name(layer)
        self.check(layer, config)
        return config, [np.asarray(weight, dtype=np.float64) for weight in layer.get_weights()]

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

    def geometry(self, node):
        return Geometry()

    def kernel(self, node):
        return node.weights[0]

    def bias(self, node):
        return node.weights[1] if len(node.weights) > 1 else None

    def with_weights(self, node, kernel, bias, **config):
        """A copy with a new canonical kernel and bias (None: no bias); `config` changes too."""
        weights = (kernel,) if bias is None else (kernel, bias)
        config = {**node.config, **config, self.width_key: kernel.shape[-1], "use_bias": bias is not None}
        return dataclasses.replace(node, weights=weights, config=config, shape=node.shape[:-1] + (kernel.shape[-1],))

    def config(self, node):
        return dict(node.config, name=node.name, **{self.width_key: node.width, "use_bias": len(node.weights) > 1})

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
        return positions * (2 * self.kernel(node).size + (0 if bias is None else bias.size))

    def propagate(self, node, values, rtol=0.0):
        kernel, bias = self.kernel(node), self.bias(node)
        scale = max(float(np.abs(kernel).max(initial=0.0)), 0.0 if bias is None else float(np.abs(bias).max(initial=0.0)))
        zero_in = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0, initial=0.0) <= rtol * scale
        pre = np.where(zero_in, 0.0 if bias is None else bias, np.nan)
        return apply_known(self.function(node), pre)


class Dense(Producer):
    def check(self, layer, config):
        if config.get("lora_rank") or layer.kernel.dtype not in ("float16", "bfloat16", "float32", "float64"):
            raise UnsupportedLayerError(f"layer '{layer.name}' (Dense) is quantized or uses LoRA; merge or dequantize it first")


class Conv(Producer):
    width_key = "filters"

    def check(self, layer, config):
        if config.get("data_format", "channels_last") != "channels_last" or config.get("groups", 1) != 1:
            raise UnsupportedLayerError(f"layer '{layer.name}' ({type(layer).__name__}) uses groups or channels_first; "
                                        "only channels_last convolutions with groups=1 are supported")

    def geometry(self, node):
        config = node.config
        return Geometry(tuple(config["kernel_size"]), tuple(config["strides"]), config["padding"],
                        tuple(config["dilation_rate"]))


class PerChannel(LayerType):
    """A layer with weights per channel of its input, which the channel axis indexes."""

    axis = 0  # the weights' channel axis

    def gather(self, node, index):
        return dataclasses.replace(node, weights=tuple(np.take(weight, index, axis=self.axis) for weight in node.weights))

    def channel_params(self, node):
        return np.hstack([np.moveaxis(weight, self.axis, 0).reshape(weight.shape[self.axis], -1)
                          for weight in node.weights])


class BatchNormalization(PerChannel):
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

    def propagate(self, node, values, rtol=0.0):
        scale, shift = self.affine(node)
        return values[0] * scale + shift


class DepthwiseConv2D(PerChannel):
    axis = -2  # kernel (height, width, channels, 1); the bias has axis 0 = -1

    def check(self, layer, config):
        if config.get("depth_multiplier", 1) != 1 or config.get("data_format", "channels_last") != "channels_last":
            raise UnsupportedLayerError(f"layer '{layer.name}' (DepthwiseConv2D) uses depth_multiplier or "
                                        "channels_first; only channels_last with depth_multiplier 1 is supported")

    def gather(self, node, index):
        kernel, *bias = node.weights
        return dataclasses.replace(node, weights=(kernel[:, :, index], *(weight[index] for weight in bias)))

    def channel_params(self, node):
        kernel, *bias = node.weights
        return np.hstack([kernel[:, :, :, 0].reshape(-1, kernel.shape[2]).T] + [weight[:, None] for weight in bias])

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
            pre = values[0] * kernel[:, :, :, 0].sum(axis=(0, 1)) + bias
        else:  # zero padding: constant only where the input is 0
            pre = np.where(values[0] == 0, bias, np.nan)
        return apply_known(self.function(node), pre)


class Activation(LayerType):
    elementwise = True

    def function(self, node):
        return activations.of_name(node.config["activation"])

    def freezes(self, node):
        return self.function(node) is None


class Identity(LayerType):
    """Layers that are the identity at inference (Dropout)."""

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


class Add(LayerType):
    role = "merges"
    commutes_with_scaling = True

    def propagate(self, node, values, rtol=0.0):
        return np.sum(values, axis=0)


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
    def check(self, layer, config):
        if len(config["target_shape"]) != 1:
            raise UnsupportedLayerError(f"layer '{layer.name}' (Reshape) does more than flatten; "
                                        "only Reshape((n,)) is supported")

    def config(self, node):
        return dict(node.config, name=node.name, target_shape=(node.width,))


REGISTRY = {
    "InputLayer": Input(),
    "Dense": Dense(),
    "Conv2D": Conv(),
    "DepthwiseConv2D": DepthwiseConv2D(),
    "BatchNormalization": BatchNormalization(),
    "Activation": Activation(),
    "Dropout": Identity(),
    "MaxPooling2D": Spatial(),
    "AveragePooling2D": AveragePooling(),
    "GlobalAveragePooling2D": AveragePooling(),
    "GlobalMaxPooling2D": Spatial(),
    "ZeroPadding2D": ZeroPadding(),
    "Add": Add(),
    "Concatenate": Concatenate(),
    "Flatten": Flatten(),
    "Reshape": Reshape(),
}
SUPPORTED = tuple(REGISTRY)


def entry(kind):
    """The entry of a layer class name (see `REGISTRY`)."""
    return REGISTRY[kind]


def entry_of(layer):
    """The entry of a Keras layer: its exact class must be a stock one in `REGISTRY`.

    Raises:
        UnsupportedLayerError: naming the layer, its class and the supported ones.
    """
    kind = type(layer).__name__
    if kind not in REGISTRY or type(layer) is not getattr(keras.layers, kind, None):
        raise UnsupportedLayerError(f"layer '{layer.name}' ({kind}) is not supported; "
                                    f"supported layers: {', '.join(SUPPORTED)}")
    return REGISTRY[kind]

