"""Small random Keras models for the tests."""

import os

import keras
import numpy as np


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
    from keras_embed.activations import evaluate

    hidden, scale = np.asarray(x, dtype=np.float64), 0.0
    for layer in graph.layers:
        terms = np.abs(hidden) @ np.abs(layer.kernel) + (0.0 if layer.bias is None else np.abs(layer.bias))
        scale = max(scale, float(terms.max(initial=0.0)))
        hidden = evaluate(layer.activations, hidden @ layer.kernel + (0.0 if layer.bias is None else layer.bias))
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
