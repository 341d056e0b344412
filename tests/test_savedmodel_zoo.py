"""Plain SavedModels of branching networks are rebuilt as Keras models computing the same
(`keras_embed.files.savedmodel`): residual Adds, Concatenate, depthwise-separable blocks
with ZeroPadding2D and relu6, squeeze-and-excitation gates, decoders of Conv2DTranspose,
Cropping2D and UpSampling2D, ConvNeXt blocks (LayerNormalization, gelu, Dense on 4-D
tensors, grouped convolutions), and (marked `zoo`)
keras.applications models at 32x32 with random weights, each exported with
`model.export` and read back from its graph without TensorFlow loading it.
"""

import keras
import numpy as np
import pytest

from keras_embed.errors import UnsupportedLayerError
from keras_embed.files.savedmodel import read_savedmodel

pytestmark = pytest.mark.filterwarnings("ignore")

L = keras.layers


def _randomized(model, seed):
    """`model` with random weights of unit scale (and BN variances away from zero), so that
    every branch matters in the outputs."""
    rng = np.random.default_rng(seed)
    weights = []
    for weight in model.weights:
        value = rng.normal(scale=0.5, size=weight.shape)
        if "variance" in weight.path:
            value = np.abs(value) + 0.5
        weights.append(value.astype("float32"))
    model.set_weights(weights)
    return model


def residual():
    inputs = keras.Input((8, 8, 3))
    stem = L.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    branch = L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(stem))
    merged = L.Activation("relu")(L.Add()([stem, branch]))
    pooled = L.GlobalAveragePooling2D()(L.MaxPooling2D()(merged))
    return keras.Model(inputs, L.Dense(3, activation="softmax")(pooled))


def concatenated():
    inputs = keras.Input((8, 8, 3))
    left = L.Conv2D(3, 1, activation="tanh")(inputs)
    right = L.Conv2D(2, 3, padding="same", dilation_rate=2)(inputs)
    joined = L.Concatenate()([left, L.BatchNormalization()(right), inputs])
    pooled = L.AveragePooling2D(2)(L.Conv2D(4, 3, activation="sigmoid")(joined))
    return keras.Model(inputs, L.Dense(2)(L.Flatten()(pooled)))


def depthwise_separable():
    inputs = keras.Input((9, 9, 4))
    padded = L.ZeroPadding2D(((0, 1), (1, 0)))(inputs)
    depthwise = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, strides=2, use_bias=False)(padded)))
    pointwise = L.Activation("relu6")(L.BatchNormalization()(L.Conv2D(6, 1, use_bias=False)(depthwise)))
    dilated = L.DepthwiseConv2D(3, padding="same", dilation_rate=2, activation="swish")(pointwise)
    return keras.Model(inputs, L.GlobalAveragePooling2D()(L.Add()([pointwise, dilated])))


def squeeze_excite():
    inputs = keras.Input((6, 6, 4))
    features = L.Conv2D(8, 3, padding="same", activation="swish")(inputs)
    squeezed = L.GlobalAveragePooling2D(keepdims=True)(features)
    gate = L.Conv2D(8, 1, activation="sigmoid")(L.Conv2D(2, 1, activation="relu")(squeezed))
    excited = L.Multiply()([features, gate])
    hard = L.Activation("hard_swish")(L.Conv2D(4, 1)(excited))
    gated = L.Multiply()([hard, L.Activation("hard_sigmoid")(hard)])
    rows = L.Reshape((36, 4))(gated)
    return keras.Model(inputs, L.Softmax()(L.Dense(3)(L.Flatten()(L.Rescaling(0.5, offset=-1.0)(rows)))))


def assert_read_back(model, folder, seed=0):
    """Exports `model`, reads the folder back and checks both compute the same."""
    model.export(str(folder), verbose=False)
    rebuilt = read_savedmodel(str(folder))
    x = np.random.default_rng(seed).normal(size=(4, *model.input_shape[1:])).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    got = keras.ops.convert_to_numpy(rebuilt(x, training=False))
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) < 1e-4 * max(1.0, np.max(np.abs(expected)))
    return rebuilt


def _perturbed(model, seed):
    """`model` with its initial kernels and every other weight (biases, BN statistics) moved
    by a little noise: random kernels of unit scale overflow in fifty layers."""
    rng = np.random.default_rng(seed)
    model.set_weights([weight if "kernel" in variable.path else weight + rng.normal(scale=0.1, size=weight.shape)
                       for variable, weight in zip(model.weights, model.get_weights())])
    return model


def decoder(padding, kernel, strides, output_padding, size):
    """A U-Net's upward path: Conv2DTranspose (bias and relu folded in), a skip cropped by
    Cropping2D and joined, an uneven UpSampling2D."""
    inputs = keras.Input((5, 5, 2))
    up = L.Conv2DTranspose(3, kernel, strides=strides, padding=padding, output_padding=output_padding,
                           activation="relu")(inputs)
    cropped = L.Cropping2D(((1, 0), (0, 2)))(up)
    skip = L.Cropping2D(((0, 1), (2, 0)))(L.Conv2DTranspose(2, kernel, strides=strides, padding=padding,
                                                           output_padding=output_padding)(inputs))
    joined = L.BatchNormalization()(L.Concatenate()([cropped, skip]))
    return keras.Model(inputs, L.UpSampling2D(size)(joined))


def convnext_block():
    """ConvNeXt's block: a grouped 7x7 Conv2D, LayerNormalization, Dense on a 4-D tensor with
    the exact gelu, a per-channel scale, a residual Add; a LayerNormalization without scale
    or offset at the end."""
    inputs = keras.Input((6, 6, 8))
    depthwise = L.Conv2D(8, 7, padding="same", groups=8)(inputs)
    normalized = L.LayerNormalization(epsilon=1e-6)(depthwise)
    expanded = L.Dense(16, activation="gelu")(normalized)
    scaled = L.Rescaling(np.linspace(0.5, 2.0, 8).astype("float32"))(L.Dense(8)(expanded))
    merged = L.Add()([inputs, scaled])
    return keras.Model(inputs, L.LayerNormalization(center=False, scale=False)(merged))


def classes(model):
    return {type(layer).__name__ for layer in model.layers}


@pytest.mark.parametrize("build, expected", [
    (residual, {"Add", "Conv2D", "MaxPooling2D", "Dense"}),
    (concatenated, {"Concatenate", "AveragePooling2D", "Flatten"}),
    (depthwise_separable, {"ZeroPadding2D", "DepthwiseConv2D", "Add"}),
    (squeeze_excite, {"Multiply", "GlobalAveragePooling2D", "Reshape"}),
], ids=["residual", "concatenated", "depthwise_separable", "squeeze_excite"])
def test_branching_models_read_back_from_their_export(tmp_path, build, expected):
    rebuilt = assert_read_back(_randomized(build(), 1), tmp_path / "exported")
    assert expected <= classes(rebuilt)


@pytest.mark.parametrize("padding, kernel, strides, output_padding, size", [
    ("valid", 3, 2, None, 2), ("valid", 3, 2, 1, (2, 3)), ("same", 3, 2, None, (1, 2)), ("same", 3, 2, 1, (3, 1)),
    ("same", 2, 2, None, 2), ("valid", 1, 3, 2, (2, 1)),
])
def test_decoders_read_back_from_their_export(tmp_path, padding, kernel, strides, output_padding, size):
    rebuilt = assert_read_back(_randomized(decoder(padding, kernel, strides, output_padding, size), 8),
                               tmp_path / "exported")
    assert {"Conv2DTranspose", "Cropping2D", "UpSampling2D"} <= classes(rebuilt)
    upsampling = next(layer for layer in rebuilt.layers if isinstance(layer, L.UpSampling2D))
    assert upsampling.size == ((size, size) if isinstance(size, int) else size)  # one layer for both axes
    assert sum(isinstance(layer, L.BatchNormalization) for layer in rebuilt.layers) == 1  # after the Concatenate


def test_layer_normalization_gelu_and_dense_on_positions_read_back_from_their_export(tmp_path):
    rebuilt = assert_read_back(_randomized(convnext_block(), 9), tmp_path / "exported")
    assert [type(layer).__name__ for layer in rebuilt.layers].count("LayerNormalization") == 2
    assert {keras.activations.serialize(layer.activation) for layer in rebuilt.layers if isinstance(layer, L.Dense)} \
        == {"gelu", "linear"}
    assert next(layer for layer in rebuilt.layers if isinstance(layer, L.Conv2D)).groups == 8
    assert not {"BatchNormalization", "Reshape", "Flatten", "Activation"} & classes(rebuilt)  # the scale folded


def test_a_mean_over_channels_that_is_no_layer_normalization_is_refused_naming_it(tmp_path):
    import tensorflow as tf

    class Centered(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 4, 4, 3), tf.float32)])
        def __call__(self, x):
            return tf.nn.relu(x - tf.reduce_mean(x, axis=-1, keepdims=True))

    module = Centered()
    tf.saved_model.save(module, str(tmp_path / "centered"), signatures=module.__call__)
    with pytest.raises(UnsupportedLayerError, match="a Sub inside a LayerNormalization"):
        read_savedmodel(str(tmp_path / "centered"))


def test_biases_batch_norms_and_activations_fold_into_the_layers_before_them(tmp_path):
    rebuilt = assert_read_back(_randomized(residual(), 2), tmp_path / "exported")
    kinds = [type(layer).__name__ for layer in rebuilt.layers]
    assert kinds.count("BatchNormalization") == 0 and kinds.count("Conv2D") == 2  # the BN folded into its conv
    stem = next(layer for layer in rebuilt.layers if isinstance(layer, L.Conv2D))
    assert stem.get_config()["activation"] == "relu"


def test_gates_become_the_keras_activations_they_spell(tmp_path):
    rebuilt = assert_read_back(_randomized(squeeze_excite(), 3), tmp_path / "exported")
    names = {keras.activations.serialize(layer.activation) for layer in rebuilt.layers if hasattr(layer, "activation")}
    assert {"silu", "hard_silu", "sigmoid", "relu", "softmax"} <= names
    assert sum(isinstance(layer, L.Multiply) for layer in rebuilt.layers) == 1  # the SE gate; the hard swish folded


def test_a_tf_module_of_raw_ops_reads_back(tmp_path):
    """Neg, Sub and RealDiv by constants, Pad, Mean with keepdims and Squeeze, as
    `tf.saved_model.save` writes them from plain TensorFlow."""
    import tensorflow as tf

    rng = np.random.default_rng(5)

    class Raw(tf.Module):
        def __init__(self):
            self.kernel = tf.Variable(rng.normal(size=(3, 3, 2, 4)).astype("float32"))
            self.dense = tf.Variable(rng.normal(size=(4, 3)).astype("float32"))
            self.offset = tf.Variable(rng.normal(size=(4,)).astype("float32"))

        @tf.function(input_signature=[tf.TensorSpec((None, 6, 6, 2), tf.float32)])
        def __call__(self, x):
            padded = tf.pad(x, [[0, 0], [1, 2], [2, 1], [0, 0]])
            z = tf.nn.conv2d(padded, self.kernel, strides=1, padding="VALID")
            z = tf.nn.relu6((2.0 - (-z)) / 3.0 - self.offset)
            pooled = tf.squeeze(tf.reduce_mean(z, axis=[1, 2], keepdims=True), axis=[1, 2])
            return tf.nn.softmax(tf.matmul(pooled, self.dense))

    module = Raw()
    tf.saved_model.save(module, str(tmp_path / "raw"), signatures=module.__call__)
    rebuilt = read_savedmodel(str(tmp_path / "raw"))
    x = rng.normal(size=(4, 6, 6, 2)).astype("float32")
    expected = module(tf.constant(x)).numpy()
    assert np.max(np.abs(keras.ops.convert_to_numpy(rebuilt(x)) - expected)) < 1e-5
    assert {"ZeroPadding2D", "Conv2D", "GlobalAveragePooling2D", "Flatten", "Dense"} <= classes(rebuilt)


def test_a_branching_export_is_pruned_through_the_cli_and_computes_the_same(tmp_path):
    from click.testing import CliRunner

    from keras_embed.tools.cli import main

    model = _randomized(depthwise_separable(), 6)
    model.export(str(tmp_path / "exported"), verbose=False)
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "exported"), "-o", str(tmp_path / "pruned.keras")])
    assert result.exit_code == 0, result.stderr
    pruned = keras.models.load_model(tmp_path / "pruned.keras")
    x = np.random.default_rng(7).normal(size=(8, 9, 9, 4)).astype("float32")
    assert np.max(np.abs(keras.ops.convert_to_numpy(pruned(x)) - keras.ops.convert_to_numpy(model(x)))) < 1e-4


def test_an_unsupported_op_on_a_branch_is_refused_naming_it(tmp_path):
    import tensorflow as tf

    class Branching(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 3), tf.float32)])
        def __call__(self, x):
            return tf.nn.relu(x) + tf.math.cos(x) * tf.math.square(x)

    module = Branching()
    tf.saved_model.save(module, str(tmp_path / "odd"), signatures=module.__call__)
    with pytest.raises(UnsupportedLayerError, match="as Keras layers: Cos, Square; supported ops: MatMul"):
        read_savedmodel(str(tmp_path / "odd"))


APPLICATIONS = {
    "MobileNetV2": lambda: keras.applications.MobileNetV2((32, 32, 3), alpha=0.35, weights=None),
    "MobileNetV3Small": lambda: keras.applications.MobileNetV3Small((32, 32, 3), weights=None),
    "MobileNetV3Small-minimalistic": lambda: keras.applications.MobileNetV3Small((32, 32, 3), weights=None,
                                                                                  minimalistic=True),
    "ResNet50": lambda: keras.applications.ResNet50(input_shape=(32, 32, 3), weights=None),
    "DenseNet121": lambda: keras.applications.DenseNet121(input_shape=(32, 32, 3), weights=None),
    "EfficientNetB0": lambda: keras.applications.EfficientNetB0(input_shape=(32, 32, 3), weights=None),
    "ConvNeXtTiny": lambda: keras.applications.ConvNeXtTiny(input_shape=(32, 32, 3), weights=None),
}
# BatchNormalization layers left after folding: the input's Rescaling (and Normalization), and in
# DenseNet the batch normalizations of concatenated tensors, which no layer before them can absorb
BATCH_NORMS_LEFT = {"MobileNetV2": 0, "MobileNetV3Small": 1, "MobileNetV3Small-minimalistic": 1, "ResNet50": 0,
                    "DenseNet121": 62, "EfficientNetB0": 1, "ConvNeXtTiny": 1}


@pytest.mark.zoo
@pytest.mark.parametrize("name", APPLICATIONS)
def test_keras_applications_read_back_from_their_export(tmp_path, name):
    model = _perturbed(APPLICATIONS[name](), 4)
    rebuilt = assert_read_back(model, tmp_path / "exported")
    assert rebuilt.count_params() < model.count_params()  # biases, BN and scales folded
    assert sum(isinstance(layer, L.BatchNormalization) for layer in rebuilt.layers) == BATCH_NORMS_LEFT[name]
