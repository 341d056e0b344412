"""The internal picture of a network: a chain of Dense layers, each an affine map and activations.

Arrays are float64 and read-only; every change makes a new `Graph`, so the network a
caller passed in is never touched.

Example:
    >>> graph = read_model(model)              # keras_embed.read
    >>> [layer.width for layer in graph.layers]
    [32, 32, 10]
    >>> graph.hidden_index("dense_1")
    1
"""

import dataclasses

import numpy as np


def frozen_array(values):
    """A read-only float64 copy of `values` (None stays None)."""
    if values is None:
        return None
    array = np.array(values, dtype=np.float64)
    array.setflags(write=False)
    return array


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """A Dense layer and the stock elementwise layers (Activation, Dropout) that follow it.

    Args:
        name: the Keras layer name, kept in the rebuilt model.
        kernel: (inputs, units) weights.
        bias: (units,) bias, or None for `use_bias=False`.
        activations: names of the activations applied in order after the affine map
            (the Dense's own, then those of following Activation layers).
        config: the Dense `get_config()`, used to rebuild the layer.
        followers: serialized Activation/Dropout layers that follow the Dense.
    """

    name: str
    kernel: np.ndarray
    bias: np.ndarray | None
    activations: tuple
    config: dict = dataclasses.field(default_factory=dict, compare=False)
    followers: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "kernel", frozen_array(self.kernel))
        object.__setattr__(self, "bias", frozen_array(self.bias))

    @property
    def width(self):
        """Number of units."""
        return self.kernel.shape[1]

    @property
    def params(self):
        """Number of weights, bias included."""
        return self.kernel.size + (0 if self.bias is None else self.bias.size)

    def with_weights(self, kernel, bias):
        """A copy with new weights (and so possibly a new width)."""
        return dataclasses.replace(self, kernel=kernel, bias=bias)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Name, shape (without the batch axis) and dtype of the model input."""

    name: str
    shape: tuple
    dtype: str


@dataclasses.dataclass(frozen=True)
class Graph:
    """A single-input, single-output chain of Dense layers.

    Args:
        name: model name.
        input: the model input.
        layers: Dense layers in order; the last one produces the model output.
        leading: serialized Activation/Dropout layers applied to the input first.
        sequential: rebuild as `keras.Sequential` (else as a functional `keras.Model`).
    """

    name: str
    input: InputSpec
    layers: tuple
    leading: tuple = ()
    sequential: bool = False

    @property
    def params(self):
        """Number of weights in all Dense layers."""
        return sum(layer.params for layer in self.layers)

    @property
    def flops(self):
        """Floating-point operations of the Dense layers per input row (2 per multiply-add,
        1 per bias add; activations not counted)."""
        return sum(2 * layer.kernel.size + (0 if layer.bias is None else layer.width) for layer in self.layers)

    @property
    def widths(self):
        """Units per Dense layer."""
        return [layer.width for layer in self.layers]

    def hidden_index(self, layer):
        """Index of a hidden layer (every Dense but the last), given by name or index.

        Raises:
            ValueError: when `layer` names no hidden Dense layer.
        """
        hidden = [item.name for item in self.layers[:-1]]
        if isinstance(layer, int) and 0 <= layer < len(hidden):
            return layer
        if layer in hidden:
            return hidden.index(layer)
        raise ValueError(
            f"no hidden Dense layer {layer!r}; hidden layers are: {', '.join(hidden) or 'none'}"
        )

    def replace_layers(self, changes):
        """A new graph with `changes` ({index: DenseLayer}) swapped in."""
        layers = tuple(changes.get(index, layer) for index, layer in enumerate(self.layers))
        return dataclasses.replace(self, layers=layers)
