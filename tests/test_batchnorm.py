"""Folding inference-mode BatchNormalization into the adjacent Dense layer (`read_model`).

Each supported placement is read and rebuilt: the rebuilt model must hold no
BatchNormalization layer and compute the original's inference-mode outputs within
float32 rounding. The statistics are set by `set_weights` to non-trivial values
(negative and large gammas, shifted means, variances away from 1), so a fold that
drops or misplaces any of them shows. Placements no Dense layer can absorb are refused.
"""

import keras
import numpy as np
import pytest

from builders import chain, randomize
from keras_embed import build_model, prune, read_model
from keras_embed.errors import UnsupportedLayerError

INPUTS = 5


def dense(units, activation=None, **kwargs):
    return keras.layers.Dense(units, activation=activation, **kwargs)


def bn(**kwargs):
    return keras.layers.BatchNormalization(**kwargs)


def build(layers, functional):
    model = randomize(chain(layers, INPUTS, functional, "bn"), scale=0.7, only=keras.layers.Dense)
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


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).normal(0.0, 1.5, (256, INPUTS)).astype("float32")


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


@pytest.mark.parametrize("functional", [False, True], ids=["sequential", "functional"])
@pytest.mark.parametrize("make", FOLDABLE.values(), ids=FOLDABLE.keys())
def test_batchnorm_is_folded_away_and_inference_outputs_are_kept(x, make, functional):
    model = build(make(), functional)
    dense_count = sum(isinstance(layer, keras.layers.Dense) for layer in model.layers)

    rebuilt = build_model(read_model(model))

    assert "BatchNormalization" not in layer_types(rebuilt)
    assert layer_types(rebuilt).count("Dense") == dense_count
    expected = outputs(model, x)
    np.testing.assert_allclose(outputs(rebuilt, x), expected, rtol=0, atol=2e-5 * max(1.0, np.abs(expected).max()))


def test_batchnorm_statistics_matter_in_the_cases_above(x):
    """Guards the fixture: with its statistics reset to the identity, a model computes something else."""
    model = build(FOLDABLE["dense-bn-activation"](), functional=False)
    reference = build(FOLDABLE["dense-bn-activation"](), functional=False)
    norm = reference.layers[1]
    norm.set_weights([np.ones(6, "float32"), np.zeros(6, "float32"), np.zeros(6, "float32"), np.ones(6, "float32")])
    assert np.abs(outputs(model, x) - outputs(reference, x)).max() > 0.1


def test_prune_of_a_batchnorm_model_returns_stock_layers_without_batchnorm(x):
    model = build([dense(6), bn(), keras.layers.Activation("relu"), dense(4, "tanh"), bn(), dense(3)], functional=False)

    pruned, report = prune(model, data=x)

    assert "BatchNormalization" not in layer_types(pruned)
    assert report.max_abs_diff <= 2e-5 * max(1.0, np.abs(outputs(model, x)).max())


def test_read_model_leaves_the_batchnorm_model_untouched(x):
    model = build(FOLDABLE["two-bns-after-the-activation"](), functional=False)
    before = [weight.copy() for weight in model.get_weights()]
    read_model(model)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


# ---------------------------------------------------------------- placements that cannot fold


UNFOLDABLE = {
    "bn-between-two-nonlinear-stages": (lambda: [dense(6, "relu"), bn(), keras.layers.Activation("tanh"), dense(3)],
                                        "BatchNormalization"),
    "bn-on-the-input-before-an-activation": (lambda: [bn(), keras.layers.Activation("relu"), dense(6), dense(3)],
                                             "BatchNormalization"),
    "bn-after-the-last-nonlinear-activation": (lambda: [dense(6, "relu"), dense(3, "tanh"), bn()], "BatchNormalization"),
    "bn-after-the-last-activation-layer": (lambda: [dense(6, "relu"), dense(3), keras.layers.Activation("sigmoid"), bn()],
                                           "BatchNormalization"),
    "layer-normalization": (lambda: [dense(6, "relu"), keras.layers.LayerNormalization(name="norm"), dense(3)],
                            "LayerNormalization"),
}


@pytest.mark.parametrize("functional", [False, True], ids=["sequential", "functional"])
@pytest.mark.parametrize("make, mentions", UNFOLDABLE.values(), ids=UNFOLDABLE.keys())
def test_normalization_no_dense_can_absorb_is_refused(make, mentions, functional):
    with pytest.raises(UnsupportedLayerError, match=mentions):
        read_model(build(make(), functional))
