"""Layers TensorFlow writes as several ops, read back step by step: LayerNormalization and gelu.

Keras' LayerNormalization over the last axis exports as `tf.nn.moments` and an affine
map, and the exact gelu as `0.5 x erfc(-x / sqrt 2)`:

    mean = Mean(x, -1)             Moment
    SquaredDifference(x, mean)     SquaredDeviation, its Mean a Variance (+ epsilon)
    Rsqrt(variance) * gamma        InverseDeviation
    x * inverse                    Normalized
    -mean * inverse + beta         Centering
    normalized + centering         LayerNormalization(epsilon), weights gamma, beta

    Erfc(x * -1/sqrt 2) * (0.5 x)  Activation gelu (folded into the layer before it)

Each step is a pseudo-layer reading `x` (`UNFINISHED`: only the next step may read it), so a
step that does not follow is refused naming the op, and nothing half-read is built.

Example:
    >>> step(Op(mean_op, [conv], [None, np.array([-1])], graph)).kind
    'Moment'
"""

import dataclasses

import numpy as np

_SQRT_HALF = np.sqrt(0.5)


@dataclasses.dataclass(frozen=True)
class Unfinished:
    """A layer kind that stands for the first ops of a pattern: only `readers` may read it,
    and only `next` what reads it (empty: anything)."""

    pattern: str
    readers: tuple
    next: tuple = ()


_NORM = "LayerNormalization (tf.nn.moments, Rsqrt, Mul, AddV2)"
_ADD = ("AddV2", "Add")
UNFINISHED = {
    "Moment": Unfinished(_NORM, ("StopGradient", "SquaredDifference", "Neg", "Mul", "Identity")),
    "SquaredDeviation": Unfinished(_NORM, ("Mean",)),
    "Variance": Unfinished(_NORM, (*_ADD, "Rsqrt")),
    "InverseDeviation": Unfinished(_NORM, ("Mul",)),
    "Normalized": Unfinished(_NORM, _ADD),
    "Centering": Unfinished(_NORM, _ADD),
    "Erfc": Unfinished("gelu (Erfc, Mul)", ("Mul",)),
}
OPS = ("Erfc", "Rsqrt", "SquaredDifference", "StopGradient")  # the ops only these patterns read


def _last_axis_mean(op):
    if op.kind != "Mean" or op.constants[1] is None or not op.attr("keep_dims"):
        return False
    rank = len(op.op.inputs[0].shape)
    return [int(axis) % rank for axis in np.atleast_1d(op.constants[1])] == [rank - 1]


def applies(op):
    """Whether `op` is a step of these patterns (or reads one)."""
    return op.kind in OPS or any(layer.kind in UNFINISHED for layer in op.data) or _last_axis_mean(op)


def _constant(op):
    """The constant operand as a flat array."""
    return np.reshape(next(value for value in op.constants if value is not None), -1)


def _pair(op, kind):
    """(the layer of `kind`, the other layer) among the two data operands, or (None, None)."""
    first, second = op.data if len(op.data) == 2 else (None, None)
    if first is not None and first.kind == kind:
        return first, second
    if second is not None and second.kind == kind:
        return second, first
    return None, None


def _same_source(op, *layers):
    if len({id(layer.inputs[0]) for layer in layers}) != 1:
        raise op.refuse(f"whose {_NORM} steps read different tensors")


def _mean(op):
    data = op.data[0]
    if data.kind == "SquaredDeviation":
        return op.graph.add("Variance", {"epsilon": 0.0}, (), data.inputs)
    return op.graph.add("Moment", {"sign": 1.0}, (), [data])


def _squared_difference(op):
    moment, other = _pair(op, "Moment")
    if moment is None or moment.inputs[0] is not other or moment.config["sign"] != 1.0:
        raise op.refuse("other than of a tensor and its mean")
    return op.graph.add("SquaredDeviation", {}, (), [other])


def _add(op):
    normalized, centering = _pair(op, "Normalized")
    if normalized is not None and centering.kind == "Centering":
        _same_source(op, normalized, centering)
        if normalized.config != centering.config or not np.array_equal(normalized.weights[0], centering.weights[0]):
            raise op.refuse(f"joining two different {_NORM}s")
        source = normalized.inputs[0]
        source.readers -= 2  # its mean, squared deviation and product become the one layer's read
        gamma = np.broadcast_to(normalized.weights[0], (source.width,))
        beta = np.broadcast_to(centering.weights[1], (source.width,))
        return op.graph.add("LayerNormalization", {"axis": -1, **normalized.config}, [gamma, beta], [source])
    layer = op.data[0]
    if len(op.data) != 1 or layer.kind not in ("Variance", "Centering"):
        raise op.refuse(f"inside a {_NORM}")
    if layer.kind == "Variance":
        return op.graph.add("Variance", {"epsilon": layer.config["epsilon"] + float(_constant(op)[0])}, (),
                            layer.inputs)
    gamma, beta = layer.weights
    return op.graph.add("Centering", layer.config, [gamma, beta + _constant(op)], layer.inputs)


def _mul(op):
    inverse, other = _pair(op, "InverseDeviation")
    if inverse is not None and other.kind == "Moment" and other.config["sign"] == -1.0:
        _same_source(op, inverse, other)
        return op.graph.add("Centering", inverse.config, [inverse.weights[0], 0.0], inverse.inputs)
    if inverse is not None and inverse.inputs[0] is other:
        return op.graph.add("Normalized", inverse.config, inverse.weights, inverse.inputs)
    erfc, half = _pair(op, "Erfc")
    if erfc is not None:
        return _gelu(op, erfc, half)
    if len(op.data) == 1 and op.data[0].kind == "InverseDeviation":
        inverse = op.data[0]
        return op.graph.add("InverseDeviation", inverse.config, [inverse.weights[0] * _constant(op)], inverse.inputs)
    raise op.refuse(f"inside a {_NORM} or gelu")


def _is_affine(layer, scale):
    return (layer.kind == "Affine" and layer.readers == 1 and np.allclose(layer.weights[0], scale, rtol=1e-6)
            and np.allclose(layer.weights[1], 0.0))


def _gelu(op, erfc, half):
    scaled = erfc.inputs[0]
    if not (_is_affine(scaled, -_SQRT_HALF) and half is not None and _is_affine(half, 0.5)
            and scaled.inputs[0] is half.inputs[0]):
        raise op.refuse("that is not the exact gelu, 0.5 x erfc(-x / sqrt 2)")
    source = half.inputs[0]
    source.readers -= 1  # read by both halves, now by the activation only
    return op.graph.activation(source, "gelu")


def step(op):
    """The pseudo-layer (or the finished layer) of a step of these patterns."""
    if op.kind == "Mean":
        return _mean(op)
    if op.kind in ("StopGradient", "Identity") and len(op.data) == 1 and op.data[0].kind == "Moment":
        return op.data[0]
    if op.kind == "SquaredDifference":
        return _squared_difference(op)
    if op.kind == "Rsqrt" and op.data and op.data[0].kind == "Variance":
        variance = op.data[0]
        return op.graph.add("InverseDeviation", {"epsilon": variance.config["epsilon"]}, [np.ones(1)],
                            variance.inputs)
    if op.kind == "Erfc" and len(op.data) == 1:
        return op.graph.add("Erfc", {}, (), op.data)
    if op.kind == "Neg" and op.data[0].kind == "Moment":
        return op.graph.add("Moment", {"sign": -op.data[0].config["sign"]}, (), op.data[0].inputs)
    if op.kind in _ADD:
        return _add(op)
    if op.kind == "Mul":
        return _mul(op)
    raise op.refuse(f"inside a {_NORM} or gelu")
