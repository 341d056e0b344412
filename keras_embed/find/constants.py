"""Which positions of each tensor hold the same value on every input.

From the weights alone (`weight_constants`): a producer channel whose kernel slice is zero
outputs its activated bias, and every layer passes known values on as its registry entry
says (BatchNormalization scales them, zero padding keeps only zeros, Add sums...). From
data (`data_constants`): a position whose values on the calibration data all agree.
Values are NaN where they depend on the input.

Example:
    >>> constants = weight_constants(graph)
    >>> constants["hidden"][:3]                  # the second channel is constant
    array([nan, 0.76, nan])
"""

import numpy as np


def weight_constants(graph, rtol=1e-6):
    """Node name -> per position of its output, its value on every input (NaN where it
    depends on the input), from the weights; weights within `rtol` of their layer's
    largest count as zero."""
    values = {}
    for node in graph.nodes:
        if node.role == "input":
            values[node.name] = np.full(node.width, np.nan)
        else:
            values[node.name] = node.entry.propagate(node, [values[source] for source in node.inputs], rtol)
    return values


def data_constants(stats, rtol=1e-6):
    """Tensor name -> per position, the value it holds on every sample of the data (NaN
    where it varies by more than `rtol` times its largest magnitude), from `LayerStats`
    of its values."""
    constants = {}
    for name, layer_stats in stats.items():
        scale = max(float(np.abs([layer_stats.a_min, layer_stats.a_max]).max(initial=0.0)), 1e-30)
        constant = layer_stats.a_max - layer_stats.a_min <= rtol * scale
        value = np.where(layer_stats.a_max == 0, 0.0, layer_stats.a_mean)
        constants[name] = np.where(constant, value, np.nan)
    return constants
