"""Unit tests of `read_model` and `build_model`: what a round trip through a `Graph` keeps,
what it refuses, and that pruning never touches its input and yields stock Keras layers.

The round trip must keep the model kind (Sequential or functional), the model, input and
layer names, the Activation and Dropout layers (also before the first Dense) and every
Dense config, and compute identical outputs. Anything that is not a single chain of
Dense, Activation and Dropout layers with built-in activations is refused with an
`UnsupportedLayerError` naming the culprit.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_embed
from builders import chain, inputs_for, make_mlp, randomize
from keras_embed import build_model, read_model
from keras_embed.errors import InputError, UnsupportedLayerError
from keras_embed.read import read_chain
from keras_embed.operators import add_null, widen


def rich_layers():
    """Fresh layers: a leading Activation, Dense with a regularizer and a constraint,
    Dropout, a Dense followed by an Activation, and a linear output."""
    return [
        keras.layers.Activation("tanh", name="lead_tanh"),
        keras.layers.Dense(6, activation="relu", kernel_regularizer=keras.regularizers.L2(0.01),
                           kernel_constraint=keras.constraints.MaxNorm(3.0), name="wide_relu"),
        keras.layers.Dropout(0.25, seed=3, name="drop"),
        keras.layers.Dense(5, activation="tanh", bias_regularizer=keras.regularizers.L1(0.02), name="narrow_tanh"),
        keras.layers.Activation("sigmoid", name="post_sigmoid"),
        keras.layers.Dense(3, name="scores"),
    ]


def rich_model(functional):
    return randomize(chain(rich_layers(), 4, functional, "rich", input_name="pixels"), seed=8)


@pytest.fixture(scope="module", params=["sequential", "functional"])
def rich(request):
    model = rich_model(request.param == "functional")
    return model, build_model(read_model(model))


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def layer_kinds(model):
    return [(layer.name, type(layer)) for layer in model.layers]


# ---------------------------------------------------------------- round trip


def test_round_trip_keeps_the_model_kind(rich):
    model, rebuilt = rich
    assert type(rebuilt) is type(model)
    assert isinstance(rebuilt, keras.Sequential) == isinstance(model, keras.Sequential)


def test_round_trip_keeps_model_input_and_layer_names(rich):
    model, rebuilt = rich
    assert rebuilt.name == model.name
    assert rebuilt.inputs[0].name == model.inputs[0].name == "pixels"
    assert layer_kinds(rebuilt) == layer_kinds(model)


def test_round_trip_keeps_every_layer_config(rich):
    model, rebuilt = rich
    for original, copy in zip(model.layers, rebuilt.layers):
        assert copy.get_config() == original.get_config(), original.name
    regularizer = rebuilt.get_layer("wide_relu").kernel_regularizer
    assert isinstance(regularizer, keras.regularizers.L2) and regularizer.l2 == pytest.approx(0.01)


def test_round_trip_computes_identical_outputs_and_losses(rich):
    model, rebuilt = rich
    x = inputs_for(model, samples=64)
    np.testing.assert_array_equal(outputs(rebuilt, x), outputs(model, x))
    assert rebuilt.count_params() == model.count_params()
    losses = [[float(loss) for loss in m.losses] for m in (rebuilt, model)]
    assert len(losses[1]) == 2  # the kernel and bias regularizers
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def test_read_model_attaches_activation_and_dropout_layers_where_they_stand(rich):
    graph = read_model(rich[0])
    assert [keras.layers.deserialize(config).name for config in graph.leading] == ["lead_tanh"]
    assert [layer.name for layer in graph.layers] == ["wide_relu", "narrow_tanh", "scores"]
    assert [layer.activations for layer in graph.layers] == [("relu",), ("tanh", "sigmoid"), ("linear",)]
    assert [[keras.layers.deserialize(config).name for config in layer.followers] for layer in graph.layers] == [
        ["drop"], ["post_sigmoid"], [],
    ]


def test_read_model_copies_the_weights_into_read_only_float64_arrays(rich):
    model, _ = rich
    graph = read_model(model)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for layer, keras_layer in zip(graph.layers, dense):
        kernel, bias = keras_layer.get_weights()
        assert layer.kernel.dtype == np.float64 and not layer.kernel.flags.writeable
        np.testing.assert_array_equal(layer.kernel, kernel)
        np.testing.assert_array_equal(layer.bias, bias)


@pytest.mark.parametrize("functional", [False, True], ids=["sequential", "functional"])
def test_grown_graph_rebuilds_with_the_same_names_and_new_widths(functional):
    model = rich_model(functional)
    grown = build_model(add_null(widen(read_model(model), "wide_relu", 1, 0.3), "narrow_tanh"))
    assert [layer.name for layer in grown.layers] == [layer.name for layer in model.layers]
    assert (grown.get_layer("wide_relu").units, grown.get_layer("narrow_tanh").units) == (7, 6)
    x = inputs_for(model, samples=64)
    np.testing.assert_allclose(outputs(grown, x), outputs(model, x), rtol=0, atol=1e-5)


def test_round_trip_keeps_a_float64_model_in_float64():
    inputs = keras.Input((3,), dtype="float64", name="x64")
    model = keras.Sequential([inputs, keras.layers.Dense(4, activation="tanh", dtype="float64"),
                              keras.layers.Dense(2, dtype="float64")])
    rebuilt = build_model(read_model(model))
    assert keras.backend.standardize_dtype(rebuilt.inputs[0].dtype) == "float64"
    assert [weight.dtype for weight in rebuilt.get_weights()] == [np.float64] * 4
    x = np.random.default_rng(0).standard_normal((8, 3))
    np.testing.assert_array_equal(outputs(rebuilt, x), outputs(model, x))


# ---------------------------------------------------------------- refusals


def sequential(*layers, shape=(5,)):
    return keras.Sequential([keras.Input(shape), *layers, keras.layers.Dense(2, name="last")])


def add_branch():
    x = keras.Input((5,))
    trunk = keras.layers.Dense(4, name="trunk")(x)
    left, right = keras.layers.Dense(3, name="left")(trunk), keras.layers.Dense(3, name="right")(trunk)
    return keras.Model(x, keras.layers.Dense(2, name="last")(keras.layers.Add(name="join")([left, right])))


def shared_functional():
    x = keras.Input((5,))
    shared = keras.layers.Dense(5, activation="tanh", name="shared")
    return keras.Model(x, keras.layers.Dense(2, name="last")(shared(shared(x))))


def shared_sequential():
    shared = keras.layers.Dense(5, activation="tanh", name="shared")
    return sequential(shared, shared)


def two_inputs():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    return keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate(name="glue")([a, b])), name="two_in")


def two_outputs():
    x = keras.Input((3,))
    hidden = keras.layers.Dense(4)(x)
    return keras.Model(x, [keras.layers.Dense(2)(hidden), keras.layers.Dense(1)(hidden)], name="two_out")


def nested_functional():
    inner_input = keras.Input((4,))
    inner = keras.Model(inner_input, keras.layers.Dense(3)(inner_input), name="inner_model")
    x = keras.Input((5,))
    return keras.Model(x, keras.layers.Dense(2)(inner(keras.layers.Dense(4)(x))))


UNSUPPORTED = {
    "conv1d": (lambda: sequential(keras.layers.Conv1D(2, 3, name="conv"), keras.layers.Flatten(), shape=(8, 1)),
               ("conv", "Conv1D")),
    # normalizes the feature axis of a sequence, not the last axis: no Dense can absorb it
    "batchnorm": (lambda: sequential(keras.layers.BatchNormalization(axis=1, name="norm"), keras.layers.Dense(3),
                                     shape=(4, 5)), ("norm", "BatchNormalization")),
    "layer-norm": (lambda: sequential(keras.layers.Dense(4), keras.layers.LayerNormalization(name="layer_norm")),
                   ("layer_norm", "LayerNormalization")),
    "nested-sequential": (lambda: sequential(keras.Sequential([keras.layers.Dense(3)], name="inner_stack")),
                          ("inner_stack",)),
    "nested-functional": (nested_functional, ("inner_model",)),
    "shared-functional": (shared_functional, ("shared",)),
    "two-inputs": (two_inputs, ("two_in", "2 inputs")),
    "two-outputs": (two_outputs, ("two_out", "2 outputs")),
}


@pytest.mark.parametrize("make, mentions", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_model_is_refused_with_a_message_naming_the_culprit(make, mentions):
    with pytest.raises(UnsupportedLayerError) as error:
        read_model(make())
    missing = [word for word in mentions if word not in str(error.value)]
    assert not missing, f"{error.value} does not mention {missing}"


@pytest.mark.parametrize("make", [UNSUPPORTED["conv1d"][0], add_branch], ids=["conv1d", "add-branch"])
def test_read_chain_returns_none_where_read_model_refuses(make):
    assert read_chain(make()) is None


def test_read_chain_reads_what_read_model_reads():
    model = make_mlp([5, 3], inputs=4, seed=0)
    graph, expected = read_chain(model), read_model(model)
    assert graph.widths == expected.widths
    for layer, reference in zip(graph.layers, expected.layers):
        np.testing.assert_array_equal(layer.kernel, reference.kernel)


def test_add_branch_message_names_the_merge_or_a_branch_layer():
    with pytest.raises(UnsupportedLayerError) as error:
        read_model(add_branch())
    assert any(name in str(error.value) for name in ("'join'", "'right'", "'left'"))


def test_trailing_batchnorm_is_refused_naming_the_layer():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(2, activation="tanh"),
                              keras.layers.BatchNormalization(name="tail_norm")])
    with pytest.raises(UnsupportedLayerError, match="tail_norm"):
        read_model(model)


def test_layer_used_twice_in_a_sequential_model_is_refused():
    with pytest.raises(UnsupportedLayerError, match="shared"):
        read_model(shared_sequential())


def double(tensor):
    return 2.0 * tensor


@keras.saving.register_keras_serializable(package="tests")
def registered_triple(tensor):
    return 3.0 * tensor


CUSTOM_ACTIVATIONS = {"lambda": lambda tensor: 2.0 * tensor, "function": double, "registered": registered_triple}


@pytest.mark.filterwarnings("ignore:The object being serialized includes a `lambda`")
@pytest.mark.parametrize("where", ["dense", "activation-layer"])
@pytest.mark.parametrize("activation", CUSTOM_ACTIVATIONS.values(), ids=CUSTOM_ACTIVATIONS.keys())
def test_custom_activation_is_refused_naming_the_layer(activation, where):
    if where == "dense":
        model = sequential(keras.layers.Dense(4, activation=activation, name="custom"))
    else:
        model = sequential(keras.layers.Dense(4), keras.layers.Activation(activation, name="custom"))
    with pytest.raises(UnsupportedLayerError, match="'custom'.*custom activation"):
        read_model(model)


@pytest.mark.parametrize("thing, problem", [
    (lambda: keras.Sequential([keras.layers.Dense(3)]), "no defined input"),
    (lambda: "model.keras", "expected a keras.Model"),
    (lambda: keras.layers.Dense(3), "expected a keras.Model"),
], ids=["unbuilt", "string", "layer"])
def test_read_model_refuses_what_is_not_a_built_model_as_bad_input(thing, problem):
    with pytest.raises(InputError, match=problem):
        read_model(thing())


# ---------------------------------------------------------------- prune: input untouched, stock output


@pytest.fixture(scope="module")
def grown_and_pruned():
    """A widened copy of the rich functional model (one split, one null unit), then pruned."""
    narrow = rich_model(functional=True)
    grown = build_model(add_null(widen(read_model(narrow), "wide_relu", 2, 0.4), "narrow_tanh", bias=0.3))
    before = grown.get_weights()
    pruned, report = keras_embed.prune(grown)
    return narrow, grown, before, pruned


def test_prune_leaves_the_input_model_weights_unchanged(grown_and_pruned):
    _, grown, before, pruned = grown_and_pruned
    after = grown.get_weights()
    assert [weight.shape for weight in after] == [weight.shape for weight in before]
    for old, new in zip(before, after):
        assert new.dtype == old.dtype
        np.testing.assert_array_equal(new, old)
    assert pruned is not grown and pruned.count_params() < grown.count_params()


def test_prune_gives_back_the_narrow_widths_and_outputs(grown_and_pruned):
    narrow, _, _, pruned = grown_and_pruned
    assert [(layer.name, getattr(layer, "units", None)) for layer in pruned.layers] == [
        (layer.name, getattr(layer, "units", None)) for layer in narrow.layers
    ]
    x = inputs_for(narrow, samples=64)
    np.testing.assert_allclose(outputs(pruned, x), outputs(narrow, x), rtol=0, atol=1e-5)


STOCK_PROBE = textwrap.dedent("""
    import json, sys
    sys.modules["keras_embed"] = None  # any import of keras_embed now raises ImportError
    import keras, numpy as np
    model = keras.saving.load_model(sys.argv[1])
    try:
        import keras_embed
        blocked = False
    except ImportError:
        blocked = True
    np.save(sys.argv[3], keras.ops.convert_to_numpy(model(np.load(sys.argv[2]), training=False)))
    modules = sorted({type(layer).__module__ for layer in [model, *model.layers]})
    print(json.dumps({"blocked": blocked, "modules": modules}))
""")


def test_pruned_model_saved_as_keras_loads_without_keras_embed(tmp_path, grown_and_pruned):
    _, _, _, pruned = grown_and_pruned
    model_path, x_path, y_path = tmp_path / "pruned.keras", tmp_path / "x.npy", tmp_path / "y.npy"
    pruned.save(model_path)
    x = inputs_for(pruned, samples=16)
    np.save(x_path, x)

    done = subprocess.run(
        [sys.executable, "-c", STOCK_PROBE, str(model_path), str(x_path), str(y_path)],
        capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=120,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["blocked"] is True
    assert all(module.startswith("keras.") for module in probe["modules"]), probe["modules"]
    np.testing.assert_allclose(np.load(y_path), outputs(pruned, x), rtol=0, atol=1e-6)
