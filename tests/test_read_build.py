"""Unit tests of `read_model` and `build_model`: what a round trip through a `Graph` keeps,
what it refuses, and that pruning never touches its input and yields stock Keras layers.

The round trip must keep the model kind (Sequential or functional, Dense chains and CNNs
alike), the model, input and layer names, the Activation and Dropout layers (also before
the first Dense) and every layer config, and compute identical outputs. Every model of the
registry's layers is read, branches (Add, Concatenate) and several inputs or outputs
included; anything else (an unknown layer, a nested model, a shared layer, a custom
activation, a normalization of another axis) is refused with an `UnsupportedLayerError`
naming the culprit.
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
from builders import chain, inputs_for, randomize, randomize_network
from keras_embed import build_model, read_model
from keras_embed.edit.operators import add_null, widen
from keras_embed.errors import InputError, UnsupportedLayerError
from keras_embed.measure.regimes import chain_function
from keras_embed.pipeline import analyze


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


def sequential_cnn():
    """A Sequential CNN of every spatial layer kind the registry knows, with a kernel and a
    bias regularizer: conv_a (relu, L2) -> pool -> depthwise (tanh) -> pad -> conv_b (L1 bias)
    -> elu -> Dropout -> Flatten -> scores."""
    return randomize_network(keras.Sequential([
        keras.Input((8, 8, 3), name="pixels"),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu", kernel_regularizer=keras.regularizers.L2(0.01),
                            kernel_constraint=keras.constraints.MaxNorm(3.0), name="conv_a"),
        keras.layers.MaxPooling2D(name="pool"),
        keras.layers.DepthwiseConv2D(3, padding="same", activation="tanh", name="depthwise"),
        keras.layers.ZeroPadding2D(1, name="pad"),
        keras.layers.Conv2D(5, 3, bias_regularizer=keras.regularizers.L1(0.02), name="conv_b"),
        keras.layers.Activation("elu", name="post_elu"),
        keras.layers.Dropout(0.25, seed=3, name="drop"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(3, name="scores"),
    ], name="sequential_cnn"), np.random.default_rng(8))


def functional_cnn():
    """A residual CNN with a side branch: stem (relu, L2) -> res (L1 bias) -> Add -> relu ->
    side 1x1 conv, concatenated with its input -> average pooling -> gap -> Dropout -> scores."""
    image = keras.Input((6, 6, 2), name="pixels")
    stem = keras.layers.Conv2D(4, 3, padding="same", activation="relu", kernel_regularizer=keras.regularizers.L2(0.01),
                               name="stem")(image)
    res = keras.layers.Conv2D(4, 3, padding="same", bias_regularizer=keras.regularizers.L1(0.02), name="res")(stem)
    h = keras.layers.Activation("relu", name="add_relu")(keras.layers.Add(name="add")([stem, res]))
    side = keras.layers.Conv2D(2, 1, activation="tanh", name="side")(h)
    h = keras.layers.Concatenate(name="concat")([h, side])
    h = keras.layers.AveragePooling2D(2, padding="same", name="avg")(h)
    h = keras.layers.Dropout(0.25, seed=3, name="drop")(keras.layers.GlobalAveragePooling2D(name="gap")(h))
    return randomize_network(keras.Model(image, keras.layers.Dense(3, name="scores")(h), name="functional_cnn"),
                             np.random.default_rng(9))


MODELS = {
    "sequential": lambda: rich_model(functional=False),
    "functional": lambda: rich_model(functional=True),
    "sequential-cnn": sequential_cnn,
    "functional-cnn": functional_cnn,
}
REGULARIZED = {"sequential": "wide_relu", "functional": "wide_relu", "sequential-cnn": "conv_a",
               "functional-cnn": "stem"}


@pytest.fixture(scope="module", params=list(MODELS))
def rich(request):
    model = MODELS[request.param]()
    return request.param, model, build_model(read_model(model))


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def some_inputs(model, samples=64):
    return inputs_for(model, samples=samples)


def layer_kinds(model):
    return [(layer.name, type(layer)) for layer in model.layers]


def width_of(layer):
    return getattr(layer, "units", getattr(layer, "filters", None))


# ---------------------------------------------------------------- round trip


def test_round_trip_keeps_the_model_kind(rich):
    kind, model, rebuilt = rich
    assert type(rebuilt) is type(model)
    assert isinstance(rebuilt, keras.Sequential) == isinstance(model, keras.Sequential) == kind.startswith("sequential")


def test_round_trip_keeps_model_input_and_layer_names(rich):
    _, model, rebuilt = rich
    assert rebuilt.name == model.name
    assert rebuilt.inputs[0].name == model.inputs[0].name == "pixels"
    assert layer_kinds(rebuilt) == layer_kinds(model)


def test_round_trip_keeps_every_layer_config(rich):
    kind, model, rebuilt = rich
    assert len(rebuilt.layers) == len(model.layers)
    for original, copy in zip(model.layers, rebuilt.layers):
        assert copy.get_config() == original.get_config(), original.name
    regularizer = rebuilt.get_layer(REGULARIZED[kind]).kernel_regularizer
    assert isinstance(regularizer, keras.regularizers.L2) and regularizer.l2 == pytest.approx(0.01)


def test_round_trip_computes_identical_outputs_and_losses(rich):
    _, model, rebuilt = rich
    x = some_inputs(model)
    np.testing.assert_array_equal(outputs(rebuilt, x), outputs(model, x))
    assert rebuilt.count_params() == model.count_params()
    losses = [[float(loss) for loss in m.losses] for m in (rebuilt, model)]
    assert len(losses[1]) == 2  # the kernel and bias regularizers
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


@pytest.mark.parametrize("functional", [False, True], ids=["sequential", "functional"])
def test_read_model_keeps_activation_and_dropout_layers_where_they_stand(functional):
    graph = read_model(rich_model(functional))
    assert [(node.name, node.kind, node.inputs) for node in graph.nodes] == [
        ("pixels", "InputLayer", ()),
        ("lead_tanh", "Activation", ("pixels",)),
        ("wide_relu", "Dense", ("lead_tanh",)),
        ("drop", "Dropout", ("wide_relu",)),
        ("narrow_tanh", "Dense", ("drop",)),
        ("post_sigmoid", "Activation", ("narrow_tanh",)),
        ("scores", "Dense", ("post_sigmoid",)),
    ]
    assert graph.outputs == ("scores",)
    # what each Dense layer's reader sees: its own activation, then the elementwise layers after it
    assert [chain_function(graph, node).name for node in graph.producers] == ["relu", "tanh>sigmoid", "linear"]


def test_read_model_copies_the_weights_into_read_only_float64_arrays(rich):
    _, model, _ = rich
    graph = read_model(model)
    with_weights = [layer for layer in model.layers if layer.get_weights()]
    assert [node.name for node in graph.nodes if node.weights] == [layer.name for layer in with_weights]
    for keras_layer in with_weights:
        node = graph.node(keras_layer.name)
        assert len(node.weights) == len(keras_layer.get_weights())
        for weight, keras_weight in zip(node.weights, keras_layer.get_weights()):
            assert weight.dtype == np.float64 and not weight.flags.writeable
            np.testing.assert_array_equal(weight, keras_weight)
    for node in graph.producers:  # the canonical kernel of Dense and Conv2D is the Keras kernel
        np.testing.assert_array_equal(node.entry.kernel(node), model.get_layer(node.name).get_weights()[0])
        np.testing.assert_array_equal(node.entry.bias(node), model.get_layer(node.name).get_weights()[1])


GROWTH = {  # model -> (operator steps, {layer: width after})
    "sequential": (lambda g: add_null(widen(g, "wide_relu", 1, 0.3), "narrow_tanh"), {"wide_relu": 7, "narrow_tanh": 6}),
    "functional": (lambda g: add_null(widen(g, "wide_relu", 1, 0.3), "narrow_tanh"), {"wide_relu": 7, "narrow_tanh": 6}),
    "sequential-cnn": (lambda g: add_null(widen(g, "conv_a", 1, 0.3), "conv_b"), {"conv_a": 5, "conv_b": 6}),
    "functional-cnn": (lambda g: add_null(widen(g, "stem", 1, 0.3), "side"), {"stem": 5, "res": 5, "side": 3}),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_grown_graph_rebuilds_with_the_same_names_and_new_widths(kind):
    model = MODELS[kind]()
    grow, widths = GROWTH[kind]
    grown = build_model(grow(read_model(model)))
    assert type(grown) is type(model)
    assert [layer.name for layer in grown.layers] == [layer.name for layer in model.layers]
    assert {name: width_of(grown.get_layer(name)) for name in widths} == widths
    x = some_inputs(model)
    np.testing.assert_allclose(outputs(grown, x), outputs(model, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cnn", [False, True], ids=["dense", "cnn"])
def test_round_trip_keeps_a_float64_model_in_float64(cnn):
    inputs = keras.Input((5, 5, 2) if cnn else (3,), dtype="float64", name="x64")
    first = (keras.layers.Conv2D(4, 3, activation="tanh", dtype="float64") if cnn
             else keras.layers.Dense(4, activation="tanh", dtype="float64"))
    middle = [keras.layers.Flatten(dtype="float64")] if cnn else []
    model = keras.Sequential([inputs, first, *middle, keras.layers.Dense(2, dtype="float64")])
    rebuilt = build_model(read_model(model))
    assert keras.backend.standardize_dtype(rebuilt.inputs[0].dtype) == "float64"
    assert [weight.dtype for weight in rebuilt.get_weights()] == [np.float64] * 4
    x = np.random.default_rng(0).standard_normal((8, *model.inputs[0].shape[1:]))
    np.testing.assert_array_equal(outputs(rebuilt, x), outputs(model, x))


# ---------------------------------------------------------------- branches, several inputs or outputs


def sequential(*layers, shape=(5,)):
    return keras.Sequential([keras.Input(shape), *layers, keras.layers.Dense(2, name="last")])


def add_branch():
    x = keras.Input((5,))
    trunk = keras.layers.Dense(4, activation="relu", name="trunk")(x)
    left, right = keras.layers.Dense(3, name="left")(trunk), keras.layers.Dense(3, name="right")(trunk)
    return keras.Model(x, keras.layers.Dense(2, name="last")(keras.layers.Add(name="join")([left, right])))


def two_inputs():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    return keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate(name="glue")([a, b])), name="two_in")


def two_outputs():
    x = keras.Input((3,))
    hidden = keras.layers.Dense(4)(x)
    return keras.Model(x, [keras.layers.Dense(2)(hidden), keras.layers.Dense(1)(hidden)], name="two_out")


def randomized(make):
    return randomize(make(), seed=5)


def test_add_branch_is_read_and_its_add_joins_the_branches_into_one_group():
    model = randomized(add_branch)
    graph = read_model(model)
    assert graph.group_of("left") == graph.group_of("right") != graph.group_of("trunk")
    assert graph.editable_groups() == ["trunk", graph.group_of("left")]
    rebuilt = build_model(graph)
    assert type(rebuilt) is type(model) and [layer.name for layer in rebuilt.layers] == [
        layer.name for layer in model.layers]
    x = some_inputs(model)
    np.testing.assert_array_equal(outputs(rebuilt, x), outputs(model, x))


@pytest.mark.parametrize("make, inputs, outputs_", [(two_inputs, 2, 1), (two_outputs, 1, 2)],
                         ids=["two-inputs", "two-outputs"])
def test_models_with_several_inputs_or_outputs_are_read_and_rebuilt(make, inputs, outputs_):
    model = randomized(make)
    graph = read_model(model)
    assert (len(graph.inputs), len(graph.outputs)) == (inputs, outputs_)
    rebuilt = build_model(graph)
    rng = np.random.default_rng(0)
    x = [rng.standard_normal((16, *tensor.shape[1:])).astype("float32") for tensor in model.inputs]
    x = x if inputs > 1 else x[0]
    expected, actual = model(x), rebuilt(x)
    expected, actual = (list(values) if isinstance(values, (list, tuple)) else [values] for values in (expected, actual))
    assert len(actual) == len(expected) == outputs_
    for got, want in zip(actual, expected):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(want))


@pytest.mark.parametrize("make", [two_inputs, two_outputs], ids=["two-inputs", "two-outputs"])
def test_prune_and_analyze_take_several_inputs_or_outputs(make):
    """Once refused (UnsupportedLayerError); now pruned and verified on every output (tests/test_multi_io.py)."""
    model = randomized(make)
    pruned, report = keras_embed.prune(model)
    assert report.checks["verified"] and pruned.count_params() <= model.count_params()
    assert [row["name"] for row in analyze(model)] == [node.name for node in read_model(model).producers]


def test_trailing_batchnorm_is_kept_as_a_batchnorm_layer_with_the_same_outputs():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(2, activation="tanh"),
                              keras.layers.BatchNormalization(name="tail_norm")])
    norm = model.get_layer("tail_norm")
    norm.set_weights([np.array(values, "float32") for values in ([1.5, -0.7], [0.3, -0.2], [0.1, -0.4], [0.5, 2.0])])
    graph = read_model(model)
    assert graph.node("tail_norm").kind == "BatchNormalization" and graph.outputs == ("tail_norm",)
    rebuilt = build_model(graph)
    assert type(rebuilt) is keras.Sequential
    assert [type(layer).__name__ for layer in rebuilt.layers] == ["Dense", "Dense", "BatchNormalization"]
    assert rebuilt.get_layer("tail_norm").get_config() == norm.get_config()
    x = some_inputs(model)
    np.testing.assert_allclose(outputs(rebuilt, x), outputs(model, x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- refusals


def shared_functional():
    x = keras.Input((5,))
    shared = keras.layers.Dense(5, activation="tanh", name="shared")
    return keras.Model(x, keras.layers.Dense(2, name="last")(shared(shared(x))))


def shared_sequential():
    shared = keras.layers.Dense(5, activation="tanh", name="shared")
    return sequential(shared, shared)


def nested_functional():
    inner_input = keras.Input((4,))
    inner = keras.Model(inner_input, [keras.layers.Dense(3)(inner_input)] * 2, name="inner_model")
    x = keras.Input((5,))
    return keras.Model(x, keras.layers.Dense(2)(inner(keras.layers.Dense(4)(x))[0]))


UNSUPPORTED = {
    # normalizes the feature axis of a sequence, not the last axis: no layer can absorb it
    "batchnorm": (lambda: sequential(keras.layers.BatchNormalization(axis=1, name="norm"), keras.layers.Dense(3),
                                     shape=(4, 5)), ("norm", "BatchNormalization")),
    "unit-norm-across-positions": (lambda: sequential(keras.layers.Dense(4), keras.layers.UnitNormalization(
        axis=1, name="unit_norm"), shape=(3, 5)), ("unit_norm", "UnitNormalization", "normalizes axis 1")),
    "nested-two-outputs": (nested_functional, ("inner_model", "2 outputs")),
    "shared-functional": (shared_functional, ("'shared'", "shared layer")),
    "conv2d-channels-first": (lambda: sequential(keras.layers.Conv2D(2, 3, data_format="channels_first", name="conv"),
                                                 keras.layers.Flatten(), shape=(1, 6, 6)), ("'conv'", "channels_first")),
}


@pytest.mark.parametrize("make, mentions", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_model_is_refused_with_a_message_naming_the_culprit(make, mentions):
    with pytest.raises(UnsupportedLayerError) as error:
        read_model(make())
    missing = [word for word in mentions if word not in str(error.value)]
    assert not missing, f"{error.value} does not mention {missing}"


class Scaled(keras.layers.Layer):  # custom classes: what a user's own layers look like to keras-embed
    def call(self, x):
        return 2.0 * x


class Shifted(Scaled):
    def call(self, x):
        return x + 1.0


def test_every_unknown_layer_is_named_in_one_message():
    x = keras.Input((4,))
    h = Shifted(name="shift_a")(Scaled(name="scale")(keras.layers.Dense(3, name="dense")(x)))
    model = keras.Model(x, keras.layers.RepeatVector(2, name="unit")(Shifted(name="shift_b")(h)))
    with pytest.raises(UnsupportedLayerError) as error:
        read_model(model)
    assert str(error.value).startswith("layer 'scale' (Scaled) is not supported, nor are 'shift_a', 'shift_b' "
                                       "(Shifted), 'unit' (RepeatVector); supported layers: InputLayer, Dense")


class Backbone(keras.Model):
    """A subclass of the functional Model with a config of its own, as keras-hub's backbones are."""

    def __init__(self, width, **kwargs):
        x = keras.Input((6,), name="features")
        hidden = keras.layers.Dense(width, activation="relu", name="hidden")(x)
        super().__init__(x, keras.layers.Dense(2, name="scores")(hidden), **kwargs)
        self.width = width

    def get_config(self):
        return {"width": self.width, "name": self.name}


def test_a_functional_subclass_with_a_config_of_its_own_is_read_as_a_plain_functional_model(tmp_path):
    keras.utils.set_random_seed(0)
    model = Backbone(5, name="backbone")
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    grown, _ = keras_embed.embed(model, widen_steps=[("hidden", 1, 0.3)])
    pruned, _ = keras_embed.prune(grown)
    assert type(pruned) is not Backbone and pruned.get_layer("hidden").units == 5
    pruned.save(tmp_path / "pruned.keras")  # stock layers: loads without the class
    np.testing.assert_allclose(keras.saving.load_model(tmp_path / "pruned.keras").predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_layer_used_twice_in_a_sequential_model_is_refused():
    with pytest.raises(UnsupportedLayerError, match="uses a layer more than once"):
        read_model(shared_sequential())


def double(tensor):
    return 2.0 * tensor


@keras.saving.register_keras_serializable(package="tests")
def registered_triple(tensor):
    return 3.0 * tensor


CUSTOM_ACTIVATIONS = {"lambda": lambda tensor: 2.0 * tensor, "function": double, "registered": registered_triple}


@pytest.mark.filterwarnings("ignore:The object being serialized includes a `lambda`")
@pytest.mark.parametrize("where", ["dense", "activation-layer", "conv2d"])
@pytest.mark.parametrize("activation", CUSTOM_ACTIVATIONS.values(), ids=CUSTOM_ACTIVATIONS.keys())
def test_custom_activation_is_refused_naming_the_layer(activation, where):
    if where == "dense":
        model = sequential(keras.layers.Dense(4, activation=activation, name="custom"))
    elif where == "conv2d":
        model = sequential(keras.layers.Conv2D(2, 3, activation=activation, name="custom"), keras.layers.Flatten(),
                           shape=(5, 5, 1))
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


GROW_TO_PRUNE = {  # narrow model -> the embeddings that grow it (one split, one null unit)
    "functional": (lambda: rich_model(functional=True),
                   lambda g: add_null(widen(g, "wide_relu", 2, 0.4), "narrow_tanh", bias=0.3)),
    "sequential-cnn": (sequential_cnn, lambda g: add_null(widen(g, "conv_a", 2, 0.4), "conv_b", bias=0.3)),
}


@pytest.fixture(scope="module")
def pruned_models():
    """Per narrow model: (narrow, its widened copy, the copy's weights before pruning, the copy pruned)."""
    found = {}
    for kind, (make, grow) in GROW_TO_PRUNE.items():
        narrow = make()
        grown = build_model(grow(read_model(narrow)))
        before = grown.get_weights()
        pruned, _ = keras_embed.prune(grown)
        found[kind] = narrow, grown, before, pruned
    return found


@pytest.fixture(params=list(GROW_TO_PRUNE))
def grown_and_pruned(request, pruned_models):
    return pruned_models[request.param]


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
    assert type(pruned) is type(narrow)
    assert [(layer.name, width_of(layer)) for layer in pruned.layers] == [
        (layer.name, width_of(layer)) for layer in narrow.layers
    ]
    assert pruned.count_params() == narrow.count_params()
    x = some_inputs(narrow)
    np.testing.assert_allclose(outputs(pruned, x), outputs(narrow, x), rtol=0, atol=1e-5)


STOCK_PROBE = textwrap.dedent("""
    import json, sys
    sys.modules["keras_embed"] = None  # any import of keras_embed now raises ImportError
    import keras, numpy as np
    try:
        import keras_embed
        blocked = False
    except ImportError:
        blocked = True
    modules = []
    for model_path, x_path, y_path in zip(*[iter(sys.argv[1:])] * 3):  # (model, inputs, outputs) triples
        model = keras.saving.load_model(model_path)
        np.save(y_path, keras.ops.convert_to_numpy(model(np.load(x_path), training=False)))
        modules.append(sorted({type(layer).__module__ for layer in [model, *model.layers]}))
    print(json.dumps({"blocked": blocked, "modules": modules}))
""")


def test_pruned_models_saved_as_keras_load_without_keras_embed(tmp_path, pruned_models):
    """One subprocess (TensorFlow takes seconds to import) loads every pruned model."""
    arguments, expected = [], []
    for kind, (_, _, _, pruned) in pruned_models.items():
        model_path, x_path, y_path = tmp_path / f"{kind}.keras", tmp_path / f"{kind}_x.npy", tmp_path / f"{kind}_y.npy"
        pruned.save(model_path)
        x = some_inputs(pruned, samples=16)
        np.save(x_path, x)
        arguments += [str(model_path), str(x_path), str(y_path)]
        expected.append((y_path, outputs(pruned, x)))

    done = subprocess.run(
        [sys.executable, "-c", STOCK_PROBE, *arguments],
        capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=180,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["blocked"] is True
    assert len(probe["modules"]) == len(pruned_models) == 2
    for modules in probe["modules"]:
        assert all(module.startswith("keras.") for module in modules), modules
    for y_path, want in expected:
        np.testing.assert_allclose(np.load(y_path), want, rtol=0, atol=1e-6)
