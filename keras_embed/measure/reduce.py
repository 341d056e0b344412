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

from keras_embed.measure.replicas import Sharded

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


def rows(flat, parts):
    """The rows of `parts` ((tensor name, positions or None), ...) from {name: (rows, channels) tensor}, stacked."""
    pieces = [flat[name] if positions is None else tf.gather(flat[name], list(positions), axis=1)
              for name, positions in parts]
    return pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=0)


class Stacks:
    """The row stacks of one batch ({name: (rows, channels) tensor}, read through `rows`) and
    their per-column figures, each computed once per stack: the tensor one producer reads is
    also what the producer before it writes, and both requests share its figures.

    Counting positives sums int32 flags (`count_nonzero` to int64 takes 4x as long on a CPU);
    a batch holds far fewer than 2**31 rows.

    Example:
        >>> stacks = Stacks({"hidden": tf.constant(a)})
        >>> stacks.extremes((("hidden", None),))[0].shape
        (8,)
    """

    def __init__(self, flat):
        self.flat, self.memo = flat, {}

    def _once(self, what, parts, compute):
        if (what, parts) not in self.memo:
            self.memo[what, parts] = compute()
        return self.memo[what, parts]

    def rows(self, parts):
        return self._once("rows", parts, lambda: rows(self.flat, parts))

    def extremes(self, parts):
        return self._once("extremes", parts, lambda: (tf.reduce_min(self.rows(parts), axis=0),
                                                      tf.reduce_max(self.rows(parts), axis=0)))

    def positive(self, parts):
        return self._once("positive", parts, lambda: tf.cast(
            tf.reduce_sum(tf.cast(self.rows(parts) > 0, tf.int32), axis=0), tf.int64))

    def float64(self, parts):
        return self._once("float64", parts, lambda: tf.cast(self.rows(parts), tf.float64))

    def mean(self, parts):
        return self._once("mean", parts, lambda: tf.reduce_mean(self.float64(parts), axis=0))

    def summary(self, z, a, moments):
        """The `BatchSummary` fields of the stacks `z` and `a` (parts; equal for one tensor) as a tuple of tensors."""
        count = tf.shape(self.rows(a))[0]
        z_min, z_max = self.extremes(z)
        a_min, a_max = self.extremes(a)
        positive, a_mean = self.positive(z), self.mean(a)
        if not moments:
            z_mean = a_mean if z == a else tf.fill(tf.shape(a_mean), tf.constant(np.nan, tf.float64))
            return count, z_min, z_max, a_min, a_max, positive, z_mean, a_mean
        a_centered = self.float64(a) - a_mean
        a_m2 = tf.reduce_sum(a_centered * a_centered, axis=0)
        if z == a:
            return count, z_min, z_max, a_min, a_max, positive, a_mean, a_mean, a_m2, a_m2, a_m2
        z_mean = self.mean(z)
        z_centered = self.float64(z) - z_mean
        return (count, z_min, z_max, a_min, a_max, positive, z_mean, a_mean,
                tf.reduce_sum(z_centered * z_centered, axis=0), a_m2, tf.reduce_sum(z_centered * a_centered, axis=0))


def to_summary(values):
    """A `BatchSummary` of the tensors `Stacks.summary` returned."""
    count, *arrays = (np.asarray(value) for value in values)
    return BatchSummary(int(count), *(np.asarray(array, dtype=np.float64) if index != 4 else array.astype(np.int64)
                                      for index, array in enumerate(arrays)))


def batch_summary(z, a, moments=True):
    """The `BatchSummary` of (rows, width) arrays or tensors z and a (the same object: one tensor)."""
    flat = {"z": tf.convert_to_tensor(z)} if z is a else {"z": tf.convert_to_tensor(z), "a": tf.convert_to_tensor(a)}
    return to_summary(Stacks(flat).summary((("z", None),), (("z" if z is a else "a", None),), moments))


def _reductions(names, requests):
    """`reduce(outputs)`: (per name, whether all its values are finite; per request, its
    summary tensors; per Gram request, its rows of a)."""

    def reduce(outputs):
        flat = {name: tf.reshape(value, (-1, value.shape[-1])) for name, value in zip(names, outputs)}
        finite = [tf.reduce_all(tf.math.is_finite(flat[name])) for name in names]
        stacks = Stacks(flat)
        summaries = [stacks.summary(request.z, request.a, request.moments) for request in requests]
        return finite, summaries, [stacks.rows(request.a) for request in requests if request.gram]

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
                                     input_signature=input_signature(model), autograph=False)
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


_GRAM_BLOCK = 1024  # Gram rows updated per product: 64 MiB of temporary at 8,192 units


def add_gram(gram, a):
    """Adds [a, 1]^T [a, 1] to `gram` in place, in blocks of rows, without building [a, 1]."""
    width = a.shape[1]
    for start in range(0, width, _GRAM_BLOCK):
        rows = slice(start, min(start + _GRAM_BLOCK, width))
        gram[rows, :-1] += a[:, rows].T @ a
    sums = a.sum(axis=0)
    gram[:-1, -1] += sums
    gram[-1, :-1] += sums
    gram[-1, -1] += len(a)


def gram_part(a):
    """[a, 1]^T [a, 1] of a (rows, width) tensor, float64: `add_gram` inside TensorFlow."""
    a = tf.cast(a, tf.float64)
    a = tf.concat([a, tf.ones((tf.shape(a)[0], 1), tf.float64)], axis=1)
    return tf.linalg.matmul(a, a, transpose_a=True)


class Reducer:
    """Runs a probe model on batches and reduces its outputs for `requests` (a sequence of
    `statistics.Request`, in order); with a `tf.distribute.Strategy`, on its replicas, each
    reducing its rows of every batch (`replicas.Sharded`; Gram parts summed in float64).

    Example:
        >>> finite, summaries = Reducer(probe, names, requests, 256)(batch, grams)
        >>> summaries[0][0].count       # the first request's summary of the first replica's rows
        256
    """

    def __init__(self, model, names, requests, batch_size, strategy=None):
        self.model, self.calls = model, 0
        self.reduce = _reductions(names, requests)
        self.sharded = None if strategy is None else Sharded(self._on_replica, input_signature(model), strategy)
        self.traced = _traced(model, names, requests) if strategy is None else None
        self.eager = strategy is None and layer_bytes(model, batch_size) <= EAGER_BYTES

    def _on_replica(self, inputs):
        finite, summaries, grams = self.reduce(as_list(call(self.model, inputs)))
        broken = [tf.cast(tf.logical_not(flag), tf.int32) for flag in finite]  # replicas where not finite
        return ([gram_part(a) for a in grams], broken), summaries

    def __call__(self, batch, grams):
        """Reduces `batch` and adds its part of each Gram request's Gram to `grams` (NumPy
        arrays, in request order), in place.

        Returns:
            (per tensor name, whether its values are finite; per request, a `BatchSummary`
            of each replica's rows, one without a strategy).
        """
        self.calls += 1
        if self.sharded is not None:
            (parts, broken), summaries = self.sharded(input_tensors(self.model, batch))
            for gram, part in zip(grams, parts):
                gram += part
            return [not count for count in broken], [[to_summary(row) for row in zip(*values)] for values in summaries]
        if self.eager and self.calls <= EAGER_CALLS:
            finite, summaries, rows = self.reduce(as_list(self.model(batch, training=False)))
        else:
            finite, summaries, rows = self.traced(*input_tensors(self.model, batch))
        for gram, a in zip(grams, rows):
            add_gram(gram, np.asarray(a, dtype=np.float64))
        return [bool(flag) for flag in finite], [[to_summary(values)] for values in summaries]
