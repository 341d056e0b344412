"""Per-batch reductions of a probe's tensors inside TensorFlow, so only per-channel figures reach NumPy.

A probe of a large CNN returns every layer's output: at 224x224 a batch of them is tens of
GB, so the statistics pass reduces each tensor over its rows (samples and positions) where
TensorFlow computes it, in a traced function whose intermediate tensors are freed as soon
as their reductions have read them. Extremes and positive counts are exact in the tensor's
dtype; means and centered second moments are float64 (`BatchSummary`), merged across batches
by `statistics.LayerStats.merge`. Small probes run eagerly for their first batches (tracing
costs more than a few of them).

Example:
    >>> summary = batch_summary(tf.constant(z), tf.constant(a))
    >>> summary.z_min.shape
    (8,)
"""

import dataclasses
import math
import weakref

import numpy as np
import tensorflow as tf

EAGER_CALLS = 2  # batches a small probe runs eagerly before it is traced
EAGER_BYTES = 256 * 2**20  # a probe whose layer outputs for one batch exceed this is traced from the start


@dataclasses.dataclass(frozen=True)
class BatchSummary:
    """One batch's figures per column: rows, extremes, positive count of z, float64 means and,
    with moments, centered second moments (else None)."""

    count: int
    z_min: np.ndarray
    z_max: np.ndarray
    a_min: np.ndarray
    a_max: np.ndarray
    positive: np.ndarray
    z_mean: np.ndarray
    a_mean: np.ndarray
    z_m2: np.ndarray | None = None
    a_m2: np.ndarray | None = None
    za_m2: np.ndarray | None = None


def _extremes(rows):
    return tf.reduce_min(rows, axis=0), tf.reduce_max(rows, axis=0)


def _summary_tensors(z, a, moments):
    """The `BatchSummary` fields of (rows, width) tensors z and a as a tuple of tensors."""
    same = z is a
    count = tf.shape(a)[0]
    z_min, z_max = _extremes(z)
    a_min, a_max = (z_min, z_max) if same else _extremes(a)
    positive = tf.math.count_nonzero(z > 0, axis=0, dtype=tf.int64)
    a64 = tf.cast(a, tf.float64)
    a_mean = tf.reduce_mean(a64, axis=0)
    if not moments:
        z_mean = a_mean if same else tf.fill(tf.shape(a_mean), tf.constant(np.nan, tf.float64))
        return count, z_min, z_max, a_min, a_max, positive, z_mean, a_mean
    z64 = a64 if same else tf.cast(z, tf.float64)
    z_mean = a_mean if same else tf.reduce_mean(z64, axis=0)
    a_centered = a64 - a_mean
    a_m2 = tf.reduce_sum(a_centered * a_centered, axis=0)
    if same:
        return count, z_min, z_max, a_min, a_max, positive, z_mean, a_mean, a_m2, a_m2, a_m2
    z_centered = z64 - z_mean
    return (count, z_min, z_max, a_min, a_max, positive, z_mean, a_mean,
            tf.reduce_sum(z_centered * z_centered, axis=0), a_m2, tf.reduce_sum(z_centered * a_centered, axis=0))


def to_summary(values):
    """A `BatchSummary` of the tensors `_summary_tensors` returned."""
    count, *arrays = (np.asarray(value) for value in values)
    return BatchSummary(int(count), *(np.asarray(array, dtype=np.float64) if index != 4 else array.astype(np.int64)
                                      for index, array in enumerate(arrays)))


def batch_summary(z, a, moments=True):
    """The `BatchSummary` of (rows, width) arrays or tensors z and a (the same object: one tensor)."""
    same = z is a
    z = tf.convert_to_tensor(z)
    return to_summary(_summary_tensors(z, z if same else tf.convert_to_tensor(a), moments))


def rows(flat, parts):
    """The rows of `parts` ((tensor name, positions or None), ...) from {name: (rows, channels) tensor}, stacked."""
    pieces = [flat[name] if positions is None else tf.gather(flat[name], list(positions), axis=1)
              for name, positions in parts]
    return pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=0)


def _reductions(names, requests):
    """`reduce(outputs)`: (per name, whether all its values are finite; per request, its
    summary tensors; per Gram request, its rows of a)."""

    def reduce(outputs):
        flat = {name: tf.reshape(value, (-1, value.shape[-1])) for name, value in zip(names, outputs)}
        finite = [tf.reduce_all(tf.math.is_finite(flat[name])) for name in names]
        summaries, grams = [], []
        for request in requests:
            a = rows(flat, request.a)
            z = a if request.z == request.a else rows(flat, request.z)
            summaries.append(_summary_tensors(z, a, request.moments))
            if request.gram:
                grams.append(a)
        return finite, summaries, grams

    return reduce


def layer_bytes(model, rows_):
    """Bytes the outputs of every layer of `model` take for `rows_` samples (float32)."""
    return 4 * rows_ * sum(math.prod(size or 1 for size in tensor.shape[1:])
                           for layer in model.layers for tensor in _outputs(layer))


def _outputs(layer):
    output = layer.output
    return output if isinstance(output, (list, tuple)) else [output]


_TRACED = weakref.WeakKeyDictionary()  # model -> {(names, requests): traced function}: traced once per probe


def _traced(model, names, requests):
    functions = _TRACED.setdefault(model, {})
    key = (tuple(names), tuple(requests))
    if key not in functions:
        reduce = _reductions(names, requests)
        functions[key] = tf.function(lambda *inputs: reduce(as_list(call(model, inputs))),
                                     input_signature=input_signature(model))
    return functions[key]


def input_signature(model):
    """A `tf.function` signature of `model`'s inputs, in order, any batch size."""
    return [tf.TensorSpec((None, *tensor.shape[1:]), tensor.dtype) for tensor in model.inputs]


def input_tensors(model, batch):
    """A batch (an array, or a dict of arrays by input name) as tensors in `model`'s input order."""
    parts = [batch[tensor.name] for tensor in model.inputs] if isinstance(batch, dict) else [batch]
    return [tf.convert_to_tensor(part, dtype=tensor.dtype) for part, tensor in zip(parts, model.inputs)]


def call(model, inputs):
    """`model` in inference mode on its input tensors, in order."""
    return model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)


def as_list(values):
    """A model's outputs as a list (one output comes alone)."""
    return list(values) if isinstance(values, (list, tuple)) else [values]


class Reducer:
    """Runs a probe model on batches and reduces its outputs for `requests` (a sequence of
    `statistics.Request`, in order).

    Calls return (per tensor name, whether it is finite; per request, its `BatchSummary`;
    per Gram request, its rows of a as float64).
    """

    def __init__(self, model, names, requests, batch_size):
        self.model, self.calls = model, 0
        self.reduce = _reductions(names, requests)
        self.traced = _traced(model, names, requests)
        self.eager = layer_bytes(model, batch_size) <= EAGER_BYTES

    def __call__(self, batch):
        self.calls += 1
        if self.eager and self.calls <= EAGER_CALLS:
            finite, summaries, grams = self.reduce(as_list(self.model(batch, training=False)))
        else:
            finite, summaries, grams = self.traced(*input_tensors(self.model, batch))
        return ([bool(flag) for flag in finite], [to_summary(values) for values in summaries],
                [np.asarray(value, dtype=np.float64) for value in grams])
