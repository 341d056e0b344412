"""Convolutional and branching models: channel groups, rules, operators, round trips.

The property tests draw random small CNNs (residual Add, Concatenate, BatchNormalization,
DepthwiseConv2D, pooling, padding, Flatten or global pooling), grow them with the
embedding operators and prune them back: never more parameters than the original, the
same outputs.
"""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builders import cnns, examples, image_inputs, randomize_network
from keras_embed.edit.operators import deepen, widen
from keras_embed.errors import UnsupportedLayerError
from keras_embed.find.constants import weight_constants
from keras_embed.find.weight_rules import find_redundancy
from keras_embed.model.build import build_model
from keras_embed.model.read import read_model
from keras_embed.pipeline import lower_bounds, prune
from keras_embed.tools.cli import main

REMOVAL_KINDS = ("zero_out", "dead", "constant", "duplicates", "refit")


def _assert_same_outputs(reference, candidate, x, rtol=1e-5):
    expected, actual = (keras.ops.convert_to_numpy(model(x)) for model in (reference, candidate))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * max(1.0, float(np.abs(expected).max())))


def _removed(row):
    """Channels a report row says its group lost, by every kind together."""
    return sum(row[kind] for kind in REMOVAL_KINDS)


@settings(max_examples=examples(50), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cnns(), st.data())
def test_property_widen_then_prune_restores_size_and_outputs(cnn, data):
    model, editable = cnn()
    graph = original = read_model(model)
    for _ in range(data.draw(st.integers(1, 5))):
        layer = data.draw(st.sampled_from(editable))
        channel = data.draw(st.integers(0, graph.node(layer).width - 1))
        graph = widen(graph, layer, channel, data.draw(st.floats(-1.0, 2.0)))
    wide = build_model(graph)
    x = image_inputs(model)
    _assert_same_outputs(model, wide, x)
    pruned, report = prune(wide)
    assert pruned.count_params() <= original.params
    kept = read_model(pruned).by_name  # a layer with a linear activation may have been folded away
    assert all(kept[name].width <= original.node(name).width for name in editable if name in kept)
    _assert_same_outputs(model, pruned, x)
    assert report.to_dict()["verified"]


@settings(max_examples=examples(50), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cnns(), st.data())
def test_property_deepen_then_prune_with_data_restores_depth(cnn, data):
    model, editable = cnn()
    graph = read_model(model)
    x = image_inputs(model)
    deepened = []
    for layer in editable:
        try:
            graph = deepen(graph, layer, lower_bounds(graph, layer, x), data.draw(st.floats(0.1, 2.0)))
            deepened.append(layer)
        except ValueError:  # not read by exactly one Dense/Conv2D, or a padded reader of a signed output
            continue
    deep = build_model(graph)
    _assert_same_outputs(model, deep, x, rtol=1e-4)
    pruned, report = prune(deep, data=x)
    producers = lambda m: len(read_model(m).producers)  # noqa: E731
    assert producers(pruned) <= producers(model)  # a layer of the model may be linear on x too
    assert len(report.to_dict()["collapsed_layers"]) >= len(deepened)
    _assert_same_outputs(model, pruned, x, rtol=1e-4)


def _residual(dead_in_stem=False, rng=None):
    rng = rng or np.random.default_rng(0)
    image = keras.Input((5, 5, 2))
    stem = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="stem")(image)
    branch = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="res_a")(stem)
    branch = keras.layers.Conv2D(4, 1, name="res_b")(branch)
    merged = keras.layers.Add(name="add")([stem, branch])
    flat = keras.layers.Flatten(name="flatten")(keras.layers.Activation("relu", name="add_relu")(merged))
    model = randomize_network(keras.Model(image, keras.layers.Dense(2, name="out")(flat)), rng)
    if dead_in_stem:  # stem channel 1 is zero in (relu(bias < 0) = 0) but res_b's channel 1 is not
        kernel, bias = model.get_layer("stem").get_weights()
        kernel[..., 1], bias[1] = 0.0, -1.0
        model.get_layer("stem").set_weights([kernel, bias])
    return model


def test_add_couples_channels_across_branches():
    graph = read_model(_residual())
    assert graph.group_of("res_b") == graph.group_of("stem") != graph.group_of("res_a")
    wide = widen(graph, "res_b", 2, 0.3)
    assert wide.node("stem").width == wide.node("res_b").width == 5
    assert wide.node("out").weights[0].shape[0] == 5 * 5 * 5  # Flatten rows follow the channels


def test_channel_dead_in_one_add_branch_only_is_kept():
    model = _residual(dead_in_stem=True)
    graph = read_model(model)
    constants = weight_constants(graph)
    assert constants["stem"][1] == 0.0 and np.isnan(constants["add"][1])  # what the rules see
    edits = find_redundancy(graph)
    assert graph.group_of("stem") not in {edit.group for edit in edits}  # res_b's channel 1 still carries signal into the sum
    pruned, _ = prune(model)
    assert read_model(pruned).node("stem").width == 4
    _assert_same_outputs(model, pruned, image_inputs(model))


def test_channel_dead_in_every_add_branch_goes_from_both():
    model = _residual(dead_in_stem=True)
    kernel, bias = model.get_layer("res_b").get_weights()
    kernel[..., 1], bias[1] = 0.0, 0.0
    model.get_layer("res_b").set_weights([kernel, bias])
    pruned, report = prune(model)
    assert read_model(pruned).node("stem").width == read_model(pruned).node("res_b").width == 3
    rows = {row["name"]: row for row in report.to_dict()["layers"]}
    assert rows["stem"]["group"] == rows["res_b"]["group"]
    # the old report's channels_removed: width_before - width_after, and the kinds add up to it
    assert rows["stem"]["width_before"] - rows["stem"]["width_after"] == 1
    assert rows["res_b"]["width_before"] - rows["res_b"]["width_after"] == 1
    assert _removed(rows["stem"]) == _removed(rows["res_b"]) == 1
    _assert_same_outputs(model, pruned, image_inputs(model))


@pytest.mark.parametrize("padding, kernel_size, removed", [("valid", 3, True), ("same", 1, True), ("same", 3, False)])
def test_constant_channel_is_folded_only_where_no_zero_padding_sees_it(padding, kernel_size, removed):
    image = keras.Input((6, 6, 1))
    first = keras.layers.Conv2D(3, 3, padding="same", activation="tanh", name="first")(image)
    second = keras.layers.Conv2D(2, kernel_size, padding=padding, name="second")(first)
    model = randomize_network(keras.Model(image, keras.layers.Flatten()(second)), np.random.default_rng(1))
    kernel, bias = model.get_layer("first").get_weights()
    kernel[..., 0], bias[0] = 0.0, 0.7  # channel 0 is tanh(0.7) everywhere
    model.get_layer("first").set_weights([kernel, bias])
    pruned, _ = prune(model)
    assert read_model(pruned).node("first").width == (2 if removed else 3)
    _assert_same_outputs(model, pruned, image_inputs(model))


def test_positive_multiple_filters_merge_on_a_relu_path():
    image = keras.Input((6, 6, 1))
    first = keras.layers.Conv2D(3, 3, activation="relu", name="first")(image)
    pooled = keras.layers.MaxPooling2D()(first)
    model = randomize_network(keras.Model(image, keras.layers.Dense(2, name="out")(keras.layers.Flatten()(pooled))),
                              np.random.default_rng(2))
    kernel, bias = model.get_layer("first").get_weights()
    kernel[..., 2], bias[2] = 2.5 * kernel[..., 0], 2.5 * bias[0]
    model.get_layer("first").set_weights([kernel, bias])
    pruned, _ = prune(model)
    assert read_model(pruned).node("first").width == 2
    _assert_same_outputs(model, pruned, image_inputs(model))


@pytest.mark.parametrize("allow_growth", [False, True])
def test_two_valid_convolutions_fold_into_a_larger_one_only_with_allow_growth(allow_growth):
    image = keras.Input((7, 7, 2))
    first = keras.layers.Conv2D(1, 3, activation="relu", name="first")(image)  # 19 + 10 weights; merged: 66
    second = keras.layers.Conv2D(2, 2, strides=2, name="second")(first)
    model = randomize_network(keras.Model(image, keras.layers.Flatten()(second)), np.random.default_rng(4))
    kernel, bias = model.get_layer("first").get_weights()
    model.get_layer("first").set_weights([kernel, np.abs(bias) + 20.0])  # relu never clips on the data
    x = image_inputs(model)
    pruned, report = prune(model, data=x, allow_growth=allow_growth)
    figures = report.to_dict()
    if allow_growth:
        assert figures["collapsed_layers"] == ["first"] and figures["depth_after"] == 1
        assert tuple(pruned.get_layer("second").kernel_size) == (4, 4)
    else:
        assert figures["not_collapsed_would_grow"] == ["first"] and figures["depth_after"] == 2
    _assert_same_outputs(model, pruned, x, rtol=1e-4)


def test_batchnorm_after_conv_is_folded():
    image = keras.Input((5, 5, 1))
    conv = keras.layers.Conv2D(3, 3, name="conv")(image)
    normalized = keras.layers.BatchNormalization(name="bn")(conv)
    model = randomize_network(keras.Model(image, keras.layers.GlobalMaxPooling2D()(normalized)), np.random.default_rng(3))
    graph = read_model(model)
    assert "bn" not in graph.by_name and [node.kind for node in graph.nodes] == ["InputLayer", "Conv2D", "GlobalMaxPooling2D"]
    assert graph.outputs == (graph.nodes[-1].name,) and graph.nodes[-1].inputs == ("conv",)
    _assert_same_outputs(model, build_model(graph), image_inputs(model))


@pytest.mark.parametrize("layer, message", [
    (lambda h: keras.layers.UpSampling2D(interpolation="bicubic", name="up")(h), "bicubic"),
    (lambda h: keras.layers.Reshape((6, 12), name="reshape")(h), "across the channel axis"),
])
def test_unsupported_structures_are_named(layer, message):
    image = keras.Input((6, 6, 2))
    model = keras.Model(image, layer(keras.layers.Conv2D(2, 1)(image)))
    with pytest.raises(UnsupportedLayerError, match=message):
        read_model(model)


def _widen_and_prune_back(model, layer, x):
    """Widens channel 0 of `layer` (alpha 0.3), checks the outputs, prunes it back exactly."""
    graph = read_model(model)
    wide = build_model(widen(graph, layer, 0, 0.3))
    _assert_same_outputs(model, wide, x)
    assert read_model(wide).node(layer).width == graph.node(layer).width + 1
    pruned, report = prune(wide)
    assert report.to_dict()["verified"] and pruned.count_params() <= model.count_params()
    assert read_model(pruned).node(layer).width == graph.node(layer).width
    _assert_same_outputs(model, pruned, x)


def test_dilated_convolution_is_read_widened_and_pruned_back():
    """Once refused ("dilation"): the registry reads dilated convolutions now."""
    image = keras.Input((9, 9, 2))
    h = keras.layers.Conv2D(3, 3, dilation_rate=2, padding="same", activation="relu", name="dilated")(image)
    h = keras.layers.Conv2D(2, 3, dilation_rate=2, name="reader")(h)
    model = randomize_network(keras.Model(image, keras.layers.Flatten()(h)), np.random.default_rng(6))
    _widen_and_prune_back(model, "dilated", image_inputs(model))


def test_dilated_valid_convolutions_are_not_composed():
    """Two `valid` convolutions compose into one only without dilation (the taps would
    not be contiguous): the linear one stays, and the outputs too."""
    image = keras.Input((9, 9, 2))
    first = keras.layers.Conv2D(2, 3, dilation_rate=2, activation="relu", name="first")(image)
    second = keras.layers.Conv2D(2, 2, name="second")(first)
    model = randomize_network(keras.Model(image, keras.layers.Flatten()(second)), np.random.default_rng(7))
    kernel, bias = model.get_layer("first").get_weights()
    model.get_layer("first").set_weights([kernel, np.abs(bias) + 20.0])  # relu never clips on the data
    x = image_inputs(model)
    pruned, report = prune(model, data=x, allow_growth=True)
    figures = report.to_dict()
    assert figures["collapsed_layers"] == [] and figures["depth_after"] == 2
    assert tuple(pruned.get_layer("first").dilation_rate) == (2, 2)
    _assert_same_outputs(model, pruned, x, rtol=1e-4)


def test_add_of_two_concatenations_couples_their_groups_position_by_position():
    """Once refused ("only tensors of one" group): an Add of two tensors with the same
    layout joins their groups segment by segment, so it is read, widened and pruned."""
    image = keras.Input((6, 6, 2))
    left = keras.layers.Conv2D(2, 1, activation="relu", name="left")(image)
    right = keras.layers.Conv2D(3, 1, activation="relu", name="right")(image)
    first = keras.layers.Concatenate(name="first")([left, right])
    left_b = keras.layers.Conv2D(2, 1, name="left_b")(left)
    right_b = keras.layers.Conv2D(3, 1, name="right_b")(right)
    second = keras.layers.Concatenate(name="second")([left_b, right_b])
    merged = keras.layers.Add(name="add")([first, second])
    model = randomize_network(keras.Model(image, keras.layers.Dense(2, name="out")(keras.layers.Flatten()(merged))),
                              np.random.default_rng(8))
    graph = read_model(model)
    assert graph.group_of("left") == graph.group_of("left_b") != graph.group_of("right") == graph.group_of("right_b")
    assert [segment.group for segment in graph.layout("add")] == [graph.group_of("left"), graph.group_of("right")]
    x = image_inputs(model)
    _widen_and_prune_back(model, "left", x)
    _widen_and_prune_back(model, "right_b", x)


def test_cli_prunes_the_widened_example_back(tmp_path, saved_models):
    report = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["prune", str(saved_models / "digits_cnn_widened.keras"), "-o", str(tmp_path / "p.keras"),
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    widths = {row["name"]: (row["width_before"], row["width_after"], row["width_before"] - row["width_after"])
              for row in figures["layers"]}
    assert widths == {"stem": (14, 8, 6), "res_a": (13, 8, 5), "res_b": (14, 8, 6), "head": (18, 12, 6), "logits": (10, 10, 0)}
    assert {row["name"]: _removed(row) for row in figures["layers"]} == {
        "stem": 6, "res_a": 5, "res_b": 6, "head": 6, "logits": 0}  # every channel removed is accounted for
    assert figures["flops_after"] < figures["flops_before"] and figures["verified"]
    narrow = keras.saving.load_model(saved_models / "digits_cnn.keras")
    x = np.load(saved_models / "digits_images_heldout.npz")["x"]
    _assert_same_outputs(narrow, keras.saving.load_model(tmp_path / "p.keras"), x, rtol=1e-4)


def test_cli_embeds_a_cnn_and_adds_a_null_channel(tmp_path, saved_models):
    """--null was refused on CNNs ("--null supports chains"); it works on every model now."""
    source = str(saved_models / "digits_cnn.keras")
    data = str(saved_models / "digits_images_heldout.npz")
    result = CliRunner().invoke(main, ["embed", source, "-o", str(tmp_path / "w.keras"), "--widen", "stem:3:0.25",
                                       "--deepen", "res_a", "--data", data])
    assert result.exit_code == 0, result.output
    grown = read_model(keras.saving.load_model(tmp_path / "w.keras"))
    assert grown.node("stem").width == grown.node("res_b").width == 9 and "res_a_lift" in grown.by_name
    result = CliRunner().invoke(main, ["embed", source, "-o", str(tmp_path / "n.keras"), "--null", "stem"])
    assert result.exit_code == 0, result.output
    original, nulled = keras.saving.load_model(source), keras.saving.load_model(tmp_path / "n.keras")
    graph = read_model(nulled)
    assert graph.node("stem").width == graph.node("res_b").width == 9
    stem, res_b = graph.node("stem"), graph.node("res_b")
    assert not np.any(stem.entry.kernel(stem)[..., -1]) and not np.any(res_b.entry.kernel(res_b)[..., -1])
    assert nulled.count_params() > original.count_params()
    x = np.load(saved_models / "digits_images_heldout.npz")["x"]
    _assert_same_outputs(original, nulled, x)
    pruned, _ = prune(nulled)  # the null channel goes again
    assert read_model(pruned).node("stem").width == 8
    _assert_same_outputs(original, pruned, x)


def test_cli_condenses_a_cnn(tmp_path, saved_models):
    """--mode condense was refused for networks (exit 4, "--mode exact"); it runs on every
    model now: on the widened example (exact copies) it merges back to at most the
    trained widths, and the result computes the trained network's outputs."""
    report = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["prune", str(saved_models / "digits_cnn_widened.keras"), "-o", str(tmp_path / "p.keras"),
                                       "--mode", "condense", "--report", str(report)])
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["mode"] == "condense"
    after = {row["name"]: row["width_after"] for row in figures["layers"]}
    assert after["stem"] == after["res_b"] <= 8 and after["res_a"] <= 8 and after["head"] <= 12 and after["logits"] == 10
    pruned = keras.saving.load_model(tmp_path / "p.keras")
    assert figures["params_after"] == pruned.count_params() < figures["params_before"]
    narrow = keras.saving.load_model(saved_models / "digits_cnn.keras")
    x = np.load(saved_models / "digits_images_heldout.npz")["x"]
    _assert_same_outputs(narrow, pruned, x, rtol=1e-4)


def test_data_pass_works_when_the_model_has_a_layer_called_activation():
    """The probe splits each Dense/Conv2D from its activation; its new layers must not
    take names the model already uses."""
    image = keras.Input((5, 5, 1))
    first = keras.layers.Conv2D(3, 3, activation="relu", name="first")(image)
    second = keras.layers.Conv2D(2, 1, name="second")(keras.layers.Activation("tanh", name="activation")(first))
    model = randomize_network(keras.Model(image, keras.layers.Flatten()(second)), np.random.default_rng(5))
    x = image_inputs(model)
    pruned, report = prune(model, data=x)
    assert report.to_dict()["verified"]
    _assert_same_outputs(model, pruned, x)
