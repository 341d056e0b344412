"""The activation, preprocessing, merge and reshape layers of the model zoo, Keras ops on
symbolic tensors and nested models (issue 17, part 1 and 2).

Each model is read and rebuilt to the same function; a widen embedding on its hidden groups
comes back through `prune` to no more parameters and the same outputs; `--mode data` with a
keep ratio gives a smaller model that still runs.
"""

import keras
import numpy as np
import pytest

import keras_embed
from builders import assert_same_function
from keras_embed.errors import UnsupportedLayerError
from keras_embed.model.build import build_model
from keras_embed.stopping import StoppingRule
from keras_embed.verify import predict



def _activations_mlp():
    x = keras.Input((6,), name="features")
    h = keras.layers.ReLU(6.0, negative_slope=0.1, threshold=0.2, name="relu_capped")(keras.layers.Dense(8, name="d1")(x))
    h = keras.layers.LeakyReLU(0.1, name="leaky")(keras.layers.Dense(7, name="d2")(h))
    h = keras.layers.PReLU(alpha_initializer=keras.initializers.RandomUniform(0.0, 0.5, seed=1), name="prelu")(
        keras.layers.Dense(7, name="d3")(h))
    h = keras.layers.ELU(0.5, name="elu")(keras.layers.Dense(6, name="d4")(h))
    h = keras.layers.GaussianDropout(0.1, name="noise")(keras.layers.GaussianNoise(0.1, name="gauss")(h))
    h = keras.layers.AlphaDropout(0.1, name="alpha_drop")(keras.layers.Dropout(0.2, name="drop")(h))
    return keras.Model(x, keras.layers.Softmax(name="probabilities")(keras.layers.Dense(4, name="scores")(h)), name="mlp")


def _preprocessing_cnn():
    x = keras.Input((8, 8, 3), name="image")
    h = keras.layers.Rescaling(1 / 255.0, offset=-0.5, name="rescale")(x)
    h = keras.layers.Normalization(mean=[0.1, -0.2, 0.0], variance=[1.0, 4.0, 0.25], name="normalize")(h)
    h = keras.layers.ReLU(6.0, name="relu6")(keras.layers.Conv2D(6, 3, padding="same", name="conv_a")(h))
    h = (h + 1.0) * 0.5  # Keras ops on symbolic tensors: read as Rescaling
    h = keras.layers.Rescaling([1.0, 2.0, 0.5, 1.5, 1.0, 3.0], name="per_channel")(h)
    h = keras.layers.Conv2D(5, 3, name="conv_b")(h)
    h = keras.layers.PReLU(shared_axes=[1, 2], alpha_initializer=keras.initializers.Constant(0.25), name="prelu")(h)
    h = keras.layers.SpatialDropout2D(0.1, name="spatial_drop")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(x, keras.layers.Dense(3, name="scores")(h), name="preprocessing")


def _gated_cnn():
    """Squeeze-and-excitation (Reshape to (1, 1, C), Multiply), the other merges and Permute."""
    x = keras.Input((8, 8, 3), name="image")
    h = keras.layers.Conv2D(8, 1, activation="swish", name="expand")(x)
    h = keras.layers.Activation("hard_swish", name="hswish")(keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(h))
    gate = keras.layers.Reshape((1, 1, 8), name="squeeze")(keras.layers.GlobalAveragePooling2D(name="se_pool")(h))
    gate = keras.layers.Conv2D(3, 1, activation="relu", name="se_reduce")(gate)
    gate = keras.layers.Conv2D(8, 1, activation="hard_sigmoid", name="se_expand")(gate)
    h = keras.layers.Multiply(name="excite")([h, gate])
    a = keras.layers.Conv2D(6, 1, activation="gelu", name="branch_a")(h)
    b = keras.layers.Conv2D(6, 1, activation="mish", name="branch_b")(h)
    merged = [keras.layers.Subtract(name="sub")([a, b]), keras.layers.Average(name="avg")([a, b]),
              keras.layers.Maximum(name="max")([a, b]), keras.layers.Minimum(name="min")([a, b])]
    h = keras.layers.Concatenate(name="concat")(merged)
    h = keras.layers.Permute((2, 1, 3), name="transpose")(h)
    h = keras.layers.Flatten(name="flatten")(keras.layers.MaxPooling2D(name="pool")(h))
    return keras.Model(x, keras.layers.Dense(3, name="scores")(h), name="gated")


def _nested():
    """Transfer learning: a functional base inside a Sequential head, with a Sequential stem inside the base."""
    x = keras.Input((8, 8, 3), name="image")
    stem = keras.Sequential([keras.layers.Conv2D(6, 3, name="stem_conv"), keras.layers.ReLU(name="stem_relu")],
                            name="stem")
    h = stem(x)
    body = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="body")(h)
    base = keras.Model(x, keras.layers.Add(name="residual")([h, body]), name="base")
    return keras.Sequential([keras.Input((8, 8, 3)), base, keras.layers.GlobalAveragePooling2D(name="gap"),
                             keras.layers.Dense(3, name="scores")], name="transfer")


def _augmented():
    """The Keras tutorials' image classifier: an augmentation Sequential (the identity at inference),
    Resizing, CenterCrop and Identity before the convolutions."""
    augment = keras.Sequential([keras.layers.RandomFlip("horizontal", name="flip"),
                                keras.layers.RandomRotation(0.1, name="rotate"), keras.layers.RandomZoom(0.1, name="zoom"),
                                keras.layers.RandomContrast(0.2, name="contrast")], name="augment")
    x = keras.Input((12, 12, 3), name="image")
    h = keras.layers.Resizing(10, 10, name="resize")(augment(x))
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv_a")(keras.layers.CenterCrop(8, 8)(h))
    h = keras.layers.Identity(name="same")(keras.layers.Resizing(16, 16, interpolation="nearest", name="up")(h))
    h = keras.layers.Conv2D(5, 3, activation="relu", name="conv_b")(h)
    return keras.Model(x, keras.layers.Dense(3, name="scores")(keras.layers.GlobalAveragePooling2D(name="gap")(h)))


def _normalized():
    """UnitNormalization, RMSNormalization and GroupNormalization fix the groups they normalize; the
    groups around them stay prunable."""
    x = keras.Input((6, 6, 3), name="image")
    h = keras.layers.GroupNormalization(2, name="group_norm")(keras.layers.Conv2D(4, 3, name="conv")(x))
    h = keras.layers.Conv2D(6, 1, activation="relu", name="conv_wide")(keras.layers.Activation("relu")(h))
    h = keras.layers.Dense(5, name="d1")(keras.layers.GlobalMaxPooling2D(name="pool")(h))
    h = keras.layers.Dense(7, activation="relu", name="d2")(keras.layers.UnitNormalization(name="unit_norm")(h))
    h = keras.layers.RMSNormalization(name="rms_norm")(keras.layers.Dense(5, name="d3")(h))
    return keras.Model(x, keras.layers.Dense(3, name="scores")(h), name="normalized")


def _time_distributed():
    """Dense and Dropout wrapped in TimeDistributed over a sequence: each acts on every step alone."""
    x = keras.Input((10, 6), name="steps")
    h = keras.layers.TimeDistributed(keras.layers.Dense(8, activation="relu"), name="td_a")(x)
    h = keras.layers.TimeDistributed(keras.layers.Dropout(0.3), name="td_drop")(h)
    h = keras.layers.TimeDistributed(keras.layers.Dense(6, activation="tanh"), name="td_b")(h)
    return keras.Model(x, keras.layers.Dense(3, name="scores")(keras.layers.GlobalAveragePooling1D(name="gap")(h)))


def _convolutions_1d():
    """SeparableConv1D and DepthwiseConv1D (with and without a depth multiplier) over a signal."""
    x = keras.Input((20, 4), name="signal")
    h = keras.layers.SeparableConv1D(8, 3, padding="same", activation="relu", name="sep")(x)
    h = keras.layers.DepthwiseConv1D(3, activation="relu", name="dw")(h)
    h = keras.layers.Conv1D(6, 1, activation="relu", name="mix")(h)
    h = keras.layers.DepthwiseConv1D(3, padding="same", depth_multiplier=2, name="dw_x2")(h)  # fixes 'mix'
    h = keras.layers.Conv1D(5, 1, activation="relu", name="head")(h)
    h = keras.layers.Conv1DTranspose(4, 3, strides=2, padding="same", activation="relu", name="up")(h)
    return keras.Model(x, keras.layers.Dense(3, name="scores")(keras.layers.GlobalAveragePooling1D(name="gap")(h)))


def _volumes():
    """Conv3D, Conv3DTranspose and the 3-D padding, pooling, upsampling and cropping layers."""
    x = keras.Input((6, 6, 6, 2), name="volume")
    h = keras.layers.Conv3D(5, 3, activation="relu", name="c1")(keras.layers.ZeroPadding3D(1, name="pad")(x))
    h = keras.layers.MaxPooling3D(name="pool")(h)
    h = keras.layers.Cropping3D(1, name="crop")(keras.layers.UpSampling3D(2, name="upsample")(h))
    h = keras.layers.Conv3DTranspose(4, 3, strides=2, padding="same", activation="relu", name="c2")(h)
    h = keras.layers.AveragePooling3D(2, name="average")(keras.layers.Conv3D(3, 1, activation="relu", name="c3")(h))
    return keras.Model(x, keras.layers.Dense(2, name="scores")(keras.layers.GlobalMaxPooling3D(name="gmp")(h)))


BUILDERS = {"mlp": _activations_mlp, "preprocessing": _preprocessing_cnn, "gated": _gated_cnn, "nested": _nested,
            "augmented": _augmented, "normalized": _normalized, "time_distributed": _time_distributed,
            "convolutions_1d": _convolutions_1d, "volumes": _volumes}
GROW = {"mlp": ["d1", "d3", "d4"], "preprocessing": ["conv_a", "conv_b"], "gated": ["expand", "se_reduce", "branch_a"],
        "nested": ["stem_conv", "body"], "augmented": ["conv_a", "conv_b"], "normalized": ["conv_wide", "d2"],
        "time_distributed": ["td_a", "td_b"], "convolutions_1d": ["sep", "head", "up"],
        "volumes": ["c1", "c2", "c3"]}


def _inputs(model, samples=64, seed=0):
    return np.random.default_rng(seed).uniform(-2, 2, (samples, *model.input_shape[1:])).astype("float32")


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def case(request):
    keras.utils.set_random_seed(0)
    model = BUILDERS[request.param]()
    return request.param, model, _inputs(model)


def test_a_model_is_read_and_rebuilt_to_the_same_function(case):
    _, model, x = case
    rebuilt = build_model(keras_embed.read_model(model))
    assert_same_function(model, rebuilt, x)


def test_widen_then_prune_gives_back_no_more_parameters_and_the_same_outputs(case):
    kind, model, x = case
    steps = [(layer, 0, 0.3) for layer in GROW[kind]] + [(GROW[kind][0], 1, -0.4)]
    grown, _ = keras_embed.embed(model, widen_steps=steps)
    assert grown.count_params() > model.count_params()
    assert_same_function(model, grown, x)

    pruned, report = keras_embed.prune(grown)

    assert pruned.count_params() <= model.count_params()
    assert report.to_dict()["removed"]["duplicate"] >= len(steps)
    assert_same_function(model, pruned, x)


def test_data_mode_with_a_keep_ratio_gives_a_smaller_model_that_runs(case):
    _, model, x = case
    pruned, _ = keras_embed.prune(model, mode="data", rule=StoppingRule("keep_ratio", 0.5), data=x, force=True)
    assert pruned.count_params() < model.count_params()
    assert np.isfinite(predict(pruned, x)).all()


def test_nested_models_are_read_through_and_named():
    graph = keras_embed.read_model(_nested())
    assert graph.nested == ("base", "stem")
    assert {"stem_conv", "body", "gap"} <= set(graph.by_name)


ACTIVATIONS = ["swish", "silu", "hard_swish", "hard_silu", "gelu", "mish", "relu6", "hard_sigmoid", "elu", "selu",
               "softplus", "softsign", "log_sigmoid", "leaky_relu", "celu", "tanh_shrink", "squareplus", "sparse_plus",
               "hard_tanh", "soft_shrink", "hard_shrink", "sparse_sigmoid", "sigmoid", "tanh", "relu", "exponential"]


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_keras_activation_name_round_trips(name):
    keras.utils.set_random_seed(1)
    x = keras.Input((4,))
    h = keras.layers.Activation(name, name="act")(keras.layers.Dense(5, name="hidden")(x))
    model = keras.Model(x, keras.layers.Dense(2, name="out")(h))
    inputs = _inputs(model, 32)
    grown, _ = keras_embed.embed(model, widen_steps=[("hidden", 2, 0.4)])
    pruned, _ = keras_embed.prune(grown)
    assert pruned.count_params() == model.count_params()
    assert_same_function(model, pruned, inputs)


def test_keras_ops_on_symbolic_tensors_are_read_as_rescaling():
    x = keras.Input((5,))
    h = keras.layers.Dense(4, name="hidden")(x)
    h = keras.layers.Dense(3, name="out")(2.0 - (h / 4.0 - 1.0) * 3.0)
    model = keras.Model(x, h)
    graph = keras_embed.read_model(model, fold=False)
    assert [node.kind for node in graph.nodes].count("Rescaling") == 4
    assert_same_function(model, build_model(graph), _inputs(model))
    assert "Rescaling" not in [node.kind for node in keras_embed.read_model(model).nodes]  # folded into a Dense


def test_a_number_divided_by_a_tensor_is_refused_naming_the_op():
    x = keras.Input((5,))
    model = keras.Model(x, keras.layers.Dense(2)(1.0 / keras.layers.Dense(3)(x)))
    with pytest.raises(UnsupportedLayerError, match=r"op '.*' \(TrueDivide\) divides a number by a tensor"):
        keras_embed.read_model(model)


def test_an_adapted_normalization_and_its_inverse_keep_their_statistics():
    rng = np.random.default_rng(2)
    data = rng.normal([1.0, -3.0, 0.5], [2.0, 0.5, 1.0], (200, 3)).astype("float32")
    normalize = keras.layers.Normalization(name="normalize")
    normalize.adapt(data)
    x = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh", name="hidden")(normalize(x))
    model = keras.Model(x, keras.layers.Normalization(invert=True, mean=[2.0], variance=[9.0], name="denormalize")(
        keras.layers.Dense(1, name="out")(h)))
    assert_same_function(model, build_model(keras_embed.read_model(model, fold=False)), data)
    assert_same_function(model, build_model(keras_embed.read_model(model)), data)


def test_a_layer_name_used_twice_across_nested_models_is_refused():
    x = keras.Input((4,))
    inner = keras.Sequential([keras.layers.Dense(3, name="twin")], name="inner")
    model = keras.Model(x, keras.layers.Dense(2, name="twin")(inner(x)))  # Keras checks names one level deep only
    with pytest.raises(UnsupportedLayerError, match="two layers that read as 'twin'"):
        keras_embed.read_model(model)


def test_the_application_classes_are_read_as_stock_layers():
    from keras.src.applications.convnext import LayerScale
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    keras.utils.set_random_seed(3)
    x = keras.Input((6, 6, 4))
    branch = keras.layers.Conv2D(4, 1, name="branch")(keras.layers.Conv2D(5, 3, padding="same", activation="relu")(x))
    h = CustomScaleLayer(0.17, name="residual")([x, branch])
    h = LayerScale(0.5, 4, name="layer_scale")(keras.layers.Conv2D(4, 3, padding="same", name="scaled")(h))
    model = keras.Model(x, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    graph = keras_embed.read_model(model)
    assert {node.kind for node in graph.nodes} <= set(keras_embed.model.registry.REGISTRY)
    assert graph.node("residual").kind == "Add" and "residual_scale" not in graph.by_name  # folded into 'branch'
    assert_same_function(model, build_model(graph), _inputs(model))


def test_normalizations_fix_their_groups_and_augmentations_stay_for_training():
    keep_half = StoppingRule("keep_ratio", 0.5)
    normalized = _normalized()
    pruned, _ = keras_embed.prune(normalized, mode="data", rule=keep_half, data=_inputs(normalized), force=True)
    widths = {layer.name: layer.output.shape[-1] for layer in pruned.layers}
    assert (widths["conv"], widths["d1"], widths["d3"]) == (4, 5, 5)  # read by a normalization: fixed
    assert widths["conv_wide"] < 6 and widths["d2"] < 7

    augmented = _augmented()
    pruned, _ = keras_embed.prune(augmented, mode="data", rule=keep_half, data=_inputs(augmented), force=True)
    kinds = [type(layer).__name__ for layer in pruned.layers]
    assert kinds[1:7] == ["RandomFlip", "RandomRotation", "RandomZoom", "RandomContrast", "Resizing", "CenterCrop"]


AUGMENTATION_ARGUMENTS = {"RandomBrightness": {"factor": 0.3}, "RandomColorDegeneration": {"factor": 0.3},
                          "RandomContrast": {"factor": 0.3}, "RandomHue": {"factor": 0.3},
                          "RandomPosterization": {"factor": 4, "value_range": (0, 255)},
                          "RandomRotation": {"factor": 0.3}, "RandomSaturation": {"factor": 0.3},
                          "RandomSharpness": {"factor": 0.3}, "RandomZoom": {"height_factor": 0.2},
                          "RandomTranslation": {"height_factor": 0.2, "width_factor": 0.2},
                          "RandomColorJitter": {"brightness_factor": 0.2}}


@pytest.mark.parametrize("kind", keras_embed.model.registry.AUGMENTATIONS)
def test_every_augmentation_read_as_the_identity_is_the_identity_at_inference(kind):
    layer = getattr(keras.layers, kind)(**AUGMENTATION_ARGUMENTS.get(kind, {}))
    images = np.random.default_rng(4).normal(0.0, 300.0, (3, 9, 9, 3)).astype("float32")  # outside any value range
    assert np.array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), images)
    assert tuple(layer.compute_output_shape((None, 9, 9, 3))) == (None, 9, 9, 3)


def test_a_lift_after_conv3d_is_a_conv3d_and_prunes_away():
    model = _volumes()
    x = _inputs(model, 32)
    lifted, _ = keras_embed.embed(model, deepen_layers=["c2"], data=x)
    assert [type(layer).__name__ for layer in lifted.layers].count("Conv3D") == 3
    pruned, _ = keras_embed.prune(lifted, data=x)
    assert pruned.count_params() == model.count_params()
    assert_same_function(model, pruned, x)


def test_a_separable_conv1d_comes_back_as_one_layer():
    model = _convolutions_1d()
    grown, _ = keras_embed.embed(model, widen_steps=[("sep", 0, 0.3)])
    pruned, _ = keras_embed.prune(grown)
    assert [type(layer).__name__ for layer in pruned.layers][1:3] == ["SeparableConv1D", "DepthwiseConv1D"]


def test_time_distributed_around_a_layer_that_mixes_positions_is_refused_naming_it():
    x = keras.Input((3, 6, 6, 2))
    model = keras.Model(x, keras.layers.TimeDistributed(keras.layers.Conv2D(2, 3), name="frames")(x))
    with pytest.raises(UnsupportedLayerError, match=r"'frames' \(TimeDistributed\) wraps Conv2D; only Dense"):
        keras_embed.read_model(model)
