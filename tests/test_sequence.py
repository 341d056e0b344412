"""Sequence models of 1-D layers (issue 19, part 1): Conv1D (any kernel, stride, dilation,
'causal' padding), MaxPooling1D, AveragePooling1D, the global poolings, UpSampling1D,
ZeroPadding1D and Cropping1D, through the same registry entries as their 2-D forms; text
models on integer tokens, whose Embedding dimensions are a channel group; and the Keras
examples' transformer encoder block, whose MultiHeadAttention fixes the widths around it
(its feed-forward units prune) and whose heads are units (split, merged, removed exactly);
and LSTM, GRU and SimpleRNN (also inside Bidirectional), whose input kernels read their
input channels like a Dense (their own units: `test_recurrent_units`; inside Bidirectional
fixed).

Each model is read and rebuilt to the same function; widening a filter of every Conv1D comes
back through `prune` (library and CLI) to the original size and outputs; `--mode data` with
a keep ratio writes a smaller model that exports; random 1-D architectures (hypothesis)
round-trip the same way. Bidirectional and convolutional recurrent layers are refused by name.
"""

import dataclasses
import json
import re

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_embed
from builders import assert_same_function
from keras_embed.callbacks import EmbeddingMonitor
from keras_embed.edit.heads import apply_head_edit, head_weights, split_head
from keras_embed.edit.plan import HeadEdit
from keras_embed.errors import UnsupportedLayerError
from keras_embed.find.head_refit import contexts
from keras_embed.find.refit import compress_groups
from keras_embed.model.build import build_model
from keras_embed.stopping import StoppingRule
from keras_embed.tools.cli import main
from keras_embed.verify import calibration_inputs

L = keras.layers


def _sequence_cnn():
    x = keras.Input((20, 3), name="signal")
    h = L.Conv1D(8, 3, padding="same", activation="relu", name="c1")(x)
    h = L.MaxPooling1D(name="pool")(h)
    h = L.Conv1D(6, 3, padding="causal", dilation_rate=2, activation="tanh", name="c2")(h)
    h = L.ZeroPadding1D((1, 2), name="pad")(L.UpSampling1D(2, name="up")(h))
    h = L.Conv1D(5, 2, strides=2, activation="relu", name="c3")(L.Cropping1D((2, 1), name="crop")(h))
    h = L.GlobalAveragePooling1D(name="gap")(L.AveragePooling1D(2, name="avg")(h))
    return keras.Model(x, L.Dense(3, name="scores")(h), name="sequence_cnn")


def _branching_sequence():
    """Two Conv1D branches added and concatenated, SpatialDropout1D, GlobalMaxPooling1D."""
    x = keras.Input((16, 4), name="signal")
    stem = L.Conv1D(6, 5, padding="same", activation="relu", name="stem")(x)
    a = L.Conv1D(6, 3, padding="same", activation="gelu", name="branch_a")(stem)
    b = L.Conv1D(4, 1, activation="relu", name="branch_b")(stem)
    h = L.Concatenate(name="join")([L.Add(name="residual")([stem, a]), b])
    h = L.SpatialDropout1D(0.2, name="drop")(h)
    h = L.GlobalMaxPooling1D(name="gmp")(L.Conv1D(7, 3, activation="swish", name="mix")(h))
    return keras.Model(x, L.Dense(2, name="scores")(h), name="branching_sequence")


def _text_classifier():
    """The Keras examples' text CNN: Embedding, Conv1D, GlobalMaxPooling1D, Dense."""
    tokens = keras.Input((12,), dtype="int32", name="tokens")
    h = L.Embedding(VOCABULARY, 8, name="embed")(tokens)
    h = L.GlobalMaxPooling1D(name="gmp")(L.Conv1D(6, 3, padding="same", activation="relu", name="conv")(h))
    return keras.Model(tokens, L.Dense(3, name="scores")(L.Dense(5, activation="relu", name="hidden")(h)),
                       name="text_classifier")


def _encoder_block(x, name, causal=False):
    """The Keras examples' TransformerBlock: attention, Dropout, Add, LayerNormalization, a
    Dense-relu-Dense feed-forward, residual."""
    attention = L.MultiHeadAttention(4, 8, name=f"{name}_attention")(x, x, use_causal_mask=causal)
    x = L.LayerNormalization(epsilon=1e-6, name=f"{name}_norm_1")(L.Add()([x, L.Dropout(0.1)(attention)]))
    ffn = L.Dense(16, name=f"{name}_ffn_2")(L.Dense(32, activation="relu", name=f"{name}_ffn_1")(x))
    return L.LayerNormalization(epsilon=1e-6, name=f"{name}_norm_2")(L.Add()([x, L.Dropout(0.1)(ffn)]))


def _transformer_classifier():
    tokens = keras.Input((10,), dtype="int32", name="tokens")
    x = _encoder_block(_encoder_block(L.Embedding(VOCABULARY, 16, name="embed")(tokens), "block_1"), "block_2")
    return keras.Model(tokens, L.Dense(3, name="scores")(L.GlobalAveragePooling1D()(x)), name="transformer")


def _positional_transformer():
    """Token and position embeddings summed (the functional spelling of the Keras examples'
    TokenAndPositionEmbedding: the positions come as a second integer input), an encoder block."""
    tokens, positions = (keras.Input((10,), dtype="int32", name=name) for name in ("tokens", "positions"))
    x = L.Add(name="embed_sum")([L.Embedding(VOCABULARY, 16, name="token_embed")(tokens),
                                 L.Embedding(10, 16, name="position_embed")(positions)])
    x = L.GlobalAveragePooling1D()(_encoder_block(x, "block_1"))
    return keras.Model([tokens, positions], L.Dense(3, name="scores")(x), name="positional_transformer")


def _masked_transformer(mask_zero=True):
    """Padding tokens (0) masked by the Embedding (mask_zero), causal attention; Keras hands
    the mask on to the attention and to the (masked) mean over positions."""
    tokens = keras.Input((10,), dtype="int32", name="tokens")
    x = _encoder_block(L.Embedding(VOCABULARY, 16, mask_zero=mask_zero, name="embed")(tokens), "block_1", causal=True)
    return keras.Model(tokens, L.Dense(3, name="scores")(L.GlobalAveragePooling1D()(x)), name="masked_transformer")


def _masked_recurrent(mask_zero=True):
    """Padding tokens masked by the Embedding: the LSTM skips them (Keras passes it the mask)."""
    tokens = keras.Input((9,), dtype="int32", name="tokens")
    h = L.Dense(7, activation="relu", name="token_dense")(L.Embedding(VOCABULARY, 8, mask_zero=mask_zero,
                                                                      name="embed")(tokens))
    h = L.LSTM(6, return_sequences=True, name="recurrent")(h)
    h = L.GlobalAveragePooling1D(name="mean")(h)
    return keras.Model(tokens, L.Dense(3, name="scores")(L.Dense(5, activation="relu", name="hidden")(h)),
                       name="masked_recurrent")


def _attention_mask_transformer():
    """An encoder block whose attention takes an `attention_mask` input (batch, queries, keys)."""
    tokens, mask = keras.Input((8,), dtype="int32", name="tokens"), keras.Input((8, 8), dtype="bool", name="mask")
    x = L.Embedding(VOCABULARY, 16, name="embed")(tokens)
    attention = L.MultiHeadAttention(4, 8, name="block_1_attention")(x, x, attention_mask=mask)
    x = L.LayerNormalization(epsilon=1e-6, name="norm_1")(L.Add()([x, attention]))
    ffn = L.Dense(16, name="block_1_ffn_2")(L.Dense(32, activation="relu", name="block_1_ffn_1")(x))
    x = L.LayerNormalization(epsilon=1e-6, name="norm_2")(L.Add()([x, ffn]))
    return keras.Model([tokens, mask], L.Dense(3, name="scores")(L.GlobalAveragePooling1D()(x)), name="masked_attention")


def _padded(tokens, seed=0):
    """`tokens` with a random tail of every row set to the padding token 0 (one token kept)."""
    tokens, lengths = tokens.copy(), np.random.default_rng(seed).integers(1, tokens.shape[1] + 1, len(tokens))
    tokens[np.arange(tokens.shape[1])[None] >= lengths[:, None]] = 0
    return tokens


def _recurrent_classifier(recurrent=lambda: L.LSTM(6, name="recurrent")):
    """Embedding, a Dense on every token, a recurrent layer, a Dense head."""
    tokens = keras.Input((9,), dtype="int32", name="tokens")
    h = recurrent()(L.Dense(7, activation="relu", name="token_dense")(L.Embedding(VOCABULARY, 8, name="embed")(tokens)))
    h = L.GlobalAveragePooling1D(name="mean")(h) if len(h.shape) == 3 else h
    return keras.Model(tokens, L.Dense(3, name="scores")(L.Dense(5, activation="relu", name="hidden")(h)),
                       name="recurrent_classifier")


VOCABULARY = 50
BUILDERS = {"sequence_cnn": _sequence_cnn, "branching": _branching_sequence, "text": _text_classifier,
            "transformer": _transformer_classifier, "lstm": _recurrent_classifier}
GROW = {"sequence_cnn": ["c1", "c2", "c3"], "branching": ["stem", "branch_b", "mix"], "text": ["embed", "conv", "hidden"],
        "transformer": ["block_1_ffn_1", "block_2_ffn_1"], "lstm": ["embed", "token_dense", "recurrent", "hidden"]}
RECURRENT = {"gru": lambda: L.GRU(5, return_sequences=True, name="recurrent"),
             "gru-reset-before": lambda: L.GRU(5, reset_after=False, use_bias=False, name="recurrent"),
             "simple-rnn": lambda: L.SimpleRNN(4, activation="relu", name="recurrent"),
             "bidirectional-lstm": lambda: L.Bidirectional(L.LSTM(4), name="recurrent"),
             "bidirectional-gru-sum": lambda: L.Bidirectional(L.GRU(3, return_sequences=True), merge_mode="sum",
                                                              name="recurrent"),
             "bidirectional-rnn-no-bias": lambda: L.Bidirectional(L.SimpleRNN(3, use_bias=False), name="recurrent")}


def _inputs(model, samples=64, seed=0):
    """Standard-normal features, or tokens below the vocabulary size."""
    return calibration_inputs(model, samples, seed)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def case(request):
    keras.utils.set_random_seed(0)
    model = BUILDERS[request.param]()
    return request.param, model, _inputs(model)


def test_a_sequence_model_is_read_and_rebuilt_to_the_same_function(case):
    _, model, x = case
    assert_same_function(model, build_model(keras_embed.read_model(model)), x)


def test_widened_filters_come_back_through_prune(case):
    kind, model, x = case
    steps = [(layer, 0, 0.3) for layer in GROW[kind]] + [(GROW[kind][0], 1, -0.4)]
    grown, _ = keras_embed.embed(model, widen_steps=steps)
    assert grown.count_params() > model.count_params()

    pruned, report = keras_embed.prune(grown)

    assert pruned.count_params() == model.count_params()
    assert report.to_dict()["removed"]["duplicate"] >= len(steps)
    assert_same_function(model, pruned, x)


def test_data_mode_writes_a_smaller_sequence_model_that_exports(case, tmp_path):
    """Each output is loaded back by its runtime and compared (a recurrent model's TFLite file
    holds it unrolled: the runtime lacks the ops of the loop)."""
    kind, model, x = case
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", x)
    for output in ("small.keras", "small.tflite", "small_savedmodel/"):
        result = CliRunner().invoke(main, ["prune", str(tmp_path / "model.keras"), "-o", f"{tmp_path}/{output}",
                                           "--mode", "data", "--keep-ratio", "0.5", "--data", str(tmp_path / "x.npy"),
                                           "--atol", "1e-3"])
        assert result.exit_code == 0, result.output
    assert keras.saving.load_model(tmp_path / "small.keras").count_params() < model.count_params()


def test_the_cli_widens_and_prunes_back_a_sequence_model(tmp_path):
    keras.utils.set_random_seed(1)
    model = _sequence_cnn()
    model.save(tmp_path / "model.keras")
    invoke = CliRunner().invoke
    grown = invoke(main, ["embed", str(tmp_path / "model.keras"), "-o", str(tmp_path / "grown.keras"),
                          "--widen", "c1:2:0.25", "--widen", "c2:0:-0.5"])
    assert grown.exit_code == 0, grown.output
    back = invoke(main, ["prune", str(tmp_path / "grown.keras"), "-o", str(tmp_path / "back.keras")])
    assert back.exit_code == 0, back.output
    restored = keras.saving.load_model(tmp_path / "back.keras")
    assert restored.count_params() == model.count_params()
    assert_same_function(model, restored, _inputs(model, seed=3))


ITEM_3_WIDENINGS = {  # issue 19's model kinds, widened on heads, FFN units and embedding dimensions (recurrent
    # units: test_recurrent_units)
    "transformer": (_transformer_classifier, ["block_1_attention:1:0.3", "block_2_ffn_1:4:-0.5", "block_1_ffn_1:0:0.7"]),
    "text": (_text_classifier, ["embed:1:0.3", "embed:5:-0.4", "conv:0:0.6", "hidden:2:1.5"]),
    "positional": (_positional_transformer, ["block_1_attention:0:0.4", "block_1_ffn_1:3:0.2"]),
}


@pytest.mark.parametrize("kind", sorted(ITEM_3_WIDENINGS))
def test_widened_models_come_back_through_the_cli_and_export(kind, tmp_path):
    """Through `embed` and `prune` to no more parameters and outputs within 1e-4 relative, and
    to a SavedModel and a .tflite file, each loaded back and verified by the command."""
    build, steps = ITEM_3_WIDENINGS[kind]
    keras.utils.set_random_seed(6)
    model = build()
    x = _inputs(model, samples=64)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "x.npz", **(x if isinstance(x, dict) else {"x": x}))
    invoke = CliRunner().invoke
    grown = invoke(main, ["embed", str(tmp_path / "model.keras"), "-o", str(tmp_path / "grown.keras"),
                          *[argument for step in steps for argument in ("--widen", step)]])
    assert grown.exit_code == 0, grown.output
    for output in ("back.keras", "back.tflite", "back_savedmodel/"):
        back = invoke(main, ["prune", str(tmp_path / "grown.keras"), "-o", f"{tmp_path}/{output}",
                             "--data", str(tmp_path / "x.npz")])
        assert back.exit_code == 0, back.output
    restored = keras.saving.load_model(tmp_path / "back.keras")
    assert restored.count_params() <= model.count_params()  # units dead on the data go too
    assert_same_function(model, restored, x, relative=1e-4)


def test_in_a_transformer_the_feed_forward_units_are_editable_and_the_stream_is_fixed():
    graph = keras_embed.read_model(_transformer_classifier())
    assert graph.editable_groups() == ["block_1_ffn_1", "block_2_ffn_1"]
    assert {graph.group_of(name) for name in ("embed", "block_1_attention", "block_2_ffn_2")} <= graph.frozen_groups


def test_split_heads_come_back_through_the_cli(tmp_path):
    """`embed --widen ATTENTION:HEAD:ALPHA` adds a copy of a head; prune merges it back."""
    keras.utils.set_random_seed(4)
    model = _transformer_classifier()
    model.save(tmp_path / "model.keras")
    grown = CliRunner().invoke(main, ["embed", str(tmp_path / "model.keras"), "-o", str(tmp_path / "grown.keras"),
                                      "--widen", "block_1_attention:1:0.3", "--widen", "block_2_attention:0:-0.4",
                                      "--widen", "block_2_attention:3:0.8"])
    assert grown.exit_code == 0, grown.output
    assert keras.saving.load_model(tmp_path / "grown.keras").get_layer("block_2_attention").num_heads == 6
    back = CliRunner().invoke(main, ["prune", str(tmp_path / "grown.keras"), "-o", str(tmp_path / "back.keras"),
                                     "--report", str(tmp_path / "report.json")])
    assert back.exit_code == 0, back.output
    restored = keras.saving.load_model(tmp_path / "back.keras")
    assert restored.count_params() == model.count_params()
    assert [restored.get_layer(f"block_{index}_attention").num_heads for index in (1, 2)] == [4, 4]
    assert json.loads((tmp_path / "report.json").read_text())["removed"]["heads"] == 3
    assert_same_function(model, restored, _inputs(model, seed=5))


def test_an_identity_feed_forward_layer_lifted_into_the_encoder_is_pruned_away(tmp_path):
    """`embed --deepen` after the first FFN layer inserts a relu Dense that is the identity on
    the data; `prune` with the same data composes it away: the original size and function."""
    keras.utils.set_random_seed(2)
    model = _transformer_classifier()
    x = _inputs(model, samples=128)
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", x)
    invoke = CliRunner().invoke
    lifted = invoke(main, ["embed", str(tmp_path / "model.keras"), "-o", str(tmp_path / "lifted.keras"),
                           "--deepen", "block_1_ffn_1", "--data", str(tmp_path / "x.npy")])
    assert lifted.exit_code == 0, lifted.output
    assert keras.saving.load_model(tmp_path / "lifted.keras").count_params() > model.count_params()
    back = invoke(main, ["prune", str(tmp_path / "lifted.keras"), "-o", str(tmp_path / "back.keras"),
                         "--data", str(tmp_path / "x.npy")])
    assert back.exit_code == 0, back.output
    restored = keras.saving.load_model(tmp_path / "back.keras")
    assert restored.count_params() == model.count_params()
    assert_same_function(model, restored, x)


def test_the_tables_show_heads_before_and_after(tmp_path):
    """A split head: embed's table says 4 -> 5, analyze's and prune's 5 -> 4 (the width columns do not change)."""
    keras.utils.set_random_seed(1)
    _transformer_classifier().save(tmp_path / "model.keras")
    invoke = CliRunner().invoke
    grown = invoke(main, ["embed", str(tmp_path / "model.keras"), "-o", str(tmp_path / "grown.keras"),
                          "--widen", "block_2_attention:3:0.5"])
    analyzed = invoke(main, ["analyze", str(tmp_path / "grown.keras")])
    pruned = invoke(main, ["prune", str(tmp_path / "grown.keras"), "-o", str(tmp_path / "back.keras")])
    for result, heads in ((grown, ["4", "5"]), (analyzed, ["5", "4"]), (pruned, ["5", "4"])):
        assert result.exit_code == 0, result.output
        header, _, *rows = result.output.splitlines()
        assert header.split()[-2:] == ["heads_before", "heads_after"], header
        (row,) = [line for line in rows if line.startswith("block_2_attention ")]
        assert row.split()[-2:] == heads, row


def test_heads_that_add_nothing_or_a_constant_are_removed_exactly():
    """Head 0 has zero output rows (it adds nothing), head 2 a zero value kernel (it adds
    its value bias times its output rows, a constant the output bias absorbs)."""
    keras.utils.set_random_seed(6)
    x = keras.Input((6, 8))
    attention = L.MultiHeadAttention(4, 3, name="attention", bias_initializer="random_normal")
    model = keras.Model(x, L.Dense(2)(L.Flatten()(attention(x, x))))
    query, query_bias, key, key_bias, value, value_bias, output, output_bias = attention.get_weights()
    output[0], value[:, 2] = 0.0, 0.0
    attention.set_weights([query, query_bias, key, key_bias, value, value_bias, output, output_bias])

    pruned, report = keras_embed.prune(model)

    assert pruned.get_layer("attention").num_heads == 2
    assert report.to_dict()["removed"]["heads"] == 2
    assert_same_function(model, pruned, _inputs(model))


def _attention_model(heads, key_dim, use_bias):
    """(model, its MultiHeadAttention layer 'attention' of value_dim 3, {part: weights} to
    edit and set back in order)."""
    x = keras.Input((6, 5))
    attention = L.MultiHeadAttention(heads, key_dim, value_dim=3, use_bias=use_bias, bias_initializer="random_normal",
                                     name="attention")
    model = keras.Model(x, L.Dense(2)(L.Flatten()(attention(x, x))))
    names = ("query", "query_bias", "key", "key_bias", "value", "value_bias", "output", "output_bias")
    return model, attention, dict(zip(names if use_bias else names[::2], attention.get_weights()))


def _assert_pruned_to(model, dims, columns):
    """`prune` leaves layer 'attention' with (heads, key_dim, value_dim) `dims`, `columns` columns removed, the same function."""
    pruned, report = keras_embed.prune(model)
    layer = pruned.get_layer("attention")
    assert (layer.num_heads, layer.key_dim, layer.value_dim) == dims
    assert report.to_dict()["removed"]["head_columns"] == columns
    assert_same_function(model, pruned, _inputs(model))


@pytest.mark.parametrize("use_bias", [True, False])
def test_key_and_value_columns_that_add_nothing_or_a_constant_are_removed_exactly(use_bias):
    """Inside each of 3 heads (key_dim 4, value_dim 3): one query/key column silenced (a zero
    query column in heads 0 and 1, a zero key column in head 2) and one value column (zero
    output rows; with biases, a zero value kernel column in head 1: its constant goes to the
    output bias). Every head loses one of each: key_dim 3, value_dim 2, the same function,
    the query rescaled for the new 1/sqrt(key_dim)."""
    keras.utils.set_random_seed(7)
    model, attention, weights = _attention_model(3, 4, use_bias)
    weights["query"][:, 0, 1] = weights["query"][:, 1, 3] = weights["key"][:, 2, 0] = 0.0
    if use_bias:
        weights["query_bias"][0, 1] = weights["query_bias"][1, 3] = 0.0
        weights["value"][:, 1, 2] = 0.0
    weights["output"][0, 0] = weights["output"][2, 1] = 0.0
    if not use_bias:
        weights["output"][1, 2] = 0.0
    attention.set_weights(list(weights.values()))
    _assert_pruned_to(model, (3, 3, 2), columns=6)


@pytest.mark.parametrize("use_bias", [True, False])
def test_copies_of_query_key_and_value_columns_inside_heads_are_merged_exactly(use_bias):
    """Head 0: query column 2 a copy of column 0 (its key is added to column 0's), value
    column 1 a copy of column 0 (its output rows go to column 0). Head 1: key column 1 a
    copy of column 0 (its query is added), value column 2 a copy of column 1."""
    keras.utils.set_random_seed(8)
    model, attention, weights = _attention_model(2, 3, use_bias)
    for name, head, copy, original in (("query", 0, 2, 0), ("value", 0, 1, 0), ("key", 1, 1, 0), ("value", 1, 2, 1)):
        weights[name][:, head, copy] = weights[name][:, head, original]
        if use_bias:
            weights[f"{name}_bias"][head, copy] = weights[f"{name}_bias"][head, original]
    attention.set_weights(list(weights.values()))
    _assert_pruned_to(model, (2, 2, 2), columns=4)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads=st.sampled_from([1, 2, 3, 5]), key_dim=st.integers(1, 4), value_dim=st.integers(1, 3), use_bias=st.booleans(),
       splits=st.lists(st.tuples(st.integers(0, 4), st.floats(-2.0, 2.0)), min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_property_random_head_splits_come_back(heads, key_dim, value_dim, use_bias, splits, seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((4, 5))
    attended = L.MultiHeadAttention(heads, key_dim, value_dim=value_dim, use_bias=use_bias,
                                    bias_initializer="random_normal", name="attention")(x, x)
    model = keras.Model(x, L.Dense(2)(L.GlobalAveragePooling1D()(attended)))
    grown = model
    for count, (head, alpha) in enumerate(splits, start=heads + 1):
        if count == 4:  # the sequence length: Keras computes wrongly with as many heads (`heads.computes_wrongly`)
            with pytest.raises(ValueError, match="as many heads as positions"):
                keras_embed.embed(grown, widen_steps=[("attention", head % heads, alpha)])
            return
        grown, _ = keras_embed.embed(grown, widen_steps=[("attention", head % heads, alpha)])

    pruned, _ = keras_embed.prune(grown)

    assert pruned.get_layer("attention").num_heads == heads
    assert pruned.count_params() == model.count_params()
    assert_same_function(model, pruned, _inputs(model, seed=seed))


def _cross_attention():
    query, context = keras.Input((5, 6), name="query"), keras.Input((7, 4), name="context")
    memory = L.Dense(4, activation="tanh", name="memory")(context)
    attended = L.MultiHeadAttention(3, 3, value_dim=5, name="cross")(query, memory, L.Dense(3, name="keys")(context))
    return keras.Model([query, context], L.Dense(2)(L.Flatten()(attended)))


@pytest.mark.parametrize("build, layer", [(_transformer_classifier, "block_2_attention"), (_cross_attention, "cross"),
                                         (_masked_transformer, "block_1_attention"),
                                         (_attention_mask_transformer, "block_1_attention")],
                         ids=["self-attention", "cross-attention with a key", "masked causal self-attention",
                              "attention mask input"])
def test_the_head_contexts_reproduce_the_attention_output(build, layer):
    """`head_refit.contexts`, from the layer's weights, times the output projection is what
    Keras computes (with the masks Keras hands the layer, and its causal mask): the data
    mode's head features are the layer's own."""
    keras.utils.set_random_seed(2)
    model = build()
    graph = keras_embed.read_model(model)
    node = graph.by_name[layer]
    x = _inputs(model)
    x = _padded(x) if build is _masked_transformer else x
    query, value, key, mask = node.entry.attention_inputs(node)
    values = build_model(graph, outputs=[query, value, key, f"{query}/mask", f"{value}/mask", f"{key}/mask",
                                         mask or query, layer]).predict(x, verbose=0)
    parts = head_weights(node)
    context = contexts(parts, *values[:3], node.config.get("use_causal_mask", False),
                       (values[3], values[4], None if key == value else values[5], mask and values[6])).numpy()
    output = context @ parts["output"].reshape(-1, parts["output"].shape[-1]) + parts["output_bias"]
    expected = values[-1].reshape(-1, values[-1].shape[-1])
    assert np.abs(output - expected).max() <= 1e-5 * np.abs(expected).max()


def test_data_mode_drops_one_of_two_near_copies_of_a_head_and_refits_the_output():
    """Head 1 split and the copy's query moved by 1e-3: no exact rule merges them, and
    keeping 4 of the 5 heads the data mode drops one of the two near copies, refits the
    output projection by least squares, and the layer's output stays within 1% of its scale."""
    keras.utils.set_random_seed(4)
    model = _transformer_classifier()
    graph = split_head(keras_embed.read_model(model), "block_1_attention", 1, 0.4)
    node = graph.by_name["block_1_attention"]
    parts = head_weights(node)
    parts["query"] = parts["query"].copy()
    parts["query"][:, 4] += 1e-3 * np.random.default_rng(0).standard_normal(parts["query"][:, 4].shape)
    graph = graph.with_nodes([dataclasses.replace(node, weights=tuple(parts.values())) if item is node else item
                              for item in graph.nodes])
    grown, x = build_model(graph), _inputs(model, samples=256)
    assert keras_embed.prune(grown)[0].get_layer("block_1_attention").num_heads == 5  # not an exact copy

    compressed, edits = compress_groups(graph, x, keep_ratio=0.8)

    (edit,) = [edit for edit in edits if getattr(edit, "layer", None) == "block_1_attention"]
    assert len(edit.kept) == 4 and len({1, 4} & set(edit.kept)) == 1, edit.kept
    reference, pruned = (build_model(which, outputs=["block_1_attention"]).predict(x, verbose=0)
                         for which in (graph, compressed))  # the layer's output: the FFN units are cut too
    assert np.abs(pruned - reference).max() <= 1e-2 * np.abs(reference).max()


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads=st.integers(2, 5), key_dim=st.integers(1, 4), value_dim=st.integers(1, 3), use_bias=st.booleans(),
       dropped=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_property_the_head_refit_fits_the_calibration_data_best(heads, key_dim, value_dim, use_bias, dropped, seed):
    """On the calibration rows the refitted layer is at least as close to the original as the
    same heads kept with their own output rows (least squares can only do better), and a
    keep ratio of 1 changes nothing."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((6, 5))
    attended = L.MultiHeadAttention(heads, key_dim, value_dim=value_dim, use_bias=use_bias,
                                    bias_initializer="random_normal", name="attention")(x, x)
    model = keras.Model(x, L.Dense(2)(L.GlobalAveragePooling1D()(attended)))
    graph, rows = keras_embed.read_model(model), _inputs(model, samples=128, seed=seed)
    assert compress_groups(graph, rows, keep_ratio=1.0)[1] == ()

    compressed, edits = compress_groups(graph, rows, keep_ratio=max(1, heads - dropped) / heads)

    (edit,) = edits
    assert len(edit.kept) == max(1, heads - dropped)
    dropped = tuple(head for head in range(heads) if head not in edit.kept)
    unfitted = apply_head_edit(graph, HeadEdit("attention", heads, zero_out=dropped))
    reference, refitted, kept = (build_model(which, outputs=["attention"]).predict(rows, verbose=0)
                                 for which in (graph, compressed, unfitted))
    assert np.sum((refitted - reference) ** 2) <= np.sum((kept - reference) ** 2) * (1 + 1e-4) + 1e-9


def test_data_mode_removes_heads_and_feed_forward_units_of_the_transformer(tmp_path):
    """`prune --mode data --keep-ratio 0.5` keeps 2 of 4 heads in each attention layer and
    16 of 32 units in each feed-forward layer; the report gives output error and accuracy."""
    keras.utils.set_random_seed(0)
    model = _transformer_classifier()
    x = _inputs(model, samples=256)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", x=x, y=model.predict(x, verbose=0).argmax(axis=1))
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "model.keras"), "-o", str(tmp_path / "small.keras"),
                                       "--mode", "data", "--keep-ratio", "0.5", "--data", str(tmp_path / "data.npz"),
                                       "--report", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    small = keras.saving.load_model(tmp_path / "small.keras")
    assert [small.get_layer(f"block_{block}_attention").num_heads for block in (1, 2)] == [2, 2]
    assert [small.get_layer(f"block_{block}_ffn_1").units for block in (1, 2)] == [16, 16]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["removed"]["heads"] == 4
    checks = json.dumps(report)
    assert "output_error" in checks and "accuracy" in checks, checks


def test_a_positional_embedding_sum_widens_prunes_back_and_compresses(tmp_path):
    """A split head and a split FFN unit come back exactly; `--mode data` on an .npz keyed
    by input name removes heads and units."""
    keras.utils.set_random_seed(5)
    model = _positional_transformer()
    x = _inputs(model, samples=128)
    grown, _ = keras_embed.embed(model, widen_steps=[("block_1_attention", 1, 0.3), ("block_1_ffn_1", 2, 0.4)])

    pruned, report = keras_embed.prune(grown)

    assert pruned.count_params() == model.count_params()
    assert report.to_dict()["removed"]["heads"] == 1 and report.to_dict()["removed"]["duplicate"] == 1
    assert_same_function(model, pruned, x)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "x.npz", **x)
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "model.keras"), "-o", str(tmp_path / "small.keras"),
                                       "--mode", "data", "--keep-ratio", "0.5", "--data", str(tmp_path / "x.npz")])
    assert result.exit_code == 0, result.output
    small = keras.saving.load_model(tmp_path / "small.keras")
    assert (small.get_layer("block_1_attention").num_heads, small.get_layer("block_1_ffn_1").units) == (2, 16)


def test_cross_attention_of_two_inputs_is_read_and_rebuilt():
    keras.utils.set_random_seed(3)
    model = _cross_attention()
    x = _inputs(model)
    assert_same_function(model, build_model(keras_embed.read_model(model)), x)


MASKED = {"transformer": _masked_transformer, "lstm": _masked_recurrent, "attention-mask": _attention_mask_transformer}


@pytest.mark.parametrize("kind", sorted(MASKED))
def test_masks_pass_through_widening_pruning_and_export(kind, tmp_path):
    """The Embedding's padding mask (and the causal mask) reach the rebuilt layers: the models
    compute what the original does on padded tokens, which a model without the masks does
    not; split heads, units and embedding dimensions come back through the CLI, and the data
    mode writes a smaller model that exports."""
    keras.utils.set_random_seed(7)
    model = MASKED[kind]()
    x = _inputs(model, samples=128)
    if isinstance(x, dict):  # the mask is an input: all true is no mask
        expected, everywhere = model.predict(x, verbose=0), model.predict({**x, "mask": np.ones_like(x["mask"])}, verbose=0)
    else:
        x = _padded(x)
        unmasked = MASKED[kind](mask_zero=False)
        unmasked.set_weights(model.get_weights())
        expected, everywhere = model.predict(x, verbose=0), unmasked.predict(x, verbose=0)
    assert np.abs(everywhere - expected).max() > 1e-2 * np.abs(expected).max()
    assert_same_function(model, build_model(keras_embed.read_model(model)), x)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "x.npz", **(x if isinstance(x, dict) else {"x": x}))
    steps = {"transformer": ["block_1_attention:2:0.3", "block_1_ffn_1:5:-0.4"],
             "attention-mask": ["block_1_attention:1:-0.3", "block_1_ffn_1:7:0.4"],
             "lstm": ["embed:3:0.6", "recurrent:1:0.3", "token_dense:0:-0.5"]}[kind]
    invoke = CliRunner().invoke
    grown = invoke(main, ["embed", str(tmp_path / "model.keras"), "-o", str(tmp_path / "grown.keras"), "--data",
                          str(tmp_path / "x.npz"), *[argument for step in steps for argument in ("--widen", step)]])
    assert grown.exit_code == 0, grown.output
    back = invoke(main, ["prune", str(tmp_path / "grown.keras"), "-o", str(tmp_path / "back.keras"),
                         "--data", str(tmp_path / "x.npz")])
    assert back.exit_code == 0, back.output
    restored = keras.saving.load_model(tmp_path / "back.keras")
    assert restored.count_params() <= model.count_params()
    assert_same_function(model, restored, x, relative=1e-4)
    for output in ("small.tflite", "small_savedmodel/"):
        small = invoke(main, ["prune", str(tmp_path / "model.keras"), "-o", f"{tmp_path}/{output}", "--mode", "data",
                              "--keep-ratio", "0.5", "--data", str(tmp_path / "x.npz"), "--atol", "1e-3"])
        assert small.exit_code == 0, small.output


def test_a_mask_keras_would_not_propagate_again_is_refused_by_name():
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    signal = L.Embedding(VOCABULARY, 4, name="embed")(tokens)  # no mask_zero: the mask below is the user's own
    mask = keras.ops.not_equal(tokens, 0)
    model = keras.Model(tokens, L.Dense(2)(L.LSTM(3, name="recurrent")(signal, mask=mask)))
    with pytest.raises(UnsupportedLayerError, match="layer 'recurrent' \\(LSTM\\) is called with a mask from"):
        keras_embed.read_model(model)


@pytest.mark.parametrize("keywords, named", [({"return_attention_scores": True}, "return_attention_scores")])
def test_attention_returning_its_scores_is_refused_by_name(tmp_path, keywords, named):
    x = keras.Input((6, 4))
    attended = L.MultiHeadAttention(2, 2, name="attention")(x, x, **keywords)
    attended = attended[0] if isinstance(attended, tuple) else attended
    keras.Model(x, L.Dense(1)(L.Flatten()(attended))).save(tmp_path / "model.keras")
    result = CliRunner().invoke(main, ["analyze", str(tmp_path / "model.keras")])
    assert result.exit_code == 4 and f"'attention' (MultiHeadAttention) is called with {named}" in result.output, \
        result.output


@pytest.mark.parametrize("build", [_text_classifier, _transformer_classifier], ids=["text", "transformer"])
def test_the_monitor_measures_curvature_through_embedding_tables(build):
    """Hessian-vector products through an Embedding (whose gradients are IndexedSlices)."""
    keras.utils.set_random_seed(0)
    model = build()
    x = _inputs(model, samples=128)
    y = np.random.default_rng(0).integers(0, 3, 128)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    monitor = EmbeddingMonitor(x, y, patience=1, min_delta=0.5)  # a check every epoch: each is a plateau
    history = model.fit(x, y, epochs=3, verbose=0, callbacks=[monitor])
    assert np.isfinite(history.history["embed/min_curvature"][-1]) and monitor.curvature is not None
    first_group = keras_embed.read_model(model).editable_groups()[0]
    assert np.isfinite(history.history[f"embed/{first_group}/effective_width"][-1])


def test_calibration_tokens_stay_below_every_vocabulary():
    tokens = calibration_inputs(_text_classifier())
    assert tokens.dtype == np.int32 and tokens.min() == 0 and tokens.max() == VOCABULARY - 1


def test_a_scale_and_shift_after_an_embedding_fold_into_its_table():
    tokens = keras.Input((10,), dtype="int32")
    embedded = L.Embedding(VOCABULARY, 4, name="embed")(tokens)
    shifted = L.Rescaling(np.array([0.5, 2.0, -1.0, 3.0], "float32"), offset=0.25, name="scale")(embedded)
    model = keras.Model(tokens, L.Dense(2)(L.GlobalAveragePooling1D()(shifted)))
    rebuilt = build_model(keras_embed.read_model(model))
    assert not any(isinstance(layer, L.Rescaling) for layer in rebuilt.layers)
    assert_same_function(model, rebuilt, _inputs(model))


def test_an_embedding_lifted_and_given_a_null_dimension_comes_back():
    """A Dense lifted after the Embedding (linear on the data) and a null dimension (zero in
    every row of the table) are both undone by prune."""
    keras.utils.set_random_seed(2)
    tokens = keras.Input((10,), dtype="int32")
    pooled = L.GlobalAveragePooling1D()(L.Embedding(VOCABULARY, 6, name="embed")(tokens))
    model = keras.Model(tokens, L.Dense(2)(L.Dense(4, activation="relu", name="hidden")(pooled)))
    x = _inputs(model, seed=4)
    grown, _ = keras_embed.embed(model, null_steps=[("embed", 0.0)], deepen_layers=["embed"], data=x)
    assert len(grown.layers) == len(model.layers) + 1
    assert next(layer for layer in grown.layers if isinstance(layer, L.Embedding)).output_dim == 7

    pruned, _ = keras_embed.prune(grown, data=x)

    assert [type(layer) for layer in pruned.layers] == [type(layer) for layer in model.layers]
    assert pruned.count_params() == model.count_params()
    assert_same_function(model, pruned, x)


SEQUENCE_LAYERS = st.sampled_from(["none", "max_pool", "avg_pool", "up", "pad", "crop"])


@st.composite
def sequence_architectures(draw):
    """(length, channels, [(filters, kernel, strides, padding, dilation, activation, between)], head)."""
    convs = []
    for _ in range(draw(st.integers(1, 3))):
        strides = draw(st.integers(1, 2))
        convs.append((draw(st.integers(2, 6)), draw(st.integers(1, 4)), strides,
                      draw(st.sampled_from(["valid", "same", "causal"])),
                      1 if strides > 1 else draw(st.integers(1, 2)),
                      draw(st.sampled_from(["relu", "tanh", "linear", "elu"])), draw(SEQUENCE_LAYERS)))
    return draw(st.integers(24, 40)), draw(st.integers(1, 3)), convs, draw(st.sampled_from(["gap", "gmp", "flatten"]))


def _between(kind, index):
    return {"max_pool": lambda: L.MaxPooling1D(2, padding="same", name=f"between_{index}"),
            "avg_pool": lambda: L.AveragePooling1D(2, padding="same", name=f"between_{index}"),
            "up": lambda: L.UpSampling1D(2, name=f"between_{index}"),
            "pad": lambda: L.ZeroPadding1D((index % 2, 1), name=f"between_{index}"),
            "crop": lambda: L.Cropping1D((1, 0), name=f"between_{index}")}.get(kind)


def _random_sequence_model(length, channels, convs, head, seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((length, channels))
    h = x
    for index, (filters, kernel, strides, padding, dilation, activation, between) in enumerate(convs):
        if padding == "valid" and h.shape[1] - dilation * (kernel - 1) < 2:  # keep every sequence non-empty
            padding = "same"
        h = L.Conv1D(filters, kernel, strides=strides, padding=padding, dilation_rate=dilation,
                     activation=activation, bias_initializer="random_normal", name=f"conv_{index}")(h)
        layer = _between(between, index) if h.shape[1] >= 4 else None
        h = layer()(h) if layer is not None else h
    h = {"gap": L.GlobalAveragePooling1D(), "gmp": L.GlobalMaxPooling1D(), "flatten": L.Flatten()}[head](h)
    return keras.Model(x, L.Dense(2, name="scores")(h))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(architecture=sequence_architectures(), seed=st.integers(0, 2**16))
def test_property_random_sequence_models_round_trip_a_widening(architecture, seed):
    model = _random_sequence_model(*architecture, seed)
    x = _inputs(model, samples=16, seed=seed)
    steps = [(f"conv_{index}", seed % filters, 0.3 + 0.1 * index)
             for index, (filters, *_) in enumerate(architecture[2])]
    grown, _ = keras_embed.embed(model, widen_steps=steps)

    pruned, _ = keras_embed.prune(grown)

    assert pruned.count_params() <= model.count_params()
    assert_same_function(model, pruned, x)


@pytest.mark.parametrize("kind", RECURRENT)
def test_the_channels_a_recurrent_layer_reads_merge_and_refit_exactly(kind):
    """Widened channels of the layers before a GRU or SimpleRNN come back through prune; data
    mode refits its input kernel (and input bias) and writes a smaller model."""
    keras.utils.set_random_seed(5)
    model = _recurrent_classifier(RECURRENT[kind])
    x = _inputs(model, seed=6)
    assert_same_function(model, build_model(keras_embed.read_model(model)), x)
    grown, _ = keras_embed.embed(model, widen_steps=[("embed", 1, 0.4), ("token_dense", 2, -0.3)])
    pruned, _ = keras_embed.prune(grown)
    assert pruned.count_params() <= model.count_params()
    assert_same_function(model, pruned, x)
    small, _ = keras_embed.prune(model, mode="data", rule=StoppingRule("keep_ratio", 0.5), data=x, force=True)
    assert small.get_layer("token_dense").units < 7
    assert small.get_layer("recurrent").output.shape == model.get_layer("recurrent").output.shape


@pytest.mark.parametrize("layer, named", [
    (L.LSTM(4, go_backwards=True), "(LSTM) is stateful, returns its state or runs backwards"),
    (L.LSTM(4, stateful=True), "(LSTM) is stateful"),
    (L.Bidirectional(L.LSTM(4, stateful=True)), "(Bidirectional) is stateful"),
    (L.RNN(L.LSTMCell(4)), "(RNN) is not supported"),
], ids=["backwards", "stateful", "bidirectional-stateful", "rnn-of-cells"])
def test_other_recurrent_layers_are_refused_by_name(layer, named):
    x = keras.Input((10, 3), batch_size=2)
    model = keras.Model(x, L.Dense(2)(layer(x)))
    with pytest.raises(UnsupportedLayerError, match=re.escape(named)):
        keras_embed.read_model(model)


@pytest.mark.zoo
def test_a_keras_hub_backbone_is_refused_naming_its_custom_blocks_and_what_it_would_take(tmp_path):
    """keras-hub (the `hub` extra, installed by `make zoo`) builds a BERT backbone from a config
    without weights; its blocks are custom classes (TransformerEncoder, PositionEmbedding)."""
    keras_hub = pytest.importorskip("keras_hub")
    keras_hub.models.BertBackbone(vocabulary_size=100, num_layers=2, num_heads=4, hidden_dim=64, intermediate_dim=128,
                                  max_sequence_length=64).save(tmp_path / "bert.keras")
    result = CliRunner().invoke(main, ["analyze", str(tmp_path / "bert.keras")])
    assert result.exit_code == 4, result.output
    for named in ("'transformer_layer_0', 'transformer_layer_1' (TransformerEncoder)", "(PositionEmbedding)",
                  "keras-hub's layers are custom classes: rebuild the model from stock Keras layers"):
        assert named in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_conv_lstm_is_refused_with_exit_4(tmp_path):
    x = keras.Input((4, 6, 6, 2))
    keras.Model(x, L.Flatten()(L.ConvLSTM2D(3, 3)(x))).save(tmp_path / "model.keras")
    result = CliRunner().invoke(main, ["analyze", str(tmp_path / "model.keras")])
    assert result.exit_code == 4 and "(ConvLSTM2D) is not supported" in result.output, result.output
