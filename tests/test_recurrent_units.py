"""Recurrent units as units (issue 19): an LSTM's, GRU's or SimpleRNN's units are a channel
group coupled across the gates and through the recurrence.

`embed --widen RECURRENT:UNIT:ALPHA` splits a unit in every gate block (its columns copied
in the kernel, the recurrent kernel and the bias; its recurrent row and its readers' rows
split 1 - alpha / alpha); `prune` merges the copies back exactly, through the CLI and
exported to SavedModel and TFLite (unrolled), verified. A unit whose state-making block
(LSTM's cell candidate, GRU's candidate, SimpleRNN's only one) has zero weights holds zero
and goes; so does one nothing reads (its recurrent row and its readers' rows zero); a unit
of constant gates varies with the step and stays. The approximate modes leave the units
alone (removing one changes the later steps of the others).
"""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_embed
from builders import assert_same_function
from keras_embed.stopping import StoppingRule
from keras_embed.tools.cli import main
from keras_embed.verify import calibration_inputs

L = keras.layers
VOCABULARY = 40
KINDS = {
    "lstm": lambda: L.LSTM(6, name="recurrent"),
    "lstm-sequences": lambda: L.LSTM(5, return_sequences=True, name="recurrent"),
    "gru": lambda: L.GRU(5, return_sequences=True, name="recurrent"),
    "gru-reset-before": lambda: L.GRU(5, reset_after=False, use_bias=False, name="recurrent"),
    "simple-rnn": lambda: L.SimpleRNN(4, activation="relu", name="recurrent"),
}
GATES = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}
STATE_BLOCK = {"LSTM": 2, "GRU": 2, "SimpleRNN": 0}  # LSTM's cell candidate, GRU's candidate, SimpleRNN's one block


def recurrent_classifier(recurrent, steps=9):
    """Embedding, a Dense on every token, the recurrent layer, a Dense head."""
    tokens = keras.Input((steps,), dtype="int32", name="tokens")
    h = recurrent()(L.Dense(7, activation="relu", name="token_dense")(L.Embedding(VOCABULARY, 8, name="embed")(tokens)))
    h = L.GlobalAveragePooling1D(name="mean")(h) if len(h.shape) == 3 else h
    return keras.Model(tokens, L.Dense(3, name="scores")(L.Dense(5, activation="relu", name="hidden")(h)),
                       name="recurrent_classifier")


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], prog_name="keras-embed")


@pytest.fixture(scope="module", params=sorted(KINDS))
def case(request):
    keras.utils.set_random_seed(3)
    model = recurrent_classifier(KINDS[request.param])
    return request.param, model, calibration_inputs(model, 64, 0)


def test_split_units_come_back_through_the_cli_and_export(case, tmp_path):
    _, model, x = case
    units = model.get_layer("recurrent").units
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", x)
    grown = invoke("embed", tmp_path / "model.keras", "-o", tmp_path / "grown.keras",
                   "--widen", "recurrent:0:0.3", "--widen", f"recurrent:{units - 1}:-0.5", "--widen", "hidden:1:0.6")
    assert grown.exit_code == 0, grown.output
    widened = keras.saving.load_model(tmp_path / "grown.keras")
    assert widened.get_layer("recurrent").units == units + 2
    assert_same_function(model, widened, x)

    for output in ("back.keras", "back.tflite", "back_savedmodel/"):  # each verified by the command
        back = invoke("prune", tmp_path / "grown.keras", "-o", f"{tmp_path}/{output}", "--data", tmp_path / "x.npy",
                      "--report", tmp_path / "report.json", "--overwrite")
        assert back.exit_code == 0, back.output
        assert json.loads((tmp_path / "report.json").read_text())["removed"]["duplicate"] == 3

    restored = keras.saving.load_model(tmp_path / "back.keras")
    assert restored.get_layer("recurrent").units == units
    assert restored.count_params() == model.count_params()
    assert_same_function(model, restored, calibration_inputs(model, 64, 1))


def _set_unit(layer, unit, blocks, value=0.0, rows=False):
    """`layer`'s weights with `unit`'s columns in the gate `blocks` (every weight) set to
    `value`; with `rows`, instead its recurrent row (how the units read it at the next step)."""
    gates, weights = GATES[type(layer).__name__], layer.get_weights()
    if rows:
        weights[1][unit] = value
    else:
        for weight in weights:
            view = weight.reshape(weight.shape[:-1] + (gates, -1))
            view[..., list(blocks), unit] = value
    layer.set_weights(weights)


def test_a_unit_that_holds_zero_or_that_nothing_reads_is_removed_and_one_of_constant_gates_stays(case):
    _, shared, x = case
    model = keras.models.clone_model(shared)  # the other tests use the shared model's weights
    model.set_weights(shared.get_weights())
    layer = model.get_layer("recurrent")
    _set_unit(layer, 0, [STATE_BLOCK[type(layer).__name__]])  # holds zero at every step
    _set_unit(layer, 1, [], rows=True)  # read by nothing: no recurrent row, no reader row (after the mean too)
    kernel, bias = model.get_layer("hidden").get_weights()
    kernel[1] = 0.0
    model.get_layer("hidden").set_weights([kernel, bias])
    if layer.use_bias:  # unit 2: no input or recurrent columns, a bias: constant gates, a state that varies with the step
        _set_unit(layer, 2, range(GATES[type(layer).__name__]))
        weights = layer.get_weights()
        weights[2][..., 2::layer.units] = 0.5
        layer.set_weights(weights)

    pruned, report = keras_embed.prune(model)

    assert pruned.get_layer("recurrent").units == layer.units - 2
    removed = report.to_dict()["removed"]
    assert (removed["constant"], removed["zero_out"]) == (1, 1)
    assert_same_function(model, pruned, x)


def test_the_approximate_modes_leave_the_units_alone(case):
    _, model, x = case
    for mode, extra in (("data", {"rule": StoppingRule("keep_ratio", 0.5), "data": x}), ("condense", {"cos": 0.5})):
        small, _ = keras_embed.prune(model, mode=mode, force=True, **extra)
        assert small.get_layer("recurrent").units == model.get_layer("recurrent").units, mode


def test_a_unit_takes_no_null_or_constant_copy():
    keras.utils.set_random_seed(0)
    model = recurrent_classifier(KINDS["lstm"])
    with pytest.raises(ValueError, match="is recurrent: its units grow by --widen"):
        keras_embed.embed(model, null_steps=[("recurrent", 0.0)])


def test_a_relu_layer_lifted_after_the_lstm_is_pruned_away(tmp_path):
    """`embed --deepen RECURRENT` inserts a Dense (relu, identity on the data) after the layer."""
    keras.utils.set_random_seed(2)
    model = recurrent_classifier(KINDS["lstm-sequences"])
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", calibration_inputs(model, 128, 0))
    lifted = invoke("embed", tmp_path / "model.keras", "-o", tmp_path / "lifted.keras", "--deepen", "recurrent",
                    "--data", tmp_path / "x.npy")
    assert lifted.exit_code == 0, lifted.output
    assert "Dense" in {type(layer).__name__ for layer in keras.saving.load_model(tmp_path / "lifted.keras").layers[4:6]}
    back = invoke("prune", tmp_path / "lifted.keras", "-o", tmp_path / "back.keras", "--data", tmp_path / "x.npy")
    assert back.exit_code == 0, back.output
    restored = keras.saving.load_model(tmp_path / "back.keras")
    assert restored.count_params() == model.count_params()
    assert_same_function(model, restored, np.load(tmp_path / "x.npy"), relative=1e-4)  # outputs ~7e-3, the lift's bias ~1


def test_tflite_output_of_a_recurrent_model_of_any_length_is_refused_before_any_work(tmp_path):
    keras.utils.set_random_seed(0)
    model = recurrent_classifier(KINDS["gru"], steps=None)
    model.save(tmp_path / "model.keras")
    result = invoke("prune", tmp_path / "model.keras", "-o", tmp_path / "small.tflite")
    assert result.exit_code == 2, result.output
    assert "reads sequences of any length" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "small.tflite").exists()


@st.composite
def recurrent_layers(draw):
    kind = draw(st.sampled_from(sorted(GATES)))
    config = {"units": draw(st.integers(2, 6)), "use_bias": draw(st.booleans()),
              "return_sequences": draw(st.booleans()),
              "activation": draw(st.sampled_from(["tanh", "relu", "linear"])),
              "bias_initializer": "random_normal"}
    if kind == "GRU":
        config["reset_after"] = draw(st.booleans())
    splits = draw(st.lists(st.tuples(st.integers(0, 100), st.floats(-1.0, 2.0)), min_size=1, max_size=3))
    return kind, config, splits


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer=recurrent_layers(), seed=st.integers(0, 2**16))
def test_property_random_recurrent_layers_round_trip_unit_splits(layer, seed):
    kind, config, splits = layer
    keras.utils.set_random_seed(seed)
    model = recurrent_classifier(lambda: getattr(L, kind)(name="recurrent", **config), steps=6)
    x = calibration_inputs(model, 16, seed)
    steps, width = [], config["units"]
    for unit, alpha in splits:  # each split may copy a copy
        steps.append(("recurrent", unit % width, alpha))
        width += 1
    grown, _ = keras_embed.embed(model, widen_steps=steps)
    assert grown.get_layer("recurrent").units == width
    assert_same_function(model, grown, x)

    pruned, _ = keras_embed.prune(grown)

    assert pruned.count_params() <= model.count_params()
    assert_same_function(model, pruned, x)
