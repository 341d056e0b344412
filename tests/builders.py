"""Small random Keras models for the tests."""

import os

import keras
import numpy as np


def make_mlp(widths, activation="relu", use_bias=True, functional=False, inputs=5, seed=0):
    """A random chain `inputs -> widths[0] -> ... -> widths[-1]` (the last is the output).

    Hidden layers use `activation` (a name, or one per hidden layer); the output is linear.
    """
    rng = np.random.default_rng(seed)
    hidden = list(widths[:-1])
    activations = [activation] * len(hidden) if isinstance(activation, str) else list(activation)
    layers = [
        keras.layers.Dense(width, activation=act, use_bias=use_bias, name=f"hidden_{index}")
        for index, (width, act) in enumerate(zip(hidden, activations))
    ] + [keras.layers.Dense(widths[-1], use_bias=use_bias, name="output")]
    x = keras.Input((inputs,), name="features")
    if functional:
        y = x
        for layer in layers:
            y = layer(y)
        model = keras.Model(x, y, name="functional_mlp")
    else:
        model = keras.Sequential([x, *layers], name="sequential_mlp")
    for layer in layers:
        layer.set_weights([rng.normal(0.0, 1.0, weight.shape).astype("float32") for weight in layer.get_weights()])
    return model


def inputs_for(model, samples=256, seed=1):
    """Seeded standard-normal inputs for `model`."""
    return np.random.default_rng(seed).standard_normal((samples, *model.inputs[0].shape[1:])).astype("float32")


def examples(default):
    """Hypothesis examples per property: `default` in `make test`, KERAS_EMBED_FUZZ_EXAMPLES in `make fuzz`."""
    return int(os.environ.get("KERAS_EMBED_FUZZ_EXAMPLES", default))
