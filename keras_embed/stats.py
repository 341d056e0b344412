"""One streaming pass of statistics over calibration data, shared by every data-driven rule.

Per hidden unit: pre-activation z and activation a = sigma(z) extremes, the count of
positive z, and the moments of a least-squares affine fit a ~ slope * z + intercept.
Per hidden layer, optionally: the Gram matrix of [a, 1]. Accumulation is float64 and
batch-wise (moments merged with Chan's update, stable where raw sums cancel), so memory
does not depend on the number of samples. The Grams grow with the square of the width
(8 (width + 1)^2 bytes: 512 MiB for 8,192 units), so `collect` refuses, before allocating
anything, a pass whose Grams would exceed `GRAM_BUDGET`; each batch updates a Gram in
blocks of rows, so the batch product stays small too.

Example:
    >>> stats = collect(graph, x, batch_size=512)
    >>> stats.layers["hidden"].slope_intercept_residual()[2].max()   # worst affine-fit residual
    0.013
"""

import dataclasses
import functools

import keras
import numpy as np
import threadpoolctl

from keras_embed.data import batches, check_inputs
from keras_embed.errors import InputError

GRAM_BUDGET = 256 * 2**20  # bytes of the Gram matrices one pass may hold: 5,791 units in one layer
_GRAM_BLOCK = 1024  # Gram rows updated per product: 64 MiB of temporary at 8,192 units


def gram_bytes(width):
    """Bytes of the float64 Gram matrix of [a, 1] of a layer of `width` units."""
    return 8 * (width + 1) ** 2


def check_gram_memory(layers, budget=GRAM_BUDGET):
    """Refuses Gram matrices of `layers`, held at once, that would exceed `budget` bytes.

    Raises:
        InputError: naming the widest layer and the memory needed; the batch size does not
            change it, only statistics without a Gram (e.g. `prune --mode exact`) do.

    Example:
        >>> check_gram_memory(graph.layers[:-1])          # before collect(graph, x, gram=True)
    """
    layers = list(layers)
    need = sum(gram_bytes(layer.width) for layer in layers)
    if need > budget:
        widest = max(layers, key=lambda layer: layer.width)
        raise InputError(
            f"layer '{widest.name}' has {widest.width} units: its statistics need a {need / 2**20:.0f} MiB Gram "
            f"matrix (float64), above the {budget / 2**20:.0f} MiB budget, and a smaller --batch-size does not "
            "change that; use --mode exact or analyze, which need no Gram, or a narrower layer"
        )


@dataclasses.dataclass
class LayerStats:
    """Accumulated statistics of the units of one hidden layer (see module docstring)."""

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
        """Adds a batch: z and a are (samples, units) arrays (any float dtype)."""
        z, a = np.asarray(z, dtype=np.float64), np.asarray(a, dtype=np.float64)
        n = len(z)
        if n == 0:
            return
        np.minimum(self.z_min, z.min(axis=0), out=self.z_min)
        np.maximum(self.z_max, z.max(axis=0), out=self.z_max)
        np.minimum(self.a_min, a.min(axis=0), out=self.a_min)
        np.maximum(self.a_max, a.max(axis=0), out=self.a_max)
        self.positive += (z > 0).sum(axis=0)
        z_mean, a_mean = z.mean(axis=0), a.mean(axis=0)
        z_centered, a_centered = z - z_mean, a - a_mean
        total = self.count + n
        z_delta, a_delta = z_mean - self.z_mean, a_mean - self.a_mean
        weight = self.count * n / total
        self.z_m2 += np.einsum("ij,ij->j", z_centered, z_centered) + z_delta**2 * weight
        self.a_m2 += np.einsum("ij,ij->j", a_centered, a_centered) + a_delta**2 * weight
        self.za_m2 += np.einsum("ij,ij->j", z_centered, a_centered) + z_delta * a_delta * weight
        self.z_mean += z_delta * n / total
        self.a_mean += a_delta * n / total
        self.count = total
        if self.gram is not None:  # [a, 1]^T [a, 1] without building [a, 1]
            for start in range(0, self.width, _GRAM_BLOCK):
                rows = slice(start, min(start + _GRAM_BLOCK, self.width))
                self.gram[rows, :-1] += a[:, rows].T @ a
            sums = a.sum(axis=0)
            self.gram[:-1, -1] += sums
            self.gram[-1, :-1] += sums
            self.gram[-1, -1] += n

    @property
    def a_std(self):
        """Standard deviation of each unit's activation on the data."""
        return np.sqrt(np.maximum(self.a_m2, 0.0) / max(self.count, 1))

    def slope_intercept_residual(self):
        """Least-squares fit a ~ slope * z + intercept per unit.

        Returns:
            (slope, intercept, residual), residual = sqrt(1 - R^2): 0 for an exactly affine
            unit, 1 for no affine relation. Units with constant z get slope 0, residual 0.
        """
        varying = self.z_m2 > 0
        slope = np.where(varying, self.za_m2 / np.where(varying, self.z_m2, 1.0), 0.0)
        explained = np.where(varying & (self.a_m2 > 0), slope * self.za_m2 / np.where(self.a_m2 > 0, self.a_m2, 1.0), 1.0)
        residual = np.sqrt(np.clip(1.0 - explained, 0.0, 1.0))
        return slope, self.a_mean - slope * self.z_mean, residual

    @property
    def active_fraction(self):
        """Fraction of samples on which each unit's pre-activation is positive."""
        return self.positive / max(self.count, 1)


@dataclasses.dataclass
class Stats:
    """Statistics of every hidden layer, by layer name, and the number of samples seen."""

    layers: dict
    samples: int = 0


def probe_model(graph, count=None):
    """A Keras model that outputs [z_0, a_0, z_1, a_1, ...] (pre-activations and
    activations) of the first `count` Dense layers of `graph` (default: the hidden ones)."""
    count = len(graph.layers) - 1 if count is None else count
    inputs = keras.Input(shape=graph.input.shape, dtype=graph.input.dtype)
    hidden = inputs
    for config in graph.leading:
        hidden = keras.layers.deserialize(config)(hidden)
    outputs = []
    for layer in graph.layers[:count]:
        dtype = layer.config.get("dtype")  # a float64 model stays float64
        dense = keras.layers.Dense(layer.width, use_bias=layer.bias is not None, dtype=dtype)
        z = dense(hidden)
        dense.set_weights([layer.kernel] + ([] if layer.bias is None else [layer.bias]))
        hidden = z
        for name in layer.activations:
            hidden = keras.layers.Activation(name, dtype=dtype)(hidden)
        outputs += [z, hidden]
    return keras.Model(inputs, outputs)


def refresh_probe(probe, graph):
    """Loads the current weights of `graph` into a probe built by `probe_model` for the
    same shapes (cheaper than building a new one, e.g. once per epoch)."""
    dense = [layer for layer in probe.layers if isinstance(layer, keras.layers.Dense)]
    for keras_layer, layer in zip(dense, graph.layers):
        keras_layer.set_weights([layer.kernel] + ([] if layer.bias is None else [layer.bias]))
    return probe


def collect(graph, data, batch_size=256, gram=True, on_batch=None, probe=None, gram_budget=GRAM_BUDGET):
    """Runs the one pass of statistics.

    Args:
        graph: the `Graph` (from `read_model`).
        data: an array, a tf.data.Dataset or an iterable of batches (see `data.batches`).
        batch_size: rows per batch when `data` is an array.
        gram: also accumulate each layer's Gram matrix ((width + 1)^2 float64 values).
        on_batch: called with the number of samples of each batch (for progress bars).
        probe: a `probe_model(graph)` to reuse (see `refresh_probe`), or anything with its
            `predict_on_batch` (e.g. `monitoring.GraphProbe`); default: a new one.
        gram_budget: bytes the Grams may take together (see `check_gram_memory`).

    Returns:
        `Stats` for the hidden layers of `graph`.

    Raises:
        InputError: unusable data, or Grams above `gram_budget`.
    """
    hidden = graph.layers[:-1]
    if gram:
        check_gram_memory(hidden, gram_budget)
    stats = Stats({
        layer.name: LayerStats(layer.width, np.zeros((layer.width + 1,) * 2) if gram else None)
        for layer in hidden
    })
    if probe is None and hidden:
        probe = probe_model(graph)
    with one_blas_thread():
        _accumulate(stats, probe, hidden, graph, data, batch_size, on_batch)
    if stats.samples == 0:
        raise InputError("data holds no samples; pass at least one input row")
    return stats


@functools.cache
def _threadpools():
    return threadpoolctl.ThreadpoolController()  # finding the libraries takes ~4 ms: once


def one_blas_thread():
    """Limits NumPy's BLAS to one thread: the per-batch products are small, and with more
    threads each one waits for every core, which stalls when another process holds one
    (measured in benchmarks/RESULTS.md)."""
    return _threadpools().limit(limits=1, user_api="blas")


def _accumulate(stats, probe, hidden, graph, data, batch_size, on_batch):
    for batch in batches(data, batch_size):
        batch = check_inputs(batch, graph.input)
        if probe is not None:
            outputs = probe.predict_on_batch(batch)
            for index, layer in enumerate(hidden):
                z, a = outputs[2 * index], outputs[2 * index + 1]
                stats.layers[layer.name].update(z.reshape(-1, layer.width), a.reshape(-1, layer.width))
        stats.samples += len(batch)
        if on_batch is not None:
            on_batch(len(batch))
