"""Second-order picture of the training loss: gradient, Hessian-vector products, spectrum.

`EmpiricalRisk` is the mean loss R_S(theta) of a Keras model on given data as a function of
its trainable weights, flattened into one float64 vector theta. It gives the gradient,
Hessian-vector products (double backpropagation, the Hessian is never formed) and, for
small models, the full Hessian. `extreme_eigenvalues` runs Lanczos (ARPACK through
scipy) on the products; `eigenvalue_counts` sorts eigenvalues into negative, zero and
positive; `hutchinson_trace` estimates the trace. `analyze_hessian` does all of it for the
CLI. Work in float64 on a cast copy of the model (`cast_model`): at a critical point the
interesting eigenvalues are far below float32 resolution.

Example:
    >>> risk = EmpiricalRisk(cast_model(model), x, y, "mse")
    >>> np.linalg.norm(risk.value_and_gradient()[1])
    3.1e-13
    >>> eigenvalue_counts(np.linalg.eigvalsh(risk.hessian()))
    {'negative': 1, 'zero': 1, 'positive': 8, 'zero_threshold': 1.2e-10}
"""

import functools
import inspect

import keras
import numpy as np
import tensorflow as tf

from keras_embed.files.data import check_inputs, check_labels
from keras_embed.errors import InputError, UnsupportedLayerError, check_number
from keras_embed.model.read import check_finite_weights

FULL_HESSIAN_LIMIT = 5000
ZERO_RTOL = 1e-10
LOSS_EXAMPLES = "mse, mae, huber, binary_crossentropy, categorical_crossentropy, sparse_categorical_crossentropy"
_JACOBIAN_BUDGET = 1 << 21  # parameters x samples vectorized at once by the full Hessian


def get_loss(name, from_logits=False):
    """The per-sample Keras loss function `name` (any identifier `keras.losses.get` takes).

    Args:
        name: e.g. "mse", "sparse_categorical_crossentropy".
        from_logits: the model outputs logits (cross-entropies only).

    Raises:
        InputError: unknown names, and `from_logits` for losses without that option.
    """
    try:
        loss = keras.losses.get(name)
    except (ValueError, TypeError):
        loss = None
    if not callable(loss) or isinstance(loss, type):
        raise InputError(f"unknown loss '{name}'; use a Keras loss name such as {LOSS_EXAMPLES}")
    if from_logits:
        if "from_logits" not in inspect.signature(loss).parameters:
            raise InputError(f"loss '{name}' has no from_logits option; drop it or use a cross-entropy")
        loss = functools.partial(loss, from_logits=True)
    return loss


def is_sparse_loss(loss):
    """True when `loss` takes integer class labels (the sparse cross-entropies)."""
    function = loss.func if isinstance(loss, functools.partial) else loss
    return "sparse" in getattr(function, "__name__", "")


def cast_model(model, dtype="float64"):
    """A copy of `model` whose weights, computations and input are in `dtype`.

    Every layer is rebuilt from its config with the new dtype policy and gets the
    original weights; the model itself is not touched.

    Raises:
        UnsupportedLayerError: when a layer cannot be rebuilt that way.
    """

    def rebuild(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": dtype})

    try:
        inputs = keras.tree.map_structure(
            lambda tensor: keras.Input(shape=tensor.shape[1:], dtype=dtype, name=tensor.name), model.inputs
        )
        copy = keras.models.clone_model(model, input_tensors=inputs, clone_function=rebuild)
        copy.set_weights([np.asarray(weight) for weight in model.get_weights()])
    except (ValueError, TypeError, NotImplementedError) as error:
        raise UnsupportedLayerError(f"model '{model.name}' cannot be rebuilt in {dtype} ({error})") from None
    return copy


def check_targets(y, x, model, loss):
    """Returns labels `y` shaped for `loss` on the outputs of `model` for `x`.

    Sparse cross-entropies take one integer class per row; every other loss takes a
    target of the output's shape (rows of the same size are reshaped to it).

    Raises:
        InputError: no labels, wrong length or shape, classes out of range.
    """
    if y is None:
        raise InputError("the loss needs labels: give an .npz with keys x and y, or --dataset")
    y = check_labels(y, x)
    output_shape = tuple(model.outputs[0].shape[1:])
    if is_sparse_loss(loss):
        classes = output_shape[-1] if output_shape else None
        if y.size != len(y) or np.any(y != np.round(y)) or y.min() < 0 or (classes is not None and y.max() >= classes):
            raise InputError(
                f"sparse losses take one integer class in 0..{classes - 1 if classes else '?'} per row; "
                f"labels have shape {y.shape} and values {y.min():g}..{y.max():g}"
            )
        return y.reshape(len(y)).astype(np.int64)
    per_row = int(np.prod(output_shape)) if None not in output_shape else None
    if per_row is not None and y.size != len(y) * per_row:
        hint = "; for class labels use sparse_categorical_crossentropy" if y.size == len(y) else ""
        raise InputError(f"labels have shape {y.shape} but the model outputs (n, {', '.join(map(str, output_shape))}){hint}")
    return y.reshape((len(y), *output_shape)) if per_row is not None else y


class EmpiricalRisk:
    """R_S(theta): the mean per-sample loss of `model` on (x, y) over its trainable weights.

    The weights are one flat vector (the order of `model.trainable_variables`). Methods
    taking `theta` set the weights first; without it they use the model's current ones.
    The data loss only: regularization terms (`model.losses`) are left out.

    Args:
        model: a Keras model; float64 (`cast_model`) for anything near a critical point.
        x: inputs.
        y: targets, checked with `check_targets`.
        loss: a loss name or per-sample function (`get_loss`).
        batch_size: rows per pass; the sums over batches are exact.

    Example:
        >>> risk = EmpiricalRisk(model, x, y, "sparse_categorical_crossentropy")
        >>> risk.hvp(np.ones(risk.size)).shape == (risk.size,)
        True
    """

    def __init__(self, model, x, y, loss, batch_size=1024):
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1. Received: batch_size={batch_size}")
        check_finite_weights(model)
        self.model = model
        self.loss = get_loss(loss) if isinstance(loss, str) else loss
        self.variables = list(model.trainable_variables)
        if not self.variables:
            raise InputError(f"model '{model.name}' has no trainable weights")
        self.dtype = keras.backend.standardize_dtype(self.variables[0].dtype)
        self.shapes = [tuple(variable.shape) for variable in self.variables]
        self.size = int(sum(np.prod(shape, dtype=np.int64) for shape in self.shapes))
        self.x = check_inputs(x, model)
        self.y = check_targets(y, self.x, model, self.loss)
        self.batch_size = batch_size
        self._loss_and_gradient = tf.function(self._batch_loss_and_gradient, reduce_retracing=True)
        self._hvp = tf.function(self._batch_hvp, reduce_retracing=True)
        self._hessian = tf.function(self._batch_hessian, reduce_retracing=True)
        self._assign = tf.function(self._assign_all)

    @property
    def samples(self):
        """Number of data rows."""
        return len(self.x)

    def parameters(self):
        """The current weights as one float64 vector."""
        return np.concatenate([keras.ops.convert_to_numpy(variable).ravel() for variable in self.variables]).astype(np.float64)

    def set_parameters(self, theta):
        """Writes the flat vector `theta` into the model's trainable weights."""
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (self.size,):
            raise InputError(f"theta must have shape ({self.size},). Received: {theta.shape}")
        self._assign(tf.constant(theta, dtype=self.dtype))

    def value_and_gradient(self, theta=None):
        """(R_S, its gradient as a float64 vector); the signature scipy.optimize wants."""
        if theta is not None:
            self.set_parameters(theta)
        total, gradient = 0.0, np.zeros(self.size)
        for x, y in self._batches():
            value, grads = self._loss_and_gradient(x, y)
            total += float(value)
            gradient += self._flat(grads)
        return total / self.samples, gradient / self.samples

    def hvp(self, vector, theta=None):
        """Hessian-vector product H v, by differentiating (grad . v) once more."""
        if theta is not None:
            self.set_parameters(theta)
        vector = tf.constant(np.asarray(vector, dtype=np.float64).reshape(self.size), dtype=self.dtype)
        product = np.zeros(self.size)
        for x, y in self._batches():
            product += self._flat(self._hvp(x, y, vector))
        return product / self.samples

    def hessian(self, theta=None):
        """The full symmetric Hessian (size x size, float64).

        Raises:
            InputError: above `FULL_HESSIAN_LIMIT` parameters; use `extreme_eigenvalues`.
        """
        if self.size > FULL_HESSIAN_LIMIT:
            raise InputError(
                f"the model has {self.size} trainable weights, above the {FULL_HESSIAN_LIMIT} of a full Hessian; "
                "use Lanczos for the extreme eigenvalues instead (without --full)"
            )
        if theta is not None:
            self.set_parameters(theta)
        rows = max(1, min(self.batch_size, _JACOBIAN_BUDGET // self.size))
        matrix = np.zeros((self.size, self.size))
        for x, y in self._batches(rows):
            blocks = self._hessian(x, y)
            matrix += np.concatenate([keras.ops.convert_to_numpy(block).reshape(self.size, -1) for block in blocks], axis=1)
        matrix /= self.samples
        return (matrix + matrix.T) / 2

    def _batches(self, rows=None):
        rows = rows or self.batch_size
        for start in range(0, self.samples, rows):
            yield (tf.constant(self.x[start:start + rows]), tf.constant(self.y[start:start + rows]))

    def _split(self, flat):
        parts = tf.split(flat, [int(np.prod(shape, dtype=np.int64)) for shape in self.shapes])
        return [tf.reshape(part, shape) for part, shape in zip(parts, self.shapes)]

    def _assign_all(self, flat):
        for variable, part in zip(self.variables, self._split(flat)):
            variable.assign(part)

    def _flat(self, tensors):
        return np.concatenate([keras.ops.convert_to_numpy(tensor).ravel() for tensor in tensors]).astype(np.float64)

    def _total(self, x, y):
        """The sum over the batch of the per-sample losses (each averaged over its other axes)."""
        losses = self.loss(y, self.model(x, training=False))
        per_sample = tf.reduce_mean(tf.reshape(losses, (tf.shape(losses)[0], -1)), axis=1)
        return tf.reduce_sum(per_sample)

    def _gradient(self, tape, value):
        return tape.gradient(value, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _batch_loss_and_gradient(self, x, y):
        with tf.GradientTape() as tape:
            value = self._total(x, y)
        return value, self._gradient(tape, value)

    def _batch_hvp(self, x, y, vector):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = self._total(x, y)
            grads = self._gradient(inner, value)
            dot = tf.add_n([tf.reduce_sum(grad * part) for grad, part in zip(grads, self._split(vector))])
        return self._gradient(outer, dot)

    def _batch_hessian(self, x, y):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = self._total(x, y)
            flat_gradient = tf.concat([tf.reshape(grad, [-1]) for grad in self._gradient(inner, value)], axis=0)
        return outer.jacobian(flat_gradient, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def eigenvalue_counts(eigenvalues, rtol=ZERO_RTOL, scale=None):
    """Counts of negative, zero and positive eigenvalues.

    Zero means |lambda| <= rtol * scale, where scale is the largest |lambda| given
    (or `scale` when the eigenvalues are only some of the spectrum).

    Example:
        >>> eigenvalue_counts([-1.0, 1e-12, 2.0])
        {'negative': 1, 'zero': 1, 'positive': 1, 'zero_threshold': 2e-10}
    """
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    scale = float(np.abs(eigenvalues).max(initial=0.0)) if scale is None else float(scale)
    threshold = rtol * scale
    zero = np.abs(eigenvalues) <= threshold
    return {
        "negative": int(np.sum(~zero & (eigenvalues < 0))),
        "zero": int(np.sum(zero)),
        "positive": int(np.sum(~zero & (eigenvalues > 0))),
        "zero_threshold": threshold,
    }


def extreme_eigenvalues(risk, k=5, tol=1e-10, seed=0):
    """The k largest and the k smallest (most negative) Hessian eigenvalues, by Lanczos.

    ARPACK's implicitly restarted Lanczos (`scipy.sparse.linalg.eigsh`) on Hessian-vector
    products; eigenvalues that did not converge are left out.

    Returns:
        (largest, smallest): ascending float64 arrays of at most k values each.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    if not 1 <= k < risk.size:
        raise InputError(f"top-k must be between 1 and {risk.size - 1} for {risk.size} weights. Received: k={k}")
    operator = LinearOperator((risk.size, risk.size), matvec=risk.hvp, dtype=np.float64)
    start = np.random.default_rng(seed).standard_normal(risk.size)
    ends = []
    for which in ("LA", "SA"):
        try:
            values = eigsh(operator, k=k, which=which, v0=start, tol=tol, return_eigenvectors=False)
        except ArpackNoConvergence as error:
            values = error.eigenvalues
        ends.append(np.sort(np.real(values)))
    return ends[0], ends[1]


def hutchinson_trace(risk, samples=100, seed=0):
    """Hutchinson's estimate of tr(H): the mean of v.Hv over Rademacher vectors v.

    Returns:
        (estimate, standard error of the mean).
    """
    if samples < 1:
        raise InputError(f"trace samples must be at least 1. Received: samples={samples}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        vector = rng.choice([-1.0, 1.0], size=risk.size)
        values.append(float(vector @ risk.hvp(vector)))
    error = float(np.std(values, ddof=1) / np.sqrt(samples)) if samples > 1 else float("nan")
    return float(np.mean(values)), error


def analyze_hessian(risk, top_k=5, full=False, rtol=ZERO_RTOL, trace_samples=100, seed=0):
    """Gradient norm, eigenvalues, their counts and the trace, as a JSON-ready dict.

    Args:
        risk: an `EmpiricalRisk`.
        top_k: with Lanczos, how many eigenvalues to compute at each end.
        full: form the full Hessian (its exact spectrum and trace) instead of Lanczos;
            also used when the two ends of `top_k` would cover the whole spectrum.
        rtol: zero threshold relative to the largest |eigenvalue|.
        trace_samples: Rademacher vectors of the Hutchinson estimate (Lanczos only).
        seed: seeds Lanczos and Hutchinson.

    Returns:
        Keys grad_norm, loss, params, samples, dtype, method, eigenvalues (those computed,
        ascending), negative, zero, positive, zero_threshold, counts_complete (False with
        Lanczos: the counts are of the computed eigenvalues only), trace, trace_method,
        trace_error.
    """
    rtol = check_number("rtol", rtol, low=0)
    loss, gradient = risk.value_and_gradient()
    result = {"grad_norm": float(np.linalg.norm(gradient)), "loss": float(loss), "params": risk.size,
              "samples": risk.samples, "dtype": risk.dtype}
    full = full or 2 * top_k >= risk.size
    if full:
        eigenvalues = np.linalg.eigvalsh(risk.hessian())
        trace, trace_error = float(np.sum(eigenvalues)), 0.0
    else:
        largest, smallest = extreme_eigenvalues(risk, top_k, seed=seed)
        eigenvalues = np.concatenate([smallest, largest])
        trace, trace_error = hutchinson_trace(risk, trace_samples, seed)
    return {
        **result,
        "method": "full" if full else "lanczos",
        "eigenvalues": [float(value) for value in eigenvalues],
        **eigenvalue_counts(eigenvalues, rtol),
        "counts_complete": full,
        "trace": trace,
        "trace_method": "exact" if full else "hutchinson",
        "trace_error": trace_error,
    }
