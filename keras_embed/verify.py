"""Checks that a rewritten model computes the outputs of the original.

One function serves the CLI, the tests and the callbacks. Data streams in batches. A
model of several outputs is compared on all of them: each output flattened per row and
the outputs concatenated (`output_rows`), so differences and scales cover every output.

Example:
    >>> x = calibration_inputs(model)
    >>> assert_outputs_preserved(model, pruned, x)      # (max abs difference, tolerance)
    (3.5e-07, 0.0012)
"""

import keras
import numpy as np

from keras_embed.files.data import batches, check_inputs, row_count
from keras_embed.errors import InputError, VerificationError

DEFAULT_SAMPLES = 1024
RELATIVE_ATOL = 1e-4


def calibration_inputs(model, samples=DEFAULT_SAMPLES, seed=0):
    """Seeded standard-normal inputs shaped like the model input (unknown axes get size 1);
    for a model of several inputs a dict of them by input name, drawn in input order."""
    generator = np.random.default_rng(seed)
    values = {}
    for tensor in model.inputs:
        shape = tuple(1 if size is None else size for size in tensor.shape[1:])
        values[tensor.name] = generator.standard_normal((samples, *shape)).astype(
            keras.backend.standardize_dtype(tensor.dtype))
    return values if len(values) > 1 else next(iter(values.values()))


def output_rows(outputs):
    """A model's outputs on a batch as one float64 array: a single output as it is, several
    (a list, tuple or dict) each flattened per row and concatenated along the last axis.

    Example:
        >>> output_rows([np.zeros((4, 3)), np.ones((4, 2, 2))]).shape
        (4, 7)
    """
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
        outputs = outputs[0]
    if not isinstance(outputs, (list, tuple)):
        return np.asarray(keras.ops.convert_to_numpy(outputs), dtype=np.float64)
    arrays = [np.asarray(keras.ops.convert_to_numpy(output), dtype=np.float64) for output in outputs]
    return np.concatenate([array.reshape(len(array), -1) for array in arrays], axis=-1)


def predict(model, x, batch_size=256):
    """Model outputs on `x` as a float64 numpy array (inference mode, no tf.function);
    several outputs as `output_rows` puts them."""
    return np.concatenate([output_rows(model(batch, training=False)) for batch in batches(x, batch_size)])


def output_difference(reference, candidate, data, batch_size=256):
    """Streams `data` through both models.

    Returns:
        (max abs output difference, output scale = max abs reference output); the
        difference is inf when the output shapes differ or an output of `candidate` is
        not finite.

    Raises:
        InputError: no samples, or `reference` itself outputs NaN or infinity (nothing can
            be verified against it).
    """
    diff = scale = 0.0
    samples = 0
    for batch in batches(data, batch_size):
        batch = check_inputs(batch, reference)
        expected = output_rows(reference(batch, training=False))
        if not np.all(np.isfinite(expected)):
            raise InputError(f"model '{reference.name}' outputs NaN or infinite values on the data it is checked on; "
                             "check its weights and the data")
        actual = output_rows(candidate(batch, training=False))
        if expected.shape != actual.shape:
            return np.inf, scale
        gap = np.abs(expected - actual)
        diff = max(diff, float(gap.max(initial=0.0)) if np.all(np.isfinite(gap)) else np.inf)
        scale = max(scale, float(np.abs(expected).max(initial=0.0)))
        samples += row_count(batch)
    if samples == 0:
        raise InputError("no samples to verify the outputs on; pass at least one input row")
    return diff, scale


def default_atol(scale):
    """`RELATIVE_ATOL` times the output scale (1 when every output is zero)."""
    return RELATIVE_ATOL * (scale if scale > 0 else 1.0)


def assert_outputs_preserved(reference, candidate, data, atol=None, raise_error=True, batch_size=256):
    """Compares two models on `data` (an array, dataset or iterable of batches).

    Args:
        reference: the original model.
        candidate: the rewritten model.
        data: inputs to compare on.
        atol: largest allowed absolute difference; default `default_atol`.
        raise_error: raise when the difference exceeds `atol` (else only report it).
        batch_size: rows per batch for arrays.

    Returns:
        (max_abs_diff, atol).

    Raises:
        VerificationError: when the difference exceeds `atol` and `raise_error` is set.
    """
    diff, scale = output_difference(reference, candidate, data, batch_size)
    atol = default_atol(scale) if atol is None else float(atol)
    if raise_error and not diff <= atol:
        raise VerificationError(diff, atol)
    return diff, atol
