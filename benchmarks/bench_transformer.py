"""Transformer benchmark (issue 19, item 4): `--mode data` on heads and feed-forward units
against magnitude (L1) pruning of the same heads and units, no fine-tuning on either side.

Run with `make bench`; it prints the table and rewrites the `transformer` section of
benchmarks/RESULTS.md.

Data: scikit-learn's digits read as sequences (each 8x8 image is 8 steps of 8 features,
`bundled_dataset("digits")`), split as bench_compression.py splits them: order =
np.random.default_rng(0).permutation(1797), the first 70% (1257 rows) for training and
calibration, the rest (540 rows) the test split no compression step sees.

Model, trained here with keras.utils.set_random_seed(0), Adam 1e-3, sparse categorical
cross-entropy from logits, 40 epochs, batch 64: a Conv1D stem (32 filters, kernel 3, relu),
two of the Keras examples' encoder blocks (MultiHeadAttention of 4 heads, key_dim 8;
Dropout 0.1; Add; LayerNormalization; Dense 64 relu, Dense 32; Add; LayerNormalization),
GlobalAveragePooling1D, Dense 10.

Rows, made and measured in one run, for each keep ratio R:
    keras-embed data R   prune(model, mode="data", rule=StoppingRule("keep_ratio", R), data=x_train):
                         R of every layer's heads and feed-forward units kept, chosen and refitted
                         by least squares on the training inputs
    L1 R                 the same number of heads and units per layer: the heads whose output-projection
                         rows, and the units whose outgoing weights, have the largest L1 norm; no refit
FLOPs are keras-embed's count (`Graph.flops`: multiply-adds x 2 of every layer, attention's
scores and weighted sums included); accuracy and agreement with the original on the 540 test
rows; time is the wall clock of the compression call.
"""

import datetime
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_embed  # noqa: E402
from keras_embed.edit.heads import apply_head_edit, head_weights  # noqa: E402
from keras_embed.edit.plan import GroupEdit, HeadEdit  # noqa: E402
from keras_embed.edit.surgery import apply_round  # noqa: E402
from keras_embed.files.data import bundled_dataset  # noqa: E402
from keras_embed.model.build import build_model  # noqa: E402
from keras_embed.stopping import StoppingRule  # noqa: E402
from results import load, machine, write_section  # noqa: E402

L = keras.layers
KEEP_RATIOS = (0.625, 0.5, 0.375, 0.25)
EPOCHS, BATCH = 40, 64


def split():
    x, y = bundled_dataset("digits")
    order = np.random.default_rng(0).permutation(len(x))
    x = x.reshape(-1, 8, 8)[order]
    train = int(0.7 * len(x))
    return x[:train], y[order][:train], x[train:], y[order][train:]


def encoder_block(x, name):
    attention = L.MultiHeadAttention(4, 8, name=f"{name}_attention")(x, x)
    x = L.LayerNormalization(epsilon=1e-6, name=f"{name}_norm_1")(L.Add()([x, L.Dropout(0.1)(attention)]))
    ffn = L.Dense(32, name=f"{name}_ffn_2")(L.Dense(64, activation="relu", name=f"{name}_ffn_1")(x))
    return L.LayerNormalization(epsilon=1e-6, name=f"{name}_norm_2")(L.Add()([x, L.Dropout(0.1)(ffn)]))


def trained_model(x, y):
    keras.utils.set_random_seed(0)
    rows = keras.Input((8, 8), name="rows")
    h = L.Conv1D(32, 3, padding="same", activation="relu", name="stem")(rows)
    h = encoder_block(encoder_block(h, "block_1"), "block_2")
    model = keras.Model(rows, L.Dense(10, name="logits")(L.GlobalAveragePooling1D()(h)), name="digits_transformer")
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, verbose=0)
    return model


def l1_pruned(model, like):
    """`model` with as many heads and feed-forward units per layer as `like` keeps: those of
    largest L1 norm of output-projection rows (heads) or outgoing weights (units)."""
    graph = keras_embed.read_model(model)
    for node in [node for node in graph.nodes if node.kind == "MultiHeadAttention"]:
        norms = np.abs(head_weights(node)["output"]).sum(axis=(1, 2))
        dropped = np.argsort(norms, kind="stable")[:len(norms) - like.get_layer(node.name).num_heads]
        graph = apply_head_edit(graph, HeadEdit(node.name, len(norms), zero_out=tuple(sorted(int(h) for h in dropped))))
    for group in graph.editable_groups():
        (reader, _), = graph.readers_of(group)
        norms = np.abs(np.moveaxis(reader.entry.kernel(reader), -2, 0)).reshape(graph.group_width(group), -1).sum(axis=1)
        dropped = np.argsort(norms, kind="stable")[:len(norms) - like.get_layer(group).units]
        graph = apply_round(graph, (GroupEdit(group, len(norms), zero_out=tuple(sorted(int(u) for u in dropped))),))
    return build_model(graph)


def measure(name, model, original, x_test, y_test, seconds):
    logits, reference = model.predict(x_test, verbose=0), original.predict(x_test, verbose=0)
    flops = keras_embed.read_model(model).flops
    return {"row": name, "heads": [model.get_layer(f"block_{b}_attention").num_heads for b in (1, 2)],
            "units": [model.get_layer(f"block_{b}_ffn_1").units for b in (1, 2)], "flops": flops,
            "accuracy": float(np.mean(logits.argmax(1) == y_test)),
            "agreement": float(np.mean(logits.argmax(1) == reference.argmax(1))), "seconds": seconds}


def table(rows):
    base = rows[0]
    lines = ["| row | heads per layer | FFN units per layer | FLOPs | fewer FLOPs | test accuracy | accuracy drop "
             "(points) | agreement with original | compression s |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['row']} | {row['heads']} | {row['units']} | {row['flops']:,} | "
                     f"{1 - row['flops'] / base['flops']:.1%} | {row['accuracy']:.2%} | "
                     f"{100 * (base['accuracy'] - row['accuracy']):.2f} | {row['agreement']:.2%} | {row['seconds']:.2f} |")
    return "\n".join(lines)


def main():
    started, before = time.perf_counter(), load()
    x_train, y_train, x_test, y_test = split()
    model = trained_model(x_train, y_train)
    rows = [measure("original", model, model, x_test, y_test, 0.0)]
    for ratio in KEEP_RATIOS:
        start = time.perf_counter()
        pruned, _ = keras_embed.prune(model, mode="data", rule=StoppingRule("keep_ratio", ratio), data=x_train,
                                      force=True)
        rows.append(measure(f"keras-embed data {ratio:g}", pruned, model, x_test, y_test, time.perf_counter() - start))
        start = time.perf_counter()
        magnitude = l1_pruned(model, pruned)
        rows.append(measure(f"L1 {ratio:g}", magnitude, model, x_test, y_test, time.perf_counter() - start))
    text = table(rows)
    print(text)
    write_section("transformer", "## Transformer: heads and feed-forward units, no fine-tuning (issue 19)\n\n"
                  "A Conv1D stem and two encoder blocks (4 heads, FFN 64) trained on digits read as 8 rows of 8 "
                  "features; `--mode data` at keep ratios against L1 magnitude pruning of the same numbers of heads "
                  "and units, neither fine-tuned; accuracy and agreement on 540 test rows no step saw.\n\n"
                  f"How it was measured: `benchmarks/bench_transformer.py` (its docstring), "
                  f"{datetime.date.today()}, {machine()}, load average {before} before the run, "
                  f"{time.perf_counter() - started:.0f} s in all.\n\n{text}\n")


if __name__ == "__main__":
    main()
