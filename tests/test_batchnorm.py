"""Inference-mode BatchNormalization in `read_model`: folded into a neighbouring Dense or
Conv2D layer where that is exact, kept as a per-channel BatchNormalization layer elsewhere.

Each placement is read and rebuilt: where it folds, the rebuilt model must hold no
BatchNormalization layer; wherever it stands, the rebuilt model must compute the
original's inference-mode outputs within float32 rounding. The statistics are set by
`set_weights` to non-trivial values (negative and large gammas, shifted means, variances
away from 1), so a fold that drops or misplaces any of them shows. A BatchNormalization
kept between two activations, before a convolution that pads with zeros or before a
pooling layer is carried through growth and pruning like any per-channel layer.
LayerNormalization, which mixes the channels, is read and fixes the width of its group.
"""

import keras
import numpy as np
import pytest

from builders import randomize
from keras_embed import build_model, prune, read_model
from keras_embed.edit.operators import widen
from keras_embed.errors import UnsupportedLayerError

INPUTS = 5
IMAGE = (6, 6, 2)


def dense(units, activation=None, **kwargs):
    return keras.layers.Dense(units, activation=activation, **kwargs)


def conv(filters, kernel_size=3, activation=None, padding="same", **kwargs):
    return keras.layers.Conv2D(filters, kernel_size, activation=activation, padding=padding, **kwargs)


def bn(**kwargs):
    return keras.layers.BatchNormalization(**kwargs)


def gap():
    return keras.layers.GlobalAveragePooling2D()


def build(layers, functional, shape=(INPUTS,)):
    inputs = keras.Input(shape)
    if functional:
        y = inputs
        for layer in layers:
            y = layer(y)
        model = keras.Model(inputs, y, name="functional_bn")
    else:
        model = keras.Sequential([inputs, *layers], name="sequential_bn")
    model = randomize(model, scale=0.7, only=(keras.layers.Dense, keras.layers.Conv2D))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([bn_statistic(weight.path.rsplit("/", 1)[-1], weight.shape, rng) for weight in layer.weights])
    return model


def bn_statistic(name, shape, rng):
    values = {
        "gamma": rng.choice([-1.0, 1.0], shape) * rng.uniform(0.3, 2.5, shape),
        "beta": rng.normal(0.0, 1.0, shape),
        "moving_mean": rng.normal(0.0, 1.5, shape),
        "moving_variance": rng.uniform(0.2, 3.0, shape),
    }[name]
    return values.astype("float32")


def outputs(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)


def layer_types(model):
    return [type(layer).__name__ for layer in model.layers]


def producers(model):
    return [type(layer).__name__ for layer in model.layers if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))]


def assert_same_outputs(model, rebuilt, x):
    expected = outputs(model, x)
    np.testing.assert_allclose(outputs(rebuilt, x), expected, rtol=0, atol=2e-5 * max(1.0, np.abs(expected).max()))


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).normal(0.0, 1.5, (256, INPUTS)).astype("float32")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).normal(0.0, 1.5, (64, *IMAGE)).astype("float32")


# ---------------------------------------------------------------- placements that fold


FOLDABLE = {
    "dense-bn-activation": lambda: [dense(6), bn(), keras.layers.Activation("relu"), dense(3)],
    "activation-bn-into-next-dense": lambda: [dense(6, "tanh"), bn(), dense(3)],
    "bn-on-the-input": lambda: [bn(), dense(6, "relu"), dense(3)],
    "bn-on-the-input-into-dense-without-bias": lambda: [bn(), dense(6, "relu", use_bias=False), dense(3)],
    "input-activation-bn": lambda: [keras.layers.Activation("tanh"), bn(), dense(6, "relu"), dense(3)],
    "dense-without-bias-bn": lambda: [dense(6, use_bias=False), bn(), keras.layers.Activation("tanh"), dense(3)],
    "activation-bn-into-dense-without-bias": lambda: [dense(6, "elu"), bn(), dense(3, use_bias=False)],
    "two-bns-before-the-activation": lambda: [dense(6), bn(), bn(), keras.layers.Activation("relu"), dense(3)],
    "two-bns-after-the-activation": lambda: [dense(6, "sigmoid"), bn(), bn(), dense(3)],
    "bn-before-and-after-the-activation": lambda: [dense(6), bn(), keras.layers.Activation("relu"), bn(), dense(3)],
    "bn-center-false": lambda: [dense(6), bn(center=False), keras.layers.Activation("elu"), dense(3)],
    "bn-scale-false": lambda: [dense(6, "tanh"), bn(scale=False), dense(3)],
    "bn-center-and-scale-false": lambda: [dense(6, "gelu"), bn(center=False, scale=False), dense(3)],
    "dropout-between-dense-and-bn": lambda: [dense(6), keras.layers.Dropout(0.5), bn(), keras.layers.Activation("relu"),
                                             dense(3)],
    "dropout-between-bn-and-next-dense": lambda: [dense(6, "relu"), bn(), keras.layers.Dropout(0.5), dense(3)],
    "linear-activation-layer-then-bn": lambda: [dense(6), keras.layers.Activation("linear"), bn(),
                                                keras.layers.Activation("tanh"), dense(3)],
    "bn-then-linear-activation-then-dense": lambda: [dense(6, "relu"), bn(), keras.layers.Activation("linear"), dense(3)],
    "bn-after-the-linear-output": lambda: [dense(6, "relu"), dense(3), bn()],
    "bn-epsilon-large": lambda: [dense(6), bn(epsilon=0.5), keras.layers.Activation("relu"), dense(3)],
    "bn-everywhere": lambda: [bn(), dense(6), bn(), keras.layers.Activation("relu"), bn(), dense(4, "tanh"), bn(),
                              dense(3), bn()],
}
# the BatchNormalization folds into the Conv2D before it, or into a convolution after it that
# reads no zero padding (1x1, or 'valid'), or into the Dense after a pooling
CNN_FOLDABLE = {
    "conv-bn-relu": lambda: [conv(4), bn(), keras.layers.Activation("relu"), conv(3), gap(), dense(3)],
    "strided-conv-without-bias-bn-tanh": lambda: [conv(4, strides=2, use_bias=False), bn(),
                                                  keras.layers.Activation("tanh"), conv(3, 1), gap(), dense(3)],
    "conv-relu-bn-into-1x1-conv": lambda: [conv(4, activation="relu"), bn(), conv(3, 1), gap(), dense(3)],
    "conv-relu-bn-into-valid-conv": lambda: [conv(4, activation="relu"), bn(), conv(3, padding="valid"), gap(),
                                             dense(3)],
    "bn-on-the-image-into-valid-conv": lambda: [bn(), conv(4, activation="relu", padding="valid"), gap(), dense(3)],
    "gap-bn-into-dense": lambda: [conv(4, activation="relu"), gap(), bn(), dense(3)],
    "bn-after-and-before-conv": lambda: [conv(4), bn(), keras.layers.Activation("elu"), bn(), conv(3, 1), bn(),
                                         keras.layers.Activation("relu"), gap(), dense(3)],
}
def cases(table):
    return [pytest.param(make, id=name) for name, make in table.items()]


@pytest.mark.parametrize("functional", [False, True], ids=["sequential", "functional"])
@pytest.mark.parametrize("make", cases(FOLDABLE))
def test_batchnorm_is_folded_away_and_inference_outputs_are_kept(x, make, functional):
    model = build(make(), functional)

    rebuilt = build_model(read_model(model))

    assert "BatchNormalization" not in layer_types(rebuilt)
    assert producers(rebuilt) == producers(model)
    assert type(rebuilt) is type(model)
    assert_same_outputs(model, rebuilt, x)


@pytest.mark.parametrize("functional", [False, True], ids=["sequential", "functional"])
@pytest.mark.parametrize("make", cases(CNN_FOLDABLE))
def test_batchnorm_folds_into_a_conv_before_it_or_after_it_and_outputs_are_kept(images, make, functional):
    model = build(make(), functional, IMAGE)

    rebuilt = build_model(read_model(model))

    assert "BatchNormalization" not in layer_types(rebuilt)
    assert producers(rebuilt) == producers(model)
    assert type(rebuilt) is type(model)
    assert_same_outputs(model, rebuilt, images)


@pytest.mark.parametrize("make", cases(FOLDABLE))
def test_inference_outputs_are_kept_where_a_batchnorm_is_not_folded_too(x, make):
    """Whatever `read_model` folds or keeps, the rebuilt model computes the same."""
    model = build(make(), functional=False)
    assert_same_outputs(model, build_model(read_model(model)), x)


def test_batchnorm_statistics_matter_in_the_cases_above(x):
    """Guards the fixture: with its statistics reset to the identity, a model computes something else."""
    model = build(FOLDABLE["dense-bn-activation"](), functional=False)
    reference = build(FOLDABLE["dense-bn-activation"](), functional=False)
    norm = reference.layers[1]
    norm.set_weights([np.ones(6, "float32"), np.zeros(6, "float32"), np.zeros(6, "float32"), np.ones(6, "float32")])
    assert np.abs(outputs(model, x) - outputs(reference, x)).max() > 0.1


@pytest.mark.parametrize("cnn", [False, True], ids=["dense", "cnn"])
def test_prune_of_a_batchnorm_model_returns_stock_layers_without_batchnorm(x, images, cnn):
    if cnn:
        layers, data = [conv(4), bn(), keras.layers.Activation("relu"), conv(4, 1, "tanh"), bn(), conv(3, padding="valid"),
                        gap(), dense(3)], images
    else:
        layers, data = [dense(6), bn(), keras.layers.Activation("relu"), dense(4, "tanh"), bn(), dense(3)], x
    model = build(layers, functional=False, shape=IMAGE if cnn else (INPUTS,))

    pruned, report = prune(model, data=data)

    assert "BatchNormalization" not in layer_types(pruned)
    assert type(pruned) is keras.Sequential
    assert report.to_dict()["verified"] is True
    assert report.to_dict()["max_abs_diff"] <= 2e-5 * max(1.0, np.abs(outputs(model, data)).max())


def test_read_model_leaves_the_batchnorm_model_untouched(x):
    model = build(FOLDABLE["two-bns-after-the-activation"](), functional=False)
    before = [weight.copy() for weight in model.get_weights()]
    read_model(model)
    read_model(model, fold=False)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("cnn", [False, True], ids=["dense", "cnn"])
def test_read_model_without_fold_keeps_every_batchnorm_with_its_weights(x, images, cnn):
    make = CNN_FOLDABLE["bn-after-and-before-conv"] if cnn else FOLDABLE["bn-everywhere"]
    model = build(make(), functional=False, shape=IMAGE if cnn else (INPUTS,))

    graph = read_model(model, fold=False)
    rebuilt = build_model(graph)

    assert [node.name for node in graph.nodes[1:]] == [layer.name for layer in model.layers]
    for layer in model.layers:
        for weight, keras_weight in zip(graph.node(layer.name).weights, layer.get_weights(), strict=True):
            np.testing.assert_array_equal(weight, keras_weight)
    assert layer_types(rebuilt) == layer_types(model)
    np.testing.assert_array_equal(outputs(rebuilt, images if cnn else x), outputs(model, images if cnn else x))


# ---------------------------------------------------------------- placements that are kept


KEPT = {
    "bn-between-two-nonlinear-stages": lambda: [dense(6, "relu"), bn(), keras.layers.Activation("tanh"), dense(3)],
    "bn-on-the-input-before-an-activation": lambda: [bn(), keras.layers.Activation("relu"), dense(6), dense(3)],
    "bn-after-the-last-nonlinear-activation": lambda: [dense(6, "relu"), dense(3, "tanh"), bn()],
    "bn-after-the-last-activation-layer": lambda: [dense(6, "relu"), dense(3), keras.layers.Activation("sigmoid"), bn()],
}
# a convolution that pads with zeros would read the shift at the border: it cannot absorb it;
# max pooling does not commute with a negative scale
CNN_KEPT = {
    "conv-relu-bn-into-same-3x3-conv": lambda: [conv(4, activation="relu"), bn(), conv(3), gap(), dense(3)],
    "bn-on-the-image-into-same-conv": lambda: [bn(), conv(4, activation="relu"), gap(), dense(3)],
    "conv-relu-bn-before-max-pooling": lambda: [conv(4, activation="relu"), bn(), keras.layers.MaxPooling2D(),
                                                conv(3, 1), gap(), dense(3)],
}


@pytest.mark.parametrize("functional", [False, True], ids=["sequential", "functional"])
@pytest.mark.parametrize("make, cnn", [pytest.param(make, False, id=name) for name, make in KEPT.items()]
                         + [pytest.param(make, True, id=name) for name, make in CNN_KEPT.items()])
def test_batchnorm_no_neighbour_can_absorb_is_kept_as_a_batchnorm_layer(x, images, make, cnn, functional):
    model = build(make(), functional, IMAGE if cnn else (INPUTS,))

    graph = read_model(model)
    rebuilt = build_model(graph)

    assert [node.kind for node in graph.nodes].count("BatchNormalization") == 1
    assert layer_types(rebuilt) == layer_types(model)
    assert type(rebuilt) is type(model)
    (norm,) = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert rebuilt.get_layer(norm.name).get_config() == norm.get_config()
    for weight, original in zip(rebuilt.get_layer(norm.name).get_weights(), norm.get_weights(), strict=True):
        np.testing.assert_array_equal(weight, original)
    assert_same_outputs(model, rebuilt, images if cnn else x)


@pytest.mark.parametrize("cnn", [False, True], ids=["dense", "cnn"])
def test_a_kept_batchnorm_is_widened_and_pruned_with_its_channels(x, images, cnn):
    """The copy of a split channel copies its BatchNormalization statistics too, so `prune`
    finds the duplicate and gives back the narrow model, BatchNormalization included."""
    make = CNN_KEPT["conv-relu-bn-into-same-3x3-conv"] if cnn else KEPT["bn-between-two-nonlinear-stages"]
    data = images if cnn else x
    model = build(make(), functional=False, shape=IMAGE if cnn else (INPUTS,))
    (norm,) = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]

    grown = build_model(widen(widen(read_model(model), 0, 2, 0.4), 0, 0, -1.5))
    pruned, report = prune(grown, data=data)

    assert [weight.shape for weight in grown.get_layer(norm.name).get_weights()] == [(norm.get_weights()[0].size + 2,)] * 4
    assert layer_types(pruned) == layer_types(model)
    assert pruned.count_params() == model.count_params()
    assert report.to_dict()["removed"]["duplicate"] == 2
    for weight, original in zip(pruned.get_layer(norm.name).get_weights(), norm.get_weights(), strict=True):
        np.testing.assert_allclose(weight, original, rtol=0, atol=0)
    assert_same_outputs(model, pruned, data)


@pytest.mark.parametrize("functional", [False, True], ids=["sequential", "functional"])
def test_layer_normalization_fixes_the_width_of_its_group(functional):
    model = randomize(build([dense(6, "relu", name="hidden"), keras.layers.LayerNormalization(name="norm"), dense(3)],
                            functional))
    graph = read_model(model)
    assert graph.group_of("hidden") in graph.frozen_groups
    grown = build_model(widen(read_model(build([dense(6, "relu", name="hidden"), dense(3)], functional)), 0, 1))
    assert read_model(grown).node("hidden").width == 7  # the same layer without it can grow
