"""Verified exports: write a model in a deployment format, load it back, compare outputs.

Every format is read back by its own runtime before the file is renamed into place:
.keras and .h5 by Keras, a SavedModel by `tf.saved_model.load` (serving signature),
.tflite by `tf.lite.Interpreter`, tf_keras formats by tf_keras (in a child process), .onnx
by onnxruntime. The largest absolute difference from the Keras model's outputs on the
check inputs must stay within a tolerance relative to the output scale:

    float32 formats   1e-4 x output scale, or 10 x the outputs' change under a one-rounding-step
                      change of the inputs, whichever is larger (`verify.default_atol`); or --atol
    --quantize float16   1e-2 x output scale
    --quantize int8      1e-1 x output scale (weights and activations in 8 bits, calibrated
                         on the representative data)

Otherwise `VerificationError` (exit 3) and nothing is written.

Example:
    >>> figures = export_model(pruned, "out/model.tflite", x, quantize="float16")
    >>> figures["export_max_abs_diff"] <= figures["export_atol"]
    True
"""


import keras
import numpy as np

from keras_embed.errors import InputError, VerificationError
from keras_embed.files.data import take_rows
from keras_embed.files.load import load_model
from keras_embed.files.save import check_io_format, output_format, save_model, write_tflite
from keras_embed.verify import default_atol, output_rows, predict, rounding_step

QUANTIZATIONS = ("float16", "int8")
RELATIVE_TOLERANCES = {"float16": 1e-2, "int8": 1e-1}
CHECK_ROWS = 1024  # the export is compared on at most this many rows of the check inputs



def check_export_options(format, quantize, has_data):
    """Refuses a quantization of another format than TFLite, and int8 without data.

    Example:
        >>> check_export_options("keras", "int8", True)
        InputError: --quantize int8 applies to .tflite output only, as float16 or int8
    """
    if quantize is not None and (format != "tflite" or quantize not in QUANTIZATIONS):
        raise InputError(f"--quantize {quantize} applies to .tflite output only, as float16 or int8")
    if quantize == "int8" and not has_data:
        raise InputError("--quantize int8 needs representative inputs: pass --data or --dataset")




def _in_order(outputs):
    """The serving outputs of a model of several outputs (output_0, output_1, ...) as `verify.output_rows` puts them."""
    return output_rows([outputs[f"output_{index}"] for index in range(len(outputs))])


def _tflite_outputs(path, x):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    if isinstance(x, dict) or len(interpreter.get_output_details()) > 1:  # by name, through the signature
        runner = interpreter.get_signature_runner()
        if not isinstance(x, dict):
            x = {interpreter.get_signature_list()["serving_default"]["inputs"][0]: x}
        return _in_order(runner(**x))
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(source["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], x.astype(source["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(target["index"])


def _savedmodel_outputs(path, x):
    import tensorflow as tf

    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    if isinstance(x, dict):
        outputs = signature(**{name: tf.constant(values) for name, values in x.items()})
    else:
        outputs = signature(tf.constant(x))
    return _in_order(outputs) if len(outputs) > 1 else next(iter(outputs.values())).numpy()


def _onnx_outputs(path, x):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _keras_outputs(path, x):
    return predict(load_model(path), x)


def _tf_keras_outputs(path, x):
    from keras_embed.files.tf_keras_bridge import predict_tf_keras

    return predict_tf_keras(path, x)


_READERS = {"keras": _keras_outputs, "h5": _keras_outputs, "savedmodel": _savedmodel_outputs,
            "tflite": _tflite_outputs, "onnx": _onnx_outputs}


def _writer(format, quantize, representative, tf_keras):
    if tf_keras:
        from keras_embed.files.tf_keras_bridge import write_tf_keras

        return lambda model, path: write_tf_keras(model, path, format)
    if format == "tflite" and quantize is not None:
        return lambda model, path: write_tflite(model, path, quantize, representative)
    return None  # the format's own writer in io


def _as_input_dtypes(model, x):
    """`x` (an array, or a dict by input name) in the dtypes of the model's inputs (float32
    features, int32 tokens), as the written file's signature takes them."""
    dtypes = {tensor.name: keras.backend.standardize_dtype(tensor.dtype) for tensor in model.inputs}
    if isinstance(x, dict):
        return {name: values.astype(dtypes[name]) for name, values in x.items()}
    return x.astype(next(iter(dtypes.values())))


def export_model(model, path, x, format=None, quantize=None, representative=None, atol=None, force=False,
                 tf_keras=False):
    """Writes `model` to `path` atomically after checking the written file's outputs.

    Args:
        model: the Keras model.
        path: target; its format from the ending or `format` (see `save.output_format`).
        x: check inputs (an array, or a dict of arrays by input name for a model of several
            inputs; see `save.check_io_format`); the first `CHECK_ROWS` rows are used.
        quantize: TFLite only: None, 'float16' or 'int8'.
        representative: int8 calibration inputs (an array).
        atol: float32 tolerance instead of 1e-4 x output scale.
        force: write even when the check fails (the figures say so).
        tf_keras: write with tf_keras (the `--keep-format` of tf_keras inputs; h5 or savedmodel).

    Returns:
        dict: export_format, export_quantize, export_max_abs_diff, export_atol, export_verified.

    Raises:
        InputError: quantization asked of another format, int8 without representative data.
        VerificationError: the written file's outputs differ by more than the tolerance.
    """
    format = output_format(path, format)
    check_export_options(format, quantize, representative is not None)
    check_io_format(model, format, tf_keras, quantize)
    x = _as_input_dtypes(model, take_rows(x, slice(0, CHECK_ROWS)))
    expected = predict(model, x)
    scale = float(np.abs(expected).max(initial=0.0)) or 1.0
    if quantize is not None:
        tolerance = RELATIVE_TOLERANCES[quantize] * scale
    elif atol is not None:
        tolerance = atol
    else:
        tolerance = default_atol(scale, float(np.abs(predict(model, rounding_step(x)) - expected).max(initial=0.0)))
    figures = {"export_format": "tf_keras " + format if tf_keras else format, "export_quantize": quantize}
    read = _tf_keras_outputs if tf_keras else _READERS[format]

    def check(written):
        actual = np.asarray(read(written, x), dtype=np.float64).reshape(expected.shape)
        diff = float(np.abs(actual - expected).max(initial=0.0)) if np.all(np.isfinite(actual)) else np.inf
        figures.update(export_max_abs_diff=diff, export_atol=float(tolerance), export_verified=diff <= tolerance)
        if not diff <= tolerance and not force:
            raise VerificationError(diff, tolerance)

    save_model(model, path, format, writer=_writer(format, quantize, representative, tf_keras), check=check)
    return figures
