"""Per-batch reductions on the replicas of a `tf.distribute.Strategy`.

Every statistic keras-embed gathers is a reduction of each batch, merged across batches.
Under a strategy every worker reads the same batches; each batch is split by rows across
the replicas in sync (replica i of n takes the i-th of n near-equal slices), each replica
reduces its rows inside `strategy.run`, and TensorFlow brings the results together: sums
with `strategy.reduce(SUM)`, figures that are not sums (extremes, centered moments) with
`strategy.gather`, one row per replica, to be merged like batches. Without a strategy
(None) the function runs on the whole batch, as it is.

Example:
    >>> sharded = Sharded(products, tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    >>> gram, = sharded.sum([x])     # products([x]) up to float64 rounding
"""

import contextlib
import functools
import json
import os

import numpy as np
import tensorflow as tf

from keras_embed.errors import InputError

STRATEGIES = ("default", "mirrored", "multi-worker")


def named_strategy(name):
    """The strategy `--strategy NAME` asks for: None (one device), a `MirroredStrategy` over
    every local GPU (the CPU when there is none), or a `MultiWorkerMirroredStrategy` of the
    cluster `TF_CONFIG` describes.

    Example:
        >>> named_strategy("mirrored").num_replicas_in_sync     # on a machine of 4 GPUs
        4
    """
    if name == "default":
        return None
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        try:
            cluster = json.loads(os.environ["TF_CONFIG"])["cluster"]
        except (KeyError, TypeError, ValueError):
            raise InputError("--strategy multi-worker needs TF_CONFIG, as TensorFlow documents it: "
                             '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": I}} '
                             "on every worker") from None
        if not isinstance(cluster, dict) or not cluster:
            raise InputError("TF_CONFIG names no cluster; give its workers under \"cluster\"")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise InputError(f"unknown strategy '{name}'; use one of {', '.join(STRATEGIES)}")


def is_chief(strategy):
    """Whether this process writes the results: always without a strategy or on one
    machine, else on the chief (worker 0 where the cluster has no chief task)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0
                                    and "chief" not in resolver.cluster_spec().as_dict())


def scope(strategy):
    """`strategy.scope()`, or nothing without a strategy: models built inside it keep their
    weights on every replica."""
    return contextlib.nullcontext() if strategy is None else strategy.scope()


class Sharded:
    """`function` (a list of input tensors -> (sums, figures), two structures of tensors of
    static shapes) traced for the input `signature` (a list of `tf.TensorSpec`) and run on
    each batch, on the replicas of `strategy` when one is given (see module docstring). Under
    a strategy each replica packs its sums, and its figures, into one float64 vector (exact
    for float32 and for counts below 2**53), so a batch costs one reduction and one gather,
    not one per tensor (without one nothing is packed: a packed copy of a group's Grams
    would double the memory they take);
    each vector starts with a zero, as collectives of empty tensors crash TensorFlow 2.21.

    Example:
        >>> sharded = Sharded(lambda inputs: ((tf.reduce_sum(inputs[0], 0),), (tf.reduce_max(inputs[0], 0),)),
        ...                   [spec], strategy)
        >>> (total,), (largest,) = sharded([x])
        >>> total.shape, largest.shape        # x.sum(axis=0); each replica's maximum by row
        ((5,), (2, 5))
    """

    def __init__(self, function, signature, strategy=None):
        self.strategy, self.structure = strategy, None

        def packed(inputs):
            outputs = function(inputs)
            parts = [tf.nest.flatten(part) for part in outputs]
            self.structure = (tf.nest.map_structure(lambda value: 0, outputs),
                              [[(tuple(value.shape), value.dtype.as_numpy_dtype) for value in part] for part in parts])
            sums, figures = (tf.concat([tf.zeros([1], tf.float64)] + [tf.reshape(tf.cast(value, tf.float64), [-1])
                                                                       for value in part], axis=0) for part in parts)
            return sums, figures[None]

        self.packed = packed
        self.local = tf.function(function, input_signature=[signature])  # one device: nothing to pack
        self.distributed = tf.function(self._step, reduce_retracing=True)

    def _step(self, inputs):
        sums, figures = self.strategy.run(self.packed, args=(inputs,))
        return (self.strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None),
                self.strategy.gather(figures, axis=0))

    def _unpacked(self, sums, figures):
        """(sums, figures) in the function's structure from the packed (width,) sums and
        (replicas, width) figures."""
        outputs, layouts = self.structure
        sums, figures = (_split(rows, layout) for rows, layout in zip((sums[None], figures), layouts))
        return tf.nest.pack_sequence_as(outputs, [piece[0] for piece in sums] + figures)

    def __call__(self, inputs):
        """(the sums for the batch `inputs`, a list of tensors, summed over the replicas; the
        figures with a new first axis of one row per replica, one without a strategy or for a
        batch of fewer rows than replicas, run whole on this device), as NumPy arrays."""
        if self.strategy is None or len(inputs[0]) < self.strategy.num_replicas_in_sync:
            # a replica given no rows can crash TensorFlow 2.21 (oneDNN float32 convolutions of
            # an empty batch); every worker sees the same batch sizes, so all take this branch
            sums, figures = self.local(inputs)
            return (tf.nest.map_structure(np.asarray, sums),
                    tf.nest.map_structure(lambda value: np.asarray(value)[None], figures))
        bounds = np.linspace(0, len(inputs[0]), self.strategy.num_replicas_in_sync + 1).astype(int)

        def shard(context):
            replica = context.replica_id_in_sync_group
            return [part[bounds[replica]:bounds[replica + 1]] for part in inputs]

        sums, figures = self.distributed(self.strategy.experimental_distribute_values_from_function(shard))
        return self._unpacked(np.asarray(sums), np.asarray(figures))


def _split(rows, layout):
    """The (replicas, 1 + width) float64 `rows` (a zero first) as arrays of (replicas,
    *shape) in the dtypes of `layout` [(shape, dtype), ...]."""
    pieces, start = [], 1
    for shape, dtype in layout:
        size = int(np.prod(shape))
        pieces.append(rows[:, start:start + size].reshape((len(rows), *shape)).astype(dtype, copy=False))
        start += size
    return pieces
