"""The streaming statistics pass (`keras_embed.measure.statistics.collect`) against a one-shot float64 oracle.

Every per-unit figure `collect` accumulates batch by batch for the requests of every
producer (extremes, positive counts, means, centered second and cross moments, the Gram
matrix of [a, 1]) must equal what numpy computes in float64 over all samples at once
from the graph's own weights, for any batch size; the data sources `collect` accepts
must give identical statistics; and data it cannot use must be refused with `InputError`.
"""

import dataclasses

import keras
import numpy as np
import pytest
import scipy.special
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builders import examples, make_mlp
from keras_embed import read_model
from keras_embed.errors import InputError
from keras_embed.measure.regimes import chain_function, producer_regimes, unit_regimes
from keras_embed.measure.statistics import LayerStats, collect, producer_requests

ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "leaky_relu", "elu", "linear", "softplus")
RTOL = 1e-5  # float32 forward pass against a float64 oracle, relative to the scale of the values

NUMPY_ACTIVATIONS = {
    "linear": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "gelu": lambda z: 0.5 * z * (1.0 + scipy.special.erf(z / np.sqrt(2.0))),  # Keras default: exact
    "leaky_relu": lambda z: np.where(z > 0, z, 0.2 * z),  # Keras default negative_slope
    "elu": lambda z: np.where(z > 0, z, np.expm1(z)),
    "softplus": lambda z: np.logaddexp(0.0, z),
}


# ---------------------------------------------------------------- the float64 oracle


def softmax(z):
    shifted = np.exp(z - z.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


NUMPY_ACTIVATIONS["softmax"] = softmax


def activation_chain(graph, node):
    """The activation names from producer `node`'s pre-activation to what its reader sees:
    its own activation, then those of the Activation layers after it (Dropout is the
    identity at inference)."""
    found = graph.elementwise_chain(node)
    following = found[0] if found else ()
    return (node.config.get("activation", "linear"),) + tuple(
        layer.config["activation"] for layer in following if layer.kind == "Activation")


def oracle(graph, x, leading=()):
    """(z, a) of every producer, by name, computed in one shot in float64 numpy from the
    graph's weights; `leading` names the activations applied to the input first."""
    hidden, result = np.asarray(x, dtype=np.float64), {}
    for name in leading:
        hidden = NUMPY_ACTIVATIONS[name](hidden)
    for node in graph.producers:
        bias = node.entry.bias(node)
        z = hidden @ node.entry.kernel(node) + (0.0 if bias is None else bias)
        a = z
        for name in activation_chain(graph, node):
            a = NUMPY_ACTIVATIONS[name](a)
        result[node.name] = (z, a)
        hidden = a
    return result


def with_gram(requests):
    """The same requests, each also accumulating the Gram matrix of [a, 1]."""
    return {key: dataclasses.replace(request, gram=True) for key, request in requests.items()}


def collect_all(graph, data, batch_size=256, gram=True, **options):
    """`collect` of every producer's pre-activation z and of what its reader sees, a."""
    requests = producer_requests(graph)
    return collect(graph, data, with_gram(requests) if gram else requests, batch_size=batch_size, **options)


def assert_close(actual, expected, scale, what):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    gap = np.abs(actual - expected)
    bound = RTOL * scale + 1e-12
    assert np.all(gap <= bound), f"{what}: max gap {gap.max():.3g} above {RTOL} x scale {scale:.3g}\n{actual}\n{expected}"


def assert_matches_oracle(layer_stats, z, a):
    """Compares one layer's `LayerStats` with numpy figures from its float64 (z, a)."""
    n = len(z)
    z_scale = max(float(np.abs(z).max()), 1.0)
    a_scale = max(float(np.abs(a).max()), 1.0)
    assert layer_stats.count == n
    assert_close(layer_stats.z_min, z.min(axis=0), z_scale, "z_min")
    assert_close(layer_stats.z_max, z.max(axis=0), z_scale, "z_max")
    assert_close(layer_stats.a_min, a.min(axis=0), a_scale, "a_min")
    assert_close(layer_stats.a_max, a.max(axis=0), a_scale, "a_max")
    # float32 may flip the sign of a z within rounding of 0: bound the count from both sides
    tolerance = RTOL * z_scale
    assert np.all((z > tolerance).sum(axis=0) <= layer_stats.positive), "positive count too small"
    assert np.all(layer_stats.positive <= (z > -tolerance).sum(axis=0)), "positive count too large"
    assert_close(layer_stats.z_mean, z.mean(axis=0), z_scale, "z_mean")
    assert_close(layer_stats.a_mean, a.mean(axis=0), a_scale, "a_mean")
    z_centered, a_centered = z - z.mean(axis=0), a - a.mean(axis=0)
    assert_close(layer_stats.z_m2, (z_centered**2).sum(axis=0), n * z_scale**2, "z_m2")
    assert_close(layer_stats.a_m2, (a_centered**2).sum(axis=0), n * a_scale**2, "a_m2")
    assert_close(layer_stats.za_m2, (z_centered * a_centered).sum(axis=0), n * z_scale * a_scale, "za_m2")
    augmented = np.column_stack([a, np.ones(n)])
    assert_close(layer_stats.gram, augmented.T @ augmented, n * a_scale**2, "gram")


# ---------------------------------------------------------------- property: any batch size, the one-shot figures


def random_chain(data, inputs, dtype="float32"):
    """A random chain: an optional leading Activation, then 1-3 hidden Dense layers (mixed
    activations, each maybe followed by an Activation and a Dropout layer), then a Dense
    output; returns (model, leading activations, activation chain of each hidden layer)."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="weight seed"))
    use_bias = data.draw(st.booleans(), label="use_bias")
    leading = data.draw(st.lists(st.sampled_from(("tanh", "sigmoid", "relu")), max_size=1), label="leading")
    layers, chains = [keras.layers.Activation(name) for name in leading], []
    for index in range(data.draw(st.integers(1, 3), label="hidden layers")):
        chain = [data.draw(st.sampled_from(ACTIVATIONS), label="activation")]
        layers.append(keras.layers.Dense(data.draw(st.integers(1, 8), label="width"), activation=chain[0],
                                         use_bias=use_bias, name=f"hidden_{index}", dtype=dtype))
        if data.draw(st.booleans(), label="extra activation layer"):
            chain.append(data.draw(st.sampled_from(ACTIVATIONS + ("softmax",)), label="extra activation"))
            layers.append(keras.layers.Activation(chain[-1], dtype=dtype))
        if data.draw(st.booleans(), label="dropout"):
            layers.append(keras.layers.Dropout(0.5, dtype=dtype))
        chains.append(tuple(chain))
    layers.append(keras.layers.Dense(data.draw(st.integers(1, 3), label="outputs"), name="output", dtype=dtype))
    model = keras.Sequential([keras.Input((inputs,), dtype=dtype), *layers])
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            layer.set_weights([rng.normal(0.0, 1.0, weight.shape).astype(dtype) for weight in layer.get_weights()])
    return model, tuple(leading), chains


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_collect_matches_a_one_shot_float64_computation_for_any_batch_size(data):
    keras.backend.clear_session()
    inputs = data.draw(st.integers(1, 6), label="inputs")
    model, leading, chains = random_chain(data, inputs)
    samples = data.draw(st.integers(1, 40), label="samples")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="data seed"))
    x = (rng.standard_normal((samples, inputs)) * data.draw(st.sampled_from([0.1, 1.0, 3.0]), label="spread")
         + data.draw(st.floats(-2.0, 2.0), label="offset")).astype("float32")
    batch_size = data.draw(st.integers(1, samples), label="batch size")
    graph = read_model(model)
    assert [activation_chain(graph, node) for node in graph.producers[:-1]] == chains

    stats = collect_all(graph, x, batch_size=batch_size)

    assert {name: layer_stats.count for name, layer_stats in stats.items()} == dict.fromkeys(stats, samples)
    assert list(stats) == [node.name for node in graph.producers]  # the hidden layers and the output
    for name, (z, a) in oracle(graph, x, leading).items():
        assert_matches_oracle(stats[name], z, a)


def test_collect_keeps_a_float64_model_in_float64():
    model = keras.Sequential([keras.Input((3,), dtype="float64"),
                              keras.layers.Dense(4, activation="tanh", name="hidden", dtype="float64"),
                              keras.layers.Dense(2, name="output", dtype="float64")])
    rng = np.random.default_rng(9)
    for layer in model.layers:
        layer.set_weights([rng.normal(size=weight.shape) for weight in layer.get_weights()])
    x = rng.normal(size=(50, 3))
    graph = read_model(model)

    layer_stats = collect_all(graph, x)["hidden"]

    z, a = oracle(graph, x)["hidden"]
    np.testing.assert_allclose(layer_stats.z_min, z.min(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer_stats.a_mean, a.mean(axis=0), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the moments and the affine fit


def test_streamed_moments_stay_accurate_where_raw_sums_would_cancel():
    rng = np.random.default_rng(0)
    z = 1e8 + rng.standard_normal((1000, 3))  # sum z^2 - n mean^2 loses every digit in float64
    a = 1e-3 * rng.standard_normal((1000, 3)) - 1e8
    layer_stats = LayerStats(3, None)
    for start in range(0, len(z), 7):
        layer_stats.update(z[start:start + 7], a[start:start + 7])
    z_centered, a_centered = z - z.mean(axis=0), a - a.mean(axis=0)
    np.testing.assert_allclose(layer_stats.z_m2, (z_centered**2).sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(layer_stats.a_m2, (a_centered**2).sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(layer_stats.za_m2, (z_centered * a_centered).sum(axis=0), rtol=0,
                               atol=1e-5 * float(np.sqrt(layer_stats.z_m2 * layer_stats.a_m2).max()))
    np.testing.assert_allclose(layer_stats.z_mean, z.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(layer_stats.a_std, a.std(axis=0), rtol=1e-6)


def test_slope_intercept_residual_recovers_an_exactly_affine_unit():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((300, 3)) * [1.0, 5.0, 0.01] + [0.0, -3.0, 100.0]
    a = z * [3.0, -0.5, 7.0] + [2.0, 1.0, -4.0]
    layer_stats = LayerStats(3, None)
    for start in range(0, len(z), 64):
        layer_stats.update(z[start:start + 64], a[start:start + 64])

    slope, intercept, residual = layer_stats.slope_intercept_residual()

    np.testing.assert_allclose(slope, [3.0, -0.5, 7.0], rtol=1e-9)
    np.testing.assert_allclose(intercept, [2.0, 1.0, -4.0], rtol=1e-6, atol=1e-6)
    assert residual.max() <= 1e-6


def test_slope_intercept_residual_is_one_without_affine_relation_and_zero_for_constant_z():
    rng = np.random.default_rng(2)
    z = rng.standard_normal(2000)
    layer_stats = LayerStats(2, None)
    # unit 0: a = z^2 on symmetric z (uncorrelated with z); unit 1: z constant, a constant
    layer_stats.update(np.column_stack([z, np.full_like(z, 0.5)]), np.column_stack([z**2, np.full_like(z, 0.25)]))

    slope, intercept, residual = layer_stats.slope_intercept_residual()

    assert residual[0] > 0.95
    assert (slope[1], residual[1]) == (0.0, 0.0)
    assert intercept[1] == pytest.approx(0.25)


def test_collect_fits_slope_one_and_zero_residual_on_linear_and_positive_relu_layers():
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="linear", name="linear_layer"),
        keras.layers.Dense(3, activation="relu", name="relu_layer"),
        keras.layers.Dense(2, name="output"),
    ])
    rng = np.random.default_rng(3)
    model.layers[0].set_weights([rng.normal(size=(3, 4)).astype("float32"), rng.normal(size=4).astype("float32")])
    # every relu pre-activation is >= 50 on the data below, where relu is the identity
    model.layers[1].set_weights([0.1 * rng.normal(size=(4, 3)).astype("float32"), np.full(3, 50.0, "float32")])
    model.layers[2].set_weights([rng.normal(size=(3, 2)).astype("float32"), np.zeros(2, "float32")])
    x = rng.standard_normal((200, 3)).astype("float32")

    stats = collect_all(read_model(model), x, batch_size=33)

    for name in ("linear_layer", "relu_layer"):
        slope, intercept, residual = stats[name].slope_intercept_residual()
        np.testing.assert_allclose(slope, 1.0, rtol=1e-6)
        np.testing.assert_allclose(intercept, 0.0, atol=1e-4)
        assert residual.max() <= 1e-6
    assert stats["relu_layer"].z_min.min() > 0
    np.testing.assert_array_equal(stats["relu_layer"].active_fraction, 1.0)


def test_gram_is_skipped_when_not_asked_and_on_batch_sees_every_sample():
    model = make_mlp([4, 2], "tanh", inputs=3)
    x = np.random.default_rng(4).standard_normal((23, 3)).astype("float32")
    seen = []

    stats = collect(read_model(model), x, producer_requests(read_model(model)), batch_size=5, on_batch=seen.append)

    assert stats["hidden_0"].gram is None
    assert seen == [5, 5, 5, 5, 3]
    assert stats["hidden_0"].count == 23


# ---------------------------------------------------------------- data sources


@pytest.fixture(scope="module")
def source_model():
    return make_mlp([6, 5, 2], ["relu", "gelu"], inputs=4, seed=5)


@pytest.fixture(scope="module")
def source_data():
    rng = np.random.default_rng(6)
    return rng.standard_normal((50, 4)).astype("float32"), rng.integers(0, 2, 50)


BATCH = 8


def chunks(array):
    return [array[start:start + BATCH] for start in range(0, len(array), BATCH)]


SOURCES = {
    "ndarray": lambda x, y: x,
    "dataset-of-x-y": lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH),
    "dataset-of-x": lambda x, y: tf.data.Dataset.from_tensor_slices(x).batch(BATCH),
    "dataset-of-dicts": lambda x, y: tf.data.Dataset.from_tensor_slices({"x": x, "y": y}).batch(BATCH),
    "list-of-batches": lambda x, y: chunks(x),
    "list-of-x-y-tuples": lambda x, y: list(zip(chunks(x), chunks(y))),
    "generator": lambda x, y: (batch for batch in chunks(x)),
    "generator-of-x-y": lambda x, y: ((xb, yb) for xb, yb in zip(chunks(x), chunks(y))),
}

FIELDS = ("z_min", "z_max", "a_min", "a_max", "positive", "z_mean", "a_mean", "z_m2", "a_m2", "za_m2", "gram", "count")


@pytest.fixture(scope="module")
def reference_stats(source_model, source_data):
    return collect_all(read_model(source_model), source_data[0], batch_size=BATCH)


@pytest.mark.parametrize("source", SOURCES, ids=SOURCES.keys())
def test_every_data_source_gives_identical_statistics(source_model, source_data, reference_stats, source):
    stats = collect_all(read_model(source_model), SOURCES[source](*source_data), batch_size=BATCH)

    assert list(stats) == list(reference_stats) == ["hidden_0", "hidden_1", "output"]
    assert stats["hidden_0"].count == reference_stats["hidden_0"].count == 50
    for name, expected in reference_stats.items():
        for field in FIELDS:
            np.testing.assert_array_equal(getattr(stats[name], field), getattr(expected, field),
                                          err_msg=f"{source}: {name}.{field}")


# ---------------------------------------------------------------- data collect refuses


def nan_in_second_batch(x):
    bad = x.copy()
    bad[BATCH + 1, 2] = np.nan
    return bad


BAD_DATA = {
    "empty-array": (lambda x: x[:0], "no samples"),
    "empty-list": (lambda x: [], "no samples"),
    "empty-generator": (lambda x: iter(()), "no samples"),
    "empty-dataset": (lambda x: tf.data.Dataset.from_tensor_slices(x[:0]).batch(BATCH), "no samples"),
    "nan": (nan_in_second_batch, "NaN"),
    "inf": (lambda x: np.where(np.arange(len(x))[:, None] == 3, np.inf, x).astype("float32"), "infinite"),
    "nan-in-a-generator-batch": (lambda x: iter(chunks(nan_in_second_batch(x))), "NaN"),
    "wrong-feature-count": (lambda x: x[:, :3], "shape"),
}


@pytest.mark.parametrize("make, mentions", BAD_DATA.values(), ids=BAD_DATA.keys())
def test_collect_refuses_unusable_data_with_input_error(source_model, source_data, make, mentions):
    with pytest.raises(InputError, match=mentions):
        collect_all(read_model(source_model), make(source_data[0]), batch_size=BATCH)


def test_unit_regimes_of_collected_stats_mark_a_linear_layer_linear():
    """The statistics feed the linearity rule: an affine layer is linear with slope 1."""
    model = make_mlp([3, 2], "linear", inputs=2, seed=7)
    graph = read_model(model)
    stats = collect_all(graph, np.random.default_rng(8).standard_normal((64, 2)).astype("float32"))
    hidden = graph.node("hidden_0")
    regime = unit_regimes(chain_function(graph, hidden), hidden.width, stats["hidden_0"])
    assert regime.linear.all()
    np.testing.assert_allclose(regime.slope, 1.0, rtol=1e-12)
    from_graph = producer_regimes(graph, stats)["hidden_0"]  # the same rule, reached from the graph
    for field in dataclasses.fields(regime):
        np.testing.assert_array_equal(getattr(from_graph, field.name), getattr(regime, field.name))
