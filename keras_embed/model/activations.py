"""What the rules need to know about an elementwise function: its values, its kinks and
whether it commutes with positive scaling.

An `Elementwise` describes an activation (a Keras activation name, or a `ReLU`-style
layer with parameters). Functions that mix channels (softmax, glu, ...) have none:
`of_name` returns None for them.

Example:
    >>> relu = of_name("relu")
    >>> relu.kinks, relu.homogeneous
    ((0.0,), True)
    >>> relu(np.array([-1.0, 2.0]))
    array([0., 2.])
"""

import dataclasses
import math
from typing import Callable

import keras
import numpy as np

# Mix the channels of the axis they act on: a channel cannot go alone.
COUPLING = frozenset({"softmax", "log_softmax", "sparsemax", "glu"})
# Piecewise linear: breakpoints, and positive homogeneity sigma(c z) = c sigma(z) for c > 0.
_PIECEWISE = {
    "linear": ((), True),
    "relu": ((0.0,), True),
    "leaky_relu": ((0.0,), True),
    "relu6": ((0.0, 6.0), False),
    "hard_sigmoid": ((-3.0, 3.0), False),
    "hard_tanh": ((-1.0, 1.0), False),
    "sparse_sigmoid": ((-1.0, 1.0), False),
    "soft_shrink": ((-0.5, 0.5), False),
}
_NUMPY = {  # fast float64 paths; other names go through Keras ops
    "linear": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "relu6": lambda z: np.clip(z, 0.0, 6.0),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.2 * z),
    "tanh": np.tanh,
    "sigmoid": lambda z: 0.5 * (1.0 + np.tanh(0.5 * z)),
    "elu": lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0.0))),
    "softplus": lambda z: np.logaddexp(0.0, z),
    "silu": lambda z: z * 0.5 * (1.0 + np.tanh(0.5 * z)),
    "swish": lambda z: z * 0.5 * (1.0 + np.tanh(0.5 * z)),
    "hard_sigmoid": lambda z: np.clip(z / 6.0 + 0.5, 0.0, 1.0),
    "hard_tanh": lambda z: np.clip(z, -1.0, 1.0),
}


@dataclasses.dataclass(frozen=True)
class Elementwise:
    """An elementwise function of float64 arrays.

    Attributes:
        name: a Keras activation name, or a description for messages.
        function: the function on float64 NumPy arrays.
        kinks: breakpoints of a piecewise-linear function (() for an affine one), or None
            when it is not piecewise linear.
        homogeneous: sigma(c z) == c sigma(z) for every c > 0.
    """

    name: str
    function: Callable = dataclasses.field(compare=False, repr=False)
    kinks: tuple | None = None
    homogeneous: bool = False

    def __call__(self, z):
        return np.asarray(self.function(np.asarray(z, dtype=np.float64)), dtype=np.float64)

    @property
    def is_identity(self):
        return self.name == "linear"

    def then(self, other):
        """`other` after `self`, as one function (its kinks are unknown unless one of
        the two is the identity)."""
        if self.is_identity:
            return other
        if other.is_identity:
            return self
        return Elementwise(f"{self.name}>{other.name}", lambda z: other.function(self.function(z)), None,
                           self.homogeneous and other.homogeneous)


IDENTITY = Elementwise("linear", lambda z: z, (), True)


def name_of(activation):
    """The registered name of a Keras built-in activation, or None for a custom one."""
    try:
        name = keras.activations.serialize(activation)
        if isinstance(name, str) and keras.activations.get(name) is activation:
            return name
    except (OSError, TypeError, ValueError):  # lambdas and unregistered functions
        pass
    return None


def _keras_function(name):
    function = keras.activations.get(name)  # raises ValueError for an unknown name
    return lambda z: keras.ops.convert_to_numpy(function(z))


def of_name(name):
    """The `Elementwise` of a Keras activation name; None for a coupling one (softmax, ...).

    Raises:
        ValueError: an unknown name.
    """
    if name in COUPLING:
        return None
    kinks, homogeneous = _PIECEWISE.get(name, (None, False))
    return Elementwise(name, _NUMPY.get(name) or _keras_function(name), kinks, homogeneous)


def relu(max_value=None, negative_slope=0.0, threshold=0.0):
    """The function of a `keras.layers.ReLU` layer: x above `threshold` (capped at
    `max_value`), `negative_slope * (x - threshold)` below."""
    cap = math.inf if max_value is None else float(max_value)
    slope, threshold = float(negative_slope), float(threshold)
    kinks = tuple(sorted({threshold} | ({cap} if max_value is not None else set())))
    if max_value is None and threshold == 0 and slope == 0:
        return of_name("relu")
    return Elementwise(
        f"relu(max_value={max_value}, negative_slope={slope:g}, threshold={threshold:g})",
        lambda z: np.where(z >= threshold, np.minimum(z, cap), slope * (z - threshold)),
        kinks, max_value is None and threshold == 0,
    )


def leaky_relu(negative_slope):
    """The function of a `keras.layers.LeakyReLU` layer."""
    slope = float(negative_slope)
    return Elementwise(f"leaky_relu({slope:g})", lambda z: np.where(z > 0, z, slope * z), (0.0,), True)


def elu(alpha):
    """The function of a `keras.layers.ELU` layer."""
    alpha = float(alpha)
    return Elementwise(f"elu({alpha:g})", lambda z: np.where(z > 0, z, alpha * np.expm1(np.minimum(z, 0.0))))
