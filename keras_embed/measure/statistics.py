"""One streaming pass of statistics over calibration data, shared by every data-driven rule.

A `Request` names what to accumulate under one key: a pre-activation z and a value a,
each a list of (tensor, positions on its last axis) stacked as rows, so a channel group
read in several tensors (or several times in one, after a Flatten) counts every sample,
position and occurrence. Per column: z and a extremes, the count of positive z, the
moments of a least-squares fit a ~ slope * z + intercept; optionally the Gram matrix of
[a, 1]. Each batch is reduced over its rows inside TensorFlow (`reduce`), so a probe of
every layer of a large CNN never reaches NumPy whole; accumulation is float64 and
batch-wise (moments merged with Chan's update, stable where raw sums cancel), so memory
does not depend on the number of samples. The Grams grow
with the square of the width (8 (width + 1)^2 bytes), so `collect` refuses, before
allocating anything, a pass whose Grams exceed `GRAM_BUDGET`; each batch updates a Gram in
blocks of rows, so the batch product stays small too.

Example:
    >>> stats = collect(graph, x, producer_requests(graph))
    >>> stats["hidden"].slope_intercept_residual()[2].max()   # worst affine-fit residual
    0.013
"""

import dataclasses
import functools
import math

import numpy as np
import threadpoolctl

from keras_embed.files.data import batches, check_inputs, row_count
from keras_embed.errors import InputError
from keras_embed.measure.reduce import Reducer, add_gram, batch_summary
from keras_embed.measure.replicas import scope
from keras_embed.model.build import Prober, build_model

GRAM_BUDGET = 256 * 2**20  # bytes of the Gram matrices one pass may hold: 5,791 units in one layer


def gram_bytes(width):
    """Bytes of the float64 Gram matrix of [a, 1] of `width` channels."""
    return 8 * (width + 1) ** 2


def check_gram_memory(widths, budget=GRAM_BUDGET, extra=None):
    """Refuses the Gram matrices of {name: width}, held at once, above `budget` bytes
    (with `extra` {name: bytes} held beside each).

    Raises:
        InputError: naming the widest and the memory needed; the batch size does not change
            it, only statistics without a Gram (e.g. `prune --mode exact`) do.

    Example:
        >>> check_gram_memory({"hidden": 8192})
        InputError: layer 'hidden' has 8192 units: its statistics need a 512 MiB Gram matrix ...
    """
    need = sum(gram_bytes(width) + (extra or {}).get(name, 0) for name, width in widths.items())
    if need > budget:
        name = max(widths, key=widths.get)
        raise InputError(
            f"layer '{name}' has {widths[name]} units: its statistics need a {need / 2**20:.0f} MiB Gram "
            f"matrix (float64), above the {budget / 2**20:.0f} MiB budget, and a smaller --batch-size does not "
            f"change that; where the machine has that memory free raise the budget (--gram-budget "
            f"{math.ceil(need / 2**20)}, or gram_budget={need} in the library), or use --mode exact or analyze, "
            "which need no Gram"
        )


@dataclasses.dataclass
class LayerStats:
    """Accumulated statistics of `width` columns (see module docstring)."""

    width: int
    gram: np.ndarray | None
    count: int = 0

    def __post_init__(self):
        shape = (self.width,)
        self.z_min, self.z_max = np.full(shape, np.inf), np.full(shape, -np.inf)
        self.a_min, self.a_max = np.full(shape, np.inf), np.full(shape, -np.inf)
        self.positive = np.zeros(shape, dtype=np.int64)
        self.z_mean, self.a_mean = np.zeros(shape), np.zeros(shape)
        self.z_m2, self.a_m2, self.za_m2 = np.zeros(shape), np.zeros(shape), np.zeros(shape)

    def update(self, z, a):
        """Adds a batch: z and a are (rows, width) arrays (any float dtype)."""
        z, a = np.asarray(z, dtype=np.float64), np.asarray(a, dtype=np.float64)
        if len(z) == 0:
            return
        self.merge(batch_summary(z, a))
        if self.gram is not None:
            add_gram(self.gram, a)

    def merge(self, batch):
        """Adds a `reduce.BatchSummary` (second moments NaN from the first one without them)."""
        n = batch.count
        if n == 0:
            return
        np.minimum(self.z_min, batch.z_min, out=self.z_min)
        np.maximum(self.z_max, batch.z_max, out=self.z_max)
        np.minimum(self.a_min, batch.a_min, out=self.a_min)
        np.maximum(self.a_max, batch.a_max, out=self.a_max)
        self.positive += batch.positive
        total = self.count + n
        z_delta, a_delta = batch.z_mean - self.z_mean, batch.a_mean - self.a_mean
        weight = self.count * n / total
        missing = np.full(self.width, np.nan)
        self.z_m2 += (missing if batch.z_m2 is None else batch.z_m2) + z_delta**2 * weight
        self.a_m2 += (missing if batch.a_m2 is None else batch.a_m2) + a_delta**2 * weight
        self.za_m2 += (missing if batch.za_m2 is None else batch.za_m2) + z_delta * a_delta * weight
        self.z_mean += z_delta * n / total
        self.a_mean += a_delta * n / total
        self.count = total

    @property
    def a_std(self):
        """Standard deviation of each column of a."""
        return np.sqrt(np.maximum(self.a_m2, 0.0) / max(self.count, 1))

    def slope_intercept_residual(self):
        """Least-squares fit a ~ slope * z + intercept per column.

        Returns:
            (slope, intercept, residual), residual = sqrt(1 - R^2): 0 for an exactly affine
            column, 1 for no affine relation. Columns with constant z get slope 0, residual 0.
        """
        varying = self.z_m2 > 0
        slope = np.where(varying, self.za_m2 / np.where(varying, self.z_m2, 1.0), 0.0)
        explained = np.where(varying & (self.a_m2 > 0), slope * self.za_m2 / np.where(self.a_m2 > 0, self.a_m2, 1.0), 1.0)
        residual = np.sqrt(np.clip(1.0 - explained, 0.0, 1.0))
        return slope, self.a_mean - slope * self.z_mean, residual

    @property
    def active_fraction(self):
        """Fraction of rows on which each column of z is positive."""
        return self.positive / max(self.count, 1)


@dataclasses.dataclass(frozen=True)
class Request:
    """What one key accumulates: rows of z and of a, each stacked from (tensor name,
    positions on its last axis, or None for all of it); `gram` adds the Gram of [a, 1];
    without `moments` the means of z and the second moments stay NaN (extremes, positive
    counts and the mean of a are all some rules need, and they cost less)."""

    z: tuple
    a: tuple
    width: int
    gram: bool = False
    moments: bool = True

    @classmethod
    def of(cls, tensor, width, gram=False, moments=True):
        """A request for the values of one whole tensor (z = a)."""
        return cls(((tensor, None),), ((tensor, None),), width, gram, moments)


def producer_requests(graph, producers=None, moments=None):
    """Per producer (default: all), its pre-activation z and, as a, what the layer reading it
    sees after the elementwise layers that follow (its output when none follow); with
    `moments` (a set of names), the second moments of those producers only."""
    requests = {}
    for node in graph.producers if producers is None else producers:
        chain = graph.elementwise_after(node)
        end = chain[-1].name if chain else node.name
        requests[node.name] = Request(((f"{node.name}/z", None),), ((end, None),), node.width,
                                      moments=moments is None or node.name in moments)
    return requests


def source_requests(graph):
    """The extremes and mean of every tensor a producer reads (the model inputs aside)."""
    inputs = {node.name for node in graph.inputs}
    sources = {source for node in graph.producers for source in node.inputs} - inputs
    return {name: Request.of(name, graph.by_name[name].width, moments=False) for name in sorted(sources)}


def group_request(graph, group, gram=False):
    """The channels of `group` wherever a producer reads them, every occurrence a row."""
    parts = tuple((source, tuple(occurrence)) for source in sorted({source for _, source in graph.readers_of(group)})
                  for occurrence in graph.positions(source, group))
    return Request(parts, parts, graph.group_width(group), gram)


def tensors(requests):
    """The tensor names a probe must return for `requests`, sorted."""
    return sorted({name for request in requests.values() for name, _ in request.z + request.a})


@functools.cache
def _threadpools():
    return threadpoolctl.ThreadpoolController()  # finding the libraries takes ~4 ms: once


def one_blas_thread():
    """Limits NumPy's BLAS to one thread: the per-batch products are small, and with more
    threads each one waits for every core, which stalls when another process holds one
    (measured in benchmarks/RESULTS.md)."""
    return _threadpools().limit(limits=1, user_api="blas")


def collect(graph, data, requests, batch_size=256, on_batch=None, probe=None, gram_budget=GRAM_BUDGET, strategy=None):
    """Runs the one pass of statistics.

    Args:
        graph: the `Graph`.
        data: an array, a tf.data.Dataset or an iterable of batches (see `data.batches`).
        requests: {key: `Request`}.
        batch_size: rows per batch when `data` is an array.
        on_batch: called with the number of samples of each batch (for progress bars).
        probe: a `Prober` (or a model) returning `tensors(requests)` in that order, e.g.
            one built before with `build_model(graph, outputs=tensors(requests))` and given
            the current weights with `build.write_weights`.
        gram_budget: bytes the Grams may take together (see `check_gram_memory`).
        strategy: a `tf.distribute.Strategy` whose replicas share each batch (see
            `measure.replicas`); the figures equal the one-device pass up to float64 rounding.

    Returns:
        {key: `LayerStats`}.

    Raises:
        InputError: unusable data, no samples, or Grams above `gram_budget`.
    """
    check_gram_memory({key: request.width for key, request in requests.items() if request.gram}, gram_budget)
    stats = {key: LayerStats(request.width, np.zeros((request.width + 1,) * 2) if request.gram else None)
             for key, request in requests.items()}
    names = tensors(requests)
    if probe is None and names:
        with scope(strategy):
            probe = build_model(graph, outputs=names)
    reducer = Reducer(probe.model if isinstance(probe, Prober) else probe, names, list(requests.values()),
                      batch_size, strategy) if names else None
    grams = [stats[key].gram for key, request in requests.items() if request.gram]
    samples = 0
    with one_blas_thread():
        for batch in batches(data, batch_size):
            batch = check_inputs(batch, graph.inputs)
            if names:
                finite, summaries = reducer(batch, grams)
                if not all(finite):
                    broken = names[finite.index(False)].split("/")[0]
                    raise InputError(f"the model computes NaN or infinite values at '{broken}' on the data; "
                                     "check the model's weights and the data")
                for key, shards in zip(requests, summaries):
                    for summary in shards:
                        stats[key].merge(summary)
            rows = row_count(batch)
            samples += rows
            if on_batch is not None:
                on_batch(rows)
    if samples == 0:
        raise InputError("data holds no samples; pass at least one input row")
    return stats
