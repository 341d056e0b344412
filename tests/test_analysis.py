"""Unit tests of the exact redundancy rules (`find_redundancy`, `plan_exact`, `analyze`) and of
the surgery that applies their plans (`apply_plan`, `Plan`).

Every Dense network here is written by hand as a `Graph` of float64 `Node`s, so each rule
is exercised on weights whose redundancy is known by construction, and the pruned graph is
checked numerically (a float64 forward pass) against the graph it came from. `analyze`
takes a Keras model: the hand-written graph is built as a float64 model, so nothing is
rounded on the way. The test of a constant unit folding into a layer without bias goes
through Keras from the start, to check that the rebuilt Dense gains a bias. The same rules
on convolutions are checked on small hand-set CNNs, against Keras' own outputs.
"""

import json

import keras
import numpy as np
import pytest

from keras_embed.edit.plan import GroupEdit, Merge, Plan
from keras_embed.edit.surgery import apply_plan
from keras_embed.find.grouping import close_groups
from keras_embed.find.weight_rules import find_redundancy
from keras_embed.model.activations import of_name
from keras_embed.model.build import build_model
from keras_embed.model.graph import Graph, Node
from keras_embed.model.read import read_model
from keras_embed.pipeline import analyze, plan_exact

INPUTS = 4
HOMOGENEOUS = ("relu", "leaky_relu", "linear")


# ---------------------------------------------------------------- helpers


def dense(name, kernel, bias, activation="linear", source="x"):
    """A hand-written float64 Dense node and, for a chain of activation names, one
    Activation node per name after the first; returns the list of nodes."""
    names = (activation,) if isinstance(activation, str) else tuple(activation)
    kernel = np.asarray(kernel, dtype=np.float64)
    weights = (kernel,) if bias is None else (kernel, bias)
    config = {"units": kernel.shape[1], "activation": names[0], "use_bias": bias is not None, "dtype": "float64"}
    nodes = [Node(name, "Dense", (source,), config, weights, (kernel.shape[1],))]
    for index, following in enumerate(names[1:]):
        nodes.append(Node(f"{name}_act{index}", "Activation", (nodes[-1].name,),
                          {"activation": following, "dtype": "float64"}, (), (kernel.shape[1],)))
    return nodes


def chain(*layers):
    """A graph of `layers` (lists of nodes from `dense`, each fed by the one before) on an
    input "x" as wide as the first kernel."""
    width = layers[0][0].weights[0].shape[0]
    nodes = [Node("x", "InputLayer", (), {"dtype": "float64"}, (), (width,))]
    for layer in layers:
        first, *rest = layer
        nodes += [Node(first.name, first.kind, (nodes[-1].name,), first.config, first.weights, first.shape), *rest]
    return Graph("hand", tuple(nodes), (nodes[-1].name,), sequential=True)


def kernel_of(graph, index):
    node = graph.producers[index]
    return node.entry.kernel(node)


def bias_of(graph, index):
    node = graph.producers[index]
    return node.entry.bias(node)


def forward(graph, x):
    """The graph's function (a chain of Dense and Activation nodes), in float64."""
    for node in graph.nodes[1:]:
        if node.role == "produces":
            b = node.entry.bias(node)
            x = x @ node.entry.kernel(node) + (0.0 if b is None else b)
        x = of_name(node.config["activation"])(x)
    return x


def assert_same_function(before, after, seed=0):
    x = np.random.default_rng(seed).standard_normal((64, before.inputs[0].width))
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


def removed(plan, group=None):
    """The kinds of removal a plan makes, without the kinds it makes none of."""
    return {kind: count for kind, count in plan.removed(group).items() if count}


def pick(mapping, keys):
    return {key: mapping[key] for key in keys}


def prune_graph(graph, rtol=1e-6):
    plan = plan_exact(graph, rtol)
    return plan, apply_plan(graph, plan)


def analyze_graph(graph, **options):
    """`analyze` of the float64 Keras model the hand-written graph describes."""
    model = build_model(graph)
    assert all(weight.dtype == np.float64 for weight in model.get_weights())
    return analyze(model, **options)


# ---------------------------------------------------------------- zero-out units


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_unit_with_zero_outgoing_weights_is_dropped(activation):
    kernel, bias, next_kernel, next_bias = one_hidden(activation)
    next_kernel[1] = 0.0
    graph = two_layer_graph(kernel, bias, next_kernel, next_bias, activation)

    (edit,) = find_redundancy(graph)
    plan, pruned = prune_graph(graph)

    assert edit.group == "hidden"
    assert (edit.zero_out, edit.constant, edit.merges) == ((1,), (), ())
    assert len(plan.rounds) == 1
    assert pruned.widths == [graph.widths[0] - 1, graph.widths[1]]
    np.testing.assert_array_equal(kernel_of(pruned, 0), np.delete(kernel, 1, axis=1))
    np.testing.assert_array_equal(bias_of(pruned, 1), next_bias)  # nothing folded
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
    np.testing.assert_allclose(bias_of(pruned, 1), next_bias + sigma(0.7) * next_kernel[2], rtol=1e-13, atol=0)
    np.testing.assert_array_equal(kernel_of(pruned, 1), np.delete(next_kernel, 2, axis=0))
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
    np.testing.assert_allclose(kernel_of(pruned, 1)[0], next_kernel[0] + next_kernel[3], rtol=1e-14)
    np.testing.assert_array_equal(bias_of(pruned, 1), next_bias)
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
    np.testing.assert_allclose(kernel_of(pruned, 1)[1], next_kernel[1] + 2.5 * next_kernel[4], rtol=1e-12)
    assert_same_function(graph, pruned)


@pytest.mark.parametrize("activation", ["tanh", "gelu", "sigmoid", "elu", ("relu", "tanh")],
                         ids=["tanh", "gelu", "sigmoid", "elu", "relu-then-tanh"])
def test_positive_multiples_are_not_merged_for_other_activations(activation):
    kernel, bias, next_kernel, next_bias = one_hidden(activation)
    kernel[:, 4], bias[4] = 2.5 * kernel[:, 1], 2.5 * bias[1]
    graph = two_layer_graph(kernel, bias, next_kernel, next_bias, activation)
    assert find_redundancy(graph) == ()  # no group loses a channel
    assert plan_exact(graph).rounds == ()


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("factor", [-1.0, -1.5])
def test_negative_multiples_are_never_merged_for_relu(activation, factor):
    kernel, bias, next_kernel, next_bias = one_hidden(activation)
    kernel[:, 4], bias[4] = factor * kernel[:, 1], factor * bias[1]
    assert find_redundancy(two_layer_graph(kernel, bias, next_kernel, next_bias, activation)) == ()


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
    assert "hidden" in graph.frozen_groups
    assert find_redundancy(graph) == ()
    assert plan_exact(graph).rounds == ()
    assert analyze_graph(graph)[0]["effective_width"] == graph.widths[0]


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

    (second_edit,) = find_redundancy(graph)  # "first" is invisible in one pass: no edit for it
    plan, pruned = prune_graph(graph)

    assert second_edit.group == "second" and second_edit.zero_out == (2,)
    assert len(plan.rounds) == 2
    assert [(edit.group, edit.zero_out) for edit in plan.rounds[0]] == [("second", (2,))]
    assert [(edit.group, edit.zero_out) for edit in plan.rounds[1]] == [("first", (1,))]
    assert pruned.widths == [2, 2, 2]
    assert_same_function(graph, pruned)
    rows = analyze_graph(graph)
    assert [(row["name"], row["zero_out"], row["effective_width"]) for row in rows] == [
        ("first", 1, 2), ("second", 1, 2), ("out", 0, 2),
    ]


# ---------------------------------------------------------------- rtol


def merged_pairs(graph, rtol):
    return [(merge.keep, merge.units) for edit in find_redundancy(graph, rtol=rtol) for merge in edit.merges]


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
    assert merged_pairs(graph, rtol) == ([(0, (3,))] if merged else [])


@pytest.mark.parametrize("relative, rtol, removed", [(1e-9, 1e-6, True), (1e-3, 1e-6, False)])
def test_rtol_decides_what_counts_as_a_zero_weight(relative, rtol, removed):
    kernel, bias, next_kernel, next_bias = one_hidden()
    next_kernel[2] = relative * np.abs(next_kernel).max()
    edits = find_redundancy(two_layer_graph(kernel, bias, next_kernel, next_bias), rtol=rtol)
    assert [(edit.group, edit.zero_out) for edit in edits] == ([("hidden", (2,))] if removed else [])


@pytest.mark.parametrize("function", [find_redundancy, plan_exact, analyze_graph],
                         ids=["find_redundancy", "plan_exact", "analyze"])
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
    assert bias_of(pruned, 0) is None and bias_of(pruned, 1) is None  # nothing to fold
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
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out.bias), 0.5 * kernel_of(graph, 1)[1], rtol=1e-6)
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

    hidden, out = analyze_graph(graph)

    keys = ("name", "width_before", "zero_out", "constant", "duplicate_groups", "duplicates", "effective_width")
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
    before = [tuple(weight.copy() for weight in node.weights) for node in redundant_graph.producers]
    plan = plan_exact(redundant_graph)

    pruned = apply_plan(redundant_graph, plan)

    assert pruned.widths != redundant_graph.widths
    for node, weights in zip(redundant_graph.producers, before):
        assert len(node.weights) == len(weights) == 2
        for array, copy in zip(node.weights, weights):
            np.testing.assert_array_equal(array, copy)
            assert not array.flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                array[0] = 1.0


def test_apply_plan_refuses_a_plan_made_for_another_width(redundant_graph):
    plan = plan_exact(redundant_graph)
    hidden, out = redundant_graph.producers
    narrower = redundant_graph.with_nodes(
        hidden.entry.with_weights(hidden, kernel_of(redundant_graph, 0)[:, :-1], bias_of(redundant_graph, 0)[:-1])
        if node is hidden else
        out.entry.with_weights(out, kernel_of(redundant_graph, 1)[:-1], bias_of(redundant_graph, 1))
        if node is out else node
        for node in redundant_graph.nodes
    )
    assert narrower.widths == [5, 3]
    with pytest.raises(ValueError, match="plan was made for group 'hidden' of width 6, found width 5"):
        apply_plan(narrower, plan)


@pytest.mark.parametrize("edit, problem", [
    (GroupEdit("hidden", 6, zero_out=(1,), constant=(1,)), "removes a channel twice or removes a kept one"),
    (GroupEdit("hidden", 6, zero_out=(0,), merges=(Merge(0, (2,), (1.0,)),)),
     "removes a channel twice or removes a kept one"),
    (GroupEdit("hidden", 6, zero_out=(6,)), "names a channel outside 0..5"),
    (GroupEdit("hidden", 6, zero_out=(0, 1, 2, 3, 4, 5)), "removes every channel"),
    (GroupEdit("out", 3, zero_out=(0,)), "group 'out', which this graph cannot change; editable groups: hidden"),
    (GroupEdit("hidden2", 6, zero_out=(0,)), "group 'hidden2', which this graph cannot change; editable groups: hidden"),
], ids=["unit-twice", "removes-kept", "out-of-range", "every-unit", "output-layer", "unknown-layer"])
def test_apply_plan_refuses_an_inconsistent_edit(redundant_graph, edit, problem):
    with pytest.raises(ValueError) as error:
        apply_plan(redundant_graph, Plan(((edit,),)))
    assert problem in str(error.value)


def test_plan_to_dict_is_json_and_describes_every_edit(redundant_graph):
    plan = plan_exact(redundant_graph)
    text = json.dumps(plan.to_dict())
    (round_,) = json.loads(text)["rounds"]
    (edit,) = round_
    assert pick(edit, ("kind", "group", "width", "zero_out", "constant", "merges")) == {
        "kind": "GroupEdit", "group": "hidden", "width": 6, "zero_out": [5], "constant": [4],
        "merges": [{"keep": 0, "units": [3], "scales": [1.0]}],
    }
    ((source, position, value),) = edit["values"]  # the constant unit's value, which the readers absorb
    assert (source, position) == ("hidden", 4)
    assert value == pytest.approx(np.tanh(bias_of(redundant_graph, 0)[4]), rel=1e-15)
    assert removed(plan) == {"zero_out": 1, "constant": 1, "duplicate": 1}
    assert removed(plan, "out") == {}
    assert apply_plan(redundant_graph, plan).widths == [3, 3]


# ---------------------------------------------------------------- the same rules on convolutions


def conv_model(activation, reader_kernel, reader_padding, seed=0):
    """image (6, 6, 2) -> conv_a Conv2D(4, 3, valid, activation) -> conv_b Conv2D(3, reader_kernel,
    reader_padding, tanh) -> gap -> out Dense(2), with seeded weights; returns (model, weights by
    layer as writable float64 arrays)."""
    image = keras.Input((6, 6, 2), name="image")
    h = keras.layers.Conv2D(4, 3, activation=activation, name="conv_a")(image)
    h = keras.layers.Conv2D(3, reader_kernel, padding=reader_padding, activation="tanh", name="conv_b")(h)
    model = keras.Model(image, keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling2D(name="gap")(h)))
    rng = np.random.default_rng(seed)
    weights = {layer.name: [rng.normal(0.0, 0.5, weight.shape) for weight in layer.get_weights()]
               for layer in model.layers if layer.get_weights()}
    return model, weights


def set_weights(model, weights):
    for name, values in weights.items():
        model.get_layer(name).set_weights([value.astype("float32") for value in values])
    return model


def assert_same_outputs(model, graph):
    x = np.random.default_rng(3).standard_normal((16, *model.inputs[0].shape[1:])).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(build_model(graph)(x)), expected,
                               rtol=0, atol=1e-5 * max(1.0, np.abs(expected).max()))


def plant_redundancy(weights, constant_bias=0.7):
    """conv_a channel 1 zero-out (conv_b ignores it), channel 2 constant (zero kernel), channel 3
    a copy of channel 0."""
    (a_kernel, a_bias), (b_kernel, _) = weights["conv_a"], weights["conv_b"]
    b_kernel[:, :, 1, :] = 0.0
    a_kernel[..., 2], a_bias[2] = 0.0, constant_bias
    a_kernel[..., 3], a_bias[3] = a_kernel[..., 0], a_bias[0]


@pytest.mark.parametrize("reader_kernel, reader_padding", [(3, "valid"), (1, "same")], ids=["3x3-valid", "1x1-same"])
@pytest.mark.parametrize("activation, sigma", [("tanh", np.tanh), ("relu", lambda z: np.maximum(z, 0.0))])
def test_conv_channels_that_are_zero_out_constant_or_duplicate_are_removed(reader_kernel, reader_padding, activation,
                                                                           sigma):
    model, weights = conv_model(activation, reader_kernel, reader_padding)
    plant_redundancy(weights)
    model = set_weights(model, weights)
    graph = read_model(model)
    b_kernel, b_bias, constant = kernel_of(graph, 1), bias_of(graph, 1), bias_of(graph, 0)[2]

    (edit,) = find_redundancy(graph)
    plan, pruned = prune_graph(graph)

    assert edit.group == "conv_a"
    assert (edit.zero_out, edit.constant, edit.merges) == ((1,), (2,), (Merge(0, (3,), (1.0,)),))
    assert pruned.widths == [1, 3, 2]
    assert removed(plan) == {"zero_out": 1, "constant": 1, "duplicate": 1}
    # the constant's value on every position the reader reads folds into the reader's bias
    np.testing.assert_allclose(bias_of(pruned, 1), b_bias + sigma(constant) * b_kernel[:, :, 2, :].sum(axis=(0, 1)),
                               rtol=1e-12)
    np.testing.assert_allclose(kernel_of(pruned, 1)[:, :, 0, :], b_kernel[:, :, 0, :] + b_kernel[:, :, 3, :], rtol=1e-12)
    assert_same_outputs(model, pruned)


def test_conv_constant_channel_read_through_zero_padding_is_kept():
    """A 3x3 'same' reader sees the constant at inner positions and zeros at the border: its
    bias cannot absorb it, so the channel stays (zero-out and duplicate channels still go)."""
    model, weights = conv_model("tanh", 3, "same")
    plant_redundancy(weights)
    model = set_weights(model, weights)
    graph = read_model(model)

    (edit,) = find_redundancy(graph)
    _, pruned = prune_graph(graph)

    assert (edit.zero_out, edit.constant, edit.merges) == ((1,), (), (Merge(0, (3,), (1.0,)),))
    assert pruned.widths == [2, 3, 2]
    assert_same_outputs(model, pruned)


def test_conv_constant_zero_channel_is_removed_even_through_zero_padding():
    """A relu channel with zero kernel and negative bias is 0 everywhere, like the padding."""
    model, weights = conv_model("relu", 3, "same")
    plant_redundancy(weights, constant_bias=-0.4)
    model = set_weights(model, weights)
    graph = read_model(model)

    (edit,) = find_redundancy(graph)
    _, pruned = prune_graph(graph)

    assert (edit.zero_out, edit.constant, edit.merges) == ((1,), (2,), (Merge(0, (3,), (1.0,)),))
    assert edit.values == ()  # a zero needs no fold
    np.testing.assert_array_equal(bias_of(pruned, 1), bias_of(graph, 1))
    assert_same_outputs(model, pruned)


@pytest.mark.parametrize("activation, merged", [("relu", True), ("tanh", False)])
def test_conv_positive_multiples_merge_only_on_a_homogeneous_path(activation, merged):
    model, weights = conv_model(activation, 3, "valid")
    a_kernel, a_bias = weights["conv_a"]
    a_kernel[..., 3], a_bias[3] = 2.5 * a_kernel[..., 1], 2.5 * a_bias[1]
    model = set_weights(model, weights)
    graph = read_model(model)

    edits = find_redundancy(graph)

    if not merged:
        assert edits == ()
        return
    ((merge,),) = [edit.merges for edit in edits]
    assert (merge.keep, merge.units) == (1, (3,))
    assert merge.scales == pytest.approx((2.5,), rel=1e-6)
    _, pruned = prune_graph(graph)
    assert pruned.widths == [3, 3, 2]
    assert_same_outputs(model, pruned)
