"""Unit tests of the exact redundancy rules (`find_redundancy`, `plan_exact`, `analyze`) and of
the surgery that applies their plans (`apply_plan`, `Plan`).

Every network here is written by hand as a `Graph` of float64 `DenseLayer`s, so each rule
is exercised on weights whose redundancy is known by construction, and the pruned graph is
checked numerically (a float64 forward pass) against the graph it came from. Only the
test of a constant unit folding into a layer without bias goes through Keras, to check
that the rebuilt Dense gains a bias.
"""

import json

import keras
import numpy as np
import pytest

from keras_embed import activations
from keras_embed.analysis import close_groups, find_redundancy
from keras_embed.build import build_model
from keras_embed.compress import analyze, plan_exact
from keras_embed.graph import DenseLayer, Graph, InputSpec
from keras_embed.plan import LayerEdit, Merge, Plan
from keras_embed.read import read_model
from keras_embed.surgery import apply_plan

INPUTS = 4
HOMOGENEOUS = ("relu", "leaky_relu", "linear")


# ---------------------------------------------------------------- helpers


def dense(name, kernel, bias, activation="linear"):
    """A hand-written Dense layer; `activation` is one name or a chain of names."""
    chain = (activation,) if isinstance(activation, str) else tuple(activation)
    return DenseLayer(name, kernel, bias, chain, config={"activation": chain[0]})


def chain(*layers):
    """A graph of `layers` fed by an input as wide as the first kernel."""
    return Graph("hand", InputSpec("x", (layers[0].kernel.shape[0],), "float64"), tuple(layers))


def forward(graph, x):
    """The graph's function, in float64."""
    for layer in graph.layers:
        z = x @ layer.kernel + (0.0 if layer.bias is None else layer.bias)
        x = activations.evaluate(layer.activations, z)
    return x


def assert_same_function(before, after, seed=0):
    x = np.random.default_rng(seed).standard_normal((64, before.input.shape[0]))
    expected = forward(before, x)
    np.testing.assert_allclose(forward(after, x), expected, rtol=0, atol=1e-10 * max(1.0, np.abs(expected).max()))


def one_hidden(activation="tanh", width=5, outputs=3, seed=0, use_bias=True):
    """Random weights `INPUTS -> width -> outputs`, returned as writable arrays to edit."""
    rng = np.random.default_rng(seed)
    kernel, bias = rng.normal(size=(INPUTS, width)), rng.normal(size=width)
    next_kernel, next_bias = rng.normal(size=(width, outputs)), rng.normal(size=outputs)
    if not use_bias:
        bias = next_bias = None
    return kernel, bias, next_kernel, next_bias


def two_layer_graph(kernel, bias, next_kernel, next_bias, activation="tanh"):
    return chain(dense("hidden", kernel, bias, activation), dense("out", next_kernel, next_bias))


def removed(plan, layer=None):
    """The kinds of removal a plan makes, without the kinds it makes none of."""
    return {kind: count for kind, count in plan.removed(layer).items() if count}


def pick(mapping, keys):
    return {key: mapping[key] for key in keys}


def prune_graph(graph, rtol=1e-6):
    plan = plan_exact(graph, rtol)
    return plan, apply_plan(graph, plan)


# ---------------------------------------------------------------- zero-out units


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_unit_with_zero_outgoing_weights_is_dropped(activation):
    kernel, bias, next_kernel, next_bias = one_hidden(activation)
    next_kernel[1] = 0.0
    graph = two_layer_graph(kernel, bias, next_kernel, next_bias, activation)

    (edit,) = find_redundancy(graph)
    plan, pruned = prune_graph(graph)

    assert (edit.zero_out, edit.constant, edit.merges) == ((1,), (), ())
    assert len(plan.rounds) == 1
    assert pruned.widths == [graph.widths[0] - 1, graph.widths[1]]
    np.testing.assert_array_equal(pruned.layers[0].kernel, np.delete(kernel, 1, axis=1))
    np.testing.assert_array_equal(pruned.layers[1].bias, next_bias)  # nothing folded
    assert_same_function(graph, pruned)


# ---------------------------------------------------------------- zero-in (constant) units


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize("activation, sigma", [
    ("tanh", np.tanh),
    ("sigmoid", sigmoid),
    ("relu", lambda z: np.maximum(z, 0.0)),
])
def test_constant_unit_is_folded_into_the_next_bias_as_sigma_b_times_w_out(activation, sigma):
    kernel, bias, next_kernel, next_bias = one_hidden(activation)
    kernel[:, 2] = 0.0
    bias[2] = 0.7
    graph = two_layer_graph(kernel, bias, next_kernel, next_bias, activation)

    (edit,) = find_redundancy(graph)
    _, pruned = prune_graph(graph)

    assert (edit.zero_out, edit.constant, edit.merges) == ((), (2,), ())
    np.testing.assert_allclose(pruned.layers[1].bias, next_bias + sigma(0.7) * next_kernel[2], rtol=1e-13, atol=0)
    np.testing.assert_array_equal(pruned.layers[1].kernel, np.delete(next_kernel, 2, axis=0))
    assert_same_function(graph, pruned)


def test_unit_with_zero_incoming_and_zero_outgoing_weights_counts_as_zero_out_only():
    kernel, bias, next_kernel, next_bias = one_hidden()
    kernel[:, 0] = 0.0
    next_kernel[0] = 0.0
    (edit,) = find_redundancy(two_layer_graph(kernel, bias, next_kernel, next_bias))
    assert (edit.zero_out, edit.constant) == ((0,), ())


# ---------------------------------------------------------------- duplicates


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "gelu", "relu"])
def test_identical_units_are_merged_with_summed_outgoing_weights(activation):
    kernel, bias, next_kernel, next_bias = one_hidden(activation)
    kernel[:, 3], bias[3] = kernel[:, 0], bias[0]
    graph = two_layer_graph(kernel, bias, next_kernel, next_bias, activation)

    (edit,) = find_redundancy(graph)
    _, pruned = prune_graph(graph)

    assert edit.merges == (Merge(0, (3,), (1.0,)),)
    assert (edit.zero_out, edit.constant) == ((), ())
    np.testing.assert_allclose(pruned.layers[1].kernel[0], next_kernel[0] + next_kernel[3], rtol=1e-14)
    np.testing.assert_array_equal(pruned.layers[1].bias, next_bias)
    assert_same_function(graph, pruned)


@pytest.mark.parametrize("activation", HOMOGENEOUS)
def test_positive_multiples_are_merged_for_homogeneous_activations_with_scaled_outgoing(activation):
    kernel, bias, next_kernel, next_bias = one_hidden(activation)
    kernel[:, 4], bias[4] = 2.5 * kernel[:, 1], 2.5 * bias[1]
    graph = two_layer_graph(kernel, bias, next_kernel, next_bias, activation)

    (edit,) = find_redundancy(graph)
    _, pruned = prune_graph(graph)

    ((merge),) = edit.merges
    assert (merge.keep, merge.units) == (1, (4,))
    assert merge.scales == pytest.approx((2.5,), rel=1e-12)
    np.testing.assert_allclose(pruned.layers[1].kernel[1], next_kernel[1] + 2.5 * next_kernel[4], rtol=1e-12)
    assert_same_function(graph, pruned)


@pytest.mark.parametrize("activation", ["tanh", "gelu", "sigmoid", "elu", ("relu", "tanh")],
                         ids=["tanh", "gelu", "sigmoid", "elu", "relu-then-tanh"])
def test_positive_multiples_are_not_merged_for_other_activations(activation):
    kernel, bias, next_kernel, next_bias = one_hidden(activation)
    kernel[:, 4], bias[4] = 2.5 * kernel[:, 1], 2.5 * bias[1]
    graph = two_layer_graph(kernel, bias, next_kernel, next_bias, activation)
    (edit,) = find_redundancy(graph)
    assert edit.removed_units == ()
    assert plan_exact(graph).rounds == ()


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("factor", [-1.0, -1.5])
def test_negative_multiples_are_never_merged_for_relu(activation, factor):
    kernel, bias, next_kernel, next_bias = one_hidden(activation)
    kernel[:, 4], bias[4] = factor * kernel[:, 1], factor * bias[1]
    (edit,) = find_redundancy(two_layer_graph(kernel, bias, next_kernel, next_bias, activation))
    assert edit.removed_units == ()


# ---------------------------------------------------------------- a layer keeps at least one unit


def test_layer_whose_units_are_all_zero_out_keeps_one_unit():
    kernel, bias, next_kernel, next_bias = one_hidden()
    next_kernel[:] = 0.0
    graph = two_layer_graph(kernel, bias, next_kernel, next_bias)
    plan, pruned = prune_graph(graph)
    assert removed(plan) == {"zero_out": graph.widths[0] - 1}
    assert pruned.widths[0] == 1
    assert_same_function(graph, pruned)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_layer_whose_units_are_all_constant_keeps_one_unit_and_folds_the_rest(activation):
    kernel, bias, next_kernel, next_bias = one_hidden(activation)
    kernel[:] = 0.0
    graph = two_layer_graph(kernel, bias, next_kernel, next_bias, activation)
    plan, pruned = prune_graph(graph)
    assert removed(plan) == {"constant": graph.widths[0] - 1}
    assert pruned.widths[0] == 1
    assert_same_function(graph, pruned)


# ---------------------------------------------------------------- coupled activations


@pytest.mark.parametrize("activation", ["softmax", ("relu", "softmax"), "log_softmax"],
                         ids=["softmax", "relu-then-softmax", "log_softmax"])
def test_hidden_layer_with_a_coupling_activation_is_left_alone(activation):
    kernel, bias, next_kernel, next_bias = one_hidden()
    next_kernel[0] = 0.0  # zero-out
    kernel[:, 1] = 0.0  # constant
    kernel[:, 3], bias[3] = kernel[:, 2], bias[2]  # duplicate
    graph = two_layer_graph(kernel, bias, next_kernel, next_bias, activation)
    (edit,) = find_redundancy(graph)
    assert edit.removed_units == ()
    assert plan_exact(graph).rounds == ()
    assert analyze(graph)[0]["effective_width"] == graph.widths[0]


# ---------------------------------------------------------------- the cascade


def test_unit_feeding_only_zero_out_units_is_removed_in_a_second_round():
    rng = np.random.default_rng(3)
    first = dense("first", rng.normal(size=(INPUTS, 3)), rng.normal(size=3), "tanh")
    second_kernel = rng.normal(size=(3, 3))
    second_kernel[1] = [0.0, 0.0, 0.9]  # first unit 1 feeds only second unit 2
    second = dense("second", second_kernel, rng.normal(size=3), "tanh")
    out_kernel = rng.normal(size=(3, 2))
    out_kernel[2] = 0.0  # second unit 2 is zero-out
    graph = chain(first, second, dense("out", out_kernel, rng.normal(size=2)))

    (first_edit, second_edit) = find_redundancy(graph)
    plan, pruned = prune_graph(graph)

    assert first_edit.removed_units == ()  # invisible in one pass
    assert second_edit.zero_out == (2,)
    assert len(plan.rounds) == 2
    assert [(edit.layer, edit.zero_out) for edit in plan.rounds[0]] == [("second", (2,))]
    assert [(edit.layer, edit.zero_out) for edit in plan.rounds[1]] == [("first", (1,))]
    assert pruned.widths == [2, 2, 2]
    assert_same_function(graph, pruned)
    rows = analyze(graph)
    assert [(row["layer"], row["zero_out"], row["effective_width"]) for row in rows] == [
        ("first", 1, 2), ("second", 1, 2), ("out", 0, 2),
    ]


# ---------------------------------------------------------------- rtol


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("relative, rtol, merged", [
    (1e-8, 1e-6, True),
    (1e-3, 1e-6, False),
    (1e-3, 1e-2, True),
])
def test_rtol_decides_how_close_duplicates_must_be(activation, relative, rtol, merged):
    kernel, bias, next_kernel, next_bias = one_hidden(activation)
    kernel[:, 3], bias[3] = kernel[:, 0], bias[0]
    kernel[1, 3] *= 1.0 + relative  # one incoming weight off by `relative`
    graph = two_layer_graph(kernel, bias, next_kernel, next_bias, activation)
    (edit,) = find_redundancy(graph, rtol=rtol)
    assert [(merge.keep, merge.units) for merge in edit.merges] == ([(0, (3,))] if merged else [])


@pytest.mark.parametrize("relative, rtol, removed", [(1e-9, 1e-6, True), (1e-3, 1e-6, False)])
def test_rtol_decides_what_counts_as_a_zero_weight(relative, rtol, removed):
    kernel, bias, next_kernel, next_bias = one_hidden()
    next_kernel[2] = relative * np.abs(next_kernel).max()
    (edit,) = find_redundancy(two_layer_graph(kernel, bias, next_kernel, next_bias), rtol=rtol)
    assert edit.zero_out == ((2,) if removed else ())


@pytest.mark.parametrize("function", [find_redundancy, plan_exact, analyze])
def test_negative_rtol_is_a_value_error(function):
    kernel, bias, next_kernel, next_bias = one_hidden()
    with pytest.raises(ValueError, match="rtol"):
        function(two_layer_graph(kernel, bias, next_kernel, next_bias), rtol=-1e-6)


# ---------------------------------------------------------------- layers without bias


def test_duplicates_merge_in_a_layer_without_bias():
    kernel, _, next_kernel, _ = one_hidden(use_bias=False)
    kernel[:, 2] = kernel[:, 4]
    graph = two_layer_graph(kernel, None, next_kernel, None)
    (edit,) = find_redundancy(graph)
    _, pruned = prune_graph(graph)
    assert edit.merges == (Merge(2, (4,), (1.0,)),)
    assert pruned.layers[0].bias is None and pruned.layers[1].bias is None  # nothing to fold
    assert_same_function(graph, pruned)


def test_constant_unit_folds_into_a_next_layer_without_bias_which_gains_one():
    """A sigmoid unit with zero incoming weights and no bias outputs 0.5 on every input."""
    kernel, _, next_kernel, _ = one_hidden("sigmoid", use_bias=False)
    kernel[:, 1] = 0.0
    model = keras.Sequential([
        keras.Input((INPUTS,)),
        keras.layers.Dense(kernel.shape[1], activation="sigmoid", use_bias=False, name="hidden"),
        keras.layers.Dense(next_kernel.shape[1], use_bias=False, name="out"),
    ])
    model.layers[0].set_weights([kernel.astype("float32")])
    model.layers[1].set_weights([next_kernel.astype("float32")])
    graph = read_model(model)
    x = np.random.default_rng(5).standard_normal((32, INPUTS)).astype("float32")

    plan = plan_exact(graph)
    pruned = build_model(apply_plan(graph, plan))

    assert removed(plan) == {"constant": 1}
    hidden, out = pruned.get_layer("hidden"), pruned.get_layer("out")
    assert (hidden.use_bias, hidden.units) == (False, kernel.shape[1] - 1)
    assert out.use_bias
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out.bias), 0.5 * graph.layers[1].kernel[1], rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(pruned(x)), keras.ops.convert_to_numpy(model(x)),
                               rtol=0, atol=1e-5)


# ---------------------------------------------------------------- close_groups and analyze


@pytest.mark.parametrize("noise", [0.0, 1e-9])
def test_close_groups_finds_exactly_the_planted_duplicate_rows(noise):
    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((60, 7))
    planted = [[3, 17, 42], [8, 59], [20, 21, 22, 23]]
    for group in planted:
        for row in group[1:]:
            vectors[row] = vectors[group[0]] + noise * rng.uniform(-1, 1, size=7)
    assert sorted(close_groups(vectors, 1e-6)) == sorted(planted)


def test_close_groups_does_not_group_rows_further_apart_than_tol():
    rng = np.random.default_rng(12)
    vectors = rng.standard_normal((30, 5))
    vectors[7] = vectors[2] + 2e-6
    assert close_groups(vectors, 1e-6) == []
    assert close_groups(vectors, 3e-6) == [[2, 7]]


def test_analyze_counts_each_kind_and_the_effective_width():
    kernel, bias, next_kernel, next_bias = one_hidden("tanh", width=8)
    next_kernel[7] = 0.0  # zero-out
    kernel[:, 6] = 0.0  # constant
    for copy in (4, 5):  # one group of three identical units
        kernel[:, copy], bias[copy] = kernel[:, 1], bias[1]
    graph = two_layer_graph(kernel, bias, next_kernel, next_bias)

    hidden, out = analyze(graph)

    keys = ("layer", "width", "zero_out", "constant", "duplicate_groups", "duplicates", "effective_width")
    assert list(pick(hidden, keys).values()) == ["hidden", 8, 1, 1, 1, 2, 8 - 4]
    assert list(pick(out, keys).values()) == ["out", 3, 0, 0, 0, 0, 3]


# ---------------------------------------------------------------- surgery and plans


@pytest.fixture(scope="module")
def redundant_graph():
    """tanh hidden layer of 6 with a zero-out unit, a constant unit and a duplicate."""
    kernel, bias, next_kernel, next_bias = one_hidden("tanh", width=6, seed=7)
    next_kernel[5] = 0.0
    kernel[:, 4] = 0.0
    kernel[:, 3], bias[3] = kernel[:, 0], bias[0]
    return two_layer_graph(kernel, bias, next_kernel, next_bias)


def test_apply_plan_never_changes_its_input_graph(redundant_graph):
    before = [(layer.kernel.copy(), layer.bias.copy()) for layer in redundant_graph.layers]
    plan = plan_exact(redundant_graph)

    pruned = apply_plan(redundant_graph, plan)

    assert pruned.widths != redundant_graph.widths
    for layer, (kernel, bias) in zip(redundant_graph.layers, before):
        np.testing.assert_array_equal(layer.kernel, kernel)
        np.testing.assert_array_equal(layer.bias, bias)
        for array in (layer.kernel, layer.bias):
            assert not array.flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                array[0] = 1.0


def test_apply_plan_refuses_a_plan_made_for_another_width(redundant_graph):
    plan = plan_exact(redundant_graph)
    hidden, out = redundant_graph.layers
    narrower = redundant_graph.replace_layers({
        0: hidden.with_weights(hidden.kernel[:, :-1], hidden.bias[:-1]),
        1: out.with_weights(out.kernel[:-1], out.bias),
    })
    with pytest.raises(ValueError, match="width 6"):
        apply_plan(narrower, plan)


@pytest.mark.parametrize("edit, problem", [
    (LayerEdit("hidden", 6, zero_out=(1,), constant=(1,)), "twice"),
    (LayerEdit("hidden", 6, zero_out=(0,), merges=(Merge(0, (2,), (1.0,)),)), "kept unit"),
    (LayerEdit("hidden", 6, zero_out=(6,)), "outside 0..5"),
    (LayerEdit("hidden", 6, zero_out=(0, 1, 2, 3, 4, 5)), "every unit"),
    (LayerEdit("out", 3, zero_out=(0,)), "no hidden Dense layer 'out'"),
    (LayerEdit("hidden2", 6, zero_out=(0,)), "no hidden Dense layer 'hidden2'"),
], ids=["unit-twice", "removes-kept", "out-of-range", "every-unit", "output-layer", "unknown-layer"])
def test_apply_plan_refuses_an_inconsistent_edit(redundant_graph, edit, problem):
    with pytest.raises(ValueError, match=problem):
        apply_plan(redundant_graph, Plan(((edit,),)))


def test_plan_to_dict_is_json_and_describes_every_edit(redundant_graph):
    plan = plan_exact(redundant_graph)
    text = json.dumps(plan.to_dict())
    (round_,) = json.loads(text)["rounds"]
    (edit,) = round_
    assert pick(edit, ("layer", "width", "zero_out", "constant", "merges")) == {
        "layer": "hidden", "width": 6, "zero_out": [5], "constant": [4],
        "merges": [{"keep": 0, "units": [3], "scales": [1.0]}],
    }
    assert removed(plan) == {"zero_out": 1, "constant": 1, "duplicate": 1}
    assert removed(plan, "out") == {}
    assert apply_plan(redundant_graph, plan).widths == [3, 3]
