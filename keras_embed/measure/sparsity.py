"""How much of a sparse model's zeros became real, smaller dense layers.

Magnitude pruning (tensorflow-model-optimization) zeroes single weights, which ordinary
dense kernels still store and multiply. Pruning removes the units whose incoming or
outgoing weights are all zero; these figures say how much of the sparsity that realized.

Example:
    >>> sparsity_figures(tfmot_model, pruned)
    {'zero_kernel_weights_before': 5120, 'zero_kernel_weights_after': 3584,
     'kernel_weights_before': 10240, 'kernel_weights_after': 7168, 'params_removed': 3116,
     'zeros_realized': 0.3}
"""

import keras
import numpy as np


def _kernels(model):
    return [keras.ops.convert_to_numpy(layer.kernel) for layer in model.layers if hasattr(layer, "kernel")]


def sparsity_figures(before, after):
    """Zero kernel weights before and after, params removed, and zeros_realized: the
    fraction of the zero kernel weights that are gone from `after` (None without zeros)."""
    kernels_before, kernels_after = _kernels(before), _kernels(after)
    zeros_before = int(sum(kernel.size - np.count_nonzero(kernel) for kernel in kernels_before))
    zeros_after = int(sum(kernel.size - np.count_nonzero(kernel) for kernel in kernels_after))
    return {
        "zero_kernel_weights_before": zeros_before,
        "zero_kernel_weights_after": zeros_after,
        "kernel_weights_before": int(sum(kernel.size for kernel in kernels_before)),
        "kernel_weights_after": int(sum(kernel.size for kernel in kernels_after)),
        "params_removed": int(before.count_params() - after.count_params()),
        "zeros_realized": round((zeros_before - zeros_after) / zeros_before, 4) if zeros_before else None,
    }
