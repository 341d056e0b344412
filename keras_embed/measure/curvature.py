"""The curvature of a model's training loss on a probe batch, cheap enough for a callback.

`probe_curvature` runs a fixed number of Lanczos steps (full reorthogonalisation) on
Hessian-vector products of the loss `fit` minimises (`model.compute_loss`: the compiled
loss and the regularisation terms) over the model's trainable weights, in the model's own
dtype and on the live model. The smallest Ritz value is an upper bound on the smallest
eigenvalue, and its Ritz vector a direction along which the loss curves by exactly that
much, so a clearly negative value is a saddle, never an artefact of too few steps; the
largest Ritz value (a lower bound on the largest eigenvalue) sets the scale. For exact
spectra in float64 use `keras_embed.hessian`.

`descend_along` moves the weights along such a direction: the sign that lowers the probe
loss, the longest step (halving from the length of the weights) that lowers it while the
outputs move by at most a tolerance.

Example:
    >>> loss = ProbeLoss(model, x, y)     # traced once, reused while the weights change
    >>> curvature = probe_curvature(loss, steps=20)
    >>> curvature.relative                # smallest over largest eigenvalue estimate
    -0.031
    >>> step = descend_along(loss, curvature.direction, tolerance=1e-2)
    >>> step.after < step.before
    True
"""

import dataclasses

import keras
import numpy as np
import scipy.linalg
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Curvature:
    """Extreme Ritz values of the probe loss's Hessian and the direction of the smallest.

    Attributes:
        smallest, largest: the extreme Ritz values (smallest >= the true smallest eigenvalue).
        direction: unit vector over the trainable weights (their order, flattened) whose
            curvature is `smallest`.
        products: Hessian-vector products spent.
    """

    smallest: float
    largest: float
    direction: np.ndarray
    products: int

    @property
    def relative(self):
        """`smallest` over the largest magnitude (0 for a flat loss)."""
        scale = max(abs(self.largest), abs(self.smallest))
        return self.smallest / scale if scale > 0 else 0.0


class ProbeLoss:
    """The training loss of `model` on one probe batch (x, y) over its trainable weights.

    Example:
        >>> loss = ProbeLoss(model, x, y)
        >>> loss.value(), loss.hvp(np.ones(loss.size)).shape
        (0.21, (1234,))
    """

    def __init__(self, model, x, y):
        self.model, self.x, self.y = model, x, y
        self.variables = list(model.trainable_variables)
        self.shapes = [tuple(variable.shape) for variable in self.variables]
        self.size = int(sum(np.prod(shape, dtype=np.int64) for shape in self.shapes))
        self._hvp = tf.function(self._product)
        self._value = tf.function(self._loss)

    def value(self):
        return float(self._value())

    def outputs(self):
        return self.model(self.x, training=False)

    def flat_outputs(self):
        """Every output on the probe batch, flattened into one float64 vector."""
        return np.concatenate([np.asarray(part, dtype=np.float64).ravel() for part in keras.tree.flatten(self.outputs())])

    def hvp(self, vector):
        """H v for a flat float64 `vector` (as float64)."""
        parts = [tf.constant(part.reshape(shape), dtype=variable.dtype)
                 for part, shape, variable in zip(self.split(vector), self.shapes, self.variables)]
        return np.concatenate([np.asarray(part, dtype=np.float64).ravel() for part in self._hvp(parts)])

    def weights(self):
        return np.concatenate([np.asarray(variable.numpy(), dtype=np.float64).ravel() for variable in self.variables])

    def assign(self, flat):
        for variable, part, shape in zip(self.variables, self.split(flat), self.shapes):
            variable.assign(part.reshape(shape).astype(variable.dtype))

    def split(self, flat):
        return np.split(np.asarray(flat), np.cumsum([int(np.prod(shape, dtype=np.int64)) for shape in self.shapes])[:-1])

    def _loss(self):
        return self.model.compute_loss(x=self.x, y=self.y, y_pred=self.outputs(), training=False)

    def _product(self, parts):
        zero = tf.UnconnectedGradients.ZERO
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = self._loss()
            grads = inner.gradient(value, self.variables, unconnected_gradients=zero)
            dot = tf.add_n([tf.reduce_sum(tf.cast(tf.convert_to_tensor(grad), part.dtype) * part)
                            for grad, part in zip(grads, parts)])
        # an Embedding's table gets IndexedSlices (the rows the batch looked up): made dense
        return [tf.convert_to_tensor(part) for part in outer.gradient(dot, self.variables, unconnected_gradients=zero)]


def lanczos(hvp, size, steps, seed=0):
    """(Ritz values ascending, Ritz vectors as columns) of `steps` Lanczos iterations with
    full reorthogonalisation from a seeded random start; stops early on an invariant subspace."""
    rng = np.random.default_rng(seed)
    basis = np.zeros((min(steps, size), size))
    basis[0] = rng.standard_normal(size)
    basis[0] /= np.linalg.norm(basis[0])
    alphas, betas = [], []
    for step in range(len(basis)):
        product = hvp(basis[step])
        alphas.append(float(basis[step] @ product))
        product -= basis[:step + 1].T @ (basis[:step + 1] @ product)  # twice is enough (Kahan)
        product -= basis[:step + 1].T @ (basis[:step + 1] @ product)
        beta = float(np.linalg.norm(product))
        if step + 1 == len(basis) or beta <= 1e-12 * max(abs(alphas[0]), 1e-30):
            break
        betas.append(beta)
        basis[step + 1] = product / beta
    values, vectors = scipy.linalg.eigh_tridiagonal(np.array(alphas), np.array(betas[:len(alphas) - 1]))
    return values, basis[:len(alphas)].T @ vectors


def probe_curvature(loss, steps=20, seed=0):
    """`Curvature` of a `ProbeLoss` from `steps` Hessian-vector products."""
    values, vectors = lanczos(loss.hvp, loss.size, steps, seed)
    direction = vectors[:, 0] / np.linalg.norm(vectors[:, 0])
    return Curvature(float(values[0]), float(values[-1]), direction, len(values))


@dataclasses.dataclass(frozen=True)
class Step:
    """What `descend_along` did: the step length (0.0: none taken), the weights' norm before,
    and the probe loss before and after."""

    length: float
    norm: float
    before: float
    after: float


def descend_along(loss, direction, tolerance, halvings=12):
    """Moves the weights under `loss` (a `ProbeLoss`) along `direction` (flat, unit): the sign
    that lowers the probe loss, the longest step from |weights| down (halving) that lowers it
    with the outputs moved by at most `tolerance` of their scale. Returns the `Step`; when no
    step qualifies the model is left as it was (length 0.0)."""
    start, before, expected = loss.weights(), loss.value(), loss.flat_outputs()
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-12)
    norm = float(np.linalg.norm(start))
    step = max(norm, 1e-3)
    for _ in range(halvings):
        values = {}
        for sign in (1.0, -1.0):
            loss.assign(start + sign * step * direction)
            values[sign] = loss.value()
        sign = min(values, key=values.get)
        loss.assign(start + sign * step * direction)
        moved = np.abs(loss.flat_outputs() - expected).max(initial=0.0)
        if values[sign] < before and moved <= tolerance * scale:
            return Step(step, norm, before, values[sign])
        step /= 2
    loss.assign(start)
    return Step(0.0, norm, before, before)
