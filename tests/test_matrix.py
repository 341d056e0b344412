"""Every capability on every kind of model: the one-graph matrix (issue 16).

Three models of different shapes, each trained a few steps on seeded data so they are
not symmetric by construction:
- `chain`: a Dense chain with BatchNormalization (folded on read, both directions);
- `cnn`: a plain CNN (Conv2D, pooling, Flatten, Dense);
- `residual`: a residual CNN with BatchNormalization, an Add and a Concatenate side branch.
Each capability runs on each model through the library and through the CLI: the round
trips (widen, null, deepen, then prune) come back to no more parameters than the original
with outputs equal within 1e-5 relative; the approximate modes, fine-tuning, the monitors
and analyze run and say what they did.
"""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import keras_embed
from keras_embed.callbacks import BatchEmbeddingMonitor, EmbeddingMonitor, escape
from keras_embed.find.probe import probe_redundancy
from keras_embed.measure.regimes import chain_function
from keras_embed.stopping import StoppingRule
from keras_embed.tools.cli import main
from keras_embed.verify import predict

RELATIVE = 1e-5


def _chain():
    x = keras.Input((8,), name="features")
    h = keras.layers.Dense(12, name="dense_a")(x)
    h = keras.layers.BatchNormalization(name="bn_a")(h)
    h = keras.layers.Activation("relu", name="relu_a")(h)
    h = keras.layers.BatchNormalization(name="bn_b")(h)  # after the activation: folds into dense_b
    h = keras.layers.Dense(10, activation="tanh", name="dense_b")(h)
    return keras.Model(x, keras.layers.Dense(3, name="scores")(h), name="chain")


def _cnn():
    x = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv_a")(x)
    h = keras.layers.Conv2D(5, 3, activation="relu", name="conv_b")(h)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    return keras.Model(x, keras.layers.Dense(3, name="scores")(h), name="cnn")


def _residual():
    x = keras.Input((8, 8, 1), name="image")
    stem = keras.layers.Conv2D(6, 3, padding="same", name="stem")(x)
    stem = keras.layers.Activation("relu", name="stem_relu")(keras.layers.BatchNormalization(name="stem_bn")(stem))
    branch = keras.layers.Conv2D(4, 1, activation="relu", name="res_a")(stem)
    branch = keras.layers.Conv2D(6, 3, padding="same", name="res_b")(branch)
    h = keras.layers.Activation("relu", name="add_relu")(keras.layers.Add(name="add")([stem, branch]))
    side = keras.layers.Conv2D(3, 1, activation="relu", name="side")(h)
    h = keras.layers.Concatenate(name="concat")([h, side])
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(x, keras.layers.Dense(3, name="scores")(h), name="residual")


BUILDERS = {"chain": _chain, "cnn": _cnn, "residual": _residual}
FIRST = {"chain": "dense_a", "cnn": "conv_a", "residual": "stem"}  # a hidden layer to grow
SECOND = {"chain": "dense_b", "cnn": "conv_a", "residual": "res_a"}  # one read by one producer, for deepen


def _trained(kind, x, y):
    keras.utils.set_random_seed(0)
    model = BUILDERS[kind]()
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    return model


def _data(kind, samples=96, seed=0):
    rng = np.random.default_rng(seed)
    shape = (8,) if kind == "chain" else (8, 8, 1)
    x = rng.standard_normal((samples, *shape)).astype("float32")
    y = (x.reshape(samples, -1)[:, :3].sum(axis=1) > 0).astype("int64") + (x.reshape(samples, -1)[:, 3] > 1)
    return x, y


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def case(request, tmp_path_factory):
    """(kind, trained model, x, y, folder with model.keras and data.npz)."""
    kind = request.param
    x, y = _data(kind)
    model = _trained(kind, x, y)
    folder = tmp_path_factory.mktemp(kind)
    model.save(folder / "model.keras")
    np.savez(folder / "data.npz", x=x, y=y)
    return kind, model, x, y, folder


def assert_same_function(reference, candidate, x):
    expected, actual = predict(reference, x), predict(candidate, x)
    assert np.abs(expected - actual).max() <= RELATIVE * np.abs(expected).max()


def invoke(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args], prog_name="keras-embed")
    assert result.exit_code == 0, result.output
    return result


# ---------------------------------------------------------------- the embeddings and back, library


@pytest.mark.parametrize("step", ["widen", "null", "deepen"])
def test_an_embedding_then_prune_gives_back_no_more_parameters_and_the_same_outputs(case, step):
    kind, model, x, _, _ = case
    grown, figures = keras_embed.embed(
        model, widen_steps=[(FIRST[kind], 1, 0.3), (FIRST[kind], 0, -0.5)] if step == "widen" else (),
        null_steps=[(FIRST[kind], 0.2)] if step == "null" else (), deepen_layers=[SECOND[kind]] if step == "deepen" else (),
        data=x)
    before, after = keras_embed.read_model(model), keras_embed.read_model(grown)
    if step == "deepen":
        assert len(after.producers) == len(before.producers) + 1
    else:
        assert after.node(FIRST[kind]).width == before.node(FIRST[kind]).width + (2 if step == "widen" else 1)
    assert_same_function(model, grown, x)

    pruned, report = keras_embed.prune(grown, data=x if step == "deepen" else None)

    assert pruned.count_params() <= model.count_params()
    assert_same_function(model, pruned, x)
    if step == "deepen":
        assert report.to_dict()["collapsed_layers"] == [f"{SECOND[kind]}_lift"]
        assert report.to_dict()["depth_after"] == len(keras_embed.read_model(model).producers)


# ---------------------------------------------------------------- the embeddings and back, CLI


@pytest.mark.parametrize("step", ["widen", "null", "deepen"])
def test_the_cli_round_trip_gives_back_no_more_parameters_and_the_same_outputs(case, step, tmp_path):
    kind, model, x, _, folder = case
    option = {"widen": ("--widen", f"{FIRST[kind]}:2:0.7"), "null": ("--null", FIRST[kind]),
              "deepen": ("--deepen", SECOND[kind])}[step]
    invoke("embed", folder / "model.keras", "-o", tmp_path / "grown.keras", *option, "--data", folder / "data.npz")
    data = ("--data", folder / "data.npz") if step == "deepen" else ()
    invoke("prune", tmp_path / "grown.keras", "-o", tmp_path / "back.keras", *data, "--report", tmp_path / "r.json")

    back = keras.saving.load_model(tmp_path / "back.keras")
    assert back.count_params() <= model.count_params()
    assert_same_function(model, back, x)
    assert json.loads((tmp_path / "r.json").read_text())["verified"]


# ---------------------------------------------------------------- exact mode with the data rules


def test_exact_prune_with_data_keeps_the_outputs_on_the_data(case):
    kind, model, x, _, _ = case
    pruned, report = keras_embed.prune(model, data=x)
    figures = report.to_dict()
    assert figures["verified"] and figures["params_after"] <= figures["params_before"]
    assert_same_function(model, pruned, x)
    assert all(row["linear_fraction"] is not None for row in figures["layers"][:-1])


# ---------------------------------------------------------------- approximate modes


@pytest.mark.parametrize("mode", ["data", "condense"])
def test_approximate_modes_write_a_smaller_model_that_meets_its_rule(case, mode):
    kind, model, x, y, _ = case
    rule = StoppingRule("keep_ratio", 0.5) if mode == "data" else None
    pruned, report = keras_embed.prune(model, data=x, mode=mode, rule=rule, labels=y, cos=0.9)
    figures = report.to_dict()
    assert figures["mode"] == mode and "output_error" in figures and "agreement" in figures
    assert pruned.count_params() <= model.count_params()
    if mode == "data":
        assert pruned.count_params() < model.count_params()
        assert figures["removed"]["refit"] > 0


@pytest.mark.parametrize("mode", ["data", "condense"])
def test_the_cli_runs_the_approximate_modes(case, mode, tmp_path):
    kind, model, x, _, folder = case
    rule = ("--keep-ratio", "0.5") if mode == "data" else ("--cos", "0.9")
    result = invoke("prune", folder / "model.keras", "-o", tmp_path / "small.keras", "--mode", mode, *rule,
                    "--data", folder / "data.npz", "--json")
    figures = json.loads(result.stdout)
    assert figures["mode"] == mode and figures["params_after"] <= figures["params_before"]
    assert keras.saving.load_model(tmp_path / "small.keras").count_params() == figures["params_after"]


# ---------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("labels", ["integer", "one-hot", "regression"])
def test_finetune_trains_the_compressed_model_for_every_kind_of_label(case, labels, tmp_path):
    kind, model, x, y, folder = case
    targets = {"integer": y, "one-hot": np.eye(3, dtype="float32")[y],
               "regression": predict(model, x).astype("float32")}[labels]
    np.savez(tmp_path / "train.npz", x=x, y=targets)
    rule = "--keep-ratio" if labels != "integer" else "--max-accuracy-drop"
    value = "0.5" if labels != "integer" else "100"
    result = invoke("prune", folder / "model.keras", "-o", tmp_path / "tuned.keras", "--mode", "data", rule, value,
                    "--data", tmp_path / "train.npz", "--finetune", "2", "--json")
    tuned = json.loads(result.stdout)["finetune"]
    assert tuned["epochs"] == 2 and 0 <= tuned["agreement"] <= 1
    assert ("accuracy_after" in tuned) == (labels != "regression")


# ---------------------------------------------------------------- the callbacks


def _split(model, kind):
    """`model` with its first hidden layer's channels 0 and 1 split (an embedded critical point)."""
    graph = keras_embed.read_model(model, fold=False)
    return keras_embed.build_model(keras_embed.widen(keras_embed.widen(graph, FIRST[kind], 0, 0.5), FIRST[kind], 1, 0.3))


@pytest.mark.parametrize("monitor_class", [EmbeddingMonitor, BatchEmbeddingMonitor])
def test_the_monitors_log_every_group_and_flag_the_stall(case, monitor_class):
    kind, model, x, y, _ = case
    wide = _split(model, kind)
    wide.compile(keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    options = {"every": 1} if monitor_class is BatchEmbeddingMonitor else {}
    monitor = monitor_class(x, patience=1, min_delta=1.0, action="warn", **options)

    history = wide.fit(x, y, epochs=3, batch_size=len(x), verbose=0, callbacks=[monitor])

    groups = keras_embed.read_model(wide, fold=False).editable_groups()
    assert {f"embed/{group}/effective_width" for group in groups} <= set(history.history)
    assert max(history.history["embed/stalled"]) == 1.0  # a learning rate of 0: a plateau, and a split group
    group = keras_embed.read_model(wide, fold=False).group_of(FIRST[kind])
    widths = history.history[f"embed/{group}/effective_width"]
    assert widths[-1] <= keras_embed.read_model(model).node(FIRST[kind]).width  # the split copies count once


def test_escape_moves_the_split_copies_apart_and_keeps_the_outputs(case):
    kind, model, x, _, _ = case
    wide = _split(model, kind)
    summary = probe_redundancy(keras_embed.read_model(wide, fold=False), x)
    group = keras_embed.read_model(wide, fold=False).group_of(FIRST[kind])
    assert len(summary[group].groups) >= 2
    before = predict(wide, x)

    said = escape(wide, summary, x, np.random.default_rng(0), 1e-2)

    after = predict(wide, x)
    assert said.startswith("perturbed")
    assert 0 < np.abs(after - before).max() <= 1e-2 * np.abs(before).max()
    copies = keras_embed.read_model(wide, fold=False).node(FIRST[kind])
    kernel = copies.entry.kernel(copies)
    assert not np.allclose(kernel[..., 0], kernel[..., -2])  # the copy of channel 0 is no copy any more


# ---------------------------------------------------------------- analyze


def test_analyze_reports_every_producer_with_and_without_data(case, tmp_path):
    kind, model, x, _, folder = case
    without = keras_embed.analyze(model)
    with_data = keras_embed.analyze(model, data=x)
    names = [node.name for node in keras_embed.read_model(model).producers]
    assert [row["name"] for row in without] == [row["name"] for row in with_data] == names
    affine = {node.name for node in keras_embed.read_model(model).producers
              if chain_function(keras_embed.read_model(model), node).kinks == ()}
    assert all(row["linear_fraction"] == (1.0 if row["name"] in affine else None) for row in without[:-1])
    invoke("analyze", folder / "model.keras", "--data", folder / "data.npz", "--json", tmp_path / "a.json")
    assert [row["name"] for row in json.loads((tmp_path / "a.json").read_text())["layers"]] == names
