"""Which channels of a producer compute an affine function of their pre-activation on the data.

A channel is *linear on the data* when a = slope * z + intercept for every calibration
sample and position, a being what the layer reading it sees (after the producer's
activation and the elementwise layers that follow). For piecewise-linear functions (relu,
leaky_relu, relu6, linear, ...) this is exact: no kink lies strictly inside [min z, max z].
For others it holds within `lin_tol`: the affine-fit residual sqrt(1 - R^2) is at most
`lin_tol`. A producer whose every channel is linear is *linearized* (the depth paper's
layer linearization) and can be composed into the layer reading it.

Example:
    >>> regime = producer_regimes(graph, stats)["hidden"]
    >>> regime.linear.mean()          # fraction of channels in a linear regime
    1.0
"""

import dataclasses

import numpy as np

DEFAULT_LIN_TOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Regimes:
    """Per channel of one producer: linear on the data, its affine fit, constant value.

    Attributes:
        linear: bool per channel, affine on the data.
        slope, intercept: the affine map where linear.
        constant: bool per channel, the value is the same on every sample.
        value: the value's mean (the constant, where constant).
    """

    linear: np.ndarray
    slope: np.ndarray
    intercept: np.ndarray
    constant: np.ndarray
    value: np.ndarray

    def subset(self, channels):
        """The regimes of the given channels only (after others were removed)."""
        return Regimes(*(getattr(self, field.name)[list(channels)] for field in dataclasses.fields(self)))


def chain_function(graph, producer):
    """The `Elementwise` from `producer`'s pre-activation to what its reader sees, or None
    when a function on the way mixes channels."""
    function = producer.entry.function(producer)
    for node in graph.elementwise_after(producer):
        following = node.entry.function(node)
        if function is None or following is None:
            return None
        function = function.then(following)
    return function


def moment_producers(graph):
    """Names of the producers whose regimes need the second moments of their statistics
    (a smooth function on the way: the affine fit decides); the others need extremes only."""
    return {node.name for node in graph.producers
            if (function := chain_function(graph, node)) is not None and function.kinks is None}


def unit_regimes(function, width, layer_stats=None, lin_tol=DEFAULT_LIN_TOL, rtol=1e-6):
    """Classifies `width` channels computing `function` (an `Elementwise`, None for a
    coupling one) from their `LayerStats`; without statistics only an affine function is linear."""
    if layer_stats is None or function is None:
        linear = np.full(width, function is not None and function.kinks == ())
        return Regimes(linear, np.ones(width), np.zeros(width), np.zeros(width, bool), np.zeros(width))
    low, high = layer_stats.z_min, layer_stats.z_max
    scale = max(float(np.abs([layer_stats.a_min, layer_stats.a_max]).max(initial=0.0)), 1e-30)
    constant = layer_stats.a_max - layer_stats.a_min <= rtol * scale
    value = np.where(constant & (layer_stats.a_max == 0), 0.0, layer_stats.a_mean)
    if function.kinks is None:
        slope, intercept, residual = layer_stats.slope_intercept_residual()
        linear = residual <= lin_tol
    else:  # exact: the line through the two extreme points of the piece
        linear = np.ones(width, dtype=bool)
        for kink in function.kinks:
            linear &= ~((low < kink) & (kink < high))
        ends = function(np.stack([low, high]))
        span = high - low
        slope = np.where(span > 0, (ends[1] - ends[0]) / np.where(span > 0, span, 1.0), 0.0)
        intercept = ends[0] - slope * low
    return Regimes(linear | constant, np.where(constant, 0.0, slope), np.where(constant, value, intercept), constant, value)


def producer_regimes(graph, stats=None, lin_tol=DEFAULT_LIN_TOL, rtol=1e-6):
    """`Regimes` of every producer, by name, from `producer_requests` statistics (without
    `stats`: only producers computing an affine function are linear)."""
    return {node.name: unit_regimes(chain_function(graph, node), node.width,
                                    None if stats is None else stats.get(node.name), lin_tol, rtol)
            for node in graph.producers}
