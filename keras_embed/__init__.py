"""keras-embed: find and remove the redundancy the Embedding Principle predicts.

Importing the package is cheap; TensorFlow loads on first use of a function.

Example:
    >>> import keras_embed
    >>> pruned, report = keras_embed.prune(model)
    >>> [layer["width_after"] for layer in report.to_dict()["layers"]]
    [16, 10]
"""

import importlib

_EXPORTS = {
    "read_model": "keras_embed.read",
    "build_model": "keras_embed.build",
    "Graph": "keras_embed.graph",
    "find_redundancy": "keras_embed.analysis",
    "plan_exact": "keras_embed.compress",
    "apply_plan": "keras_embed.surgery",
    "widen": "keras_embed.operators",
    "add_null": "keras_embed.operators",
    "permute": "keras_embed.operators",
    "prune": "keras_embed.compress",
    "analyze": "keras_embed.compress",
    "assert_outputs_preserved": "keras_embed.verify",
    "load_model": "keras_embed.io",
    "save_model": "keras_embed.io",
    "EmpiricalRisk": "keras_embed.hessian",
    "analyze_hessian": "keras_embed.hessian",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'keras_embed' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
