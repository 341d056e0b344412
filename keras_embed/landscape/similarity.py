"""Linear CKA (Kornblith et al., 2019): how alike two models' representations of the same rows are.

CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc and Yc the column-centred
features (rows: samples; the biased HSIC estimate, as the taxonomy paper's code). It is 1
for X and any XQ with Q orthogonal (a permutation of units), and invariant to isotropic
scaling.

Example:
    >>> linear_cka(x, x[:, ::-1])
    1.0
"""

import keras
import numpy as np


def linear_cka(x, y):
    """Linear CKA of two (rows, features) arrays of the same rows (features flattened)."""
    x, y = (np.asarray(values, dtype=np.float64).reshape(len(values), -1) for values in (x, y))
    if len(x) != len(y):
        raise ValueError(f"CKA compares the same rows; got {len(x)} and {len(y)}")
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    scale = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / scale) if scale > 0 else 0.0


def features(model, x, layers=(), batch_size=256):
    """{"output": the model's outputs, name: each named layer's output} on `x`.

    Raises:
        ValueError: a layer name the model does not have.
    """
    names = {layer.name for layer in model.layers}
    missing = [name for name in layers if name not in names]
    if missing:
        raise ValueError(f"no layer {missing[0]!r} in model '{model.name}'; layers are: {', '.join(sorted(names))}")
    probe = keras.Model(model.inputs, [model.outputs[0]] + [model.get_layer(name).output for name in layers])
    values = probe.predict(x, batch_size=batch_size, verbose=0)
    values = values if isinstance(values, list) else [values]
    return dict(zip(["output", *layers], values))
