"""The command line with calibration data: `embed --deepen`, `prune` and `analyze` with
--data / --dataset, and the refusal of data that cannot be used.

The round trip: the narrow digits model is deepened by a critical lift after each hidden
layer (identity relu layers on the digits data), then pruned with the same data; the
lifts must be found linearized and collapsed, giving back the narrow depth, parameter
count and outputs, also on the held-out digits.
"""

import json
import os
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from keras_embed.files.data import bundled_dataset
from keras_embed.tools.cli import main

SAVED_MODELS = Path(__file__).resolve().parents[1] / "saved_models"
NARROW = SAVED_MODELS / "digits_narrow.keras"
HELDOUT = SAVED_MODELS / "digits_heldout.npz"
LIFTS = ["hidden_relu_lift", "hidden_tanh_lift"]
DEEP_NAMES = ["hidden_relu", "hidden_relu_lift", "hidden_tanh", "hidden_tanh_lift", "logits"]


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], prog_name="keras-embed")


def assert_ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output


def assert_one_line_error(result, code=2):
    """Exit `code`, no traceback, nothing on stdout, and a single error line on stderr
    (ours, or the `Error:` line of click's usage message). Returns that line."""
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}\n{result.output}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith(("keras-embed: error: ", "Error: "))]
    assert len(errors) == 1, result.stderr
    if errors[0].startswith("keras-embed: error: "):
        assert lines == errors, result.stderr
    else:
        assert lines[0].startswith("Usage:") and lines[-1] == errors[0], result.stderr
    return errors[0]


def outputs(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)


def dense_names(model):
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Dense)]


def table_rows(text):
    """Rows of the first aligned table in `text`, keyed by their first cell."""
    lines = text.strip().splitlines()
    header = lines[0].split()
    assert set(lines[1].replace(" ", "")) == {"-"}, f"no table in:\n{text}"
    rows = {}
    for line in lines[2:]:
        cells = line.split()
        if len(cells) != len(header):
            break
        rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.fixture(scope="module")
def narrow():
    return keras.saving.load_model(NARROW)


@pytest.fixture(scope="module")
def digits():
    return bundled_dataset("digits")[0]


@pytest.fixture(scope="module")
def heldout():
    return np.load(HELDOUT)["x"]


# ---------------------------------------------------------------- embed --deepen, then prune


@pytest.fixture(scope="module")
def deepened(tmp_path_factory):
    output = tmp_path_factory.mktemp("deepened") / "deep.keras"
    result = invoke("embed", NARROW, "-o", output, "--deepen", "hidden_relu", "--deepen", "hidden_tanh",
                    "--dataset", "digits")
    assert_ok(result)
    return result, output


@pytest.fixture(scope="module")
def pruned_back(tmp_path_factory, deepened):
    folder = tmp_path_factory.mktemp("back")
    output, report = folder / "back.keras", folder / "report.json"
    result = invoke("prune", deepened[1], "-o", output, "--dataset", "digits", "--validation", HELDOUT,
                    "--report", report)
    assert_ok(result)
    return result, output, json.loads(report.read_text())


def test_embed_deepen_inserts_an_identity_lift_after_each_named_layer(deepened, narrow, digits):
    result, output = deepened
    deep = keras.saving.load_model(output)
    assert dense_names(deep) == DEEP_NAMES
    rows = table_rows(result.stdout)
    assert [(name, row["width_before"], row["width_after"]) for name, row in rows.items()] == [
        ("hidden_relu", "16", "16"), ("hidden_relu_lift", "(new)", "16"), ("hidden_tanh", "12", "12"),
        ("hidden_tanh_lift", "(new)", "12"), ("logits", "10", "10"),
    ]
    np.testing.assert_allclose(outputs(deep, digits), outputs(narrow, digits), rtol=0, atol=1e-5)


def test_prune_collapses_both_lifts_back_to_the_narrow_depth_and_size(pruned_back, narrow):
    _, _, report = pruned_back
    assert (report["depth_before"], report["depth_after"]) == (5, 3)
    assert report["collapsed_layers"] == LIFTS
    assert report["not_collapsed_would_grow"] == []
    assert report["params_after"] == narrow.count_params()
    assert report["max_abs_diff"] <= 1e-5
    assert report["max_abs_diff_validation"] is not None and report["max_abs_diff_validation"] <= 1e-5
    assert report["verified"] is True
    assert report["calibration"] == "user data"


def test_prune_report_gives_the_linearized_fraction_of_every_hidden_layer(pruned_back):
    _, _, report = pruned_back
    linearized = {row["name"]: row["linear_fraction"] for row in report["layers"]}
    assert list(linearized) == DEEP_NAMES
    assert linearized["hidden_relu_lift"] == linearized["hidden_tanh_lift"] == 1.0
    for name in ("hidden_relu", "hidden_tanh"):
        assert isinstance(linearized[name], float) and 0.0 <= linearized[name] < 1.0
    assert linearized["logits"] is None
    assert [row["width_after"] for row in report["layers"]] == [16, 0, 12, 0, 10]


def test_prune_summary_names_the_collapsed_layers_and_the_depth(pruned_back):
    result, _, _ = pruned_back
    assert "depth: 5 -> 3" in result.stdout
    assert f"collapsed linearized layers: {', '.join(LIFTS)}" in result.stdout
    assert "on validation data" in result.stdout
    rows = table_rows(result.stdout)
    assert rows["hidden_relu_lift"]["linear_fraction"] == "1.0"
    assert rows["logits"]["linear_fraction"] == "-"


def test_pruned_model_is_the_narrow_network_again(pruned_back, narrow, heldout, digits):
    _, output, _ = pruned_back
    back = keras.saving.load_model(output)
    assert dense_names(back) == dense_names(narrow)
    assert back.count_params() == narrow.count_params()
    for x in (digits, heldout):
        np.testing.assert_allclose(outputs(back, x), outputs(narrow, x), rtol=0, atol=1e-5)


def test_analyze_with_data_shows_the_linear_fraction_and_the_collapses(deepened):
    result = invoke("analyze", deepened[1], "--data", HELDOUT)
    assert_ok(result)
    rows = table_rows(result.stdout)
    assert list(rows) == DEEP_NAMES
    assert "linear_fraction" in result.stdout.splitlines()[0]
    for lift in LIFTS:
        assert (rows[lift]["linear_fraction"], rows[lift]["collapsed"], rows[lift]["effective_width"]) == ("1.0", "True", "0")
    assert 0.0 <= float(rows["hidden_tanh"]["linear_fraction"]) < 1.0
    assert rows["hidden_tanh"]["collapsed"] == "False"


def test_analyze_json_with_dataset_gives_linear_fractions(deepened):
    result = invoke("analyze", deepened[1], "--dataset", "digits", "--json", "-")
    assert_ok(result)
    layers = {row["name"]: row for row in json.loads(result.stdout)["layers"]}
    assert [layers[lift]["linear_fraction"] for lift in LIFTS] == [1.0, 1.0]
    assert [layers[name]["effective_width"] for name in DEEP_NAMES] == [16, 0, 12, 0, 10]


def test_analyze_without_data_shows_no_linear_fraction(deepened):
    result = invoke("analyze", deepened[1])
    assert_ok(result)
    assert "linear_fraction" not in result.stdout


# ---------------------------------------------------------------- embed --deepen refusals


@pytest.mark.parametrize("extra, mentions", [
    ((), "--data"),
    (("--dataset", "digits", "--deepen", "logits"), "logits"),
    (("--dataset", "digits", "--margin", "0"), "--margin"),
], ids=["no-data", "output-layer", "zero-margin"])
def test_embed_deepen_refuses_what_it_cannot_do_and_writes_nothing(tmp_path, extra, mentions):
    result = invoke("embed", NARROW, "-o", tmp_path / "deep.keras", "--deepen", "hidden_relu", *extra)
    assert mentions in assert_one_line_error(result)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- data that cannot be used


def npy(array):
    return lambda path: np.save(path.with_suffix(".npy"), array) or path.with_suffix(".npy")


def npz(**arrays):
    return lambda path: np.savez(path.with_suffix(".npz"), **arrays) or path.with_suffix(".npz")


def with_value(value):
    x = np.random.default_rng(0).uniform(0.0, 1.0, (20, 64)).astype("float32")
    x[7, 13] = value
    return x


BAD_DATA = {
    "feature-shape": (npy(np.zeros((4, 7), "float32")), ("(4, 7)", "(n, 64)")),
    "nan": (npy(with_value(np.nan)), ("NaN",)),
    "inf": (npy(with_value(np.inf)), ("infinite",)),
    "empty-array": (npy(np.zeros((0, 64), "float32")), ("no samples",)),
    "npz-without-arrays": (npz(), ("no arrays",)),
    "npz-x-wrong-shape": (npz(x=np.zeros((3, 8, 8), "float32")), ("(3, 8, 8)",)),
}


@pytest.fixture()
def workspace(tmp_path, deepened):
    """A copy of the deepened model in in/, an empty out/ folder."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    model = tmp_path / "in" / "deep.keras"
    shutil.copyfile(deepened[1], model)
    return tmp_path, model


def assert_untouched(workspace, data_files, deepened):
    """Nothing written to out/, nothing new in in/, the model file byte-identical."""
    folder, model = workspace
    assert os.listdir(folder / "out") == []
    assert sorted(os.listdir(folder / "in")) == sorted(["deep.keras", *data_files])
    assert model.read_bytes() == deepened[1].read_bytes()


@pytest.mark.parametrize("write, mentions", BAD_DATA.values(), ids=BAD_DATA.keys())
@pytest.mark.parametrize("option", ["--data", "--validation"])
def test_prune_refuses_unusable_data_in_one_line_and_writes_nothing(workspace, deepened, write, mentions, option):
    folder, model = workspace
    bad = write(folder / "in" / "bad")
    other = ("--dataset", "digits") if option == "--validation" else ()

    result = invoke("prune", model, "-o", folder / "out" / "back.keras", "--report", folder / "out" / "report.json",
                    option, bad, *other)

    message = assert_one_line_error(result)
    missing = [word for word in mentions if word not in message]
    assert not missing, f"{message!r} does not mention {missing}"
    assert_untouched(workspace, [bad.name], deepened)


def test_prune_refuses_data_and_dataset_together(workspace, deepened):
    folder, model = workspace
    good = npy(np.zeros((5, 64), "float32"))(folder / "in" / "good")

    result = invoke("prune", model, "-o", folder / "out" / "back.keras", "--data", good, "--dataset", "digits")

    assert "not both" in assert_one_line_error(result)
    assert_untouched(workspace, [good.name], deepened)


@pytest.mark.parametrize("name", ["nan", "feature-shape"])
def test_embed_deepen_refuses_unusable_data_in_one_line(workspace, deepened, name):
    folder, model = workspace
    write, mentions = BAD_DATA[name]
    bad = write(folder / "in" / "bad")

    result = invoke("embed", model, "-o", folder / "out" / "deeper.keras", "--deepen", "hidden_tanh", "--data", bad)

    assert mentions[0] in assert_one_line_error(result)
    assert_untouched(workspace, [bad.name], deepened)
