"""The convolution-family and spatial layers of the Keras model zoo (issue 17, part 1).

SeparableConv2D (read as a depthwise node and a pointwise producer, built back as one layer),
Conv2DTranspose (kernel transposed to the canonical form, reads the input unevenly), Conv2D
with groups > 1 and DepthwiseConv2D with depth_multiplier > 1 (block-diagonal producers that
freeze what they touch), UpSampling2D and Cropping2D (keep channels, pass affine maps), dilated
convolutions; a U-Net and an Xception block grown by the embeddings and pruned back; the
Xception and NASNetMobile applications read and analyzed.
"""

import dataclasses

import keras
import numpy as np
import pytest

import keras_embed
from keras_embed.errors import UnsupportedLayerError
from keras_embed.edit.operators import add_constant, editable_layer, widen
from keras_embed.find.weight_rules import find_redundancy
from keras_embed.model.build import build_model, write_weights
from keras_embed.model.read import read_model
from keras_embed.stopping import StoppingRule
from keras_embed.verify import predict
from tests.builders import assert_same_function, image_inputs, randomize_network

L = keras.layers


def randomized(model, seed=0):
    return randomize_network(model, np.random.default_rng(seed))


# ---------------------------------------------------------------- the models


def zoo_layers():
    """Every new layer kind in a row, with strides, multipliers and both interpolations."""
    x = keras.Input((9, 9, 3), name="image")
    h = L.SeparableConv2D(5, 3, padding="same", activation="relu", name="sep")(x)
    h = L.SeparableConv2D(4, 3, depth_multiplier=2, strides=2, use_bias=False, name="sep_m2")(h)
    h = L.Conv2D(6, 3, groups=2, padding="same", activation="relu", name="grouped")(h)
    h = L.DepthwiseConv2D(3, depth_multiplier=3, padding="same", name="depthwise_m3")(h)
    h = L.Conv2DTranspose(4, 2, strides=2, activation="relu", name="up")(h)
    h = L.UpSampling2D(interpolation="bilinear", name="bilinear")(h)
    h = L.Cropping2D(((1, 2), (0, 1)), name="crop")(h)
    h = L.UpSampling2D(name="nearest")(h)
    h = L.Conv2DTranspose(3, 3, strides=2, padding="same", name="up_same")(h)
    return randomized(keras.Model(x, L.GlobalAveragePooling2D(name="gap")(h), name="zoo"))


def unet():
    """Conv2D, MaxPooling2D, Conv2DTranspose, UpSampling2D, Cropping2D and Concatenate skips."""
    x = keras.Input((16, 16, 2), name="image")
    enc1 = L.Conv2D(6, 3, padding="same", activation="relu", name="enc1")(x)
    enc2 = L.Conv2D(8, 3, padding="same", activation="relu", name="enc2")(L.MaxPooling2D(name="pool1")(enc1))
    bottom = L.Conv2D(8, 3, padding="same", activation="relu", name="bottom")(L.MaxPooling2D(name="pool2")(enc2))
    up2 = L.Conv2DTranspose(6, 2, strides=2, activation="relu", name="up2")(bottom)
    dec2 = L.Conv2D(6, 3, padding="same", activation="relu", name="dec2")(L.Concatenate(name="skip2")([up2, enc2]))
    dec1 = L.Conv2D(4, 3, activation="relu", name="dec1")(L.UpSampling2D(interpolation="bilinear", name="up1")(dec2))
    h = L.Concatenate(name="skip1")([dec1, L.Cropping2D(1, name="crop1")(enc1)])
    return randomized(keras.Model(x, L.Conv2D(3, 1, name="head")(h), name="unet"), seed=1)


def xception_block():
    """An Xception entry-flow block: SeparableConv2D + BatchNormalization, a strided 1x1
    residual, Add."""
    x = keras.Input((12, 12, 3), name="image")
    h = L.Activation("relu", name="stem_relu")(L.BatchNormalization(name="stem_bn")(
        L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(x)))
    residual = L.BatchNormalization(name="res_bn")(L.Conv2D(12, 1, strides=2, use_bias=False, name="res")(h))
    main = L.BatchNormalization(name="sep1_bn")(L.SeparableConv2D(12, 3, padding="same", use_bias=False, name="sep1")(h))
    main = L.Activation("relu", name="sep1_relu")(main)
    main = L.BatchNormalization(name="sep2_bn")(L.SeparableConv2D(12, 3, padding="same", use_bias=False, name="sep2")(main))
    main = L.MaxPooling2D(3, strides=2, padding="same", name="pool")(main)
    h = L.Activation("relu", name="add_relu")(L.Add(name="add")([main, residual]))
    h = L.SeparableConv2D(10, 3, padding="same", activation="relu", name="sep3")(h)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    return randomized(keras.Model(x, L.Dense(3, name="scores")(h), name="xception_block"), seed=2)


@pytest.fixture(scope="module")
def zoo():
    model = zoo_layers()
    return model, read_model(model), image_inputs(model, 32)


# ---------------------------------------------------------------- read and build back


def test_every_new_layer_is_read_and_built_back_exactly_with_the_same_configs_and_weights(zoo):
    model, graph, x = zoo
    rebuilt = build_model(graph)
    assert [type(layer).__name__ for layer in rebuilt.layers] == [type(layer).__name__ for layer in model.layers]
    for layer in model.layers:
        again = rebuilt.get_layer(layer.name)
        assert again.get_config() == layer.get_config(), layer.name
        for expected, actual in zip(layer.get_weights(), again.get_weights(), strict=True):
            np.testing.assert_array_equal(actual, expected)
    assert np.abs(predict(model, x) - predict(rebuilt, x)).max() <= 1e-6
    assert graph.params == model.count_params() == rebuilt.count_params()


def test_a_separable_convolution_is_a_depthwise_node_then_a_pointwise_producer_with_its_activation_and_bias(zoo):
    model, graph, _ = zoo
    layer = model.get_layer("sep")
    depthwise, pointwise = graph.node("sep_depthwise"), graph.node("sep")
    assert (depthwise.kind, depthwise.role, depthwise.inputs) == ("DepthwiseConv2D", "keeps", ("image",))
    assert (pointwise.kind, pointwise.role, pointwise.inputs) == ("SeparableConv2D", "produces", ("sep_depthwise",))
    np.testing.assert_array_equal(depthwise.weights[0], layer.depthwise_kernel.numpy())
    assert len(depthwise.weights) == 1 and depthwise.config["activation"] == "linear"
    np.testing.assert_array_equal(pointwise.weights[0], layer.pointwise_kernel.numpy())
    np.testing.assert_array_equal(pointwise.weights[1], layer.bias.numpy())
    assert pointwise.config["activation"] == "relu" and pointwise.entry.geometry(pointwise).pointwise
    assert depthwise.shape == (9, 9, 3) and pointwise.shape == (9, 9, 5)
    multiplied = graph.node("sep_m2_depthwise")  # depth_multiplier 2: a producer of 5 * 2 channels
    assert multiplied.role == "produces" and multiplied.shape == (4, 4, 10) and len(graph.node("sep_m2").weights) == 1


def test_a_probe_builds_the_parts_of_a_separable_convolution_as_stock_layers(zoo):
    model, graph, x = zoo
    probe = build_model(graph, outputs=["sep_depthwise", "sep/z", "sep"])
    assert {"sep_depthwise": "DepthwiseConv2D", "sep": "Conv2D"}.items() <= {
        layer.name: type(layer).__name__ for layer in probe.layers}.items()
    depthwise, z, a = (np.asarray(value) for value in probe(x[:4]))
    assert np.abs(a - np.maximum(z, 0)).max() <= 1e-6 and depthwise.shape == (4, 9, 9, 3)


@pytest.mark.parametrize("name", ["grouped", "depthwise_m3", "sep_m2_depthwise"])
def test_the_canonical_kernel_of_a_grouped_producer_computes_what_keras_computes(zoo, name):
    """The dense block-diagonal kernel in a plain Conv2D gives the grouped layer's outputs,
    and goes back to the stored weights unchanged."""
    model, graph, _ = zoo
    node = graph.node(name)
    entry, source = node.entry, graph.node(node.inputs[0])
    kernel = entry.kernel(node)
    assert kernel.shape[-2:] == (source.width, node.width)
    np.testing.assert_array_equal(entry.stored_kernel(node, kernel), node.weights[0])
    geometry = entry.geometry(node)
    dense = L.Conv2D(node.width, geometry.kernel_size, geometry.strides, geometry.padding, dilation_rate=geometry.dilation)
    dense.build((None, *source.shape))
    dense.set_weights([kernel, np.zeros(node.width) if entry.bias(node) is None else entry.bias(node)])
    grouped = build_model(graph, outputs=[node.inputs[0], f"{name}/z"])
    inputs, expected = (np.asarray(value) for value in grouped(image_inputs(model, 3)))
    np.testing.assert_allclose(np.asarray(dense(inputs)), expected, rtol=0, atol=1e-5)


def test_a_kernel_that_mixes_the_groups_is_refused(zoo):
    _, graph, _ = zoo
    node = graph.node("grouped")
    kernel = node.entry.kernel(node).copy()
    kernel[..., 0, -1] = 1.0  # the last output channel reads an input of the first group
    with pytest.raises(ValueError, match="mixes its 2 groups"):
        node.entry.with_weights(node, kernel, node.entry.bias(node))


def test_grouped_and_multiplied_convolutions_freeze_the_groups_they_read_and_produce(zoo):
    _, graph, _ = zoo
    frozen = graph.frozen_groups
    assert {"sep", "sep_m2_depthwise", "sep_m2", "grouped", "depthwise_m3"} <= frozen
    assert graph.editable_groups() == ["up"]
    for name in ("sep", "grouped", "depthwise_m3"):
        with pytest.raises(ValueError, match="cannot change"):
            editable_layer(graph, name)


def test_prune_keeps_a_model_with_grouped_and_multiplied_convolutions_exact_on_data(zoo):
    model, _, x = zoo
    pruned, report = keras_embed.prune(model, data=x)
    assert report.to_dict()["verified"] and pruned.count_params() <= model.count_params()
    assert pruned.get_layer("grouped").groups == 2 and pruned.get_layer("depthwise_m3").depth_multiplier == 3
    assert_same_function(model, pruned, x)


def test_batchnorm_folds_into_grouped_and_multiplied_convolutions_keeping_their_blocks():
    x = keras.Input((6, 6, 4))
    h = L.BatchNormalization(name="bn_in")(L.Conv2D(4, 3, groups=2, name="grouped")(x))  # folds forward
    h = L.DepthwiseConv2D(3, depth_multiplier=2, name="multiplied")(h)  # valid: bn_in folds, the rest after
    h = L.BatchNormalization(name="bn_out")(h)
    model = randomized(keras.Model(x, L.Flatten()(h)), seed=3)
    graph = read_model(model)
    assert [node.kind for node in graph.nodes] == ["InputLayer", "Conv2D", "DepthwiseConv2D", "Flatten"]
    assert_same_function(model, build_model(graph), image_inputs(model))


def test_a_depthwise_convolution_with_a_multiplier_is_no_longer_refused_anywhere():
    model = randomized(keras.Sequential([keras.Input((6, 6, 2)), L.DepthwiseConv2D(3, depth_multiplier=2),
                                         L.Conv2D(3, 1, activation="relu"), L.Flatten(), L.Dense(2)]))
    rows = keras_embed.analyze(model)
    assert [row["kind"] for row in rows] == ["DepthwiseConv2D", "Conv2D", "Dense"]
    assert type(build_model(read_model(model))) is keras.Sequential


# ---------------------------------------------------------------- Conv2DTranspose and constants


def _constant_into(reader):
    """A relu conv whose channel 0 holds 0.7 everywhere (zero kernel), read by `reader`."""
    x = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 1, activation="relu", name="conv")(x)
    model = randomized(keras.Model(x, L.Flatten()(reader(h))), seed=4)
    kernel, bias = model.get_layer("conv").get_weights()
    kernel[..., 0], bias[0] = 0.0, 0.7
    model.get_layer("conv").set_weights([kernel, bias])
    return model


@pytest.mark.parametrize("reader, folds", [
    (lambda h: L.Conv2DTranspose(2, 2, strides=2, name="up")(h), False),  # each output reads one tap: uneven
    (lambda h: L.Conv2DTranspose(2, 3, padding="same", name="up")(h), False),  # the borders read fewer taps
    (lambda h: L.Conv2DTranspose(2, 1, name="up")(h), True),  # pointwise: a Dense per position
], ids=["strided", "same", "pointwise"])
def test_a_constant_folds_into_a_transposed_convolution_only_where_it_is_pointwise(reader, folds):
    model = _constant_into(reader)
    graph = read_model(model)
    constants = [edit.constant for edit in find_redundancy(graph) if edit.group == "conv"]
    assert constants == ([(0,)] if folds else [])
    pruned, report = keras_embed.prune(model)
    assert report.to_dict()["verified"]
    assert pruned.get_layer("conv").filters == (2 if folds else 3)
    assert_same_function(model, pruned, image_inputs(model))
    if not folds:
        with pytest.raises(ValueError, match="pads with zeros"):
            add_constant(graph, "conv", 0.5, np.ones(graph.node("up").entry.kernel(graph.node("up")).shape[:-2] + (2,)))


def test_the_flops_of_a_transposed_convolution_count_each_input_position_once(zoo):
    _, graph, _ = zoo
    node = graph.node("up")  # 2x2 stride 2 on a 4x4x18 input: 16 positions, each times the whole kernel
    assert node.flops == 2 * 16 * node.weights[0].size + 8 * 8 * 4


def test_a_widened_transposed_convolution_prunes_back_through_upsampling_and_cropping(zoo):
    model, graph, x = zoo
    wide = build_model(widen(widen(graph, "up", 1, 0.3), "up", 3, -0.6))
    assert wide.get_layer("up").filters == 6
    assert_same_function(model, wide, x)
    pruned, report = keras_embed.prune(wide)
    assert report.to_dict()["verified"] and pruned.count_params() == model.count_params()
    assert_same_function(model, pruned, x)


# ---------------------------------------------------------------- separable convolutions: split and fused


def test_a_separable_convolution_whose_pointwise_part_collapses_comes_back_as_depthwise_and_conv():
    x = keras.Input((8, 8, 3))
    h = L.SeparableConv2D(8, 3, padding="same", name="sep")(x)  # linear: it composes into its reader
    h = L.Conv2D(4, 3, activation="relu", name="reader")(h)
    model = randomized(keras.Model(x, L.GlobalAveragePooling2D()(h)), seed=5)
    data = image_inputs(model)
    pruned, report = keras_embed.prune(model, data=data)
    assert report.to_dict()["collapsed_layers"] == ["sep"]
    assert [type(layer).__name__ for layer in pruned.layers[1:3]] == ["DepthwiseConv2D", "Conv2D"]
    assert pruned.layers[1].name == "sep_depthwise" and pruned.count_params() < model.count_params()
    assert_same_function(model, pruned, data)
    again = read_model(pruned)
    assert again.node("sep_depthwise").kind == "DepthwiseConv2D" and again.node("reader").inputs == ("sep_depthwise",)


def test_dilated_convolutions_and_separable_ones_are_widened_and_pruned_back():
    x = keras.Input((11, 11, 2))
    h = L.Conv2D(4, 3, dilation_rate=2, padding="same", activation="relu", name="dilated")(x)
    h = L.SeparableConv2D(5, 3, dilation_rate=2, activation="relu", name="sep")(h)
    h = L.Conv2D(3, 3, dilation_rate=(1, 2), name="reader")(h)
    model = randomized(keras.Model(x, L.Flatten()(h)), seed=6)
    data = image_inputs(model)
    grown, _ = keras_embed.embed(model, widen_steps=[("dilated", 0, 0.3), ("sep", 2, 0.6)])
    assert grown.get_layer("dilated").filters == 5 and grown.get_layer("sep").filters == 6
    assert type(grown.get_layer("sep")) is L.SeparableConv2D and grown.get_layer("sep").dilation_rate == (2, 2)
    pruned, report = keras_embed.prune(grown)
    assert report.to_dict()["verified"] and pruned.count_params() <= model.count_params()
    assert_same_function(model, pruned, data)


def test_a_sequential_model_with_a_separable_convolution_comes_back_sequential_and_takes_its_graph_weights():
    model = randomized(keras.Sequential([keras.Input((7, 7, 2)), L.SeparableConv2D(4, 3, activation="relu", name="sep"),
                                         L.Flatten(), L.Dense(2)]), seed=7)
    graph = read_model(model, fold=False)
    rebuilt = build_model(graph)
    assert type(rebuilt) is keras.Sequential and type(rebuilt.get_layer("sep")) is L.SeparableConv2D
    moved = graph.with_nodes(dataclasses.replace(node, weights=tuple(weight + 1.0 for weight in node.weights))
                             for node in graph.nodes)
    write_weights(model, moved)  # what the monitor's escape does: both parts land in the one layer
    layer = model.get_layer("sep")
    np.testing.assert_array_equal(layer.depthwise_kernel.numpy(), moved.node("sep_depthwise").weights[0].astype("float32"))
    np.testing.assert_array_equal(layer.pointwise_kernel.numpy(), moved.node("sep").weights[0].astype("float32"))
    np.testing.assert_array_equal(layer.bias.numpy(), moved.node("sep").weights[1].astype("float32"))


def test_a_name_that_a_separable_convolution_reads_as_is_refused_when_taken():
    x = keras.Input((6, 6, 2))
    h = L.Conv2D(2, 1, name="sep_depthwise")(x)
    model = keras.Model(x, L.SeparableConv2D(3, 3, name="sep")(h))
    with pytest.raises(UnsupportedLayerError, match="'sep_depthwise'"):
        read_model(model)


def test_upsampling_with_another_interpolation_is_refused_naming_it():
    model = keras.Sequential([keras.Input((4, 4, 2)), L.UpSampling2D(interpolation="bicubic", name="up")])
    with pytest.raises(UnsupportedLayerError, match="'up'.*bicubic"):
        read_model(model)


# ---------------------------------------------------------------- a U-Net and an Xception block


CASES = {"unet": (unet, ["enc1", "up2", "dec2"], ["dec2", "up2"]),
         "xception": (xception_block, ["stem", "sep1", "res"], ["sep3"])}  # groups to widen, layers to deepen


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    make, groups, deepened = CASES[request.param]
    model = make()
    return model, groups, deepened, image_inputs(model, 48)


def test_three_groups_widened_then_pruned_give_back_no_more_parameters_and_the_same_outputs(case):
    model, groups, _, x = case
    steps = [(group, unit, alpha) for group, unit, alpha in zip(groups, (0, 1, 2), (0.3, -0.5, 0.8))]
    grown, figures = keras_embed.embed(model, widen_steps=steps + [(groups[0], 3, 0.5)])
    assert figures["params_after"] > figures["params_before"]
    before, after = read_model(model), read_model(grown)
    assert [after.node(group).width - before.node(group).width for group in groups] == [2, 1, 1]
    assert_same_function(model, grown, x)
    pruned, report = keras_embed.prune(grown)
    assert report.to_dict()["verified"] and pruned.count_params() <= model.count_params()
    assert_same_function(model, pruned, x)
    assert [type(layer).__name__ for layer in pruned.layers].count("SeparableConv2D") == \
        [type(layer).__name__ for layer in model.layers].count("SeparableConv2D")


def test_lifts_after_transposed_and_separable_convolutions_read_through_upsampling_or_pooling_prune_back(case):
    model, _, deepened, x = case
    grown, _ = keras_embed.embed(model, deepen_layers=deepened, data=x)
    assert len(read_model(grown).producers) == len(read_model(model).producers) + len(deepened)
    assert {type(grown.get_layer(f"{name}_lift")).__name__ for name in deepened} == {"Conv2D"}
    pruned, report = keras_embed.prune(grown, data=x)
    assert {f"{name}_lift" for name in deepened} <= set(report.to_dict()["collapsed_layers"])
    assert pruned.count_params() <= model.count_params()
    assert_same_function(model, pruned, x)


def test_data_mode_with_a_keep_ratio_returns_a_smaller_valid_model(case):
    model, _, _, x = case
    pruned, report = keras_embed.prune(model, mode="data", rule=StoppingRule("keep_ratio", 0.5), data=x)
    assert pruned.count_params() < model.count_params() and report.to_dict()["removed"]["refit"] > 0
    outputs = predict(pruned, x)
    assert outputs.shape == predict(model, x).shape and np.all(np.isfinite(outputs))
    assert read_model(pruned).params == pruned.count_params()


def test_analyze_reports_every_producer(case):
    model, groups, _, x = case
    rows = keras_embed.analyze(model, data=x)
    names = [row["name"] for row in rows]
    assert set(groups) <= set(names) and all(row["effective_width"] <= row["width_before"] for row in rows)


# ---------------------------------------------------------------- keras.applications


@pytest.mark.parametrize("make", [
    lambda: keras.applications.Xception(weights=None, input_shape=(71, 71, 3), classes=10),
    lambda: keras.applications.NASNetMobile(weights=None, input_shape=(32, 32, 3), classes=10),
], ids=["Xception", "NASNetMobile"])
def test_xception_and_nasnet_are_read_built_back_and_analyzed(make):
    model = make()
    assert read_model(model, fold=False).params == model.count_params()
    graph = read_model(model)
    assert graph.params <= model.count_params()  # BatchNormalization folded where exact
    rebuilt = build_model(graph)
    kinds = [type(layer).__name__ for layer in rebuilt.layers]
    assert kinds.count("SeparableConv2D") == [type(layer).__name__ for layer in model.layers].count("SeparableConv2D")
    x = image_inputs(model, 2)
    assert np.abs(predict(model, x) - predict(rebuilt, x)).max() <= 1e-5
    rows = keras_embed.analyze(model)
    assert {row["kind"] for row in rows} >= {"SeparableConv2D", "Conv2D", "Dense"}
    assert len(rows) == len(graph.producers)
