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
from keras_embed.measure.reduce import EAGER_BYTES, layer_bytes
from keras_embed.model.registry import vocabulary

DEFAULT_SAMPLES = 1024
RELATIVE_ATOL = 1e-4
# A rewrite rounds differently from the original in every layer: never ask for less than this many times the change
# the original's outputs make when every input moves by one float32 rounding step (a deep network can amplify that
# far beyond RELATIVE_ATOL: ResNet101 with random weights by 1.6e-3 of its output scale).
ROUNDING_FACTOR = 10


def layers_within(model):
    """Every layer of `model`, those of the models nested in it included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from layers_within(layer)


def _token_count(model):
    """The smallest vocabulary (`input_dim`) of the model's Embedding layers, nested ones
    included; 2 without any."""
    return min((size for size in map(vocabulary, layers_within(model)) if size is not None), default=2)


def calibration_inputs(model, samples=DEFAULT_SAMPLES, seed=0):
    """Seeded standard-normal inputs shaped like the model input (unknown axes get size 1),
    integer inputs uniform tokens below every Embedding's vocabulary size, boolean ones (masks)
    true with probability 0.75; for a model of
    several inputs a dict of them by input name, drawn in input order."""
    generator = np.random.default_rng(seed)
    values = {}
    for tensor in model.inputs:
        shape = (samples, *(1 if size is None else size for size in tensor.shape[1:]))
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        if dtype == "bool":  # a mask: mostly true
            values[tensor.name] = generator.random(shape) < 0.75
        elif np.issubdtype(np.dtype(dtype), np.integer):
            values[tensor.name] = generator.integers(0, _token_count(model), shape).astype(dtype)
        else:
            values[tensor.name] = generator.standard_normal(shape).astype(dtype)
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


def outputs_on(model, batch):
    """`model`'s outputs on one batch as a float64 numpy array (several as `output_rows` puts
    them), in inference mode: eagerly
    for a small model, traced for one whose layer outputs exceed `reduce.EAGER_BYTES` (an
    eager functional call keeps every layer's output until it returns; a traced one frees
    them as it goes, and is faster on a large CNN)."""
    if layer_bytes(model, row_count(batch)) <= EAGER_BYTES:
        values = model(batch, training=False)
    else:
        values = model.predict_on_batch(batch)
    return output_rows(values)


def predict(model, x, batch_size=256):
    """Model outputs on `x` as a float64 numpy array (inference mode; several outputs as
    `output_rows` puts them)."""
    return np.concatenate([outputs_on(model, batch) for batch in batches(x, batch_size)])


def rounding_step(batch):
    """`batch` (an array, or a dict of arrays by input name) with every float moved by about
    one float32 rounding step (integers as they are)."""
    if isinstance(batch, dict):
        return {name: rounding_step(values) for name, values in batch.items()}
    return batch * np.float32(1 + 2**-23) if np.issubdtype(batch.dtype, np.floating) else batch


def output_difference(reference, candidate, data, batch_size=256, sensitivity=False):
    """Streams `data` through both models.

    Returns:
        (max abs output difference, output scale = max abs reference output, and with
        `sensitivity` the max abs change of the reference outputs when every input moves by
        one float32 rounding step, else 0); the difference is inf when the output shapes
        differ or an output of `candidate` is not finite.

    Raises:
        InputError: no samples, or `reference` itself outputs NaN or infinity (nothing can
            be verified against it).
    """
    diff = scale = rounding = 0.0
    samples = 0
    for batch in batches(data, batch_size):
        batch = check_inputs(batch, reference)
        expected = outputs_on(reference, batch)
        if not np.all(np.isfinite(expected)):
            raise InputError(f"model '{reference.name}' outputs NaN or infinite values on the data it is checked on; "
                             "check its weights and the data")
        actual = outputs_on(candidate, batch)
        if expected.shape != actual.shape:
            return np.inf, scale, rounding
        if sensitivity:
            moved = np.abs(outputs_on(reference, rounding_step(batch)) - expected)
            rounding = max(rounding, float(np.nan_to_num(moved, posinf=0.0).max(initial=0.0)))
        gap = np.abs(expected - actual)
        diff = max(diff, float(gap.max(initial=0.0)) if np.all(np.isfinite(gap)) else np.inf)
        scale = max(scale, float(np.abs(expected).max(initial=0.0)))
        samples += row_count(batch)
    if samples == 0:
        raise InputError("no samples to verify the outputs on; pass at least one input row")
    return diff, scale, rounding


def default_atol(scale, rounding=0.0):
    """`RELATIVE_ATOL` times the output scale (1 when every output is zero), or `ROUNDING_FACTOR`
    times the outputs' change under a one-rounding-step change of the inputs, whichever is larger."""
    return max(RELATIVE_ATOL * (scale if scale > 0 else 1.0), ROUNDING_FACTOR * rounding)


def assert_outputs_preserved(reference, candidate, data, atol=None, raise_error=True, batch_size=256):
    """Compares two models on `data` (an array, dataset or iterable of batches).

    Args:
        reference: the original model.
        candidate: the rewritten model.
        data: inputs to compare on.
        atol: largest allowed absolute difference; default `default_atol` (one more pass of
            `reference` measures its rounding sensitivity).
        raise_error: raise when the difference exceeds `atol` (else only report it).
        batch_size: rows per batch for arrays.

    Returns:
        (max_abs_diff, atol).

    Raises:
        VerificationError: when the difference exceeds `atol` and `raise_error` is set.
    """
    diff, scale, rounding = output_difference(reference, candidate, data, batch_size, sensitivity=atol is None)
    atol = default_atol(scale, rounding) if atol is None else float(atol)
    if raise_error and not diff <= atol:
        raise VerificationError(diff, atol)
    return diff, atol
