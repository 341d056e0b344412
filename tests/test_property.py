"""Property: any sequence of embeddings is undone by prune with data, for random architectures.

Every operator (`widen`, `add_null`, `add_constant`, `rescale`, `permute`, `deepen`) and
every rule prune applies (zero-out, constant and duplicate units from the weights; dead
and constant units and linearized layers on the data) is drawn: units dead on the data
(relu, bias below the layer's input range) and saturated ones (tanh/sigmoid at exactly 1)
are added by hand, as no operator makes them.

`make test` runs 50 examples of the embeddings property (2 s each) and 100 of the
others; `make fuzz` sets KERAS_EMBED_FUZZ_EXAMPLES=2000.
"""

import math

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from builders import examples, inputs_for, make_mlp, prune_meeting, rounding_scale, stopping_rules
from keras_embed import build_model, prune, read_model
from keras_embed.edit.operators import add_constant, add_null, deepen, permute, rescale, widen
from keras_embed.find.refit import compress_groups
from keras_embed.measure.regimes import chain_function
from keras_embed.measure.statistics import collect, producer_requests
from keras_embed.pipeline import lower_bounds
from keras_embed.stopping import StoppingRule

ACTIVATIONS = ("relu", "tanh", "sigmoid", "linear", "gelu", "leaky_relu", "elu")
SATURATING = ("tanh", "sigmoid")
SATURATION = 40.0  # tanh and sigmoid are exactly 1 beyond it, in float32 and float64


def _input_bound(graph, x, layer):
    """Largest |input| of hidden `layer` on the data x, per input unit."""
    if layer == 0:
        return np.abs(x).max(axis=0)
    node = graph.producers[layer - 1]
    previous = collect(graph, x, producer_requests(graph, [node]))[node.name]
    return np.maximum(np.abs(previous.a_min), np.abs(previous.a_max))


def _with_weights(graph, name, kernel, bias):
    """`graph` with producer `name`'s kernel and bias replaced."""
    return graph.with_nodes(node.entry.with_weights(node, kernel, bias) if node.name == name else node
                            for node in graph.nodes)


def _add_unit_off_its_kink(graph, x, layer, rng, saturated):
    """A unit with random incoming and outgoing weights whose pre-activation stays, on x,
    below -1 (a dead relu unit) or above SATURATION (a tanh/sigmoid unit at exactly 1, its
    value taken out of the next bias), so the function on x is unchanged."""
    hidden = graph.producers[layer]
    incoming = rng.normal(size=hidden.entry.kernel(hidden).shape[0])
    reach = float(np.abs(incoming) @ _input_bound(graph, x, layer))
    outgoing = rng.normal(size=graph.producers[layer + 1].width)
    if saturated:
        grown = add_constant(graph, layer, reach + SATURATION, outgoing)
    else:
        grown = add_null(graph, layer, -reach - 1.0)
    grown_hidden, grown_next = grown.producers[layer], grown.producers[layer + 1]
    kernel = np.array(grown_hidden.entry.kernel(grown_hidden))
    next_kernel = np.array(grown_next.entry.kernel(grown_next))
    kernel[:, -1] = incoming
    next_kernel[-1] = outgoing
    grown = _with_weights(grown, grown_hidden.name, kernel, grown_hidden.entry.bias(grown_hidden))
    return _with_weights(grown, grown_next.name, next_kernel, grown_next.entry.bias(grown_next))


def _kinds(graph, layer):
    """The embeddings that keep the function of `graph` when applied to hidden `layer` (a
    lift into a layer without bias would add one: the result could not be smaller)."""
    hidden, next_layer = graph.producers[layer], graph.producers[layer + 1]
    biased = hidden.entry.bias(hidden) is not None and next_layer.entry.bias(next_layer) is not None
    function = chain_function(graph, hidden)
    return ["split", "null"] + (["constant", "deepen"] if biased else []) \
        + (["rescale"] if function.homogeneous else []) \
        + (["dead"] if function.name == "relu" and hidden.entry.bias(hidden) is not None else []) \
        + (["saturated"] if function.name in SATURATING and biased else [])


def _embed_randomly(data, graph, x, rng):
    """Applies a drawn sequence of embeddings (function-preserving on x), then shuffles units.

    Returns:
        (the grown graph, the kinds of embedding applied, in order).
    """
    kinds = []
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        layer = data.draw(st.integers(0, len(graph.producers) - 2), label="layer")
        hidden = graph.producers[layer]
        width, has_bias = hidden.width, hidden.entry.bias(hidden) is not None
        kind = data.draw(st.sampled_from(_kinds(graph, layer)), label="kind")
        kinds.append(kind)
        if kind == "split":
            alpha = data.draw(st.floats(-2.0, 3.0, allow_nan=False), label="alpha")
            graph = widen(graph, layer, data.draw(st.integers(0, width - 1), label="unit"), alpha)
        elif kind == "null":
            bias = float(rng.normal()) if has_bias else 0.0
            graph = add_null(graph, layer, bias, incoming=rng.normal(size=hidden.entry.kernel(hidden).shape[0]))
        elif kind == "constant":
            graph = add_constant(graph, layer, float(rng.normal()), rng.normal(size=graph.producers[layer + 1].width))
        elif kind == "rescale":
            graph = rescale(graph, layer, data.draw(st.integers(0, width - 1), label="unit"), float(rng.uniform(0.25, 4.0)))
        elif kind == "deepen":
            graph = deepen(graph, hidden.name, lower_bounds(graph, hidden.name, x), margin=1.0)
        else:
            graph = _add_unit_off_its_kink(graph, x, layer, rng, saturated=kind == "saturated")
    for layer in range(len(graph.producers) - 1):
        graph = permute(graph, layer, rng.permutation(graph.producers[layer].width))
    return graph, kinds


@settings(max_examples=examples(50), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_prune_undoes_random_embeddings(data):
    keras.backend.clear_session()
    depth = data.draw(st.integers(1, 4), label="hidden layers")
    widths = data.draw(st.lists(st.integers(1, 16), min_size=depth, max_size=depth), label="widths")
    activations = data.draw(st.lists(st.sampled_from(ACTIVATIONS), min_size=depth, max_size=depth), label="activations")
    use_bias = data.draw(st.booleans(), label="use_bias")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    narrow = make_mlp(
        widths + [data.draw(st.integers(1, 4), label="outputs")], activations, use_bias,
        functional=data.draw(st.booleans(), label="functional"), inputs=data.draw(st.integers(1, 6), label="inputs"),
        seed=seed,
    )
    x = inputs_for(narrow)
    wide_graph, kinds = _embed_randomly(data, read_model(narrow), x, np.random.default_rng(seed))
    for kind in kinds:
        event(kind)
    wide = build_model(wide_graph)
    expected = keras.ops.convert_to_numpy(narrow(x))
    # float32 rounding grows with cancelling terms; a wrong rewrite errs by far more
    tolerance = 1e-5 * max(1.0, np.abs(expected).max(), rounding_scale(wide_graph, x))

    pruned, report = prune(wide, data=x, atol=tolerance)

    actual = keras.ops.convert_to_numpy(pruned(x))
    assert pruned.count_params() <= narrow.count_params()
    assert np.abs(actual - expected).max() <= tolerance
    figures = report.to_dict()
    assert figures["max_abs_diff"] <= figures["atol"]


class _Script:
    """Stands in for hypothesis' `data`: `draw` returns the given values in order."""

    def __init__(self, *values):
        self.values = iter(values)

    def draw(self, strategy, label=None):
        return next(self.values)


def test_prune_collapses_a_lift_kept_while_its_neighbours_were_wide():
    narrow = make_mlp([1, 1], "relu", inputs=1, seed=0)
    x = inputs_for(narrow)
    script = _Script(11, 0, "split", 0.0, 0, 0, "split", 0.0, 0, 0, "split", 0.0, 0, 0, "null", 0, "split", -1.311, 0,
                     0, "deepen", 0, "split", -0.411, 0, 0, "null", 0, "deepen", 0, "deepen", 1, "dead")
    wide, _ = _embed_randomly(script, read_model(narrow), x, np.random.default_rng(0))
    pruned, report = prune(build_model(wide), data=x)
    assert report.to_dict()["not_collapsed_would_grow"] == []
    assert pruned.count_params() <= narrow.count_params()


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_data_mode_meets_its_stopping_rule_or_returns_nothing(data):
    """Each stopping rule of `--mode data` holds on the data for what prune returns; when it
    cannot be met, prune raises `RuleError` (the command line then writes nothing)."""
    depth = data.draw(st.integers(1, 3), label="hidden layers")
    widths = data.draw(st.lists(st.integers(1, 16), min_size=depth, max_size=depth), label="widths")
    outputs = data.draw(st.integers(2, 4), label="outputs")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    model = make_mlp(widths + [outputs], data.draw(st.lists(st.sampled_from(ACTIVATIONS), min_size=depth,
                                                             max_size=depth), label="activations"),
                     inputs=data.draw(st.integers(1, 6), label="inputs"), seed=seed)
    x = inputs_for(model)
    y = np.random.default_rng(seed).integers(0, outputs, len(x))
    rule = data.draw(stopping_rules(600), label="rule")
    result = prune_meeting(rule, model, x, y)
    if result is None:
        return
    pruned, report = result
    if rule.kind == "keep_ratio":  # fewer when a unit is an affine function of the kept ones on the data
        rows = report.to_dict()["layers"][:-1]
        for row, width in zip(rows, widths):
            if row["collapsed"]:  # the exact data rules go first: a layer linear on the data is composed away
                # (linear_fraction is the layer's as it came: channels the rules removed first may not have been)
                assert row["width_after"] == 0 and row["linear_fraction"] is not None, row
            else:
                assert 1 <= row["width_after"] <= math.ceil(rule.value * width), row


@pytest.fixture(scope="module")
def dead_layer_model():
    model = make_mlp([1, 1, 2], ["relu", "relu"], inputs=2, seed=0)  # hidden_1 is dead on these inputs
    return model, inputs_for(model)


def test_refit_keeps_a_unit_of_a_layer_dead_on_the_data(dead_layer_model):
    model, x = dead_layer_model
    compressed, edits = compress_groups(read_model(model), x, keep_ratio=1.0)
    assert compressed.widths == [1, 1, 2]
    assert [(edit.group, edit.kept) for edit in edits] == [("hidden_0", (0,)), ("hidden_1", (0,))]
    expected = keras.ops.convert_to_numpy(model(x))
    actual = keras.ops.convert_to_numpy(build_model(compressed)(x))
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()


def test_data_mode_collapses_a_layer_dead_on_the_data_before_the_refit(dead_layer_model):
    """The data mode runs the exact data rules first (as the exact mode with data does): the
    dead layer is linear on the data (constant 0) and composed into the output layer."""
    model, x = dead_layer_model
    pruned, report = prune(model, data=x, mode="data", rule=StoppingRule("keep_ratio", 1.0))
    figures = report.to_dict()
    assert [row["width_after"] for row in figures["layers"]] == [1, 0, 2]
    assert figures["collapsed_layers"] == ["hidden_1"]
    assert [layer.units for layer in pruned.layers if isinstance(layer, keras.layers.Dense)] == [1, 2]
    expected = keras.ops.convert_to_numpy(model(x))
    assert np.abs(keras.ops.convert_to_numpy(pruned(x)) - expected).max() <= 1e-5 * np.abs(expected).max()
