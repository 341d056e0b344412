"""Property: any sequence of width embeddings is undone by prune, for random architectures.

`make test` runs 100 examples; `make fuzz` sets KERAS_EMBED_FUZZ_EXAMPLES=2000.
"""

import keras
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builders import examples, inputs_for, make_mlp
from keras_embed import build_model, prune, read_model
from keras_embed.operators import add_constant, add_null, permute, rescale, widen

ACTIVATIONS = ("relu", "tanh", "sigmoid", "linear", "gelu", "leaky_relu", "elu")
HOMOGENEOUS = ("relu", "linear", "leaky_relu")


def _embed_randomly(data, graph, activations, use_bias, rng):
    """Applies a drawn sequence of function-preserving embeddings, then shuffles units."""
    hidden = len(graph.layers) - 1
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        layer = data.draw(st.integers(0, hidden - 1), label="layer")
        width = graph.layers[layer].width
        kinds = ["split", "null"] + (["constant"] if use_bias else []) + (["rescale"] if activations[layer] in HOMOGENEOUS else [])
        kind = data.draw(st.sampled_from(kinds), label="kind")
        if kind == "split":
            alpha = data.draw(st.floats(-2.0, 3.0, allow_nan=False), label="alpha")
            graph = widen(graph, layer, data.draw(st.integers(0, width - 1), label="unit"), alpha)
        elif kind == "null":
            bias = float(rng.normal()) if use_bias else 0.0
            graph = add_null(graph, layer, bias, incoming=rng.normal(size=graph.layers[layer].kernel.shape[0]))
        elif kind == "constant":
            graph = add_constant(graph, layer, float(rng.normal()), rng.normal(size=graph.layers[layer + 1].width))
        else:
            graph = rescale(graph, layer, data.draw(st.integers(0, width - 1), label="unit"), float(rng.uniform(0.25, 4.0)))
    for layer in range(hidden):
        graph = permute(graph, layer, rng.permutation(graph.layers[layer].width))
    return graph


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
    wide = build_model(_embed_randomly(data, read_model(narrow), activations, use_bias, np.random.default_rng(seed)))
    x = inputs_for(narrow)

    pruned, report = prune(wide, data=x)

    expected = keras.ops.convert_to_numpy(narrow(x))
    actual = keras.ops.convert_to_numpy(pruned(x))
    assert pruned.count_params() <= narrow.count_params()
    assert np.abs(actual - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    assert report.max_abs_diff <= report.atol
