"""Small random Keras models for the tests: Dense chains and small CNNs (`cnns`)."""

import functools
import os

import keras
import numpy as np
from hypothesis import event
from hypothesis import strategies as st

from keras_embed import prune, read_model
from keras_embed.pipeline import hold_out
from keras_embed.errors import RuleError
from keras_embed.stopping import StoppingRule, measure
from keras_embed.verify import predict


def make_mlp(widths, activation="relu", use_bias=True, functional=False, inputs=5, seed=0):
    """A random chain `inputs -> widths[0] -> ... -> widths[-1]` (the last is the output).

    Hidden layers use `activation` (a name, or one per hidden layer); the output is linear.
    """
    hidden = list(widths[:-1])
    activations = [activation] * len(hidden) if isinstance(activation, str) else list(activation)
    layers = [
        keras.layers.Dense(width, activation=act, use_bias=use_bias, name=f"hidden_{index}")
        for index, (width, act) in enumerate(zip(hidden, activations))
    ] + [keras.layers.Dense(widths[-1], use_bias=use_bias, name="output")]
    return randomize(chain(layers, inputs, functional, "mlp"), seed=seed)


def rounding_scale(graph, x):
    """The largest sum of absolute terms any Dense layer of `graph` adds up on `x` (float64).

    float32 forward passes of two networks computing the same function differ by about
    1e-7 times this, which exceeds any fixed share of the output when terms cancel.
    """
    from keras_embed.measure.regimes import chain_function

    hidden, scale = np.asarray(x, dtype=np.float64), 0.0
    for node in graph.producers:
        kernel, bias = node.entry.kernel(node), node.entry.bias(node)
        terms = np.abs(hidden) @ np.abs(kernel) + (0.0 if bias is None else np.abs(bias))
        scale = max(scale, float(terms.max(initial=0.0)))
        hidden = chain_function(graph, node)(hidden @ kernel + (0.0 if bias is None else bias))
    return scale


def chain(layers, inputs, functional, name, input_name="features"):
    """A Sequential or functional model of `layers` on `inputs` features."""
    x = keras.Input((inputs,), name=input_name)
    if not functional:
        return keras.Sequential([x, *layers], name=f"sequential_{name}")
    y = x
    for layer in layers:
        y = layer(y)
    return keras.Model(x, y, name=f"functional_{name}")


def randomize(model, scale=1.0, seed=0, only=None):
    """Sets every weight (of layers of class `only`, if given) to seeded N(0, scale^2) values."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if only is None or isinstance(layer, only):
            layer.set_weights([rng.normal(0.0, scale, weight.shape).astype("float32") for weight in layer.get_weights()])
    return model


def inputs_for(model, samples=256, seed=1):
    """Seeded standard-normal inputs for `model`."""
    return np.random.default_rng(seed).standard_normal((samples, *model.inputs[0].shape[1:])).astype("float32")


def examples(default):
    """Hypothesis examples per property: `default` in `make test`, KERAS_EMBED_FUZZ_EXAMPLES in `make fuzz`."""
    return int(os.environ.get("KERAS_EMBED_FUZZ_EXAMPLES", default))


CNN_ACTIVATIONS = ("relu", "tanh", "linear", "elu", "sigmoid")


def image_inputs(model, samples=64, seed=0):
    return np.random.default_rng(seed).normal(size=(samples, *model.inputs[0].shape[1:])).astype("float32")


def randomize_network(model, rng):
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape) if index == 3 else rng.normal(0, 0.5, w.shape)
                               for index, w in enumerate(weights)])
        elif weights:
            layer.set_weights([rng.normal(0, 0.6, w.shape) for w in weights])
    return model


@st.composite
def cnns(draw):
    """A function building a random small CNN over 1, 2 or 3 spatial axes; it returns the
    model and the names of its editable producers. (Layers are built in the test, not while
    drawing: Keras seeds its initializers from the `random` module.)"""
    width = lambda: draw(st.integers(1, 4))  # noqa: E731
    activation = lambda: draw(st.sampled_from(CNN_ACTIVATIONS))  # noqa: E731
    rank = draw(st.sampled_from([1, 2, 2, 3]))
    choice = {
        "rank": rank, "channels": draw(st.integers(1, 2)), "stem": (width(), draw(st.sampled_from([1, 3])), activation()),
        "residual": draw(st.booleans()) and (width(), draw(st.booleans()), activation(), draw(st.sampled_from([1, 3]))),
        "depthwise": rank < 3 and draw(st.booleans()) and (draw(st.sampled_from(["same", "valid"])), activation()),
        "side": draw(st.booleans()) and (width(), activation()),
        "pooling": draw(st.sampled_from(["none", "max", "average", "pad", "upsample", "crop"])),
        "head": (width(), draw(st.sampled_from([1, 2])), activation()),
        "flatten": draw(st.booleans()), "seed": draw(st.integers(0, 2**16)),
    }
    return functools.partial(_build_cnn, choice)


def _build_cnn(choice):
    rank = choice["rank"]
    layer = lambda kind, *args, **kwargs: getattr(keras.layers, f"{kind}{rank}D")(*args, **kwargs)  # noqa: E731
    image = keras.Input((6,) * rank + (choice["channels"],), name="image")
    filters, kernel_size, stem_activation = choice["stem"]
    h = layer("Conv", filters, kernel_size, padding="same", activation=stem_activation, name="stem")(image)
    if choice["residual"]:  # BN between conv and activation
        filters, batch_norm, branch_activation, kernel_size = choice["residual"]
        branch = layer("Conv", filters, 3, padding="same", name="res_a")(h)
        if batch_norm:
            branch = keras.layers.BatchNormalization(name="res_bn")(branch)
        branch = keras.layers.Activation(branch_activation, name="res_act")(branch)
        branch = layer("Conv", h.shape[-1], kernel_size, padding="same", name="res_b")(branch)
        h = keras.layers.Activation("relu", name="add_relu")(keras.layers.Add(name="add")([h, branch]))
    if choice["depthwise"]:
        padding, depthwise_activation = choice["depthwise"]
        h = layer("DepthwiseConv", 3, padding=padding, activation=depthwise_activation, name="depthwise")(h)
    if choice["side"]:  # a side branch joined by concatenation
        side = layer("Conv", choice["side"][0], 1, activation=choice["side"][1], name="side")(h)
        h = keras.layers.Concatenate(name="concat")([h, side])
    pooling = {"max": lambda: layer("MaxPooling", name="pool"), "pad": lambda: layer("ZeroPadding", 1, name="pad"),
               "average": lambda: layer("AveragePooling", 2, padding="same", name="pool"),
               "upsample": lambda: layer("UpSampling", 2, name="upsample"),
               "crop": lambda: layer("Cropping", 1, name="crop")}.get(choice["pooling"])
    if pooling:
        h = pooling()(h)
    filters, kernel_size, head_activation = choice["head"]
    h = layer("Conv", filters, kernel_size, activation=head_activation, name="head")(h)
    h = keras.layers.Flatten(name="flatten")(h) if choice["flatten"] else layer("GlobalAveragePooling", name="gap")(h)
    model = randomize_network(keras.Model(image, keras.layers.Dense(3, name="out")(h)), np.random.default_rng(choice["seed"]))
    graph = read_model(model)
    editable = [node.name for node in graph.producers if graph.group_of(node.name) in graph.editable_groups()]
    return model, editable


@st.composite
def stopping_rules(draw, max_params):
    """A `--mode data` stopping rule of any kind, its bound drawn where it may or may not hold."""
    bounds = {
        "keep_ratio": st.floats(0.01, 1.0),
        "max_output_error": st.floats(0.0, 1.0),
        "target_params": st.integers(1, max_params),
        "max_accuracy_drop": st.floats(0.0, 60.0),
    }
    kind = draw(st.sampled_from(sorted(bounds)))
    return StoppingRule(kind, float(draw(bounds[kind])))


def prune_meeting(rule, model, x, y):
    """`prune(mode="data")` of `model` under `rule` on (x, y): None when it raises
    `RuleError`, else (pruned, report) once the rule is checked to hold on the rows of x it
    holds out to judge on (`pipeline.hold_out`)."""
    event(rule.kind)
    try:
        pruned, report = prune(model, data=x, mode="data", rule=rule, labels=y)
    except RuleError:
        event(f"{rule.kind}: not met")
        return None
    _, (x, y), _ = hold_out(x, y)
    figures = {**measure(predict(model, x), predict(pruned, x), y), "flops": report.after.flops}
    assert rule.holds(figures, pruned.count_params())
    return pruned, report


def all_layers(model):
    """Every layer of `model`, those of the models nested in it included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def two_io():
    """Two inputs, two outputs: an image (8, 8, 2) through Conv2D and features (5,) through
    Dense, joined by Concatenate into a Dense trunk with two Dense heads, scores (3,) and value (2,)."""
    image = keras.Input((8, 8, 2), name="image")
    features = keras.Input((5,), name="features")
    seen = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(image)
    seen = keras.layers.Flatten(name="flat")(keras.layers.MaxPooling2D(name="pool")(seen))
    read = keras.layers.Dense(8, activation="tanh", name="features_dense")(features)
    trunk = keras.layers.Dense(12, activation="relu", name="trunk")(keras.layers.Concatenate(name="join")([seen, read]))
    scores = keras.layers.Dense(3, name="scores")(trunk)
    value = keras.layers.Dense(2, activation="sigmoid", name="value")(trunk)
    return keras.Model([image, features], [scores, value], name="two_io")


def batchnorm_from_data(model, x):
    """Sets every BatchNormalization's moving statistics to those of `x` (one training-mode
    call at momentum 0), so a randomly initialised deep network does not compute a constant."""
    norms = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(x, training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum
    return model


def assert_same_function(reference, candidate, x, relative=1e-5):
    """The two models' outputs on `x` agree within `relative` of the reference's scale."""
    expected, actual = predict(reference, x), predict(candidate, x)
    assert expected.shape == actual.shape
    assert np.abs(expected - actual).max() <= relative * max(np.abs(expected).max(), 1e-6)
