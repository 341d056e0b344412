"""keras-embed: find and remove the redundancy the Embedding Principle predicts.

Importing the package is cheap; TensorFlow loads on first use of a function.

Example:
    >>> import keras_embed
    >>> pruned, report = keras_embed.prune(model)
    >>> [layer["width_after"] for layer in report.to_dict()["layers"]]
    [16, 12, 10]
"""

import importlib

_EXPORTS = {
    "read_model": "keras_embed.model.read",
    "build_model": "keras_embed.model.build",
    "Graph": "keras_embed.model.graph",
    "collect": "keras_embed.measure.statistics",
    "find_redundancy": "keras_embed.find.weight_rules",
    "apply_plan": "keras_embed.edit.surgery",
    "widen": "keras_embed.edit.operators",
    "add_null": "keras_embed.edit.operators",
    "add_constant": "keras_embed.edit.operators",
    "rescale": "keras_embed.edit.operators",
    "permute": "keras_embed.edit.operators",
    "deepen": "keras_embed.edit.operators",
    "plan_exact": "keras_embed.pipeline",
    "prune": "keras_embed.pipeline",
    "analyze": "keras_embed.pipeline",
    "embed": "keras_embed.pipeline",
    "assert_outputs_preserved": "keras_embed.verify",
    "load_model": "keras_embed.files.load",
    "save_model": "keras_embed.files.save",
    "EmpiricalRisk": "keras_embed.hessian",
    "analyze_hessian": "keras_embed.hessian",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'keras_embed' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
