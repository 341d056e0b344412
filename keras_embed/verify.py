"""Checks that a rewritten model computes the outputs of the original.

One function serves the CLI, the tests and the callbacks.

Example:
    >>> x = calibration_inputs(model)
    >>> assert_outputs_preserved(model, pruned, x)      # returns the max abs difference
    3.5e-07
"""

import keras
import numpy as np

from keras_embed.errors import VerificationError

DEFAULT_SAMPLES = 1024
RELATIVE_ATOL = 1e-4


def calibration_inputs(model, samples=DEFAULT_SAMPLES, seed=0):
    """Seeded standard-normal inputs shaped like the model input (unknown axes get size 1)."""
    tensor = model.inputs[0]
    shape = tuple(1 if size is None else size for size in tensor.shape[1:])
    values = np.random.default_rng(seed).standard_normal((samples, *shape))
    return values.astype(keras.backend.standardize_dtype(tensor.dtype))


def predict(model, x, batch_size=256):
    """Model outputs on `x` as a float64 numpy array (inference mode, no tf.function)."""
    batches = [model(x[start:start + batch_size], training=False) for start in range(0, len(x), batch_size)]
    return np.concatenate([keras.ops.convert_to_numpy(batch) for batch in batches]).astype(np.float64)


def default_atol(reference_outputs):
    """`RELATIVE_ATOL` times the output scale (the largest absolute output, or 1 if all zero)."""
    scale = float(np.abs(reference_outputs).max(initial=0.0))
    return RELATIVE_ATOL * (scale if scale > 0 else 1.0)


def assert_outputs_preserved(reference, candidate, x, atol=None, raise_error=True):
    """Compares two models on `x`.

    Args:
        reference: the original model.
        candidate: the rewritten model.
        x: inputs to compare on.
        atol: largest allowed absolute difference; default `default_atol`.
        raise_error: raise when the difference exceeds `atol` (else only report it).

    Returns:
        (max_abs_diff, atol).

    Raises:
        VerificationError: when the difference exceeds `atol` and `raise_error` is set.
    """
    expected = predict(reference, x)
    actual = predict(candidate, x)
    if expected.shape != actual.shape:
        raise VerificationError(np.inf, 0.0 if atol is None else atol)
    atol = default_atol(expected) if atol is None else float(atol)
    diff = float(np.abs(expected - actual).max(initial=0.0))
    if raise_error and not diff <= atol:  # NaN fails too
        raise VerificationError(diff, atol)
    return diff, atol
