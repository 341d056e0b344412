"""Models of several inputs and several outputs (issue 17, "Model shapes").

A two-input, two-output model (an image branch of Conv2D, a feature branch of Dense,
joined by Concatenate into a Dense trunk with two Dense heads, random non-symmetric
weights) goes through read/build, `embed --widen` then `prune` (the library and the CLI,
with data as a dict keyed by input name, in files an `.npz` keyed so), `--mode data`
under each stopping rule, `analyze`, export, and the refusal of data that does not fit
it. Every output is compared (each flattened per row and concatenated).
"""

import json
import re

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import keras_embed
from keras_embed.pipeline import hold_out
from builders import two_io
from keras_embed.errors import InputError
from keras_embed.files.data import batches, check_inputs
from keras_embed.model.build import build_model
from keras_embed.stopping import StoppingRule
from keras_embed.tools.cli import main
from keras_embed.verify import calibration_inputs, predict

RELATIVE = 1e-5
GROUPS = ("conv", "features_dense", "trunk")  # one producer of each of three channel groups
WIDEN = [("conv", 0, 0.3), ("features_dense", 1, -0.5), ("trunk", 2, 0.7)]


def inputs(rows, seed=0):
    generator = np.random.default_rng(seed)
    return {"image": generator.uniform(0, 1, (rows, 8, 8, 2)).astype("float32"),
            "features": generator.standard_normal((rows, 5)).astype("float32")}


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], prog_name="keras-embed")


def assert_ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}"
    return result


def assert_one_line_error(result, code=2):
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}\n{result.output}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-embed: error: "), result.stderr
    return lines[0]


def assert_every_output_equal(reference, candidate, x):
    expected, actual = predict(reference, x), predict(candidate, x)
    assert expected.shape == actual.shape == (len(x["image"]), 5)
    assert np.abs(expected - actual).max() <= RELATIVE * np.abs(expected).max()


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(3)
    built = two_io()
    for layer in built.layers:  # biases too, so no two units are alike
        if layer.weights:
            layer.set_weights([np.random.default_rng(7).normal(0, 0.5, weight.shape) for weight in layer.get_weights()])
    return built


@pytest.fixture(scope="module")
def x():
    return inputs(96)


@pytest.fixture(scope="module")
def folder(model, x, tmp_path_factory):
    """model.keras and calib.npz (keys image, features, y) and heldout.npz."""
    path = tmp_path_factory.mktemp("two_io")
    model.save(path / "model.keras")
    np.savez(path / "calib.npz", **x, y=np.arange(96) % 3)
    np.savez(path / "heldout.npz", **inputs(40, seed=1))
    return path


@pytest.fixture(scope="module")
def grown(model):
    return keras_embed.embed(model, widen_steps=WIDEN)[0]


def test_read_then_build_is_exact(model, x):
    graph = keras_embed.read_model(model)
    assert [node.name for node in graph.inputs] == ["image", "features"] and graph.outputs == ("scores", "value")
    rebuilt = build_model(graph)
    assert [tensor.name for tensor in rebuilt.inputs] == ["image", "features"]
    assert np.abs(predict(model, x) - predict(rebuilt, x)).max() <= 1e-6 * np.abs(predict(model, x)).max()


def test_verification_covers_every_output(model, x):
    values = model(x, training=False)
    expected = np.hstack([keras.ops.convert_to_numpy(value) for value in values])
    assert np.array_equal(predict(model, x), expected.astype(np.float64))


def test_widened_on_three_groups_then_pruned_gives_back_the_model(model, grown, x):
    assert grown.count_params() > model.count_params()
    assert_every_output_equal(model, grown, x)
    for data in (None, x):
        back, report = keras_embed.prune(grown, data=data)
        assert back.count_params() <= model.count_params()
        assert report.checks["verified"]
        assert_every_output_equal(model, back, x)


def test_cli_widen_then_prune_with_an_npz_keyed_by_input_names(model, x, folder):
    steps = [argument for layer, unit, alpha in WIDEN for argument in ("--widen", f"{layer}:{unit}:{alpha}")]
    assert_ok(invoke("embed", folder / "model.keras", "-o", folder / "grown.keras", "--overwrite", *steps))
    assert_ok(invoke("prune", folder / "grown.keras", "-o", folder / "back.keras", "--overwrite",
                     "--data", folder / "calib.npz", "--validation", folder / "heldout.npz",
                     "--report", folder / "back.json"))
    back = keras.saving.load_model(folder / "back.keras")
    assert back.count_params() <= model.count_params()
    assert_every_output_equal(model, back, x)
    report = json.loads((folder / "back.json").read_text())
    assert report["verified"] and report["export_verified"] and report["max_abs_diff_validation"] is not None


def test_cli_data_mode_keep_ratio_writes_a_smaller_model_with_its_output_error(model, folder):
    result = assert_ok(invoke("prune", folder / "model.keras", "-o", folder / "small.keras", "--overwrite",
                              "--mode", "data", "--keep-ratio", "0.5", "--data", folder / "calib.npz",
                              "--report", folder / "small.json"))
    report = json.loads((folder / "small.json").read_text())
    assert np.isfinite(report["output_error"]) and "agreement" not in report  # no one class output to agree on
    assert f"relative output error {report['output_error']:.3g}" in result.output
    assert keras.saving.load_model(folder / "small.keras").count_params() < model.count_params()


@pytest.mark.parametrize("rule", [StoppingRule("max_output_error", 0.05), StoppingRule("target_params", 600)])
def test_data_mode_rules_hold_over_every_output(model, x, rule):
    small, report = keras_embed.prune(model, data=x, mode="data", rule=rule)
    figures = report.checks
    assert small.count_params() < model.count_params() and set(figures) >= {"output_error", "rule"}
    assert rule.holds(figures, small.count_params())
    x = hold_out(x, None)[1][0]  # the rows it was judged on
    expected = predict(model, x)
    assert np.isclose(np.linalg.norm(predict(small, x) - expected) / np.linalg.norm(expected), figures["output_error"])


def test_accuracy_rule_is_refused_for_several_outputs(model, x, folder):
    with pytest.raises(InputError, match="one classification output but the model has 2"):
        keras_embed.prune(model, data=x, mode="data", rule=StoppingRule("max_accuracy_drop", 1.0),
                          labels=np.arange(96) % 3)
    line = assert_one_line_error(invoke("prune", folder / "model.keras", "-o", folder / "acc.keras", "--mode", "data",
                                        "--max-accuracy-drop", "1", "--data", folder / "calib.npz"))
    assert "one classification output" in line


def test_analyze_library_and_cli(model, x, folder):
    rows = keras_embed.analyze(model, x)
    assert {row["name"] for row in rows} >= set(GROUPS)
    assert all(row["effective_width"] <= row["width_before"] for row in rows)
    assert_ok(invoke("analyze", folder / "model.keras", "--data", folder / "calib.npz"))


def bad(folder, name, **arrays):
    np.savez(folder / name, **arrays)
    return folder / name


@pytest.mark.parametrize("case, message", [
    ("missing", r"keys \['image'\] but the model's inputs are \['image', 'features'\]"),
    ("unknown", r"keys \['features', 'image', 'other'\]"),
    ("shape", r"input 'features' has shape \(96, 4\) but the model takes \(n, 5\)"),
    ("rows", r"unequal rows per input \(image: 96, features: 50\)"),
    ("npy", "is one .npy array but the model takes several inputs"),
])
def test_unusable_data_is_refused_with_one_line(x, folder, case, message):
    arrays = {"missing": {"image": x["image"]}, "unknown": {**x, "other": x["features"]},
              "shape": {**x, "features": x["features"][:, :4]}, "rows": {**x, "features": x["features"][:50]}}
    if case == "npy":
        np.save(folder / "image.npy", x["image"])
        path = folder / "image.npy"
    else:
        path = bad(folder, f"{case}.npz", **arrays[case])
    for command in (["analyze", folder / "model.keras"], ["prune", folder / "model.keras", "-o", folder / "no.keras"]):
        line = assert_one_line_error(invoke(*command, "--data", path))
        assert re.search(message, line), line
    assert not (folder / "no.keras").exists()
    if case != "npy":
        with pytest.raises(InputError, match=message):
            keras_embed.prune(keras.saving.load_model(folder / "model.keras"), data=arrays[case])


@pytest.mark.parametrize("output", ["copy.h5", "copy.tflite", "copy_savedmodel/"])
def test_export_is_loaded_back_and_verified_on_every_output(model, x, folder, output):
    result = assert_ok(invoke("prune", folder / "model.keras", "-o", f"{folder}/{output}", "--overwrite",
                              "--data", folder / "calib.npz", "--json"))
    figures = json.loads(result.stdout)
    assert figures["export_verified"] and figures["export_max_abs_diff"] <= 1e-5 * np.abs(predict(model, x)).max()


def test_onnx_and_int8_are_refused_for_several_inputs(model, folder):
    from keras_embed.files.save import check_io_format

    with pytest.raises(InputError, match="onnx output takes one of each"):
        check_io_format(model, "onnx")
    line = assert_one_line_error(invoke("prune", folder / "model.keras", "-o", folder / "int8.tflite",
                                        "--quantize", "int8", "--data", folder / "calib.npz"))
    assert "--quantize int8 calibrates on one input array" in line and not (folder / "int8.tflite").exists()


def test_finetune_is_refused_for_several_outputs(model, x, folder):
    from keras_embed.finetune import finetune

    with pytest.raises(InputError, match="has 2 outputs"):
        finetune(model, x, np.zeros(96), epochs=1)
    line = assert_one_line_error(invoke("prune", folder / "model.keras", "-o", folder / "tuned.keras", "--mode", "data",
                                        "--keep-ratio", "0.5", "--data", folder / "calib.npz", "--finetune", "1"))
    assert "has 2 outputs" in line and not (folder / "tuned.keras").exists()


def test_the_monitor_reads_a_probe_set_per_input(grown, x):
    from keras_embed.callbacks import EmbeddingMonitor

    trained = keras.models.clone_model(grown)
    trained.set_weights(grown.get_weights())
    trained.compile(keras.optimizers.SGD(1e-6), ["mse", "mse"])
    targets = [np.zeros((96, 3)), np.zeros((96, 2))]
    monitor = EmbeddingMonitor(x, targets, max_samples=64, patience=1, min_delta=1.0)  # every epoch a plateau
    trained.fit(x, targets, epochs=2, verbose=0, callbacks=[monitor])
    assert len(monitor._probe_x["features"]) == 64 and [len(part) for part in monitor._probe_y] == [64, 64]
    assert any(redundancy.groups for redundancy in monitor.summary.values())  # the widened copies, still parallel
    assert np.isfinite(monitor.curvature.relative)  # the loss of both outputs, curved over every weight


def test_calibration_inputs_per_input_and_single_input_unchanged(model):
    drawn = calibration_inputs(model, samples=4)
    assert {name: values.shape for name, values in drawn.items()} == {"image": (4, 8, 8, 2), "features": (4, 5)}
    single = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    expected = np.random.default_rng(0).standard_normal((4, 3)).astype("float32")
    assert np.array_equal(calibration_inputs(single, samples=4), expected)


def test_batches_stream_dict_slices(model, x):
    sizes = [(len(batch["image"]), len(batch["features"])) for batch in batches(x, batch_size=40)]
    assert sizes == [(40, 40), (40, 40), (16, 16)]
    checked = check_inputs({"features": x["features"].astype("float64"), "image": x["image"]}, model)
    assert list(checked) == ["image", "features"] and checked["features"].dtype == np.float32
    with pytest.raises(InputError, match="takes 2 inputs"):
        check_inputs(x["image"], model)


@pytest.mark.parametrize("output", ["one_in.tflite", "one_in_savedmodel/"])
def test_one_input_two_outputs_export_is_verified(tmp_path, output):
    from keras_embed.files.export import export_model

    features = keras.Input((5,), name="features")
    hidden = keras.layers.Dense(6, activation="relu", name="hidden")(features)
    model = keras.Model(features, [keras.layers.Dense(3, name="a")(hidden), keras.layers.Dense(1, name="b")(hidden)])
    figures = export_model(model, f"{tmp_path}/{output}", inputs(32)["features"])
    assert figures["export_verified"] and figures["export_max_abs_diff"] <= 1e-6
