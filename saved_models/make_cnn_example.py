"""Regenerates the convolutional example: `python saved_models/make_cnn_example.py`.

Trains a small residual CNN on scikit-learn's bundled digits images (8x8x1, no download),
then widens it with the channel-splitting operator (the outputs stay the same for every
input): the residual block's channels are split in both branches of its Add at once.
`make demo` prunes the widened model back to the trained widths. A copy with every
Conv2D/Dense weight moved by N(0, 1e-3) noise has near copies instead of exact ones: exact
pruning finds little there, `--mode data` finds them.

Writes, beside this script:
    digits_cnn.keras            the trained CNN (stem 8, residual block 8, head 12 channels)
    digits_cnn_widened.keras    the same function with 14-13-18 channels
    digits_images_heldout.npz   held-out images `x` (n, 8, 8, 1) and labels `y`
    digits_images_train.npz     the 1,500 training images and labels (calibration data for --mode data)
    digits_cnn_perturbed.keras  the widened CNN with the noise added
"""

import keras
import numpy as np

from keras_embed.edit.operators import widen
from keras_embed.files.data import bundled_dataset
from keras_embed.model.build import build_model
from keras_embed.model.read import read_model
from make_examples import HERE, save_examples, split  # the same split and files as the MLP examples


def train_cnn(x, y):
    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 1), name="image")
    stem = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(image)
    branch = keras.layers.Conv2D(8, 3, padding="same", name="res_a")(stem)
    branch = keras.layers.BatchNormalization(name="res_a_bn")(branch)
    branch = keras.layers.Activation("relu", name="res_a_relu")(branch)
    branch = keras.layers.Conv2D(8, 3, padding="same", name="res_b")(branch)
    merged = keras.layers.Add(name="residual")([stem, branch])
    merged = keras.layers.Activation("relu", name="residual_relu")(merged)
    pooled = keras.layers.MaxPooling2D(name="pool")(merged)
    head = keras.layers.Conv2D(12, 3, activation="relu", name="head")(pooled)
    logits = keras.layers.Dense(10, name="logits")(keras.layers.Flatten(name="flatten")(head))
    model = keras.Model(image, logits, name="digits_cnn")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, y, epochs=30, batch_size=64, verbose=0)
    return model


def grow(network, rng):
    """Splits channels with assorted alphas: 8 -> 14 (stem and res_b, coupled by the Add),
    8 -> 13 (res_a), 12 -> 18 (head)."""
    for layer, extra in (("stem", 6), ("res_a", 5), ("head", 6)):
        for _ in range(extra):
            width = network.node(layer).width
            network = widen(network, layer, int(rng.integers(width)), alpha=float(rng.uniform(-1.0, 2.0)))
    return network


def perturb(model, scale=1e-3, seed=2):
    """Adds N(0, `scale`) noise to every Conv2D and Dense weight of `model` (in place)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            layer.set_weights([weight + scale * rng.normal(size=weight.shape) for weight in layer.get_weights()])
    return model


def main():
    x, y = bundled_dataset("digits")
    x = x.reshape(-1, 8, 8, 1)
    train = split(x)[0]
    narrow = train_cnn(x[train], y[train])
    wide = build_model(grow(read_model(narrow), np.random.default_rng(1)))
    accuracy, gap = save_examples(narrow, wide, x, y, ("digits_cnn.keras", "digits_cnn_widened.keras", "digits_images_heldout.npz"))
    np.savez_compressed(HERE / "digits_images_train.npz", x=x[train], y=y[train])
    perturb(build_model(read_model(wide))).save(HERE / "digits_cnn_perturbed.keras")
    print(f"params {narrow.count_params()} -> widened {wide.count_params()}, held-out accuracy {accuracy:.3f}, "
          f"max abs difference narrow vs widened {gap:.2e}")


if __name__ == "__main__":
    main()
