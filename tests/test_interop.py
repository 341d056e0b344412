"""Every input kind `keras-embed prune` reads (`keras_embed.files.inputs`).

tf_keras (Keras 2) .h5 files and SavedModels and a tfmot-pruned model are built by
tf_keras and tensorflow-model-optimization in one child process (`model_files`: importing
them here would switch this process to legacy Keras); plain SavedModels come from Keras 3
`model.export`, `tf.saved_model.save` and TF1's `SavedModelBuilder`. Each is pruned through
the CLI and the result compared with the original. Hostile tf_keras files (code respelled
past a text search, weights read from other files) are refused before their code runs or
the other file is read; the last test checks that this process never imported tf_keras or tfmot.
"""

import json
import os
import shutil
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from keras_embed.errors import InputError
from keras_embed.files.inputs import input_kind, load_input, resolve_output
from keras_embed.files.tf_keras_bridge import CHILD, tf_keras_installed
from keras_embed.tools.cli import main
from model_files import (OUTSIDE, PAYLOAD, PAYLOAD_MODELS, SECRET, build_tf_keras_models, data_from_outside,
                         first_kernel)

pytestmark = pytest.mark.filterwarnings("ignore")

needs_tf_keras = pytest.mark.skipif(not tf_keras_installed(), reason="tf_keras is not installed (the tf_keras extra)")


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """Folder of the tf_keras models (`model_files.TF_KERAS_BUILD`), and what the child says
    about the tfmot one."""
    if not tf_keras_installed():
        pytest.skip("tf_keras is not installed (the tf_keras extra)")
    work = tmp_path_factory.mktemp("legacy")
    return work, build_tf_keras_models(work)


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


def refusal(result):
    """The one line of a command refused as bad input (exit 2), checked: no traceback, nothing
    on stdout."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and result.stdout == "" and len(lines) == 1, result.output
    assert "Traceback" not in result.stderr
    return lines[0]


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


@needs_tf_keras
@pytest.mark.parametrize("name", PAYLOAD_MODELS)
def test_a_respelled_tf_keras_lambda_is_refused_before_its_code_runs(legacy, tmp_path, name):
    """The class name spelled as a JSON escape ("\\u004cambda"), in an .h5 config or every
    node of a SavedModel's keras_metadata.pb, flat, in a Sequential inside a functional
    model, inside a TimeDistributed wrapper: the decision is made on the parsed config."""
    work, _ = legacy
    line = refusal(invoke("prune", work / name, "-o", tmp_path / "out.keras"))
    assert line == (f"keras-embed: error: model '{work / name}' holds code (a Lambda layer) that safe mode refuses "
                    "to run; pass --unsafe only if you trust the file")
    assert not (work / PAYLOAD).exists()  # the Lambda would have created it
    assert list(tmp_path.iterdir()) == []


@needs_tf_keras
@pytest.mark.parametrize("name, what", [("payload_escaped.h5", "a Lambda layer"),
                                        ("payload_wrapped.h5", "a Lambda layer"), ("tf_op.h5", "a TFOpLambda layer")])
def test_the_child_refuses_code_itself_when_the_parent_check_is_skipped(legacy, tmp_path, name, what):
    """Started directly, as the bridge would be without its check: exit 6, the class named."""
    work, _ = legacy
    done = subprocess.run([sys.executable, str(CHILD), "read", str(work / name), str(tmp_path / "read.h5")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 6 and done.stderr.strip().splitlines()[-1] == what, done.stderr[-2000:]
    assert not (work / PAYLOAD).exists()
    assert list(tmp_path.iterdir()) == []


@needs_tf_keras
def test_with_the_parent_check_skipped_the_childs_refusal_names_the_users_file(legacy, tmp_path, monkeypatch):
    """A SavedModel: tf_keras falls back to a layer's traced graph when building it from its
    config fails, so the child's refusal must not be an exception tf_keras catches."""
    work, _ = legacy
    model = work / "payload_escaped_savedmodel"
    monkeypatch.setattr("keras_embed.files.tf_keras_bridge.refuse_code", lambda path, unsafe: None)
    line = refusal(invoke("prune", model, "-o", tmp_path / "out.keras"))
    assert line.startswith(f"keras-embed: error: model '{model}' holds code (a Lambda layer)")
    assert "--unsafe" in line
    assert not (work / PAYLOAD).exists()
    assert list(tmp_path.iterdir()) == []


@needs_tf_keras
def test_a_tf_op_lambda_is_refused_and_with_unsafe_keras3_s_refusal_names_the_users_file(legacy, tmp_path):
    """A TFOpLambda runs the TensorFlow function its config names: code, like a Lambda."""
    work, _ = legacy
    line = refusal(invoke("prune", work / "tf_op.h5", "-o", tmp_path / "out.keras"))
    assert f"model '{work / 'tf_op.h5'}' holds code (a TFOpLambda layer)" in line
    result = invoke("prune", work / "tf_op.h5", "-o", tmp_path / "out.keras", "--unsafe")
    assert result.exit_code == 4 and f"model '{work / 'tf_op.h5'}' uses a custom class" in result.stderr
    assert "keras-embed-" not in result.stderr  # not the temporary copy the child wrote
    assert list(tmp_path.iterdir()) == []


@needs_tf_keras
def test_a_tf_keras_savedmodel_whose_graph_holds_side_effects_is_refused_before_the_child_loads_it(
        legacy, tmp_path, monkeypatch):
    """TensorFlow loads a tf_keras SavedModel's graph in the child: it is checked like a
    plain one first (issue 15: a file-writing op anywhere in it, nothing runs)."""
    from tensorflow.core.protobuf import saved_model_pb2

    from keras_embed.files import tf_keras_bridge

    work, _ = legacy
    model = tmp_path / "legacy_savedmodel"
    shutil.copytree(work / "legacy_savedmodel", model)
    saved_model = saved_model_pb2.SavedModel.FromString((model / "saved_model.pb").read_bytes())
    saved_model.meta_graphs[0].graph_def.node.add(name="payload", op="WriteFile")
    (model / "saved_model.pb").write_bytes(saved_model.SerializeToString())
    monkeypatch.setattr(tf_keras_bridge, "_run", lambda *args: pytest.fail("the tf_keras child was started"))

    result = invoke("prune", model, "-o", tmp_path / "out.keras")

    assert result.exit_code == 4 and "WriteFile" in result.stderr and "nothing was run" in result.stderr, result.output
    assert not (tmp_path / "out.keras").exists()


@needs_tf_keras
@pytest.mark.parametrize("how", OUTSIDE)
def test_a_tf_keras_h5_whose_weights_live_in_another_file_is_refused(legacy, tmp_path, how):
    work, _ = legacy
    model, secrets = tmp_path / "legacy.h5", tmp_path / "secrets"
    secrets.mkdir()
    shutil.copyfile(work / "legacy.h5", model)
    kernel = data_from_outside(model, how, secrets)
    before = sorted(tmp_path.rglob("*"))

    result = invoke("prune", model, "-o", tmp_path / "out.keras", "--json")

    line = refusal(result)
    assert f"model file '{model}' holds " in line and f"'{kernel}'" in line and "tampered with" in line
    assert SECRET.decode() not in result.output
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


@needs_tf_keras
def test_a_tf_keras_h5_with_a_soft_link_inside_the_file_is_not_refused(legacy, tmp_path):
    work, _ = legacy
    model = tmp_path / "legacy.h5"
    shutil.copyfile(work / "legacy.h5", model)
    with h5py.File(model, "r+") as file:
        kernel = first_kernel(file)
        file.move(kernel, "/moved_kernel")
        file[kernel] = h5py.SoftLink("/moved_kernel")
    assert input_kind(model) == "tf_keras_h5"  # the metadata read that refuses data from other files passed


def test_without_tf_keras_the_inputs_are_read_by_keras3_and_the_serving_graph(legacy, monkeypatch):
    work, _ = legacy
    monkeypatch.setattr("keras_embed.files.tf_keras_bridge.tf_keras_installed", lambda: False)
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


@pytest.mark.parametrize("resource", [False, True], ids=["reference-variables", "resource-variables"])
def test_tf1_savedmodel_is_read_from_its_graph_and_checkpoint_pruned_and_exported(tmp_path, resource):
    """A TF1 SavedModelBuilder export with its training ops (Adam) in the graph and a main_op."""
    v1 = tf.compat.v1
    rng = np.random.default_rng(6)
    weights = [rng.normal(size=shape).astype("float32") for shape in ((4, 5), (5,), (5, 2), (2,))]
    weights[0][:, 1], weights[1][1] = weights[0][:, 0], weights[1][0]  # a duplicate hidden unit
    with tf.Graph().as_default(), v1.Session() as session:
        x = v1.placeholder(tf.float32, (None, 4), name="features")
        w1, b1, w2, b2 = [v1.get_variable(name, initializer=value, use_resource=resource)
                          for name, value in zip(("hidden/kernel", "hidden/bias", "out/kernel", "out/bias"), weights)]
        y = tf.matmul(tf.nn.relu(tf.matmul(x, w1) + b1), w2) + b2
        v1.train.AdamOptimizer(0.1).minimize(tf.reduce_mean(tf.square(y)))
        session.run(v1.global_variables_initializer())
        builder = v1.saved_model.Builder(str(tmp_path / "tf1"))
        builder.add_meta_graph_and_variables(
            session, ["serve"], main_op=v1.tables_initializer(),
            signature_def_map={"serving_default": v1.saved_model.predict_signature_def({"x": x}, {"y": y})})
        builder.save()
    figures = prune_json(tmp_path / "tf1", "-o", tmp_path / "pruned")
    assert figures["input"] == {"kind": "savedmodel", "read_with": "serving graph"}
    assert widths(figures)[0] == 4  # the duplicate merged
    reference = tf.saved_model.load(str(tmp_path / "tf1")).signatures["serving_default"]
    written = tf.saved_model.load(str(tmp_path / "pruned")).signatures["serving_default"]
    x = tf.constant(np.random.default_rng(7).normal(size=(32, 4)).astype("float32"))
    np.testing.assert_allclose(next(iter(written(x).values())), reference(x)["y"], atol=1e-5)


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
