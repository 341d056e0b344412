"""Verified exports (`keras_embed.files.export`): every format is written, loaded back by its own
runtime and compared on the check inputs; a failed check writes nothing.

The outputs are compared here once more, independently of the check inside
`export_model`, by loading the written file with the format's runtime.
"""

import json
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from keras_embed.files import export
from keras_embed.errors import InputError, VerificationError
from keras_embed.files.export import RELATIVE_TOLERANCES, export_model
from keras_embed.verify import default_atol, rounding_step
from keras_embed.tools.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(12, activation="relu"),
                              keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    return model


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).normal(size=(256, 6)).astype("float32")


def reload(path, format, x):
    """Outputs of the written file, computed by the format's own runtime."""
    if format in ("keras", "h5"):
        return keras.ops.convert_to_numpy(keras.saving.load_model(path, compile=False)(x))
    if format == "savedmodel":
        return next(iter(tf.saved_model.load(str(path)).signatures["serving_default"](tf.constant(x)).values())).numpy()
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


FORMATS = [("model.keras", "keras", None), ("model.h5", "h5", None), ("export/", "savedmodel", None),
           ("model.tflite", "tflite", None), ("model_f16.tflite", "tflite", "float16"),
           ("model_i8.tflite", "tflite", "int8"), ("model.onnx", "onnx", None)]


@pytest.mark.parametrize("name, format, quantize", FORMATS, ids=[f"{f}-{q}" if q else f for _, f, q in FORMATS])
def test_each_format_round_trips_within_its_tolerance(tmp_path, model, x, name, format, quantize):
    if format == "onnx":
        pytest.importorskip("tf2onnx", reason="the onnx extra is not installed")
    target = str(tmp_path / name) + ("/" if name.endswith("/") else "")  # a SavedModel folder ends in /
    figures = export_model(model, target, x, quantize=quantize, representative=x)
    expected = keras.ops.convert_to_numpy(model(x))
    scale = float(np.abs(expected).max())
    assert figures["export_format"] == format and figures["export_quantize"] == quantize
    if quantize is None:  # 1e-4 x scale, or 10 x the change one rounding step of the inputs makes
        rounding = float(np.abs(keras.ops.convert_to_numpy(model(rounding_step(x))) - expected).max())
        bound = default_atol(scale, rounding)
        assert bound >= 1e-4 * scale
    else:
        bound = RELATIVE_TOLERANCES[quantize] * scale
    assert figures["export_atol"] == pytest.approx(bound)
    assert figures["export_verified"] and figures["export_max_abs_diff"] <= figures["export_atol"]
    diff = np.abs(reload(tmp_path / name, format, x) - expected).max()
    assert diff == pytest.approx(figures["export_max_abs_diff"], abs=1e-6)
    assert diff <= bound
    assert sorted(path.name for path in tmp_path.iterdir()) == [name.rstrip("/")]  # no temporary left


def test_a_failed_check_writes_nothing(tmp_path, model, x, monkeypatch):
    monkeypatch.setitem(export._READERS, "tflite", lambda path, rows: np.zeros((len(rows), 3)))
    with pytest.raises(VerificationError, match="nothing was written"):
        export_model(model, tmp_path / "model.tflite", x)
    assert list(tmp_path.iterdir()) == []
    figures = export_model(model, tmp_path / "model.tflite", x, force=True)
    assert not figures["export_verified"] and (tmp_path / "model.tflite").is_file()


def test_quantize_needs_tflite_and_int8_needs_data(tmp_path, model, x):
    with pytest.raises(InputError, match="applies to .tflite output only"):
        export_model(model, tmp_path / "model.keras", x, quantize="float16")
    with pytest.raises(InputError, match="needs representative inputs"):
        export_model(model, tmp_path / "model.tflite", x, quantize="int8")
    assert list(tmp_path.iterdir()) == []


def test_onnx_without_tf2onnx_names_the_extra(tmp_path, model, x, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # import fails as if not installed
    with pytest.raises(InputError, match=r"keras-embed\[onnx\]"):
        export_model(model, tmp_path / "model.onnx", x)
    assert list(tmp_path.iterdir()) == []


def test_cli_int8_tflite_reports_the_export_difference_and_refuses_int8_without_data(tmp_path, model, x):
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", x)
    runner = CliRunner()
    result = runner.invoke(main, ["prune", str(tmp_path / "model.keras"), "-o", str(tmp_path / "small.tflite"),
                                  "--quantize", "int8", "--data", str(tmp_path / "x.npy"), "--json"])
    assert result.exit_code == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["export_quantize"] == "int8" and figures["export_max_abs_diff"] <= figures["export_atol"]
    assert "loaded back: max abs difference" in result.stderr
    refused = runner.invoke(main, ["prune", str(tmp_path / "model.keras"), "-o", str(tmp_path / "other.tflite"),
                                   "--quantize", "int8"])
    assert refused.exit_code == 2 and "--data" in refused.stderr
    assert not (tmp_path / "other.tflite").exists()
