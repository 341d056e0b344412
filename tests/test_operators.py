"""Unit tests of the function-preserving width operators (`widen`, `add_null`,
`add_constant`, `rescale`, `permute`).

Each operator is applied to the graph of a small random MLP (a tanh and a relu hidden
layer) and of two small CNNs (a residual one whose Add joins two convolutions' channels,
and one whose last convolution is read through Flatten); the result is rebuilt with
`build_model`, and the Keras outputs are compared with the original model's on random
inputs. The weights of the new graph are checked against the definition of the embedding,
and every refusal is a `ValueError` whose message names the problem.
"""

import keras
import numpy as np
import pytest

from builders import image_inputs, inputs_for, make_mlp, randomize_network
from keras_embed import build_model, read_model
from keras_embed.edit.operators import add_constant, add_null, permute, rescale, widen

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


def index_of(graph, layer):
    """The position of a producer (name or index) among the graph's producers."""
    return layer if isinstance(layer, int) else [node.name for node in graph.producers].index(layer)


def kernel(graph, index):
    node = graph.producers[index]
    return node.entry.kernel(node)


def bias(graph, index):
    node = graph.producers[index]
    return node.entry.bias(node)


def assert_keeps_outputs(graph, x, expected):
    actual = keras.ops.convert_to_numpy(build_model(graph)(x))
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def snapshot(graph):
    return [tuple(weight.copy() for weight in node.weights) for node in graph.nodes]


def assert_unchanged(graph, before):
    assert len(graph.nodes) == len(before)
    for node, weights in zip(graph.nodes, before):
        assert len(node.weights) == len(weights)
        for weight, copy in zip(node.weights, weights):
            np.testing.assert_array_equal(weight, copy)


# ---------------------------------------------------------------- widen


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.7, 2.5])
@pytest.mark.parametrize("layer, unit", [(TANH, 2), (RELU, 4), (0, 0)], ids=["tanh", "relu", "by-index"])
def test_widen_adds_one_unit_and_keeps_the_outputs(graph, x, expected, layer, unit, alpha):
    before = snapshot(graph)
    wide = widen(graph, layer, unit=unit, alpha=alpha)

    index = index_of(graph, layer)
    assert wide.widths == [width + (i == index) for i, width in enumerate(graph.widths)]
    np.testing.assert_array_equal(kernel(wide, index)[:, -1], kernel(graph, index)[:, unit])  # the copy is the last unit
    assert bias(wide, index)[-1] == bias(graph, index)[unit]
    np.testing.assert_allclose(kernel(wide, index + 1)[unit], (1 - alpha) * kernel(graph, index + 1)[unit], rtol=1e-15)
    np.testing.assert_allclose(kernel(wide, index + 1)[-1], alpha * kernel(graph, index + 1)[unit], rtol=1e-15)
    assert_keeps_outputs(wide, x, expected)
    assert_unchanged(graph, before)


def test_widen_a_layer_without_bias_keeps_it_without_bias(no_bias_graph):
    wide = widen(no_bias_graph, 0, unit=1, alpha=0.3)
    assert wide.widths == [5, 3]
    assert bias(wide, 0) is None and bias(wide, 1) is None


# ---------------------------------------------------------------- add_null, add_constant, rescale, permute


@pytest.mark.parametrize("layer", [TANH, RELU])
def test_add_null_adds_a_unit_with_zero_outgoing_weights_and_keeps_the_outputs(graph, x, expected, layer):
    index = index_of(graph, layer)
    incoming = np.random.default_rng(0).normal(size=kernel(graph, index).shape[0])
    grown = add_null(graph, layer, bias=0.8, incoming=incoming)

    assert grown.producers[index].width == graph.producers[index].width + 1
    np.testing.assert_array_equal(kernel(grown, index)[:, -1], incoming)
    assert bias(grown, index)[-1] == 0.8
    np.testing.assert_array_equal(kernel(grown, index + 1)[-1], 0.0)
    assert_keeps_outputs(grown, x, expected)


def test_add_null_defaults_to_the_papers_null_neuron(graph):
    grown = add_null(graph, TANH)
    np.testing.assert_array_equal(kernel(grown, 0)[:, -1], 0.0)
    assert bias(grown, 0)[-1] == 0.0


@pytest.mark.parametrize("layer, sigma", [(TANH, np.tanh), (RELU, lambda z: max(z, 0.0))], ids=["tanh", "relu"])
def test_add_constant_shifts_the_next_bias_and_keeps_the_outputs(graph, x, expected, layer, sigma):
    index = index_of(graph, layer)
    outgoing = np.random.default_rng(1).normal(size=graph.producers[index + 1].width)
    grown = add_constant(graph, layer, bias=0.6, outgoing=outgoing)

    np.testing.assert_array_equal(kernel(grown, index)[:, -1], 0.0)
    np.testing.assert_array_equal(kernel(grown, index + 1)[-1], outgoing)
    np.testing.assert_allclose(bias(grown, index + 1), bias(graph, index + 1) - sigma(0.6) * outgoing, rtol=1e-12)
    assert_keeps_outputs(grown, x, expected)


@pytest.mark.parametrize("factor", [0.25, 3.0])
def test_rescale_moves_a_positive_factor_from_outgoing_to_incoming_weights(graph, x, expected, factor):
    rescaled = rescale(graph, RELU, unit=2, factor=factor)
    np.testing.assert_allclose(kernel(rescaled, 1)[:, 2], factor * kernel(graph, 1)[:, 2], rtol=1e-15)
    assert bias(rescaled, 1)[2] == pytest.approx(factor * bias(graph, 1)[2], rel=1e-15)
    np.testing.assert_allclose(kernel(rescaled, 2)[2], kernel(graph, 2)[2] / factor, rtol=1e-15)
    assert rescaled.widths == graph.widths
    assert_keeps_outputs(rescaled, x, expected)


@pytest.mark.parametrize("layer", [TANH, RELU])
def test_permute_reorders_units_and_keeps_the_outputs(graph, x, expected, layer):
    index = index_of(graph, layer)
    order = np.random.default_rng(2).permutation(graph.producers[index].width)
    permuted = permute(graph, layer, order)
    np.testing.assert_array_equal(kernel(permuted, index), kernel(graph, index)[:, order])
    np.testing.assert_array_equal(bias(permuted, index), bias(graph, index)[order])
    np.testing.assert_array_equal(kernel(permuted, index + 1), kernel(graph, index + 1)[order])
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
    (lambda g: widen(g, "output", 0), "layer 'output' produces channels that cannot change"),
    (lambda g: widen(g, 2, 0), "no hidden layer 2; there are 2 hidden layers (hidden_0, hidden_1)"),
    (lambda g: widen(g, "nosuch", 0), "no hidden layer 'nosuch'; hidden layers are: hidden_0, hidden_1"),
    (lambda g: widen(g, TANH, 6), "unit=6"),
    (lambda g: widen(g, TANH, -1), "unit=-1"),
    (lambda g: add_null(g, "output"), "layer 'output' produces channels that cannot change"),
    (lambda g: add_null(g, TANH, incoming=np.zeros(3)), "incoming must have shape"),
    (lambda g: add_constant(g, TANH, 0.5, np.zeros(4)), "outgoing must have shape"),
    (lambda g: rescale(g, RELU, 0, 0.0), "factor=0.0"),
    (lambda g: rescale(g, RELU, 0, -2.0), "factor=-2.0"),
    (lambda g: rescale(g, TANH, 0, 2.0), "relu, leaky_relu or linear"),
    (lambda g: permute(g, TANH, [0, 0, 1, 2, 3, 4]), "permutation"),
    (lambda g: permute(g, TANH, [0, 1, 2, 3, 4]), "permutation"),
    (lambda g: permute(g, TANH, [1, 2, 3, 4, 5, 6]), "permutation"),
    (lambda g: widen(g, TANH, 0, alpha=float("nan")), "alpha must be a finite number"),
], ids=["widen-output-layer", "widen-output-index", "widen-unknown-layer", "widen-unit-too-large",
        "widen-unit-negative", "null-output-layer", "null-incoming-shape", "constant-outgoing-shape",
        "rescale-zero", "rescale-negative", "rescale-tanh", "permute-repeat", "permute-short", "permute-shifted",
        "widen-alpha-nan"])
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
    for apply in (lambda: widen(graph, "hidden_0", 0), lambda: add_null(graph, "hidden_0"),
                  lambda: permute(graph, "hidden_0", [1, 0, 2, 3])):
        with pytest.raises(ValueError, match="'hidden_0' produces channels that cannot change .*mixed by a softmax"):
            apply()
    # by index: the softmax layer is not among the layers that can change, so there is no layer 0
    for apply in (lambda: widen(graph, 0, 0), lambda: add_null(graph, 0), lambda: permute(graph, 0, [1, 0, 2, 3])):
        with pytest.raises(ValueError, match=r"no hidden layer 0: no layer of this model has channels that can change"):
            apply()


@pytest.mark.parametrize("unit", [5, -1])
def test_rescale_refuses_a_unit_out_of_range(graph, unit):
    with pytest.raises(ValueError, match=f"unit={unit}"):
        rescale(graph, RELU, unit, 2.0)


# ---------------------------------------------------------------- the same operators on CNNs


def residual_cnn():
    """image (6, 6, 2) -> stem Conv2D(4, 3, same, relu) -> res Conv2D(4, 3, same) -> Add(stem, res)
    -> relu -> head Conv2D(3, 3, valid, tanh) -> gap -> out Dense(2): the Add joins stem's and
    res' channels into one group."""
    image = keras.Input((6, 6, 2), name="image")
    stem = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="stem")(image)
    res = keras.layers.Conv2D(4, 3, padding="same", name="res")(stem)
    h = keras.layers.Activation("relu", name="add_relu")(keras.layers.Add(name="add")([stem, res]))
    h = keras.layers.Conv2D(3, 3, activation="tanh", name="head")(h)
    out = keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling2D(name="gap")(h))
    return randomize_network(keras.Model(image, out, name="residual_cnn"), np.random.default_rng(5))


def flatten_cnn():
    """image (5, 5, 1) -> conv Conv2D(3, 3, same, relu) -> pool -> head Conv2D(2, 1, elu) ->
    Flatten -> out Dense(3): head's channels reach the Dense once per position."""
    return randomize_network(keras.Sequential([
        keras.Input((5, 5, 1), name="image"),
        keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv"),
        keras.layers.MaxPooling2D(name="pool"),
        keras.layers.Conv2D(2, 1, activation="elu", name="head"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(3, name="out"),
    ], name="flatten_cnn"), np.random.default_rng(6))


def cnn_case(make):
    model = make()
    x = image_inputs(model, samples=32)
    return read_model(model), x, keras.ops.convert_to_numpy(model(x))


@pytest.fixture(scope="module")
def residual():
    return cnn_case(residual_cnn)


@pytest.fixture(scope="module")
def flattened():
    return cnn_case(flatten_cnn)


CNN_STEPS = {  # step -> (the CNN fixture, operator application, the group it widens or None)
    "widen-joined-group": ("residual", lambda g: widen(g, "stem", 1, 0.3), "stem"),
    "widen-joined-group-by-index": ("residual", lambda g: widen(g, 0, 3, -1.2), "stem"),
    "widen-head": ("residual", lambda g: widen(g, "head", 2, 2.5), "head"),
    "null-joined-group": ("residual", lambda g: add_null(g, "stem", bias=0.4,
                                                         incoming=np.random.default_rng(3).normal(size=(3, 3, 2))),
                          "stem"),
    "null-joined-group-in-the-branch": ("residual", lambda g: add_null(g, "res", bias=0.4,
                                                                       incoming=np.random.default_rng(3).normal(
                                                                           size=(3, 3, 4))), "stem"),
    "null-joined-group-in-the-branch-default": ("residual", lambda g: add_null(g, "res"), "stem"),
    "constant-head": ("residual", lambda g: add_constant(g, "head", 0.6, np.random.default_rng(4).normal(size=2)),
                      "head"),
    "rescale-joined-group": ("residual", lambda g: rescale(g, "stem", 2, 3.0), None),
    "permute-joined-group": ("residual", lambda g: permute(g, "res", [2, 0, 3, 1]), None),
    "permute-head": ("residual", lambda g: permute(g, "head", [1, 2, 0]), None),
    "widen-through-pooling": ("flattened", lambda g: widen(g, "conv", 0, 0.7), "conv"),
    "widen-through-flatten": ("flattened", lambda g: widen(g, "head", 1, -0.5), "head"),
    "null-through-flatten": ("flattened", lambda g: add_null(g, "head", bias=-0.3, incoming=np.ones((1, 1, 3))),
                             "head"),
    "constant-through-pooling": ("flattened", lambda g: add_constant(g, "conv", 0.6, np.array([[[1.5, -0.5]]])),
                                 "conv"),
    "rescale-through-pooling": ("flattened", lambda g: rescale(g, "conv", 1, 0.25), None),
    "permute-through-flatten": ("flattened", lambda g: permute(g, "head", [1, 0]), None),
}


@pytest.mark.parametrize("step", CNN_STEPS)
def test_operators_on_a_cnn_keep_the_outputs_and_grow_every_producer_of_the_group(request, step):
    kind, apply, group = CNN_STEPS[step]
    graph, x, expected = request.getfixturevalue(kind)
    before = snapshot(graph)

    grown = apply(graph)

    for node in graph.producers:
        assert grown.node(node.name).width == node.width + (graph.group_of(node.name) == group), node.name
    assert_keeps_outputs(grown, x, expected)
    assert_unchanged(graph, before)


def test_widen_on_a_cnn_copies_the_filter_in_every_producer_and_splits_every_reader(residual):
    graph, x, expected = residual
    unit, alpha = 1, 0.3
    wide = widen(graph, "stem", unit, alpha)

    old, new = graph.node("stem"), wide.node("stem")
    np.testing.assert_array_equal(new.entry.kernel(new)[..., -1], old.entry.kernel(old)[..., unit])
    for name in ("stem", "res"):  # both producers of the joined group make the copy (res also reads the group)
        old, new = graph.node(name), wide.node(name)
        np.testing.assert_array_equal(new.entry.kernel(new)[..., -1], new.entry.kernel(new)[..., unit])
        assert new.entry.bias(new)[-1] == new.entry.bias(new)[unit] == old.entry.bias(old)[unit]
    for name in ("res", "head"):  # both readers of the group split their input rows
        old, new = graph.node(name).entry.kernel(graph.node(name)), wide.node(name).entry.kernel(wide.node(name))
        new = new[..., :old.shape[-1]]  # res's own outputs grew too: compare its old outputs
        np.testing.assert_allclose(new[:, :, unit], (1 - alpha) * old[:, :, unit], rtol=1e-15)
        np.testing.assert_allclose(new[:, :, -1], alpha * old[:, :, unit], rtol=1e-15)
    assert_keeps_outputs(wide, x, expected)


def test_widen_through_flatten_splits_the_dense_rows_at_every_position(flattened):
    graph, x, expected = flattened
    unit, alpha = 1, -0.5
    wide = widen(graph, "head", unit, alpha)
    old, new = (g.node("out").entry.kernel(g.node("out")) for g in (graph, wide))
    positions = graph.positions("flatten", "head")  # (positions, channels): rows of the Dense kernel
    new_positions = wide.positions("flatten", "head")
    assert positions.shape == (4, 2) and new_positions.shape == (4, 3)
    np.testing.assert_allclose(new[new_positions[:, unit]], (1 - alpha) * old[positions[:, unit]], rtol=1e-15)
    np.testing.assert_allclose(new[new_positions[:, -1]], alpha * old[positions[:, unit]], rtol=1e-15)
    assert_keeps_outputs(wide, x, expected)


def test_cnn_operators_refuse_what_they_cannot_do(residual):
    graph, _, _ = residual
    with pytest.raises(ValueError, match="layer 'out' produces channels that cannot change"):
        widen(graph, "out", 0)
    with pytest.raises(ValueError, match="relu, leaky_relu or linear"):
        rescale(graph, "head", 0, 2.0)
    with pytest.raises(ValueError, match=r"incoming must have shape \(3, 3, 4\)"):
        add_null(graph, "res", incoming=np.zeros(4))
    with pytest.raises(ValueError, match=r"outgoing must have shape \(2,\)"):
        add_constant(graph, "head", 0.5, np.zeros(3))
    with pytest.raises(ValueError, match="'stem' and the one layer reading it need a bias"):  # two readers: res, head
        add_constant(graph, "stem", 0.5, np.zeros((3, 3, 4)))
