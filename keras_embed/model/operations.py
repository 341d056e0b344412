"""Keras ops called on symbolic tensors in a functional model, as the stock layers computing the same.

`keras.applications.MobileNetV3Small` writes its hard sigmoid as `ReLU(6.)(x + 3.0) * (1.0 / 6.0)`:
the functional graph then holds op nodes (`keras.src.ops.numpy.Add`, `Multiply`), not layers.
A tensor and a number become a `Rescaling` (x * scale + offset, exactly: adding 0 or
multiplying by 1 changes no float), two tensors the merge layer of the same name.

Example:
    >>> as_layer(add_op, [{"class_name": "__keras_tensor__", ...}, 3.0])   # its serialized arguments
    ('Rescaling', {'scale': 1.0, 'offset': 3.0})
"""

import numbers

from keras_embed.errors import UnsupportedLayerError

# (scale, offset) of `x OP c` and of `c OP x` for a number c
_AFFINE = {
    "Add": (lambda c: (1.0, c), lambda c: (1.0, c)),
    "Subtract": (lambda c: (1.0, -c), lambda c: (-1.0, c)),
    "Multiply": (lambda c: (c, 0.0), lambda c: (c, 0.0)),
    "Divide": (lambda c: (1.0 / c, 0.0), None),
    "TrueDivide": (lambda c: (1.0 / c, 0.0), None),
}
_MERGES = {"Add": "Add", "Subtract": "Subtract", "Multiply": "Multiply"}


def _refuse(op, why):
    raise UnsupportedLayerError(f"op '{op.name}' ({type(op).__name__}) {why}; only +, -, * of two tensors and "
                                "+, -, *, / by a number are supported outside layers")


def _is_tensor(arg):
    return isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__"


def as_layer(op, args):
    """(Keras layer class name, config without the name) of the stock layer computing `op`
    on `args`, its arguments as the functional config serializes them.

    Raises:
        UnsupportedLayerError: an op that is none of these, naming it.
    """
    kind = type(op).__name__
    tensors = [_is_tensor(arg) for arg in args]
    if len(args) != 2 or kind not in _AFFINE:
        _refuse(op, "is not an elementwise arithmetic op")
    if all(tensors):
        if kind not in _MERGES:
            _refuse(op, "divides one tensor by another")
        return _MERGES[kind], {}
    number = args[tensors.index(False)]
    if not isinstance(number, numbers.Real) or isinstance(number, bool):
        _refuse(op, "reads a constant that is not a number")
    affine = _AFFINE[kind][0 if tensors[0] else 1]
    if affine is None:
        _refuse(op, "divides a number by a tensor")
    scale, offset = affine(float(number))
    return "Rescaling", {"scale": scale, "offset": offset}
