"""Depth: critical lifting (`deepen`) and the data rules of `prune` that undo it.

`deepen` inserts a relu layer that is the identity on the calibration data; `prune`
with that data must find every such layer linearized and compose it into the next,
giving back a network no larger than the narrow one with the same outputs. The unit
tests pin down each data rule on its own: smooth layers in their near-linear range,
linear activations (no data needed), the growth rule, dead and constant units, and the
exact sign rule of piecewise-linear activations.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builders import examples, inputs_for, make_mlp
from keras_embed import build_model, prune, read_model
from keras_embed.edit.operators import deepen
from keras_embed.errors import InputError, VerificationError
from keras_embed.measure.regimes import chain_function, unit_regimes
from keras_embed.measure.statistics import LayerStats, collect, producer_requests
from keras_embed.model.activations import of_name
from keras_embed.pipeline import lower_bounds

MIXED = ("relu", "tanh", "sigmoid", "gelu", "leaky_relu", "elu")


def outputs(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)


def dense_layers(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]


def producer_names(graph):
    return [node.name for node in graph.producers]


def hidden_names(graph):
    """The producers of editable groups: for a Dense chain, the hidden layers."""
    return [node.name for node in graph.producers if graph.group_of(node.name) in graph.editable_groups()]


def set_weights(model, weights):
    """Sets (kernel, bias) of each Dense layer of `model`, in order, as float32."""
    for layer, pair in zip(dense_layers(model), weights):
        layer.set_weights([np.asarray(weight, dtype="float32") for weight in pair])


# ---------------------------------------------------------------- property: prune undoes critical lifting


@settings(max_examples=examples(50), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_prune_collapses_every_critical_lift_and_gives_back_the_narrow_network(data):
    keras.backend.clear_session()
    depth = data.draw(st.integers(1, 3), label="hidden layers")
    widths = data.draw(st.lists(st.integers(1, 8), min_size=depth, max_size=depth), label="widths")
    pool = data.draw(st.sampled_from([("relu",), MIXED]), label="activation pool")
    activations = data.draw(st.lists(st.sampled_from(pool), min_size=depth, max_size=depth), label="activations")
    narrow = make_mlp(widths + [data.draw(st.integers(1, 3), label="outputs")], activations,
                      functional=data.draw(st.booleans(), label="functional"),
                      inputs=data.draw(st.integers(1, 6), label="inputs"),
                      seed=data.draw(st.integers(0, 2**16), label="seed"))
    x = inputs_for(narrow, samples=200, seed=data.draw(st.integers(0, 2**16), label="data seed"))
    graph, inserted = read_model(narrow), []
    for _ in range(data.draw(st.integers(1, 3), label="lifts")):
        hidden = hidden_names(graph)
        assert hidden == producer_names(graph)[:-1]
        name = data.draw(st.sampled_from(hidden), label="lift after")
        lower = lower_bounds(graph, name, x)
        graph = deepen(graph, name, lower, margin=data.draw(st.floats(0.1, 2.0), label="margin"))
        names = producer_names(graph)
        inserted.append(names[names.index(name) + 1])
    deep = build_model(graph)
    assert len(dense_layers(deep)) == depth + 1 + len(inserted)

    pruned, report = prune(deep, data=x)

    expected = outputs(narrow, x)
    assert len(dense_layers(pruned)) <= len(dense_layers(narrow))
    assert pruned.count_params() <= narrow.count_params()
    assert np.abs(outputs(pruned, x) - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    # A lift can only be kept when the layer before it was itself linear on the data and was
    # composed into it first (then the two are interchangeable; see the test below).
    collapsed = report.to_dict()["collapsed_layers"]
    names = producer_names(graph)
    before = {name: names[index - 1] for index, name in enumerate(names) if index}
    kept = [name for name in inserted if name not in collapsed and before[name] not in collapsed]
    assert not kept, f"lifts {inserted}, collapsed {collapsed}"
    assert len(collapsed) >= len(set(inserted))


def test_lift_after_a_layer_dead_on_the_data_takes_the_place_of_that_layer():
    """hidden_1 (one relu unit) is dead on the data, so it is linear and collapses into its
    lift first; the network is then constant on the data, every layer linear on it, and
    collapses and weight rules take turns until one Dense layer is left."""
    narrow = make_mlp([4, 1, 3], "relu", inputs=1, seed=0)
    x = inputs_for(narrow, samples=200, seed=0)
    graph = read_model(narrow)
    assert collect(graph, x, producer_requests(graph))["hidden_1"].z_max < 0
    deep = build_model(deepen(graph, "hidden_1", lower_bounds(graph, "hidden_1", x)))

    pruned, report = prune(deep, data=x)

    figures = report.to_dict()
    assert figures["collapsed_layers"][0] == "hidden_1"
    assert sorted(figures["collapsed_layers"]) == ["hidden_0", "hidden_1", "hidden_1_lift"]
    assert figures["not_collapsed_would_grow"] == []
    assert [layer.name for layer in dense_layers(pruned)] == ["output"]
    assert pruned.count_params() <= narrow.count_params()
    expected = outputs(narrow, x)
    np.testing.assert_allclose(outputs(pruned, x), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


# ---------------------------------------------------------------- smooth activations: near-linear range


def tanh_model(scale, seed=0):
    """5 -> Dense(8, tanh) -> Dense(3) with incoming weights of the given scale."""
    rng = np.random.default_rng(seed)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh", name="smooth"),
                              keras.layers.Dense(3, name="output")])
    set_weights(model, [(scale * rng.standard_normal((5, 8)), scale * rng.standard_normal(8)),
                        (rng.standard_normal((8, 3)), rng.standard_normal(3))])
    return model


@pytest.fixture(scope="module")
def calibration():
    return np.random.default_rng(10).standard_normal((300, 5)).astype("float32")


def test_tanh_layer_in_its_near_linear_range_is_collapsed_within_the_verification_tolerance(calibration):
    model = tanh_model(1e-3)

    pruned, report = prune(model, data=calibration)

    assert report.to_dict()["collapsed_layers"] == ["smooth"]
    assert [layer.name for layer in dense_layers(pruned)] == ["output"]
    assert report.analysis.linear_fraction("smooth") == 1.0
    figures = report.to_dict()
    assert figures["layers"][0]["linear_fraction"] == 1.0
    assert figures["max_abs_diff"] <= figures["atol"]
    np.testing.assert_allclose(outputs(pruned, calibration), outputs(model, calibration), rtol=0, atol=figures["atol"])


def test_tanh_layer_with_order_one_pre_activations_is_not_collapsed(calibration):
    model = tanh_model(1.0)

    pruned, report = prune(model, data=calibration)

    figures = report.to_dict()
    assert figures["collapsed_layers"] == []
    assert [layer.units for layer in dense_layers(pruned)] == [8, 3]
    assert figures["layers"][0]["linear_fraction"] < 0.5


def test_hidden_layer_with_linear_activation_is_collapsed_even_without_data():
    model = make_mlp([6, 4, 2], ["tanh", "linear"], inputs=5, seed=11)
    x = inputs_for(model)

    pruned, report = prune(model)

    figures = report.to_dict()
    assert figures["collapsed_layers"] == ["hidden_1"]
    assert [layer.name for layer in dense_layers(pruned)] == ["hidden_0", "output"]
    assert figures["layers"][1]["linear_fraction"] == 1.0
    assert figures["layers"][0]["linear_fraction"] is None  # unknown without data
    np.testing.assert_allclose(outputs(pruned, x), outputs(model, x), rtol=1e-5, atol=1e-5)


def chunks(x, size=50):
    return [x[start:start + size] for start in range(0, len(x), size)]


DATA_SOURCES = [
    pytest.param(lambda x: x, id="ndarray"),
    pytest.param(lambda x: chunks(x), id="list-of-batches"),
    pytest.param(lambda x: tf.data.Dataset.from_tensor_slices(x).batch(50), id="dataset"),
]


@pytest.mark.parametrize("source", DATA_SOURCES)
def test_prune_verifies_the_outputs_on_the_calibration_data_whatever_its_source(calibration, source):
    """The near-linear tanh collapse changes the outputs by ~3e-7: above atol=1e-15 it must fail."""
    with pytest.raises(VerificationError):
        prune(tanh_model(1e-3), data=source(calibration), atol=1e-15)


def test_prune_refuses_one_shot_calibration_data_it_would_read_twice(calibration):
    with pytest.raises(InputError, match="one-shot iterator"):
        prune(tanh_model(1e-3), data=(batch for batch in chunks(calibration)))


# ---------------------------------------------------------------- the growth rule


@pytest.fixture(scope="module")
def bottleneck():
    """32 -> Dense(2, linear) -> Dense(32): composing the two makes 33 x 32 weights out of 66 + 96."""
    model = make_mlp([2, 32], "linear", inputs=32, seed=12)
    return model, inputs_for(model, samples=64)


def test_bottleneck_layer_is_not_collapsed_when_the_merged_layer_would_grow(bottleneck):
    model, x = bottleneck

    pruned, report = prune(model, data=x)

    figures = report.to_dict()
    assert figures["collapsed_layers"] == []
    assert figures["not_collapsed_would_grow"] == ["hidden_0"]
    assert figures["params_after"] == figures["params_before"] == 66 + 96
    assert [layer.units for layer in dense_layers(pruned)] == [2, 32]


def test_bottleneck_layer_is_collapsed_with_allow_growth(bottleneck):
    model, x = bottleneck

    pruned, report = prune(model, data=x, allow_growth=True)

    figures = report.to_dict()
    assert figures["collapsed_layers"] == ["hidden_0"]
    assert figures["not_collapsed_would_grow"] == []
    assert figures["params_after"] == 33 * 32
    assert [layer.units for layer in dense_layers(pruned)] == [32]
    expected = outputs(model, x)
    np.testing.assert_allclose(outputs(pruned, x), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# ---------------------------------------------------------------- dead and constant units on the data


def test_relu_units_dead_on_the_data_are_removed_and_counted_as_dead(calibration):
    rng = np.random.default_rng(13)
    model = make_mlp([10, 6, 3], "relu", inputs=5, seed=13)
    kernel, bias = dense_layers(model)[0].get_weights()
    dead = [1, 4, 7]
    kernel[:, dead] = 0.01 * rng.standard_normal((5, 3))
    bias[dead] = -5.0  # pre-activation below -4 on every sample: dead on the data, not by the weights
    dense_layers(model)[0].set_weights([kernel, bias])
    z = calibration @ kernel + bias
    assert z[:, dead].max() < 0 and (z[:, [0, 2, 3, 5, 6, 8, 9]] > 0).any(axis=0).all()

    pruned, report = prune(model, data=calibration)

    figures = report.to_dict()
    assert figures["removed"]["dead"] == 3
    assert figures["layers"][0]["width_after"] == 7
    assert dense_layers(pruned)[0].units == 7
    np.testing.assert_allclose(outputs(pruned, calibration), outputs(model, calibration), rtol=0, atol=1e-5)
    # a weights-only prune cannot know these units are dead
    assert prune(model)[1].to_dict()["removed"]["dead"] == 0


def test_units_constant_on_the_data_fold_their_value_into_the_next_bias():
    rng = np.random.default_rng(14)
    model = make_mlp([6, 3], "tanh", inputs=4, seed=14)
    kernel, bias = dense_layers(model)[0].get_weights()
    constant = [0, 3]
    kernel[:, constant] = 0.0
    kernel[0, constant] = [1.5, -2.0]  # they read feature 0 only, which is 0 in the data
    bias[constant] = [0.7, -0.3]
    dense_layers(model)[0].set_weights([kernel, bias])
    x = rng.standard_normal((200, 4)).astype("float32")
    x[:, 0] = 0.0
    next_kernel, next_bias = dense_layers(model)[1].get_weights()

    pruned, report = prune(model, data=x)

    assert report.to_dict()["removed"]["constant"] == 2
    assert dense_layers(pruned)[0].units == 4
    expected_bias = next_bias + np.tanh([0.7, -0.3]) @ next_kernel[constant]
    np.testing.assert_allclose(dense_layers(pruned)[1].get_weights()[1], expected_bias, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outputs(pruned, x), outputs(model, x), rtol=0, atol=1e-5)
    # a data rule: where feature 0 moves, the units are not constant and the outputs differ
    moved = x.copy()
    moved[:, 0] = 1.0
    assert np.abs(outputs(pruned, moved) - outputs(model, moved)).max() > 1e-2


# ---------------------------------------------------------------- deepen


@pytest.fixture(scope="module")
def small_graph():
    return read_model(make_mlp([4, 3, 2], ["relu", "tanh"], inputs=3, seed=15))


@pytest.mark.parametrize("layer, lower, margin, mentions", [
    ("hidden_0", np.zeros(3), 1.0, "4 finite lower bounds"),
    ("hidden_0", np.zeros((4, 1)), 1.0, "(4, 1)"),
    ("hidden_0", np.array([0.0, np.nan, 0.0, 0.0]), 1.0, "finite"),
    ("hidden_0", np.array([0.0, np.inf, 0.0, 0.0]), 1.0, "finite"),
    ("hidden_0", np.zeros(4), 0.0, "margin=0.0"),
    ("hidden_1", np.zeros(3), -0.5, "margin=-0.5"),
    ("output", np.zeros(2), 1.0, "produces channels that cannot change"),
    ("nosuchlayer", np.zeros(4), 1.0, "nosuchlayer"),
], ids=["too-few-bounds", "2d-bounds", "nan-bound", "inf-bound", "zero-margin", "negative-margin", "output-layer",
        "unknown-layer"])
def test_deepen_refuses_bad_arguments_with_a_value_error(small_graph, layer, lower, margin, mentions):
    with pytest.raises(ValueError) as error:
        deepen(small_graph, layer, lower, margin)
    assert mentions in str(error.value)


def test_deepen_inserts_an_identity_relu_layer_that_keeps_outputs_on_the_data(small_graph):
    x = np.random.default_rng(16).standard_normal((100, 3)).astype("float32")
    lower = lower_bounds(small_graph, "hidden_1", x)
    np.testing.assert_array_equal(lower, collect(small_graph, x, producer_requests(small_graph))["hidden_1"].a_min)

    deep = deepen(small_graph, "hidden_1", lower, margin=0.5)

    lift = deep.producers[2]
    assert producer_names(deep) == ["hidden_0", "hidden_1", "hidden_1_lift", "output"]
    assert lift.kind == "Dense" and lift.inputs == ("hidden_1",) and deep.node("output").inputs == ("hidden_1_lift",)
    assert chain_function(deep, lift).name == "relu"
    np.testing.assert_array_equal(lift.entry.kernel(lift), np.eye(3))
    np.testing.assert_allclose(lift.entry.bias(lift), 0.5 - lower)
    lift_stats = collect(deep, x, producer_requests(deep))["hidden_1_lift"]
    np.testing.assert_allclose(lift_stats.z_min, 0.5, rtol=1e-5)  # the margin, reached at the data's minimum
    np.testing.assert_allclose(outputs(build_model(deep), x), outputs(build_model(small_graph), x), rtol=1e-5, atol=1e-5)
    # the names stay unique when the same layer is lifted again
    assert deepen(deep, "hidden_1", lower, 0.5).producers[2].name == "hidden_1_lift2"


# ---------------------------------------------------------------- the exact sign rule of piecewise-linear units


def regimes_of(activation, z):
    """`unit_regimes` of a one-unit layer whose pre-activations on the data are `z`."""
    function = of_name(activation)
    layer_stats = LayerStats(1, None)
    z = np.asarray(z, dtype=np.float64).reshape(-1, 1)
    layer_stats.update(z, function(z))
    return unit_regimes(function, 1, layer_stats)


# a few barely negative samples among many positive ones: the affine-fit residual is far
# below lin_tol, but the kink lies inside the range
BARELY_SPANNING = np.concatenate([[-1e-6, -1e-9], np.linspace(0.1, 10.0, 1000)])


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_relu_unit_whose_pre_activations_span_zero_is_not_linear_however_small_the_negative_part(activation):
    regime = regimes_of(activation, BARELY_SPANNING)
    assert not regime.linear[0]


@pytest.mark.parametrize("activation, z, slope", [
    ("relu", np.linspace(0.0, 3.0, 50), 1.0),  # the kink at the edge is not inside
    ("relu", np.linspace(-3.0, 0.0, 50), 0.0),  # dead: constant zero
    ("leaky_relu", np.linspace(-3.0, -1.0, 50), 0.2),
    ("relu6", np.linspace(0.5, 5.5, 50), 1.0),
])
def test_piecewise_linear_unit_on_one_side_of_its_kinks_is_linear_with_the_exact_slope(activation, z, slope):
    regime = regimes_of(activation, z)
    assert regime.linear[0]
    assert regime.slope[0] == pytest.approx(slope)


def test_relu6_unit_spanning_its_upper_kink_is_not_linear():
    assert not regimes_of("relu6", np.linspace(1.0, 6.5, 50)).linear[0]


def test_relu_layer_with_one_barely_negative_pre_activation_is_not_collapsed_by_prune():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="relu", name="hinge"),
                              keras.layers.Dense(1, name="output")])
    set_weights(model, [([[1.0]], [0.0]), ([[2.0]], [0.5])])
    x = BARELY_SPANNING.astype("float32").reshape(-1, 1)

    pruned, report = prune(model, data=x, atol=0.0)

    figures = report.to_dict()
    assert figures["collapsed_layers"] == []
    assert len(dense_layers(pruned)) == 2
    assert figures["max_abs_diff"] == 0.0
