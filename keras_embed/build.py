"""Builds a stock Keras model from a `Graph`: it loads without keras-embed installed.

Example:
    >>> model = build_model(read_model(original))
    >>> model.count_params() == original.count_params()
    True
"""

import keras
import numpy as np


def _dense(layer):
    config = dict(layer.config, name=layer.name, units=layer.width, use_bias=layer.bias is not None)
    return keras.layers.Dense.from_config(config)


def _set_weights(keras_layer, layer):
    dtype = keras.backend.standardize_dtype(keras_layer.kernel.dtype)
    weights = [layer.kernel] + ([] if layer.bias is None else [layer.bias])
    keras_layer.set_weights([np.asarray(weight, dtype=dtype) for weight in weights])


def build_model(graph):
    """Returns a new Keras model computing what `graph` describes.

    The input keeps its name, shape and dtype, every layer keeps its name and config, and
    a Sequential model stays Sequential.
    """
    inputs = keras.Input(shape=graph.input.shape, dtype=graph.input.dtype, name=graph.input.name)
    layers = [keras.layers.deserialize(config) for config in graph.leading]
    dense_layers = []
    for layer in graph.layers:
        dense_layers.append(_dense(layer))
        layers.append(dense_layers[-1])
        layers.extend(keras.layers.deserialize(config) for config in layer.followers)
    if graph.sequential:
        model = keras.Sequential([inputs, *layers], name=graph.name)
    else:
        outputs = inputs
        for keras_layer in layers:
            outputs = keras_layer(outputs)
        model = keras.Model(inputs, outputs, name=graph.name)
    for keras_layer, layer in zip(dense_layers, graph.layers):
        _set_weights(keras_layer, layer)
    return model
