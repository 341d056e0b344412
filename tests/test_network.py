"""Convolutional and branching models: channel groups, rules, operators, round trips.

The property tests draw random small CNNs (residual Add, Concatenate, BatchNormalization,
DepthwiseConv2D, pooling, padding, Flatten or global pooling), grow them with the
channel operators and prune them back: never more parameters than the original, the
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
from keras_embed.channel_operators import deepen_after, output_minimum, widen_channel
from keras_embed.channel_rules import find_channel_edits, weight_constants
from keras_embed.errors import UnsupportedLayerError
from keras_embed.network import PRODUCERS, build_network, read_network
from keras_embed.prune_network import prune_network
from keras_embed.tools.cli import main

def _assert_same_outputs(reference, candidate, x, rtol=1e-5):
    expected, actual = (keras.ops.convert_to_numpy(model(x)) for model in (reference, candidate))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * max(1.0, float(np.abs(expected).max())))


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cnns(), st.data())
def test_property_widen_then_prune_restores_size_and_outputs(cnn, data):
    model, editable = cnn()
    network = original = read_network(model)
    for _ in range(data.draw(st.integers(1, 5))):
        layer = data.draw(st.sampled_from(editable))
        channel = data.draw(st.integers(0, network.node(layer).width - 1))
        network = widen_channel(network, layer, channel, data.draw(st.floats(-1.0, 2.0)))
    wide = build_network(network)
    x = image_inputs(model)
    _assert_same_outputs(model, wide, x)
    pruned, report = prune_network(wide)
    assert pruned.count_params() <= original.params
    kept = read_network(pruned).by_name  # a layer with a linear activation may have been folded away
    assert all(kept[name].width <= original.node(name).width for name in editable if name in kept)
    _assert_same_outputs(model, pruned, x)
    assert report.to_dict()["verified"]


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cnns(), st.data())
def test_property_deepen_then_prune_with_data_restores_depth(cnn, data):
    model, editable = cnn()
    network = read_network(model)
    x = image_inputs(model)
    deepened = []
    for layer in editable:
        try:
            network = deepen_after(network, layer, output_minimum(network, layer, x), data.draw(st.floats(0.1, 2.0)))
            deepened.append(layer)
        except ValueError:  # not read by exactly one Dense/Conv2D, or a padded reader of a signed output
            continue
    deep = build_network(network)
    _assert_same_outputs(model, deep, x, rtol=1e-4)
    pruned, report = prune_network(deep, data=x)
    producers = lambda m: sum(node.kind in PRODUCERS for node in read_network(m).nodes)  # noqa: E731
    assert producers(pruned) <= producers(model)  # a layer of the model may be linear on x too
    assert len(report.reduction.collapsed) >= len(deepened)
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
    network = read_network(_residual())
    assert network.groups["res_b"] == network.groups["stem"] != network.groups["res_a"]
    wide = widen_channel(network, "res_b", 2, 0.3)
    assert wide.node("stem").width == wide.node("res_b").width == 5
    assert wide.node("out").weights[0].shape[0] == 5 * 5 * 5  # Flatten rows follow the channels


def test_channel_dead_in_one_add_branch_only_is_kept():
    model = _residual(dead_in_stem=True)
    network = read_network(model)
    maps = find_channel_edits(network, weight_constants(network))
    assert network.groups["stem"] not in maps  # res_b's channel 1 still carries signal into the sum
    pruned, _ = prune_network(model)
    assert read_network(pruned).node("stem").width == 4
    _assert_same_outputs(model, pruned, image_inputs(model))


def test_channel_dead_in_every_add_branch_goes_from_both():
    model = _residual(dead_in_stem=True)
    kernel, bias = model.get_layer("res_b").get_weights()
    kernel[..., 1], bias[1] = 0.0, 0.0
    model.get_layer("res_b").set_weights([kernel, bias])
    pruned, report = prune_network(model)
    assert read_network(pruned).node("stem").width == read_network(pruned).node("res_b").width == 3
    rows = {row["name"]: row for row in report.to_dict()["layers"]}
    assert rows["stem"]["channels_removed"] == rows["res_b"]["channels_removed"] == 1
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
    pruned, _ = prune_network(model)
    assert read_network(pruned).node("first").width == (2 if removed else 3)
    _assert_same_outputs(model, pruned, image_inputs(model))


def test_positive_multiple_filters_merge_on_a_relu_path():
    image = keras.Input((6, 6, 1))
    first = keras.layers.Conv2D(3, 3, activation="relu", name="first")(image)
    pooled = keras.layers.MaxPooling2D()(first)
    model = randomize_network(keras.Model(image, keras.layers.Dense(2, name="out")(keras.layers.Flatten()(pooled))), np.random.default_rng(2))
    kernel, bias = model.get_layer("first").get_weights()
    kernel[..., 2], bias[2] = 2.5 * kernel[..., 0], 2.5 * bias[0]
    model.get_layer("first").set_weights([kernel, bias])
    pruned, _ = prune_network(model)
    assert read_network(pruned).node("first").width == 2
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
    pruned, report = prune_network(model, data=x, allow_growth=allow_growth)
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
    network = read_network(model)
    assert "bn" not in network.by_name and network.output == "global_max_pooling2d" or network.nodes[-1].kind == "GlobalMaxPooling2D"
    _assert_same_outputs(model, build_network(network), image_inputs(model))


@pytest.mark.parametrize("layer, message", [
    (lambda h: keras.layers.Conv2D(2, 3, dilation_rate=2, name="dilated")(h), "dilation"),
    (lambda h: keras.layers.Conv2D(2, 3, groups=2, name="grouped")(h), "groups"),
    (lambda h: keras.layers.UpSampling2D(name="up")(h), "UpSampling2D"),
    (lambda h: keras.layers.Reshape((6, 12), name="reshape")(h), "does more than flatten"),
    (lambda h: keras.layers.Add(name="add")([keras.layers.Concatenate()([h, h]), keras.layers.Concatenate()([h, h])]), "only tensors of one"),
])
def test_unsupported_structures_are_named(layer, message):
    image = keras.Input((6, 6, 2))
    model = keras.Model(image, layer(keras.layers.Conv2D(2, 1)(image)))
    with pytest.raises(UnsupportedLayerError, match=message):
        read_network(model).groups


def test_cli_prunes_the_widened_example_back(tmp_path, saved_models):
    report = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["prune", str(saved_models / "digits_cnn_widened.keras"), "-o", str(tmp_path / "p.keras"),
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    widths = {row["name"]: (row["width_before"], row["width_after"], row["channels_removed"]) for row in figures["layers"]}
    assert widths == {"stem": (14, 8, 6), "res_a": (13, 8, 5), "res_b": (14, 8, 6), "head": (18, 12, 6), "logits": (10, 10, 0)}
    assert figures["flops_after"] < figures["flops_before"] and figures["verified"]
    narrow = keras.saving.load_model(saved_models / "digits_cnn.keras")
    x = np.load(saved_models / "digits_images_heldout.npz")["x"]
    _assert_same_outputs(narrow, keras.saving.load_model(tmp_path / "p.keras"), x, rtol=1e-4)


def test_cli_embeds_a_cnn_and_refuses_null(tmp_path, saved_models):
    source = str(saved_models / "digits_cnn.keras")
    data = str(saved_models / "digits_images_heldout.npz")
    result = CliRunner().invoke(main, ["embed", source, "-o", str(tmp_path / "w.keras"), "--widen", "stem:3:0.25",
                                       "--deepen", "res_a", "--data", data])
    assert result.exit_code == 0, result.output
    grown = read_network(keras.saving.load_model(tmp_path / "w.keras"))
    assert grown.node("stem").width == grown.node("res_b").width == 9 and "lift_res_a" in grown.by_name
    result = CliRunner().invoke(main, ["embed", source, "-o", str(tmp_path / "n.keras"), "--null", "stem"])
    assert result.exit_code == 2 and "--null supports chains" in result.output
    assert not (tmp_path / "n.keras").exists()


def test_cli_refuses_approximate_modes_for_networks(tmp_path, saved_models):
    result = CliRunner().invoke(main, ["prune", str(saved_models / "digits_cnn.keras"), "-o", str(tmp_path / "p.keras"),
                                       "--mode", "condense"])
    assert result.exit_code == 4 and "--mode exact" in result.output


def test_data_pass_works_when_the_model_has_a_layer_called_activation():
    """The probe splits each Dense/Conv2D from its activation; its new layers must not
    take names the model already uses."""
    image = keras.Input((5, 5, 1))
    first = keras.layers.Conv2D(3, 3, activation="relu", name="first")(image)
    second = keras.layers.Conv2D(2, 1, name="second")(keras.layers.Activation("tanh", name="activation")(first))
    model = randomize_network(keras.Model(image, keras.layers.Flatten()(second)), np.random.default_rng(5))
    x = image_inputs(model)
    pruned, report = prune_network(model, data=x)
    assert report.to_dict()["verified"]
    _assert_same_outputs(model, pruned, x)
