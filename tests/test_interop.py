"""Every input kind `keras-embed prune` reads (`keras_embed.interop`).

tf_keras (Keras 2) .h5 files and SavedModels and a tfmot-pruned model are built by
tf_keras and tensorflow-model-optimization in one child process (importing them here would
switch this process to legacy Keras); plain SavedModels come from Keras 3 `model.export`
and `tf.saved_model.save`. Each is pruned through the CLI and the result compared with
the original; the last test checks that this process never imported tf_keras or tfmot.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from keras_embed.errors import InputError
from keras_embed.interop import input_kind, load_input, resolve_output
from keras_embed.tf_keras_bridge import tf_keras_installed
from keras_embed.tools.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")

needs_tf_keras = pytest.mark.skipif(not tf_keras_installed(), reason="tf_keras is not installed (the tf_keras extra)")

# Builds the tf_keras models in WORKDIR; prints the zero rows tfmot left in the pruned kernel.
BUILD = r"""
import json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np, tf_keras as K
work = sys.argv[1]
rng = np.random.default_rng(0)
def chain():
    inputs = K.Input((6,), name="features")
    hidden = K.layers.Dense(8, activation="relu", name="hidden")(inputs)
    hidden = K.layers.BatchNormalization(name="norm")(hidden)
    model = K.Model(inputs, K.layers.Dense(3, name="scores")(hidden))
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    kernel, bias = model.get_layer("scores").get_weights()
    kernel[:3] = 0  # three null units: no outgoing weights
    model.get_layer("scores").set_weights([kernel, bias])
    variance = model.get_layer("norm").get_weights()
    variance[3] = np.abs(variance[3]) + 0.5
    model.get_layer("norm").set_weights(variance)
    return model
model = chain()
model.save(f"{work}/legacy.h5")
model.save(f"{work}/legacy_savedmodel", save_format="tf")
K.Sequential([K.Input((2,)), K.layers.Lambda(lambda x: x * 2)]).save(f"{work}/lambda.h5")
import tensorflow_model_optimization as tfmot
schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, end_step=1, frequency=1)
wrapped = K.Sequential([K.Input((6,)), K.layers.Dense(8, activation="tanh"),
    tfmot.sparsity.keras.prune_low_magnitude(K.layers.Dense(3), pruning_schedule=schedule)])
kernel = rng.normal(size=(8, 3)).astype("float32")
kernel[:4] = np.sign(kernel[:4]) * 1e-3  # the 12 smallest magnitudes (50%) fill four whole rows
kernel[4:] = np.sign(kernel[4:]) * (1 + np.abs(kernel[4:]))
wrapped.layers[-1].layer.kernel.assign(kernel)
x = rng.normal(size=(32, 6)).astype("float32")
wrapped.compile(K.optimizers.SGD(0.0), "mse")
wrapped.fit(x, np.zeros((32, 3), "float32"), epochs=1, batch_size=32, verbose=0,
            callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
stripped.save(f"{work}/tfmot.h5")
kernel = stripped.layers[-1].get_weights()[0]
print(json.dumps({"zero_rows": int((np.abs(kernel).sum(axis=1) == 0).sum()), "zeros": int((kernel == 0).sum())}))
"""


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """Folder of the tf_keras models, and what the child says about the tfmot one."""
    if not tf_keras_installed():
        pytest.skip("tf_keras is not installed (the tf_keras extra)")
    work = tmp_path_factory.mktemp("legacy")
    done = subprocess.run([sys.executable, "-c", BUILD, str(work)], capture_output=True, text=True, timeout=600)
    if "No module named 'tensorflow_model_optimization'" in done.stderr:
        pytest.skip("tensorflow-model-optimization is not installed (the bench extra)")
    assert done.returncode == 0, done.stderr[-2000:]
    return work, json.loads(done.stdout.strip().splitlines()[-1])


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], prog_name="keras-embed")


def prune_json(*args):
    result = invoke("prune", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def widths(figures):
    return [layer["width_after"] for layer in figures["layers"]]


@needs_tf_keras
def test_tf_keras_h5_is_read_by_tf_keras_pruned_and_written_as_keras3_h5(legacy, tmp_path):
    work, _ = legacy
    figures = prune_json(work / "legacy.h5", "-o", tmp_path / "pruned")
    assert figures["input"] == {"kind": "tf_keras_h5", "read_with": "tf_keras", "layers": [
        "InputLayer", "Dense", "BatchNormalization", "Dense"], "stripped_tfmot_wrappers": False}
    assert widths(figures) == [5, 3]  # the three null units are gone
    assert (tmp_path / "pruned.h5").is_file() and figures["export_format"] == "h5"
    original = keras.saving.load_model(work / "legacy.h5", compile=False)  # Keras 3's legacy loader, as a reference
    pruned = keras.saving.load_model(tmp_path / "pruned.h5", compile=False)
    x = np.random.default_rng(1).normal(size=(64, 6)).astype("float32")
    np.testing.assert_allclose(outputs(pruned, x), outputs(original, x), atol=1e-5)
    assert figures["export_max_abs_diff"] <= figures["export_atol"]


@needs_tf_keras
def test_tf_keras_savedmodel_with_keep_format_is_written_back_by_tf_keras(legacy, tmp_path):
    work, _ = legacy
    figures = prune_json(work / "legacy_savedmodel", "-o", tmp_path / "pruned", "--keep-format")
    assert figures["input"]["kind"] == "tf_keras_savedmodel" and widths(figures) == [5, 3]
    assert figures["export_format"] == "tf_keras savedmodel"
    assert (tmp_path / "pruned" / "keras_metadata.pb").is_file()  # tf_keras.models.load_model reads it
    assert figures["export_max_abs_diff"] <= 1e-5
    reference = tf.saved_model.load(str(work / "legacy_savedmodel")).signatures["serving_default"]
    written = tf.saved_model.load(str(tmp_path / "pruned")).signatures["serving_default"]
    x = tf.constant(np.random.default_rng(2).normal(size=(64, 6)).astype("float32"))
    np.testing.assert_allclose(next(iter(written(x).values())), next(iter(reference(x).values())), atol=1e-5)


@needs_tf_keras
def test_tfmot_pruned_model_loses_its_zeroed_units_and_reports_realized_sparsity(legacy, tmp_path):
    work, tfmot = legacy
    assert tfmot["zero_rows"] == 4  # 50% magnitude pruning took the four rows of small weights
    figures = prune_json(work / "tfmot.h5", "-o", tmp_path / "pruned.keras")
    assert widths(figures) == [8 - tfmot["zero_rows"], 3]
    sparsity = figures["sparsity"]
    assert sparsity["zero_kernel_weights_before"] == tfmot["zeros"] == 12
    assert sparsity["zero_kernel_weights_after"] == 0 and sparsity["zeros_realized"] == 1.0
    assert sparsity["params_removed"] == 4 * (6 + 1) + 4 * 3
    assert figures["max_abs_diff"] <= figures["atol"]


@needs_tf_keras
def test_tf_keras_lambda_layer_is_refused_in_safe_mode_before_tf_keras_runs_it(legacy, tmp_path):
    work, _ = legacy
    result = invoke("prune", work / "lambda.h5", "-o", tmp_path / "out.keras")
    assert result.exit_code == 2 and "--unsafe" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_without_tf_keras_the_inputs_are_read_by_keras3_and_the_serving_graph(legacy, monkeypatch):
    work, _ = legacy
    monkeypatch.setattr("keras_embed.tf_keras_bridge.tf_keras_installed", lambda: False)
    h5, h5_notes = load_input(work / "legacy.h5", "tf_keras_h5")
    graph, graph_notes = load_input(work / "legacy_savedmodel", "tf_keras_savedmodel")
    assert "legacy .h5 loader" in h5_notes["read_with"] and "serving graph" in graph_notes["read_with"]
    x = np.random.default_rng(3).normal(size=(16, 6)).astype("float32")
    np.testing.assert_allclose(outputs(graph, x), outputs(h5, x), atol=1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Keras 3 exports (no Keras metadata): a Dense chain with BN and softmax, and a CNN."""
    folder = tmp_path_factory.mktemp("exports")
    rng = np.random.default_rng(4)
    dense = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="elu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(6, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    conv = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(4, 3, activation="relu"),
                             keras.layers.MaxPooling2D(), keras.layers.Conv2D(4, 2, padding="same"),
                             keras.layers.BatchNormalization(), keras.layers.Activation("tanh"),
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    for model, name in ((dense, "dense"), (conv, "conv")):
        model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
        if name == "dense":  # duplicate a unit of the second hidden layer: exact pruning merges it
            kernel, bias = model.layers[2].get_weights()
            kernel[:, 1], bias[1] = kernel[:, 0], bias[0]
            model.layers[2].set_weights([kernel, bias])
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                gamma, beta, mean, variance = layer.get_weights()
                layer.set_weights([gamma, beta, mean, np.abs(variance) + 0.5])
        model.export(str(folder / name), verbose=False)
    return folder


@pytest.mark.parametrize("name, shape, width", [("dense", (5,), 5), ("conv", (8, 8, 2), None)])
def test_plain_savedmodel_is_rebuilt_from_its_graph_pruned_and_exported_as_savedmodel(exported, tmp_path, name,
                                                                                       shape, width):
    figures = prune_json(exported / name, "-o", tmp_path / "pruned")
    assert figures["input"] == {"kind": "savedmodel", "read_with": "serving graph"}
    if width is not None:
        assert [layer["width_after"] for layer in figures["layers"]][1] == width  # the duplicate merged
    reference = tf.saved_model.load(str(exported / name)).signatures["serving_default"]
    written = tf.saved_model.load(str(tmp_path / "pruned")).signatures["serving_default"]
    x = tf.constant(np.random.default_rng(5).normal(size=(32, *shape)).astype("float32"))
    np.testing.assert_allclose(next(iter(written(x).values())), next(iter(reference(x).values())), atol=1e-5)


def test_savedmodel_with_unsupported_ops_is_refused_listing_them(tmp_path):
    class Odd(tf.Module):
        def __init__(self):
            self.kernel = tf.Variable(np.ones((3, 2), "float32"))

        @tf.function(input_signature=[tf.TensorSpec((None, 3), tf.float32)])
        def __call__(self, x):
            return tf.math.cos(tf.matmul(tf.math.square(x), self.kernel))

    module = Odd()
    tf.saved_model.save(module, str(tmp_path / "odd"), signatures=module.__call__)
    result = invoke("prune", tmp_path / "odd", "-o", tmp_path / "out.keras")
    assert result.exit_code == 4, result.stderr
    message = result.stderr.strip()
    assert message.count("\n") == 0 and "Cos, Square" in message and "supported ops: MatMul" in message
    assert not (tmp_path / "out.keras").exists()


def test_output_without_extension_takes_the_input_kind_and_keep_format_refuses_a_conflict():
    assert resolve_output("out/m", "keras") == ("out/m.keras", "keras")
    assert resolve_output("out/m", "tf_keras_h5") == ("out/m.h5", "h5")
    assert resolve_output("out/m", "savedmodel") == ("out/m", "savedmodel")
    assert resolve_output("out/m.tflite", "savedmodel") == ("out/m.tflite", None)
    assert resolve_output("out/m.h5", "tf_keras_h5", keep_format=True) == ("out/m.h5", "h5")
    with pytest.raises(InputError, match="--keep-format"):
        resolve_output("out/m.keras", "tf_keras_h5", keep_format=True)


def test_input_kinds_of_keras3_files(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.save(tmp_path / "m.keras")
    model.save(tmp_path / "m.h5")
    assert (input_kind(tmp_path / "m.keras"), input_kind(tmp_path / "m.h5")) == ("keras", "h5")


def test_this_process_never_imported_tf_keras_or_tfmot():
    """Runs last in this file: every prune above kept them in child processes."""
    assert "tf_keras" not in sys.modules and "tensorflow_model_optimization" not in sys.modules
    assert os.environ.get("TF_USE_LEGACY_KERAS") is None
