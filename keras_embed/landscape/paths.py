"""Between two trained models of one architecture: the distance of their weights, the linear
path and the quadratic Bézier curve joining them, and mode connectivity.

The linear path is theta(t) = (1 - t) theta_a + t theta_b. The curve (Garipov et al., 2018)
is phi(t) = (1 - t)^2 theta_a + 2 t (1 - t) theta_c + t^2 theta_b, its bend theta_c starting
at the midpoint and trained with SGD (momentum 0.9) on the loss at one t drawn uniformly per
batch, BatchNormalization in training mode (batch statistics), as in the taxonomy paper's
code (which also adds the model's weight decay; none here). Each path is evaluated at
`points` values of t in [0, 1], after recomputing every BatchNormalization layer's moving
statistics on the data at that point: the loss, and for class labels the error in percent.

    mc = (err(0) + err(1)) / 2 - err(u),   u = argmax_t |err(t) - (err(0) + err(1)) / 2|

(the paper's mode connectivity, on the training error: below 0 a barrier, near 0 well
connected; on the loss where there are no class labels). `barrier` is the largest loss
above the straight line between the ends, max_t loss(t) - ((1 - t) loss(0) + t loss(1)).

Example:
    >>> evaluator = Evaluator(model_a, x, y, get_loss("mse"))
    >>> path = linear_path(evaluator, values(model_a), values(model_b))
    >>> mode_connectivity([point["error"] for point in path])
    -3.5
"""

import keras
import numpy as np
import tensorflow as tf

from keras_embed.errors import InputError
from keras_embed.model.registry import normalizes_batches
from keras_embed.stopping import class_labels, predicted_classes

POINTS = 5


def values(model):
    """The model's trainable weights, in order, as float64 arrays."""
    return [np.asarray(weight, dtype=np.float64) for weight in model.trainable_weights]


def check_same_architecture(a, b):
    """Refuses (`InputError`) two models whose layers or trainable weights differ in kind or shape."""
    kinds = [[layer.__class__.__name__ for layer in model.layers] for model in (a, b)]
    shapes = [[tuple(weight.shape) for weight in model.trainable_weights] for model in (a, b)]
    if kinds[0] != kinds[1] or shapes[0] != shapes[1]:
        raise InputError(f"models '{a.name}' and '{b.name}' differ in architecture (layers or weight shapes); "
                         "the landscape compares models of one architecture, e.g. one recipe trained with several seeds")


def distance(a_values, b_values):
    """||theta_a - theta_b||_2 over every trainable weight."""
    return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(a_values, b_values))))


def mode_connectivity(errors):
    """The taxonomy paper's mc of a path's errors (or losses) at evenly spaced t, ends included."""
    errors = np.asarray(errors, dtype=np.float64)
    middle = (errors[0] + errors[-1]) / 2
    return float(middle - errors[int(np.argmax(np.abs(errors - middle)))])


def barrier(losses):
    """The largest loss above the straight line between the path's ends (0 for a flat or convex path)."""
    losses = np.asarray(losses, dtype=np.float64)
    t = np.linspace(0.0, 1.0, len(losses))
    return float(max(0.0, np.max(losses - ((1 - t) * losses[0] + t * losses[-1]))))


class Evaluator:
    """Loss and error of one architecture at given trainable weights, on (x, y).

    Example:
        >>> Evaluator(model, x, y, get_loss("mse")).at(values(model))
        {'loss': 0.012, 'error': None}
    """

    def __init__(self, model, x, y, loss, batch_size=256):
        self.model = keras.models.clone_model(model)
        self.model.set_weights(model.get_weights())
        self.x, self.y, self.loss, self.batch_size = x, y, loss, batch_size
        self.labels = class_labels(y) if len(model.outputs) == 1 else None
        self.norms = [layer for layer in self.model.layers if normalizes_batches(layer)]

    def at(self, weights):
        """{"loss": mean loss, "error": error in percent (None without class labels)} at `weights`."""
        for variable, value in zip(self.model.trainable_weights, weights):
            variable.assign(value.astype(variable.dtype))
        self._recompute_norms()
        outputs = self.model.predict(self.x, batch_size=self.batch_size, verbose=0)
        loss = float(np.mean(self.loss(tf.constant(self.y), tf.constant(outputs))))
        error = None if self.labels is None else 100.0 * float(np.mean(predicted_classes(outputs) != self.labels))
        return {"loss": loss, "error": error}

    def _recompute_norms(self):
        """Moving mean and variance of every BatchNormalization layer set to its input's on the
        data, in order (each after those before it)."""
        for layer in self.norms:
            inputs = keras.Model(self.model.inputs, layer.input).predict(self.x, batch_size=self.batch_size, verbose=0)
            axes = tuple(range(inputs.ndim - 1))
            layer.moving_mean.assign(inputs.mean(axis=axes).astype(layer.moving_mean.dtype))
            layer.moving_variance.assign(inputs.var(axis=axes).astype(layer.moving_variance.dtype))


def _path(evaluator, weights_at, points):
    return [{"t": float(t), **evaluator.at(weights_at(t))} for t in np.linspace(0.0, 1.0, points)]


def linear_path(evaluator, a_values, b_values, points=POINTS):
    """[{"t", "loss", "error"}] along theta(t) = (1 - t) theta_a + t theta_b."""
    return _path(evaluator, lambda t: [(1 - t) * a + t * b for a, b in zip(a_values, b_values)], points)


def bezier_path(evaluator, a_values, bend, b_values, points=POINTS):
    """[{"t", "loss", "error"}] along the quadratic Bézier curve through `bend`."""
    return _path(evaluator, lambda t: _bezier(t, a_values, bend, b_values), points)


def _bezier(t, a_values, bend, b_values):
    return [(1 - t) ** 2 * a + 2 * t * (1 - t) * c + t**2 * b for a, c, b in zip(a_values, bend, b_values)]


def train_bend(model, a_values, b_values, x, y, loss, epochs=50, batch_size=128, learning_rate=0.01, seed=0):
    """The bend theta_c of the Bézier curve between theta_a and theta_b (both of `model`'s
    architecture), trained on (x, y): see the module docstring.

    Returns:
        float64 arrays, one per trainable weight.
    """
    dtypes = [weight.dtype for weight in model.trainable_weights]
    ends = [[tf.constant(value, dtype) for value, dtype in zip(side, dtypes)] for side in (a_values, b_values)]
    bend = [tf.Variable(((a + b) / 2).astype(dtype)) for a, b, dtype in zip(a_values, b_values, dtypes)]
    optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9)
    fixed = [variable.value for variable in model.non_trainable_variables]

    @tf.function
    def step(inputs, targets, t):
        with tf.GradientTape() as tape:
            outputs, _ = model.stateless_call(_bezier(t, ends[0], bend, ends[1]), fixed, inputs, training=True)
            value = tf.reduce_mean(loss(targets, outputs))
        optimizer.apply_gradients(zip(tape.gradient(value, bend), bend))

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            rows = order[start:start + batch_size]
            step(tf.constant(x[rows]), tf.constant(y[rows]), tf.constant(rng.uniform(), dtypes[0]))
    return [np.asarray(variable.numpy(), dtype=np.float64) for variable in bend]
