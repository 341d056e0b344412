"""Unit tests of the function-preserving width operators (`widen`, `add_null`,
`add_constant`, `rescale`, `permute`).

Each operator is applied to the graph of a small random MLP (a tanh and a relu hidden
layer), the result is rebuilt with `build_model`, and the Keras outputs are compared with
the original model's on random inputs. The weights of the new graph are checked against
the definition of the embedding, and every refusal is a `ValueError` whose message names
the problem.
"""

import keras
import numpy as np
import pytest

from builders import inputs_for, make_mlp
from keras_embed import build_model, read_model
from keras_embed.operators import add_constant, add_null, permute, rescale, widen

TANH, RELU = "hidden_0", "hidden_1"  # widths 6 and 5, output 3


@pytest.fixture(scope="module")
def model():
    return make_mlp([6, 5, 3], activation=("tanh", "relu"), seed=4)


@pytest.fixture(scope="module")
def graph(model):
    return read_model(model)


@pytest.fixture(scope="module")
def x(model):
    return inputs_for(model, samples=128)


@pytest.fixture(scope="module")
def expected(model, x):
    return keras.ops.convert_to_numpy(model(x))


@pytest.fixture(scope="module")
def no_bias_graph():
    return read_model(make_mlp([4, 3], activation="tanh", use_bias=False, seed=2))


def assert_keeps_outputs(graph, x, expected):
    actual = keras.ops.convert_to_numpy(build_model(graph)(x))
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def snapshot(graph):
    return [(layer.kernel.copy(), None if layer.bias is None else layer.bias.copy()) for layer in graph.layers]


def assert_unchanged(graph, before):
    for layer, (kernel, bias) in zip(graph.layers, before):
        np.testing.assert_array_equal(layer.kernel, kernel)
        if bias is not None:
            np.testing.assert_array_equal(layer.bias, bias)


# ---------------------------------------------------------------- widen


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.7, 2.5])
@pytest.mark.parametrize("layer, unit", [(TANH, 2), (RELU, 4), (0, 0)], ids=["tanh", "relu", "by-index"])
def test_widen_adds_one_unit_and_keeps_the_outputs(graph, x, expected, layer, unit, alpha):
    before = snapshot(graph)
    wide = widen(graph, layer, unit=unit, alpha=alpha)

    index = graph.hidden_index(layer)
    old, new = graph.layers[index], wide.layers[index]
    old_next, new_next = graph.layers[index + 1], wide.layers[index + 1]
    assert wide.widths == [width + (i == index) for i, width in enumerate(graph.widths)]
    np.testing.assert_array_equal(new.kernel[:, -1], old.kernel[:, unit])  # the copy is the last unit
    assert new.bias[-1] == old.bias[unit]
    np.testing.assert_allclose(new_next.kernel[unit], (1 - alpha) * old_next.kernel[unit], rtol=1e-15)
    np.testing.assert_allclose(new_next.kernel[-1], alpha * old_next.kernel[unit], rtol=1e-15)
    assert_keeps_outputs(wide, x, expected)
    assert_unchanged(graph, before)


def test_widen_a_layer_without_bias_keeps_it_without_bias(no_bias_graph):
    wide = widen(no_bias_graph, 0, unit=1, alpha=0.3)
    assert wide.widths == [5, 3]
    assert wide.layers[0].bias is None and wide.layers[1].bias is None


# ---------------------------------------------------------------- add_null, add_constant, rescale, permute


@pytest.mark.parametrize("layer", [TANH, RELU])
def test_add_null_adds_a_unit_with_zero_outgoing_weights_and_keeps_the_outputs(graph, x, expected, layer):
    index = graph.hidden_index(layer)
    incoming = np.random.default_rng(0).normal(size=graph.layers[index].kernel.shape[0])
    grown = add_null(graph, layer, bias=0.8, incoming=incoming)

    assert grown.layers[index].width == graph.layers[index].width + 1
    np.testing.assert_array_equal(grown.layers[index].kernel[:, -1], incoming)
    assert grown.layers[index].bias[-1] == 0.8
    np.testing.assert_array_equal(grown.layers[index + 1].kernel[-1], 0.0)
    assert_keeps_outputs(grown, x, expected)


def test_add_null_defaults_to_the_papers_null_neuron(graph):
    grown = add_null(graph, TANH)
    np.testing.assert_array_equal(grown.layers[0].kernel[:, -1], 0.0)
    assert grown.layers[0].bias[-1] == 0.0


@pytest.mark.parametrize("layer, sigma", [(TANH, np.tanh), (RELU, lambda z: max(z, 0.0))], ids=["tanh", "relu"])
def test_add_constant_shifts_the_next_bias_and_keeps_the_outputs(graph, x, expected, layer, sigma):
    index = graph.hidden_index(layer)
    outgoing = np.random.default_rng(1).normal(size=graph.layers[index + 1].width)
    grown = add_constant(graph, layer, bias=0.6, outgoing=outgoing)

    np.testing.assert_array_equal(grown.layers[index].kernel[:, -1], 0.0)
    np.testing.assert_array_equal(grown.layers[index + 1].kernel[-1], outgoing)
    np.testing.assert_allclose(grown.layers[index + 1].bias, graph.layers[index + 1].bias - sigma(0.6) * outgoing,
                               rtol=1e-12)
    assert_keeps_outputs(grown, x, expected)


@pytest.mark.parametrize("factor", [0.25, 3.0])
def test_rescale_moves_a_positive_factor_from_outgoing_to_incoming_weights(graph, x, expected, factor):
    rescaled = rescale(graph, RELU, unit=2, factor=factor)
    old, new = graph.layers[1], rescaled.layers[1]
    np.testing.assert_allclose(new.kernel[:, 2], factor * old.kernel[:, 2], rtol=1e-15)
    assert new.bias[2] == pytest.approx(factor * old.bias[2], rel=1e-15)
    np.testing.assert_allclose(rescaled.layers[2].kernel[2], graph.layers[2].kernel[2] / factor, rtol=1e-15)
    assert rescaled.widths == graph.widths
    assert_keeps_outputs(rescaled, x, expected)


@pytest.mark.parametrize("layer", [TANH, RELU])
def test_permute_reorders_units_and_keeps_the_outputs(graph, x, expected, layer):
    index = graph.hidden_index(layer)
    order = np.random.default_rng(2).permutation(graph.layers[index].width)
    permuted = permute(graph, layer, order)
    np.testing.assert_array_equal(permuted.layers[index].kernel, graph.layers[index].kernel[:, order])
    np.testing.assert_array_equal(permuted.layers[index].bias, graph.layers[index].bias[order])
    np.testing.assert_array_equal(permuted.layers[index + 1].kernel, graph.layers[index + 1].kernel[order])
    assert_keeps_outputs(permuted, x, expected)


def test_operators_chain_and_never_change_their_input(graph, x, expected):
    before = snapshot(graph)
    grown = widen(add_null(widen(graph, TANH, 0, 0.4), RELU, bias=-0.2), RELU, 1, -1.5)
    grown = permute(rescale(grown, RELU, 5, 2.0), TANH, np.arange(7)[::-1])
    assert grown.widths == [7, 7, 3]
    assert_keeps_outputs(grown, x, expected)
    assert_unchanged(graph, before)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("apply, problem", [
    (lambda g: widen(g, "output", 0), "no hidden Dense layer 'output'"),
    (lambda g: widen(g, 2, 0), "no hidden Dense layer 2"),
    (lambda g: widen(g, "nosuch", 0), "no hidden Dense layer 'nosuch'"),
    (lambda g: widen(g, TANH, 6), "unit=6"),
    (lambda g: widen(g, TANH, -1), "unit=-1"),
    (lambda g: add_null(g, "output"), "no hidden Dense layer 'output'"),
    (lambda g: add_null(g, TANH, incoming=np.zeros(3)), "incoming must have shape"),
    (lambda g: add_constant(g, TANH, 0.5, np.zeros(4)), "outgoing must have shape"),
    (lambda g: rescale(g, RELU, 0, 0.0), "factor=0.0"),
    (lambda g: rescale(g, RELU, 0, -2.0), "factor=-2.0"),
    (lambda g: rescale(g, TANH, 0, 2.0), "relu, leaky_relu or linear"),
    (lambda g: permute(g, TANH, [0, 0, 1, 2, 3, 4]), "permutation"),
    (lambda g: permute(g, TANH, [0, 1, 2, 3, 4]), "permutation"),
    (lambda g: permute(g, TANH, [1, 2, 3, 4, 5, 6]), "permutation"),
], ids=["widen-output-layer", "widen-output-index", "widen-unknown-layer", "widen-unit-too-large",
        "widen-unit-negative", "null-output-layer", "null-incoming-shape", "constant-outgoing-shape",
        "rescale-zero", "rescale-negative", "rescale-tanh", "permute-repeat", "permute-short", "permute-shifted"])
def test_operator_refuses_bad_arguments_with_a_value_error_naming_the_problem(graph, apply, problem):
    with pytest.raises(ValueError) as error:
        apply(graph)
    assert problem in str(error.value)


@pytest.mark.parametrize("apply, problem", [
    (lambda g: add_null(g, 0, bias=0.5), "no bias"),
    (lambda g: add_constant(g, 0, 0.5, np.ones(3)), "need a bias"),
], ids=["null-with-bias", "constant"])
def test_operator_refuses_a_bias_on_a_layer_without_bias(no_bias_graph, apply, problem):
    with pytest.raises(ValueError, match=problem):
        apply(no_bias_graph)


def test_add_null_without_bias_on_a_layer_without_bias_is_fine(no_bias_graph):
    assert add_null(no_bias_graph, 0).widths == [5, 3]


def test_units_of_a_softmax_hidden_layer_cannot_grow():
    graph = read_model(make_mlp([4, 3], activation="softmax"))
    for apply in (lambda: widen(graph, 0, 0), lambda: add_null(graph, 0), lambda: permute(graph, 0, [1, 0, 2, 3])):
        with pytest.raises(ValueError, match="mixes its units"):
            apply()


@pytest.mark.parametrize("unit", [5, -1])
def test_rescale_refuses_a_unit_out_of_range(graph, unit):
    with pytest.raises(ValueError, match=f"unit={unit}"):
        rescale(graph, RELU, unit, 2.0)
