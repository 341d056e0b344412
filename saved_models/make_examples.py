"""Regenerates the example models: `python saved_models/make_examples.py`.

Trains a narrow MLP (64-16-12-10, relu then tanh) on scikit-learn's bundled digits data
(no download), then grows it without changing its function: split units with assorted
alphas, rescaled relu copies, null units and constant units, all shuffled. `make demo`
prunes the wide model back to the narrow widths.

Writes, beside this script:
    digits_narrow.keras   the trained narrow network
    digits_widened.keras  the same function, 64-48-36-10
    digits_heldout.npz    held-out inputs `x` and labels `y` for calibration
"""

from pathlib import Path

import keras
import numpy as np

from keras_embed import build_model, read_model
from keras_embed.files.data import bundled_dataset
from keras_embed.edit.operators import add_constant, add_null, permute, rescale, widen

HERE = Path(__file__).parent


def train_narrow(x, y):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64,), name="pixels"),
        keras.layers.Dense(16, activation="relu", name="hidden_relu"),
        keras.layers.Dense(12, activation="tanh", name="hidden_tanh"),
        keras.layers.Dense(10, name="logits"),
    ], name="digits_mlp")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, y, epochs=60, batch_size=64, verbose=0)
    return model


def grow(graph, rng):
    """16 -> 48 and 12 -> 36 units, every step function-preserving."""
    def width(layer):
        return graph.node(layer).width

    for layer, extra in (("hidden_relu", 26), ("hidden_tanh", 20)):
        for _ in range(extra):
            unit = int(rng.integers(width(layer)))
            graph = widen(graph, layer, unit, alpha=float(rng.uniform(-1.0, 2.0)))
    for unit in range(16, 32):
        graph = rescale(graph, "hidden_relu", unit, factor=float(rng.uniform(0.5, 2.0)))
    graph = add_null(graph, "hidden_relu", bias=0.3, incoming=rng.standard_normal(64))
    graph = add_null(graph, "hidden_relu", bias=-0.1, incoming=rng.standard_normal(64))
    graph = add_null(graph, "hidden_tanh", bias=0.2)
    for _ in range(4):
        graph = add_constant(graph, "hidden_relu", bias=float(rng.uniform(0.1, 1.0)), outgoing=rng.standard_normal(width("hidden_tanh")))
    for _ in range(3):
        graph = add_constant(graph, "hidden_tanh", bias=float(rng.uniform(-1.0, 1.0)), outgoing=rng.standard_normal(10))
    for layer in ("hidden_relu", "hidden_tanh"):
        graph = permute(graph, layer, rng.permutation(width(layer)))
    return graph


def split(x):
    """Seeded indices: 1,500 training rows, the rest held out."""
    order = np.random.default_rng(0).permutation(len(x))
    return order[:1500], order[1500:]


def save_examples(narrow, wide, x, y, names):
    """Saves the narrow and wide models and the held-out data under `names` (three file
    names) and returns held-out accuracy and the narrow-vs-wide max abs output difference."""
    heldout = split(x)[1]
    accuracy = float(np.mean(np.argmax(narrow.predict(x[heldout], verbose=0), axis=1) == y[heldout]))
    gap = float(np.abs(narrow.predict(x[heldout], verbose=0) - wide.predict(x[heldout], verbose=0)).max())
    narrow.save(HERE / names[0])
    wide.save(HERE / names[1])
    np.savez(HERE / names[2], x=x[heldout], y=y[heldout])
    return accuracy, gap


def main():
    x, y = bundled_dataset("digits")  # what --dataset digits gives
    train = split(x)[0]
    narrow = train_narrow(x[train], y[train])
    wide = build_model(grow(read_model(narrow), np.random.default_rng(1)))
    accuracy, gap = save_examples(narrow, wide, x, y, ("digits_narrow.keras", "digits_widened.keras", "digits_heldout.npz"))
    print(f"narrow {read_model(narrow).widths}, widened {read_model(wide).widths}, "
          f"held-out accuracy {accuracy:.3f}, max abs difference narrow vs widened {gap:.2e}")


if __name__ == "__main__":
    main()
