"""What the rewriting rules need to know about Keras' built-in activations.

Example:
    >>> is_positively_homogeneous(("relu",))
    True
    >>> evaluate(("relu", "tanh"), np.array([-1.0, 2.0]))
    array([0.        , 0.96402758])
"""

import keras
import numpy as np

# Activations that mix units (the value of one unit depends on the others).
_COUPLING = frozenset({"softmax", "log_softmax"})
# sigma(c * z) == c * sigma(z) for every c > 0.
_POSITIVELY_HOMOGENEOUS = frozenset({"relu", "leaky_relu", "linear"})


def name_of(activation):
    """Returns the registered name of a built-in activation, or None for a custom one."""
    try:
        name = keras.activations.serialize(activation)
        if isinstance(name, str) and keras.activations.get(name) is activation:
            return name
    except (OSError, TypeError, ValueError):  # lambdas and unregistered functions
        pass
    return None


def is_elementwise(activations):
    """True when every activation in the chain acts on each unit on its own."""
    return not _COUPLING.intersection(activations)


def is_positively_homogeneous(activations):
    """True when the chain commutes with positive scaling of its input."""
    return _POSITIVELY_HOMOGENEOUS.issuperset(activations)


def evaluate(activations, z):
    """Applies a chain of activations to a float64 array, in float64."""
    value = np.asarray(z, dtype=np.float64)
    for name in activations:
        value = keras.ops.convert_to_numpy(keras.activations.get(name)(value))
    return np.asarray(value, dtype=np.float64)
