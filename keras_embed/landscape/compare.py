"""The four taxonomy metrics for several trained models of one architecture, and every pair.

Per model: loss and error on the data, the Hessian's top eigenvalue (Lanczos) and trace
(Hutchinson) on `hessian_rows` seeded rows in float64 (`keras_embed.hessian`; the paper:
200 training rows). Per pair: linear CKA of the outputs and of each named layer
(`similarity`), the L2 distance of the weights, the linear path and the trained Bézier
curve with mc and the linear barrier (`paths`); with `align`, the distance and both paths
again after matching the second model's units to the first's (`align`).

Example:
    >>> figures = compare_models([a, b, c], x, y, "sparse_categorical_crossentropy", from_logits=True)
    >>> [pair["linear"]["mc"] for pair in figures["pairs"]]
    [-12.0, -9.5, -14.1]
"""

import itertools

import numpy as np

from keras_embed.errors import InputError
from keras_embed.hessian import EmpiricalRisk, cast_model, check_targets, extreme_eigenvalues, get_loss, hutchinson_trace
from keras_embed.landscape.align import align
from keras_embed.landscape.paths import (POINTS, Evaluator, barrier, bezier_path, check_same_architecture, distance,
                                         linear_path, mode_connectivity, train_bend, values)
from keras_embed.landscape.similarity import features, linear_cka


def curvature(model, x, y, loss, rows=200, trace_samples=50, seed=0):
    """{"hessian_top", "hessian_trace", "hessian_trace_error", "hessian_rows"} of the mean loss
    on `rows` seeded rows of (x, y)."""
    chosen = np.sort(np.random.default_rng(seed).permutation(len(x))[:rows])
    risk = EmpiricalRisk(cast_model(model), x[chosen], y[chosen], loss)
    largest, _ = extreme_eigenvalues(risk, k=1, seed=seed)
    trace, error = hutchinson_trace(risk, trace_samples, seed)
    return {"hessian_top": float(largest[-1]) if len(largest) else None, "hessian_trace": trace,
            "hessian_trace_error": error, "hessian_rows": len(chosen)}


def _paths(first, second, x, y, loss, points, curve_epochs, seed, batch_size):
    """distance, linear and Bézier paths (points, mc, barrier) between two models of one architecture."""
    evaluator = Evaluator(first, x, y, loss, batch_size)
    ends = values(first), values(second)
    bend = train_bend(first, *ends, x, y, loss, curve_epochs, seed=seed)
    linear, curve = linear_path(evaluator, *ends, points), bezier_path(evaluator, ends[0], bend, ends[1], points)
    on = "error" if linear[0]["error"] is not None else "loss"
    return {"distance": distance(*ends),
            "linear": {"points": linear, "mc": mode_connectivity([p[on] for p in linear]),
                       "barrier": barrier([p["loss"] for p in linear])},
            "bezier": {"points": curve, "mc": mode_connectivity([p[on] for p in curve]),
                       "barrier": barrier([p["loss"] for p in curve])}}


def compare_models(models, x, y, loss, from_logits=False, layers=(), align_units=False, points=POINTS,
                   curve_epochs=50, hessian_rows=200, trace_samples=50, seed=0, batch_size=256):
    """Every metric of the module docstring, as a JSON-ready dict.

    Args:
        models: two or more Keras models of one architecture.
        x, y: the data (the paper: training data) every metric is measured on.
        loss: a Keras loss name (`hessian.get_loss`).
        layers: names of hidden layers whose outputs CKA compares too.
        align_units: also the aligned distance and paths.
        points: values of t evaluated on each path, ends included.
        curve_epochs: epochs of training the Bézier bend.

    Returns:
        {"models": [per model], "pairs": [per pair: first, second, cka_output, cka (by
        layer), distance, linear, bezier, and aligned (distance, linear, bezier, matched)],
        "mc_on": "error" or "loss", and the settings}.
    """
    if len(models) < 2:
        raise InputError(f"the landscape compares two or more models; got {len(models)}")
    if points < 3:
        raise InputError(f"--points must be at least 3 (the ends and a middle). Received: {points}")
    for other in models[1:]:
        check_same_architecture(models[0], other)
    loss_function = get_loss(loss, from_logits)
    y = check_targets(y, x, models[0], loss_function)
    evaluations = [Evaluator(model, x, y, loss_function, batch_size).at(values(model)) for model in models]
    seen = [features(model, x, layers, batch_size) for model in models]
    rows = [{"name": model.name, **evaluation, **curvature(model, x, y, loss_function, hessian_rows, trace_samples, seed)}
            for model, evaluation in zip(models, evaluations)]
    pairs = []
    for i, j in itertools.combinations(range(len(models)), 2):
        pair = {"first": i, "second": j, "cka_output": linear_cka(seen[i]["output"], seen[j]["output"]),
                "cka": {name: linear_cka(seen[i][name], seen[j][name]) for name in layers},
                **_paths(models[i], models[j], x, y, loss_function, points, curve_epochs, seed, batch_size)}
        if align_units:
            first, second, matched = align(models[i], models[j], x, batch_size)
            pair["aligned"] = {**_paths(first, second, x, y, loss_function, points, curve_epochs, seed, batch_size),
                               "matched": matched}
        pairs.append(pair)
    return {"models": rows, "pairs": pairs, "mc_on": "error" if evaluations[0]["error"] is not None else "loss",
            "settings": {"loss": loss, "from_logits": from_logits, "points": points, "curve_epochs": curve_epochs,
                         "hessian_rows": min(hessian_rows, len(x)), "trace_samples": trace_samples, "seed": seed,
                         "rows": len(x), "align": align_units, "layers": list(layers)}}
