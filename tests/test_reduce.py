"""The statistics reduced inside TensorFlow (`keras_embed.measure.reduce`) against NumPy.

A CNN's probe is reduced over samples and positions where TensorFlow computes it, traced
for large probes and eagerly for the first batches of small ones: both ways must give the
statistics NumPy computes from the probe's raw outputs, the cheap requests (no moments)
must leave only the figures they skip NaN, and the traced verification must equal the
eager one.
"""

import keras
import numpy as np
import pytest

from builders import randomize_network
from keras_embed.measure import reduce
from keras_embed.measure.regimes import moment_producers
from keras_embed.measure.statistics import collect, producer_requests, source_requests
from keras_embed.model.build import build_model
from keras_embed.model.read import read_model
from keras_embed.verify import outputs_on


@pytest.fixture(scope="module")
def residual_cnn():
    """image -> conv (tanh) -> conv + BN -> relu -> Add -> conv -> GAP -> Dense, random weights."""
    image = keras.Input((6, 6, 2), name="image")
    stem = keras.layers.Conv2D(4, 3, padding="same", activation="tanh", name="stem")(image)
    branch = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(4, 3, padding="same", name="branch")(stem))
    h = keras.layers.Add(name="add")([stem, keras.layers.Activation("relu", name="relu")(branch)])
    h = keras.layers.Conv2D(3, 3, activation="relu", name="head")(h)
    model = keras.Model(image, keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling2D(name="gap")(h)))
    randomize_network(model, np.random.default_rng(0))
    return model, np.random.default_rng(1).normal(size=(37, 6, 6, 2)).astype("float32")


def _requests(graph):
    return {**producer_requests(graph, moments=moment_producers(graph)), **source_requests(graph)}


def _raw(graph, x, name):
    values = build_model(graph, outputs=[name])(x, training=False)
    return np.asarray(values, dtype=np.float64).reshape(-1, values.shape[-1])


@pytest.mark.parametrize("traced", [False, True])
def test_reduced_statistics_equal_numpy_on_the_raw_outputs(residual_cnn, traced, monkeypatch):
    model, x = residual_cnn
    if traced:
        monkeypatch.setattr(reduce, "EAGER_BYTES", 0)
    graph = read_model(model)
    requests = _requests(graph)

    stats = collect(graph, x, requests, batch_size=10)

    for key, request in requests.items():
        z, a = (_raw(graph, x, parts[0][0]) for parts in (request.z, request.a))
        scale = max(1.0, float(np.abs(a).max()))
        np.testing.assert_allclose(stats[key].z_min, z.min(axis=0), atol=1e-6 * scale)
        np.testing.assert_allclose(stats[key].a_max, a.max(axis=0), atol=1e-6 * scale)
        np.testing.assert_allclose(stats[key].a_mean, a.mean(axis=0), atol=1e-6 * scale)
        assert stats[key].count == len(a)
        if request.moments:
            centered = a - a.mean(axis=0)
            np.testing.assert_allclose(stats[key].a_m2, (centered**2).sum(axis=0), rtol=1e-5, atol=1e-6 * scale**2)
        else:
            assert np.isnan(stats[key].a_m2).all()
    assert moment_producers(graph) == {"stem"}  # tanh: the affine fit decides; relu and linear need extremes only


def test_a_traced_probe_is_traced_once_per_model_and_requests(residual_cnn, monkeypatch):
    model, x = residual_cnn
    monkeypatch.setattr(reduce, "EAGER_BYTES", 0)
    graph = read_model(model)
    requests = _requests(graph)
    probe = build_model(graph, outputs=sorted({name for r in requests.values() for name, _ in r.z + r.a}))

    first = collect(graph, x, requests, batch_size=16, probe=probe)
    second = collect(graph, x, requests, batch_size=16, probe=probe)

    traced = reduce._TRACED[probe]
    assert len(traced) == 1 and next(iter(traced.values())).experimental_get_tracing_count() == 1
    np.testing.assert_array_equal(first["stem"].z_max, second["stem"].z_max)


def test_traced_outputs_equal_eager_outputs(residual_cnn, monkeypatch):
    model, x = residual_cnn
    eager = outputs_on(model, x)
    monkeypatch.setattr("keras_embed.verify.EAGER_BYTES", 0)

    np.testing.assert_allclose(outputs_on(model, x), eager, rtol=1e-6, atol=1e-6)
