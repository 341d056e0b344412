"""End-to-end tests of the `keras-embed` command line (analyze, prune, embed).

Every test drives the click group through `CliRunner`, exactly as the console script
does, and checks what a user sees: exit codes, the tables and JSON, the files written
(loaded back with plain Keras, TensorFlow or the TFLite interpreter).

Bad input (unreadable files, unusable data, outputs that cannot be written, bad options)
has its own table in test_catalogue.py.

The committed digits models are the main fixtures: `digits_widened.keras` (64-48-36-10)
is `digits_narrow.keras` (64-16-12-10) grown by function-preserving embeddings, so
pruning the first must give back the widths and the outputs of the second. The residual
CNN (`digits_cnn.keras`, its widened and perturbed copies, `digits_images_heldout.npz`) checks
that condense mode, --null and data mode with --finetune work on a CNN too.

"""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import keras_embed
from keras_embed.edit.operators import widen
from keras_embed.pipeline import hold_out
from keras_embed.tools.cli import main

SAVED_MODELS = Path(__file__).resolve().parents[1] / "saved_models"
WIDENED = SAVED_MODELS / "digits_widened.keras"
NARROW = SAVED_MODELS / "digits_narrow.keras"
HELDOUT = SAVED_MODELS / "digits_heldout.npz"
NARROW_WIDTHS = [16, 12, 10]
EXIT_CODES = ("0 ok", "2 bad usage or input", "3 verification failed", "4 unsupported model", "1 internal error")


# ---------------------------------------------------------------- helpers


def invoke(*args):
    """Runs `keras-embed ARGS...` in-process; stdout and stderr come back separately."""
    return CliRunner().invoke(main, [str(arg) for arg in args], prog_name="keras-embed")


def assert_ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output


def assert_clean_error(result, code):
    """Checks `code`, no traceback, and a one-line error (ours, or click's usage error).

    Returns the line that carries the message.
    """
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}\n{result.output}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines, "no error message on stderr"
    if lines[0].startswith("Usage:"):  # click's usage error: usage, hint, blank line, Error: ...
        assert lines[-1].startswith("Error: "), result.stderr
        assert sum(line.startswith("Error: ") for line in lines) == 1, result.stderr
    else:
        assert len(lines) == 1, f"expected one line on stderr:\n{result.stderr}"
        assert lines[0].startswith("keras-embed: error: "), result.stderr
    return lines[-1]


def table_rows(text):
    """The rows of the first aligned table in `text`, keyed by their first cell."""
    lines = text.strip().splitlines()
    header = lines[0].split()
    assert set(lines[1].replace(" ", "")) == {"-"}, f"no table in:\n{text}"
    rows = itertools.takewhile(lambda cells: len(cells) == len(header), (line.split() for line in lines[2:]))
    return {cells[0]: dict(zip(header, cells)) for cells in rows}


def heldout_x():
    return np.load(HELDOUT)["x"]


def outputs(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)


def dense_widths(model):
    return [layer.units for layer in model.layers if isinstance(layer, keras.layers.Dense)]


def listing(folder):
    return sorted(os.listdir(folder)) if folder.exists() else None


# ---------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def pruned_digits(tmp_path_factory):
    """`prune digits_widened.keras -o out.keras --report report.json --data heldout`, run once."""
    folder = tmp_path_factory.mktemp("pruned")
    output, report = folder / "out.keras", folder / "report.json"
    result = invoke("prune", WIDENED, "-o", output, "--report", report, "--data", HELDOUT)
    assert_ok(result)
    return result, output, report


@pytest.fixture(scope="module")
def pruned_model(pruned_digits):
    return keras.saving.load_model(pruned_digits[1])


@pytest.fixture(scope="module")
def embedded_digits(tmp_path_factory):
    """The narrow digits model grown by two splits of hidden_relu and a null unit in hidden_tanh."""
    output = tmp_path_factory.mktemp("embedded") / "grown.keras"
    result = invoke("embed", NARROW, "-o", output,
                    "--widen", "hidden_relu:0:0.3", "--widen", "hidden_relu:1", "--null", "hidden_tanh")
    assert_ok(result)
    return result, output


@pytest.fixture(scope="module")
def near_duplicate_model(tmp_path_factory):
    """The narrow model plus a copy of hidden_relu unit 0 whose incoming weights and bias
    are each off by 1e-5 relative (random signs, so not a positive multiple, which relu would
    allow): a duplicate at --rtol 1e-3 but not at 1e-6, and merging it changes the outputs."""
    graph = widen(keras_embed.read_model(keras.saving.load_model(NARROW)), "hidden_relu", unit=0, alpha=0.5)
    hidden = graph.node("hidden_relu")
    kernel, bias = np.array(hidden.entry.kernel(hidden)), np.array(hidden.entry.bias(hidden))
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=kernel.shape[0] + 1)
    kernel[:, -1] *= 1 + 1e-5 * signs[:-1]
    bias[-1] *= 1 + 1e-5 * signs[-1]
    path = tmp_path_factory.mktemp("near") / "near_duplicate.keras"
    near = hidden.entry.with_weights(hidden, kernel, bias)
    nodes = [near if node.name == hidden.name else node for node in graph.nodes]
    keras_embed.build_model(graph.with_nodes(nodes)).save(path)
    return path


# ---------------------------------------------------------------- help and version


@pytest.mark.parametrize("command, mentions", [
    ((), ("analyze", "prune", "embed", "Exit codes", *EXIT_CODES)),
    (("analyze",), ("MODEL", "--json", "--rtol", "--unsafe", "effective width")),
    (("prune",), ("MODEL", "--output", "--report", "--json", "--data", "--atol", "--rtol", "--force",
                  "--format", "--unsafe", "Exit codes", *EXIT_CODES[:4])),
    (("embed",), ("MODEL", "--output", "--widen", "LAYER:UNIT[:ALPHA]", "--null", "LAYER[:BIAS]", "--atol",
                  "--data", "Exit codes")),
], ids=["main", "analyze", "prune", "embed"])
def test_help_exits_0_and_documents_options_and_exit_codes(command, mentions):
    result = invoke(*command, "--help")
    assert_ok(result)
    text = " ".join(result.stdout.split())  # help text is wrapped
    missing = [word for word in mentions if word not in text]
    assert not missing, f"--help of {command or 'main'} does not mention {missing}:\n{result.stdout}"


def test_version_prints_the_package_version():
    result = invoke("--version")
    assert_ok(result)
    assert keras_embed.__version__ in result.stdout


HELP_PROBE = """
import contextlib, io, json, sys
from keras_embed.tools.cli import main
codes = []
for command in ([], ["analyze"], ["prune"], ["embed"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main([*command, "--help"], prog_name="keras-embed")
        except SystemExit as exit:
            codes.append(exit.code)
print(json.dumps({"codes": codes, "loaded": [name for name in ("tensorflow", "keras") if name in sys.modules]}))
"""


def test_help_does_not_import_tensorflow():
    done = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, check=True)
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["codes"] == [0, 0, 0, 0]
    assert probe["loaded"] == [], f"--help imported {probe['loaded']}"


# ---------------------------------------------------------------- analyze


def test_analyze_table_shows_the_narrow_widths_as_effective_widths():
    result = invoke("analyze", WIDENED)
    assert_ok(result)
    rows = table_rows(result.stdout)
    assert {name: (row["width_before"], row["effective_width"]) for name, row in rows.items()} == {
        "hidden_relu": ("48", "16"), "hidden_tanh": ("36", "12"), "logits": ("10", "10"),
    }


def test_analyze_json_path_writes_the_layers(tmp_path):
    path = tmp_path / "analysis.json"
    result = invoke("analyze", WIDENED, "--json", path)
    assert_ok(result)
    assert "effective_width" in result.stdout  # the table still goes to stdout
    layers = json.loads(path.read_text())["layers"]
    assert [row["name"] for row in layers] == ["hidden_relu", "hidden_tanh", "logits"]
    assert [row["effective_width"] for row in layers] == NARROW_WIDTHS
    assert listing(tmp_path) == ["analysis.json"]


def test_analyze_json_dash_puts_only_json_on_stdout():
    result = invoke("analyze", WIDENED, "--json", "-")
    assert_ok(result)
    figures = json.loads(result.stdout)
    assert [row["effective_width"] for row in figures["layers"]] == NARROW_WIDTHS
    assert "effective_width" in result.stderr  # the table moved to stderr


def test_analyze_rtol_decides_what_counts_as_a_duplicate(near_duplicate_model):
    strict, loose = (invoke("analyze", near_duplicate_model, "--rtol", rtol) for rtol in ("1e-6", "1e-3"))
    assert_ok(strict)
    assert_ok(loose)
    assert table_rows(strict.stdout)["hidden_relu"]["effective_width"] == "17"
    assert table_rows(loose.stdout)["hidden_relu"]["effective_width"] == "16"


# ---------------------------------------------------------------- prune


def test_prune_report_has_widths_counts_and_verified_difference(pruned_digits):
    _, _, report_path = pruned_digits
    report = json.loads(report_path.read_text())
    layers = report["layers"]
    assert [(row["name"], row["width_before"], row["width_after"]) for row in layers] == [
        ("hidden_relu", 48, 16), ("hidden_tanh", 36, 12), ("logits", 10, 10),
    ]
    assert (report["depth_before"], report["depth_after"]) == (3, 3)
    # make_examples.py grew 3 null units, 7 constant units and 26 + 20 split copies
    assert report["removed"] == {"zero_out": 3, "dead": 0, "constant": 7, "duplicate": 46}
    assert sum(report["removed"].values()) == sum(row["width_before"] - row["width_after"] for row in layers)
    widths_in = [64] + [row["width_after"] for row in layers]
    assert report["params_after"] == sum((a + 1) * b for a, b in zip(widths_in, widths_in[1:]))
    assert report["params_before"] == keras.saving.load_model(WIDENED).count_params()
    assert 0 <= report["max_abs_diff"] <= 1e-5
    assert report["verified"] is True
    assert report["calibration"] == "user data"


def test_prune_prints_the_before_after_table(pruned_digits):
    result, _, _ = pruned_digits
    rows = table_rows(result.stdout)
    assert [(row["width_before"], row["width_after"]) for row in rows.values()] == [("48", "16"), ("36", "12"), ("10", "10")]
    assert "params: 5254 -> 1374" in result.stdout


def test_pruned_model_loads_with_plain_keras_and_matches_the_narrow_model(pruned_digits, pruned_model):
    _, output, _ = pruned_digits
    assert listing(output.parent) == ["out.keras", "report.json"]  # no temporary files left
    assert dense_widths(pruned_model) == NARROW_WIDTHS
    x = heldout_x()
    np.testing.assert_allclose(outputs(pruned_model, x), outputs(keras.saving.load_model(NARROW), x), rtol=0, atol=1e-5)


def test_prune_json_flag_prints_the_report_on_stdout(tmp_path, pruned_digits):
    result = invoke("prune", WIDENED, "-o", tmp_path / "out.keras", "--data", HELDOUT, "--json")
    assert_ok(result)
    printed, written = json.loads(result.stdout), json.loads(pruned_digits[2].read_text())
    assert printed.pop("seconds") > 0 and written.pop("seconds") > 0  # timings differ between runs
    assert printed == written
    assert "width_after" in result.stderr  # the table moved to stderr


def prune_to(folder, name):
    """Prunes the widened digits model into folder/name; checks nothing else is left there."""
    result = invoke("prune", WIDENED, "-o", f"{folder}/{name}", "--data", HELDOUT)
    assert_ok(result)
    assert listing(folder) == [name.rstrip("/")]
    return folder / name.rstrip("/")


def test_prune_exports_h5_that_plain_keras_loads(tmp_path, pruned_model):
    loaded = keras.saving.load_model(prune_to(tmp_path, "out.h5"), compile=False)
    assert dense_widths(loaded) == NARROW_WIDTHS
    x = heldout_x()
    np.testing.assert_allclose(outputs(loaded, x), outputs(pruned_model, x), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings(r"ignore:\s*Warning. tf.lite.Interpreter is deprecated:UserWarning")
def test_prune_exports_tflite_that_the_interpreter_runs(tmp_path, pruned_model):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(prune_to(tmp_path, "out.tflite")))
    x = heldout_x()[:5]
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(source["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], x)
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(target["index"]), outputs(pruned_model, x), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def savedmodel_export(tmp_path_factory):
    return prune_to(tmp_path_factory.mktemp("savedmodel"), "exported/")


def test_prune_exports_a_savedmodel_folder_with_a_serve_endpoint(savedmodel_export, pruned_model):
    import tensorflow as tf

    assert (savedmodel_export / "saved_model.pb").is_file()
    x = heldout_x()[:8]
    loaded = tf.saved_model.load(str(savedmodel_export))  # keep it alive: it owns the variables
    served = loaded.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(served, outputs(pruned_model, x), rtol=0, atol=1e-5)


def test_analyze_refuses_a_savedmodel_folder_as_unsupported(savedmodel_export):
    message = assert_clean_error(invoke("analyze", savedmodel_export), 4)
    assert "SavedModel" in message


def test_prune_accepts_its_own_h5_output_as_input(tmp_path):
    first = prune_to(tmp_path, "first.h5")
    result = invoke("prune", first, "-o", tmp_path / "second.keras")
    assert_ok(result)
    assert [row["width_after"] for row in table_rows(result.stdout).values()] == ["16", "12", "10"]
    assert "0 zero-out, 0 dead, 0 constant, 0 duplicate" in result.stdout  # nothing left to remove


# ---------------------------------------------------------------- verification tolerance


def test_prune_exits_3_and_writes_nothing_when_verification_fails(tmp_path, near_duplicate_model):
    output = tmp_path / "out.keras"
    result = invoke("prune", near_duplicate_model, "-o", output, "--rtol", "1e-3", "--atol", "1e-12")
    message = assert_clean_error(result, 3)
    assert "nothing was written" in message
    assert listing(tmp_path) == []


def test_prune_force_writes_the_model_despite_failed_verification(tmp_path, near_duplicate_model):
    output = tmp_path / "out.keras"
    result = invoke("prune", near_duplicate_model, "-o", output, "--rtol", "1e-3", "--atol", "1e-12", "--force", "--json")
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["verified"] is False and report["atol"] == 1e-12
    assert report["max_abs_diff"] > 1e-5  # a real change from the merge, not float32 rounding
    assert listing(tmp_path) == ["out.keras"]
    assert dense_widths(keras.saving.load_model(output)) == NARROW_WIDTHS


# ---------------------------------------------------------------- embed


def test_embed_grows_the_widths_it_was_asked_for(embedded_digits):
    result, output = embedded_digits
    assert dense_widths(keras.saving.load_model(output)) == [18, 13, 10]
    rows = table_rows(result.stdout)
    assert [(row["width_before"], row["width_after"]) for row in rows.values()] == [("16", "18"), ("12", "13"), ("10", "10")]
    assert listing(output.parent) == ["grown.keras"]


def test_embedded_model_computes_the_narrow_outputs(embedded_digits):
    x = heldout_x()
    grown, narrow = keras.saving.load_model(embedded_digits[1]), keras.saving.load_model(NARROW)
    np.testing.assert_allclose(outputs(grown, x), outputs(narrow, x), rtol=0, atol=1e-5)


def test_prune_undoes_embed(tmp_path, embedded_digits):
    result = invoke("prune", embedded_digits[1], "-o", tmp_path / "back.keras", "--json")
    assert_ok(result)
    assert [row["width_after"] for row in json.loads(result.stdout)["layers"]] == NARROW_WIDTHS


@pytest.mark.parametrize("specs, mentions", [
    (("--widen", "nosuchlayer:0"), "nosuchlayer"),
    (("--widen", "hidden_relu"), "LAYER:UNIT"),
    (("--widen", "hidden_relu:999"), "999"),
    (("--widen", "hidden_relu:one"), "one"),
    (("--null", "logits"), "logits"),
    (("--null", "hidden_relu:1:2"), "LAYER[:BIAS]"),
    ((), "--widen"),
], ids=["unknown-layer", "no-unit", "unit-out-of-range", "unit-not-a-number", "output-layer", "too-many-fields",
        "no-steps"])
def test_embed_bad_spec_is_a_usage_error_and_writes_nothing(tmp_path, specs, mentions):
    result = invoke("embed", NARROW, "-o", tmp_path / "grown.keras", *specs)
    message = assert_clean_error(result, 2)
    assert mentions in message
    assert listing(tmp_path) == []


# ---------------------------------------------------------------- the residual CNN: condense, null, data + finetune
# Issue 16: these ran on Dense chains only (the CLI refused them on CNNs with exit 4 or 2);
# on the one graph they work on every model.

CNN = SAVED_MODELS / "digits_cnn.keras"  # stem 8 + res_b 8 (joined by an Add), res_a 8 (BN, relu), head 12
CNN_WIDENED = SAVED_MODELS / "digits_cnn_widened.keras"  # the same function, channels split to 14-13-14-18
CNN_PERTURBED = SAVED_MODELS / "digits_cnn_perturbed.keras"  # the widened one, every weight moved by N(0, 1e-3)
CNN_HELDOUT = SAVED_MODELS / "digits_images_heldout.npz"  # x (297, 8, 8, 1), integer labels y
CNN_WIDTHS = {"stem": 8, "res_a": 8, "res_b": 8, "head": 12, "logits": 10}


def channel_widths(model):
    """Output channels of every Conv2D and Dense layer, by name."""
    return {layer.name: layer.filters if isinstance(layer, keras.layers.Conv2D) else layer.units
            for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))}


def images():
    data = np.load(CNN_HELDOUT)
    return data["x"], data["y"]


def assert_same_cnn_outputs(reference, candidate, x, rtol=1e-5):
    """Outputs equal within `rtol` times the output scale (float32 sums of a conv net, BN folded)."""
    expected = outputs(reference, x)
    atol = rtol * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(outputs(candidate, x), expected, rtol=0, atol=atol)


def assert_figures_of(report, reference, written, x, y):
    """The `rules.measure` figures in `report` are those of the written model on (x, y)."""
    before, after = outputs(reference, x), outputs(written, x)
    classes_before, classes_after = before.argmax(axis=-1), after.argmax(axis=-1)
    assert report["agreement"] == float(np.mean(classes_before == classes_after))
    assert report["accuracy_before"] == float(np.mean(classes_before == y))
    assert report["accuracy_after"] == float(np.mean(classes_after == y))
    assert report["accuracy_drop"] == pytest.approx(100 * (report["accuracy_before"] - report["accuracy_after"]))
    error = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert report["output_error"] == pytest.approx(error, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("source", [CNN_WIDENED, CNN_PERTURBED], ids=["widened", "perturbed"])
def test_prune_condense_on_the_residual_cnn_writes_a_verified_model(tmp_path, source):
    """Condense mode on the CNN (it used to exit 4): the widened copy's split channels are
    exact duplicates, the perturbed copy's near ones (cosine close to 1); both go back to the
    trained widths, the Add keeping stem and res_b equal, and the written model is the one
    the report describes on the validation data."""
    output, report_path = tmp_path / "condensed.keras", tmp_path / "report.json"
    result = invoke("prune", source, "-o", output, "--mode", "condense", "--validation", CNN_HELDOUT,
                    "--report", report_path)
    assert_ok(result)
    assert listing(tmp_path) == ["condensed.keras", "report.json"]
    report = json.loads(report_path.read_text())
    assert report["mode"] == "condense" and report["checked_on"] == "validation data"
    assert report["export_verified"] is True and report["export_max_abs_diff"] <= report["export_atol"]
    original, condensed = keras.saving.load_model(source), keras.saving.load_model(output)
    assert channel_widths(condensed) == CNN_WIDTHS
    assert {row["name"]: row["width_after"] for row in report["layers"]} == CNN_WIDTHS
    assert report["removed"]["duplicate"] == 17  # 6 + 5 + 6 split copies (stem and res_b share their 6)
    assert report["params_after"] == condensed.count_params() < report["params_before"] == original.count_params()
    x, y = images()
    assert_figures_of(report, original, condensed, x, y)
    if source == CNN_WIDENED:  # exact copies: the trained CNN's function
        assert_same_cnn_outputs(keras.saving.load_model(CNN), condensed, x)
    else:  # merged near copies: close to the perturbed CNN, the same classes
        assert report["output_error"] < 0.05 and report["agreement"] >= 0.99


def test_embed_null_on_the_residual_cnn_adds_channels_no_layer_reads(tmp_path):
    """--null on the CNN (it used to be refused, exit 2): a null channel in the stem's group
    (stem and res_b, joined by the Add), in res_a (bias 0.5, behind BN and relu) and in the
    head (bias -1); the outputs stay those of the CNN and exact prune removes the three
    channels again."""
    output = tmp_path / "grown.keras"
    result = invoke("embed", CNN, "-o", output, "--null", "stem", "--null", "res_a:0.5", "--null", "head:-1",
                    "--data", CNN_HELDOUT)
    assert_ok(result)
    assert listing(tmp_path) == ["grown.keras"]
    rows = table_rows(result.stdout)
    assert {name: (row["width_before"], row["width_after"]) for name, row in rows.items()} == {
        "stem": ("8", "9"), "res_a": ("8", "9"), "res_b": ("8", "9"), "head": ("12", "13"), "logits": ("10", "10"),
    }
    grown = keras.saving.load_model(output)
    assert channel_widths(grown) == {**CNN_WIDTHS, "stem": 9, "res_a": 9, "res_b": 9, "head": 13}
    weights = {name: grown.get_layer(name).get_weights() for name in CNN_WIDTHS}
    for name, bias in (("stem", 0.0), ("res_a", 0.5), ("head", -1.0)):  # zero incoming weights, the bias asked for
        np.testing.assert_array_equal(weights[name][0][..., -1], 0.0)
        assert weights[name][1][-1] == np.float32(bias)
    np.testing.assert_array_equal(weights["res_b"][0][..., -1], 0.0)  # res_b adds nothing to the stem's new channel
    for reader in ("res_a", "head", "res_b"):  # stem's, the merged stem+res_b's and res_a's new channel: read by zeros
        np.testing.assert_array_equal(weights[reader][0][:, :, -1, :], 0.0)
    positions = weights["logits"][0].reshape(-1, 13, 10)  # Flatten of head: 13 channels at every position
    np.testing.assert_array_equal(positions[:, -1, :], 0.0)
    x, _ = images()
    assert_same_cnn_outputs(keras.saving.load_model(CNN), grown, x)

    back = invoke("prune", output, "-o", tmp_path / "back.keras", "--json")
    assert_ok(back)
    report = json.loads(back.stdout)
    assert {row["name"]: row["width_after"] for row in report["layers"]} == CNN_WIDTHS
    assert report["removed"] == {"zero_out": 3, "dead": 0, "constant": 0, "duplicate": 0}
    assert report["verified"] is True


def test_prune_data_mode_with_finetune_on_the_residual_cnn_reports_the_tuned_figures(tmp_path):
    """--mode data --keep-ratio 0.5 --finetune 2 on the CNN with integer labels (it used to
    exit 4): every group keeps at most half its channels (rounded up), and the written model
    is the fine-tuned one whose figures the report and the summary give, on the calibration
    rows held out from both the refit and the fine-tuning."""
    output, report_path = tmp_path / "small.keras", tmp_path / "report.json"
    result = invoke("prune", CNN, "-o", output, "--mode", "data", "--keep-ratio", "0.5", "--finetune", "2",
                    "--data", CNN_HELDOUT, "--report", report_path)
    assert_ok(result)
    assert listing(tmp_path) == ["report.json", "small.keras"]
    report = json.loads(report_path.read_text())
    assert report["mode"] == "data" and report["rule"] == {"kind": "keep_ratio", "value": 0.5}
    assert report["export_verified"] is True
    tuned = keras.saving.load_model(output)
    widths = channel_widths(tuned)
    assert widths["stem"] == widths["res_b"]
    assert all(widths[name] <= math.ceil(0.5 * CNN_WIDTHS[name]) for name in ("stem", "res_a", "head"))
    assert widths["logits"] == 10
    assert {row["name"]: row["width_after"] for row in report["layers"]} == widths
    assert report["removed"]["refit"] > 0 and report["params_after"] == tuned.count_params()
    figures = report["finetune"]
    assert set(figures) == {"epochs", "output_error", "agreement", "accuracy_before", "accuracy_after", "accuracy_drop"}
    assert figures["epochs"] == 2
    _, (x, y), split = hold_out(*images())
    assert report["held_out"] == split and report["checked_on"] == "held-out calibration rows"
    assert_figures_of(figures, keras.saving.load_model(CNN), tuned, x, y)
    assert figures["accuracy_after"] > report["accuracy_after"]  # training on the labels helped the refit model
    assert (f"after 2 epochs of fine-tuning: agreement {100 * figures['agreement']:.2f}%, "
            f"accuracy {100 * figures['accuracy_after']:.2f}%") in result.stdout
