"""Which hidden units compute an affine function of their pre-activation on the data.

A unit is *linear on the data* when sigma(z) = slope * z + intercept for every
calibration sample. For piecewise-linear activations (relu, leaky_relu, relu6, linear)
this is exact: no kink lies strictly inside [min z, max z]. For others it holds within
`lin_tol`: the affine-fit residual sqrt(1 - R^2) is at most `lin_tol`. A layer whose
every unit is linear is *linearized* (the depth paper's layer linearization) and can be
composed into the next layer.

Example:
    >>> regime = unit_regimes(graph.layers[0], stats.layers[graph.layers[0].name])
    >>> regime.linear.mean()          # fraction of units in a linear regime
    1.0
"""

import dataclasses

import numpy as np

from keras_embed import activations

_KINKS = {"linear": (), "relu": (0.0,), "leaky_relu": (0.0,), "relu6": (0.0, 6.0)}
DEFAULT_LIN_TOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Regimes:
    """Per unit of one layer: linear on the data, its affine fit, constant value.

    Attributes:
        linear: bool per unit, affine on the data.
        slope, intercept: the affine map where linear.
        constant: bool per unit, the activation is the same on every sample.
        value: the activation's mean (the constant, where constant).
    """

    linear: np.ndarray
    slope: np.ndarray
    intercept: np.ndarray
    constant: np.ndarray
    value: np.ndarray

    def subset(self, units):
        """The regimes of the given units only (after others were removed)."""
        return Regimes(*(getattr(self, field.name)[list(units)] for field in dataclasses.fields(self)))


def _piecewise(chain):
    """The kinks of a piecewise-linear chain, or None when the chain is not one."""
    nonlinear = [name for name in chain if name != "linear"]
    if len(nonlinear) > 1 or (nonlinear and nonlinear[0] not in _KINKS):
        return None
    return _KINKS[nonlinear[0]] if nonlinear else ()


def unit_regimes(layer, layer_stats=None, lin_tol=DEFAULT_LIN_TOL, rtol=1e-6):
    """Classifies the units of a hidden `layer` from its `LayerStats`.

    Without statistics only a layer whose activations are all linear is linear.
    """
    width = layer.width
    kinks = _piecewise(layer.activations)
    if layer_stats is None:
        linear = np.full(width, kinks == ())
        return Regimes(linear, np.ones(width), np.zeros(width), np.zeros(width, bool), np.zeros(width))
    low, high = layer_stats.z_min, layer_stats.z_max
    scale = max(float(np.abs([layer_stats.a_min, layer_stats.a_max]).max(initial=0.0)), 1e-30)
    constant = layer_stats.a_max - layer_stats.a_min <= rtol * scale
    value = np.where(constant & (layer_stats.a_max == 0), 0.0, layer_stats.a_mean)
    if kinks is None:
        slope, intercept, residual = layer_stats.slope_intercept_residual()
        linear = residual <= lin_tol
    else:  # exact: the line through the two extreme points of the piece
        linear = np.ones(width, dtype=bool)
        for kink in kinks:
            linear &= ~((low < kink) & (kink < high))
        ends = activations.evaluate(layer.activations, np.stack([low, high]))
        span = high - low
        slope = np.where(span > 0, (ends[1] - ends[0]) / np.where(span > 0, span, 1.0), 0.0)
        intercept = ends[0] - slope * low
    if not activations.is_elementwise(layer.activations):
        linear = constant = np.zeros(width, dtype=bool)
    return Regimes(linear | constant, np.where(constant, 0.0, slope), np.where(constant, value, intercept), constant, value)
